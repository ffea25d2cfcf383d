"""Max pooling whose gradient stays fast inside XLA:CPU loops.

Autodiff writes the gradient of `lax.reduce_window` max pooling as XLA's
`select-and-scatter`, which XLA:CPU runs slowly, and more slowly inside while
loops (stock EMNIST CNN, a [20, 24, 24, 64] 2×2 pool, measured 2026-11-30: 8× the
time of the form below inside a loop). For the common pooling whose windows tile
the input (stride = window, no padding or dilation: flax's `nn.max_pool(x, w, w)`),
`tiled_max_pool` computes the same values with a reshape and a max, and the same
gradient as jax's: each window's output gradient goes to the first maximal entry
of the window (row-major order), the rest get zero. The local step applies it to
the user's loss on CPU together with the convolution rewrite
(`fedjax_sync.clients.conv_rewrite`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def tiles_input(operand, window_dimensions, window_strides, padding, base_dilation,
                window_dilation) -> bool:
  """Whether a `reduce_window_max` is a tiling pool that `tiled_max_pool` computes."""
  return (jnp.issubdtype(operand.dtype, jnp.floating)
          and tuple(window_dimensions) == tuple(window_strides)
          and all(tuple(p) == (0, 0) for p in padding)
          and all(d == 1 for d in base_dilation) and all(d == 1 for d in window_dilation)
          and all(n >= w for n, w in zip(operand.shape, window_dimensions)))


def _windows_last(x, window):
  """`x` cut to whole windows, as `[*outputs, prod(window)]` (row-major within a window)."""
  outputs = [n // w for n, w in zip(x.shape, window)]
  x = x[tuple(slice(0, o * w) for o, w in zip(outputs, window))]
  split = x.reshape([d for o, w in zip(outputs, window) for d in (o, w)])
  rank = len(window)
  perm = [2 * i for i in range(rank)] + [2 * i + 1 for i in range(rank)]
  return jnp.transpose(split, perm).reshape(outputs + [int(np.prod(window))]), outputs


@functools.lru_cache(maxsize=None)
def _pool(window: tuple):

  @jax.custom_vjp
  def pool(x):
    return jnp.max(_windows_last(x, window)[0], axis=-1)

  def fwd(x):
    tiles, _ = _windows_last(x, window)
    return jnp.max(tiles, axis=-1), (jnp.argmax(tiles, axis=-1), x.shape)

  def bwd(residuals, g):
    first_max, shape = residuals
    size = int(np.prod(window))
    position = lax.broadcasted_iota(first_max.dtype, first_max.shape + (size,), first_max.ndim)
    scattered = jnp.where(first_max[..., None] == position, g[..., None], jnp.zeros((), g.dtype))
    outputs = list(first_max.shape)
    rank = len(window)
    split = scattered.reshape(outputs + list(window))
    perm = [p for i in range(rank) for p in (i, rank + i)]
    tiled = jnp.transpose(split, perm).reshape([o * w for o, w in zip(outputs, window)])
    return (jnp.pad(tiled, [(0, n - t) for n, t in zip(shape, tiled.shape)]),)

  pool.defvjp(fwd, bwd)
  return pool


def tiled_max_pool(operand, window_dimensions):
  """`lax.reduce_window(operand, -inf, lax.max, window, window, 'VALID')`, loop-friendly.

  Same values and reverse-mode gradients (the first maximum of each window takes
  the gradient); `custom_vjp`, so no forward-mode autodiff.
  """
  return _pool(tuple(int(w) for w in window_dimensions))(operand)
