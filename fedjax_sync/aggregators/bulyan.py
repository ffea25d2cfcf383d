"""Bulyan: recursive Krum selection, then a coordinate-wise trimmed mean around the median.

El Mhamdi, Guerraoui & Rouault 2018, "The Hidden Vulnerability of Distributed
Learning in Byzantium" (ICML; arXiv 1802.07927, Sec. 4). Built on the exact order
statistics and the Gram-matrix distances of `robust.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sync.aggregators.base import REDUCER, Aggregator
from fedjax_sync.aggregators.reduce import MetricsState
from fedjax_sync.aggregators.robust import (_from_keys, _kth_keys, _pairwise_sq_distances,
                                            _per_coordinate, _present, _to_keys)

__all__ = ['bulyan']


def _krum_rounds(dist: jax.Array, present: jax.Array, count, num_byzantine: int, theta,
                 order: jax.Array):
  """`[C]` bool: the θ clients picked by θ successive Krum selections.

  Each step scores every remaining present client by the sum of its
  n' − f − 2 (at least 1) smallest squared distances to the other remaining ones
  (n' remaining), moves the lowest score to the selected set and repeats. A tie
  goes to the lowest `order` (`[C]` int). Distances that are NaN (a NaN update)
  count as Inf, so a non-finite update is picked only when no finite one remains.
  """
  num = present.shape[0]
  dist = jnp.where(jnp.isnan(dist), jnp.inf, jnp.minimum(dist, dist.T))  # exactly symmetric
  off_diagonal = ~jnp.eye(num, dtype=bool)
  columns = jnp.arange(num)

  def step(i, selected):
    remaining = present & ~selected
    left = count - i
    neighbours = jnp.clip(left - num_byzantine - 2, 1, jnp.maximum(left - 1, 1))
    valid = remaining[:, None] & remaining[None, :] & off_diagonal
    ranked = jnp.sort(jnp.where(valid, dist, jnp.inf), axis=1)
    scores = jnp.sum(jnp.where(columns[None, :] < neighbours, ranked, 0.0), axis=1)
    scores = jnp.where(remaining & ~jnp.isnan(scores), scores, jnp.inf)
    # Remaining clients first (one is picked even when every score is Inf), then by score.
    best = jnp.lexsort((order, scores, (~remaining).astype(jnp.int32)))[0]
    pick = (i < theta) & remaining[best]
    return selected.at[best].set(selected[best] | pick)

  return jax.lax.fori_loop(0, num, step, jnp.zeros((num,), bool))


def bulyan(num_byzantine: int) -> Aggregator:
  """Bulyan over the present clients (weight > 0), with Krum as its selection rule.

  El Mhamdi et al. 2018 (arXiv 1802.07927, Sec. 4), in the form of Flower's
  `aggregate_bulyan`: with n present clients and f = `num_byzantine`,
  1. θ = n − 2f times, Krum (Blanchard et al. 2017: score = sum of the n' − f − 2
     smallest squared distances among the n' clients not yet selected) moves its
     choice from the remaining clients to the selection set;
  2. per coordinate, the median of the θ selected values (the mean of the two
     middle ones for even θ) and the mean of the β = θ − 2f selected values
     closest to it.
  Unweighted, as in the paper. Distances come from one `[C, C]` Gram matmul, the
  median and the β closest values from the exact bisection order statistics of
  `robust.py` (no sort of `[C, d]`). A tie at the β-th distance (two values at
  the same distance on either side of the median) averages the tied values.
  Krum ties are not rare: once n' − f − 2 ≤ 1 a score is the distance to the
  nearest neighbour, equal for two mutual nearest neighbours. Flower picks the
  first in list order; here the lowest client id wins (the lowest batch position
  when `client_ids` is None), the same rule on the same order, and independent of
  the clients' positions in the batch.

  The paper's bound needs n ≥ 4f + 3. The batch size C is checked when `apply`
  is traced (a `ValueError` if C < 4f + 3); when absent clients leave fewer than
  4f + 3 present, the rule still runs with θ = max(n − 2f, 1) and
  β = max(θ − 2f, 1), and the metric `assumption_met` is 0 for that round.
  Non-finite updates (NaN or Inf) are infinitely far from every other, so Krum
  selects them last (only when fewer than θ finite updates are present); a
  client of weight 0 is never selected. Metrics: `num_selected` (θ),
  `num_averaged` (β), `assumption_met` (1 when n ≥ 4f + 3).

  Example:
    >>> agg = bulyan(2)   # needs at least 11 clients per round
    >>> out, state = agg.apply(updates, weights, agg.init(params), key, client_ids)

  Args:
    num_byzantine: f ≥ 0, the number of Byzantine clients tolerated.
  """
  if not isinstance(num_byzantine, int) or isinstance(num_byzantine, bool) or num_byzantine < 0:
    raise ValueError(f'bulyan num_byzantine must be an integer ≥ 0, got {num_byzantine!r}')
  f = num_byzantine
  needed = 4 * f + 3

  def init(params, num_clients=None):
    del params, num_clients
    zero = jnp.zeros((), jnp.int32)
    return MetricsState({'num_selected': zero, 'num_averaged': zero, 'assumption_met': zero})

  def apply(updates, weights, state, key=None, client_ids=None):
    del state, key
    num = jax.tree.leaves(updates)[0].shape[0]
    if num < needed:
      raise ValueError(f'bulyan(num_byzantine={f}) needs at least 4f + 3 = {needed} clients '
                       f'per round (El Mhamdi et al. 2018), got {num}; lower num_byzantine '
                       f'to at most {max((num - 3) // 4, 0)} or sample more clients')
    present, count = _present(weights, updates)
    theta = jnp.clip(count - 2 * f, jnp.minimum(count, 1), count)
    beta = jnp.clip(theta - 2 * f, jnp.minimum(theta, 1), theta)
    dist, _ = _pairwise_sq_distances(updates)
    order = jnp.arange(num, dtype=jnp.int32) if client_ids is None else client_ids
    selected = _krum_rounds(dist, present, count, f, theta, order)
    def column(x, keys):
      # `keys` already puts the clients outside `selected` after every selected one.
      lo, hi = _kth_keys(keys, ((jnp.maximum(theta, 1) - 1) // 2, theta // 2))
      median = 0.5 * (_from_keys(lo) + _from_keys(hi))
      gap = jnp.abs(x - median[None])
      gap_keys = jnp.where(selected[:, None], _to_keys(gap),
                           jnp.array(jnp.iinfo(keys.dtype).max, keys.dtype))
      (cut,) = _kth_keys(gap_keys, (jnp.maximum(beta, 1) - 1,))
      inside = gap_keys < cut[None]
      at_cut = gap_keys == cut[None]
      n_inside = jnp.sum(inside, axis=0, dtype=jnp.int32)
      n_at_cut = jnp.sum(at_cut, axis=0, dtype=jnp.int32)
      total = (jnp.sum(jnp.where(inside, x, 0.0), axis=0)
               + (beta - n_inside).astype(x.dtype) * jnp.sum(jnp.where(at_cut, x, 0.0), axis=0)
               / jnp.maximum(n_at_cut, 1).astype(x.dtype))
      return jnp.where(beta > 0, total / jnp.maximum(beta, 1).astype(x.dtype), 0.0)

    out = _per_coordinate(updates, selected, column)
    metrics = {'num_selected': theta.astype(jnp.int32), 'num_averaged': beta.astype(jnp.int32),
               'assumption_met': (count >= needed).astype(jnp.int32)}
    return out, MetricsState(metrics)

  return Aggregator(init, apply, REDUCER, f'bulyan(f={f})')
