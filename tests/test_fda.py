"""FDA: estimator oracles and invariants, sync rules, equality with FedAvg, sharding."""

import importlib
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync.algorithms import fda_estimators as est
from fedjax_sync.data.batching import to_device
from fedjax_sync.data.registry import load_dataset
from fedjax_sync.simulate import averaging

# The package exports the function `fda`, which shadows the module attribute.
fda_lib = importlib.import_module('fedjax_sync.algorithms.fda')

K = 4
BATCH = 8


@pytest.fixture(scope='module')
def setup():
  data = load_dataset('synthetic', num_clients=K, seed=0)
  model = fs.models.logistic_regression((60,), 10)
  params = model.init(jax.random.key(0))
  return data, model, params


def _drifts(rng, k=6, common=0.0):
  """Random stacked drifts `[k, ...]` over two leaves, with an optional shared part."""
  shared = {'a': rng.normal(size=(1, 7, 3)), 'b': rng.normal(size=(1, 11))}
  return {name: jnp.asarray(rng.normal(size=(k,) + s.shape[1:]) + common * s, jnp.float32)
          for name, s in shared.items()}


def _flat(drifts):
  return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1)
                         for x in jax.tree.leaves(drifts)], axis=1)


def _estimate(estimator, drifts, state=None):
  one = jax.tree.map(lambda x: x[0], drifts)
  state = estimator.init(one) if state is None else state
  local = jax.vmap(estimator.local_state, in_axes=(0, None))(drifts, state)
  return float(estimator.estimate(local, state))


def test_variance_identity():
  rng = np.random.default_rng(0)
  drifts = _drifts(rng, common=2.0)
  u = _flat(drifts)
  identity = np.mean(np.sum(u ** 2, 1)) - np.sum(u.mean(0) ** 2)
  direct = np.mean(np.sum((u - u.mean(0)) ** 2, 1))
  np.testing.assert_allclose(identity, direct, rtol=1e-10)
  np.testing.assert_allclose(float(est.true_variance(drifts)), direct, rtol=1e-5)


def test_estimators_match_hand_formulas():
  rng = np.random.default_rng(1)
  drifts = _drifts(rng, common=1.0)
  u = _flat(drifts)
  sq = np.sum(u ** 2, 1)
  np.testing.assert_allclose(_estimate(est.naive(), drifts), sq.mean(), rtol=1e-5)
  # Per-layer: max over leaves of (d / d_l) · mean_k ‖u_k^(l)‖².
  a, b = u[:, :21], u[:, 21:]
  per_layer = max(32 / 21 * np.mean(np.sum(a ** 2, 1)), 32 / 11 * np.mean(np.sum(b ** 2, 1)))
  np.testing.assert_allclose(_estimate(est.naive_per_layer(), drifts), per_layer, rtol=1e-5)
  linear = est.linear(seed=3)
  state = linear.init(jax.tree.map(lambda x: x[0], drifts))
  xi = _flat(jax.tree.map(lambda x: x[None], state.xi))[0]
  np.testing.assert_allclose(np.linalg.norm(xi), 1.0, rtol=1e-5)
  np.testing.assert_allclose(_estimate(linear, drifts, state),
                             sq.mean() - np.mean(u @ xi) ** 2, rtol=1e-5)


def test_linear_direction_follows_last_sync():
  linear = est.linear()
  old = {'a': jnp.zeros((3,)), 'b': jnp.ones((2,))}
  new = {'a': jnp.asarray([3.0, 0.0, 0.0]), 'b': jnp.asarray([1.0, 5.0])}
  state = linear.update(linear.init(old), old, new)
  chex.assert_trees_all_close(state.xi, {'a': jnp.asarray([0.6, 0.0, 0.0]),
                                         'b': jnp.asarray([0.0, 0.8])}, atol=1e-6)
  # A sync that does not move w0 keeps the previous direction.
  chex.assert_trees_all_close(linear.update(state, new, new).xi, state.xi)


@pytest.mark.parametrize('name', ['naive', 'naive_per_layer', 'linear'])
@pytest.mark.parametrize('common', [0.0, 1.0, 10.0])
def test_deterministic_estimators_overestimate(name, common):
  rng = np.random.default_rng(2)
  estimator = est.get_estimator(name)
  for _ in range(20):
    drifts = _drifts(rng, common=common)
    assert _estimate(estimator, drifts) >= float(est.true_variance(drifts)) * (1 - 1e-5)


def test_sketch_overestimates_with_high_probability():
  # Worst case for the sketch: the workers drift together, so ‖ū‖² ≈ mean ‖u_k‖²
  # and Est ≥ Var hinges on M2/(1+ε) ≤ ‖ū‖². With depth 5, width 250 (ε ≈ 0.063)
  # the median of 5 rows overshoots 1+ε with probability ≈ 0.09, so expect ≈ 91%.
  d, k, trials = 2000, 5, 200
  sketch = est.sketch(seed=1)
  state = sketch.init({'w': jnp.zeros((d,))})
  rng = np.random.default_rng(3)
  common = rng.normal(size=(trials, 1, d))
  drifts = jnp.asarray(common + 0.05 * rng.normal(size=(trials, k, d)), jnp.float32)
  def one(u):
    local = jax.vmap(sketch.local_state, in_axes=(0, None))({'w': u}, state)
    return sketch.estimate(local, state), est.true_variance({'w': u})
  estimates, variances = jax.jit(jax.vmap(one))(drifts)
  rate = float(np.mean(np.asarray(estimates) >= np.asarray(variances)))
  assert rate >= 0.85, rate
  # Independent drifts: Est − Var = ‖ū‖² − M2/(1+ε) again, so the same rate; and
  # the relative slack stays small since ‖ū‖² ≈ Var/(K − 1) here.
  drifts = jnp.asarray(rng.normal(size=(trials, k, d)), jnp.float32)
  estimates, variances = map(np.asarray, jax.jit(jax.vmap(one))(drifts))
  assert np.mean(estimates >= variances) >= 0.85
  assert np.all(estimates >= 0.9 * variances)


def test_sketch_simulation_shortcut_equals_protocol():
  rng = np.random.default_rng(5)
  sketch = est.sketch(seed=2)
  for common in (0.0, 3.0):
    drifts = _drifts(rng, k=5, common=common)
    state = sketch.init(jax.tree.map(lambda x: x[0], drifts))
    np.testing.assert_allclose(float(sketch.estimate_from_drifts(drifts, state)),
                               _estimate(sketch, drifts, state), rtol=1e-4)


def test_sketch_is_linear_and_matches_numpy():
  d = 1234
  hashes = est.ams_sketch_init(d, depth=5, width=250, seed=0)
  assert hashes.positions.shape == (5, 250, 5)
  # Every row's hash is a permutation of the padded coordinates.
  for r in range(5):
    np.testing.assert_array_equal(np.sort(np.asarray(hashes.positions[r]).ravel()),
                                  np.arange(1250))
  rng = np.random.default_rng(4)
  vectors = jnp.asarray(rng.normal(size=(6, d)), jnp.float32)
  sketches = jax.vmap(lambda v: est.ams_sketch(v, hashes))(vectors)
  chex.assert_trees_all_close(est.ams_sketch(vectors.mean(0), hashes), sketches.mean(0),
                              atol=1e-4)
  chex.assert_trees_all_close(est.ams_sketch(2.5 * vectors[0] - vectors[1], hashes),
                              2.5 * sketches[0] - sketches[1], atol=1e-4)
  # Oracle: S[r, c] = Σ_j sign[r, c, j] · x_pad[position[r, c, j]].
  x = np.concatenate([np.asarray(vectors[0], np.float64), np.zeros(1250 - d)])
  oracle = np.sum(x[np.asarray(hashes.positions)] * np.asarray(hashes.signs), axis=2)
  np.testing.assert_allclose(np.asarray(sketches[0]), oracle, rtol=1e-4, atol=1e-4)
  m2 = float(est.sketch_second_moment(sketches[0]))
  np.testing.assert_allclose(m2, np.median(np.sum(oracle ** 2, 1)), rtol=1e-4)


def _run_steps(algorithm, data, params, num_steps, *, seed=0, mesh=None):
  from jax.sharding import NamedSharding, PartitionSpec as P
  device_data = to_device(data, NamedSharding(mesh, P()) if mesh is not None else None)
  block = averaging.make_block(algorithm, BATCH)
  return block(algorithm.init(params), jnp.zeros((), jnp.int32), jax.random.key(seed),
               device_data, jnp.arange(K, dtype=jnp.int32), num_steps)


def test_theta_zero_equals_fedavg_one_step_rounds(setup):
  data, model, params = setup
  lr, steps = 0.3, 4
  algorithm = fda_lib.fda(model.loss, optax.sgd(lr), num_workers=K, threshold=0.0,
                          estimator='naive')
  state, metrics = _run_steps(algorithm, data, params, steps)
  assert np.all(np.asarray(metrics['synced']))
  assert int(state.num_syncs) == steps
  # FedAvg, one local step per round, all K clients, unweighted mean, same batches.
  fed = fs.fed_avg(model.loss, optax.sgd(lr), aggregator=fs.mean())
  fed_state, fed_round = fed.init(params), jax.jit(fed.round)
  device_data = to_device(data)
  ids = jnp.arange(K, dtype=jnp.int32)
  for t in range(steps):
    batch_key, train_key = jax.random.split(jax.random.fold_in(jax.random.key(0), t))
    batch, mask = averaging.sample_worker_batches(batch_key, device_data, ids, BATCH)
    client_batch = fs.ClientBatch(data=jax.tree.map(lambda x: x[:, None], batch),
                                  mask=mask[:, None], client_ids=ids,
                                  weight=jnp.ones((K,), jnp.float32))
    fed_state, _ = fed_round(fed_state, client_batch, train_key)
  chex.assert_trees_all_close(state.anchor, fed_state.params, atol=1e-5)
  chex.assert_trees_all_close(state.params, jax.tree.map(
      lambda x: jnp.broadcast_to(x, (K,) + x.shape), fed_state.params), atol=1e-5)


def test_theta_infinite_never_syncs_then_drift_weighted_period(setup):
  data, model, params = setup
  optimizer = optax.sgd(0.02, momentum=0.9)
  never = fda_lib.fda(model.loss, optimizer, num_workers=K, threshold=math.inf,
                      estimator='linear')
  pre, metrics = _run_steps(never, data, params, 3)
  assert not np.any(np.asarray(metrics['synced'])) and int(pre.num_syncs) == 0
  chex.assert_trees_all_close(pre.anchor, params)
  # Est ≥ true variance at every step (linear is deterministically conservative).
  assert np.all(np.asarray(metrics['estimate']) >= np.asarray(metrics['variance']) * (1 - 1e-5))
  # Worker 2 equals plain local training on its own batches.
  step = jax.jit(fs.make_local_step(model.loss, optimizer))
  device_data = to_device(data)
  p, o = params, optimizer.init(params)
  for t in range(3):
    batch_key, _ = jax.random.split(jax.random.fold_in(jax.random.key(0), t))
    batch, mask = averaging.sample_worker_batches(batch_key, device_data,
                                                jnp.arange(K, dtype=jnp.int32), BATCH)
    p, o, _ = step(p, o, jax.tree.map(lambda x: x[2], batch), mask[2], jax.random.key(0))
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[2], pre.params), p, atol=1e-5)

  # Fixed period τ = 3 with drift weighting: the first sync is after step 3 and
  # averages the same three-step models with weights ∝ ‖u_k‖².
  periodic = fda_lib.local_sgd(model.loss, optimizer, num_workers=K, period=3,
                               weighting='drift')
  state, metrics = _run_steps(periodic, data, params, 3)
  np.testing.assert_array_equal(np.asarray(metrics['synced']), [False, False, True])
  u = jax.tree.map(lambda w, a: w - a[None], pre.params, params)
  sq = np.asarray(fs.tree.client_sq_norms(u), np.float64)
  expected = fs.tree.client_weighted_sum(pre.params, jnp.asarray(sq / sq.sum(), jnp.float32))
  chex.assert_trees_all_close(state.anchor, expected, atol=1e-5)
  chex.assert_trees_all_close(state.params, jax.tree.map(
      lambda x: jnp.broadcast_to(x, (K,) + x.shape), expected), atol=1e-5)
  # Workers keep their momentum traces across the synchronization.
  chex.assert_trees_all_close(state.opt_state, pre.opt_state)


def test_sharded_over_four_devices_gives_same_decisions(setup):
  data, model, params = setup
  assert len(jax.devices()) == 4
  kwargs = dict(num_workers=K, threshold=0.1, estimator='sketch')
  single = fda_lib.fda(model.loss, optax.sgd(0.02), **kwargs)
  sharded = fda_lib.fda(model.loss, optax.sgd(0.02), execution=fs.ClientExecution(
      mesh=fs.client_mesh()), **kwargs)
  state_1, metrics_1 = _run_steps(single, data, params, 12)
  state_4, metrics_4 = _run_steps(sharded, data, params, 12, mesh=fs.client_mesh())
  synced = np.asarray(metrics_1['synced'])
  assert 0 < synced.sum() < 12  # the threshold makes real decisions
  np.testing.assert_array_equal(synced, np.asarray(metrics_4['synced']))
  chex.assert_trees_all_close(state_1.anchor, state_4.anchor, atol=1e-5)
  np.testing.assert_allclose(metrics_1['estimate'], metrics_4['estimate'], rtol=1e-4, atol=1e-6)
  # The simulation shortcut (one sketch of ū) makes the same decisions.
  shortcut = fda_lib.fda(model.loss, optax.sgd(0.02), simulation_shortcut=True, **kwargs)
  _, metrics_s = _run_steps(shortcut, data, params, 12)
  np.testing.assert_array_equal(synced, np.asarray(metrics_s['synced']))
  np.testing.assert_allclose(metrics_1['estimate'], metrics_s['estimate'], rtol=1e-4, atol=1e-6)


def test_run_averaging_bytes_and_no_retrace(setup):
  data, model, params = setup
  traces = []

  def counting_loss(p, batch, key):
    traces.append(1)
    return model.loss(p, batch, key)

  algorithm = fda_lib.fda(counting_loss, optax.sgd(0.3), num_workers=K, threshold=0.05,
                          estimator='linear')
  result = averaging.run_averaging(algorithm, model, data, num_steps=12, batch_size=BATCH,
                                 eval_every=4, params=params,
                                 evaluate=lambda p: {'test_accuracy': jnp.zeros(())})
  # Another Θ and seed reuse the compiled block.
  other = averaging.run_averaging(algorithm, model, data, num_steps=8, batch_size=BATCH,
                                eval_every=4, params=params, threshold=1e9, seed=3,
                                evaluate=lambda p: {'test_accuracy': jnp.zeros(())})
  assert len(traces) == 1   # one compilation served all five blocks
  assert int(other.state.num_syncs) == 0 and other.compile_seconds == 0.0
  syncs = int(result.state.num_syncs)
  assert syncs == int(np.sum(result.steps['synced']))
  last = result.history[-1]
  model_bytes = 2440
  assert last['bytes_up'] == 12 * K * 2 * 4 + syncs * K * model_bytes
  assert last['bytes_down'] == syncs * K * model_bytes
  assert [row['step'] for row in result.history] == [4, 8, 12]
  # A byte budget stops the run at the first evaluation point that reaches it.
  budget = averaging.run_averaging(algorithm, model, data, num_steps=12, batch_size=BATCH,
                                 eval_every=4, params=params, threshold=0.0,
                                 max_bytes=3 * K * model_bytes,
                                 evaluate=lambda p: {'test_accuracy': jnp.zeros(())})
  assert [row['step'] for row in budget.history] == [4]
  assert budget.history[-1]['bytes'] == 4 * K * 8 + 4 * 2 * K * model_bytes


@pytest.mark.parametrize('kwargs, match', [
    (dict(threshold=1.0), 'estimator'),
    (dict(estimator='naive', threshold=-1.0), 'threshold'),
    (dict(estimator='naive', threshold=1.0, period=3), 'either'),
    (dict(period=0), 'period'),
    (dict(estimator='bogus', threshold=1.0), 'valid: naive'),
    (dict(period=2, weighting='median'), 'weighting'),
])
def test_invalid_options_raise(kwargs, match):
  model = fs.models.logistic_regression((60,), 10)
  with pytest.raises(ValueError, match=match):
    fda_lib.dynamic_averaging(model.loss, optax.sgd(0.1), num_workers=K, **kwargs)
