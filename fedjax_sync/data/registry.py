"""Datasets by name for the CLI and experiments."""

from __future__ import annotations

from typing import Callable

from fedjax_sync.data.federated import FederatedData
from fedjax_sync.data.synthetic import synthetic

_DATASETS: dict[str, tuple[Callable[..., FederatedData], str, str]] = {}


def register_dataset(name: str, loader: Callable[..., FederatedData], description: str,
                     default_model: str) -> None:
  """Registers `loader(**options) -> FederatedData` under `name`."""
  if name in _DATASETS:
    raise ValueError(f'dataset {name!r} is already registered')
  _DATASETS[name] = (loader, description, default_model)


def dataset_names() -> list[str]:
  return sorted(_DATASETS)


def dataset_descriptions() -> dict[str, str]:
  return {k: v[1] for k, v in sorted(_DATASETS.items())}


def default_model(name: str) -> str:
  _check(name)
  return _DATASETS[name][2]


def _check(name: str) -> None:
  if name not in _DATASETS:
    raise ValueError(f'unknown dataset {name!r}; valid: {", ".join(dataset_names())}')


def load_dataset(name: str, **options) -> FederatedData:
  """Loads a registered dataset; `options` go to its loader (e.g. num_clients, seed)."""
  _check(name)
  return _DATASETS[name][0](**options)


register_dataset(
    'synthetic',
    lambda num_clients=30, seed=0, alpha=1.0, beta=1.0, **_: synthetic(
        alpha, beta, num_clients=num_clients, seed=seed),
    'Synthetic(α, β) of FedProx (the embedded default: α = β = 1, 30 clients)',
    'logistic_regression')
register_dataset(
    'synthetic_iid',
    lambda num_clients=30, seed=0, **_: synthetic(iid=True, num_clients=num_clients, seed=seed),
    'Synthetic IID of FedProx', 'logistic_regression')
