"""Every convolution of a function made loop-friendly, without changing the function.

`loop_friendly_convolutions(fn)` traces `fn` to a jaxpr when it is called and
evaluates that jaxpr with each `conv_general_dilated` replaced by
`fedjax_sync.models.conv`'s canonical-layout convolution with canonical-layout
gradients (the reason: XLA:CPU runs autodiff's kernel-gradient convolution with a
slow generic kernel inside while loops; see that module and docs/performance.md).
Values and gradients are those of `fn`; only the layout of the convolutions XLA
sees changes. The local step (`make_local_step`) applies it to the user's loss on
the CPU backend, so a model written with plain `flax.linen.Conv` (any strides,
dilations, padding, feature or batch groups, 1–3 spatial dimensions, channels
first or last) trains inside `lax.scan` over local steps at the speed of the
unrolled program.

Max pools whose windows tile the input (stride = window, no padding: flax's
`nn.max_pool(x, w, strides=w)`) are replaced too, by `fedjax_sync.models.pool`'s
reshape-and-max form: autodiff's `select-and-scatter` gradient is slow on XLA:CPU,
slower still inside loops. Other pools are left as written.

Convolutions nested in `jax.jit`, `jax.checkpoint`, `lax.scan`, `lax.while_loop`
and `lax.cond` inside `fn` are rewritten too (a jitted or checkpointed region is
inlined). Convolutions inside a user's own `custom_jvp`/`custom_vjp` function are
left alone (their rules are the user's). On other backends `fn` runs unchanged.

Reverse-mode autodiff of the result works to any order; forward mode (`jax.jvp`
of the rewritten function) raises jax's error for `custom_vjp` functions, and
`make_local_step(..., loop_friendly_convolutions=False)` or a loss marked with
`keep_convolutions(loss_fn)` (for algorithms that build the step) is the opt-out. `jax.jvp`
used inside `fn` itself is fine: it is traced out before the rewrite.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np
from jax.extend import core

from fedjax_sync.models.conv import apply_loop_friendly_conv
from fedjax_sync.models.pool import tiled_max_pool, tiles_input

_CONV = core.primitives.conv_general_dilated_p
_MAX_POOL = jax.lax.reduce_window_max_p
_REWRITTEN = (_CONV, _MAX_POOL)
# Regions evaluated inline when they hold a convolution: calls whose semantics are
# their body's (jit, checkpoint). Custom-derivative calls are never entered.
_INLINE = frozenset({'jit', 'pjit', 'closed_call', 'core_call', 'remat2', 'checkpoint'})
_OPAQUE = frozenset({'custom_jvp_call', 'custom_vjp_call', 'custom_vjp_call_jaxpr', 'custom_lin'})


def _sub_jaxprs(params):
  for value in params.values():
    for v in value if isinstance(value, tuple) else (value,):
      if isinstance(v, core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, core.Jaxpr):
        yield v


@functools.lru_cache(maxsize=256)
def _has_conv(jaxpr: core.Jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive in _REWRITTEN:
      return True
    if eqn.primitive.name not in _OPAQUE and any(_has_conv(j) for j in _sub_jaxprs(eqn.params)):
      return True
  return False


def _rewrite_closed(closed: core.ClosedJaxpr) -> core.ClosedJaxpr:
  """The same closed jaxpr with its convolutions replaced (same input/output types)."""
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in closed.in_avals]
  return jax.make_jaxpr(lambda *args: _eval(closed.jaxpr, closed.consts, args))(*avals)


def _rewrite_param(value):
  if isinstance(value, core.ClosedJaxpr):
    return _rewrite_closed(value) if _has_conv(value.jaxpr) else value
  if isinstance(value, tuple):
    return tuple(_rewrite_param(v) for v in value)
  return value


def _eval(jaxpr: core.Jaxpr, consts, args) -> list:
  env = {}

  def read(v):
    return v.val if isinstance(v, core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    subs = [] if name in _OPAQUE else [j for j in _sub_jaxprs(eqn.params) if _has_conv(j)]
    with eqn.ctx.manager:
      if eqn.primitive is _CONV and eqn.params.get('out_sharding') is None:
        outvals = apply_loop_friendly_conv(*invals, **eqn.params)
      elif eqn.primitive is _MAX_POOL and tiles_input(*invals, **eqn.params):
        outvals = tiled_max_pool(invals[0], eqn.params['window_dimensions'])
      elif subs and name in _INLINE:
        body = eqn.params['jaxpr']
        closed = body if isinstance(body, core.ClosedJaxpr) else core.ClosedJaxpr(body, ())
        outvals = _eval(closed.jaxpr, closed.consts, invals)
      elif subs and not any(isinstance(v, core.Jaxpr) for v in eqn.params.values()):
        params = {k: _rewrite_param(v) for k, v in eqn.params.items()}
        outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
      else:
        outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    if not eqn.primitive.multiple_results:
      outvals = [outvals]
    for v, value in zip(eqn.outvars, outvals):
      if not isinstance(v, core.DropVar):
        env[v] = value
  return [read(v) for v in jaxpr.outvars]


KEEP_CONVOLUTIONS = '_fedjax_sync_keep_convolutions'


def keep_convolutions(loss_fn: Callable) -> Callable:
  """Marks a loss so that the local step never rewrites its convolutions (the opt-out
  for algorithms that build the step themselves; `make_local_step` also takes
  `loop_friendly_convolutions=False`). Returns a marked copy; `loss_fn` is unchanged."""

  @functools.wraps(loss_fn)
  def marked(*args, **kwargs):
    return loss_fn(*args, **kwargs)

  setattr(marked, KEEP_CONVOLUTIONS, True)
  return marked


def loop_friendly_convolutions(fn: Callable) -> Callable:
  """`fn` with every convolution in canonical layout, forward and backward (on CPU).

  Array arguments (and tracers) are traced; any other argument (Python numbers,
  strings) is passed to `fn` as it is.
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    if jax.default_backend() != 'cpu':
      return fn(*args, **kwargs)
    leaves, treedef = jax.tree.flatten((args, kwargs))
    dynamic = [i for i, leaf in enumerate(leaves)
               if isinstance(leaf, (jax.Array, np.ndarray, np.generic))]

    def flat_fn(*values):
      full = list(leaves)
      for i, value in zip(dynamic, values):
        full[i] = value
      a, k = jax.tree.unflatten(treedef, full)
      return fn(*a, **k)

    values = [leaves[i] for i in dynamic]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*values)
    # Evaluate the traced jaxpr even without a convolution: calling `fn` again would
    # trace the user's loss a second time (tests count traces).
    out = _eval(closed.jaxpr, closed.consts, values)
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return wrapped
