"""Local training: one masked optimizer step, and a whole local run of S steps.

Both are built from a per-example loss `loss_fn(params, batch, key) -> [B]` and any
optax `GradientTransformation`. The engine masks and averages: the step's objective
is `Σ_b mask_b · loss_b / max(Σ_b mask_b, 1)`, so a padded example contributes
nothing, and a step without any real example leaves parameters and optimizer state
untouched (a momentum or weight-decay optimizer would otherwise still move).

Optimizers that need a second gradient evaluation (SAM-type) are optax
`GradientTransformationExtraArgs`; the step passes them `grad_fn`, the gradient of
this step's masked objective as a function of the parameters.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sync.clients import conv_rewrite
from fedjax_sync.clients.conv_rewrite import KEEP_CONVOLUTIONS
from fedjax_sync.types import Params, PyTree


class StepMetrics(NamedTuple):
  """Per-step statistics: the masked loss sum and the number of real examples."""

  loss_sum: jax.Array
  num_examples: jax.Array


def check_per_example_losses(losses, mask) -> None:
  """Raises unless a loss returned one value per example: `losses.shape == mask.shape`.

  Checked while tracing (shapes are static), so it costs nothing at run time. A loss
  that returns its batch mean (a scalar) would make every padded example count as
  real: masking would silently stop working.
  """
  if isinstance(losses, tuple):
    raise ValueError('this computation takes the gradient of the loss itself and needs a '
                     'stateless loss returning losses [B]; a stateful model\'s loss returns '
                     '(losses [B], state update) (BatchNorm through models.from_flax): train it '
                     'with an algorithm built on the local step (fedavg, fedprox, fedadam, '
                     'scaffold option II, fedbn, ...)')
  shape = jnp.shape(losses)
  if shape != jnp.shape(mask):
    hint = (' (a scalar: the loss already averaged the batch; return the per-example '
            'losses instead, e.g. without .mean(): the engine masks padded examples and '
            'averages)' if shape == () else '')
    raise ValueError(f'loss_fn(params, batch, key) must return per-example losses of shape '
                     f'[B] = {tuple(jnp.shape(mask))}, matching the batch mask; got shape '
                     f'{tuple(shape)}{hint}')


def masked_mean(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean of `values [B]` over `mask [B]` and the count of real entries."""
  check_per_example_losses(values, mask)
  count = jnp.sum(mask.astype(values.dtype))
  total = jnp.sum(jnp.where(mask, values, jnp.zeros_like(values)))
  return total / jnp.maximum(count, 1), count


LocalStep = Callable[..., tuple[Params, PyTree, StepMetrics]]


def split_loss_output(output) -> tuple[jax.Array, PyTree | None]:
  """A loss's per-example losses `[B]` and its state update (None when stateless).

  A stateless loss returns `[B]`. A model with mutable state (BatchNorm's
  `batch_stats`) keeps it inside its params dict under its own top-level keys, and
  its loss returns `(losses [B], {key: new value})`: the local step ignores those
  keys' gradients and takes their new values from the loss (`models.from_flax`).
  """
  if isinstance(output, tuple):
    if len(output) != 2:
      raise ValueError(f'a loss returns losses [B] or (losses [B], state update); got a '
                       f'tuple of {len(output)}')
    return output
  return output, None


def _with_state(params: Params, state: PyTree) -> Params:
  """`params` with its top-level `state` keys replaced (values cast to the params' dtypes)."""
  if not isinstance(params, dict) or not isinstance(state, dict) or not set(state) <= set(params):
    keys = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise ValueError(f'a stateful loss returns a dict whose keys are top-level keys of the '
                     f'params dict; got {sorted(state) if isinstance(state, dict) else state!r} '
                     f'for params keys {keys}')
  cast = {k: jax.tree.map(lambda n, o: jnp.asarray(n).astype(o.dtype), v, params[k])
          for k, v in state.items()}
  return {**params, **cast}


def is_static_zero(value) -> bool:
  """True for a Python (or numpy) 0, False for anything else, traced arrays included:
  a coefficient that may be swept as an array keeps its term in the program."""
  return isinstance(value, (int, float, np.integer, np.floating)) and value == 0


def make_local_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                    prox_mu: float = 0.0, loop_friendly_convolutions: bool = True) -> LocalStep:
  """Builds `step(params, opt_state, batch, mask, key, anchor=None, grad_offset=None)`.

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`, or `-> (losses [B],
      state update)` for a model with mutable state (see `split_loss_output`).
    optimizer: the client's optax optimizer.
    prox_mu: FedProx's proximal coefficient μ: adds `μ (params − anchor)` to the
      gradient, the gradient of `(μ/2)‖params − anchor‖²`.
    loop_friendly_convolutions: on the CPU backend, run every convolution in the
      loss (and its gradient) in XLA:CPU's fast canonical layout
      (`fedjax_sync.clients.conv_rewrite`): autodiff's own kernel-gradient
      convolution runs 10–30× slower inside the loops of local training. Same values
      and gradients; set False to opt out (e.g. for an optimizer that applies
      `jax.jvp` to the loss, which the rewrite does not support). A loss marked with
      `conv_rewrite.keep_convolutions` is never rewritten.

  Returns:
    `step(params, opt_state, batch, mask, key, anchor=None, grad_offset=None)
    -> (params, opt_state, StepMetrics)` for one client; batch leaves `[B, ...]`,
    mask `[B]`. `grad_offset` (a params-shaped pytree) is added to the gradient,
    e.g. SCAFFOLD's correction `c − c_i`.
  """
  extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)
  if loop_friendly_convolutions and not getattr(loss_fn, KEEP_CONVOLUTIONS, False):
    loss_fn = conv_rewrite.loop_friendly_convolutions(loss_fn)

  def step(params, opt_state, batch, mask, key, anchor=None, grad_offset=None):
    def objective(p):
      losses, state = split_loss_output(loss_fn(p, batch, key))
      loss, count = masked_mean(losses, mask)  # checks that losses are [B]
      return loss, (count, state)

    (loss, (count, new_state)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    if new_state is not None:  # state keys take no gradient step: their value comes from the loss
      grads = _with_state(grads, jax.tree.map(jnp.zeros_like, new_state))
    if not is_static_zero(prox_mu):   # a traced μ (a sweep) keeps the term
      if anchor is None:
        raise ValueError('prox_mu > 0 needs the anchor (the global model)')
      grads = jax.tree.map(lambda g, p, a: g + prox_mu * (p - a), grads, params, anchor)
    if grad_offset is not None:
      grads = jax.tree.map(jnp.add, grads, grad_offset)
    if extra_args:
      def grad_fn(p):
        g = jax.grad(lambda q: objective(q)[0])(p)
        if grad_offset is not None:
          g = jax.tree.map(jnp.add, g, grad_offset)
        return g
      updates, new_opt_state = optimizer.update(grads, opt_state, params, grad_fn=grad_fn)
    else:
      updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    if new_state is not None:
      new_params = _with_state(new_params, new_state)
    active = count > 0
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)
    return (keep(new_params, params), keep(new_opt_state, opt_state),
            StepMetrics(loss_sum=loss * count, num_examples=count))

  return step


def make_local_training(step: LocalStep, *, unroll: int | bool = 1,
                        skip_padded_steps: bool | None = None) -> Callable:
  """Builds the whole local run of one client from a local step.

  Args:
    step: from `make_local_step`.
    unroll: `lax.scan` unrolling of the steps (True unrolls fully; on CPU,
      unrolled convolutional steps ran several times faster than a rolled loop).
    skip_padded_steps: branch around steps whose mask is all False (`lax.cond`)
      instead of computing them and discarding the result. A round pads every
      client to the largest client's step count, so with unequal clients most
      steps can be padding (prepared Shakespeare: ~10 real steps of 156). The
      branch saves work only where the client is not vmapped ('sequential',
      'loop' execution; under `vmap` a cond becomes a select of both branches).
      None (default): on the CPU backend only, where a branch is cheap; on GPU a
      conditional inside the loop synchronizes with the host. The result is the
      same either way: a padded step leaves params and optimizer state unchanged.

  Returns:
    `train(params, opt_state, data, mask, key, anchor=None, grad_offset=None)
    -> (params, opt_state, StepMetrics summed over steps)`; data leaves
    `[S, B, ...]`, mask `[S, B]`. Step s uses key `fold_in(key, s)`.
  """

  def train(params, opt_state, data, mask, key, anchor=None, grad_offset=None):
    num_steps = mask.shape[0]
    skip = jax.default_backend() == 'cpu' if skip_padded_steps is None else skip_padded_steps

    traced_metrics = []  # the step's metric types, recorded when `run_step` is traced

    def run_step(p, o, batch, m, s):
      out = step(p, o, batch, m, jax.random.fold_in(key, s), anchor, grad_offset)
      traced_metrics.append(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), out[2]))
      return out

    def padded_step(p, o, batch, m, s):
      # `lax.cond` traces the taken branch first; eval_shape only if it ever does not.
      metrics = traced_metrics[-1] if traced_metrics else jax.eval_shape(run_step, p, o, batch,
                                                                         m, s)[2]
      return p, o, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), metrics)

    def body(carry, xs):
      p, o = carry
      batch, m, s = xs
      if skip:
        p, o, metrics = jax.lax.cond(jnp.any(m), run_step, padded_step, p, o, batch, m, s)
      else:
        p, o, metrics = run_step(p, o, batch, m, s)
      return (p, o), metrics

    (params, opt_state), metrics = jax.lax.scan(
        body, (params, opt_state), (data, mask, jnp.arange(num_steps)), unroll=unroll)
    return params, opt_state, jax.tree.map(lambda x: jnp.sum(x, axis=0), metrics)

  return train
