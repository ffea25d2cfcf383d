"""FedGH's gradient harmonization as a reducer, computed in the K×K Gram space.

Zhang, Sun & Chen 2023, "Tackling the Non-IID Issue in Heterogeneous Federated
Learning by Gradient Harmonization", arXiv 2309.06692 (the rule as transcribed in
fedjax-sync's ALGORITHMS.md; not to be confused with the other "FedGH", the
generalized global header of arXiv 2303.13137).

With client pseudo-gradients `g̃_k` (= `w − w_k`, kept as originals) the rule
visits every unordered pair `i < j` in ascending order and, when the pair
conflicts (`g̃_i · g̃_j < 0`), projects each away from the other:

    g_i ← g_i − (g_i · g̃_j / ‖g̃_j‖²) g̃_j,   g_j ← g_j − (g_j · g̃_i / ‖g̃_i‖²) g̃_i,

then reduces with the example-weighted mean `Σ_k p_k g_k`.

Every `g_k` stays a linear combination of the originals, `g = A g̃`, so the
procedure needs only the Gram matrix `G = g̃ g̃ᵀ` (one O(K²d) product), O(K³)
scalar work on A, and one weighted sum `(pᵀA) g̃` over the parameters — no
per-pair pass over the model. In 'original' mode the rows of A evolve
independently, so the K(K−1)/2 sequential pair steps collapse into K vectorized
steps; 'running' mode keeps the sequential pair loop (K(K−1)/2 small steps).

Pair order follows the *position of clients in the round* (the order of
`ClientBatch`), as in the paper's loop; the result depends on it, so FedGH is the
one aggregator here that is not invariant to a permutation of the clients.
Zero-weight (padded) clients take part in no pair.

[UNCONF] which vectors the conflict test and the projection use is not settled by
the paper: `mode='original'` (default, the paper's notation: test and project
against the originals g̃) or `mode='running'` (the two assignments of a pair
executed in order against the current values: g_i is projected off the current
g_j, then g_j off the new g_i — a no-op up to rounding, since the new g_i is
orthogonal to g_j — so a harmonized pair ends orthogonal, PCGrad-like).

Two clients: in 'original' mode the projected pair has
`g_i · g_j = −a (1 − a²/(‖g̃_i‖²‖g̃_j‖²)) > 0` (a = g̃_i · g̃_j < 0), so the conflict
becomes a positive alignment; in 'running' mode it becomes orthogonal. With more
clients later projections can re-create conflicts, which `conflicts_after` counts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import REDUCER, Aggregator

MODES = ('original', 'running')
# After projection an orthogonalized pair has a rounding-level inner product; a
# pair counts as conflicting after harmonization only below this cosine.
RESIDUAL_COSINE = -1e-5


class HarmonizeState(NamedTuple):
  """State of `harmonize`: the metrics of the last round."""

  metrics: dict


def _pairs(num: int) -> tuple[np.ndarray, np.ndarray]:
  i, j = np.triu_indices(num, k=1)  # row-major: (0,1), (0,2), ..., (1,2), ...
  return i.astype(np.int32), j.astype(np.int32)


def harmonize_coefficients(gram: jax.Array, present: jax.Array, mode: str = 'original') -> jax.Array:
  """The `[K, K]` matrix A with harmonized `g = A g̃`, from the Gram matrix of the originals.

  Args:
    gram: `[K, K]` inner products `g̃_i · g̃_j`.
    present: `[K]` bool; absent clients take part in no pair.
    mode: 'original' or 'running' (see the module docstring).
  """
  if mode not in MODES:
    raise ValueError(f'harmonize mode must be one of {MODES}, got {mode!r}')
  num = gram.shape[0]
  eye = jnp.eye(num, dtype=gram.dtype)
  if num < 2:
    return eye
  tiny = jnp.finfo(gram.dtype).tiny
  if mode == 'original':
    # Each projection changes one row of A and reads only that row and the
    # originals' Gram, so rows evolve independently. In the row-major pair order
    # row i meets its partners in ascending order (k < i in earlier passes, then
    # j > i), so K vectorized steps over the partner m reproduce the pair loop.
    conflict = (present[:, None] & present[None, :] & (gram < 0)
                & ~jnp.eye(num, dtype=bool))

    def partner(m, a):
      coef = (a @ gram[:, m]) / jnp.maximum(gram[m, m], tiny)   # g_i · g̃_m / ‖g̃_m‖²
      return a.at[:, m].add(-jnp.where(conflict[:, m], coef, 0.0))

    return jax.lax.fori_loop(0, num, partner, eye)

  # 'running': the pairs interact, so loop over them in order; the two assignments
  # of a pair run in order, each against the current values.
  first, second = (jnp.asarray(x) for x in _pairs(num))

  def body(t, a):
    i, j = first[t], second[t]
    both = present[i] & present[j]
    gj_row = a[j] @ gram                          # g_j · g̃_m for every m
    dot_ij = jnp.dot(gj_row, a[i])                # g_i · g_j
    conflict = both & (dot_ij < 0)
    sq_j = jnp.dot(gj_row, a[j])
    new_i = jnp.where(conflict, a[i] - dot_ij / jnp.maximum(sq_j, tiny) * a[j], a[i])
    gi_row = new_i @ gram
    coef_j = jnp.dot(gi_row, a[j]) / jnp.maximum(jnp.dot(gi_row, new_i), tiny)
    new_j = jnp.where(conflict, a[j] - coef_j * new_i, a[j])
    return a.at[i].set(new_i).at[j].set(new_j)

  return jax.lax.fori_loop(0, first.shape[0], body, eye)


def count_conflicts(gram: jax.Array, present: jax.Array, threshold: float = 0.0) -> jax.Array:
  """Number of present pairs `i < j` whose cosine is below `threshold` (0: `g_i · g_j < 0`)."""
  num = gram.shape[0]
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
  denom = jnp.maximum(norms[:, None] * norms[None, :], jnp.finfo(gram.dtype).tiny)
  below = (gram < 0) if threshold == 0.0 else (gram / denom < threshold)
  pair = present[:, None] & present[None, :] & (jnp.arange(num)[:, None] < jnp.arange(num)[None, :])
  return jnp.sum(below & pair).astype(jnp.int32)


def harmonize(mode: str = 'original') -> Aggregator:
  """FedGH reducer: harmonize conflicting pseudo-gradients, then the weighted mean.

  Example:
    >>> algorithm = fed_avg(model.loss, optax.sgd(0.01), aggregator=harmonize())
    >>> # metrics: 'aggregator/conflicts_before', 'aggregator/conflicts_after'

  Args:
    mode: 'original' (default) or 'running', see the module docstring.

  Returns:
    A reducer `Aggregator`. Its state's metrics: `conflicts_before` (pairs with
    `g̃_i · g̃_j < 0`), `conflicts_after` (pairs of harmonized updates with cosine
    below −1e-5, so rounding residue of an orthogonalized pair is not counted) and
    `num_pairs` (present pairs).
  """
  if mode not in MODES:
    raise ValueError(f'harmonize mode must be one of {MODES}, got {mode!r}')

  def zero_metrics():
    z = jnp.zeros((), jnp.int32)
    return {'conflicts_before': z, 'conflicts_after': z, 'num_pairs': z}

  def init(params, num_clients=None):
    del params, num_clients
    return HarmonizeState(metrics=zero_metrics())

  def apply(updates, weights, state, key=None, client_ids=None):
    del state, key, client_ids
    leaves = jax.tree.leaves(updates)
    num = leaves[0].shape[0]
    # Absent clients' slices count as zeros (a NaN one included): they are in no pair.
    gram = tree_lib.client_gram(updates, None if weights is None else weights > 0)
    w = (jnp.ones((num,), gram.dtype) if weights is None else weights).astype(gram.dtype)
    present = w > 0
    coeffs = harmonize_coefficients(gram, present, mode)
    total = jnp.sum(w)
    p = w / jnp.where(total > 0, total, 1.0)
    out = tree_lib.client_weighted_sum(updates, p @ coeffs)
    after = coeffs @ gram @ coeffs.T
    num_present = jnp.sum(present).astype(jnp.int32)
    metrics = {'conflicts_before': count_conflicts(gram, present),
               'conflicts_after': count_conflicts(after, present, RESIDUAL_COSINE),
               'num_pairs': num_present * (num_present - 1) // 2}
    return out, HarmonizeState(metrics=metrics)

  return Aggregator(init, apply, REDUCER, f'harmonize({mode})')
