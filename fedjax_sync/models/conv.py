"""A convolution whose gradients stay fast inside XLA:CPU loops.

Cause (measured with jax 0.10.2, docs/performance.md): autodiff writes the kernel
gradient of a channels-last convolution as a convolution with non-canonical
dimension labels (`f01b_i01o->01bf`: the batch axis plays the feature axis).
XLA:CPU rewrites such a convolution into canonical form, with explicit transposes
around a fast kernel, only outside while loops; inside one (a rolled `lax.scan`
over local steps, `lax.map` over clients) the generic slow kernel runs, 20–30×
slower. This is why convolutional local training on CPU used to need every step
and every client unrolled into the trace.

`loop_friendly_conv` is a drop-in for `lax.conv_general_dilated` (same arguments,
same values and gradients) that runs every convolution, forward and backward, in
the one layout XLA:CPU's fast kernel takes: batch first, features last, kernel
`(spatial…, in, out)` (`b01f_01io->b01f`), with explicit transposes around it. Its
custom VJP computes the two gradients with jax's own transpose rules (strides,
dilations, padding, feature and batch groups, 1–3 spatial dimensions, any
dimension order) and runs each of their convolutions the same way, so grads of
grads stay canonical too. On other backends it is `lax.conv_general_dilated`.

The local step applies it to every convolution of a user's loss automatically on
CPU (`fedjax_sync.clients.conv_rewrite`); calling it directly is only needed
outside the local step. The price: a `custom_vjp` function supports reverse mode
only (`jax.grad`, `jax.vjp`, grads of grads), not forward mode (`jax.jvp`,
`jax.jacfwd`), which raises jax's `TypeError` ("can't apply forward-mode autodiff
(jvp) to a custom_vjp function"); build models with `fast_cpu_conv=False` and the
local step with `loop_friendly_convolutions=False` for those.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _canonical_perms(dn: lax.ConvDimensionNumbers):
  """Permutations taking lhs, rhs and out from `dn`'s order to canonical order."""
  lhs, rhs, out = dn
  return ((lhs[0],) + tuple(lhs[2:]) + (lhs[1],),
          tuple(rhs[2:]) + (rhs[1], rhs[0]),
          (out[0],) + tuple(out[2:]) + (out[1],))


def _transpose(x, perm):
  return x if tuple(perm) == tuple(range(x.ndim)) else jnp.transpose(x, perm)


def canonical_dimension_numbers(num_spatial: int) -> lax.ConvDimensionNumbers:
  """`N(spatial)C`, `(spatial)IO`, `N(spatial)C`: XLA:CPU's fast-kernel layout."""
  spatial = tuple(range(1, num_spatial + 1))
  return lax.ConvDimensionNumbers((0, num_spatial + 1) + spatial,
                                  (num_spatial + 1, num_spatial) + tuple(range(num_spatial)),
                                  (0, num_spatial + 1) + spatial)


def canonical_layout_conv(lhs, rhs, *, dimension_numbers: lax.ConvDimensionNumbers, **params):
  """`lax.conv_general_dilated` run in canonical layout between explicit transposes.

  `dimension_numbers` must be a `ConvDimensionNumbers`; `params` are the other
  keyword arguments of `lax.conv_general_dilated` (strides, padding, dilations,
  group counts, precision, preferred element type), whose meaning does not depend
  on the layout.
  """
  lhs_perm, rhs_perm, out_perm = _canonical_perms(dimension_numbers)
  lhs = _transpose(lhs, lhs_perm)
  groups = params.pop('batch_group_count', 1)
  if groups > 1:
    # XLA:CPU lowers batch groups to a non-canonical convolution. The same sum as a
    # feature-grouped one: batch group g (examples g·N'…(g+1)·N' − 1) becomes
    # feature group g of N' examples.
    n, *spatial, c = lhs.shape
    lhs = lhs.reshape((groups, n // groups, *spatial, c))
    lhs = jnp.moveaxis(lhs, 0, -2).reshape((n // groups, *spatial, groups * c))
    params['feature_group_count'] = groups
  out = lax.conv_general_dilated(
      lhs, _transpose(rhs, rhs_perm),
      dimension_numbers=canonical_dimension_numbers(lhs.ndim - 2), **params)
  return _transpose(out, np.argsort(out_perm))


def _kernel_grad_by_matmuls_applies(params) -> bool:
  return (params.get('feature_group_count', 1) == 1 and params.get('batch_group_count', 1) == 1
          and all(d == 1 for d in params['lhs_dilation'])
          and all(lo >= 0 and hi >= 0 for lo, hi in params['padding']))


def _kernel_grad_by_matmuls(lhs, dy, rhs_shape, rhs_dtype, params):
  """The kernel gradient as one matmul per kernel offset, in canonical layout.

  `dW[k, i, o] = Σ_{n, p} x_pad[n, p·stride + k·dilation, i] · dy[n, p, o]`: for
  each kernel offset `k`, a strided slice of the padded input times the output
  gradient, contracted over examples and output positions. The same sum as
  autodiff's kernel-gradient convolution (whose output is the kernel's few
  positions and whose "kernel" is the whole output gradient), which XLA:CPU runs
  at a fraction of its speed even in canonical layout (stock EMNIST CNN, batch
  20, inside a loop: measured about 2× slower than these matmuls).
  """
  lhs_perm, rhs_perm, out_perm = _canonical_perms(params['dimension_numbers'])
  x = _transpose(lhs, lhs_perm)                  # [N, *spatial, I]
  g = _transpose(dy, out_perm)                   # [N, *out, O]
  num_spatial = x.ndim - 2
  zero = jnp.zeros((), x.dtype)
  x = lax.pad(x, zero, [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in params['padding']] + [(0, 0, 0)])
  kernel = [rhs_shape[d] for d in params['dimension_numbers'].rhs_spec[2:]]
  out = g.shape[1:-1]
  strides, dilation = params['window_strides'], params['rhs_dilation']
  contract = tuple(range(num_spatial + 1))
  dot = functools.partial(lax.dot_general, precision=params.get('precision'),
                          preferred_element_type=params.get('preferred_element_type'))
  grads = []
  for offset in np.ndindex(*kernel):
    start = [0] + [k * r for k, r in zip(offset, dilation)] + [0]
    limit = ([x.shape[0]] + [b + (o - 1) * s + 1 for b, o, s in zip(start[1:], out, strides)]
             + [x.shape[-1]])
    window = lax.slice(x, start, limit, [1] + list(strides) + [1])   # [N, *out, I]
    grads.append(dot(window, g, ((contract, contract), ((), ()))))   # [I, O]
  grad = jnp.stack(grads).reshape(tuple(kernel) + grads[0].shape)   # [*kernel, I, O]
  return _transpose(grad, np.argsort(rhs_perm)).astype(rhs_dtype)


def _hashable(value):
  if isinstance(value, (list, tuple)):
    return tuple(_hashable(v) for v in value)
  return value


@functools.lru_cache(maxsize=None)
def _custom_vjp_conv(static: tuple):
  """The canonical-layout convolution with canonical-layout gradients, per parameters."""
  params = dict(static)
  params['dimension_numbers'] = lax.ConvDimensionNumbers(*params['dimension_numbers'])

  @jax.custom_vjp
  def conv(lhs, rhs):
    return canonical_layout_conv(lhs, rhs, **params)

  def fwd(lhs, rhs):
    return conv(lhs, rhs), (lhs, rhs)

  def bwd(residuals, dy):
    from fedjax_sync.clients.conv_rewrite import loop_friendly_convolutions  # cycle
    lhs, rhs = residuals
    plain = functools.partial(lax.conv_general_dilated, **params)
    # jax's transpose rules (the gradient convolutions, with their reversals,
    # paddings and group reshapes), each convolution in them made canonical.
    lhs_grad = loop_friendly_convolutions(
        lambda d: jax.linear_transpose(lambda x: plain(x, rhs), lhs)(d)[0])(dy)
    if _kernel_grad_by_matmuls_applies(params):
      rhs_grad = _kernel_grad_by_matmuls(lhs, dy, rhs.shape, rhs.dtype, params)
    else:
      rhs_grad = loop_friendly_convolutions(
          lambda d: jax.linear_transpose(lambda w: plain(lhs, w), rhs)(d)[0])(dy)
    return lhs_grad, rhs_grad

  conv.defvjp(fwd, bwd)
  return conv


def loop_friendly_conv(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                       rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                       batch_group_count: int = 1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with CPU-loop-friendly gradients (see the module doc)."""
  n = lhs.ndim - 2
  if jax.default_backend() != 'cpu' or not 1 <= n <= 3:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  lhs_dilation = (1,) * n if lhs_dilation is None else tuple(lhs_dilation)
  rhs_dilation = (1,) * n if rhs_dilation is None else tuple(rhs_dilation)
  if isinstance(padding, str):
    lhs_sizes = [lhs.shape[d] for d in dn.lhs_spec[2:]]
    rhs_sizes = [rhs.shape[d] for d in dn.rhs_spec[2:]]
    dilate = lambda sizes, rates: [0 if s == 0 else (s - 1) * r + 1 for s, r in zip(sizes, rates)]
    padding = lax.padtype_to_pads(dilate(lhs_sizes, lhs_dilation), dilate(rhs_sizes, rhs_dilation),
                                  window_strides, padding)
  return apply_loop_friendly_conv(
      lhs, rhs, window_strides=tuple(window_strides), padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dn,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)


def apply_loop_friendly_conv(lhs, rhs, **params):
  """`loop_friendly_conv` from a `conv_general_dilated` primitive's parameters."""
  params = {k: v for k, v in params.items() if not (k == 'out_sharding' and v is None)}
  static = tuple(sorted((k, _hashable(v)) for k, v in params.items()))
  return _custom_vjp_conv(static)(lhs, rhs)
