"""The generic synchronous round every algorithm of fedjax-sync is built from.

    clients (map_clients: vmap / chunked / sequential, sharded over 'clients')
      → pseudo-gradients [C, ...] → aggregator → server optax optimizer → params

A concrete algorithm supplies `client_update` and, when it keeps server-side
bookkeeping beyond the optimizer (SCAFFOLD's control variate), `init_extra` and
`update_extra`. Per-client persistent state lives in `ServerState.client_states`
as `[N, ...]` arrays, gathered by `client_ids` before the clients run and scattered
back after, for clients with weight > 0 only.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sync import communication
from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import (Aggregator, aggregator_metrics, compute_dtype,
                                          validate_aggregator, weighted_mean, weighted_sum_via)
from fedjax_sync.clients.execution import (ClientExecution, map_clients, map_reduce_clients,
                                           replicate, shard_client_axis)
from fedjax_sync.types import Algorithm, ClientBatch, Params, PyTree, ServerState


class ClientOutput(NamedTuple):
  """What one client returns from a round.

  Attributes:
    update: pseudo-gradient `global − local` (params-shaped); goes to the aggregator.
    state: the client's new persistent state (`()` when none).
    aux: extra per-client values for the server's own bookkeeping (`()` when none),
      handed stacked `[C, ...]` to `update_extra`.
    metrics: per-client scalars; `loss_sum` and `num_examples` are expected.
  """

  update: Params
  state: PyTree
  aux: PyTree
  metrics: dict


ClientUpdate = Callable[[Params, PyTree, PyTree, PyTree, jax.Array, jax.Array], ClientOutput]


class Combination(NamedTuple):
  """How an algorithm combines its clients' updates when the weights depend on what the
  clients returned (q-FFL's losses, FedNova's step counts) or on server state (AFL's
  domain weights, FedDyn's h): the aggregate is
  `weighted_sum_via(aggregator, updates, weights, normalizer=normalizer) + offset`,
  i.e. `Σ_c weights[c] · u_c / normalizer + offset` for `weighted_mean()`.

  Attributes:
    weights: `[C]` non-negative weights (0: the client adds nothing).
    normalizer: scalar denominator of the weighted sum.
    offset: a params-shaped term added to the aggregate, or None.
  """

  weights: jax.Array
  normalizer: jax.Array
  offset: Params | None = None


def federated_algorithm(client_update: ClientUpdate, *,
                        server_optimizer: optax.GradientTransformation,
                        aggregator: Aggregator | None = None,
                        num_clients: int | None = None,
                        init_client_state: Callable[[Params], PyTree] | None = None,
                        init_extra: Callable[[Params], PyTree] | None = None,
                        update_extra: Callable[..., PyTree] | None = None,
                        combine: Callable[..., Combination] | None = None,
                        execution: ClientExecution = ClientExecution(),
                        name: str = 'federated') -> Algorithm:
  """Builds an `Algorithm` from a client update, an aggregator and a server optimizer.

  Args:
    client_update: `(server_params, extra, client_state, data [S, B, ...],
      mask [S, B], key) -> ClientOutput` for one client.
    server_optimizer: optax transform applied to the aggregated pseudo-gradient.
    aggregator: reducer of the stacked pseudo-gradients (default `weighted_mean()`).
    num_clients: population size N; needed for per-client state.
    init_client_state: one client's initial state from the params (e.g. zeros);
      stacked N times into `ServerState.client_states`.
    init_extra: the algorithm's extra server state from the params.
    update_extra: `(extra, aux [C, ...], batch, num_clients) -> extra`, after the
      server step.
    combine: `(aux [C, ...], batch, extra) -> Combination`, the weights of an
      algorithm whose aggregation depends on its clients' outputs or its server
      state (None: the aggregator weighs by `batch.weight`). `batch.weight` is 0 for
      absent clients and for clients whose outputs are not finite (these are left
      out of the combination and counted in `nonfinite_updates`).
    execution: client execution strategy and optional device mesh.
    name: the algorithm's name.
  """
  aggregator = validate_aggregator(aggregator if aggregator is not None else weighted_mean())
  execution = execution.validate()
  if init_client_state is not None and num_clients is None:
    raise ValueError(f'{name} keeps per-client state and needs num_clients, the population '
                     'size: pass num_clients=data.num_clients')

  def init(params: Params) -> ServerState:
    client_states = ()
    if init_client_state is not None:
      one = init_client_state(params)
      client_states = jax.tree.map(
          lambda x: jnp.broadcast_to(x, (num_clients,) + jnp.shape(x)).astype(jnp.asarray(x).dtype), one)
    return ServerState(
        params=params,
        opt_state=server_optimizer.init(params),
        aggregator_state=aggregator.init(params, num_clients),
        client_states=client_states,
        extra=init_extra(params) if init_extra is not None else (),
        round=jnp.zeros((), jnp.int32))

  def round_fn(state: ServerState, batch: ClientBatch, key: jax.Array):
    client_root, aggregator_key = jax.random.split(key)
    keys = jax.vmap(lambda i: jax.random.fold_in(client_root, i))(batch.client_ids)
    participating = batch.weight > 0
    client_states = (tree_lib.gather_clients(state.client_states, batch.client_ids)
                     if init_client_state is not None else ())
    params = replicate(state.params, execution.mesh)
    extra = state.extra

    def one_client(client_state, data, mask, k):
      return client_update(params, extra, client_state, data, mask, k)

    inputs = shard_client_axis((client_states, batch.data, batch.mask, keys), execution.mesh)
    if streaming:
      return _streamed_round(state, batch, inputs, one_client)
    outputs: ClientOutput = map_clients(one_client, inputs, execution,
                                        client_bytes=communication.model_bytes(state.params))

    if init_client_state is not None or update_extra is not None or combine is not None:
      # Persistent state never takes in a non-finite client output: such a client is
      # absent (weight 0) for the scatter and the server's bookkeeping, so one diverged
      # client (zeroed by `zero_invalid_updates`) cannot poison later rounds.
      accepted = participating & tree_lib.client_all_finite(
          (outputs.update, outputs.state, outputs.aux))
      kept_batch = batch._replace(weight=jnp.where(accepted, batch.weight,
                                                   jnp.zeros_like(batch.weight)))
    if combine is None:
      aggregate, aggregator_state = aggregator.apply(
          outputs.update, batch.weight, state.aggregator_state, aggregator_key, batch.client_ids)
    else:
      aggregate, aggregator_state = _combined(combine(outputs.aux, kept_batch, extra), outputs,
                                              kept_batch, state.aggregator_state, aggregator_key)
    server_updates, opt_state = server_optimizer.update(aggregate, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, server_updates)

    new_client_states = state.client_states
    if init_client_state is not None:
      new_client_states = tree_lib.scatter_clients(
          state.client_states, batch.client_ids, outputs.state, accepted)
    new_extra = (update_extra(state.extra, outputs.aux, kept_batch, num_clients)
                 if update_extra is not None else state.extra)

    metrics = round_metrics(outputs, batch, aggregate, state.params)
    metrics.update({f'aggregator/{k}': v for k, v in aggregator_metrics(aggregator_state).items()})
    new_state = ServerState(params=new_params, opt_state=opt_state,
                            aggregator_state=aggregator_state, client_states=new_client_states,
                            extra=new_extra, round=state.round + 1)
    return new_state, metrics

  def _combined(combination: Combination, outputs: ClientOutput, kept_batch: ClientBatch,
                aggregator_state, key):
    weights = jnp.where(kept_batch.weight > 0, combination.weights,
                        jnp.zeros_like(combination.weights))
    aggregate, aggregator_state = weighted_sum_via(
        aggregator, outputs.update, weights, aggregator_state, key, kept_batch.client_ids,
        normalizer=combination.normalizer)
    if combination.offset is not None:
      aggregate = jax.tree.map(lambda a, o: a + o.astype(a.dtype), aggregate, combination.offset)
    return aggregate, aggregator_state

  # A linear weighted-mean aggregator and no per-client or auxiliary state: updates
  # are summed as the clients produce them (one client, or one chunk, at a time with
  # 'sequential' and 'chunked'), never all [C, d] at once. Measured on the MLP
  # round (docs/performance.md): streaming made 'sequential' 1.4x faster on CPU.
  streaming = (aggregator.name == 'weighted_mean' and init_client_state is None
               and update_extra is None and combine is None)

  def _streamed_round(state, batch, inputs, one_client):
    # Normalized in the params' precision: float32 weights would cap a float64 run's
    # accuracy at ~1e-7 (the float64 FedSGD oracle test checks 1e-10).
    normalized = _normalized_weights(batch, compute_dtype(state.params))

    def one(*a):
      out = one_client(*a)
      return out.update, out.metrics

    aggregate, client_metrics, sq_norms = map_reduce_clients(
        one, inputs, normalized, execution, client_bytes=communication.model_bytes(state.params),
        update_like=state.params)
    server_updates, opt_state = server_optimizer.update(aggregate, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, server_updates)
    metrics = streamed_round_metrics(client_metrics, sq_norms, batch, aggregate, state.params)
    new_state = state._replace(params=new_params, opt_state=opt_state, round=state.round + 1)
    return new_state, metrics

  return Algorithm(init=init, round=round_fn, name=name, num_clients=num_clients)


def _shared_metrics(client_metrics: dict, batch: ClientBatch, aggregate: Params,
                    params: Params) -> dict[str, jax.Array]:
  """Loss, participation, update norm and bytes: the metrics of every synchronous round."""
  present = (batch.weight > 0).astype(jnp.float32)
  loss_sum = client_metrics['loss_sum']
  num_examples = client_metrics['num_examples']
  total_examples = jnp.sum(present * num_examples)
  participants = jnp.sum(present)
  # where, not present · loss: an absent client's NaN loss must not make the mean NaN.
  present_loss = jnp.where(batch.weight > 0, loss_sum, jnp.zeros_like(loss_sum))
  return {
      'train_loss': jnp.sum(present_loss) / jnp.maximum(total_examples, 1),
      'client_loss': loss_sum / jnp.maximum(num_examples, 1),
      'num_participants': participants,
      'update_norm': tree_lib.tree_norm(aggregate),
      'bytes_up': participants * communication.model_bytes(params),
      'bytes_down': participants * communication.model_bytes(params),
  }


def _normalized_weights(batch: ClientBatch, dtype=jnp.float32) -> jax.Array:
  weight = batch.weight.astype(dtype)
  total = jnp.sum(weight)
  return weight / jnp.where(total > 0, total, 1.0)


def streamed_round_metrics(client_metrics: dict, sq_norms: jax.Array, batch: ClientBatch,
                           aggregate: Params, params: Params) -> dict[str, jax.Array]:
  """`round_metrics` when updates were reduced as they were produced.

  `client_drift_rms = sqrt(Σ_k p_k ‖u_k − ū‖²)` is computed from the running sums
  as `sqrt(Σ_k p_k ‖u_k‖² − ‖ū‖²)`. `client_drift` (the mean distance) needs every
  update after the mean is known, so streamed rounds do not report it.
  """
  dtype = compute_dtype(aggregate)
  normalized = _normalized_weights(batch, dtype)
  mean_sq = jnp.sum(jnp.where(normalized != 0, normalized * sq_norms.astype(dtype), 0.0))
  metrics = _shared_metrics(client_metrics, batch, aggregate, params)
  metrics['client_drift_rms'] = jnp.sqrt(
      jnp.maximum(mean_sq - tree_lib.tree_sq_norm(aggregate), 0.0))
  metrics['nonfinite_updates'] = _count_nonfinite(sq_norms, batch)
  return metrics


def round_metrics(outputs: ClientOutput, batch: ClientBatch, aggregate: Params,
                  params: Params) -> dict[str, jax.Array]:
  """Metrics every synchronous round reports, computed inside the compiled round.

  `train_loss` (example-weighted mean local loss), `client_loss` `[C]`,
  `num_participants`, `update_norm` (‖aggregate‖), `client_drift_rms`
  (`sqrt(Σ_k p_k ‖u_k − ū‖²)`, ū the weighted mean update; every round reports it),
  `client_drift` (weighted mean of ‖u_k − ū‖; only rounds that hold every update,
  i.e. whose aggregator is not the plain weighted mean), and the communication of a
  plain full-model exchange: `bytes_up` (participants × update bytes) and
  `bytes_down`.
  """
  normalized = _normalized_weights(batch, compute_dtype(outputs.update))
  mean_update = tree_lib.client_weighted_sum(outputs.update, normalized)
  deviations = jax.tree.map(lambda u, m: u - m[None], outputs.update, mean_update)
  sq_deviations = jnp.maximum(tree_lib.client_sq_norms(deviations), 0.0)
  metrics = _shared_metrics(outputs.metrics, batch, aggregate, params)
  # where, not p · d: an absent client's NaN update must not make the drift NaN.
  counted = normalized != 0
  metrics['client_drift'] = jnp.sum(jnp.where(counted, normalized * jnp.sqrt(sq_deviations), 0.0))
  metrics['client_drift_rms'] = jnp.sqrt(jnp.sum(jnp.where(counted, normalized * sq_deviations,
                                                           0.0)))
  # A non-finite mean makes every deviation non-finite: then count the updates themselves.
  metrics['nonfinite_updates'] = jax.lax.cond(
      tree_lib.tree_all_finite(mean_update), lambda: _count_nonfinite(sq_deviations, batch),
      lambda: _count_nonfinite(jnp.where(tree_lib.client_all_finite(outputs.update), 0.0, jnp.nan),
                               batch))
  return metrics


def _count_nonfinite(per_client: jax.Array, batch: ClientBatch) -> jax.Array:
  """Number of present clients whose `[C]` value (an update's squared norm) is not finite
  (the `nonfinite_updates` metric of every synchronous round)."""
  return jnp.sum((batch.weight > 0) & ~jnp.isfinite(per_client)).astype(jnp.float32)
