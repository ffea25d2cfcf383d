"""FedQS: divide-and-conquer client adaptation for semi-asynchronous FL.

FedQS (arXiv 2510.07664, NeurIPS 2025) has three modules; the exact rules follow
../ALGORITHMS.md ("Semi-asynchronous FL", tagged [CODE]):

* Mod① global aggregation estimation: a client that starts from version v knows
  the two latest global models, so the pseudo global gradient is
  `ĝ = w^v − w^{v−1}`; its angle θ_i with the client's previous update Δ_i
  (larger θ = less aligned). Here ĝ is read from the engine's ring buffer of
  global models, so no per-client model copy is stored.
* Mod② local training adaptation, from frequency `f_i = c_i / mean_j c_j` (c_i =
  times aggregated) and θ_i against the thresholds θ̄, f̄ (means over clients with
  positive values): biased ⇔ θ_i > θ̄, fast ⇔ f_i > f̄.
    FBC (fast, biased):   η unchanged, momentum 0, feedback on;
    FUC (fast, aligned):  η ← η − a F_i, momentum m_i;
    SUC (slow, aligned):  η ← η + a F_i, momentum m_i;
    SBC (slow, biased):   η ← η + a F_i; a validation test separates a straggler
                          (momentum) from a distribution shift (feedback).
  `F_i = min(f̄ / f_i, 9)`, η clipped to [1e-3, 0.2], a = 0.002, heavy-ball
  momentum `m_i = 0.1 + min(20 (0.1 θ̄/θ_i − 0.1), 0.4)`.
* Mod③ aggregation: `p_i = n_i / Σ n`; a feedback client's weight is multiplied
  by `(e/2)^(0.1 − c_i / Σ_j c_j) · (1 + min(θ_i/θ̄, 2)²)`; then normalized.
  FedQS-SGD: `w ← w + Σ p_i Δ_i` (gradient aggregation); FedQS-Avg:
  `w ← Σ p_i w_i` (model aggregation, w_i trained from the client's stale start).

Readings chosen where the sources are not explicit (documented choices):
* The aggregation weight follows the authors' code; the paper's printed formula
  `p_i = exp(φ − F)/(2φ − F) · (1 + G)/(2K)` differs and is not used [UNCONF].
* SBC validation test [UNCONF]: the paper only says "via a validation set". Here
  the client evaluates the received global model on its first local batch (before
  training) and compares with the same probe at its previous job: if the loss went
  up the global model moved away from the client's data (distribution shift →
  feedback), otherwise it is a straggler (→ momentum). First jobs count as
  stragglers.
* m_i is clipped to [0, 0.5]: for θ_i > θ̄ (the SBC straggler) the printed formula
  goes negative, which heavy-ball momentum does not allow.
* θ_i = 0 marks "unknown" (first job, v = 0, or ĝ = 0): such a client counts as
  aligned; thresholds use only positive values, as the rule says.

Per-client state lives in `ServerState.client_states` as `[N]` arrays
(`FedQSClientState`); the previous update is `[N, ...]` params-shaped.

An optional `aggregator` (DP, clipping, compression, secure aggregation, robust
reducers, chains) reduces the K pseudo-gradients Δ_i with FedQS's weights p_i as
its weights; its state lives in `ServerState.aggregator_state`.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import (Aggregator, aggregator_metrics, compute_dtype,
                                          validate_aggregator, weighted_sum_via)
from fedjax_sync.algorithms.federated import ClientOutput
from fedjax_sync.clients.local import make_local_step, make_local_training, masked_mean
from fedjax_sync.simulate.semi_async import AsyncAlgorithm, AsyncRound
from fedjax_sync.types import Params, ServerState

FBC, FUC, SUC, SBC = 0, 1, 2, 3
CLIENT_TYPES = ('FBC', 'FUC', 'SUC', 'SBC')
AGGREGATIONS = ('sgd', 'avg')


class FedQSHyperparameters(NamedTuple):
  """FedQS's constants (defaults from ALGORITHMS.md / the authors' code).

  Attributes:
    learning_rate: initial client learning rate η_0.
    adjust_rate: a, the learning-rate step.
    max_factor: cap of F_i = min(f̄/f_i, max_factor).
    min_learning_rate, max_learning_rate: bounds of η.
    momentum_base, momentum_speed, momentum_cap: m = base + min(speed (0.1 θ̄/θ − 0.1), cap).
    feedback_base: the e/2 of the feedback weight.
  """

  learning_rate: float = 0.1
  adjust_rate: float = 0.002
  max_factor: float = 9.0
  min_learning_rate: float = 1e-3
  max_learning_rate: float = 0.2
  momentum_base: float = 0.1
  momentum_speed: float = 20.0
  momentum_cap: float = 0.4
  feedback_base: float = math.e / 2


class FedQSClientState(NamedTuple):
  """Per-client FedQS state, leaves `[N, ...]`.

  Attributes:
    learning_rate: `[N]` current η_i.
    count: `[N]` times the client's update was aggregated (c_i).
    angle: `[N]` last θ_i in radians (0 = unknown).
    previous_update: `[N, ...]` the client's last aggregated Δ_i = w_i − w^{v_i}.
    has_update: `[N]` bool, whether `previous_update` is set.
    probe_loss: `[N]` loss of the received global model on the client's probe
      batch at its last aggregated job (+inf before the first).
  """

  learning_rate: jax.Array
  count: jax.Array
  angle: jax.Array
  previous_update: Params
  has_update: jax.Array
  probe_loss: jax.Array


class Classification(NamedTuple):
  """FedQS's decision for K clients; every field is `[K]` (thresholds repeated)."""

  client_type: jax.Array
  learning_rate: jax.Array
  momentum: jax.Array
  angle: jax.Array
  angle_threshold: jax.Array
  frequency: jax.Array
  frequency_threshold: jax.Array


def _mean_of_positive(values: jax.Array) -> jax.Array:
  positive = values > 0
  count = jnp.sum(positive.astype(values.dtype))
  return jnp.where(count > 0, jnp.sum(jnp.where(positive, values, 0.0)) / jnp.maximum(count, 1),
                   jnp.inf)


def classify(angles: jax.Array, counts: jax.Array, learning_rates: jax.Array,
             population_angles: jax.Array, population_counts: jax.Array,
             hparams: FedQSHyperparameters = FedQSHyperparameters()) -> Classification:
  """FedQS Mod②: client types, new learning rates and momenta.

  Args:
    angles: `[K]` θ_i of the clients (0 = unknown, counts as aligned).
    counts: `[K]` times each was aggregated.
    learning_rates: `[K]` current η_i.
    population_angles: `[N]` latest θ of every client (those of the K included).
    population_counts: `[N]` aggregation counts of every client.
    hparams: constants.

  Returns:
    `Classification`; types are `FBC=0, FUC=1, SUC=2, SBC=3`. For SBC the momentum
    is the straggler's (the client's validation test may turn it off).
  """
  h = hparams
  mean_count = jnp.mean(population_counts)
  safe_mean = jnp.where(mean_count > 0, mean_count, 1.0)
  frequency = counts / safe_mean
  frequency_threshold = _mean_of_positive(population_counts / safe_mean)
  angle_threshold = _mean_of_positive(population_angles)
  fast = frequency > frequency_threshold
  biased = angles > angle_threshold
  client_type = jnp.where(fast, jnp.where(biased, FBC, FUC), jnp.where(biased, SBC, SUC))
  factor = jnp.minimum(jnp.where(frequency > 0, frequency_threshold / jnp.where(
      frequency > 0, frequency, 1.0), h.max_factor), h.max_factor)
  step = h.adjust_rate * factor
  learning_rate = jnp.where(client_type == FBC, learning_rates,
                            jnp.where(client_type == FUC, learning_rates - step,
                                      learning_rates + step))
  learning_rate = jnp.clip(learning_rate, h.min_learning_rate, h.max_learning_rate)
  ratio = jnp.where(angles > 0, angle_threshold / jnp.where(angles > 0, angles, 1.0), jnp.inf)
  ratio = jnp.where(jnp.isfinite(angle_threshold), ratio, jnp.inf)
  momentum = h.momentum_base + jnp.minimum(h.momentum_speed * (0.1 * ratio - 0.1), h.momentum_cap)
  momentum = jnp.clip(momentum, 0.0, h.momentum_base + h.momentum_cap)
  momentum = jnp.where(client_type == FBC, 0.0, momentum)
  # Thresholds are broadcast to [K] so that every leaf has the client axis.
  return Classification(client_type=client_type.astype(jnp.int32), learning_rate=learning_rate,
                        momentum=momentum, angle=angles,
                        angle_threshold=jnp.broadcast_to(angle_threshold, angles.shape),
                        frequency=frequency,
                        frequency_threshold=jnp.broadcast_to(frequency_threshold, angles.shape))


def feedback_weights(num_examples: jax.Array, feedback: jax.Array, counts: jax.Array,
                     total_count: jax.Array, angles: jax.Array, angle_threshold: jax.Array,
                     valid: jax.Array,
                     hparams: FedQSHyperparameters = FedQSHyperparameters()) -> jax.Array:
  """FedQS Mod③: `[K]` normalized aggregation weights p_i (authors' code form)."""
  p = jnp.where(valid, num_examples, 0.0)
  share = counts / jnp.where(total_count > 0, total_count, 1.0)
  ratio = jnp.where(jnp.isfinite(angle_threshold) & (angle_threshold > 0),
                    angles / jnp.where(angle_threshold > 0, angle_threshold, 1.0), 0.0)
  boost = jnp.power(hparams.feedback_base, 0.1 - share) * (1.0 + jnp.minimum(ratio, 2.0) ** 2)
  p = jnp.where(feedback, p * boost, p)
  total = jnp.sum(p)
  return p / jnp.where(total > 0, total, 1.0)


def fed_qs(loss_fn: Callable, *, aggregation: str = 'sgd', num_clients: int,
           hparams: FedQSHyperparameters = FedQSHyperparameters(),
           server_learning_rate: float = 1.0, aggregator: Aggregator | None = None,
           unroll: int | bool = 1, name: str | None = None) -> AsyncAlgorithm:
  """FedQS-SGD (`aggregation='sgd'`) or FedQS-Avg (`'avg'`), arXiv 2510.07664.

  Clients run heavy-ball local SGD with their own η_i and m_i (Mod②); the server
  aggregates with feedback-adjusted weights (Mod③). Run it on
  `fedjax_sync.simulate.semi_async` (the paper's default: N = 100, K = 10, 2 local
  epochs, batch 50, η_0 = 0.1).

  Example:
    >>> algorithm = fed_qs(model.loss, aggregation='sgd', num_clients=100)
    >>> sim = SemiAsyncSimulator(algorithm, model, data, clock, AsyncConfig(400, 10, work))

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    aggregation: 'sgd' (`w ← w + η_g Σ p_i Δ_i`) or 'avg' (`w ← Σ p_i w_i`).
    num_clients: N, the size of the per-client state.
    hparams: FedQS's constants.
    server_learning_rate: η_g of FedQS-SGD (1.0 in the paper).
    aggregator: optional reducer of the K pseudo-gradients u_i = w^{v_i} − w_i,
      with FedQS's weights p_i (Mod③) as its weights (`weighted_sum_via`; Σ p = 1):
      FedQS-SGD steps by `A(u; p)`, FedQS-Avg takes `Σ p_i w^{v_i} − A(u; p)`, so
      `weighted_mean()` gives the rules above. Robust reducers and `dp_fedavg`
      weigh present clients uniformly (p only marks who is present). FedQS's own
      bookkeeping (previous updates, angles) keeps the clients' raw updates.
    unroll: unrolling of the local-step loop.
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f'unknown FedQS aggregation {aggregation!r}; valid: {", ".join(AGGREGATIONS)}')
  if not isinstance(num_clients, int) or num_clients < 1:
    raise ValueError(f'num_clients must be a positive integer, got {num_clients!r}')
  if not 0 < hparams.min_learning_rate <= hparams.max_learning_rate:
    raise ValueError(f'need 0 < min_learning_rate ≤ max_learning_rate, got {hparams}')
  name = name or f'fedqs-{aggregation}'
  if aggregator is not None:
    aggregator = validate_aggregator(aggregator)

  def init(params):
    dtype = compute_dtype(params)  # float64 runs keep float64 rates, angles and counts
    zeros = jnp.zeros((num_clients,), dtype)
    clients = FedQSClientState(
        learning_rate=jnp.full((num_clients,), hparams.learning_rate, dtype),
        count=zeros, angle=zeros,
        previous_update=jax.tree.map(
            lambda x: jnp.zeros((num_clients,) + x.shape, x.dtype), params),
        has_update=jnp.zeros((num_clients,), bool),
        probe_loss=jnp.full((num_clients,), jnp.inf, dtype))
    aggregator_state = aggregator.init(params, num_clients) if aggregator is not None else ()
    return ServerState(params=params, opt_state=(), aggregator_state=aggregator_state,
                       client_states=clients, extra=(), round=jnp.zeros((), jnp.int32))

  def client_inputs(state: ServerState, client_ids, start_versions, history):
    clients: FedQSClientState = state.client_states
    ring = jax.tree.leaves(history)[0].shape[0]
    previous_version = start_versions - 1
    # ĝ needs versions v and v − 1 to be both still in the ring buffer.
    known = (start_versions >= 1) & (state.round - previous_version < ring)
    known &= clients.has_update[client_ids]
    global_step = jax.tree.map(
        lambda h: h[start_versions % ring] - h[previous_version % ring], history)
    previous = tree_lib.gather_clients(clients.previous_update, client_ids)
    dots = jax.vmap(tree_lib.tree_dot)(global_step, previous)
    norms = (jnp.sqrt(tree_lib.client_sq_norms(global_step))
             * jnp.sqrt(tree_lib.client_sq_norms(previous)))
    known &= norms > 0
    cosine = jnp.clip(dots / jnp.where(norms > 0, norms, 1.0), -1.0, 1.0)
    angles = jnp.where(known, jnp.arccos(cosine), 0.0)
    population_angles = clients.angle.at[client_ids].set(
        jnp.where(known, angles, clients.angle[client_ids]))
    decision = classify(angles, clients.count[client_ids], clients.learning_rate[client_ids],
                        population_angles, clients.count, hparams)
    return decision, clients.probe_loss[client_ids]

  def client_update(start_params, client_input, data, mask, key):
    decision, previous_probe = client_input
    probe_batch = jax.tree.map(lambda x: x[0], data)
    probe_loss, _ = masked_mean(loss_fn(start_params, probe_batch, key), mask[0])
    shifted = probe_loss > previous_probe
    sbc = decision.client_type == SBC
    feedback = (decision.client_type == FBC) | (sbc & shifted)
    momentum = jnp.where(sbc & shifted, 0.0, decision.momentum)
    optimizer = optax.sgd(decision.learning_rate, momentum=momentum)
    train = make_local_training(make_local_step(loss_fn, optimizer), unroll=unroll)
    params, _, metrics = train(start_params, optimizer.init(start_params), data, mask, key)
    aux = {'feedback': feedback, 'probe_loss': probe_loss, 'decision': decision,
           'momentum': momentum}
    return ClientOutput(update=tree_lib.tree_sub(start_params, params), state=(), aux=aux,
                        metrics={'loss_sum': metrics.loss_sum,
                                 'num_examples': metrics.num_examples})

  def server_update(state: ServerState, outputs: ClientOutput, info: AsyncRound):
    clients: FedQSClientState = state.client_states
    aux = outputs.aux
    decision: Classification = aux['decision']
    valid = info.weight > 0
    counts = clients.count[info.client_ids]
    weights = feedback_weights(info.weight, aux['feedback'], counts, jnp.sum(clients.count),
                               decision.angle, decision.angle_threshold[0], valid, hparams)
    aggregator_state = state.aggregator_state
    if aggregator is not None:
      aggregate, aggregator_state = weighted_sum_via(
          aggregator, outputs.update, weights, aggregator_state, info.key, info.client_ids)
    if aggregation == 'sgd':
      if aggregator is None:
        aggregate = tree_lib.client_weighted_sum(outputs.update, weights)
      params = jax.tree.map(lambda w, g: w - server_learning_rate * g, state.params, aggregate)
    else:
      if aggregator is None:
        local = jax.tree.map(jnp.subtract, info.start_params, outputs.update)
        averaged = tree_lib.client_weighted_sum(local, weights)
      else:
        averaged = jax.tree.map(jnp.subtract,
                                tree_lib.client_weighted_sum(info.start_params, weights),
                                aggregate)
      params = jax.tree.map(lambda new, old: jnp.where(jnp.any(valid), new, old),
                            averaged, state.params)
    ids = info.client_ids
    new_clients = FedQSClientState(
        learning_rate=tree_lib.scatter_clients(clients.learning_rate, ids, decision.learning_rate,
                                               valid),
        count=tree_lib.scatter_clients(clients.count, ids, counts + 1.0, valid),
        angle=tree_lib.scatter_clients(clients.angle, ids, jnp.where(
            decision.angle > 0, decision.angle, clients.angle[ids]), valid),
        previous_update=tree_lib.scatter_clients(
            clients.previous_update, ids, jax.tree.map(jnp.negative, outputs.update), valid),
        has_update=tree_lib.scatter_clients(clients.has_update, ids, valid, valid),
        probe_loss=tree_lib.scatter_clients(clients.probe_loss, ids, aux['probe_loss'], valid))
    counted = valid.astype(jnp.float32)
    examples = jnp.sum(counted * outputs.metrics['num_examples'])
    metrics = {
        'train_loss': jnp.sum(counted * outputs.metrics['loss_sum']) / jnp.maximum(examples, 1),
        'num_participants': jnp.sum(counted),
        'num_feedback': jnp.sum(counted * aux['feedback']),
        'mean_learning_rate': jnp.sum(counted * decision.learning_rate) / jnp.maximum(
            jnp.sum(counted), 1),
        'mean_momentum': jnp.sum(counted * aux['momentum']) / jnp.maximum(jnp.sum(counted), 1),
    }
    for index, type_name in enumerate(CLIENT_TYPES):
      metrics[f'num_{type_name}'] = jnp.sum(counted * (decision.client_type == index))
    metrics.update({f'aggregator/{k}': v for k, v in aggregator_metrics(aggregator_state).items()})
    return state._replace(params=params, client_states=new_clients,
                          aggregator_state=aggregator_state), metrics

  return AsyncAlgorithm(init=init, client_inputs=client_inputs, client_update=client_update,
                        server_update=server_update, name=name, num_clients=num_clients)


def fed_qs_sgd(loss_fn: Callable, *, num_clients: int, **kwargs) -> AsyncAlgorithm:
  """FedQS-SGD: gradient aggregation `w ← w + Σ p_i Δ_i` (see `fed_qs`)."""
  return fed_qs(loss_fn, aggregation='sgd', num_clients=num_clients, **kwargs)


def fed_qs_avg(loss_fn: Callable, *, num_clients: int, **kwargs) -> AsyncAlgorithm:
  """FedQS-Avg: model aggregation `w ← Σ p_i w_i` (see `fed_qs`)."""
  return fed_qs(loss_fn, aggregation='avg', num_clients=num_clients, **kwargs)
