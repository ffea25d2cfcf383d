"""Sharpness-aware local optimizers (SAM, SAGM) as optax transformations.

Both need a second gradient evaluation per step at a perturbed point of the same
minibatch. They are `optax.GradientTransformationExtraArgs` whose `update` takes
the extra keyword argument `grad_fn` (the gradient of the step's objective as a
function of the parameters). `fedjax_sync.clients.local.make_local_step` passes
it, so `sam(optax.sgd(0.01))` is a drop-in client optimizer for any algorithm
built on local training (FedAvg → FedSAM, FedProx, FedAdam's clients, ...).

* SAM (Foret et al. 2021, arXiv 2010.01412, Eq. 2 and Algorithm 1):
  `g = ∇L(v)`, `ε = ρ g / (‖g‖ + 1e-12)`, the base optimizer steps with `∇L(v + ε)`.
* SAGM (Wang et al., CVPR 2023, "Sharpness-Aware Gradient Matching for Domain
  Generalization", arXiv 2303.10353; rule as in the authors' code):
  `g1 = ∇L(v)`, `v' = v + (ρ / (‖g1‖ + 1e-12) − α) g1`, `g2 = ∇L(v')`,
  the base optimizer steps with `d = ½ (g1 + g2)`.

`‖g‖` is the global norm over the whole parameter pytree. Anything the engine adds
to the gradient (SCAFFOLD's `c − c_i`) is in both `g` and `grad_fn`; FedProx's
proximal term is in the first gradient only (`grad_fn` is the data objective).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sync import tree as tree_lib

NORM_EPS = 1e-12


class SharpnessAwareState(NamedTuple):
  """State of `sam` / `sagm`: the base optimizer's state."""

  base: optax.OptState


def _check_grad_fn(grad_fn, name):
  if grad_fn is None:
    raise ValueError(f'{name} needs the extra argument grad_fn (the gradient of the step '
                     'objective as a function of the parameters); make_local_step passes it')


def _perturb(params, direction, scale):
  return jax.tree.map(lambda p, d: p + scale.astype(p.dtype) * d.astype(p.dtype),
                      params, direction)


def sam(base: optax.GradientTransformation, rho: float = 0.05) -> optax.GradientTransformationExtraArgs:
  """Sharpness-Aware Minimization around any base optimizer (arXiv 2010.01412).

  Example:
    >>> client_optimizer = sam(optax.sgd(0.01), rho=0.05)
    >>> algorithm = fedjax_sync.algorithms.fed_avg(model.loss, client_optimizer)

  Args:
    base: the optimizer that consumes the sharpness-aware gradient `∇L(v + ε)`.
    rho: neighbourhood radius ρ ≥ 0 (SAM paper default 0.05; the seed report
      used 0.001). ρ = 0 is the base optimizer with one wasted gradient.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update(grads, state, params,
    grad_fn=...)` requires `params` and `grad_fn`.
  """
  if not rho >= 0:
    raise ValueError(f'sam rho must be >= 0, got {rho!r}')

  def init(params):
    return SharpnessAwareState(base=base.init(params))

  def update(grads, state, params=None, *, grad_fn=None, **extra_args):
    del extra_args
    _check_grad_fn(grad_fn, 'sam')
    if params is None:
      raise ValueError('sam needs params')
    scale = rho / (tree_lib.tree_norm(grads) + NORM_EPS)
    sharp_grads = grad_fn(_perturb(params, grads, scale))
    updates, new_base = base.update(sharp_grads, state.base, params)
    return updates, SharpnessAwareState(base=new_base)

  return optax.GradientTransformationExtraArgs(init, update)


def sagm(base: optax.GradientTransformation, rho: float = 0.05,
         alpha: float = 0.001) -> optax.GradientTransformationExtraArgs:
  """Sharpness-Aware Gradient Matching (Wang et al., CVPR 2023, arXiv 2303.10353).

  The perturbation `(ρ/‖g1‖ − α) g1` ascends by ρ and steps back by α·g1, and the
  descent direction is the average of the gradients at both points, as in the
  authors' code. FedSAGM is FedAvg with this client optimizer.

  Args:
    base: the optimizer that consumes `½ (g1 + g2)`.
    rho: ascent radius ρ ≥ 0 (the seed report used 0.001).
    alpha: gradient-matching step α ≥ 0 (the seed report used 0.01).
  """
  if not rho >= 0:
    raise ValueError(f'sagm rho must be >= 0, got {rho!r}')
  if not alpha >= 0:
    raise ValueError(f'sagm alpha must be >= 0, got {alpha!r}')

  def init(params):
    return SharpnessAwareState(base=base.init(params))

  def update(grads, state, params=None, *, grad_fn=None, **extra_args):
    del extra_args
    _check_grad_fn(grad_fn, 'sagm')
    if params is None:
      raise ValueError('sagm needs params')
    scale = rho / (tree_lib.tree_norm(grads) + NORM_EPS) - alpha
    second = grad_fn(_perturb(params, grads, jnp.asarray(scale)))
    matched = jax.tree.map(lambda a, b: 0.5 * (a + b), grads, second)
    updates, new_base = base.update(matched, state.base, params)
    return updates, SharpnessAwareState(base=new_base)

  return optax.GradientTransformationExtraArgs(init, update)
