"""Kuramoto-FedAvg's aggregators against numpy oracles and their guards."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sync.aggregators import kuramoto, kuramoto_code, weighted_mean
from fedjax_sync.aggregators.kuramoto import kuramoto_weights


def _stack(vectors, dtype=jnp.float32):
  flat = jnp.asarray(np.stack(vectors), dtype)
  return {'a': flat[:, :2].reshape(-1, 2, 1), 'b': flat[:, 2:]}


def _flat(tree):
  return np.concatenate([np.asarray(tree['a']).reshape(-1), np.asarray(tree['b']).reshape(-1)])


def oracle_weights(vectors, weights):
  """The paper's ρ_k in float64 (all clients present, well conditioned)."""
  u = np.asarray(vectors, np.float64)
  p = np.asarray(weights, np.float64) / np.sum(weights)
  mean = p @ u
  cos = u @ mean / (np.linalg.norm(u, axis=1) * np.linalg.norm(mean))
  theta = np.arccos(np.clip(cos, -1, 1))
  s = np.sin(theta.mean() - theta)
  return s / s.sum(), theta, s.sum()


def test_parallel_updates_with_unit_kappa_reduce_to_fedavg():
  direction = np.array([0.3, -1.0, 2.0, 0.5])
  vectors = [direction * s for s in (1.0, 2.5, 0.4, 3.0)]  # all θ_k = 0: ρ is 0/0
  weights = jnp.asarray([2.0, 1.0, 4.0, 3.0])
  agg = kuramoto(kappa=1.0)
  state = agg.init(None, 6)
  out, state = jax.jit(agg.apply)(_stack(vectors), weights, state, None,
                                  jnp.asarray([0, 1, 2, 3], jnp.int32))
  mean, _ = weighted_mean().apply(_stack(vectors), weights, None)
  chex.assert_trees_all_close(out, mean, rtol=1e-6)
  assert int(state.metrics['fallback']) == 1 and int(state.fallbacks) == 1
  np.testing.assert_allclose(state.metrics['rho'][:4], np.asarray(weights) / 10.0, rtol=1e-6)
  out, state = agg.apply(_stack(vectors), weights, state, None, jnp.arange(4, dtype=jnp.int32))
  assert int(state.metrics['fallbacks']) == 2  # the count accumulates


def test_weights_match_oracle_and_sum_to_one_when_well_conditioned():
  vectors = [np.array([1.0, 0.0, 0.2, 0.0]), np.array([0.9, 0.6, 0.0, 0.1]),
             np.array([0.1, 1.2, 0.3, 0.0]), np.array([-0.8, 0.5, 0.0, 0.9])]
  weights = np.array([1.0, 2.0, 1.0, 3.0])
  expected, theta, den = oracle_weights(vectors, weights)
  assert abs(den) > 1e-2  # well conditioned
  with jax.enable_x64(True):
    rho, got_theta, fallback = jax.jit(kuramoto_weights)(_stack(vectors, jnp.float64),
                                                         jnp.asarray(weights))
  assert not bool(fallback)
  np.testing.assert_allclose(got_theta, theta, rtol=1e-5)
  np.testing.assert_allclose(rho, expected, rtol=1e-4)
  np.testing.assert_allclose(np.sum(np.asarray(rho)), 1.0, rtol=1e-12)  # float64 weights
  # The paper's step: w ← w + κ Σ ρ_k Δ_k; in pseudo-gradients κ Σ ρ_k u_k.
  kappa = 0.1
  agg = kuramoto(kappa)
  out, _ = agg.apply(_stack(vectors), jnp.asarray(weights), agg.init(None), None, None)
  np.testing.assert_allclose(_flat(out), kappa * expected @ np.asarray(vectors), rtol=1e-4,
                             atol=1e-6)


def test_weights_are_sign_symmetric():
  rng = np.random.default_rng(0)
  vectors = [rng.normal(size=4) for _ in range(5)]
  weights = jnp.asarray([1.0, 2.0, 3.0, 1.0, 1.0])
  agg = kuramoto(0.05)
  out, _ = agg.apply(_stack(vectors), weights, agg.init(None), None, None)
  neg, _ = agg.apply(_stack([-v for v in vectors]), weights, agg.init(None), None, None)
  np.testing.assert_allclose(_flat(neg), -_flat(out), rtol=1e-5, atol=1e-7)


def test_guards_zero_norm_and_absent_clients():
  vectors = [np.zeros(4), np.array([1.0, 0.0, 0.0, 0.0]), np.array([0.5, 1.0, 0.0, 0.0]),
             np.array([0.0, 0.0, 0.0, 9.0])]
  weights = jnp.asarray([1.0, 1.0, 1.0, 0.0])  # client 3 absent
  rho, theta, _ = kuramoto_weights(_stack(vectors), weights)
  assert np.all(np.isfinite(rho)) and float(theta[0]) == 0.0
  assert float(rho[3]) == 0.0 and float(theta[3]) == 0.0
  # Dropping the absent client changes nothing.
  rho3, _, _ = kuramoto_weights(_stack(vectors[:3]), weights[:3])
  np.testing.assert_allclose(rho[:3], rho3, rtol=1e-6)


def test_kappa_schedule_and_per_client_metrics():
  rng = np.random.default_rng(1)
  agg = kuramoto(kappa=0.2, decay=0.5)
  state = agg.init(None, 5)
  ids = jnp.asarray([4, 1, 2], jnp.int32)
  apply = jax.jit(agg.apply)
  for t in range(3):
    vectors = [rng.normal(size=4) + 1.0 for _ in range(3)]
    _, state = apply(_stack(vectors), jnp.ones(3), state, None, ids)
    np.testing.assert_allclose(float(state.metrics['kappa']), 0.2 * 0.5 ** t, rtol=1e-6)
  rho, _, _ = oracle_weights(vectors, np.ones(3))  # |ρ| ≫ 1: rounding is amplified
  np.testing.assert_allclose(state.metrics['rho'][np.asarray(ids)], rho, rtol=1e-3)
  assert float(state.metrics['rho'][0]) == 0.0  # never participated
  with pytest.raises(ValueError, match='kappa'):
    kuramoto(kappa=0.0)
  with pytest.raises(ValueError, match='decay'):
    kuramoto(decay=1.5)


@pytest.mark.parametrize('clamp', [1e3, 0.05])
def test_released_code_rule_matches_model_space_oracle(clamp):
  rng = np.random.default_rng(2)
  w = rng.normal(size=4)
  u = rng.normal(size=(4, 4)) * np.array([[1.0], [0.5], [2.0], [0.1]])
  weights = np.array([1.0, 2.0, 0.0, 3.0])  # client 2 absent
  scale, coupling = 0.7, 0.3
  present = weights > 0
  p = weights / weights.sum()
  models = w - u
  w_avg = p @ models
  phi = scale * np.linalg.norm(u, axis=1)
  idx = np.flatnonzero(present)
  s = np.zeros(4)
  for i in idx:
    for j in idx:
      if i != j:
        s += np.cos(phi[j] - phi[i]) * (models[j] - w_avg)
  s = np.clip(s / (len(idx) - 1), -clamp, clamp)
  expected_pseudo_gradient = w - (w_avg + coupling * s)
  agg = kuramoto_code(coupling, clamp=clamp, phase_scale=scale)
  out, _ = jax.jit(agg.apply)(_stack(list(u)), jnp.asarray(weights), agg.init(None), None, None)
  np.testing.assert_allclose(_flat(out), expected_pseudo_gradient, rtol=1e-5, atol=1e-6)
