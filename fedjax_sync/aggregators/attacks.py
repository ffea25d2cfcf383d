"""Model-poisoning attacks as client transforms, for robustness studies.

An attack rewrites the updates of the attacking clients before any defence sees
them: `chain(sign_flip_attack(10.0, num_attackers=3), coordinate_median())`.
Attackers are the clients at fixed batch positions. The simulator samples the
clients of a round at random, so the first f positions are f random clients of
the round: exactly f of the K clients attack every round.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import TRANSFORM, Aggregator
from fedjax_sync.aggregators.reduce import MetricsState, float_weights

__all__ = ['attacker_mask', 'scale_attack', 'sign_flip_attack']


def _check_attackers(num_attackers, fraction, positions):
  given = [x is not None for x in (num_attackers, fraction, positions)]
  if sum(given) != 1:
    raise ValueError('give exactly one of num_attackers, fraction and positions; got '
                     f'num_attackers={num_attackers!r}, fraction={fraction!r}, '
                     f'positions={positions!r}')
  if num_attackers is not None and (not isinstance(num_attackers, int) or num_attackers < 0):
    raise ValueError(f'num_attackers must be an integer ≥ 0, got {num_attackers!r}')
  if fraction is not None and (not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1):
    raise ValueError(f'fraction must be in [0, 1], got {fraction!r}')
  if positions is not None and not all(isinstance(p, int) and p >= 0 for p in positions):
    raise ValueError(f'positions must be non-negative integers, got {positions!r}')


def attacker_mask(num_clients: int, *, num_attackers: int | None = None,
                  fraction: float | None = None, positions=None) -> jax.Array:
  """`[C]` bool: which batch positions attack (the first f, ⌊fraction·C⌋, or `positions`)."""
  _check_attackers(num_attackers, fraction, positions)
  if positions is not None:
    mask = jnp.zeros((num_clients,), bool)
    return mask.at[jnp.asarray(list(positions), jnp.int32)].set(True, mode='drop')
  count = num_attackers if num_attackers is not None else int(fraction * num_clients)
  return jnp.arange(num_clients) < count


def _attack(factor: float, name: str, **who) -> Aggregator:
  _check_attackers(**who)
  if not isinstance(factor, (int, float)) or isinstance(factor, bool):
    raise ValueError(f'{name} factor must be a number, got {factor!r}')

  def init(params, num_clients=None):
    del params, num_clients
    return MetricsState({'num_attackers': jnp.zeros((), jnp.int32)})

  def apply(updates, weights, state, key=None, client_ids=None):
    del state, key, client_ids
    num = jax.tree.leaves(updates)[0].shape[0]
    attacking = attacker_mask(num, **who)
    present = float_weights(weights, updates) > 0
    scales = jnp.where(attacking, float(factor), 1.0)  # weak: the updates' dtype
    count = jnp.sum(attacking & present, dtype=jnp.int32)
    return tree_lib.client_scale(updates, scales), MetricsState({'num_attackers': count})

  return Aggregator(init, apply, TRANSFORM, name)


def scale_attack(factor: float, *, num_attackers: int | None = None,
                 fraction: float | None = None, positions=None) -> Aggregator:
  """The attackers send `factor · Δ` (a boosted update; Bhagoji et al. 2019,
  arXiv 1811.12470, explicit boosting)."""
  return _attack(factor, f'scale_attack({factor:g})', num_attackers=num_attackers,
                 fraction=fraction, positions=positions)


def sign_flip_attack(scale: float = 1.0, *, num_attackers: int | None = None,
                     fraction: float | None = None, positions=None) -> Aggregator:
  """The attackers send `−scale · Δ` (the sign-flipping attack of Damaskinos et al.
  2018 / Karimireddy et al. 2021, arXiv 2012.10333, with an optional boost)."""
  return _attack(-scale, f'sign_flip_attack({scale:g})', num_attackers=num_attackers,
                 fraction=fraction, positions=positions)
