"""The semi-asynchronous engine: schedule, staleness, versions, dropouts, equivalences."""

import heapq

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync.algorithms.fed_avg import fed_avg
from fedjax_sync.algorithms.fed_buff import fed_async, fed_buff
from fedjax_sync.algorithms.federated import ClientOutput
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.data import LocalWork, synthetic
from fedjax_sync.models.models import logistic_regression
from fedjax_sync.simulate.clock import constant_times, make_clock
from fedjax_sync.simulate.rounds import SimulationConfig, Simulator
from fedjax_sync.simulate.semi_async import (AsyncAlgorithm, AsyncConfig, SemiAsyncSimulator,
                                             make_async_engine)
from fedjax_sync.types import ClientBatch, ServerState

WORK = LocalWork(batch_size=10, steps=2)


def _version_probe(max_staleness_seen=None):
  """A toy algorithm: params is the version number; a client 'trains' by returning
  the params it started from, so each update reveals its start version."""
  def init(params):
    return ServerState(params=params, opt_state=(), aggregator_state=(), client_states=(),
                       extra=(), round=jnp.zeros((), jnp.int32))

  def client_update(start_params, client_input, data, mask, key):
    del client_input, data, mask, key
    return ClientOutput(update=start_params, state=(), aux=(),
                        metrics={'loss_sum': jnp.zeros(()), 'num_examples': jnp.ones(())})

  def server_update(state, outputs, info):
    return state._replace(params=state.params + 1.0), {'trained_from': outputs.update}

  return AsyncAlgorithm(init=init, client_inputs=lambda *a: (), client_update=client_update,
                        server_update=server_update, name='probe')


def _dummy_batch(key, ids):
  del key
  k = ids.shape[0]
  return ClientBatch(data={'x': jnp.zeros((k, 1, 1))}, mask=jnp.ones((k, 1, 1), bool),
                     client_ids=ids, weight=jnp.ones((k,), jnp.float32))


def _run_probe(times, buffer_size, steps, *, restart='new_model', max_staleness=32,
               availability=None):
  clock = make_clock(times, availability=availability)
  init, step = make_async_engine(_version_probe(), clock, _dummy_batch, buffer_size=buffer_size,
                                 max_staleness=max_staleness, restart=restart,
                                 run_key=jax.random.key(0))
  state = init(jnp.zeros(()))
  _, metrics = jax.jit(lambda s: jax.lax.scan(lambda c, _: step(c), s, None, length=steps))(state)
  return jax.device_get(metrics)


def _oracle(times, buffer_size, steps, restart):
  """A plain Python event loop: a heap of (finish time, client, start version)."""
  heap = [(float(t), i, 0) for i, t in enumerate(times)]
  heapq.heapify(heap)
  now, rows = 0.0, []
  for version in range(steps):
    done = [heapq.heappop(heap) for _ in range(buffer_size)]
    now = max(now, max(d[0] for d in done))
    rows.append({i: (version - v, f) for f, i, v in done})
    for f, i, _ in done:
      if restart == 'new_model':
        heapq.heappush(heap, (now + times[i], i, version + 1))
      else:
        heapq.heappush(heap, (f + times[i], i, version))
  return rows


@pytest.mark.parametrize('restart', ['new_model', 'current_model'])
def test_staleness_on_a_hand_made_schedule(restart):
  times = [1.0, 2.5, 4.25, 1.75, 6.5]   # dyadic: float32 sums are exact
  metrics = _run_probe(times, 2, 12, restart=restart)
  expected = _oracle(times, 2, 12, restart)
  now = 0.0
  for t, row in enumerate(expected):
    ids = [int(i) for i in metrics['client_ids'][t]]
    assert sorted(ids) == sorted(row), (t, ids, row)
    got = {i: int(s) for i, s in zip(ids, metrics['staleness'][t])}
    assert got == {i: tau for i, (tau, _) in row.items()}
    now = max(now, max(f for _, f in row.values()))
    assert metrics['wall_clock'][t] == pytest.approx(now)
  assert metrics['staleness'].max() > 0  # the schedule does produce stale updates


def test_updates_are_trained_from_the_version_their_client_started_from():
  metrics = _run_probe([1.0, 1.5, 3.25, 7.0], 1, 20, max_staleness=4)
  start_versions = np.arange(20)[:, None] - metrics['staleness']
  fresh = metrics['weight'] > 0
  # the probe's update is the params (= version number) the client trained from
  np.testing.assert_array_equal(metrics['trained_from'][fresh], start_versions[fresh])
  # the slowest client's update is 5+ versions old: discarded, never used
  assert metrics['num_discarded'].sum() > 0
  assert np.all(metrics['staleness'][fresh] <= 4)


def test_a_dropped_client_never_contributes():
  masks = np.ones((1, 4), bool)
  masks[0, 1] = False
  metrics = _run_probe([1.0, 0.5, 2.0, 3.0], 2, 10, availability=masks)
  ids, weight = metrics['client_ids'], metrics['weight']
  assert not np.any((ids == 1) & (weight > 0))
  assert np.all(weight > 0)  # the buffer is filled by the others
  assert metrics['num_restarted_lost'].sum() > 0


def _pair(num_clients=8):
  data = synthetic(num_clients=num_clients, seed=0)
  model = logistic_regression((60,), 10)
  return data, model


def test_equal_speeds_and_full_buffer_equal_synchronous_fedavg():
  data, model = _pair()
  sync = Simulator(fed_avg(model.loss, optax.sgd(0.05)), model, data,
                   SimulationConfig(3, 8, WORK, eval_every=1, seed=3))
  semi = SemiAsyncSimulator(fed_buff(model.loss, optax.sgd(0.05), example_weighted=True),
                            model, data, make_clock(constant_times(8)),
                            AsyncConfig(3, 8, WORK, eval_every=1, seed=3))
  s, a = sync.init(), semi.init()
  for r in range(3):
    s, _ = sync.run_rounds(s, r, 1)
    a, metrics = semi.run_aggregations(a, 1)
    chex.assert_trees_all_close(a.server.params, s.params, atol=1e-6)
    assert int(metrics['max_staleness'][0]) == 0
    assert float(metrics['wall_clock'][0]) == r + 1.0


def test_fed_async_with_one_fresh_update_mixes_the_local_model():
  data, model = _pair()
  alpha = 0.5
  semi = SemiAsyncSimulator(fed_async(model.loss, optax.sgd(0.05), mixing=alpha), model, data,
                            make_clock(constant_times(8)), AsyncConfig(1, 1, WORK, seed=1))
  buff = SemiAsyncSimulator(fed_buff(model.loss, optax.sgd(0.05), server_learning_rate=alpha),
                            model, data, make_clock(constant_times(8)),
                            AsyncConfig(1, 1, WORK, seed=1))
  # τ = 0 and K = 1: (1 − α) w + α w_1 = w − α (w − w_1), FedBuff with η_g = α.
  a, _ = semi.run_aggregations(semi.init(), 1)
  b, _ = buff.run_aggregations(buff.init(), 1)
  chex.assert_trees_all_close(a.server.params, b.server.params, atol=1e-6)


def test_deterministic_under_a_seed_and_no_retracing():
  data, model = _pair()
  algorithm = fed_buff(model.loss, optax.sgd(0.05))
  traces = []
  counted = algorithm._replace(client_update=lambda *a: (traces.append(1),
                                                         algorithm.client_update(*a))[1])
  clock = make_clock(np.linspace(1.0, 20.0, 8), jitter=0.2, dropout=0.1)
  sim = SemiAsyncSimulator(counted, model, data, clock, AsyncConfig(6, 2, WORK, eval_every=3,
                                                                    seed=5))
  runs = [sim.run(sim.init(), evaluate=False) for _ in range(2)]
  assert len(traces) == 1  # two runs of two blocks each: one program, traced once
  chex.assert_trees_all_equal(runs[0].state.server.params, runs[1].state.server.params)
  assert [r['wall_clock'] for r in runs[0].history] == [r['wall_clock'] for r in runs[1].history]
  other = SemiAsyncSimulator(fed_buff(model.loss, optax.sgd(0.05)), model, data, clock,
                             AsyncConfig(6, 2, WORK, eval_every=6, seed=6))
  changed = other.run(other.init(), evaluate=False)
  assert [r['wall_clock'] for r in runs[0].history] != [r['wall_clock'] for r in changed.history]


def test_sharded_over_four_devices_equals_one_device():
  data, model = _pair()
  clock = make_clock(np.linspace(1.0, 20.0, 8))
  results = []
  for mesh in (None, fs.client_mesh()):
    sim = SemiAsyncSimulator(fed_buff(model.loss, optax.sgd(0.05)), model, data, clock,
                             AsyncConfig(4, 4, WORK, eval_every=4, seed=2),
                             execution=ClientExecution('vmap', None, mesh))
    results.append(sim.run(sim.init(), evaluate=False))
  chex.assert_trees_all_close(results[0].state.server.params, results[1].state.server.params,
                              atol=1e-6)
  with pytest.raises(ValueError, match='multiple'):
    SemiAsyncSimulator(fed_buff(model.loss, optax.sgd(0.05)), model, data, clock,
                       AsyncConfig(4, 3, WORK), execution=ClientExecution('vmap', None,
                                                                          fs.client_mesh()))


def test_engine_validates_its_options():
  for kwargs in ({'buffer_size': 0}, {'buffer_size': 9}, {'max_staleness': -1},
                 {'restart': 'later'}):
    options = dict(buffer_size=2, max_staleness=3, restart='new_model')
    options.update(kwargs)
    with pytest.raises(ValueError):
      make_async_engine(_version_probe(), make_clock(np.ones(8)), _dummy_batch,
                        run_key=jax.random.key(0), **options)
