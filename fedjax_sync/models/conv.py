"""A convolution whose gradients stay fast inside XLA:CPU loops.

Cause (measured with jax 0.10.2, docs/performance.md): autodiff writes the kernel
gradient of a channels-last convolution as a convolution with non-canonical
dimension labels (`f01b_i01o->01bf`: the batch axis plays the feature axis).
XLA:CPU rewrites such a convolution into canonical form, with explicit transposes
around a fast kernel, only outside while loops; inside one (a rolled `lax.scan`
over local steps, `lax.map` over clients) the generic slow kernel runs, 20–30×
slower. This is why convolutional local training on CPU used to need every step
and every client unrolled into the trace.

`loop_friendly_conv` is a drop-in for `lax.conv_general_dilated` (flax:
`nn.Conv(..., conv_general_dilated=loop_friendly_conv)`) whose VJP computes both
gradients as canonical channels-last convolutions of explicitly transposed
operands, so they are fast in and out of loops. It applies to stride-1, undilated,
ungrouped channels-last convolutions on the CPU backend; every other case, and
every other backend, runs `lax.conv_general_dilated` unchanged. The price: a
`custom_vjp` function supports reverse mode only (`jax.grad`, `jax.vjp`, and grads
of grads), not forward mode (`jax.jvp`, `jax.jacfwd`); build the model with
`fast_cpu_conv=False` for those.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def _channels_last(dimension_numbers, ndim: int) -> bool:
  """Whether the dimension numbers are N(spatial)C / (spatial)IO / N(spatial)C."""
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    spatial = tuple(range(1, ndim - 1))
    return (tuple(dimension_numbers.lhs_spec) == (0, ndim - 1) + spatial
            and tuple(dimension_numbers.rhs_spec) == (ndim - 1, ndim - 2) + tuple(range(ndim - 2))
            and tuple(dimension_numbers.out_spec) == (0, ndim - 1) + spatial)
  if isinstance(dimension_numbers, (tuple, list)) and len(dimension_numbers) == 3:
    lhs, rhs, out = dimension_numbers
    n = ndim - 2
    return (isinstance(lhs, str) and len(lhs) == ndim and lhs == out
            and lhs[0] == 'N' and lhs[-1] == 'C' and rhs[-2:] == 'IO'
            and lhs[1:-1] == rhs[:n])
  return False


def _ones(value, n: int) -> bool:
  return value is None or tuple(value) == (1,) * n


def _conv(x, w, pads, precision):
  n = x.ndim - 2
  spec = lax.ConvDimensionNumbers((0, n + 1) + tuple(range(1, n + 1)),
                                  (n + 1, n) + tuple(range(n)),
                                  (0, n + 1) + tuple(range(1, n + 1)))
  return lax.conv_general_dilated(x, w, (1,) * n, pads, dimension_numbers=spec,
                                  precision=precision)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _canonical_conv(x, w, pads, precision):
  return _conv(x, w, pads, precision)


def _canonical_conv_fwd(x, w, pads, precision):
  return _conv(x, w, pads, precision), (x, w)


def _canonical_conv_bwd(pads, precision, residuals, dy):
  x, w = residuals
  n = x.ndim - 2
  spatial = tuple(range(1, n + 1))
  kernel = w.shape[:n]
  # dW[k, i, o] = Σ_{b, p} xpad[b, p + k, i] dy[b, p, o]: a channels-last convolution
  # of x with its batch and channel axes swapped, by dy used as the kernel.
  dw = _conv(jnp.transpose(x, (n + 1,) + spatial + (0,)),
             jnp.transpose(dy, spatial + (0, n + 1)), pads, precision)
  dw = jnp.transpose(dw, spatial + (0, n + 1))
  # dx: full correlation of dy with the spatially flipped kernel, in/out swapped.
  flipped = jnp.flip(w, axis=tuple(range(n)))
  flipped = jnp.transpose(flipped, tuple(range(n)) + (n + 1, n))
  back_pads = [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel, pads)]
  dx = _conv(dy, flipped, back_pads, precision)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def loop_friendly_conv(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                       rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                       batch_group_count: int = 1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with CPU-loop-friendly gradients (see the module doc)."""
  n = lhs.ndim - 2
  eligible = (jax.default_backend() == 'cpu' and n >= 1 and rhs.ndim == lhs.ndim
              and _channels_last(dimension_numbers, lhs.ndim)
              and _ones(window_strides, n) and _ones(lhs_dilation, n) and _ones(rhs_dilation, n)
              and feature_group_count == 1 and batch_group_count == 1
              and preferred_element_type is None)
  if eligible:
    if isinstance(padding, str):
      pads = lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:n], (1,) * n, padding)
    else:
      pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if all(0 <= lo < k and 0 <= hi < k for (lo, hi), k in zip(pads, rhs.shape[:n])):
      return _canonical_conv(lhs, rhs, pads, precision)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
