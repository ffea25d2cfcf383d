"""DP-FedAvg's Gaussian mechanism as a reducer, and host-side privacy accounting.

The jitted part clips, sums, adds Gaussian noise and divides by a fixed
denominator; it reports the noise it added. The privacy spent is computed on the
host with Google's maintained `dp_accounting` library (RDP or PLD accountant),
never with hand-written RDP formulas.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import REDUCER, Aggregator, compute_dtype
from fedjax_sync.aggregators.reduce import MetricsState, check_positive, float_weights

__all__ = ['ACCOUNTANTS', 'dp_epsilon', 'dp_fedavg', 'dp_noise_multiplier',
           'participation_epsilon']

ACCOUNTANTS = ('rdp', 'pld')


def dp_fedavg(clip_norm: float, noise_multiplier: float, expected_total_weight: float, *,
              weight_cap: float | None = None) -> Aggregator:
  """DP-FedAvg's Gaussian sum with the fixed-denominator estimator.

  McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private Recurrent
  Language Models" (arXiv 1710.06963, Alg. 1, estimator f̃_f):
  `Δ = (Σ_k ω_k · clip_S(Δ_k) + N(0, σ² I)) / W` with σ = z·S and W the *expected*
  total weight (q·N for uniform weights), fixed in advance so that the
  denominator reveals nothing about who took part.
  Client weights: ω_k = 1 for every present client (default), or
  ω_k = min(w_k / weight_cap, 1) with `weight_cap` (the paper's capped n_k/ŵ), so
  one client changes the sum by at most S in L2 (sensitivity S).
  Reports `noise_std` (σ, on the sum), `noise_std_of_mean` (σ/W),
  `clipped_fraction` and `total_weight` (the realized Σ ω_k, for diagnostics
  only). Privacy is accounted on the host: `dp_epsilon(z, q, rounds, δ)`.

  Args:
    clip_norm: S > 0.
    noise_multiplier: z ≥ 0 (0 disables noise; useful to test clipping alone).
    expected_total_weight: W > 0.
    weight_cap: optional ŵ > 0.
  """
  check_positive('clip_norm', clip_norm)
  check_positive('noise_multiplier', noise_multiplier, allow_zero=True)
  check_positive('expected_total_weight', expected_total_weight)
  if weight_cap is not None:
    check_positive('weight_cap', weight_cap)
  sigma = noise_multiplier * clip_norm

  def init(params, num_clients=None):
    del num_clients
    dtype = compute_dtype(params)
    zero = jnp.zeros((), dtype)
    return MetricsState({'noise_std': jnp.asarray(sigma, dtype),
                         'noise_std_of_mean': jnp.asarray(sigma / expected_total_weight, dtype),
                         'clipped_fraction': zero, 'total_weight': zero})

  def apply(updates, weights, state, key=None, client_ids=None):
    del client_ids
    w = float_weights(weights, updates)
    present = (w > 0).astype(w.dtype)
    omega = present if weight_cap is None else jnp.clip(w / weight_cap, 0.0, 1.0)
    # Overflow-safe norms, Inf entries kept as a direction: see `tree.client_clip`.
    total, factors, _ = tree_lib.client_clipped_weighted_sum(updates, omega, clip_norm)
    if sigma > 0:
      if key is None:
        raise ValueError('dp_fedavg with noise_multiplier > 0 needs a key')
      leaves, treedef = jax.tree.flatten(total)
      # Drawn flat (the same values as in the leaf's shape; compiles several times faster
      # on XLA:CPU, see compress._per_client_uniform).
      noisy = [x + (sigma * jax.random.normal(jax.random.fold_in(key, i), (x.size,),
                                              compute_dtype(x)).reshape(x.shape)).astype(x.dtype)
               for i, x in enumerate(leaves)]
      total = jax.tree.unflatten(treedef, noisy)
    out = tree_lib.tree_scale(total, 1.0 / expected_total_weight)
    metrics = dict(state.metrics)
    metrics['clipped_fraction'] = (jnp.sum(present * (factors < 1.0))
                                   / jnp.maximum(jnp.sum(present), 1.0))
    metrics['total_weight'] = jnp.sum(omega)
    return out, MetricsState(metrics)

  return Aggregator(init, apply, REDUCER, f'dp_fedavg(S={clip_norm:g}, z={noise_multiplier:g})')


def _event(noise_multiplier: float, sampling_rate: float, num_rounds: int):
  import dp_accounting
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(sampling_rate,
                                          dp_accounting.GaussianDpEvent(noise_multiplier)),
      num_rounds)


def _accountant(name: str):
  from dp_accounting import pld, rdp
  if name == 'rdp':
    return rdp.RdpAccountant()
  if name == 'pld':
    return pld.PLDAccountant()
  raise ValueError(f'unknown accountant {name!r}; valid: {", ".join(ACCOUNTANTS)}')


def _check_accounting(sampling_rate, num_rounds, delta):
  if not isinstance(sampling_rate, (int, float)) or not 0 < sampling_rate <= 1:
    raise ValueError(f'sampling_rate must be in (0, 1], got {sampling_rate!r}')
  if not isinstance(num_rounds, int) or isinstance(num_rounds, bool) or num_rounds < 0:
    raise ValueError(f'num_rounds must be an integer ≥ 0, got {num_rounds!r}')
  if not isinstance(delta, (int, float)) or not 0 < delta < 1:
    raise ValueError(f'delta must be in (0, 1), got {delta!r}')


def dp_epsilon(noise_multiplier: float, sampling_rate: float, num_rounds: int, delta: float, *,
               accountant: str = 'rdp') -> float:
  """ε spent at δ by `num_rounds` rounds of the sampled Gaussian mechanism (host side).

  Each round samples clients with probability q (Poisson; uniform sampling of
  qN clients is the usual approximation, as in McMahan et al. 2018) and adds
  noise z·S to a sum of sensitivity S. Uses `dp_accounting`'s RDP accountant
  (Mironov et al. 2019) or its PLD accountant (tighter).

  Example:
    >>> dp_epsilon(1.0, 0.01, 1000, 1e-5)   # ≈ 2.10 (RDP), ≈ 1.83 (PLD)

  Args:
    noise_multiplier: z > 0.
    sampling_rate: q ∈ (0, 1].
    num_rounds: rounds of the mechanism.
    delta: δ ∈ (0, 1).
    accountant: 'rdp' or 'pld'.
  """
  check_positive('noise_multiplier', noise_multiplier)
  _check_accounting(sampling_rate, num_rounds, delta)
  acc = _accountant(accountant)
  acc.compose(_event(noise_multiplier, sampling_rate, num_rounds))
  return float(acc.get_epsilon(delta))


def dp_noise_multiplier(target_epsilon: float, sampling_rate: float, num_rounds: int,
                        delta: float, *, accountant: str = 'rdp') -> float:
  """The smallest noise multiplier z reaching ε ≤ `target_epsilon` at δ (host side),
  by `dp_accounting.calibrate_dp_mechanism`."""
  import dp_accounting
  check_positive('target_epsilon', target_epsilon)
  _check_accounting(sampling_rate, num_rounds, delta)
  _accountant(accountant)
  return float(dp_accounting.calibrate_dp_mechanism(
      lambda: _accountant(accountant),
      lambda z: _event(z, sampling_rate, num_rounds),
      target_epsilon, delta,
      bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0)))


def participation_epsilon(config, num_clients: int, noise_multiplier: float, delta: float, *,
                          accountant: str = 'rdp') -> float:
  """ε at δ of a run's `config.num_rounds` Gaussian rounds under its client sampling (host).

  The accountant matches how `SimulationConfig` samples clients:

  * `sampling='poisson'` (each client independently with probability q, rounds of
    at most C_max clients): `dp_accounting.PoissonSampledDpEvent(q, Gaussian(z))`
    composed R times, add/remove-one-client neighbours (= `dp_epsilon(z, q, R, δ)`);
    exact provided no round overflows C_max (`num_overflow` stays 0).
  * `sampling='uniform'` (C of N without replacement, not proportional):
    `SampledWithoutReplacementDpEvent(N, C, Gaussian(z))` composed R times in the
    RDP accountant with replace-one neighbours (the relation under which
    fixed-size sampling is analysed; Wang, Balle & Kasiviswanathan 2019, arXiv
    1808.00087); `accountant='pld'` has no such event and is refused.

  Size-proportional sampling has no accountant here (ValueError). Availability
  traces are not accounted for (a client offline in a round cannot take part in
  it, which only lowers its privacy loss under Poisson sampling of the available
  clients). z is the noise multiplier of a sum of sensitivity S (`dp_fedavg`'s).

  Args:
    config: a `SimulationConfig`.
    num_clients: N, the population.
    noise_multiplier: z > 0.
    delta: δ ∈ (0, 1).
    accountant: 'rdp' or 'pld' (Poisson only).
  """
  import dp_accounting
  from dp_accounting import rdp

  check_positive('noise_multiplier', noise_multiplier)
  if not isinstance(num_clients, int) or isinstance(num_clients, bool) or num_clients < 1:
    raise ValueError(f'num_clients must be a positive integer, got {num_clients!r}')
  if config.sampling == 'poisson':
    return dp_epsilon(noise_multiplier, float(config.sampling_rate), config.num_rounds, delta,
                      accountant=accountant)
  if config.proportional_sampling:
    raise ValueError('no accountant for size-proportional sampling; valid: '
                     "sampling='poisson', or uniform sampling without proportional_sampling")
  _check_accounting(config.clients_per_round / num_clients, config.num_rounds, delta)
  if accountant != 'rdp':
    raise ValueError(f'accountant {accountant!r} has no event for fixed-size sampling '
                     "without replacement; valid: 'rdp' (or sampling='poisson')")
  acc = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  acc.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.SampledWithoutReplacementDpEvent(
          num_clients, config.clients_per_round, dp_accounting.GaussianDpEvent(noise_multiplier)),
      config.num_rounds))
  return float(acc.get_epsilon(delta))
