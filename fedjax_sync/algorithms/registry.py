"""Algorithms by name, with one set of hyperparameters for the CLI and experiments."""

from __future__ import annotations

import dataclasses
from typing import Callable

import optax

from fedjax_sync.algorithms.fed_avg import fed_avg, fed_avg_m, fed_prox
from fedjax_sync.algorithms.fed_opt import fed_adagrad, fed_adam, fed_yogi
from fedjax_sync.algorithms.fed_sgd import fed_sgd
from fedjax_sync.types import Algorithm


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
  """Hyperparameters shared by the registered algorithms (unused ones are ignored).

  `server_learning_rate=None` takes each algorithm's default: 1.0 for FedAvg,
  FedAvgM and FedProx, 0.1 for FedSGD, 0.01 for FedAdam/FedYogi/FedAdagrad.
  """

  client_learning_rate: float = 0.01
  client_momentum: float = 0.0
  server_learning_rate: float | None = None
  server_momentum: float = 0.9
  mu: float = 0.01
  tau: float = 1e-3
  b1: float = 0.9
  b2: float = 0.99
  # Client-drift methods (fedjax_sync.algorithms.scaffold/fed_sam/kuramoto).
  scaffold_option: str = 'II'
  sam_rho: float = 0.05
  sagm_alpha: float = 0.001
  kappa: float = 0.005
  kappa_decay: float = 1.0

  def client_optimizer(self) -> optax.GradientTransformation:
    if self.client_momentum:
      return optax.sgd(self.client_learning_rate, momentum=self.client_momentum)
    return optax.sgd(self.client_learning_rate)


Builder = Callable[..., Algorithm]
_REGISTRY: dict[str, tuple[Builder, str]] = {}


def register_algorithm(name: str, builder: Builder, description: str) -> None:
  """Registers `builder(loss_fn, hparams: Hyperparameters, **engine_kwargs) -> Algorithm`."""
  if name in _REGISTRY:
    raise ValueError(f'algorithm {name!r} is already registered')
  _REGISTRY[name] = (builder, description)


def algorithm_names() -> list[str]:
  return sorted(_REGISTRY)


def algorithm_descriptions() -> dict[str, str]:
  return {k: v[1] for k, v in sorted(_REGISTRY.items())}


def build_algorithm(name: str, loss_fn: Callable, hparams: Hyperparameters = Hyperparameters(),
                    **engine_kwargs) -> Algorithm:
  """Builds a registered algorithm; `engine_kwargs` are e.g. aggregator, execution."""
  if name not in _REGISTRY:
    raise ValueError(f'unknown algorithm {name!r}; valid: {", ".join(algorithm_names())}')
  return _REGISTRY[name][0](loss_fn, hparams, **engine_kwargs)


def _server_lr(h: Hyperparameters, default: float) -> float:
  return default if h.server_learning_rate is None else h.server_learning_rate


register_algorithm(
    'fedavg', lambda loss, h, **kw: fed_avg(
        loss, h.client_optimizer(), server_optimizer=optax.sgd(_server_lr(h, 1.0)), **kw),
    'FedAvg, McMahan et al. 2017 (arXiv 1602.05629)')
register_algorithm(
    'fedavgm', lambda loss, h, **kw: fed_avg_m(
        loss, h.client_optimizer(), server_learning_rate=_server_lr(h, 1.0),
        server_momentum=h.server_momentum, **kw),
    'FedAvg with server momentum, Hsu et al. 2019 (arXiv 1909.06335)')
register_algorithm(
    'fedprox', lambda loss, h, **kw: fed_prox(
        loss, h.client_optimizer(), mu=h.mu, server_optimizer=optax.sgd(_server_lr(h, 1.0)), **kw),
    'FedProx, Li et al. 2020 (arXiv 1812.06127)')
register_algorithm(
    'fedsgd', lambda loss, h, **kw: fed_sgd(
        loss, server_learning_rate=_server_lr(h, 0.1), **kw),
    'FedSGD, McMahan et al. 2017 (arXiv 1602.05629)')
for _rule, _builder in (('adam', fed_adam), ('yogi', fed_yogi), ('adagrad', fed_adagrad)):
  register_algorithm(
      f'fed{_rule}', (lambda build: lambda loss, h, **kw: build(
          loss, h.client_optimizer(), server_learning_rate=_server_lr(h, 0.01), b1=h.b1,
          b2=h.b2, tau=h.tau, **kw))(_builder),
      f'Fed{_rule.capitalize()}, Reddi et al. 2021 (arXiv 2003.00295)')
