"""Adaptive server optimizers: FedAdagrad, FedYogi, FedAdam.

Reddi et al. 2021, "Adaptive Federated Optimization", arXiv 2003.00295,
Algorithm 2. With Δ the aggregated client update (here the pseudo-gradient g = −Δ):

    m ← β1 m + (1 − β1) Δ
    v ← v + Δ²                                  (FedAdagrad)
    v ← v − (1 − β2) Δ² sign(v − Δ²)            (FedYogi)
    v ← β2 v + (1 − β2) Δ²                      (FedAdam)
    w ← w + η m / (√v + τ)

with no bias correction and v initialized to τ² (the paper requires v_{-1} ≥ τ²).
Defaults β1 = 0.9, β2 = 0.99, τ = 1e-3. These are written here as optax
`GradientTransformation`s because optax's `adam`/`yogi`/`adagrad` differ in
details: optax.adam bias-corrects m and v; optax.yogi initializes v to 1e-6 and
puts ε inside differently; optax.adagrad starts its accumulator at 0.1 and uses
√(v + ε). Pass `server_optimizer=optax.adam(...)` to any algorithm to use optax's
version instead.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sync.algorithms.fed_avg import fed_avg
from fedjax_sync.types import Algorithm

_RULES = ('adagrad', 'yogi', 'adam')


class ServerAdaptiveState(NamedTuple):
  m: optax.Params
  v: optax.Params


def server_adaptive(rule: str, learning_rate: float, b1: float = 0.9, b2: float = 0.99,
                    tau: float = 1e-3) -> optax.GradientTransformation:
  """Reddi et al.'s adaptive server step as an optax transform on pseudo-gradients."""
  if rule not in _RULES:
    raise ValueError(f'unknown adaptive rule {rule!r}; valid: {", ".join(_RULES)}')
  if tau <= 0:
    raise ValueError(f'tau must be > 0, got {tau}')

  def init(params):
    return ServerAdaptiveState(
        m=jax.tree.map(jnp.zeros_like, params),
        v=jax.tree.map(lambda p: jnp.full_like(p, tau ** 2), params))

  def update(grads, state, params=None):
    del params
    delta = jax.tree.map(jnp.negative, grads)  # Δ = −pseudo-gradient
    m = jax.tree.map(lambda m, d: b1 * m + (1 - b1) * d, state.m, delta)
    if rule == 'adagrad':
      v = jax.tree.map(lambda v, d: v + d * d, state.v, delta)
    elif rule == 'yogi':
      v = jax.tree.map(lambda v, d: v - (1 - b2) * d * d * jnp.sign(v - d * d), state.v, delta)
    else:
      v = jax.tree.map(lambda v, d: b2 * v + (1 - b2) * d * d, state.v, delta)
    updates = jax.tree.map(lambda m, v: learning_rate * m / (jnp.sqrt(v) + tau), m, v)
    return updates, ServerAdaptiveState(m=m, v=v)

  return optax.GradientTransformation(init, update)


def _fed_opt(rule: str) -> Callable[..., Algorithm]:
  def build(loss_fn, client_optimizer, *, server_learning_rate: float = 0.01,
            b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3, **kwargs) -> Algorithm:
    return fed_avg(loss_fn, client_optimizer,
                   server_optimizer=server_adaptive(rule, server_learning_rate, b1, b2, tau),
                   name=kwargs.pop('name', f'fed{rule}'), **kwargs)

  build.__name__ = f'fed_{rule}'
  build.__doc__ = (f'Fed{rule.capitalize()} (Reddi et al. 2021, arXiv 2003.00295, Algorithm 2): '
                   f'FedAvg clients with the server step `server_adaptive({rule!r}, ...)`.')
  return build


fed_adagrad = _fed_opt('adagrad')
fed_yogi = _fed_opt('yogi')
fed_adam = _fed_opt('adam')
