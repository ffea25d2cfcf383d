"""DP-FTRL: the clipped sum of every round released through tree aggregation.

Kairouz, McMahan, Song, Thakkar, Thakurta & Xu 2021, "Practical and Private (Deep)
Learning without Sampling or Shuffling" (ICML; arXiv 2103.00039, Alg. 1 and
Sec. 3). FTRL's model after round t is `θ_t = θ_0 − η · S̃_t` with S̃_t a noisy
prefix sum of the clipped client contributions. The binary-tree mechanism
(Dwork et al. 2010; Chan et al. 2011) gives each dyadic interval of rounds (a
tree node) its own Gaussian noise N(0, σ² I), σ = z·S; the prefix sum of rounds
1..t gets the noise of the nodes of t's binary representation, popcount(t) of
them. The reducer returns the difference of consecutive noisy prefix sums
divided by a fixed denominator W, so a plain SGD server step with learning rate η
lands exactly on FTRL's iterate (with server momentum it is the paper's
DP-FTRLM). Privacy is accounted on the host by `dp_ftrl_epsilon` through
`dp_accounting`'s tree-aggregation event.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import REDUCER, Aggregator, compute_dtype
from fedjax_sync.aggregators.reduce import check_positive, float_weights

__all__ = ['DPFTRLState', 'dp_ftrl', 'dp_ftrl_epsilon']


class DPFTRLState(NamedTuple):
  """State of `dp_ftrl`.

  Attributes:
    nodes: the live tree nodes' noise, leaves `[L, ...]`: row ℓ holds the noise of
      the level-ℓ node ending at the last round whose binary representation has
      bit ℓ set (L = the bit length of `rounds_per_tree`).
    prefix_noise: the noise of the last released prefix sum, leaves `[...]`.
    rounds_in_tree: rounds released by the current tree (int32).
    metrics: `noise_std` (σ per node), `prefix_noise_std` (σ·√popcount(t), the
      standard deviation of this round's prefix-sum noise), `clipped_fraction`,
      `total_weight` (the realized Σ ω, diagnostics only).
  """

  nodes: object
  prefix_noise: object
  rounds_in_tree: jax.Array
  metrics: dict


def _trailing_zeros(t: jax.Array) -> jax.Array:
  """Number of trailing zero bits of the positive int32 `t`."""
  return jax.lax.population_count((t & -t) - 1)


def dp_ftrl(clip_norm: float, noise_multiplier: float, expected_total_weight: float,
            rounds_per_tree: int, *, weight_cap: float | None = None) -> Aggregator:
  """DP-FTRL's tree-aggregated Gaussian sum, released as per-round differences.

  Kairouz et al. 2021 (arXiv 2103.00039, Alg. 1 with the online binary tree of
  Sec. 3): round t of the current tree (t = 1, 2, ...) adds the clipped weighted
  sum `g_t = Σ_k ω_k · clip_S(Δ_k)` (ω as in `dp_fedavg`) to the prefix sum and
  returns `(g_t + P_t − P_{t−1}) / W`, where P_t is the tree noise of the prefix
  sum of rounds 1..t: Σ over the set bits ℓ of t of the level-ℓ node's noise.
  Round t draws one new node (level = t's trailing zero bits, σ = z·S, from the
  round's key) and forgets the levels below it, so the state holds at most
  L = bit_length(rounds_per_tree) node noises `[L, ...]` and Var(P_t) = popcount(t)·σ².
  After `rounds_per_tree` rounds the tree restarts (the paper's restart once per
  epoch): the noise released so far stays in the model and a fresh tree begins,
  so the sum of the outputs is `(Σ g + P_last_of_each_finished_tree + P_t) / W`.

  Privacy (each client taking part at most once per tree, e.g. once per epoch of
  `rounds_per_tree` rounds): `dp_ftrl_epsilon(z, rounds_per_tree, num_trees, δ)`.

  Example:
    >>> aggregator = dp_ftrl(1.0, 2.0, expected_total_weight=100.0, rounds_per_tree=64)
    >>> algorithm = fed_avg(loss, optax.sgd(0.01), server_optimizer=optax.sgd(1.0),
    ...                     aggregator=aggregator)

  Args:
    clip_norm: S > 0.
    noise_multiplier: z ≥ 0 (the noise per node over the sensitivity S; 0 turns
      the reducer into the plain clipped sum over W).
    expected_total_weight: W > 0, fixed in advance (as in `dp_fedavg`).
    rounds_per_tree: T ≥ 1, the rounds of one tree before it restarts.
    weight_cap: optional ŵ > 0, ω_k = min(w_k/ŵ, 1) instead of 1 per present client.
  """
  check_positive('clip_norm', clip_norm)
  check_positive('noise_multiplier', noise_multiplier, allow_zero=True)
  check_positive('expected_total_weight', expected_total_weight)
  if (not isinstance(rounds_per_tree, int) or isinstance(rounds_per_tree, bool)
      or rounds_per_tree < 1):
    raise ValueError(f'dp_ftrl rounds_per_tree must be an integer ≥ 1, got {rounds_per_tree!r}')
  if weight_cap is not None:
    check_positive('weight_cap', weight_cap)
  sigma = noise_multiplier * clip_norm
  levels = rounds_per_tree.bit_length()

  def init(params, num_clients=None):
    del num_clients
    dtype = compute_dtype(params)
    zero = jnp.zeros((), dtype)
    nodes = jax.tree.map(lambda x: jnp.zeros((levels,) + jnp.shape(x), jnp.asarray(x).dtype),
                         params)
    prefix = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.asarray(x).dtype), params)
    metrics = {'noise_std': jnp.asarray(sigma, dtype), 'prefix_noise_std': zero,
               'clipped_fraction': zero, 'total_weight': zero}
    return DPFTRLState(nodes, prefix, jnp.zeros((), jnp.int32), metrics)

  def apply(updates, weights, state, key=None, client_ids=None):
    del client_ids
    w = float_weights(weights, updates)
    present = (w > 0).astype(w.dtype)
    omega = present if weight_cap is None else jnp.clip(w / weight_cap, 0.0, 1.0)
    total, factors, _ = tree_lib.client_clipped_weighted_sum(updates, omega, clip_norm)
    restart = state.rounds_in_tree >= rounds_per_tree
    t = jnp.where(restart, 1, state.rounds_in_tree + 1).astype(jnp.int32)
    level = _trailing_zeros(t)
    rows = jnp.arange(levels, dtype=jnp.int32)
    in_prefix = ((t >> rows) & 1) == 1   # [L]: the nodes of P_t
    old_prefix = jax.tree.map(lambda p: jnp.where(restart, jnp.zeros_like(p), p),
                              state.prefix_noise)
    if sigma > 0:
      if key is None:
        raise ValueError('dp_ftrl with noise_multiplier > 0 needs a key')
      leaves, treedef = jax.tree.flatten(state.nodes)
      fresh = [(sigma * jax.random.normal(jax.random.fold_in(key, i), (x[0].size,),
                                          compute_dtype(x))).reshape(x.shape[1:]).astype(x.dtype)
               for i, x in enumerate(leaves)]

      def new_rows(nodes, noise):
        shape = (levels,) + (1,) * (nodes.ndim - 1)
        kept = jnp.where((rows > level).reshape(shape), nodes, jnp.zeros_like(nodes))
        return jnp.where((rows == level).reshape(shape), noise[None], kept)

      nodes = jax.tree.unflatten(treedef, [new_rows(n, z) for n, z in zip(leaves, fresh)])
      prefix = jax.tree.map(
          lambda n: jnp.sum(jnp.where(in_prefix.reshape((levels,) + (1,) * (n.ndim - 1)), n,
                                      jnp.zeros_like(n)), axis=0), nodes)
      released = jax.tree.map(lambda g, p, q: g + (p - q).astype(g.dtype), total, prefix,
                              old_prefix)
    else:
      nodes, prefix, released = state.nodes, state.prefix_noise, total
    out = tree_lib.tree_scale(released, 1.0 / expected_total_weight)
    metrics = dict(state.metrics)
    count = jnp.sum(in_prefix.astype(jnp.int32))
    metrics['prefix_noise_std'] = (sigma * jnp.sqrt(count.astype(metrics['noise_std'].dtype))
                                   ).astype(metrics['noise_std'].dtype)
    metrics['clipped_fraction'] = (jnp.sum(present * (factors < 1.0))
                                   / jnp.maximum(jnp.sum(present), 1.0)).astype(
                                       metrics['clipped_fraction'].dtype)
    metrics['total_weight'] = jnp.sum(omega).astype(metrics['total_weight'].dtype)
    return out, DPFTRLState(nodes, prefix, t, metrics)

  return Aggregator(init, apply, REDUCER,
                    f'dp_ftrl(S={clip_norm:g}, z={noise_multiplier:g}, T={rounds_per_tree})')


def dp_ftrl_epsilon(noise_multiplier: float, rounds_per_tree: int, num_trees: int,
                    delta: float) -> float:
  """ε at δ of `num_trees` trees of `rounds_per_tree` rounds each (host side).

  Each client must take part at most once per tree (the paper's setting: one pass
  over the clients per tree, then a restart). Composes `num_trees` of
  `dp_accounting`'s `SingleEpochTreeAggregationDpEvent(z, rounds_per_tree)` in its
  RDP accountant under the "replace-one with a special record" neighbouring
  relation the tree analysis uses (Kairouz et al. 2021, Appendix D: RDP
  α·⌈log₂(T + 1)⌉/(2z²) per tree).

  Args:
    noise_multiplier: z > 0.
    rounds_per_tree: T ≥ 1.
    num_trees: trees (epochs) composed, ≥ 0.
    delta: δ ∈ (0, 1).
  """
  import dp_accounting
  from dp_accounting import rdp

  check_positive('noise_multiplier', noise_multiplier)
  for name, value, low in (('rounds_per_tree', rounds_per_tree, 1), ('num_trees', num_trees, 0)):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ValueError(f'{name} must be an integer ≥ {low}, got {value!r}')
  if not isinstance(delta, (int, float)) or not 0 < delta < 1:
    raise ValueError(f'delta must be in (0, 1), got {delta!r}')
  accountant = rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
  accountant.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, rounds_per_tree),
      num_trees))
  return float(accountant.get_epsilon(delta))
