"""Datasets by name for the CLI and experiments."""

from __future__ import annotations

import inspect
import os
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
  if _is_path(name):
    from fedjax_sync.data.files import default_model_for_path
    return default_model_for_path(name)
  _check(name)
  return _DATASETS[name][2]


def _is_path(name: str) -> bool:
  from fedjax_sync.data.files import looks_like_path
  return name not in _DATASETS and looks_like_path(name)


def _check(name: str) -> None:
  if name not in _DATASETS:
    raise ValueError(f'unknown dataset {name!r}; valid: {", ".join(dataset_names())}, or the '
                     'path of a LEAF/TFF/FedJAX/IDX dataset file or directory')


def load_dataset(name: str, **options) -> FederatedData:
  """Loads a registered dataset, or a dataset file by path (`fedjax_sync.data.files`).

  `options` go to its loader (e.g. num_clients, seed).
  """
  if _is_path(name):
    from fedjax_sync.data.files import load_path
    return load_path(name, **options)
  _check(name)
  _check_options(name, options)
  return _DATASETS[name][0](**options)


# Options every registered dataset accepts (the CLI and the studies pass them to any
# dataset); a loader that downloads nothing ignores `data_dir`.
COMMON_OPTIONS = ('num_clients', 'seed', 'data_dir')


def dataset_options(name: str) -> list[str]:
  """The keyword options `load_dataset(name, ...)` accepts."""
  _check(name)
  parameters = inspect.signature(_DATASETS[name][0]).parameters.values()
  named = {p.name for p in parameters
           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
  if any(p.kind == p.VAR_KEYWORD for p in parameters):
    named |= set(COMMON_OPTIONS)
  return sorted(named)


def is_partitioned(name: str) -> bool:
  """Whether a dataset (a registered name or a path) is centralized data split among
  clients by a partition (`partition=`, `alpha=`, `shards_per_client=`).

  The others are naturally federated and keep their own clients: FedProx's synthetic
  data (generated per client), Shakespeare, and LEAF/TFF/FedJAX files; IDX files
  are centralized.
  """
  if _is_path(name):
    from fedjax_sync.data.files import detect_format
    return detect_format(name) == 'idx'
  return 'partition' in dataset_options(name)


def partitioned_datasets() -> list[str]:
  """The registered datasets that take partition options (see `is_partitioned`)."""
  return [name for name in dataset_names() if 'partition' in dataset_options(name)]


def data_path_datasets() -> list[str]:
  """The registered datasets that read a file or directory given as `data_path=`."""
  return [name for name in dataset_names() if 'data_path' in dataset_options(name)]


def _check_options(name: str, options) -> None:
  """A misspelt or foreign option (`partiton='iid'`) is an error, never silently dropped."""
  valid = dataset_options(name)
  unknown = sorted(set(options) - set(valid))
  if unknown:
    raise ValueError(f'unknown option(s) {", ".join(map(repr, unknown))} for dataset {name!r}; '
                     f'valid: {", ".join(valid)}')


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


def _shakespeare(cache_dir=None, data_dir=None, **_):
  # A natural partition (one client per play and role): num_clients and seed do not apply.
  # `--data-dir` names the prepare cache (default $FEDJAX_SYNC_CACHE or ~/.cache/fedjax_sync).
  from fedjax_sync.data.shakespeare import shakespeare
  return shakespeare(cache_dir=cache_dir or data_dir)


register_dataset('shakespeare', _shakespeare,
                 'Shakespeare by play and role, 80-character sequences (run first: '
                 'fedjax-sync prepare shakespeare)', 'char_lstm')


# Centralized sources, partitioned with `partition` in {'iid', 'dirichlet', 'shards'}
# (options: alpha, shards_per_client, method, seed = the partition seed).
def _synthetic_pooled(num_clients=5, seed=0, partition='dirichlet', alpha=0.5,
                      shards_per_client=1, method='per_class', **_):
  from fedjax_sync.data.npz import repartition
  return repartition(synthetic(1.0, 1.0, num_clients=30, seed=0), num_clients,
                     partition=partition, alpha=alpha, shards_per_client=shards_per_client,
                     seed=seed, method=method, name='pooled Synthetic(1, 1)')


def _digits(num_clients=10, seed=0, partition='dirichlet', alpha=0.5, shards_per_client=1,
            method='per_class', **_):
  from fedjax_sync.data.digits import digits
  return digits(num_clients, partition=partition, alpha=alpha,
                shards_per_client=shards_per_client, seed=seed, method=method)


def _npz(path=None, num_clients=10, seed=0, partition='dirichlet', alpha=0.5,
         shards_per_client=1, method='per_class', data_path=None, **_):
  # `data_path` is the CLI's --data-path (the one option naming a dataset's file);
  # `path=` is the Python spelling.
  from fedjax_sync.data.npz import load_npz
  if path and data_path and os.path.abspath(path) != os.path.abspath(data_path):
    raise ValueError(f"the 'npz' dataset got two files, path={path!r} and data_path="
                     f'{data_path!r}; valid: one of them')
  return load_npz(path or data_path, num_clients=num_clients, partition=partition, alpha=alpha,
                  shards_per_client=shards_per_client, seed=seed, method=method)


def _tfds_loader(tfds_key):
  def load(num_clients=10, seed=0, partition='dirichlet', alpha=0.5, shards_per_client=1,
           method='per_class', data_dir=None, **_):
    from fedjax_sync.data.tfds import tfds_dataset
    return tfds_dataset(tfds_key, num_clients, data_dir=data_dir, partition=partition,
                        alpha=alpha, shards_per_client=shards_per_client, seed=seed,
                        method=method)
  return load


register_dataset('synthetic_pooled', _synthetic_pooled,
                 'pooled Synthetic(1, 1) examples re-partitioned (partition=, alpha=)',
                 'logistic_regression')
register_dataset('digits', _digits,
                 "scikit-learn's 1,797 real 8×8 digits, offline (extra 'digits')", 'mlp')
register_dataset('npz', _npz, 'a local .npz holding x_train, y_train, x_test, y_test '
                 '(--data-path FILE; path=)', 'mlp')


def _idx(data_path=None, num_clients=10, seed=0, partition='dirichlet', alpha=0.5,
         shards_per_client=1, method='per_class', **_):
  from fedjax_sync.data.idx import idx_dataset
  return idx_dataset(data_path, num_clients, partition=partition, alpha=alpha,
                     shards_per_client=shards_per_client, seed=seed, method=method)


def _fashion_mnist(num_clients=10, seed=0, partition='dirichlet', alpha=0.5,
                   shards_per_client=1, method='per_class', data_dir=None, data_path=None, **_):
  from fedjax_sync.data.idx import fashion_mnist
  return fashion_mnist(num_clients, data_path=data_path, data_dir=data_dir, partition=partition,
                       alpha=alpha, shards_per_client=shards_per_client, seed=seed,
                       method=method)


register_dataset('idx', _idx, 'a directory of MNIST-format IDX files (--data-path DIR)',
                 'emnist_cnn')


def _register_tfds():
  from fedjax_sync.data.tfds import TFDS_DATASETS
  for key, spec in TFDS_DATASETS.items():
    if key == 'fashion_mnist':  # TFDS copy if prepared, else the IDX files (Debian's)
      register_dataset(key, _fashion_mnist, 'Fashion-MNIST 28×28 (TFDS, else IDX files: Debian '
                       "'dataset-fashion-mnist' or --data-path)", spec.model)
    else:
      register_dataset(key, _tfds_loader(key), spec.description, spec.model)


_register_tfds()
