"""FedBuff and FedAsync: staleness-weighted buffered aggregation.

FedBuff: Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous
Aggregation", arXiv 2106.06639, Algorithm 1: the server aggregates when K updates
are buffered, `w ← w + η_g (1/K) Σ_i s(τ_i) Δ_i` with `s(τ) = (1 + τ)^(-1/2)`.
FedAsync: Xie, Koyejo & Gupta 2019, "Asynchronous Federated Optimization", arXiv
1903.03934, Algorithm 1 with polynomial staleness `s_a(τ) = (1 + τ)^(-a)`:
`w ← (1 − α s(τ)) w + α s(τ) w_new` after every single update (K = 1).

Both are `AsyncAlgorithm`s for `fedjax_sync.simulate.semi_async`; client updates
are ordinary local training (`make_local_training`) from the model version the
client started from. Both accept an `aggregator` (DP, clipping, compression,
secure aggregation, robust reducers, chains) that reduces the K buffered
pseudo-gradients; its state lives in `ServerState.aggregator_state` and its
metrics appear as `aggregator/<stage>/<name>` in every aggregation's metrics.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import (Aggregator, aggregator_metrics, compute_dtype,
                                          validate_aggregator, weighted_sum_via)
from fedjax_sync.algorithms.federated import ClientOutput
from fedjax_sync.clients.local import make_local_step, make_local_training
from fedjax_sync.simulate.semi_async import AsyncAlgorithm, AsyncRound
from fedjax_sync.types import ServerState


def polynomial_staleness(exponent: float) -> Callable[[jax.Array], jax.Array]:
  """`s(τ) = (1 + τ)^(-exponent)`, as `s(tau, dtype=float32)`; exponent 1/2 is FedBuff's,
  0 disables weighting. The algorithms pass the params' float dtype."""
  if exponent < 0:
    raise ValueError(f'staleness exponent must be ≥ 0, got {exponent}')
  return lambda tau, dtype=jnp.float32: jnp.power(1.0 + tau.astype(dtype), -exponent)


def async_local_update(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
                       unroll: int | bool = 1):
  """Client update of FedBuff-type methods: local training from the start model.

  Returns `client_update(start_params, client_input, data [S, B, ...], mask [S, B],
  key) -> ClientOutput` with `update = start_params − local_params`.
  """
  train = make_local_training(make_local_step(loss_fn, client_optimizer), unroll=unroll)

  def client_update(start_params, client_input, data, mask, key):
    del client_input
    params, _, metrics = train(start_params, client_optimizer.init(start_params), data, mask, key)
    return ClientOutput(update=tree_lib.tree_sub(start_params, params), state=(), aux=(),
                        metrics={'loss_sum': metrics.loss_sum,
                                 'num_examples': metrics.num_examples})

  return client_update


def _base_weights(info: AsyncRound, example_weighted: bool, dtype) -> jax.Array:
  """`[K]` unnormalized weights: 1 (or n_i with `example_weighted`) per counted update, else 0."""
  counted = info.weight > 0
  base = (info.weight if example_weighted else counted).astype(dtype)
  return jnp.where(counted, base, 0.0)


def _aggregator_init(aggregator: Aggregator | None, params, num_clients):
  return aggregator.init(params, num_clients) if aggregator is not None else ()


def _with_aggregator_metrics(metrics: dict, aggregator_state) -> dict:
  metrics.update({f'aggregator/{k}': v for k, v in aggregator_metrics(aggregator_state).items()})
  return metrics


def _coefficients(info: AsyncRound, example_weighted: bool, dtype) -> jax.Array:
  """`[K]` normalized mixing coefficients (1/K_valid, or n_i/Σn over valid updates)."""
  counted = info.weight > 0
  base = (info.weight if example_weighted else counted).astype(dtype)
  base = jnp.where(counted, base, 0.0)
  total = jnp.sum(base)
  return base / jnp.where(total > 0, total, 1.0)


def _train_metrics(outputs: ClientOutput, info: AsyncRound) -> dict:
  counted = (info.weight > 0).astype(jnp.float32)
  examples = jnp.sum(counted * outputs.metrics['num_examples'])
  return {'train_loss': jnp.sum(counted * outputs.metrics['loss_sum']) / jnp.maximum(examples, 1),
          'num_participants': jnp.sum(counted)}


def fed_buff(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
             server_learning_rate: float = 1.0,
             server_optimizer: optax.GradientTransformation | None = None,
             staleness_exponent: float = 0.5, example_weighted: bool = False,
             aggregator: Aggregator | None = None, num_clients: int | None = None,
             unroll: int | bool = 1, name: str = 'fedbuff') -> AsyncAlgorithm:
  """FedBuff (Nguyen et al. 2022, arXiv 2106.06639, Algorithm 1).

  Server step on the K buffered pseudo-gradients u_i = w^{v_i} − w_i:
  `g = Σ_i c_i s(τ_i) u_i`, `w ← w − η_g g` (any optax `server_optimizer`; default
  `optax.sgd(server_learning_rate)`), with `c_i = 1/K` (the paper) or, with
  `example_weighted`, `n_i / Σ n` (FedAvg's weights; with all τ = 0 and K = N this
  is synchronous FedAvg). Discarded updates (weight 0) leave the sum and K.

  With an `aggregator`, the K pseudo-gradients are reduced by it with the
  staleness-discounted weights `v_i = b_i s(τ_i)` (b_i = 1, or n_i with
  `example_weighted`; 0 for a discarded update), and rescaled by their mass:
  `g = (Σ v_i / Σ b_i) · A(u; v)` (`aggregators.base.weighted_sum_via`), so
  `aggregator=weighted_mean()` is the formula above. Reducers that weigh present
  clients uniformly (trimmed mean, median, Krum, `dp_fedavg` without a weight cap)
  then apply the staleness discount through the mass only (the mean discount of
  the buffer). `dp_fedavg`'s `expected_total_weight` counts updates (K) unless
  `example_weighted`. Aggregators with per-client state (`top_k` with error
  feedback) need `num_clients`.

  Example:
    >>> algorithm = fed_buff(model.loss, optax.sgd(0.05), server_learning_rate=1.0)
    >>> sim = SemiAsyncSimulator(algorithm, model, data, clock, AsyncConfig(200, 10, work))
    >>> private = fed_buff(model.loss, optax.sgd(0.05), aggregator=chain(
    ...     clip_by_norm(1.0), dp_fedavg(1.0, 0.5, expected_total_weight=10)))

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    client_optimizer: the clients' local optax optimizer.
    server_learning_rate: η_g of the default server optimizer.
    server_optimizer: optional optax transform of g (replaces `sgd(η_g)`).
    staleness_exponent: a of `s(τ) = (1 + τ)^(-a)` (1/2 in the paper).
    example_weighted: weigh updates by their examples (FedAvg) instead of 1/K.
    aggregator: optional reducer of the buffered pseudo-gradients (default: the
      formula above, computed directly).
    num_clients: the population N, for aggregators with per-client state.
    unroll: unrolling of the local-step loop.
    name: the algorithm's name.
  """
  if server_learning_rate <= 0:
    raise ValueError(f'server_learning_rate must be > 0, got {server_learning_rate}')
  server_optimizer = server_optimizer or optax.sgd(server_learning_rate)
  staleness_weight = polynomial_staleness(staleness_exponent)
  if aggregator is not None:
    aggregator = validate_aggregator(aggregator)

  def init(params):
    return ServerState(params=params, opt_state=server_optimizer.init(params),
                       aggregator_state=_aggregator_init(aggregator, params, num_clients),
                       client_states=(), extra=(), round=jnp.zeros((), jnp.int32))

  def server_update(state: ServerState, outputs: ClientOutput, info: AsyncRound):
    dtype = compute_dtype(state.params)
    aggregator_state = state.aggregator_state
    if aggregator is None:
      coefficients = (_coefficients(info, example_weighted, dtype)
                      * staleness_weight(info.staleness, dtype))
      aggregate = tree_lib.client_weighted_sum(outputs.update, coefficients)
    else:
      base = _base_weights(info, example_weighted, dtype)
      aggregate, aggregator_state = weighted_sum_via(
          aggregator, outputs.update, base * staleness_weight(info.staleness, dtype),
          aggregator_state, info.key, info.client_ids, normalizer=jnp.sum(base))
    updates, opt_state = server_optimizer.update(aggregate, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = _train_metrics(outputs, info)
    metrics['update_norm'] = tree_lib.tree_norm(aggregate)
    if aggregator is not None:
      _with_aggregator_metrics(metrics, aggregator_state)
    return state._replace(params=params, opt_state=opt_state,
                          aggregator_state=aggregator_state), metrics

  return AsyncAlgorithm(init=init, client_inputs=lambda *args: (),
                        client_update=async_local_update(loss_fn, client_optimizer, unroll=unroll),
                        server_update=server_update, name=name, num_clients=num_clients)


def fed_async(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
              mixing: float = 0.6, staleness_exponent: float = 0.5,
              aggregator: Aggregator | None = None, num_clients: int | None = None,
              unroll: int | bool = 1, name: str = 'fedasync') -> AsyncAlgorithm:
  """FedAsync (Xie et al. 2019, arXiv 1903.03934, Algorithm 1, polynomial s_a).

  Run it with `buffer_size=1`: `w ← (1 − α s(τ)) w + α s(τ) w_new`, where w_new is
  the client's model trained from version `t − τ` and `s(τ) = (1 + τ)^(-a)`. With
  K > 1 the K local models are averaged first (an extension, not in the paper).
  Defaults α = 0.6 and a = 0.5 are from the paper's experiments.

  With an `aggregator`, the clients' pseudo-gradients u_i = w^{v_i} − w_i are
  reduced by it, with weight 1 per counted update (the averaging coefficients the
  algorithm uses; the staleness discount stays in the mixing rate α s(τ)):
  `w_new = mean_i w^{v_i} − A(u; 1)`. `weighted_mean()` gives the rule above. With
  the paper's K = 1 a reducer sees one update, so robust reducers (median, trimmed
  mean, Krum) are the identity there; clipping, DP noise, compression and secure
  aggregation still act on the one update. `dp_fedavg`'s `expected_total_weight`
  is then 1.

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    client_optimizer: the clients' local optax optimizer.
    mixing: α ∈ (0, 1].
    staleness_exponent: a of `s(τ) = (1 + τ)^(-a)`.
    aggregator: optional reducer of the pseudo-gradients (default: the plain mean).
    num_clients: the population N, for aggregators with per-client state.
    unroll: unrolling of the local-step loop.
    name: the algorithm's name.
  """
  if not 0 < mixing <= 1:
    raise ValueError(f'mixing α must be in (0, 1], got {mixing}')
  staleness_weight = polynomial_staleness(staleness_exponent)
  if aggregator is not None:
    aggregator = validate_aggregator(aggregator)

  def init(params):
    return ServerState(params=params, opt_state=(),
                       aggregator_state=_aggregator_init(aggregator, params, num_clients),
                       client_states=(), extra=(), round=jnp.zeros((), jnp.int32))

  def server_update(state: ServerState, outputs: ClientOutput, info: AsyncRound):
    dtype = compute_dtype(state.params)
    coefficients = _coefficients(info, False, dtype)
    aggregator_state = state.aggregator_state
    if aggregator is None:
      local = jax.tree.map(jnp.subtract, info.start_params, outputs.update)
      mean_local = tree_lib.client_weighted_sum(local, coefficients)
    else:
      base = _base_weights(info, False, dtype)
      mean_update, aggregator_state = weighted_sum_via(
          aggregator, outputs.update, base, aggregator_state, info.key, info.client_ids,
          normalizer=jnp.sum(base))
      mean_start = tree_lib.client_weighted_sum(info.start_params, coefficients)
      mean_local = jax.tree.map(jnp.subtract, mean_start, mean_update)
    rate = mixing * jnp.sum(coefficients * staleness_weight(info.staleness, dtype))
    params = jax.tree.map(lambda w, m: ((1.0 - rate) * w + rate * m).astype(w.dtype),
                          state.params, mean_local)
    metrics = _train_metrics(outputs, info)
    metrics['mixing_rate'] = rate
    if aggregator is not None:
      _with_aggregator_metrics(metrics, aggregator_state)
    return state._replace(params=params, aggregator_state=aggregator_state), metrics

  return AsyncAlgorithm(init=init, client_inputs=lambda *args: (),
                        client_update=async_local_update(loss_fn, client_optimizer, unroll=unroll),
                        server_update=server_update, name=name, num_clients=num_clients)
