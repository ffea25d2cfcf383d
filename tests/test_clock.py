"""The simulated clock: job times, availability, and deadline / first-M rounds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import chex

from fedjax_sync.algorithms.fed_avg import fed_avg
from fedjax_sync.data import LocalWork, client_batch_from_arrays, synthetic
from fedjax_sync.models.models import logistic_regression
from fedjax_sync.simulate import clock as clock_lib
from fedjax_sync.simulate.rounds import SimulationConfig, Simulator

from helpers import classification_data, init_params, softmax_loss


def _batch(num_clients=5, seed=0):
  x, y = classification_data(n=12 * num_clients, seed=seed)
  examples = [{'x': x[12 * c:12 * c + 12 - c].astype(np.float32), 'y': y[12 * c:12 * c + 12 - c]}
              for c in range(num_clients)]
  return client_batch_from_arrays(examples, batch_size=4)


def test_deadline_and_first_m_weights_match_a_hand_count():
  times = jnp.asarray([1.0, 5.0, 2.0, 8.0, 3.0])
  available = jnp.asarray([True, True, False, True, True])
  weight = jnp.asarray([10.0, 20.0, 30.0, 40.0, 0.0])  # the last client is padding
  w, arrived, t = clock_lib.apply_round_policy(clock_lib.with_deadline(4.0), times, available,
                                               weight)
  np.testing.assert_array_equal(w, [10, 0, 0, 0, 0])
  np.testing.assert_array_equal(arrived, [True, False, False, False, False])
  assert float(t) == 4.0  # someone is late: the round lasts until the deadline
  w, _, t = clock_lib.apply_round_policy(clock_lib.first_m(2), times, available, weight)
  np.testing.assert_array_equal(w, [10, 20, 0, 0, 0])  # live: 1, 5, 8 → first two
  assert float(t) == 5.0
  w, _, t = clock_lib.apply_round_policy(clock_lib.wait_for_all(), times, available, weight)
  np.testing.assert_array_equal(w, [10, 20, 0, 40, 0])
  assert float(t) == 8.0
  everyone = jnp.ones(5, bool)
  w, _, t = clock_lib.apply_round_policy(clock_lib.with_deadline(10.0), times, everyone, weight)
  np.testing.assert_array_equal(w, [10, 20, 30, 40, 0])
  assert float(t) == 8.0  # all arrived before the deadline: the round ends early


def test_speed_ratio_and_lognormal_times():
  times = clock_lib.speed_ratio_times(50, 20.0, seed=3)
  assert times.min() == pytest.approx(1.0) and times.max() == pytest.approx(20.0)
  np.testing.assert_array_equal(times, clock_lib.speed_ratio_times(50, 20.0, seed=3))
  assert not np.array_equal(times, clock_lib.speed_ratio_times(50, 20.0, seed=4))
  log_times = clock_lib.speed_ratio_times(50, 100.0, spacing='log')
  assert np.median(log_times) < 20.0 < 50.5  # log spacing: most clients fast
  np.testing.assert_allclose(np.sort(log_times), np.geomspace(1, 100, 50), rtol=1e-6)
  lognormal = clock_lib.lognormal_times(2000, median=2.0, sigma=0.5, seed=0)
  assert np.median(lognormal) == pytest.approx(2.0, rel=0.05)
  for bad in (lambda: clock_lib.speed_ratio_times(10, 0.5),
              lambda: clock_lib.speed_ratio_times(10, 20.0, spacing='cubic'),
              lambda: clock_lib.make_clock([1.0, -1.0]),
              lambda: clock_lib.make_clock([1.0, 2.0], dropout=1.0),
              lambda: clock_lib.make_clock([1.0, 2.0], availability=np.ones((3, 5), bool)),
              lambda: clock_lib.with_deadline(0.0),
              lambda: clock_lib.first_m(0),
              lambda: clock_lib.apply_round_policy(clock_lib.RoundPolicy('fastest'), *[jnp.ones(2)] * 3)):
    with pytest.raises(ValueError):
      bad()


def test_job_times_vary_per_job_and_do_not_depend_on_other_clients():
  clock = clock_lib.make_clock(np.arange(1.0, 9.0), jitter=0.3, dropout=0.4)
  key = jax.random.key(0)
  ids = jnp.asarray([0, 3, 5])
  t = clock_lib.job_times(clock, key, ids, 7)
  t_alone = clock_lib.job_times(clock, key, jnp.asarray([3]), 7)
  assert float(t[1]) == float(t_alone[0])
  assert float(t[1]) != float(clock_lib.job_times(clock, key, jnp.asarray([3]), 8)[0])
  many = jax.jit(jax.vmap(lambda j: clock_lib.job_available(clock, key, jnp.arange(8), j)))(
      jnp.arange(500))
  assert 0.5 < float(jnp.mean(many)) < 0.7  # dropout 0.4
  masks = np.ones((2, 8), bool)
  masks[1, 2] = False
  clock = clock_lib.make_clock(np.ones(8), availability=masks)
  avail = jax.vmap(lambda j: clock_lib.job_available(clock, key, jnp.arange(8), j))(jnp.arange(4))
  np.testing.assert_array_equal(avail[:, 2], [True, False, True, False])


def test_over_selection():
  sampled, policy = clock_lib.over_selection(10, 0.3)
  assert sampled == 13 and policy == clock_lib.first_m(10)
  assert clock_lib.over_selection(10, 0.0)[0] == 10
  with pytest.raises(ValueError):
    clock_lib.over_selection(10, -0.1)


def test_wait_all_without_stragglers_equals_the_plain_round():
  algorithm = fed_avg(softmax_loss, optax.sgd(0.1))
  state = algorithm.init(init_params())
  batch, key = _batch(), jax.random.key(1)
  clocked = clock_lib.with_clock(algorithm, clock_lib.make_clock(np.arange(1.0, 6.0)))
  expected, _ = jax.jit(algorithm.round)(state, batch, key)
  got, metrics = jax.jit(clocked.round)(state, batch, key)
  chex.assert_trees_all_equal(got.params, expected.params)
  assert float(metrics['round_time']) == 5.0 and float(metrics['num_arrived']) == 5


def test_dropped_and_late_clients_never_contribute():
  algorithm = fed_avg(softmax_loss, optax.sgd(0.1))
  state = algorithm.init(init_params())
  batch, key = _batch(), jax.random.key(2)
  masks = np.ones((1, 5), bool)
  masks[0, 2] = False                       # client 2 is never available
  clock = clock_lib.make_clock([1.0, 1.0, 1.0, 1.0, 9.0], availability=masks)  # client 4 is slow
  clocked = jax.jit(clock_lib.with_clock(algorithm, clock, clock_lib.with_deadline(2.0)).round)
  got, metrics = clocked(state, batch, key)
  weight = batch.weight.at[jnp.asarray([2, 4])].set(0.0)
  expected, _ = jax.jit(algorithm.round)(state, batch._replace(weight=weight), key)
  chex.assert_trees_all_close(got.params, expected.params, rtol=1e-6)
  # Changing the dropped and the late client's data changes nothing.
  poisoned = jax.tree.map(lambda x: x.at[jnp.asarray([2, 4])].set(x[jnp.asarray([2, 4])] * 3 + 1),
                          batch.data)
  again, _ = clocked(state, batch._replace(data=poisoned), key)
  chex.assert_trees_all_close(again.params, got.params, rtol=1e-6)
  assert float(metrics['num_dropped']) == 1 and float(metrics['num_late']) == 1
  assert float(metrics['round_time']) == 2.0


def test_simulator_with_deadline_reports_round_times():
  data = synthetic(num_clients=8, seed=0)
  model = logistic_regression((60,), 10)
  times = clock_lib.speed_ratio_times(8, 20.0, seed=0)
  deadline = float(np.sort(times)[3]) + 1e-3
  algorithm = clock_lib.with_clock(fed_avg(model.loss, optax.sgd(0.05)),
                                   clock_lib.make_clock(times), clock_lib.with_deadline(deadline))
  sim = Simulator(algorithm, model, data,
                  SimulationConfig(4, 8, LocalWork(batch_size=10, steps=2), eval_every=4))
  result = sim.run(sim.init(), progress=False)
  assert [row['round_time'] for row in result.history] == pytest.approx([deadline] * 4)
  assert [row['num_participants'] for row in result.history] == [4.0] * 4
  assert [row['num_late'] for row in result.history] == [4.0] * 4
