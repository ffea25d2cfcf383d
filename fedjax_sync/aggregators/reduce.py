"""Mean-type reducers and the small state every reporting stage keeps.

`mean` and `weighted_mean` live in `base.py` (the engine's default) and are
re-exported here; this module adds `norm_bounded_mean`, and the `MetricsState`
NamedTuple through which stateless stages report what they did (read by
`aggregator_metrics`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import REDUCER, Aggregator, compute_dtype, mean, weighted_mean

__all__ = ['MetricsState', 'mean', 'norm_bounded_mean', 'weighted_mean']


class MetricsState(NamedTuple):
  """State of a stage whose only state is its report of the last call.

  Attributes:
    metrics: dict of scalar arrays (fixed structure, so it can be a `lax.scan` carry).
  """

  metrics: dict


def float_weights(weights, updates) -> jax.Array:
  """`[C]` weights in `compute_dtype(updates)` (ones when `weights` is None)."""
  num = jax.tree.leaves(updates)[0].shape[0]
  if weights is None:
    return jnp.ones((num,), compute_dtype(updates))
  return jnp.asarray(weights).astype(compute_dtype(updates))


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
  ok = value >= 0 if allow_zero else value > 0
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok:
    bound = '≥ 0' if allow_zero else '> 0'
    raise ValueError(f'{name} must be a number {bound}, got {value!r}')


def clip_factors(sq_norms: jax.Array, clip_norm) -> jax.Array:
  """`[C]` factors `min(1, S/‖Δ_c‖)` (1 for a zero update)."""
  norms = jnp.sqrt(jnp.maximum(sq_norms, 0.0))
  return jnp.where(norms > clip_norm, clip_norm / jnp.where(norms > 0, norms, 1.0), 1.0)


def norm_bounded_mean(max_norm: float) -> Aggregator:
  """Weighted mean of the updates after bounding each client's norm by `max_norm`.

  The norm-bounding defence of Sun et al. 2019, "Can You Really Backdoor
  Federated Learning?" (arXiv 1911.07963, Sec. 4): `Δ_c ← Δ_c · min(1, M/‖Δ_c‖)`,
  then `Σ_c w_c Δ_c / Σ_c w_c`. Equal to `chain(clip_by_norm(M), weighted_mean())`
  as one reducer. Reports `clipped_fraction` (among present clients).

  Example:
    >>> agg = norm_bounded_mean(1.0)
    >>> out, state = agg.apply(updates, weights, agg.init(params), key, client_ids)

  Args:
    max_norm: M > 0, the bound on each client's global L2 norm.
  """
  check_positive('max_norm', max_norm)

  def init(params, num_clients=None):
    del params, num_clients
    return MetricsState({'clipped_fraction': jnp.zeros((), jnp.float32)})

  def apply(updates, weights, state, key=None, client_ids=None):
    del state, key, client_ids
    w = float_weights(weights, updates)
    present = (w > 0).astype(jnp.float32)
    total = jnp.sum(w)
    # Overflow-safe norms, Inf entries kept as a direction: see `tree.client_clip`.
    out, factors, _ = tree_lib.client_clipped_weighted_sum(
        updates, w / jnp.where(total > 0, total, 1.0), max_norm)
    clipped = jnp.sum(present * (factors < 1.0)) / jnp.maximum(jnp.sum(present), 1.0)
    return out, MetricsState({'clipped_fraction': clipped})

  return Aggregator(init, apply, REDUCER, f'norm_bounded_mean({max_norm:g})')
