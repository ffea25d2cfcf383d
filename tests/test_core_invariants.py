"""Invariants of the engine: padding, permutation, jit, sharding, recompilation, seeds."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.data import (LocalWork, make_client_batch, pad_clients, sample_clients,
                              to_device)
from fedjax_sync.types import ClientBatch

DATA = fs.synthetic(1.0, 1.0, num_clients=12, seed=4)
MODEL = fs.models.logistic_regression((60,), 10)
WORK = LocalWork(batch_size=8, steps=3)


def _batch(ids, key=0):
  counts = DATA.counts
  positive = counts[counts > 0]
  return make_client_batch(jax.random.key(key), to_device(DATA), jnp.asarray(ids, jnp.int32), WORK,
                           max_count=int(positive.max()))


def _params():
  return MODEL.init(jax.random.key(7))


def _round(algorithm, batch, key=1):
  state, metrics = jax.jit(algorithm.round)(algorithm.init(_params()), batch, jax.random.key(key))
  return state, metrics


def _close(a, b, atol=1e-6):
  chex.assert_trees_all_close(a, b, atol=atol, rtol=1e-5)


ALGORITHMS = {
    'fedavg': lambda **kw: fs.fed_avg(MODEL.loss, optax.sgd(0.05), **kw),
    'fedprox': lambda **kw: fs.fed_prox(MODEL.loss, optax.sgd(0.05), mu=0.1, **kw),
    'fedsgd': lambda **kw: fs.fed_sgd(MODEL.loss, **kw),
    'fedadam': lambda **kw: fs.fed_adam(MODEL.loss, optax.sgd(0.05), **kw),
}


@pytest.mark.parametrize('name', sorted(ALGORITHMS))
def test_zero_weight_client_changes_nothing(name):
  algorithm = ALGORITHMS[name]()
  batch = _batch([0, 3, 5])
  extra = _batch([0, 3, 5, 9])
  # Client 9 trains (mask True) but has weight 0: it must not move the model.
  extra = extra._replace(weight=extra.weight.at[3].set(0.0))
  s1, _ = _round(algorithm, batch)
  s2, m2 = _round(algorithm, extra)
  _close(s1.params, s2.params)
  assert int(m2['num_participants']) == 3


@pytest.mark.parametrize('name', sorted(ALGORITHMS))
def test_masked_examples_change_nothing(name):
  algorithm = ALGORITHMS[name]()
  batch = _batch([1, 2, 6])
  rng = np.random.default_rng(0)
  # Append 5 garbage example slots per step, all masked out.
  def widen(x):
    junk = rng.normal(size=x.shape[:2] + (5,) + x.shape[3:]) * 100
    return jnp.concatenate([x, jnp.asarray(junk, x.dtype)], axis=2)
  wide = ClientBatch(data={'x': widen(batch.data['x']),
                           'y': jnp.concatenate([batch.data['y'], jnp.zeros(batch.mask.shape[:2] + (5,), jnp.int32)], 2)},
                     mask=jnp.concatenate([batch.mask, jnp.zeros(batch.mask.shape[:2] + (5,), bool)], 2),
                     client_ids=batch.client_ids, weight=batch.weight)
  s1, m1 = _round(algorithm, batch)
  s2, m2 = _round(algorithm, wide)
  _close(s1.params, s2.params)
  np.testing.assert_allclose(m1['train_loss'], m2['train_loss'], rtol=1e-5)


def test_fully_masked_step_leaves_momentum_optimizer_untouched():
  step = fs.make_local_step(MODEL.loss, optax.chain(optax.add_decayed_weights(0.1),
                                                    optax.sgd(0.1, momentum=0.9)))
  params = _params()
  opt = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9)).init(params)
  batch = {'x': jnp.ones((4, 60)), 'y': jnp.zeros((4,), jnp.int32)}
  new_params, new_opt, metrics = step(params, opt, batch, jnp.zeros((4,), bool), jax.random.key(0))
  chex.assert_trees_all_equal(new_params, params)
  chex.assert_trees_all_equal(new_opt, opt)
  assert float(metrics.num_examples) == 0


@pytest.mark.parametrize('name', sorted(ALGORITHMS))
def test_permuting_clients_changes_nothing(name):
  algorithm = ALGORITHMS[name]()
  ids = [0, 4, 7, 11]
  perm = [2, 0, 3, 1]
  batch = _batch(ids)
  permuted = jax.tree.map(lambda x: x[jnp.asarray(perm)], batch)
  s1, _ = _round(algorithm, batch)
  s2, _ = _round(algorithm, permuted)
  _close(s1.params, s2.params)


def test_client_batches_do_not_depend_on_position():
  a = _batch([3, 7])
  b = _batch([7, 3])
  np.testing.assert_array_equal(a.data['x'][1], b.data['x'][0])
  np.testing.assert_array_equal(a.mask[0], b.mask[1])


@pytest.mark.parametrize('name', sorted(ALGORITHMS))
def test_jit_equals_no_jit(name):
  algorithm = ALGORITHMS[name]()
  batch = _batch([1, 5, 8])
  state = algorithm.init(_params())
  s1, m1 = jax.jit(algorithm.round)(state, batch, jax.random.key(3))
  s2, m2 = algorithm.round(state, batch, jax.random.key(3))
  _close(s1.params, s2.params)
  np.testing.assert_allclose(m1['train_loss'], m2['train_loss'], rtol=1e-5)


@pytest.mark.parametrize('strategy,chunk', [('vmap', None), ('chunked', 2), ('sequential', None)])
def test_execution_strategies_and_sharding_agree(strategy, chunk):
  assert len(jax.devices()) == 4, 'conftest sets 4 simulated CPU devices'
  batch = _batch([0, 2, 5, 6, 9])
  reference, _ = _round(ALGORITHMS['fedavg'](), batch)
  for mesh in (None, fs.client_mesh()):
    execution = ClientExecution(strategy, chunk, mesh)
    algorithm = ALGORITHMS['fedavg'](execution=execution)
    # 5 clients do not split over 4 devices: zero-weight padding makes them 8.
    padded = pad_clients(batch, execution.num_shards)
    state, metrics = _round(algorithm, padded)
    _close(reference.params, state.params)
    assert int(metrics['num_participants']) == 5


def test_simulator_sharded_over_four_devices_equals_one_device():
  config = fs.SimulationConfig(num_rounds=4, clients_per_round=5, local_work=WORK, eval_every=2)
  results = []
  for mesh in (None, fs.client_mesh()):
    execution = ClientExecution('vmap', None, mesh)
    algorithm = fs.fed_avg(MODEL.loss, optax.sgd(0.05), execution=execution)
    sim = fs.Simulator(algorithm, MODEL, DATA, config, execution=execution)
    results.append(sim.run(sim.init(), progress=False))
  _close(results[0].state.params, results[1].state.params)
  assert results[0].history[-1]['test_accuracy'] == pytest.approx(
      results[1].history[-1]['test_accuracy'], abs=1e-6)


def test_round_does_not_retrace_on_later_rounds():
  traces = []
  base = ALGORITHMS['fedavg']()

  def counted(state, batch, key):
    traces.append(1)
    return base.round(state, batch, key)

  round_fn = jax.jit(counted)
  state = base.init(_params())
  for r in range(3):
    state, _ = round_fn(state, _batch([r, r + 1, r + 2], key=r), jax.random.key(r))
  assert len(traces) == 1


def test_simulator_compiles_one_block_and_never_retraces():
  traces = []
  base = ALGORITHMS['fedavg']()

  def counted(state, batch, key):
    traces.append(1)
    return base.round(state, batch, key)

  algorithm = base._replace(round=counted)
  config = fs.SimulationConfig(num_rounds=9, clients_per_round=4, local_work=WORK, eval_every=3)
  sim = fs.Simulator(algorithm, MODEL, DATA, config)
  result = sim.run(sim.init(), progress=False)
  assert len(traces) == 1
  assert len(result.history) == 9


def test_same_seed_is_bitwise_identical_and_another_seed_differs():
  def run(seed):
    config = fs.SimulationConfig(num_rounds=4, clients_per_round=4, local_work=WORK,
                                 eval_every=2, seed=seed)
    sim = fs.Simulator(ALGORITHMS['fedavg'](), MODEL, DATA, config)
    return sim.run(sim.init(), progress=False)
  a, b, c = run(0), run(0), run(1)
  chex.assert_trees_all_equal(a.state.params, b.state.params)
  assert a.history == b.history
  assert not np.array_equal(np.asarray(a.state.params['Dense_0']['kernel']),
                            np.asarray(c.state.params['Dense_0']['kernel']))


def test_per_client_state_is_gathered_and_scattered_by_client_id():
  """A toy algorithm whose client state counts participations."""
  def client_update(params, extra, client_state, data, mask, key):
    update = jax.tree.map(jnp.zeros_like, params)
    return fs.ClientOutput(update=update, state=client_state + 1, aux=(),
                           metrics={'loss_sum': jnp.zeros(()), 'num_examples': jnp.sum(mask).astype(jnp.float32)})

  algorithm = fs.federated_algorithm(client_update, server_optimizer=optax.sgd(1.0),
                                     num_clients=DATA.num_clients,
                                     init_client_state=lambda p: jnp.zeros((), jnp.int32))
  state = algorithm.init(_params())
  expected = np.zeros(DATA.num_clients, np.int64)
  round_fn = jax.jit(algorithm.round)
  for ids, weights in [([1, 4, 5], [1, 1, 1]), ([4, 2, 4], [1, 1, 0]), ([5, 1, 0], [2, 0, 3])]:
    batch = _batch(ids)._replace(weight=jnp.asarray(weights, jnp.float32))
    state, _ = round_fn(state, batch, jax.random.key(0))
    for i, w in zip(ids, weights):
      expected[i] += w > 0
  np.testing.assert_array_equal(np.asarray(state.client_states), expected)


def test_sampling_is_without_replacement_and_covers_clients():
  counts = jnp.asarray(DATA.counts, jnp.int32)
  seen = set()
  for r in range(30):
    ids = np.asarray(sample_clients(jax.random.key(r), counts, 5))
    assert len(set(ids.tolist())) == 5
    seen.update(ids.tolist())
  assert seen == set(range(DATA.num_clients))


def test_proportional_sampling_prefers_large_clients():
  counts = jnp.asarray([1, 1, 1, 1000], jnp.int32)
  hits = sum(int(3 in np.asarray(sample_clients(jax.random.key(r), counts, 1,
                                                proportional_to_size=True))) for r in range(50))
  assert hits >= 45


def test_block_schedule_ends_blocks_at_evaluations_checkpoints_and_the_end():
  from fedjax_sync.simulate.rounds import block_schedule
  rng = np.random.default_rng(0)
  for _ in range(200):
    total = int(rng.integers(1, 40))
    start = int(rng.integers(0, total + 1))
    eval_every = int(rng.integers(1, 9))
    block_every = int(rng.integers(1, 9)) if rng.random() < 0.5 else None
    blocks = list(block_schedule(start, total, eval_every, block_every))
    ends = {e for e in range(start + 1, total + 1)
            if e % eval_every == 0 or e == total or (block_every and e % block_every == 0)}
    assert [r + n for r, n, _ in blocks] == sorted(ends)
    assert [r for r, _, _ in blocks] == [start] + sorted(ends)[:-1] if blocks else start == total
    assert all(ev == ((r + n) % eval_every == 0 or r + n == total) for r, n, ev in blocks)
