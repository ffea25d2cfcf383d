"""Variance estimators of Federated Dynamic Averaging (the round terminating condition).

Theologitis et al. 2024, "Communication-Efficient Distributed Deep Learning via
Federated Dynamic Averaging", arXiv 2405.20988 (FDA). K workers start from the last
synchronized model w0; worker k's drift is `u_k = w_k − w0`. The quantity monitored is
the model variance

    Var = (1/K) Σ_k ‖w_k − w̄‖² = (1/K) Σ_k ‖u_k‖² − ‖ū‖²,

and the workers synchronize iff an estimate `Est ≥ Var` exceeds the threshold Θ.
After every local step each worker computes a small local state from its drift
(the only thing sent per step); the estimate is a function of the K local states.

An estimator is a value `VarianceEstimator(init, local_state, estimate, update,
num_floats, name)` of pure functions, in the style of an optax transform:

* `init(params) -> EstimatorState` (e.g. the linear estimator's ξ, the sketch's hashes);
* `local_state(drift, state) -> pytree` for one worker (vmapped over K by the caller);
* `estimate(local_states [K, ...], state) -> scalar Est`;
* `update(state, old_anchor, new_anchor) -> state` after a synchronization;
* `num_floats(params) -> int`, the floats each worker sends per step;
* optionally `estimate_from_drifts(drifts [K, ...], state) -> Est`, a simulation
  shortcut that computes the same Est directly from the stacked drifts (the sketch
  estimator sketches ū once instead of K times, equal by linearity).

Every estimator over-estimates Var, because it subtracts a lower bound of ‖ū‖²:
naive subtracts 0; linear (ξ·ū)² ≤ ‖ū‖² for a unit ξ; sketch M2/(1+ε) ≤ ‖ū‖²
with high probability (AMS guarantee with ε = 1/√width).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import compute_dtype
from fedjax_sync.types import Params, PyTree

ESTIMATORS = ('naive', 'naive_per_layer', 'linear', 'sketch')


class VarianceEstimator(NamedTuple):
  """A variance estimator of FDA (see the module docstring for the contract)."""

  init: Callable[[Params], PyTree]
  local_state: Callable[[Params, PyTree], PyTree]
  estimate: Callable[[PyTree, PyTree], jax.Array]
  update: Callable[[PyTree, Params, Params], PyTree]
  num_floats: Callable[[Params], int]
  name: str
  estimate_from_drifts: Callable[[Params, PyTree], jax.Array] | None = None


def true_variance(drifts: Params) -> jax.Array:
  """`(1/K) Σ_k ‖u_k‖² − ‖ū‖²` of stacked drifts `[K, ...]` (the simulation's oracle).

  Computed as the mean squared distance to the mean (numerically stabler than
  the difference of the two terms, and never negative).
  """
  mean = jax.tree.map(lambda u: jnp.mean(u, axis=0), drifts)
  centered = jax.tree.map(lambda u, m: u - m[None], drifts, mean)
  return jnp.mean(tree_lib.client_sq_norms(centered))


def _keep_state(state, old_anchor, new_anchor):
  del old_anchor, new_anchor
  return state


def naive() -> VarianceEstimator:
  """Naive FDA: each worker sends ‖u_k‖² (1 float); `Est = (1/K) Σ_k ‖u_k‖²`."""

  def local_state(drift, state):
    del state
    return tree_lib.tree_sq_norm(drift)

  def estimate(local_states, state):
    del state
    return jnp.mean(local_states)

  return VarianceEstimator(init=lambda params: (), local_state=local_state, estimate=estimate,
                           update=_keep_state, num_floats=lambda params: 1, name='naive')


def naive_per_layer() -> VarianceEstimator:
  """Per-layer naive FDA: each worker sends ‖u_k^(l)‖² for every leaf l (L floats).

  The threshold is split across layers by size, Θ_l = Θ·d_l/d, and the workers
  synchronize iff some layer exceeds its share: `Est_l = (1/K) Σ_k ‖u_k^(l)‖² > Θ_l`.
  Equivalently the returned scalar is `Est = max_l (d/d_l) Est_l`, compared to Θ.
  This is this library's reading of "per-layer naive" (the per-layer split is not
  fixed by the spec); it is at least as conservative as naive, since the maximum
  of `(d/d_l) Est_l` is at least their `d_l/d`-weighted mean `Σ_l Est_l`.
  """

  def local_state(drift, state):
    del state
    return jnp.stack([jnp.sum(jnp.square(x)) for x in jax.tree.leaves(drift)])

  def init(params):
    sizes = jnp.asarray([x.size for x in jax.tree.leaves(params)], compute_dtype(params))
    return sizes.sum() / sizes   # d / d_l

  def estimate(local_states, state):
    return jnp.max(jnp.mean(local_states, axis=0) * state.astype(local_states.dtype))

  return VarianceEstimator(init=init, local_state=local_state, estimate=estimate,
                           update=_keep_state,
                           num_floats=lambda params: len(jax.tree.leaves(params)),
                           name='naive_per_layer')


class LinearState(NamedTuple):
  """`xi`: the unit direction ξ (params-shaped)."""

  xi: Params


def linear(seed: int = 0) -> VarianceEstimator:
  """Linear FDA: each worker sends (‖u_k‖², ξ·u_k) (2 floats);
  `Est = (1/K) Σ_k ‖u_k‖² − ((1/K) Σ_k ξ·u_k)²`.

  ξ = (w0 − w_-1)/‖w0 − w_-1‖ from the last two synchronized models (the direction
  the global model last moved, a guess of where the workers drift together); before
  the first synchronization a random unit vector drawn from `seed` (fixed, so all
  workers share it). A synchronization that does not move w0 keeps the old ξ.
  """

  def init(params):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    noise = [jax.random.normal(k, x.shape, jnp.result_type(x.dtype, jnp.float32))
             for k, x in zip(keys, leaves)]
    xi = jax.tree.unflatten(treedef, noise)
    return LinearState(xi=tree_lib.tree_scale(xi, 1.0 / tree_lib.tree_norm(xi)))

  def local_state(drift, state):
    # Elementwise products and sums rather than a `dot`, so that XLA can fuse the
    # drift w_k − w0 into the reductions instead of materializing it.
    sq = sum(jnp.sum(jnp.square(u)) for u in jax.tree.leaves(drift))
    dot = sum(jnp.sum(x * u) for x, u in zip(jax.tree.leaves(state.xi), jax.tree.leaves(drift)))
    return jnp.stack([sq, dot])

  def estimate(local_states, state):
    del state
    mean = jnp.mean(local_states, axis=0)
    return mean[0] - jnp.square(mean[1])

  def update(state, old_anchor, new_anchor):
    moved = tree_lib.tree_sub(new_anchor, old_anchor)
    norm = tree_lib.tree_norm(moved)
    safe = jnp.where(norm > 0, norm, 1.0)
    xi = jax.tree.map(lambda m, x: jnp.where(norm > 0, m / safe.astype(m.dtype), x),
                      moved, state.xi)
    return LinearState(xi=xi)

  return VarianceEstimator(init=init, local_state=local_state, estimate=estimate,
                           update=update, num_floats=lambda params: 2, name='linear')


class SketchState(NamedTuple):
  """The hash functions shared by all workers.

  Attributes:
    positions: `[depth, width, m]` int32, m = ⌈d/width⌉: counter c of row r sums
      the coordinates `positions[r, c, :]`; positions ≥ d address zero padding.
    signs: `[depth, width, m]` ±1 float32 sign of each hashed coordinate.
  """

  positions: jax.Array
  signs: jax.Array


def ams_sketch_init(num_params: int, depth: int, width: int, seed: int) -> SketchState:
  """Draws the shared hashes of a depth × width AMS sketch of a `num_params` vector.

  Each row's bucket hash is a uniformly random balanced assignment (a random
  permutation of the coordinates cut into `width` equal groups, so every bucket
  holds m = ⌈d/width⌉ coordinates counting padding) and each row has independent
  random signs. A balanced hash makes the sketch one gather + sum (no scatter);
  collisions are then slightly negatively correlated, which does not increase the
  AMS estimator's variance. On CPU the gather (depth·d random reads) dominates the
  cost of the sketch check (see docs/fda.md).
  """
  per_bucket = max(1, math.ceil(num_params / width))
  padded = per_bucket * width
  keys = jax.random.split(jax.random.key(seed), 2 * depth)
  positions = jnp.stack([jax.random.permutation(keys[r], padded) for r in range(depth)])
  signs = jnp.stack([jax.random.rademacher(keys[depth + r], (padded,), jnp.float32)
                     for r in range(depth)])
  shape = (depth, width, per_bucket)
  return SketchState(positions=positions.astype(jnp.int32).reshape(shape),
                     signs=signs.reshape(shape))


def ams_sketch(vector: jax.Array, hashes: SketchState) -> jax.Array:
  """The AMS sketch `[depth, width]` of a flat `[d]` vector (linear in `vector`)."""
  depth, width, per_bucket = hashes.positions.shape
  d = vector.shape[0]
  if d > per_bucket * width:
    raise ValueError(f'vector of {d} entries is larger than the sketch hashes '
                     f'({per_bucket * width}); build the hashes for this model')
  padded = jnp.concatenate([vector, jnp.zeros((per_bucket * width - d,), vector.dtype)])
  return jnp.sum(padded[hashes.positions] * hashes.signs.astype(vector.dtype), axis=2)


def sketch_second_moment(sketch: jax.Array) -> jax.Array:
  """AMS estimate of ‖v‖² from a sketch `[depth, width]`: median over rows of Σ_c S[r,c]²."""
  return jnp.median(jnp.sum(jnp.square(sketch), axis=-1))


class SketchEstimatorState(NamedTuple):
  hashes: SketchState


def sketch(depth: int = 5, width: int = 250, seed: int = 0) -> VarianceEstimator:
  """Sketch FDA: each worker sends (‖u_k‖², AMS sketch of u_k) (1 + depth·width floats).

  The sketches are linear and share their hashes, so the mean of the K sketches is
  the sketch of ū, and `M2 = median_r Σ_c S̄[r,c]²` estimates ‖ū‖² within a factor
  (1 ± ε), ε = 1/√width, with high probability (≈ 91 % per check at 5 × 250:
  one row's relative standard deviation √(2/width) exceeds ε); `Est = (1/K) Σ_k ‖u_k‖² − M2/(1+ε)`.
  Defaults are the paper's depth 5 × width 250.
  """
  for label, value in (('depth', depth), ('width', width)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'sketch {label} must be a positive integer, got {value!r}')
  epsilon = 1.0 / math.sqrt(width)

  def init(params):
    return SketchEstimatorState(hashes=ams_sketch_init(tree_lib.tree_size(params), depth,
                                                       width, seed))

  def local_state(drift, state):
    flat = jnp.concatenate([x.reshape(-1) for x in jax.tree.leaves(drift)])
    return (tree_lib.tree_sq_norm(drift), ams_sketch(flat, state.hashes))

  def estimate(local_states, state):
    del state
    sq_norms, sketches = local_states
    return jnp.mean(sq_norms) - sketch_second_moment(jnp.mean(sketches, axis=0)) / (1 + epsilon)

  def estimate_from_drifts(drifts, state):
    # The mean of the K sketches is the sketch of ū (shared hashes, linearity), so a
    # simulation can sketch ū once: the same Est up to float rounding, K× cheaper.
    mean = jnp.concatenate([jnp.mean(u, axis=0).reshape(-1) for u in jax.tree.leaves(drifts)])
    sq_norms = tree_lib.client_sq_norms(drifts)
    return (jnp.mean(sq_norms)
            - sketch_second_moment(ams_sketch(mean, state.hashes)) / (1 + epsilon))

  return VarianceEstimator(init=init, local_state=local_state, estimate=estimate,
                           update=_keep_state, num_floats=lambda params: 1 + depth * width,
                           name='sketch', estimate_from_drifts=estimate_from_drifts)


def get_estimator(name: str, **options) -> VarianceEstimator:
  """An estimator by name: 'naive', 'naive_per_layer', 'linear' or 'sketch'."""
  builders = {'naive': naive, 'naive_per_layer': naive_per_layer, 'linear': linear,
              'sketch': sketch}
  if name not in builders:
    raise ValueError(f'unknown FDA estimator {name!r}; valid: {", ".join(ESTIMATORS)}')
  return builders[name](**options)
