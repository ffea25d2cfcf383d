"""Client availability traces (synchronous sampling, asynchronous job starts) and Poisson
client sampling with its privacy accountant."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_sync.aggregators.privacy import dp_epsilon, participation_epsilon
from fedjax_sync.algorithms.fed_avg import fed_avg
from fedjax_sync.data import LocalWork, synthetic
from fedjax_sync.data.batching import poisson_max_clients, poisson_sample_clients
from fedjax_sync.models.models import logistic_regression
from fedjax_sync.simulate.availability import (diurnal_availability, diurnal_online_fraction,
                                               is_online, load_availability_csv,
                                               make_availability, next_online,
                                               save_availability_csv)
from fedjax_sync.simulate.clock import make_clock
from fedjax_sync.simulate.rounds import SimulationConfig, Simulator, draw_participants
from fedjax_sync.simulate.semi_async import make_async_engine

from fedjax_sync.algorithms.federated import ClientOutput
from fedjax_sync.simulate.semi_async import AsyncAlgorithm
from fedjax_sync.types import ClientBatch, ServerState

from helpers import cli_error, run_config, run_rows

import optax


def _version_probe():
  """A toy asynchronous algorithm: params count the aggregations; updates are empty."""
  def init(params):
    return ServerState(params=params, opt_state=(), aggregator_state=(), client_states=(),
                       extra=(), round=jnp.zeros((), jnp.int32))

  def client_update(start_params, client_input, data, mask, key):
    del client_input, data, mask, key
    return ClientOutput(update=start_params, state=(), aux=(),
                        metrics={'loss_sum': jnp.zeros(()), 'num_examples': jnp.ones(())})

  def server_update(state, outputs, info):
    del outputs, info
    return state._replace(params=state.params + 1.0), {}

  return AsyncAlgorithm(init=init, client_inputs=lambda *a: (), client_update=client_update,
                        server_update=server_update, name='probe')


def _dummy_batch(key, ids):
  del key
  k = ids.shape[0]
  return ClientBatch(data={'x': jnp.zeros((k, 1, 1))}, mask=jnp.ones((k, 1, 1), bool),
                     client_ids=ids, weight=jnp.ones((k,), jnp.float32))


def _numpy_online(starts, ends, period, ids, t):
  t = np.broadcast_to(np.asarray(t, np.float64), ids.shape)
  if period is not None:
    t = np.mod(t, period)
  s, e = np.asarray(starts)[ids], np.asarray(ends)[ids]
  return np.any((s <= t[:, None]) & (t[:, None] < e), axis=1)


def _random_intervals(num_clients, period, seed):
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(num_clients - 1):   # the last client has no interval: never online
    for _ in range(rng.integers(1, 4)):
      start = float(rng.integers(0, int(period) - 1))
      rows.append((i, start, float(rng.integers(int(start) + 1, int(period) + 1))))
  return rows


@pytest.mark.parametrize('period', [None, 10.0])
def test_is_online_and_next_online_match_a_numpy_scan(period):
  n = 12
  trace = make_availability(_random_intervals(n, 10, seed=3), n, period=period)
  ids = jnp.arange(n)
  grid = np.arange(0, 35, 0.25)   # three periods, on a grid exact in float32
  online = jax.jit(jax.vmap(lambda t: is_online(trace, ids, t)))(jnp.asarray(grid, jnp.float32))
  expected = np.stack([_numpy_online(trace.starts, trace.ends, period, np.arange(n), t)
                       for t in grid])
  np.testing.assert_array_equal(np.asarray(online), expected)
  assert not expected[:, -1].any()
  nxt = np.asarray(jax.jit(jax.vmap(lambda t: next_online(trace, ids, t)))(
      jnp.asarray(grid, jnp.float32)))
  for a, t in enumerate(grid):
    for i in range(n):
      later = [b for b in range(a, len(grid)) if expected[b, i]]
      if later:   # the next online grid point (interval starts are on the grid)
        assert nxt[a, i] == grid[later[0]], (t, i)
      elif period is not None and i < n - 1:
        assert nxt[a, i] > grid[-1]
      else:
        assert nxt[a, i] == np.inf


def test_diurnal_fraction_online_matches_its_closed_form():
  n, w, a, day, peak = 20000, 0.3, 0.8, 24.0, 6.0
  trace = diurnal_availability(n, day_length=day, online_fraction=w, amplitude=a, peak=peak,
                               seed=1)
  times = np.arange(0.0, 48.0, 1.5)
  fraction = np.asarray(jax.jit(jax.vmap(
      lambda t: jnp.mean(is_online(trace, jnp.arange(n), t).astype(jnp.float32))))(
          jnp.asarray(times, jnp.float32)))
  expected = diurnal_online_fraction(times, day_length=day, online_fraction=w, amplitude=a,
                                     peak=peak)
  # Binomial sampling of the phases: 5 standard deviations of a mean of N Bernoullis.
  tolerance = 5 * np.sqrt(expected * (1 - expected) / n)
  assert np.all(np.abs(fraction - expected) < tolerance), (fraction, expected)
  assert expected.max() - expected.min() > 0.3   # the daily swing is real, not flat
  assert np.argmax(fraction[:16]) == np.argmin(np.abs(times[:16] - peak))
  # Every client is online exactly w of the day.
  length = np.where(np.isfinite(trace.starts), trace.ends - trace.starts, 0).sum(1)
  np.testing.assert_allclose(length, w * day, rtol=1e-5)


def test_trace_csv_round_trips(tmp_path):
  trace = diurnal_availability(50, day_length=10.0, online_fraction=0.4, seed=2)
  path = str(tmp_path / 'trace.csv')
  save_availability_csv(path, trace)
  again = load_availability_csv(path, 50, period=10.0)
  np.testing.assert_array_equal(np.asarray(again.starts), np.asarray(trace.starts))
  np.testing.assert_array_equal(np.asarray(again.ends), np.asarray(trace.ends))
  assert again.period == trace.period


@pytest.mark.parametrize('content, words', [
    ('id,start,end\n0,0,1\n', 'header client_id,start,end'),
    ('client_id,start,end\n0,0\n', 'line 2: 2 fields'),
    ('client_id,start,end\nx,0,1\n', "client_id 'x' is not an integer"),
    ('client_id,start,end\n0,0,soon\n', 'are not numbers'),
    ('client_id,start,end\n0,0,1\n7,0,1\n', 'line 3: client_id 7 is out of range; valid: 0 to 3'),
    ('client_id,start,end\n1,2,2\n', 'needs 0 ≤ start < end'),
    ('client_id,start,end\n1,-1,2\n', 'needs 0 ≤ start < end'),
    ('client_id,start,end\n1,0,inf\n', 'not finite'),
    ('client_id,start,end\n1,20,30\n', 'ends after the period 24.0'),
])
def test_bad_trace_files_are_one_line_errors(tmp_path, content, words):
  path = tmp_path / 'bad.csv'
  path.write_text(content)
  with pytest.raises(ValueError) as info:
    load_availability_csv(str(path), 4, period=24.0)
  message = str(info.value)
  assert words in message and str(path) in message and '\n' not in message


def test_missing_trace_file_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    load_availability_csv(str(tmp_path / 'none.csv'), 4)


def _small_simulator(config, availability=None, num_clients=20):
  data = synthetic(1.0, 1.0, num_clients=num_clients, seed=0)
  model = logistic_regression((60,), 10)
  algorithm = fed_avg(model.loss, optax.sgd(0.01))
  return Simulator(algorithm, model, data, config, availability=availability)


def _slot_trace(n=20):
  """Period 5: client i < 18 online in [i mod 5, i mod 5 + 1), clients 18, 19 always:
  6 clients online in slots 0-2, 5 in slots 3-4."""
  rows = [(i, float(i % 5), float(i % 5 + 1)) for i in range(n - 2)] + [
      (i, 0.0, 5.0) for i in (n - 2, n - 1)]
  return make_availability(rows, n, period=5.0)


def test_synchronous_sampling_draws_only_online_clients():
  n, c = 20, 6
  trace = _slot_trace(n)
  config = SimulationConfig(num_rounds=3, clients_per_round=c,
                            local_work=LocalWork(batch_size=5, steps=1), round_duration=0.5)
  counts = jnp.asarray(np.arange(1, n + 1), jnp.int32)

  def draw(key, r, proportional):
    available = is_online(trace, jnp.arange(n), r * 0.5)
    cfg = dataclasses.replace(config, proportional_sampling=proportional)
    return draw_participants(key, counts, cfg, available)

  keys = jax.random.split(jax.random.key(3), 40)
  both = jax.jit(jax.vmap(lambda k, r: (draw(k, r, False), draw(k, r, True))))(
      keys, jnp.arange(40))   # uniform and size-proportional, one compiled program
  for ids, present, metrics in both:
    ids, present = np.asarray(ids), np.asarray(present)
    for r in range(40):
      online = _numpy_online(trace.starts, trace.ends, 5.0, np.arange(n), r * 0.5)
      assert metrics['num_available'][r] == online.sum()
      assert len(set(ids[r])) == c
      np.testing.assert_array_equal(present[r], online[ids[r]])   # offline = padding
      assert present[r].sum() == min(c, online.sum())             # as many as possible
    assert (np.asarray(metrics['num_available']) < c).any()       # padding happened


def test_asynchronous_jobs_start_only_while_online():
  n = 8
  times = np.where(np.arange(n) % 2 == 0, 0.5, 1.0).astype(np.float32)
  # Period 6: client i online in [i mod 3, i mod 3 + 2) (integer bounds: exact in float32).
  trace = make_availability([(i, float(i % 3), float(i % 3 + 2)) for i in range(n)], n,
                            period=6.0)
  clock = make_clock(times, trace=trace)
  init, step = make_async_engine(_version_probe(), clock, _dummy_batch, buffer_size=2,
                                 run_key=jax.random.key(0))
  step = jax.jit(step)
  state = jax.jit(init)(jnp.zeros(()))
  for _ in range(30):
    start = np.asarray(state.finish_time) - times
    assert _numpy_online(trace.starts, trace.ends, 6.0, np.arange(n), start).all(), start
    state, metrics = step(state)
    assert float(jnp.min(metrics['weight'])) > 0
  # Without the trace, clients restart at the aggregation time: some would start offline.
  free_init, free_step = make_async_engine(_version_probe(), make_clock(times), _dummy_batch,
                                           buffer_size=2, run_key=jax.random.key(0))
  free, free_step = jax.jit(free_init)(jnp.zeros(())), jax.jit(free_step)
  offline_starts = 0
  for _ in range(30):
    start = np.asarray(free.finish_time) - times
    offline_starts += int((~_numpy_online(trace.starts, trace.ends, 6.0, np.arange(n),
                                          start)).sum())
    free, _ = free_step(free)
  assert offline_starts > 0
  assert float(state.now) > float(free.now)   # waiting for windows takes simulated time


def test_poisson_sampling_count_has_mean_qn_and_overflow_is_counted():
  n, q, draws = 200, 0.05, 3000
  c_max = poisson_max_clients(n, q)
  keys = jax.random.split(jax.random.key(7), draws)
  available = jnp.arange(n) < 50

  @jax.jit
  def three_samplers(keys):   # one compiled program for the three cases below
    return (jax.vmap(lambda k: poisson_sample_clients(k, n, q, c_max))(keys),
            jax.vmap(lambda k: poisson_sample_clients(k, n, q, 5))(keys[:200]),
            jax.vmap(lambda k: poisson_sample_clients(k, n, 0.5, 60, available=available))(
                keys[:100]))

  plain, small, only_available = three_samplers(keys)
  ids, present, drawn, overflow = plain
  counts = np.asarray(present).sum(1)
  np.testing.assert_array_equal(counts, np.asarray(drawn))
  assert float(np.asarray(overflow).sum()) == 0
  # The mean of `draws` Binomial(N, q) counts: within 4 standard errors of qN.
  assert abs(counts.mean() - n * q) < 4 * math.sqrt(n * q * (1 - q) / draws)
  assert abs(counts.var() / (n * q * (1 - q)) - 1) < 0.15
  # Each client's inclusion frequency is q (a chi-square test over the N clients).
  hits = np.zeros(n)
  for row, mask in zip(np.asarray(ids), np.asarray(present)):
    assert len(set(row)) == c_max
    np.add.at(hits, row[mask], 1)
  chi2 = (((hits - draws * q) ** 2) / (draws * q * (1 - q))).sum()
  assert stats.chi2.sf(chi2, n) > 1e-4
  # Too small an array: exactly C_max take part, the rest are counted as overflow.
  _, present, drawn, overflow = small
  np.testing.assert_array_equal(np.asarray(present).sum(1),
                                np.minimum(np.asarray(drawn), 5))
  np.testing.assert_array_equal(np.asarray(overflow), np.maximum(np.asarray(drawn) - 5, 0))
  # Only available clients can be drawn.
  ids, present, _, _ = only_available
  assert np.all(np.asarray(ids)[np.asarray(present)] < 50)


def test_poisson_max_clients_is_the_binomial_tail_quantile():
  for n, q in ((100, 0.1), (1000, 0.01), (5000, 0.002)):
    c = poisson_max_clients(n, q)
    assert stats.binom.sf(c, n, q) <= 1e-9 < stats.binom.sf(c - 1, n, q)
  assert poisson_max_clients(10, 0.5) == 10


def test_poisson_configuration_errors():
  with pytest.raises(ValueError, match="needs a sampling_rate in"):
    SimulationConfig(3, 5, LocalWork(5, steps=1), sampling='poisson').validate(20)
  with pytest.raises(ValueError, match="valid: uniform, poisson"):
    SimulationConfig(3, 5, LocalWork(5, steps=1), sampling='bernoulli').validate(20)
  with pytest.raises(ValueError, match="applies to sampling='poisson'"):
    SimulationConfig(3, 5, LocalWork(5, steps=1), sampling_rate=0.1).validate(20)
  with pytest.raises(ValueError, match='round_duration must be'):
    SimulationConfig(3, 5, LocalWork(5, steps=1), round_duration=0.0).validate(20)


def test_cli_poisson_rounds_of_available_clients(tmp_path):
  from fedjax_sync import cli

  trace_file = str(tmp_path / 'trace.csv')
  save_availability_csv(trace_file, _slot_trace())
  run_dir = str(tmp_path / 'run')
  # Rounds at times 0, 1.5, 3: slots 0, 1, 3 of `_slot_trace`: 6, 6 and 5 clients online.
  assert cli.main(['run', '--algorithm', 'fedavg', '--num-clients', '20', '--rounds', '3',
                   '--eval-every', '3', '--local-steps', '1', '--batch-size', '5',
                   '--availability-file', trace_file, '--availability-period', '5',
                   '--round-duration', '1.5', '--sampling', 'poisson', '--sampling-rate', '0.7',
                   '--run-dir', run_dir, '--quiet']) == 0
  rows = run_rows(run_dir)
  assert [row['num_available'] for row in rows] == [6.0, 6.0, 5.0]
  for row in rows:   # only drawn, available clients carry weight; none overflow
    assert row['num_participants'] == row['num_sampled'] <= row['num_available']
    assert row['num_overflow'] == 0
  assert sum(row['num_sampled'] for row in rows) > 0
  config = run_config(run_dir)
  c_max = poisson_max_clients(20, 0.7)
  assert config['sampling'] == {'kind': 'poisson', 'rate': 0.7, 'max_clients': c_max,
                                'overflow_probability_per_round': stats.binom.sf(c_max, 20, 0.7)}
  assert config['availability']['source'] == 'file'
  assert config['availability']['period'] == 5.0
  assert config['simulation']['clients_per_round'] == c_max
  assert config['simulation']['sampling_rate'] == 0.7


@pytest.mark.parametrize('extra, words', [
    (['--sampling', 'poisson'], '--sampling poisson needs --sampling-rate Q'),
    (['--sampling-rate', '0.1'], '--sampling-rate 0.1 applies to --sampling poisson'),
    (['--sampling-rate', '1.5'], "'1.5' is out of range; valid: a number in (0, 1]"),
    (['--availability', 'hourly'], "invalid choice: 'hourly'"),
    (['--online-fraction', '0.3'], '--online-fraction applies to --availability diurnal'),
    (['--availability-period', '5'], '--availability-period 5.0 applies to --availability-file'),
    (['--round-duration', '2'], '--round-duration places rounds'),
    (['--availability', 'diurnal', '--algorithm', 'fda'], '--availability does not apply to '
                                                           '--algorithm fda'),
    (['--sampling', 'poisson', '--sampling-rate', '0.1', '--algorithm', 'fedbuff'],
     '--sampling does not apply to --algorithm fedbuff'),
    (['--availability', 'diurnal', '--seeds', '2'], '--availability does not apply to --seeds'),
    (['--availability-file', 'missing.csv'], "availability file"),
])
def test_cli_availability_and_sampling_errors_are_one_line(extra, words, capsys, tmp_path):
  argv = ['run', '--rounds', '1', '--num-clients', '12', '--run-dir', str(tmp_path / 'run'),
          '--quiet', *extra]
  assert words in cli_error(argv, capsys)


def test_participation_epsilon_is_dp_accountings_and_falls_with_q():
  import dp_accounting
  from dp_accounting import rdp

  work = LocalWork(5, steps=1)
  epsilons = []
  for q in (0.04, 0.02, 0.01):
    config = SimulationConfig(500, 60, work, sampling='poisson', sampling_rate=q)
    eps = participation_epsilon(config, 1000, 1.1, 1e-6)
    direct = rdp.RdpAccountant()
    direct.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1)), 500))
    assert eps == direct.get_epsilon(1e-6)
    epsilons.append(eps)
  assert epsilons[0] > epsilons[1] > epsilons[2] > 0
  assert epsilons[2] == dp_epsilon(1.1, 0.01, 500, 1e-6)
  uniform = SimulationConfig(500, 20, work)
  direct = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  direct.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
      1000, 20, dp_accounting.GaussianDpEvent(1.1)), 500))
  assert participation_epsilon(uniform, 1000, 1.1, 1e-6) == direct.get_epsilon(1e-6)
  with pytest.raises(ValueError, match='size-proportional'):
    participation_epsilon(SimulationConfig(5, 2, work, proportional_sampling=True), 10, 1.0, 1e-5)


def test_checkpoint_identity_leaves_out_default_availability_and_sampling():
  from fedjax_sync import cli, cli_availability

  options = cli._identity_options(cli.build_parser().parse_args(['run']))
  assert not set(options) & set(cli_availability.DEFAULTS)   # older checkpoints resume
  options = cli._identity_options(cli.build_parser().parse_args(
      ['run', '--sampling', 'poisson', '--sampling-rate', '0.1', '--availability', 'diurnal']))
  assert (options['sampling'], options['sampling_rate'], options['availability']) == (
      'poisson', 0.1, 'diurnal')
  assert 'day_length' not in options
