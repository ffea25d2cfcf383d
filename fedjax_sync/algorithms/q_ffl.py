"""q-FedAvg: fair resource allocation by q-fair federated learning (q-FFL).

Li, Sanjabi, Beirami & Smith 2020, "Fair Resource Allocation in Federated
Learning", ICLR 2020, arXiv 1905.10497, Algorithm 2 (q-FedAvg).

q-FFL minimizes `Σ_k p_k F_k^{q+1}(w) / (q + 1)`: a larger q puts more weight on
the clients with a larger loss (q = 0 is FedAvg's objective). A sampled client k
runs local SGD (step size η) from the global model w to w̄_k, evaluates its loss
`F_k(w)` at the global model over the examples of its round, and with `L = 1/η`
(the paper's Lipschitz estimate, as its experiments set it) computes

    Δw_k = L (w − w̄_k),   Δ_k = F_k^q(w) Δw_k,
    h_k  = q F_k^{q−1}(w) ‖Δw_k‖² + L F_k^q(w).

The server steps `w ← w − Σ_k Δ_k / Σ_k h_k`. With q = 0, `Δ_k = L (w − w̄_k)`
and `h_k = L`, so the step is exactly the unweighted mean of the local models
`w̄_k` (FedAvg's local models averaged 1/K, whatever the example counts).

As the authors' code does, `F_k` is offset by 1e-10 before its powers are taken
(a client with zero loss would make `F^{q−1}` infinite for q < 1).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import Aggregator, compute_dtype
from fedjax_sync.algorithms.federated import ClientOutput, Combination, federated_algorithm
from fedjax_sync.algorithms.registry import (CLIENT_LEARNING_RATE, CLIENT_MOMENTUM, Q_FAIRNESS,
                                             register_algorithm)
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.clients.local import (make_local_step, make_local_training, masked_mean,
                                       split_loss_output)
from fedjax_sync.types import Algorithm

# Added to the loss before its powers, as in the authors' implementation.
LOSS_OFFSET = 1e-10


def examples_loss(loss_fn: Callable) -> Callable:
  """`loss_sum(params, data [S, B, ...], mask [S, B], key) -> (Σ losses, count)`: the
  loss of `params` summed over the real examples of one client's round (step s uses
  key `fold_in(key, s)`, as local training does). One forward pass, no gradient."""

  def loss_sum(params, data, mask, key):
    def body(carry, xs):
      total, count = carry
      batch, m, s = xs
      losses, _ = split_loss_output(loss_fn(params, batch, jax.random.fold_in(key, s)))
      mean, n = masked_mean(losses, m)
      return (total + mean * n, count + n), None

    dtype = compute_dtype(params)
    (total, count), _ = jax.lax.scan(body, (jnp.zeros((), dtype), jnp.zeros((), dtype)),
                                     (data, mask, jnp.arange(mask.shape[0])))
    return total, count

  return loss_sum


class QFFLAux(NamedTuple):
  """What a q-FedAvg client reports beside its update: `F_k(w)` and `‖w − w̄_k‖²`."""

  loss: jax.Array
  update_sq_norm: jax.Array


def q_ffl_update(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
                 unroll: int | bool = 1):
  """The q-FedAvg client: local training from w (update `w − w̄_k`) and `F_k(w)`."""
  train = make_local_training(make_local_step(loss_fn, client_optimizer), unroll=unroll)
  loss_at = examples_loss(loss_fn)

  def client_update(server_params, extra, client_state, data, mask, key):
    del extra, client_state
    total, count = loss_at(server_params, data, mask, key)
    params, _, metrics = train(server_params, client_optimizer.init(server_params), data, mask,
                               key)
    update = tree_lib.tree_sub(server_params, params)
    return ClientOutput(update=update, state=(),
                        aux=QFFLAux(loss=total / jnp.maximum(count, 1),
                                    update_sq_norm=tree_lib.tree_sq_norm(update)),
                        metrics={'loss_sum': metrics.loss_sum,
                                 'num_examples': metrics.num_examples})

  return client_update


def q_ffl_combination(q: float, learning_rate) -> Callable:
  """The server step of Algorithm 2 as weights of the updates `u_k = w − w̄_k`:
  `Σ_k Δ_k / Σ_k h_k = Σ_k F_k^q u_k / (η Σ_k h_k)` (`Δw_k = u_k / η`)."""

  def combine(aux: QFFLAux, batch, extra) -> Combination:
    del extra
    dtype = aux.loss.dtype
    present = batch.weight > 0
    loss = jnp.where(present, aux.loss, jnp.ones_like(aux.loss)) + LOSS_OFFSET
    lipschitz = 1.0 / jnp.asarray(learning_rate, dtype)
    fq = loss ** jnp.asarray(q, dtype)
    # q F^{q-1} ‖Δw‖²; a select, so that q = 0 gives 0 (not 0 · ∞) at any loss. q may
    # be traced (a `Sweep` over q).
    q_value = jnp.asarray(q, dtype)
    curvature = jnp.where(q_value == 0, jnp.zeros_like(loss),
                          q_value * loss ** (q_value - 1.0) * aux.update_sq_norm * lipschitz ** 2)
    h = jnp.where(present, curvature + lipschitz * fq, jnp.zeros_like(loss))
    weights = jnp.where(present, fq, jnp.zeros_like(fq))
    return Combination(weights=weights, normalizer=jnp.sum(h) / lipschitz)

  return combine


def q_ffl(loss_fn: Callable, learning_rate: float, *, q: float = 1.0, momentum: float = 0.0,
          server_optimizer: optax.GradientTransformation | None = None,
          aggregator: Aggregator | None = None, num_clients: int | None = None,
          execution: ClientExecution = ClientExecution(), unroll: int | bool = 1,
          name: str = 'qffl') -> Algorithm:
  """q-FedAvg (Li et al. 2020, arXiv 1905.10497, Algorithm 2, L = 1/η).

  Example:
    >>> algorithm = q_ffl(model.loss, 0.1, q=1.0)
    >>> state = algorithm.init(params)
    >>> state, metrics = jax.jit(algorithm.round)(state, client_batch, key)

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    learning_rate: the local SGD step size η; the Lipschitz estimate is L = 1/η.
    q: fairness parameter q ≥ 0 (0: the unweighted mean of the local models).
    momentum: local heavy-ball momentum (0 in the paper).
    server_optimizer: applied to the combined step (default `sgd(1)`, the paper's).
    aggregator: reducer of the updates, fed the weights `F_k^q` (default
      `weighted_mean()`, the paper's sum); `Σ h_k` normalizes its result.
    num_clients: population size (only needed by aggregators with per-client state).
    execution: client execution strategy and mesh.
    unroll: unrolling of the local-step loop.
    name: the algorithm's name.
  """
  # A traced q or learning rate (a `Sweep`) is not checked here.
  if isinstance(q, bool) or (isinstance(q, (int, float)) and not q >= 0):
    raise ValueError(f'q-FFL needs q ≥ 0 (0: the mean of the local models), got {q!r}')
  if isinstance(learning_rate, (int, float)) and not learning_rate > 0:
    raise ValueError(f'q-FFL needs a positive local learning rate (L = 1/lr), got '
                     f'{learning_rate!r}')
  optimizer = optax.sgd(learning_rate, momentum=momentum or None)
  return federated_algorithm(
      q_ffl_update(loss_fn, optimizer, unroll=unroll),
      server_optimizer=server_optimizer or optax.sgd(1.0), aggregator=aggregator,
      num_clients=num_clients, combine=q_ffl_combination(q, learning_rate),
      execution=execution, name=name)


register_algorithm(
    'qffl', lambda loss, h, **kw: q_ffl(loss, h.client_learning_rate, q=h.q,
                                        momentum=h.client_momentum, **kw),
    'q-FedAvg (q-FFL fairness), Li et al. 2020 (arXiv 1905.10497)',
    (CLIENT_LEARNING_RATE, CLIENT_MOMENTUM, Q_FAIRNESS))
