"""Aggregators: pure functions over stacked client updates, and their composition.

An `Aggregator` is a pair of pure functions, in the spirit of optax's
`GradientTransformation`:

* `init(params, num_clients) -> state` — `params` is a template of one update
  (the model's shape), `num_clients` the population size N for per-client state.
* `apply(updates, weights, state, key, client_ids) -> (output, new_state)` —
  `updates` has leaves `[C, ...]`, `weights` is `[C]` (0 marks an absent client),
  `client_ids` is `[C]` int32.

A *client transform* (kind `'transform'`) outputs updates `[C, ...]`; a *reducer*
(kind `'reducer'`) outputs one update `[...]`. `chain` composes transforms, exactly
one reducer, and optional plain optax transforms applied to the reduced update.

Aggregators report what they did (clipped fraction, bits sent, ...) through a
`metrics` dict in their state; `aggregator_metrics(state)` collects them.
Updates are pseudo-gradients (`global − local`), as the server optimizer expects.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sync import tree as tree_lib

TRANSFORM = 'transform'
REDUCER = 'reducer'


class Aggregator(NamedTuple):
  """A pure aggregation stage; see the module docstring for the signatures."""

  init: Callable[..., Any]
  apply: Callable[..., tuple[Any, Any]]
  kind: str = REDUCER
  name: str = 'aggregator'


class EmptyState(NamedTuple):
  """State of a stateless aggregator."""


class ChainState(NamedTuple):
  """State of `chain`: one entry per stage, in order."""

  stages: tuple


def stateless(fn: Callable, *, kind: str, name: str) -> Aggregator:
  """Wraps `fn(updates, weights, key, client_ids) -> output` as an `Aggregator`."""

  def init(params, num_clients=None):
    del params, num_clients
    return EmptyState()

  def apply(updates, weights, state, key=None, client_ids=None):
    return fn(updates, weights, key, client_ids), state

  return Aggregator(init, apply, kind, name)


def compute_dtype(tree) -> jnp.dtype:
  """The float dtype in which scalars about `tree` (weights, norms, factors) are computed.

  The leaves' float dtype, at least float32: a float64 run stays float64 (no float32
  weight or factor caps its accuracy at ~1e-7), a float32 run stays float32, and
  bfloat16/float16 updates get float32 scalars (sums of weights in bfloat16 would
  lose the clients' relative sizes).
  """
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
  dtype = jnp.result_type(*leaves) if leaves else jnp.float32
  return jnp.promote_types(dtype, jnp.float32)


def _weights_or_ones(weights, updates):
  """`[C]` weights in `compute_dtype(updates)` (so float64 runs stay float64)."""
  leaves = jax.tree.leaves(updates)
  dtype = compute_dtype(updates)
  if weights is None:
    return jnp.ones((leaves[0].shape[0],), dtype)
  return jnp.asarray(weights).astype(dtype)


def weighted_mean() -> Aggregator:
  """`Σ_c w_c u_c / Σ_c w_c` (0 when every weight is 0). FedAvg's reducer."""

  def fn(updates, weights, key, client_ids):
    w = _weights_or_ones(weights, updates)
    total = jnp.sum(w)
    return tree_lib.client_weighted_sum(updates, w / jnp.where(total > 0, total, 1.0))

  return stateless(fn, kind=REDUCER, name='weighted_mean')


def mean() -> Aggregator:
  """Unweighted mean over the present clients (weight > 0): `(1/K) Σ_{c present} u_c`."""

  def fn(updates, weights, key, client_ids):
    w = _weights_or_ones(weights, updates)
    present = (w > 0).astype(w.dtype)
    count = jnp.sum(present)
    return tree_lib.client_weighted_sum(updates, present / jnp.maximum(count, 1.0))

  return stateless(fn, kind=REDUCER, name='mean')


def _as_stage(stage) -> Aggregator:
  if isinstance(stage, Aggregator):
    return stage
  if isinstance(stage, optax.GradientTransformation):
    def init(params, num_clients=None):
      del num_clients
      return stage.init(params)

    def apply(update, weights, state, key=None, client_ids=None):
      del weights, key, client_ids
      return stage.update(update, state)

    return Aggregator(init, apply, kind='server', name='optax')
  raise TypeError(f'chain stages must be Aggregators or optax GradientTransformations, '
                  f'got {type(stage).__name__}')


def chain(*stages) -> Aggregator:
  """Composes client transforms, one reducer, then optax transforms on the result.

  `chain(clip_by_norm(1.0), stochastic_quantize(16), trimmed_mean(0.1))`.
  A chain of transforms alone is itself a transform (usable inside another chain).

  Raises:
    ValueError: two reducers, a client transform after the reducer, an optax
      transform before the reducer, or no stage at all.
  """
  if not stages:
    raise ValueError('chain needs at least one stage')
  parts = [_as_stage(s) for s in stages]
  names = [p.name for p in parts]
  reducers = [i for i, p in enumerate(parts) if p.kind == REDUCER]
  if len(reducers) > 1:
    raise ValueError(f'chain has {len(reducers)} reducers ({", ".join(names[i] for i in reducers)}); '
                     'exactly one stage may reduce [C, ...] to [...]')
  cut = reducers[0] if reducers else len(parts)
  for i, p in enumerate(parts):
    if i < cut and p.kind != TRANSFORM:
      raise ValueError(f'stage {i} ({p.name}) is an optax transform before the reducer; '
                       'optax transforms act on the reduced update and must follow a reducer')
    if i > cut and p.kind != 'server':
      raise ValueError(f'stage {i} ({p.name}) is a client transform after the reducer '
                       f'({names[cut]}); client transforms must come before it')
  kind = REDUCER if reducers else TRANSFORM

  def init(params, num_clients=None):
    return ChainState(tuple(p.init(params, num_clients) for p in parts))

  def apply(updates, weights, state, key=None, client_ids=None):
    keys = (jax.random.split(key, len(parts)) if key is not None else [None] * len(parts))
    new_states = []
    value = updates
    for p, s, k in zip(parts, state.stages, keys):
      value, s = p.apply(value, weights, s, k, client_ids)
      new_states.append(s)
    return value, ChainState(tuple(new_states))

  return Aggregator(init, apply, kind, 'chain(' + ', '.join(names) + ')')


def weighted_sum_via(aggregator: Aggregator, updates, weights, state, key=None, client_ids=None,
                     *, normalizer=1.0):
  """An algorithm's weighted sum `Σ_c w_c u_c / normalizer`, computed by `aggregator`.

  The asynchronous and dynamic-averaging timelines step by an *unnormalized*
  weighted sum of the updates (FedBuff: `Σ_i c_i s(τ_i) u_i` with staleness
  discounts s ≤ 1). A reducer returns a normalized aggregate `A(u; w)` (for
  `weighted_mean`, `Σ w u / Σ w`), so it is rescaled by the weights' mass
  `m = Σ_c w_c / normalizer`: the result is `m · A(u; w)`, which for
  `weighted_mean()` is exactly the algorithm's own sum. Reducers that weigh the
  present clients uniformly (robust reducers, `dp_fedavg`) see the per-client
  weights only as presence; the discount then enters through m alone.
  When no weight is positive (or `normalizer` is 0) the result is 0, whatever the
  aggregator returns, so non-finite updates of absent clients never leak.

  Args:
    aggregator: a reducer (`validate_aggregator`).
    updates: leaves `[C, ...]`.
    weights: `[C]` non-negative weights (0 marks an absent client).
    state: the aggregator's state.
    key, client_ids: as for `Aggregator.apply`.
    normalizer: the denominator of the algorithm's coefficients (scalar).

  Returns:
    `(aggregate [...], new_state)`.
  """
  dtype = compute_dtype(updates)
  w = jnp.asarray(weights).astype(dtype)
  normalizer = jnp.asarray(normalizer).astype(dtype)
  total = jnp.sum(w)
  usable = (total > 0) & (normalizer > 0)
  mass = jnp.where(usable, total / jnp.where(normalizer > 0, normalizer, 1.0), 0.0)
  out, state = aggregator.apply(updates, w, state, key, client_ids)
  out = jax.tree.map(lambda x: jnp.where(usable, mass * x, jnp.zeros_like(x)).astype(x.dtype), out)
  return out, state


def aggregator_metrics(state) -> dict[str, jax.Array]:
  """Collects the `metrics` dicts of every stage state, keyed `'<position>/<name>'`."""
  out: dict[str, jax.Array] = {}

  def visit(s, prefix):
    if isinstance(s, ChainState):
      for i, sub in enumerate(s.stages):
        visit(sub, f'{prefix}{i}/')
      return
    metrics = getattr(s, 'metrics', None)
    if isinstance(metrics, dict):
      for k, v in metrics.items():
        out[f'{prefix}{k}'] = v

  visit(state, '')
  return out


def validate_aggregator(aggregator) -> Aggregator:
  """Accepts an `Aggregator` reducer (or a chain ending in one)."""
  if isinstance(aggregator, optax.GradientTransformation):
    raise ValueError('an optax transform alone is not an aggregator; use '
                     'chain(weighted_mean(), your_transform)')
  if not isinstance(aggregator, Aggregator):
    raise TypeError(f'expected an Aggregator, got {type(aggregator).__name__}')
  if aggregator.kind != REDUCER:
    raise ValueError(f'aggregator {aggregator.name} does not reduce [C, ...] to [...]; '
                     'end it with a reducer such as weighted_mean()')
  return aggregator
