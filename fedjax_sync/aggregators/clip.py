"""Client transforms that bound or discard individual updates: clipping and zeroing.

Each maps the stacked updates `[C, ...]` to `[C, ...]` and reports, among the
present clients (weight > 0), what it did.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import TRANSFORM, Aggregator, compute_dtype
from fedjax_sync.aggregators.reduce import MetricsState, check_positive, float_weights

__all__ = ['AdaptiveClipState', 'adaptive_clip', 'clip_by_norm', 'zero_invalid_updates']


def _present_fraction(flags, present, dtype=jnp.float32):
  p = present.astype(dtype)
  return jnp.sum(p * flags.astype(dtype)) / jnp.maximum(jnp.sum(p), 1.0)


def clip_by_norm(clip_norm: float) -> Aggregator:
  """Clips each client's update to global L2 norm at most S: `Δ_c · min(1, S/‖Δ_c‖)`.

  The per-client clipping of DP-FedAvg (McMahan et al. 2018, arXiv 1710.06963,
  Alg. 1 `ClipFn`), over the whole model (all leaves together). Reports
  `clipped_fraction` and `mean_norm` (before clipping) over present clients.

  Extreme values (`tree.client_clip`): norms are computed without overflow
  (`[1e20, 0]` clips to `[S, 0]`); an update with ±Inf entries clips to S along
  the signs of its infinite entries (the limit of clipping `t·Δ`, t → ∞); NaN
  entries stay NaN (use `zero_invalid_updates` to drop such clients).

  Example:
    >>> agg = chain(clip_by_norm(1.0), weighted_mean())

  Args:
    clip_norm: S > 0.
  """
  check_positive('clip_norm', clip_norm)

  def init(params, num_clients=None):
    del num_clients
    return MetricsState({'clipped_fraction': jnp.zeros((), jnp.float32),
                         'mean_norm': jnp.zeros((), compute_dtype(params))})

  def apply(updates, weights, state, key=None, client_ids=None):
    del state, key, client_ids
    present = float_weights(weights, updates) > 0
    clipped, factors, norms = tree_lib.client_clip(updates, clip_norm)
    norms = jnp.where(present, norms.astype(compute_dtype(updates)), 0)
    metrics = {'clipped_fraction': _present_fraction(factors < 1.0, present),
               'mean_norm': _present_fraction(norms, present, norms.dtype)}
    return clipped, MetricsState(metrics)

  return Aggregator(init, apply, TRANSFORM, f'clip_by_norm({clip_norm:g})')


class AdaptiveClipState(NamedTuple):
  """State of `adaptive_clip`.

  Attributes:
    clip_norm: scalar, the clipping norm C used in the next round.
    metrics: `clip_norm` used this round, `unclipped_fraction` (noised when
      `count_noise_std > 0`), `clipped_fraction`.
  """

  clip_norm: jax.Array
  metrics: dict


def adaptive_clip(initial_clip_norm: float = 0.1, target_quantile: float = 0.5,
                  learning_rate: float = 0.2, count_noise_std: float = 0.0) -> Aggregator:
  """Clipping at a norm that tracks a quantile of the update norms (geometric update).

  Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning with
  Adaptive Clipping" (arXiv 1905.03871, Alg. 1 and Eq. 3): clip with the current
  C, count b̄ = (1/K)(Σ_i 1[‖Δ_i‖ ≤ C] + N(0, σ_b²)) over the K present clients,
  then `C ← C · exp(−η_C (b̄ − γ))`. The paper's defaults are γ = 0.5,
  η_C = 0.2, C_0 = 0.1. With σ_b = 0 the count is exact (non-private); with
  σ_b > 0 the round key draws the noise.

  Args:
    initial_clip_norm: C_0 > 0.
    target_quantile: γ ∈ [0, 1], the fraction of updates meant to stay unclipped.
    learning_rate: η_C > 0.
    count_noise_std: σ_b ≥ 0, the noise on the unclipped count.
  """
  check_positive('initial_clip_norm', initial_clip_norm)
  check_positive('learning_rate', learning_rate)
  check_positive('count_noise_std', count_noise_std, allow_zero=True)
  if not isinstance(target_quantile, (int, float)) or not 0 <= target_quantile <= 1:
    raise ValueError(f'target_quantile must be in [0, 1], got {target_quantile!r}')

  def init(params, num_clients=None):
    del num_clients
    dtype = compute_dtype(params)
    zero = jnp.zeros((), dtype)
    return AdaptiveClipState(jnp.asarray(initial_clip_norm, dtype),
                             {'clip_norm': zero, 'unclipped_fraction': zero,
                              'clipped_fraction': zero})

  def apply(updates, weights, state, key=None, client_ids=None):
    del client_ids
    present = float_weights(weights, updates) > 0
    clip = state.clip_norm
    dtype = clip.dtype
    count = jnp.sum(present.astype(dtype))
    clipped, factors, norms = tree_lib.client_clip(updates, clip)
    unclipped = jnp.sum(present & (norms.astype(dtype) <= clip)).astype(dtype)
    if count_noise_std > 0:
      if key is None:
        raise ValueError('adaptive_clip with count_noise_std > 0 needs a key')
      unclipped = unclipped + count_noise_std * jax.random.normal(key, (), dtype)
    fraction = unclipped / jnp.maximum(count, 1.0)
    new_clip = jnp.where(count > 0, clip * jnp.exp(-learning_rate * (fraction - target_quantile)),
                         clip)
    metrics = {'clip_norm': clip, 'unclipped_fraction': fraction,
               'clipped_fraction': _present_fraction(factors < 1.0, present, dtype)}
    return clipped, AdaptiveClipState(new_clip, metrics)

  return Aggregator(init, apply, TRANSFORM, f'adaptive_clip(q={target_quantile:g})')


def zero_invalid_updates(max_norm: float | None = None) -> Aggregator:
  """Replaces an update by zeros when it has a non-finite entry or norm > `max_norm`.

  A zeroed client keeps its weight, so it pulls a weighted mean towards zero
  rather than being dropped (the behaviour of TFF's zeroing factory; give it
  weight 0 upstream to drop it instead). Reports `zeroed_count` among present
  clients.

  Args:
    max_norm: optional bound on the global L2 norm; None zeroes only non-finite
      updates.
  """
  if max_norm is not None:
    check_positive('max_norm', max_norm)

  def init(params, num_clients=None):
    del params, num_clients
    return MetricsState({'zeroed_count': jnp.zeros((), jnp.int32)})

  def apply(updates, weights, state, key=None, client_ids=None):
    del state, key, client_ids
    present = float_weights(weights, updates) > 0
    finite = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
              for x in jax.tree.leaves(updates)]
    bad = ~jnp.stack(finite).all(axis=0)
    if max_norm is not None:
      sq = tree_lib.client_sq_norms(updates).astype(compute_dtype(updates))
      bad = bad | ~(sq <= max_norm ** 2)
    out = tree_lib.client_where(~bad, updates, tree_lib.tree_zeros_like(updates))
    return out, MetricsState({'zeroed_count': jnp.sum(bad & present, dtype=jnp.int32)})

  name = 'zero_invalid_updates' if max_norm is None else f'zero_invalid_updates({max_norm:g})'
  return Aggregator(init, apply, TRANSFORM, name)
