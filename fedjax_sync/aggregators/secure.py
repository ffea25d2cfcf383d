"""Secure aggregation (Bonawitz et al. 2017), simulated faithfully in ring arithmetic.

Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal & Seth 2017,
"Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS;
eprint 2017/281, Fig. 4). Per round:

1. *Client encoding.* Client u clips its update to [−c, c] per coordinate and
   rounds it to an integer `x_u = round(Δ_u · L / c)` with L = ⌊(R/2 − 1)/C⌋ so
   that any sum of C encodings fits in the signed range of the ring Z_R
   (R = 2^b, b = 32 by default; arithmetic is uint32, wrapping mod 2³²).
2. *Masking.* `y_u = x_u + PRG(b_u) + Σ_{v>u} PRG(s_uv) − Σ_{v<u} PRG(s_vu) mod R`
   (">" compares client ids). s_uv is the per-pair seed that u and v agree on
   (simulated: `fold_in(fold_in(k, min id), max id)` of the round's key stands
   for their Diffie-Hellman agreement); b_u is u's self-mask seed. PRG is
   `jax.random.bits` (threefry) expanded to d uint32 words. With
   `num_neighbors=k` each client masks only with k ring neighbours (by batch
   position; the k-regular graph variant of Bell et al. 2020, eprint 2020/704),
   which cuts the O(C²d) PRG work to O(Ckd).
3. *Dropouts.* A client with weight 0 is *dropped after masking*: its y never
   reaches the server, but the survivors' y contain the pairwise masks they share
   with it.
4. *Unmasking.* The server function sees only the survivors' y plus what the
   protocol's Shamir t-of-n recovery reveals: the self-mask seeds b_u of the
   survivors and the pairwise seeds s_uv between dropped v and surviving u. It
   subtracts those masks; the result equals the plain sum of the survivors'
   encodings exactly (integer equality).

What is simulated: the *exact effect* of Shamir recovery (the seeds the server
may reconstruct when at least t clients survive, and an abort below t), not the
polynomial secret sharing itself, nor encryption, signatures or the network.
Communication: every client uploads d·b bits (as many as a float32 update when
b = 32) plus, in the real protocol, O(k) keys and shares.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import REDUCER, Aggregator, compute_dtype
from fedjax_sync.aggregators.reduce import MetricsState, check_positive, float_weights

__all__ = ['decode_ring_sum', 'mask_inputs', 'quantize_to_ring', 'ring_levels',
           'secure_aggregation', 'unmask_sum']


def _modulus_mask(modulus_bits: int) -> jax.Array:
  return jnp.uint32((1 << modulus_bits) - 1)


def ring_levels(num_clients: int, modulus_bits: int = 32) -> int:
  """L: encodings in [−L, L] so that a sum over `num_clients` stays in (−R/2, R/2)."""
  return ((1 << (modulus_bits - 1)) - 1) // num_clients


def quantize_to_ring(flat: jax.Array, clip_range: float, levels: int,
                     modulus_bits: int = 32) -> jax.Array:
  """`[C, d]` floats → `[C, d]` uint32 ring elements `round(clip(x, ±c) · L / c) mod R`."""
  scaled = jnp.round(jnp.clip(flat.astype(compute_dtype(flat)), -clip_range, clip_range)
                     * (levels / clip_range))
  as_int = scaled.astype(jnp.int32)
  return jax.lax.bitcast_convert_type(as_int, jnp.uint32) & _modulus_mask(modulus_bits)


def decode_ring_sum(total: jax.Array, modulus_bits: int = 32) -> jax.Array:
  """A ring element `[d]` uint32 → its signed integer value in (−R/2, R/2) as int32."""
  total = total & _modulus_mask(modulus_bits)
  if modulus_bits == 32:
    return jax.lax.bitcast_convert_type(total, jnp.int32)
  half = jnp.uint32(1 << (modulus_bits - 1))
  value = total.astype(jnp.int32)
  return jnp.where(total >= half, value - jnp.int32(1 << modulus_bits), value)


def _prg(key, d):
  return jax.random.bits(key, (d,), jnp.uint32)


def _pair_key(agreement_key, a, b):
  low, high = jnp.minimum(a, b), jnp.maximum(a, b)
  return jax.random.fold_in(jax.random.fold_in(agreement_key, low), high)


def _neighbour_offsets(num_clients: int, num_neighbors: int | None):
  """Static list of position offsets of each client's mask partners."""
  if num_neighbors is None or num_neighbors >= num_clients - 1:
    return None  # complete graph
  half = num_neighbors // 2
  return [j for i in range(1, half + 1) for j in (i, -i)]


def _pairwise_sum(ids, agreement_key, d, include, offsets):
  """`[C, d]`: row u = Σ_{v partner of u} include[u, v] · sgn(id_u, id_v) · PRG(s_uv).

  sgn = +1 when id_u < id_v, −1 when id_u > id_v, 0 for equal ids (the same
  client twice, e.g. padding). `include` is `[C, C]` bool. One PRG expansion per
  (u, v) with u's partner v, as each client computes its own masks.
  """
  num = ids.shape[0]
  positions = jnp.arange(num)
  partners = (list(range(num)) if offsets is None else offsets)

  def contribution(u, v):
    sign = jnp.where(ids[u] < ids[v], jnp.uint32(1),
                     jnp.where(ids[u] > ids[v], jnp.uint32(0xFFFFFFFF), jnp.uint32(0)))
    factor = jnp.where(include[u, v], sign, jnp.uint32(0))
    return factor * _prg(_pair_key(agreement_key, ids[u], ids[v]), d)

  def body(i, acc):
    if offsets is None:
      vs = jnp.full((num,), i)
    else:
      vs = (positions + jnp.asarray(offsets)[i]) % num
    return acc + jax.vmap(contribution)(positions, vs)

  return jax.lax.fori_loop(0, len(partners), body, jnp.zeros((num, d), jnp.uint32))


def _self_masks(ids, self_key, d):
  return jax.vmap(lambda i: _prg(jax.random.fold_in(self_key, i), d))(ids)


def mask_inputs(encoded: jax.Array, client_ids: jax.Array, key: jax.Array, *,
                num_neighbors: int | None = None, modulus_bits: int = 32) -> jax.Array:
  """Client side: `[C, d]` ring encodings → masked `y_u` (self mask + pairwise masks).

  `key` is the round's protocol key; the self and pairwise seeds derive from it.
  """
  num, d = encoded.shape
  self_key, agreement_key = jax.random.split(key)
  offsets = _neighbour_offsets(num, num_neighbors)
  every = jnp.ones((num, num), bool)
  masks = _self_masks(client_ids, self_key, d) + _pairwise_sum(client_ids, agreement_key, d,
                                                               every, offsets)
  return (encoded + masks) & _modulus_mask(modulus_bits)


def unmask_sum(masked: jax.Array, survivors: jax.Array, client_ids: jax.Array, key: jax.Array,
               *, num_neighbors: int | None = None, modulus_bits: int = 32) -> jax.Array:
  """Server side: Σ_{u survivor} x_u mod R from the survivors' masked vectors only.

  Uses only the seeds Shamir recovery reveals: b_u of survivors and s_uv between
  a dropped v and a surviving u (the dropped clients' rows of `masked` are never
  read: they are replaced by zeros before anything else).
  """
  num, d = masked.shape
  self_key, agreement_key = jax.random.split(key)
  offsets = _neighbour_offsets(num, num_neighbors)
  alive = survivors[:, None]
  received = jnp.where(alive, masked, jnp.uint32(0))
  total = jnp.sum(received, axis=0, dtype=jnp.uint32)
  self_masks = jnp.where(alive, _self_masks(client_ids, self_key, d), jnp.uint32(0))
  total = total - jnp.sum(self_masks, axis=0, dtype=jnp.uint32)
  dropped = ~survivors
  include = survivors[:, None] & dropped[None, :]

  def correction(_):
    leftover = _pairwise_sum(client_ids, agreement_key, d, include, offsets)
    return jnp.sum(leftover, axis=0, dtype=jnp.uint32)

  total = total - jax.lax.cond(jnp.any(dropped), correction,
                               lambda _: jnp.zeros((d,), jnp.uint32), None)
  return total & _modulus_mask(modulus_bits)


def secure_aggregation(clip_range: float = 1.0, *, modulus_bits: int = 32,
                       num_neighbors: int | None = None,
                       threshold: int | None = None) -> Aggregator:
  """The mean of the survivors' updates through simulated secure aggregation.

  See the module docstring for the protocol. The output is the unweighted mean of
  the surviving (weight > 0) clients' quantized updates:
  `decode(Σ_u x_u) · c / (L · K)`; its error against the plain mean is at most
  c/(2L) per coordinate (plus clipping at ±c). When fewer than `threshold`
  clients survive the protocol aborts: the output is zero and `aborted` is 1.
  Reports `bits_per_client` (d·b), `prg_expansions` (client PRG expansions of d
  words, the dominant cost: C·(C−1) for the complete graph, C·k with
  neighbours, plus C self masks), `dropped` and `aborted`.

  Example:
    >>> agg = chain(clip_by_norm(1.0), secure_aggregation(clip_range=1.0))

  Args:
    clip_range: c > 0, per-coordinate clipping range before quantization.
    modulus_bits: b ∈ [8, 32], R = 2^b.
    num_neighbors: None (every pair masks, as in Bonawitz et al.) or an even k ≥ 2
      (ring graph of Bell et al. 2020).
    threshold: t, the minimum number of survivors for Shamir recovery (default 1).
  """
  check_positive('clip_range', clip_range)
  if not isinstance(modulus_bits, int) or not 8 <= modulus_bits <= 32:
    raise ValueError(f'modulus_bits must be an integer in [8, 32], got {modulus_bits!r}')
  if num_neighbors is not None and (not isinstance(num_neighbors, int) or num_neighbors < 2
                                    or num_neighbors % 2):
    raise ValueError(f'num_neighbors must be None or an even integer ≥ 2, got {num_neighbors!r}')
  if threshold is not None and (not isinstance(threshold, int) or threshold < 1):
    raise ValueError(f'threshold must be None or an integer ≥ 1, got {threshold!r}')
  min_survivors = 1 if threshold is None else threshold

  def init(params, num_clients=None):
    del num_clients
    d = tree_lib.tree_size(params)
    zero_i = jnp.zeros((), jnp.int32)
    return MetricsState({'bits_per_client': jnp.asarray(d * modulus_bits, jnp.float32),
                         'prg_expansions': zero_i, 'dropped': zero_i, 'aborted': zero_i})

  def apply(updates, weights, state, key=None, client_ids=None):
    del state
    if key is None:
      raise ValueError('secure_aggregation needs a key (it seeds the masks)')
    flat = tree_lib.client_flatten(updates)
    num = flat.shape[0]
    ids = jnp.arange(num, dtype=jnp.int32) if client_ids is None else client_ids.astype(jnp.int32)
    survivors = float_weights(weights, updates) > 0
    levels = ring_levels(num, modulus_bits)
    encoded = quantize_to_ring(flat, clip_range, levels, modulus_bits)
    masked = mask_inputs(encoded, ids, key, num_neighbors=num_neighbors,
                         modulus_bits=modulus_bits)
    total = unmask_sum(masked, survivors, ids, key, num_neighbors=num_neighbors,
                       modulus_bits=modulus_bits)
    count = jnp.sum(survivors, dtype=jnp.int32)
    aborted = count < min_survivors
    dtype = compute_dtype(flat)
    mean = decode_ring_sum(total, modulus_bits).astype(dtype) * (
        clip_range / levels) / jnp.maximum(count, 1).astype(dtype)
    mean = jnp.where(aborted, 0.0, mean)
    like = jax.tree.map(lambda x: x[0], updates)
    offsets = _neighbour_offsets(num, num_neighbors)
    partners = num - 1 if offsets is None else len(offsets)
    metrics = {'bits_per_client': jnp.asarray(flat.shape[1] * modulus_bits, jnp.float32),
               'prg_expansions': jnp.asarray(num * partners + num, jnp.int32),
               'dropped': num - count, 'aborted': aborted.astype(jnp.int32)}
    return tree_lib.client_unflatten(mean, like), MetricsState(metrics)

  return Aggregator(init, apply, REDUCER, f'secure_aggregation(R=2^{modulus_bits})')
