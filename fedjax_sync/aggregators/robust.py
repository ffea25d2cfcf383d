"""Byzantine-robust reducers: coordinate median, trimmed mean, Krum, geometric median.

All reduce the updates of the *present* clients (weight > 0); zero-weight clients
(padding, dropouts) are ignored. Median and trimmed mean are unweighted order
statistics over present clients (as in Yin et al. 2018); Krum scores use
unweighted distances (Blanchard et al. 2017); the geometric median is weighted.

Order statistics avoid a full sort of the `[C, d]` updates (XLA's CPU sort is
slow): each coordinate's k-th smallest value is found by a 32-step bisection over
an order-preserving integer image of the values (32-bit keys for float32 and
narrower floats, computed on their exact float32 image; 64-bit keys for float64),
run on cache-sized chunks of coordinates. The result is exact (bitwise the
sorted value).
Krum and the geometric median work on the `[C, C]` Gram matrix of the updates:
one O(C²d) matmul, then O(C²) scalar work per Weiszfeld iteration.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import REDUCER, Aggregator, compute_dtype
from fedjax_sync.aggregators.reduce import MetricsState, float_weights

__all__ = ['coordinate_median', 'geometric_median', 'krum', 'multi_krum', 'trimmed_mean']

_CHUNK = 4096


def _key_dtype(dtype) -> jnp.dtype:
  """Unsigned key type of the floats `dtype` (float64 only when x64 is enabled)."""
  return jnp.dtype(jnp.uint64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.uint32)


def _to_keys(x: jax.Array) -> jax.Array:
  """Order-preserving map float32 → uint32 or float64 → uint64 (x < y ⇔ key(x) < key(y))."""
  kind = _key_dtype(x.dtype)
  top = kind.itemsize * 8 - 1
  bits = jax.lax.bitcast_convert_type(x, kind)
  negative = (bits >> top) == 1
  return jnp.where(negative, ~bits, bits | (jnp.array(1, kind) << top))


def _from_keys(keys: jax.Array) -> jax.Array:
  top = keys.dtype.itemsize * 8 - 1
  positive = (keys >> top) == 1
  bits = jnp.where(positive, keys & ~(jnp.array(1, keys.dtype) << top), ~keys)
  return jax.lax.bitcast_convert_type(
      bits, jnp.float64 if keys.dtype == jnp.uint64 else jnp.float32)


def _kth_keys(keys: jax.Array, ranks) -> list[jax.Array]:
  """For each rank k (int32 scalar), the k-th smallest (0-based) key per column of `[C, n]`.

  Bisection on the answer's bits, high to low: the answer v is the smallest t with
  #{c : keys[c] ≤ t} ≥ k + 1.
  """
  kind = keys.dtype
  num_bits = kind.itemsize * 8
  one = jnp.array(1, kind)

  def body(i, values):
    bit = one << (jnp.array(num_bits - 1, kind) - i.astype(kind))
    out = []
    for v, k in zip(values, ranks):
      t = v + (bit - one)
      count = jnp.sum((keys <= t[None]).astype(jnp.int32), axis=0)
      out.append(jnp.where(count >= k + 1, v, v + bit))
    return tuple(out)

  start = tuple(jnp.zeros(keys.shape[1:], kind) for _ in ranks)
  return list(jax.lax.fori_loop(0, num_bits, body, start))


def _per_coordinate(updates, present, column_fn):
  """Applies `column_fn(x [C, n], keys [C, n]) -> [n]` to every leaf in chunks.

  `x` is float64 for a float64 leaf, else float32 (exact for every narrower float).
  Absent clients get the largest key, so they sort after every present value.
  """
  def leaf_fn(leaf):
    num = leaf.shape[0]
    flat = leaf.reshape(num, -1).astype(compute_dtype(leaf))
    size = flat.shape[1]
    chunk = min(_CHUNK, size)
    chunks = -(-size // chunk)
    # The last chunk is shifted left to end at `size` (overlapping its neighbour)
    # rather than padding, which would copy the whole `[C, d]` leaf.
    starts = jnp.minimum(jnp.arange(chunks) * chunk, size - chunk)

    def one(start):
      x = jax.lax.dynamic_slice_in_dim(flat, start, chunk, axis=1)
      keys = _to_keys(x)
      keys = jnp.where(present[:, None], keys, jnp.array(jnp.iinfo(keys.dtype).max, keys.dtype))
      return column_fn(x, keys)

    values = jax.lax.map(one, starts)
    if chunks * chunk == size:
      out = values.reshape(-1)
    else:
      index = starts[:, None] + jnp.arange(chunk)[None, :]
      out = jnp.zeros((size,), flat.dtype).at[index.reshape(-1)].set(values.reshape(-1))
    return out.reshape(leaf.shape[1:]).astype(leaf.dtype)

  return jax.tree.map(leaf_fn, updates)


def _selected_value(value, x, selected):
  """`value` (an exact order statistic found on keys), differentiable as the mean of
  the entries of `x` it selects (`selected [C, n]`, ties share the cotangent).

  The forward value stays `value` bit for bit; the gradient is that of the mean of
  the selected entries, the subgradient of an order statistic (`value` moves
  one-for-one with the selected entry). Non-finite selections pass no gradient.
  """
  n = jnp.maximum(jnp.sum(selected.astype(x.dtype), axis=0), 1.0)
  mean = jnp.sum(jnp.where(selected, x, 0.0), axis=0) / n
  tangent = mean - jax.lax.stop_gradient(mean)
  return value + jnp.where(jnp.isfinite(mean), tangent, 0.0)


def _present(weights, updates):
  w = float_weights(weights, updates)
  present = w > 0
  return present, jnp.sum(present, dtype=jnp.int32)


def coordinate_median() -> Aggregator:
  """Coordinate-wise median of the present clients' updates.

  Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
  Statistical Rates" (arXiv 1803.01498, Alg. 1 option I). With an even number K
  of present clients the median is the mean of the two middle values. Unweighted.
  Computed in float64 for float64 updates, else float32 (exact order statistics,
  see the module docstring).

  Example:
    >>> agg = coordinate_median()
    >>> out, state = agg.apply(updates, weights, agg.init(params), key, client_ids)
  """

  def init(params, num_clients=None):
    del params, num_clients
    return MetricsState({'num_present': jnp.zeros((), jnp.int32)})

  def apply(updates, weights, state, key=None, client_ids=None):
    del state, key, client_ids
    present, count = _present(weights, updates)
    lower, upper = (count - 1) // 2, count // 2

    def column(x, keys):
      lo, hi = _kth_keys(keys, (jnp.maximum(lower, 0), upper))
      # Gradients route to the middle entries (autodiff sees no path through keys).
      lo_value = _selected_value(_from_keys(lo), x, keys == lo[None])
      hi_value = _selected_value(_from_keys(hi), x, keys == hi[None])
      value = 0.5 * (lo_value + hi_value)
      return jnp.where(count > 0, value, 0.0)

    return _per_coordinate(updates, present, column), MetricsState({'num_present': count})

  return Aggregator(init, apply, REDUCER, 'coordinate_median')


def trimmed_mean(beta: float) -> Aggregator:
  """Coordinate-wise β-trimmed mean of the present clients' updates.

  Yin et al. 2018 (arXiv 1803.01498, Alg. 1 option II): per coordinate, drop the
  ⌊βK⌋ largest and ⌊βK⌋ smallest of the K present values and average the rest.
  Ties at the cut are split exactly as a sort would (the kept ranks are summed).

  Args:
    beta: trimmed fraction per side, 0 ≤ β < 0.5.
  """
  if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0 <= beta < 0.5:
    raise ValueError(f'trimmed_mean beta must be a number in [0, 0.5), got {beta!r}')

  def init(params, num_clients=None):
    del params, num_clients
    return MetricsState({'num_trimmed_per_side': jnp.zeros((), jnp.int32)})

  def apply(updates, weights, state, key=None, client_ids=None):
    del state, key, client_ids
    present, count = _present(weights, updates)
    trim = jnp.floor(beta * count.astype(jnp.float32) + 1e-6).astype(jnp.int32)
    kept = count - 2 * trim

    def column(x, keys):
      lo_key, hi_key = _kth_keys(keys, (trim, jnp.maximum(count - 1 - trim, 0)))
      # The kept copies of the cut values pass gradients to the entries equal to them.
      lo = _selected_value(_from_keys(lo_key), x, keys == lo_key[None])
      hi = _selected_value(_from_keys(hi_key), x, keys == hi_key[None])
      inside = (keys > lo_key[None]) & (keys < hi_key[None])
      inner = jnp.sum(jnp.where(inside, x, 0.0), axis=0)
      n_lo = jnp.sum((keys <= lo_key[None]).astype(jnp.int32), axis=0) - trim
      n_hi = (count - trim) - jnp.sum((keys < hi_key[None]).astype(jnp.int32), axis=0)
      dtype = x.dtype
      total = jnp.where(lo_key == hi_key, kept.astype(dtype) * lo,
                        inner + n_lo.astype(dtype) * lo + n_hi.astype(dtype) * hi)
      return jnp.where(kept > 0, total / jnp.maximum(kept, 1).astype(dtype), 0.0)

    out = _per_coordinate(updates, present, column)
    return out, MetricsState({'num_trimmed_per_side': trim})

  return Aggregator(init, apply, REDUCER, f'trimmed_mean({beta:g})')


def _pairwise_sq_distances(updates) -> tuple[jax.Array, jax.Array]:
  """`[C, C]` squared distances from one Gram matmul, and the Gram matrix."""
  gram = tree_lib.client_gram(updates).astype(compute_dtype(updates))
  sq = jnp.diagonal(gram)
  return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0), gram


def multi_krum(num_byzantine: int, num_selected: int) -> Aggregator:
  """Multi-Krum: the mean of the m present updates with the lowest Krum scores.

  Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent" (NeurIPS; Sec. 4, Krum and Multi-Krum). score_i = sum of the
  squared distances from update i to its K − f − 2 nearest other present updates
  (at least 1 neighbour when K ≤ f + 2). All distances come from one `[C, C]` Gram
  matmul (‖x_i − x_j‖² = G_ii + G_jj − 2G_ij), never a loop over pairs. The
  selected updates are averaged without weights, as in the paper. Reports the id
  of the best-scored client (`selected_client`, its position when no ids are
  given) and `num_selected`.

  Non-finite input: a NaN or Inf update (or one whose squared distances overflow)
  is infinitely far from every other, so it ranks last and is selected only when
  fewer than m finite updates are present; a client of weight 0 is never selected.

  Args:
    num_byzantine: f ≥ 0, the number of Byzantine clients tolerated.
    num_selected: m ≥ 1 (m = 1 is Krum); fewer when fewer clients are present.
  """
  for name, value, low in (('num_byzantine', num_byzantine, 0), ('num_selected', num_selected, 1)):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ValueError(f'multi_krum {name} must be an integer ≥ {low}, got {value!r}')

  def init(params, num_clients=None):
    del params, num_clients
    return MetricsState({'selected_client': jnp.zeros((), jnp.int32),
                         'num_selected': jnp.zeros((), jnp.int32)})

  def apply(updates, weights, state, key=None, client_ids=None):
    del state, key
    present, count = _present(weights, updates)
    num = present.shape[0]
    dist, _ = _pairwise_sq_distances(updates)
    valid = present[:, None] & present[None, :] & ~jnp.eye(num, dtype=bool)
    dist = jnp.where(valid, dist, jnp.inf)
    neighbours = jnp.clip(count - num_byzantine - 2, 1, jnp.maximum(count - 1, 1))
    ranked = jnp.sort(dist, axis=1)
    take = jnp.arange(num)[None, :] < neighbours
    scores = jnp.sum(jnp.where(take, ranked, 0.0), axis=1)
    # Present clients first (an absent one is never selected, even when every present
    # score is Inf), then by score; a NaN score (a NaN update) ranks last among them.
    scores = jnp.where(present & ~jnp.isnan(scores), scores, jnp.inf)
    order = jnp.lexsort((scores, (~present).astype(jnp.int32)))
    rank = jnp.zeros((num,), jnp.int32).at[order].set(jnp.arange(num, dtype=jnp.int32))
    chosen = jnp.minimum(num_selected, count)
    selected = present & (rank < chosen)
    dtype = compute_dtype(updates)
    coefficients = selected.astype(dtype) / jnp.maximum(chosen, 1).astype(dtype)
    out = tree_lib.client_weighted_sum(updates, coefficients)
    ids = jnp.arange(num, dtype=jnp.int32) if client_ids is None else client_ids.astype(jnp.int32)
    return out, MetricsState({'selected_client': ids[order[0]], 'num_selected': chosen})

  name = f'krum(f={num_byzantine})' if num_selected == 1 else \
      f'multi_krum(f={num_byzantine}, m={num_selected})'
  return Aggregator(init, apply, REDUCER, name)


def krum(num_byzantine: int) -> Aggregator:
  """Krum (Blanchard et al. 2017): the present update with the lowest score;
  `multi_krum(num_byzantine, 1)`."""
  return multi_krum(num_byzantine, 1)


def geometric_median(num_iterations: int = 8, smoothing: float = 1e-6) -> Aggregator:
  """Weighted geometric median by a fixed number of smoothed Weiszfeld iterations.

  Pillutla, Kakade & Harchaoui 2022, "Robust Aggregation for Federated Learning"
  (RFA, arXiv 1912.13445, Alg. 2): starting from the weighted mean,
  `z ← Σ_i β_i x_i / Σ_i β_i` with `β_i = w_i / max(ν, ‖z − x_i‖)`.
  Every iterate is a combination `z = Σ_i a_i x_i`, so the distances
  `‖x_i − z‖² = G_ii − 2(G a)_i + aᵀ G a` come from the Gram matrix of the
  updates centred on their weighted mean (centring limits float32 cancellation):
  one O(C²d) matmul plus O(C²) work per iteration, then one weighted sum.
  Reports `objective` = Σ w_i ‖z − x_i‖ / Σ w_i at the result. A client whose
  squared norm is not finite in the updates' dtype (a NaN or Inf entry, or a norm
  ≳ 1.8e19 in float32) is infinitely far from every point and gets weight 0.

  Args:
    num_iterations: Weiszfeld iterations (static), ≥ 1.
    smoothing: ν > 0, guards division by a zero distance.
  """
  if not isinstance(num_iterations, int) or isinstance(num_iterations, bool) or num_iterations < 1:
    raise ValueError(f'geometric_median num_iterations must be an integer ≥ 1, got {num_iterations!r}')
  if not isinstance(smoothing, (int, float)) or not smoothing > 0:
    raise ValueError(f'geometric_median smoothing must be > 0, got {smoothing!r}')

  def init(params, num_clients=None):
    del num_clients
    return MetricsState({'objective': jnp.zeros((), compute_dtype(params))})

  def apply(updates, weights, state, key=None, client_ids=None):
    del state, key, client_ids
    w = jnp.maximum(float_weights(weights, updates), 0.0)
    # A client whose squared norm is not finite (a NaN or Inf entry, or too large to
    # square in its dtype: ≳ 1.8e19 in float32) is infinitely far from every point, so
    # its Weiszfeld weight w/‖z − x‖ is 0 from the start.
    w = jnp.where(jnp.isfinite(tree_lib.client_sq_norms(updates)), w, jnp.zeros_like(w))
    total = jnp.sum(w)
    p = w / jnp.where(total > 0, total, 1.0)
    centre = tree_lib.client_weighted_sum(updates, p)
    centred = jax.tree.map(lambda x, m: x - m[None], updates, centre)
    gram = tree_lib.client_gram(centred, w > 0).astype(w.dtype)
    diag = jnp.diagonal(gram)

    def distances(a):
      ga = gram @ a
      return jnp.sqrt(jnp.maximum(diag - 2.0 * ga + jnp.dot(a, ga), 0.0))

    def step(a, _):
      beta = w / jnp.maximum(distances(a), smoothing)
      s = jnp.sum(beta)
      return beta / jnp.where(s > 0, s, 1.0), None

    a, _ = jax.lax.scan(step, p, None, length=num_iterations)
    objective = jnp.sum(p * distances(a))
    # z = centre + Σ a_i (x_i − centre) = Σ a_i x_i + (1 − Σ a_i)·centre.
    out = jax.tree.map(lambda c, m: c + (1.0 - jnp.sum(a)).astype(m.dtype) * m,
                       tree_lib.client_weighted_sum(updates, a), centre)
    return out, MetricsState({'objective': objective})

  return Aggregator(init, apply, REDUCER, f'geometric_median({num_iterations})')
