"""FedNova: normalized averaging for clients that run unequal numbers of local steps.

Wang, Liu, Liang, Joshi & Poor 2020, "Tackling the Objective Inconsistency Problem
in Heterogeneous Federated Optimization", NeurIPS 2020, arXiv 2007.07481, eq. (6)
and Algorithm 1 (local SGD or heavy-ball momentum).

Client i runs τ_i local steps from x (τ_i: the steps holding at least one real
example, counted from the batch mask, so a client padded to the round's longest
client counts only its own steps) and returns `u_i = x − y_i = η G_i a_i`. Its
normalizing vector a_i has `‖a_i‖₁ = τ_i` for plain SGD and
`Σ_{k=1..τ_i} (1 − ρ^k)/(1 − ρ)` with local momentum ρ. The server steps

    x ← x − η_g τ_eff Σ_i p_i u_i / ‖a_i‖₁,   τ_eff = Σ_i p_i ‖a_i‖₁,

with p_i the clients' weights normalized (`batch.weight`: the example counts by
default). When every client runs the same τ this is FedAvg's `x − Σ p_i u_i`.
FedNova's paper also covers proximal local updates; this module implements the
SGD and momentum cases.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import Aggregator, compute_dtype
from fedjax_sync.algorithms.federated import ClientOutput, Combination, federated_algorithm
from fedjax_sync.algorithms.registry import Hyperparameters, client_and_server, register_algorithm
from fedjax_sync.algorithms.scaffold import effective_steps
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.clients.local import make_local_step, make_local_training
from fedjax_sync.types import Algorithm


def fed_nova_update(loss_fn: Callable, learning_rate: float, *, momentum: float = 0.0,
                    unroll: int | bool = 1):
  """The FedNova client: local SGD from x; `update = x − y_i`, `aux = ‖a_i‖₁`."""
  optimizer = optax.sgd(learning_rate, momentum=momentum or None)
  train = make_local_training(make_local_step(loss_fn, optimizer), unroll=unroll)

  def client_update(server_params, extra, client_state, data, mask, key):
    del extra, client_state
    params, _, metrics = train(server_params, optimizer.init(server_params), data, mask, key)
    update = tree_lib.tree_sub(server_params, params)
    num_steps = jnp.sum(jnp.any(mask, axis=1))
    return ClientOutput(update=update, state=(),
                        aux=effective_steps(num_steps, momentum, compute_dtype(update)),
                        metrics={'loss_sum': metrics.loss_sum,
                                 'num_examples': metrics.num_examples})

  return client_update


def fed_nova_combination(norms: jax.Array, batch, extra) -> Combination:
  """`τ_eff Σ_i p_i u_i / ‖a_i‖₁` as weights `w_i / ‖a_i‖₁` and normalizer
  `(Σ w)² / Σ w_i ‖a_i‖₁` (= `Σ w / τ_eff`); a client without any step adds nothing."""
  del extra
  weight = batch.weight.astype(norms.dtype)
  trained = (weight > 0) & (norms > 0)
  weight = jnp.where(trained, weight, jnp.zeros_like(weight))
  safe_norms = jnp.where(trained, norms, jnp.ones_like(norms))
  total = jnp.sum(weight)
  return Combination(weights=weight / safe_norms,
                     normalizer=total ** 2 / jnp.maximum(jnp.sum(weight * safe_norms),
                                                         jnp.finfo(norms.dtype).tiny))


def fed_nova(loss_fn: Callable, learning_rate: float, *, momentum: float = 0.0,
             server_learning_rate: float = 1.0,
             server_optimizer: optax.GradientTransformation | None = None,
             aggregator: Aggregator | None = None, num_clients: int | None = None,
             execution: ClientExecution = ClientExecution(), unroll: int | bool = 1,
             name: str = 'fednova') -> Algorithm:
  """FedNova (Wang et al. 2020, arXiv 2007.07481): normalized averaging of local updates.

  Example:
    >>> algorithm = fed_nova(model.loss, 0.05)   # clients with --local-epochs run unequal τ_i
    >>> state, metrics = jax.jit(algorithm.round)(algorithm.init(params), client_batch, key)

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    learning_rate: local SGD step size η.
    momentum: local heavy-ball momentum ρ (`‖a_i‖₁` accounts for it).
    server_learning_rate: η_g; the server optimizer is `sgd(η_g)`.
    server_optimizer: overrides `sgd(server_learning_rate)`.
    aggregator: reducer of the normalized updates (default `weighted_mean()`).
    num_clients: population size (only needed by aggregators with per-client state).
    execution: client execution strategy and mesh.
    unroll: unrolling of the local-step loop.
    name: the algorithm's name.
  """
  if isinstance(learning_rate, (int, float)) and not learning_rate > 0:
    raise ValueError(f'FedNova needs a positive local learning rate, got {learning_rate!r}')
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f'FedNova local momentum must be in [0, 1), got {momentum!r}')
  return federated_algorithm(
      fed_nova_update(loss_fn, learning_rate, momentum=momentum, unroll=unroll),
      server_optimizer=server_optimizer or optax.sgd(server_learning_rate),
      aggregator=aggregator, num_clients=num_clients, combine=fed_nova_combination,
      execution=execution, name=name)


def _build(loss, h: Hyperparameters, **kw):
  return fed_nova(loss, h.client_learning_rate, momentum=h.client_momentum,
                  server_learning_rate=(1.0 if h.server_learning_rate is None
                                        else h.server_learning_rate), **kw)


register_algorithm('fednova', _build,
                   'FedNova normalized averaging, Wang et al. 2020 (arXiv 2007.07481)',
                   client_and_server(1.0))
