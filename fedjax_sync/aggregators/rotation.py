"""Compression after a randomized Hadamard rotation: rotated k-level quantization and DRIVE.

Each client's whole update (all leaves, flattened) is zero-padded to n = 2^⌈log₂ d⌉
coordinates and rotated by `R x = H D x / √n`, with H the n × n Walsh-Hadamard
matrix (applied in O(n log n) by `hadamard_transform`, never formed) and D a
diagonal of random signs drawn from the client's key `fold_in(key, client_id)`
(public randomness: the server regenerates D, nothing is sent for it). R is
orthogonal and `R⁻¹ y = D H y / √n`. The rotation spreads a vector's energy over
all coordinates, so a coarse quantizer of `R x` loses less than one of x.
Both transforms output the server's reconstruction `R⁻¹(Q(R x))[:d]` and report
`bits_per_client` (exact, for the padded length n) and `compression_ratio`
against 32-bit floats. An update with a non-finite entry is passed through
unchanged, as `stochastic_quantize` does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import TRANSFORM, Aggregator, compute_dtype
from fedjax_sync.aggregators.compress import _check_count, client_keys
from fedjax_sync.aggregators.reduce import MetricsState

__all__ = ['drive', 'hadamard_transform', 'padded_size', 'random_rotation', 'random_signs',
           'rotated_quantize', 'undo_random_rotation']


def padded_size(d: int) -> int:
  """The power of two n ≥ d on which the rotation acts (n = 1 for d ≤ 1)."""
  return 1 << max(int(d) - 1, 0).bit_length()


def hadamard_transform(x: jax.Array) -> jax.Array:
  """Orthonormal fast Walsh-Hadamard transform `H x / √n` along the last axis.

  n = x.shape[-1] must be a power of two. Butterflies of two levels at a time
  (radix 4, the same additions as two radix-2 levels: bitwise the same result),
  ⌈log₂ n / 2⌉ passes over x, O(n log n); the transform is symmetric and its own
  inverse. Radix 4 measured 68 ms against 95 ms for radix 2 on `[10, 2¹⁸]`
  float32 (memory-bound passes; 2026-11-30, 2-core AMD EPYC CPU, shared with
  parallel work).
  """
  n = x.shape[-1]
  if n & (n - 1) or n == 0:
    raise ValueError(f'hadamard_transform needs a power-of-two length, got {n}')
  lead = x.shape[:-1]
  span = 1
  while span < n:
    if 4 * span <= n:
      quads = x.reshape(lead + (n // (4 * span), 4, span))
      a, b, c, d = (quads[..., i, :] for i in range(4))
      s, t, u, v = a + b, a - b, c + d, c - d
      x = jnp.stack([s + u, t + v, s - u, t - v], axis=-2).reshape(lead + (n,))
      span *= 4
    else:
      pairs = x.reshape(lead + (n // (2 * span), 2, span))
      a, b = pairs[..., 0, :], pairs[..., 1, :]
      x = jnp.stack([a + b, a - b], axis=-2).reshape(lead + (n,))
      span *= 2
  return x * jnp.asarray(1.0 / math.sqrt(n), x.dtype)


def random_signs(key: jax.Array, n: int, dtype=jnp.float32) -> jax.Array:
  """`[n]` independent ±1 with probability 1/2 each: the bits of ⌈n/32⌉ random words.

  One 32-bit word per 32 signs (`jax.random.rademacher` draws a word per sign:
  measured 171 ms against 3 ms for 10 × 2¹⁸ signs, 2026-11-30, 2-core AMD EPYC
  CPU, shared with parallel work).
  """
  words = jax.random.bits(key, (-(-n // 32),), jnp.uint32)
  bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)[None, :]) & 1
  return (1 - 2 * bits.reshape(-1)[:n].astype(jnp.int32)).astype(dtype)


def random_rotation(key: jax.Array, x: jax.Array) -> jax.Array:
  """`R x = H D x / √n` for `x` `[n]` (n a power of two), D random signs from `key`."""
  return hadamard_transform(random_signs(key, x.shape[-1], x.dtype) * x)


def undo_random_rotation(key: jax.Array, y: jax.Array) -> jax.Array:
  """`R⁻¹ y = D H y / √n`: the inverse (and transpose) of `random_rotation(key, ·)`."""
  return random_signs(key, y.shape[-1], y.dtype) * hadamard_transform(y)


def _rotated_transform(name: str, bits_fn, encode):
  """A client transform `x ↦ R⁻¹(encode(R x, x, u))[:d]` per client.

  `encode(y [n], norm, u [n]) -> ŷ [n]` runs in the rotated domain; `norm` is ‖x‖
  (overflow-safe) and `u` uniform [0, 1) noise from the client's key.
  """

  def init(params, num_clients=None):
    del num_clients
    d = tree_lib.tree_size(params)
    bits = bits_fn(padded_size(d))
    return MetricsState({'bits_per_client': jnp.asarray(bits, jnp.float32),
                         'compression_ratio': jnp.asarray(32 * d / bits, jnp.float32)})

  def apply(updates, weights, state, key=None, client_ids=None):
    del weights
    num = jax.tree.leaves(updates)[0].shape[0]
    keys = client_keys(key, client_ids, num)
    dtype = compute_dtype(updates)
    flat = tree_lib.client_flatten(updates).astype(dtype)
    d = flat.shape[1]
    n = padded_size(d)
    norms = tree_lib.client_norms(updates).astype(dtype)
    finite = jnp.isfinite(norms)
    safe = jnp.where(finite[:, None], flat, 0.0)
    padded = jnp.pad(safe, ((0, 0), (0, n - d)))

    def one(k, x, norm):
      rotation_key, noise_key = jax.random.split(k)
      signs = random_signs(rotation_key, n, dtype)   # D, drawn once for R and R⁻¹
      y = hadamard_transform(signs * x)
      u = jax.random.uniform(noise_key, (n,), jnp.float32).astype(dtype)
      return (signs * hadamard_transform(encode(y, norm, u)))[:d]

    decoded = jax.vmap(one)(keys, padded, jnp.where(finite, norms, 0.0))
    like = jax.tree.map(lambda x: x[0], updates)
    out = tree_lib.client_unflatten(decoded, like)
    return tree_lib.client_where(finite, out, updates), state

  return Aggregator(init, apply, TRANSFORM, name)


def rotated_quantize(levels: int) -> Aggregator:
  """Stochastic k-level quantization after a randomized Hadamard rotation, unbiased.

  Suresh, Yu, Kumar & McMahan 2017, "Distributed Mean Estimation with Limited
  Communication" (ICML; arXiv 1611.00429, π_srk, Sec. 4): with y = R x, the k levels
  `B_r = y_min + r·s`, s = (y_max − y_min)/(k − 1), r = 0..k−1; each y_j is sent as
  the level below or above it, the upper one with probability (y_j − B_r)/s, so
  E[Q(y)] = y and E[R⁻¹ Q(R x)] = x. Bits per client: 2·32 (y_min, y_max) plus
  n·⌈log₂ k⌉ for the level indices of the n padded coordinates.

  Example:
    >>> agg = chain(rotated_quantize(16), weighted_mean())   # 4 bits a coordinate

  Args:
    levels: k ≥ 2.
  """
  _check_count('rotated_quantize levels', levels, low=2)

  def encode(y, norm, u):
    del norm
    low, high = jnp.min(y), jnp.max(y)
    step = (high - low) / (levels - 1)
    safe = jnp.where(step > 0, step, 1.0)
    scaled = (y - low) / safe
    floor = jnp.minimum(jnp.floor(scaled), levels - 1)
    index = jnp.minimum(floor + (u < scaled - floor).astype(y.dtype), levels - 1)
    return jnp.where(step > 0, low + index * step, y)

  return _rotated_transform(f'rotated_quantize({levels})',
                            lambda n: 64 + n * math.ceil(math.log2(levels)), encode)


def drive(unbiased: bool = True) -> Aggregator:
  """DRIVE: one bit per coordinate after a randomized Hadamard rotation.

  Vargaftik, Ben Basat, Portnoy, Mendelson, Ben-Itzhak & Mitzenmacher 2021,
  "DRIVE: One-bit Distributed Mean Estimation" (NeurIPS; arXiv 2105.08339,
  Alg. 1): the client sends sign(R x) (n bits) and one scale S (32 bits); the
  server decodes `R⁻¹(S · sign(R x))`. With `unbiased` S = ‖x‖²/‖R x‖₁ (Sec. 4.2:
  then ⟨x̂, x⟩ = ‖x‖² exactly, and x̂ is unbiased for a uniformly random rotation;
  with the Hadamard rotation used here, as in the paper's experiments, unbiasedness
  holds approximately); otherwise S = ‖R x‖₁/n, the scale of least squared error
  (Sec. 4.1). Bits per client: n + 32.

  Args:
    unbiased: the unbiased scale (default) or the least-squared-error one.
  """
  if not isinstance(unbiased, bool):
    raise ValueError(f'drive unbiased must be True or False, got {unbiased!r}')

  def encode(y, norm, u):
    del u
    l1 = jnp.sum(jnp.abs(y))
    safe = jnp.where(l1 > 0, l1, 1.0)
    scale = norm * (norm / safe) if unbiased else l1 / y.shape[-1]
    return jnp.where(y >= 0, scale, -scale)

  return _rotated_transform(f'drive({"unbiased" if unbiased else "biased"})',
                            lambda n: n + 32, encode)
