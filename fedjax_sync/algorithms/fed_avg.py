"""FedAvg and FedProx: local SGD from the global model, then a server step.

FedAvg: McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
from Decentralized Data", arXiv 1602.05629, Algorithm 1. FedAvgM: Hsu et al. 2019,
arXiv 1909.06335 (server momentum). FedProx: Li et al. 2020, arXiv 1812.06127,
local objective F_k(v) + (μ/2)‖v − w‖².
"""

from __future__ import annotations

from typing import Callable

import jax
import optax

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import Aggregator
from fedjax_sync.algorithms.federated import ClientOutput, federated_algorithm
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.clients.local import is_static_zero, make_local_step, make_local_training
from fedjax_sync.types import Algorithm


def local_training_update(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
                          prox_mu: float = 0.0, unroll: int | bool = 1):
  """The client update of FedAvg-type methods: S masked local steps from the global
  model with a fresh client optimizer state; returns the pseudo-gradient `w − w_k`."""
  train = make_local_training(make_local_step(loss_fn, client_optimizer, prox_mu=prox_mu),
                              unroll=unroll)

  def client_update(server_params, extra, client_state, data, mask, key):
    del extra, client_state
    opt_state = client_optimizer.init(server_params)
    params, _, metrics = train(server_params, opt_state, data, mask, key,
                               anchor=None if is_static_zero(prox_mu) else server_params)
    return ClientOutput(update=tree_lib.tree_sub(server_params, params), state=(), aux=(),
                        metrics={'loss_sum': metrics.loss_sum,
                                 'num_examples': metrics.num_examples})

  return client_update


def fed_avg(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
            server_optimizer: optax.GradientTransformation | None = None,
            aggregator: Aggregator | None = None, num_clients: int | None = None,
            execution: ClientExecution = ClientExecution(), unroll: int | bool = 1,
            name: str = 'fedavg') -> Algorithm:
  """Federated Averaging (McMahan et al. 2017, arXiv 1602.05629, Algorithm 1).

  Each sampled client runs local training from the global model w and returns
  `w − w_k`; the server applies `server_optimizer` (default `optax.sgd(1.0)`, i.e.
  `w ← w + Σ_k (n_k/n) Δ_k`) to the aggregate (default: weighted by examples).

  Example:
    >>> model = fedjax_sync.models.logistic_regression((60,), 10)
    >>> algorithm = fed_avg(model.loss, optax.sgd(0.01))
    >>> state = algorithm.init(model.init(jax.random.key(0)))
    >>> state, metrics = jax.jit(algorithm.round)(state, client_batch, key)

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    client_optimizer: optax optimizer of local training (fresh state every round).
    server_optimizer: optax optimizer applied to the aggregated pseudo-gradient.
    aggregator: reducer of pseudo-gradients (default `weighted_mean()`).
    num_clients: population size, needed by aggregators with per-client state.
    execution: client execution strategy and mesh.
    unroll: unrolling of the local-step loop.
  """
  return federated_algorithm(
      local_training_update(loss_fn, client_optimizer, unroll=unroll),
      server_optimizer=server_optimizer or optax.sgd(1.0), aggregator=aggregator,
      num_clients=num_clients, execution=execution, name=name)


def fed_avg_m(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
              server_learning_rate: float = 1.0, server_momentum: float = 0.9,
              **kwargs) -> Algorithm:
  """FedAvg with server momentum (Hsu et al. 2019, arXiv 1909.06335):
  `v ← β v + Δ̄; w ← w + η v` = `optax.sgd(η, momentum=β)` on the pseudo-gradient."""
  return fed_avg(loss_fn, client_optimizer,
                 server_optimizer=optax.sgd(server_learning_rate, momentum=server_momentum),
                 name=kwargs.pop('name', 'fedavgm'), **kwargs)


def fed_prox(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
             mu: float = 0.01, server_optimizer: optax.GradientTransformation | None = None,
             aggregator: Aggregator | None = None, num_clients: int | None = None,
             execution: ClientExecution = ClientExecution(), unroll: int | bool = 1,
             name: str = 'fedprox') -> Algorithm:
  """FedProx (Li et al. 2020, arXiv 1812.06127, Algorithm 2).

  Local objective `F_k(v) + (μ/2)‖v − w‖²` (its gradient term `μ(v − w)` is added
  to every local step's gradient); the paper's grid is μ ∈ {0.001, 0.01, 0.1, 1}.
  With μ = 0 it is FedAvg. Inexact local solves are modelled by the fixed local work.
  μ may be a traced array, so a `Sweep` can sweep it in one program.
  """
  if not isinstance(mu, jax.Array) and mu < 0:   # an array μ (a sweep) is checked by its caller
    raise ValueError(f'FedProx mu must be ≥ 0, got {mu}')
  return federated_algorithm(
      local_training_update(loss_fn, client_optimizer, prox_mu=mu, unroll=unroll),
      server_optimizer=server_optimizer or optax.sgd(1.0), aggregator=aggregator,
      num_clients=num_clients, execution=execution, name=name)
