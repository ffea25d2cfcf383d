"""SAM / SAGM local steps against hand computations on a quadratic, and sharpness."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sync.algorithms import fed_avg, fed_sam, sharpness
from fedjax_sync.clients.local import make_local_step
from fedjax_sync.clients.sam import sagm, sam
from fedjax_sync.data.batching import client_batch_from_arrays

H = np.array([3.0, 1.0, 0.25])  # a diagonal, non-isotropic Hessian


def quadratic_loss(params, batch, key):
  """`½ Σ_i h_i (v_i − x_{b,i})²` per example; batch-mean gradient `H (v − x̄)`."""
  del key
  return 0.5 * jnp.sum(jnp.asarray(H, jnp.float32)[None] * jnp.square(params['v'][None] - batch['x']), 1)


def _setup():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 3)).astype(np.float32)
  mask = np.array([True, True, True, False])  # the padded row must not count
  v = np.array([1.0, -2.0, 0.5])
  return x, mask, v


def _step(optimizer, v, x, mask):
  step = jax.jit(make_local_step(quadratic_loss, optimizer))
  params = {'v': jnp.asarray(v, jnp.float32)}
  new, _, metrics = step(params, optimizer.init(params), {'x': jnp.asarray(x)}, jnp.asarray(mask),
                         jax.random.key(0))
  return np.asarray(new['v'], np.float64), metrics


def test_sam_step_matches_hand_computation():
  x, mask, v = _setup()
  lr, rho = 0.1, 0.3
  xbar = x[mask].astype(np.float64).mean(0)
  g = H * (v - xbar)
  eps = rho * g / np.linalg.norm(g)
  expected = v - lr * H * (v + eps - xbar)
  got, metrics = _step(sam(optax.sgd(lr), rho), v, x, mask)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  plain, _ = _step(optax.sgd(lr), v, x, mask)
  assert np.max(np.abs(got - plain)) > 1e-3  # the perturbation mattered
  assert float(metrics.num_examples) == 3


def test_sagm_step_matches_hand_computation():
  x, mask, v = _setup()
  lr, rho, alpha = 0.1, 0.3, 0.05
  xbar = x[mask].astype(np.float64).mean(0)
  g1 = H * (v - xbar)
  v2 = v + (rho / np.linalg.norm(g1) - alpha) * g1
  g2 = H * (v2 - xbar)
  expected = v - lr * 0.5 * (g1 + g2)
  got, _ = _step(sagm(optax.sgd(lr), rho, alpha), v, x, mask)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_sam_wraps_a_stateful_base_optimizer():
  x, mask, v = _setup()
  lr, rho, beta = 0.1, 0.3, 0.9
  opt = sam(optax.sgd(lr, momentum=beta), rho)
  step = jax.jit(make_local_step(quadratic_loss, opt))
  params = {'v': jnp.asarray(v, jnp.float32)}
  state = opt.init(params)
  xbar = x[mask].astype(np.float64).mean(0)
  ref_v, trace = v.copy(), np.zeros(3)
  for _ in range(3):
    params, state, _ = step(params, state, {'x': jnp.asarray(x)}, jnp.asarray(mask),
                            jax.random.key(0))
    g = H * (ref_v - xbar)
    sharp = H * (ref_v + rho * g / np.linalg.norm(g) - xbar)
    trace = beta * trace + sharp
    ref_v = ref_v - lr * trace
  np.testing.assert_allclose(params['v'], ref_v, rtol=1e-5)


def test_sam_needs_grad_fn_and_valid_radius():
  opt = sam(optax.sgd(0.1), 0.05)
  p = {'v': jnp.zeros(3)}
  with pytest.raises(ValueError, match='grad_fn'):
    opt.update(p, opt.init(p), p)
  with pytest.raises(ValueError, match='rho'):
    sam(optax.sgd(0.1), -1.0)
  with pytest.raises(ValueError, match='alpha'):
    sagm(optax.sgd(0.1), 0.05, -0.1)


def test_fedsam_with_zero_radius_is_fedavg():
  rng = np.random.default_rng(1)
  ex = [{'x': rng.normal(size=(n, 3)).astype(np.float32)} for n in (5, 3)]
  batch = client_batch_from_arrays(ex, 2)
  params = {'v': jnp.zeros((3,), jnp.float32)}
  a, b = fed_sam(quadratic_loss, optax.sgd(0.1), rho=0.0), fed_avg(quadratic_loss, optax.sgd(0.1))
  sa, _ = jax.jit(a.round)(a.init(params), batch, jax.random.key(0))
  sb, _ = jax.jit(b.round)(b.init(params), batch, jax.random.key(0))
  np.testing.assert_allclose(sa.params['v'], sb.params['v'], rtol=1e-6, atol=1e-7)


def test_sharpness_first_order_closed_form():
  x, mask, v = _setup()
  rho = 0.2
  xbar_loss = lambda w: np.mean(0.5 * np.sum(H * (w - x[mask].astype(np.float64)) ** 2, 1))
  g = H * (v - x[mask].astype(np.float64).mean(0))
  expected = xbar_loss(v + rho * g / np.linalg.norm(g)) - xbar_loss(v)
  got = jax.jit(lambda p: sharpness(quadratic_loss, p, {'x': jnp.asarray(x)}, rho,
                                    mask=jnp.asarray(mask)))({'v': jnp.asarray(v, jnp.float32)})
  np.testing.assert_allclose(float(got), expected, rtol=1e-4)
  # For a quadratic: ρ‖g‖ + ½ρ² ĝᵀHĝ exactly.
  u = g / np.linalg.norm(g)
  np.testing.assert_allclose(expected, rho * np.linalg.norm(g) + 0.5 * rho ** 2 * u @ (H * u))
  with pytest.raises(ValueError, match='rho'):
    sharpness(quadratic_loss, {'v': jnp.zeros(3)}, {'x': jnp.asarray(x)}, 0.0)
