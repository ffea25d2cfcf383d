"""SCAFFOLD against a hand computation on a quadratic, and modified SCAFFOLD ≡ FedAvg."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sync.aggregators import mean
from fedjax_sync.algorithms import fed_avg, scaffold, scaffold_modified
from fedjax_sync.algorithms.scaffold import effective_steps
from fedjax_sync.data.batching import client_batch_from_arrays
from tests.helpers import softmax_loss

D = 3


def quadratic_loss(params, batch, key):
  """`½‖w − x_b‖²` per example; its batch-mean gradient is `w − mean_b x_b`."""
  del key
  return 0.5 * jnp.sum(jnp.square(params['w'][None, :] - batch['x']), axis=1)


def _client_data(seed, sizes):
  rng = np.random.default_rng(seed)
  return [{'x': rng.normal(size=(n, D)).astype(np.float32) + i} for i, n in enumerate(sizes)]


def _batch(examples, ids, batch_size=2):
  batch = client_batch_from_arrays(examples, batch_size)
  return batch._replace(client_ids=jnp.asarray(ids, jnp.int32))


def _hand_scaffold(w, c, c_i, x, lr, batch_size, option):
  """One client of Algorithm 1 (arXiv 1910.06378) by hand, in float64."""
  y = w.copy()
  steps = [x[s:s + batch_size] for s in range(0, len(x), batch_size)]
  for b in steps:
    y = y - lr * ((y - b.mean(0)) - c_i + c)
  if option == 'II':
    new_c_i = c_i - c + (w - y) / (len(steps) * lr)
  else:
    new_c_i = w - x.mean(0)
  return y, new_c_i


@pytest.mark.parametrize('option', ['II', 'I'])
def test_control_variates_match_hand_computation(option):
  n_pop, lr, eta_g = 3, 0.3, 0.8
  algorithm = scaffold(quadratic_loss, lr, num_clients=n_pop, server_learning_rate=eta_g,
                       option=option)
  w = np.array([0.5, -1.0, 2.0])
  state = algorithm.init({'w': jnp.asarray(w, jnp.float32)})
  c, cs = np.zeros(D), np.zeros((n_pop, D))
  step = jax.jit(algorithm.round)
  # Round 1: clients 0 and 2 (sizes 3 and 4); round 2: clients 2 and 1, so client 2
  # starts with its own c_2 ≠ c, client 1 with c_1 = 0.
  for r, (ids, sizes) in enumerate((([0, 2], (3, 4)), ([2, 1], (5, 2)))):
    examples = _client_data(r, sizes)
    state, _ = step(state, _batch(examples, ids), jax.random.key(r))
    ys, dcs = [], []
    for cid, ex in zip(ids, examples):
      y, new_ci = _hand_scaffold(w, c, cs[cid], ex['x'].astype(np.float64), lr, 2, option)
      ys.append(y)
      dcs.append(new_ci - cs[cid])
      cs[cid] = new_ci
    w = w + eta_g * np.mean([y - w for y in ys], axis=0)
    c = c + len(ids) / n_pop * np.mean(dcs, axis=0)
    np.testing.assert_allclose(state.params['w'], w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.extra.control['w'], c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.client_states['w'], cs, rtol=1e-5, atol=1e-5)
  assert np.abs(c).max() > 0.1  # the control variates did move


def test_modified_scaffold_trajectory_equals_fedavg():
  """c_i reset to c makes the correction c − c_i exactly zero: plain local SGD."""
  lr, eta_g, n_pop = 0.2, 0.7, 5
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(4, 3)) * 0.1, jnp.float32),
            'b': jnp.zeros((3,), jnp.float32)}
  modified = scaffold_modified(softmax_loss, lr, num_clients=n_pop, server_learning_rate=eta_g)
  baseline = fed_avg(softmax_loss, optax.sgd(lr), server_optimizer=optax.sgd(eta_g),
                     aggregator=mean())
  s_mod, s_avg = modified.init(params), baseline.init(params)
  step_mod, step_avg = jax.jit(modified.round), jax.jit(baseline.round)
  for r in range(3):
    ex = []
    for n in (5, 7, 3):
      x = rng.normal(size=(n, 4)).astype(np.float32)
      ex.append({'x': x, 'y': rng.integers(0, 3, n).astype(np.int32)})
    batch = _batch(ex, rng.choice(n_pop, 3, replace=False), batch_size=3)
    key = jax.random.key(r)
    s_mod, _ = step_mod(s_mod, batch, key)
    s_avg, _ = step_avg(s_avg, batch, key)
    chex.assert_trees_all_close(s_mod.params, s_avg.params, rtol=1e-7, atol=1e-7)
  # The server control variate moved, yet never reached the model.
  assert float(jnp.max(jnp.abs(s_mod.extra.control['w']))) > 0


def test_scaffold_differs_from_fedavg_once_controls_are_nonzero():
  # (On a quadratic with one shared Hessian and full participation the corrections
  # cancel in the average exactly, so a nonlinear loss is needed here.)
  lr, n_pop = 0.5, 2
  alg = scaffold(softmax_loss, lr, num_clients=n_pop)
  avg = fed_avg(softmax_loss, optax.sgd(lr), aggregator=mean())
  rng = np.random.default_rng(0)
  p = {'w': jnp.zeros((4, 3), jnp.float32), 'b': jnp.zeros((3,), jnp.float32)}
  s1, s2 = alg.init(p), avg.init(p)
  ex = [{'x': rng.normal(size=(6, 4)).astype(np.float32) + 2 * k,
         'y': np.full((6,), k, np.int32)} for k in range(2)]
  batch = _batch(ex, [0, 1], batch_size=2)
  step1, step2 = jax.jit(alg.round), jax.jit(avg.round)
  for r in range(2):
    s1, _ = step1(s1, batch, jax.random.key(r))
    s2, _ = step2(s2, batch, jax.random.key(r))
  assert float(jnp.max(jnp.abs(s1.params['w'] - s2.params['w']))) > 1e-3


@pytest.mark.parametrize('momentum', [0.0, 0.5, 0.9])
def test_effective_steps_is_the_displacement_of_momentum_sgd(momentum):
  opt = optax.sgd(1.0, momentum=momentum or None)
  p = jnp.zeros(())
  s = opt.init(p)
  for _ in range(7):
    u, s = opt.update(jnp.ones(()), s, p)
    p = p + u
  np.testing.assert_allclose(-float(p), float(effective_steps(jnp.asarray(7), momentum)), rtol=1e-5)


def test_scaffold_validates_its_arguments():
  with pytest.raises(ValueError, match='option'):
    scaffold(quadratic_loss, 0.1, num_clients=3, option='III')
  with pytest.raises(ValueError, match='num_clients'):
    scaffold(quadratic_loss, 0.1, num_clients=0)
  with pytest.raises(ValueError, match='learning rate'):
    scaffold(quadratic_loss, -0.1, num_clients=3)
