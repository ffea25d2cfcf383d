"""Oracle tests of the FedAvg family against centralized computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync.data import client_batch_from_arrays, dirichlet_partition
from tests.helpers import classification_data, init_params, numpy_softmax_grad, softmax_loss


def _split(x, y, num_clients=4, alpha=0.5, seed=3):
  parts = dirichlet_partition(y, num_clients, alpha, seed, min_size=2)
  sizes = [len(p) for p in parts]
  assert len(set(sizes)) > 1, 'the split must have unequal client sizes'
  return parts


def test_weighted_fedsgd_equals_full_batch_gradient_step_float64():
  with jax.enable_x64(True):
    x, y = classification_data()
    parts = _split(x, y)
    batch = client_batch_from_arrays([{'x': x[p], 'y': y[p]} for p in parts], batch_size=7)
    params = init_params()
    lr = 0.5
    algorithm = fs.fed_sgd(softmax_loss, server_learning_rate=lr)
    state, _ = jax.jit(algorithm.round)(algorithm.init(params), batch, jax.random.key(0))
    grad = numpy_softmax_grad(params, x, y)
    for name in ('w', 'b'):
      expected = np.asarray(params[name]) - lr * grad[name]
      np.testing.assert_allclose(np.asarray(state.params[name]), expected, rtol=0, atol=1e-10)
    assert state.params['w'].dtype == jnp.float64


def test_unweighted_fedsgd_differs_from_centralized_on_unequal_clients():
  with jax.enable_x64(True):
    x, y = classification_data()
    parts = _split(x, y)
    batch = client_batch_from_arrays([{'x': x[p], 'y': y[p]} for p in parts], batch_size=7)
    params = init_params()
    algorithm = fs.fed_sgd(softmax_loss, server_learning_rate=0.5, aggregator=fs.mean())
    state, _ = algorithm.round(algorithm.init(params), batch, jax.random.key(0))
    expected = np.asarray(params['w']) - 0.5 * numpy_softmax_grad(params, x, y)['w']
    assert np.max(np.abs(np.asarray(state.params['w']) - expected)) > 1e-4


def test_fedavg_one_client_one_step_equals_centralized_sgd_step():
  with jax.enable_x64(True):
    x, y = classification_data(n=16)
    batch = client_batch_from_arrays([{'x': x, 'y': y}], batch_size=16)
    params = init_params()
    lr = 0.3
    algorithm = fs.fed_avg(softmax_loss, optax.sgd(lr))
    state, metrics = algorithm.round(algorithm.init(params), batch, jax.random.key(0))
    grad = numpy_softmax_grad(params, x, y)
    for name in ('w', 'b'):
      np.testing.assert_allclose(np.asarray(state.params[name]),
                                 np.asarray(params[name]) - lr * grad[name], atol=1e-12)
    assert int(metrics['num_participants']) == 1


def test_fedavg_is_example_weighted_mean_of_local_models():
  with jax.enable_x64(True):
    x, y = classification_data(n=60)
    parts = _split(x, y, num_clients=3)
    batch = client_batch_from_arrays([{'x': x[p], 'y': y[p]} for p in parts], batch_size=64)
    params = init_params()
    lr = 0.2
    algorithm = fs.fed_avg(softmax_loss, optax.sgd(lr))
    state, _ = algorithm.round(algorithm.init(params), batch, jax.random.key(0))
    # One full-batch local step per client; server averages local models by n_k.
    local = [np.asarray(params['w']) - lr * numpy_softmax_grad(params, x[p], y[p])['w'] for p in parts]
    n = np.array([len(p) for p in parts], np.float64)
    expected = sum(nk * w for nk, w in zip(n, local)) / n.sum()
    np.testing.assert_allclose(np.asarray(state.params['w']), expected, atol=1e-12)


def _quadratic_loss(params, batch, key):
  del key
  return 0.5 * jnp.sum((batch['x'] @ params['theta'] - batch['y']) ** 2, axis=-1)


def test_fedprox_adds_proximal_gradient_on_every_step():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3))
    yv = rng.normal(size=(4, 2))
    batch = client_batch_from_arrays([{'x': x, 'y': yv}], batch_size=2)  # 2 steps of 2
    theta0 = jnp.asarray(rng.normal(size=(3, 2)))
    lr, mu = 0.1, 0.7
    algorithm = fs.fed_prox(_quadratic_loss, optax.sgd(lr), mu=mu)
    state, _ = algorithm.round(algorithm.init({'theta': theta0}), batch, jax.random.key(0))
    theta = np.asarray(theta0)
    for s in range(2):
      xb, yb = x[2 * s:2 * s + 2], yv[2 * s:2 * s + 2]
      grad = xb.T @ (xb @ theta - yb) / 2 + mu * (theta - np.asarray(theta0))
      theta = theta - lr * grad
    np.testing.assert_allclose(np.asarray(state.params['theta']), theta, atol=1e-12)


@pytest.mark.parametrize('rule', ['adam', 'yogi', 'adagrad'])
def test_server_adaptive_matches_reddi_algorithm_2(rule):
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    tx = fs.algorithms.server_adaptive(rule, lr, b1, b2, tau)
    w = np.zeros(4)
    state = tx.init(jnp.asarray(w))
    m, v = np.zeros(4), np.full(4, tau ** 2)
    w_ref = w.copy()
    for _ in range(3):
      delta = rng.normal(size=4)
      updates, state = tx.update(jnp.asarray(-delta), state)   # pseudo-gradient = −Δ
      w = w + np.asarray(updates)  # optax.apply_updates: params + updates
      m = b1 * m + (1 - b1) * delta
      if rule == 'adagrad':
        v = v + delta ** 2
      elif rule == 'yogi':
        v = v - (1 - b2) * delta ** 2 * np.sign(v - delta ** 2)
      else:
        v = b2 * v + (1 - b2) * delta ** 2
      w_ref = w_ref + lr * m / (np.sqrt(v) + tau)
      np.testing.assert_allclose(w, w_ref, rtol=1e-12, atol=1e-14)


def test_fedavgm_matches_heavy_ball_on_mean_update():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    x, yv = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    batch = client_batch_from_arrays([{'x': x, 'y': yv}], batch_size=6)
    theta0 = rng.normal(size=(3, 2))
    lr, beta, server_lr = 0.1, 0.5, 0.8
    algorithm = fs.fed_avg_m(_quadratic_loss, optax.sgd(lr), server_learning_rate=server_lr,
                             server_momentum=beta)
    state = algorithm.init({'theta': jnp.asarray(theta0)})
    theta, velocity = theta0.copy(), np.zeros_like(theta0)
    for r in range(3):
      state, _ = algorithm.round(state, batch, jax.random.key(r))
      local = theta - lr * x.T @ (x @ theta - yv) / 6
      velocity = beta * velocity + (theta - local)      # v ← β v + pseudo-gradient
      theta = theta - server_lr * velocity
      np.testing.assert_allclose(np.asarray(state.params['theta']), theta, atol=1e-12)
