"""Every algorithm and aggregator runs; non-finite and extreme updates are contained.

Two registry suites: every aggregator of the conformance registry and every
registered algorithm through `Simulator.run` (and every algorithm through the CLI)
for 2 rounds; and non-finite inputs (NaN, Inf, 1e30 updates, a zero-weight client,
a single client) over both registries. One tiny dataset and model serve all tests.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync import aggregators as agg
from fedjax_sync.algorithms.registry import algorithm_names, build_algorithm
from fedjax_sync.cli import main as cli_main
from tests.test_aggregator_conformance import NUM_CLIENTS as CONFORMANCE_NUM_CLIENTS
from tests.test_aggregator_conformance import REGISTRY as AGGREGATORS

NUM_CLIENTS = 6
DATA = fs.synthetic(1.0, 1.0, num_clients=NUM_CLIENTS, seed=3)
MODEL = fs.models.logistic_regression((60,), 10)
WORK = fs.LocalWork(batch_size=4, steps=1)
CONFIG = fs.SimulationConfig(num_rounds=2, clients_per_round=3, local_work=WORK, eval_every=2,
                             per_client_eval=False)


def _finite(tree) -> bool:
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------- every one runs


def test_run_keeps_the_callers_state_and_donates_a_shared_buffer_safely():
  # chain(clip_by_norm, harmonize) has an init returning one zeros array twice.
  algorithm = fs.fed_avg(MODEL.loss, optax.sgd(0.05),
                         aggregator=agg.chain(agg.clip_by_norm(1.0), agg.harmonize()))
  sim = fs.Simulator(algorithm, MODEL, DATA, CONFIG)
  s0 = sim.init()
  result = sim.run(s0, progress=False)
  assert int(result.state.round) == 2
  # s0 was not donated: still readable, and a second run from it is identical.
  assert int(s0.round) == 0 and _finite(s0.params)
  again = sim.run(s0, progress=False)
  for a, b in zip(jax.tree.leaves(result.state.params), jax.tree.leaves(again.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_run_rounds_accepts_a_state_with_a_repeated_leaf_and_names_a_donated_one():
  sim = fs.Simulator(fs.fed_avg(MODEL.loss, optax.sgd(0.05)), MODEL, DATA, CONFIG)
  state = sim.init()
  zero = jnp.zeros((), jnp.int32)
  state = state._replace(round=zero, extra=(zero,))   # one buffer twice
  new_state, _ = sim.run_rounds(state, 0, 1)
  assert int(new_state.round) == 1
  with pytest.raises(ValueError, match='donated'):
    sim.run_rounds(state, 0, 1)


# One compiled block per entry (~5 s of CPU each): the two registry-wide runs are slow.
@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(AGGREGATORS))
def test_every_aggregator_runs_in_the_simulator(name):
  # 3 clients per round: Bulyan tolerates f = 0 there (it needs 4f + 3 clients).
  aggregator = agg.bulyan(0) if name == 'bulyan' else AGGREGATORS[name]()
  algorithm = fs.fed_avg(MODEL.loss, optax.sgd(0.05), aggregator=aggregator,
                         num_clients=NUM_CLIENTS)
  sim = fs.Simulator(algorithm, MODEL, DATA, CONFIG)
  result = sim.run(sim.init(), progress=False)
  assert [row['round'] for row in result.history] == [1, 2]
  assert _finite(result.state.params) and math.isfinite(result.final_eval['test_loss'])


@pytest.mark.slow
@pytest.mark.parametrize('name', algorithm_names())
def test_every_algorithm_runs_through_the_cli(name, tmp_path, capsys):
  code = cli_main(['run', '--algorithm', name, '--rounds', '2', '--num-clients', '6',
                   '--clients-per-round', '3', '--local-steps', '1', '--batch-size', '4',
                   '--eval-every', '2', '--quiet', '--run-dir', str(tmp_path / name)])
  out = capsys.readouterr()
  if code == 2 and 'does not fit' in out.err:
    pytest.skip(f'{name} needs another model than logistic regression: {out.err.strip()}')
  assert code == 0, out.err
  assert 'after 2 rounds' in out.out and 'nan' not in out.out
  rows = (tmp_path / name / 'metrics.jsonl').read_text().splitlines()
  assert len(rows) == 2


# ------------------------------------------------- non-finite aggregator inputs


def _agg_inputs(num=8, seed=0):
  rng = np.random.default_rng(seed)
  updates = {'w': jnp.asarray(rng.normal(size=(num, 3, 4)), jnp.float32),
             'b': jnp.asarray(rng.normal(size=(num, 4)), jnp.float32)}
  weights = jnp.asarray(rng.uniform(1, 3, num), jnp.float32)
  ids = jnp.asarray(rng.permutation(CONFORMANCE_NUM_CLIENTS)[:num], jnp.int32)
  return updates, weights, ids


def _agg_params():
  return {'w': jnp.zeros((3, 4), jnp.float32), 'b': jnp.zeros((4,), jnp.float32)}


def _set_client(updates, c, value):
  return jax.tree.map(lambda x: x.at[c].set(value), updates)


_APPLIES = {}


def _apply(name, updates, weights, ids):
  """The registry entry's apply under jit, compiled once per entry and shape."""
  if name not in _APPLIES:
    aggregator = AGGREGATORS[name]()
    _APPLIES[name] = (aggregator, jax.jit(aggregator.apply))
  aggregator, apply = _APPLIES[name]
  return apply(updates, weights, aggregator.init(_agg_params(), CONFORMANCE_NUM_CLIENTS),
               jax.random.key(5), ids)


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf, 1e30])
@pytest.mark.parametrize('name', sorted(AGGREGATORS))
def test_zero_weight_client_with_nonfinite_update_changes_nothing(name, bad):
  updates, weights, ids = _agg_inputs()
  weights = weights.at[3].set(0.0)
  reference, ref_state = _apply(name, _set_client(updates, 3, 0.0), weights, ids)
  out, state = _apply(name, _set_client(updates, 3, bad), weights, ids)
  assert _finite(out), name
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5), out, reference)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5),
               state, ref_state)


@pytest.mark.parametrize('name', sorted(AGGREGATORS))
def test_a_single_present_client(name):
  updates, weights, ids = _agg_inputs()
  weights = jnp.zeros_like(weights).at[5].set(2.0)
  updates = _set_client(updates, 0, np.nan)   # absent and NaN
  out, _ = _apply(name, updates, weights, ids)
  assert _finite(out)
  if name in ('mean', 'weighted_mean', 'coordinate_median', 'trimmed_mean', 'krum',
              'multi_krum', 'geometric_median', 'bulyan'):
    for leaf, full in zip(jax.tree.leaves(out), jax.tree.leaves(updates)):
      np.testing.assert_allclose(leaf, full[5], rtol=1e-5, atol=1e-6)


ROBUST = ('krum', 'multi_krum', 'geometric_median', 'coordinate_median', 'trimmed_mean',
          'bulyan')


@pytest.mark.parametrize('bad', [np.nan, np.inf, 1e30])
@pytest.mark.parametrize('name', ROBUST)
def test_robust_reducers_survive_one_bad_present_client(name, bad):
  updates, weights, ids = _agg_inputs()
  updates = jax.tree.map(lambda x: x + 3.0, updates)
  honest, _ = _apply(name, updates, weights.at[2].set(0.0), ids)
  out, _ = _apply(name, _set_client(updates, 2, bad), weights, ids)
  assert _finite(out)
  for a, h in zip(jax.tree.leaves(out), jax.tree.leaves(honest)):
    # Within the spread of the honest updates (unit normal around 3).
    assert np.max(np.abs(np.asarray(a) - np.asarray(h))) < 1.5
    assert np.max(np.abs(np.asarray(a) - 3.0)) < 2.0


def test_krum_never_selects_a_zero_weight_client():
  krum = agg.krum(0)
  params = {'x': jnp.zeros((1,))}
  out, state = krum.apply({'x': jnp.array([[5.0], [7.0]])}, jnp.array([0.0, 1.0]),
                          krum.init(params), None, jnp.array([10, 11]))
  assert float(out['x'][0]) == 7.0 and int(state.metrics['selected_client']) == 11


@pytest.mark.parametrize('transform', ['clip_by_norm', 'norm_bounded_mean', 'adaptive_clip',
                                       'dp_fedavg'])
def test_norms_never_overflow(transform):
  big = {'x': jnp.array([[1e20, 0.0], [0.0, 3e38], [3.0, 4.0]], jnp.float32)}
  weights = jnp.ones((3,))
  if transform == 'clip_by_norm':
    out, _ = agg.clip_by_norm(1.0).apply(big, weights, None)
    np.testing.assert_allclose(out['x'], [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], rtol=1e-6)
    return
  if transform == 'adaptive_clip':
    a = agg.adaptive_clip(1.0, 0.5, 0.2)
    out, state = a.apply(big, weights, a.init({'x': jnp.zeros(2)}))
    np.testing.assert_allclose(out['x'], [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], rtol=1e-6)
    assert float(state.metrics['unclipped_fraction']) == 0.0
    return
  a = (agg.norm_bounded_mean(1.0) if transform == 'norm_bounded_mean'
       else agg.dp_fedavg(1.0, 0.0, 3.0))
  out, _ = a.apply(big, weights, a.init({'x': jnp.zeros(2)}), jax.random.key(0))
  np.testing.assert_allclose(out['x'], [1.6 / 3, 1.8 / 3], rtol=1e-6)


def test_clipping_an_infinite_update_keeps_its_direction():
  inf = {'x': jnp.array([[np.inf, -np.inf, 5.0], [0.0, 0.0, 2.0]], jnp.float32)}
  out, _ = agg.clip_by_norm(1.0).apply(inf, jnp.ones((2,)), None)
  r = 1 / np.sqrt(2)
  np.testing.assert_allclose(out['x'], [[r, -r, 0.0], [0.0, 0.0, 1.0]], rtol=1e-6)


def test_stochastic_quantize_of_huge_updates_is_finite_and_unbiased_in_scale():
  q = agg.stochastic_quantize(4)
  big = {'x': jnp.array([[1e20, -1e20, 0.0]], jnp.float32)}
  out, _ = q.apply(big, jnp.ones((1,)), q.init({'x': jnp.zeros(3)}), jax.random.key(0),
                   jnp.zeros((1,), jnp.int32))
  x = np.asarray(out['x'])
  assert np.all(np.isfinite(x)) and x[0, 2] == 0.0
  assert np.all(np.abs(x[0, :2]) <= np.sqrt(2) * 1e20 * 1.0001) and x[0, 0] > 0 > x[0, 1]


EXTRA_REDUCERS = {
    'harmonize': lambda: agg.harmonize(),
    'kuramoto': lambda: agg.kuramoto(0.5),
    'kuramoto_code': lambda: agg.kuramoto_code(),
}


@pytest.mark.parametrize('bad', [np.nan, np.inf])
@pytest.mark.parametrize('name', sorted(EXTRA_REDUCERS))
def test_zero_weight_nonfinite_client_changes_nothing_in_harmonize_and_kuramoto(name, bad):
  aggregator = EXTRA_REDUCERS[name]()
  updates, weights, ids = _agg_inputs()
  weights = weights.at[3].set(0.0)
  state = aggregator.init(_agg_params(), CONFORMANCE_NUM_CLIENTS)
  apply = jax.jit(aggregator.apply)
  reference, ref_state = apply(_set_client(updates, 3, 0.0), weights, state, None, ids)
  out, new_state = apply(_set_client(updates, 3, bad), weights, state, None, ids)
  assert _finite(out) and _finite(new_state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5), out, reference)


# ------------------------------------------------------ non-finite client in a round

_DEVICE_DATA = fs.data.to_device(DATA)
_MAX_COUNT = int(DATA.counts[DATA.counts > 0].max())


def _batch(ids=(0, 1, 2, 4), nan_client=None, zero_weight=None, key=0):
  batch = fs.data.make_client_batch(jax.random.key(key), _DEVICE_DATA,
                                    jnp.asarray(ids, jnp.int32), WORK, max_count=_MAX_COUNT)
  if nan_client is not None:
    batch = batch._replace(data={**batch.data,
                                 'x': batch.data['x'].at[nan_client].set(jnp.nan)})
  if zero_weight is not None:
    batch = batch._replace(weight=batch.weight.at[zero_weight].set(0.0))
  return batch


def _close(a, b, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol), a, b)


@pytest.mark.parametrize('name', algorithm_names())
def test_every_algorithm_contains_a_nan_client(name):
  """A NaN client of weight 0 changes nothing; one of positive weight is counted
  (`nonfinite_updates`) and never written into the persistent per-client state."""
  algorithm = build_algorithm(name, MODEL.loss, fs.Hyperparameters(client_learning_rate=0.05),
                              num_clients=NUM_CLIENTS)
  try:
    state = algorithm.init(MODEL.init(jax.random.key(1)))
  except ValueError as e:   # FedBN needs a model with BatchNorm statistics
    pytest.skip(f'{name} needs another model than logistic regression: {e}')
  round_fn = jax.jit(algorithm.round)
  key = jax.random.key(2)
  reference, _ = round_fn(state, _batch(zero_weight=3), key)
  out, metrics = round_fn(state, _batch(nan_client=3, zero_weight=3), key)
  assert _finite(out)
  _close(out.params, reference.params)
  _close(out.client_states, reference.client_states)
  assert all(math.isfinite(float(v)) for v in jax.tree.leaves(metrics) if np.ndim(v) == 0)
  bad, bad_metrics = round_fn(state, _batch(nan_client=3), key)
  assert float(bad_metrics['nonfinite_updates']) == 1.0
  assert _finite(bad.client_states) and _finite(bad.extra)


def test_zero_invalid_updates_keeps_scaffold_training_after_a_nan_client():
  algorithm = fs.scaffold(MODEL.loss, 0.05, num_clients=NUM_CLIENTS,
                          aggregator=agg.chain(agg.zero_invalid_updates(), agg.mean()))
  state = algorithm.init(MODEL.init(jax.random.key(1)))
  round_fn = jax.jit(algorithm.round)
  state, metrics = round_fn(state, _batch(nan_client=1), jax.random.key(0))
  assert float(metrics['aggregator/0/zeroed_count']) == 1.0
  assert _finite(state.extra.control) and _finite(state.client_states)
  for r in (1, 2):
    before = state.params
    state, metrics = round_fn(state, _batch(ids=(0, 1, 3, 5), key=r), jax.random.key(r))
    assert float(metrics['aggregator/0/zeroed_count']) == 0.0   # no client frozen
    assert _finite(state.params)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(state.params), jax.tree.leaves(before)))
    assert moved > 1e-4


@pytest.mark.parametrize('strategy', ['vmap', 'chunked', 'sequential', 'loop'])
@pytest.mark.parametrize('reducer', ['weighted_mean', 'mean'])
def test_zero_weight_nan_client_with_every_execution_strategy(strategy, reducer):
  if reducer == 'mean' and strategy in ('chunked', 'loop'):
    pytest.skip('the unstreamed path runs map_clients; vmap and sequential cover it')
  execution = fs.ClientExecution(strategy, 3 if strategy == 'chunked' else None)
  algorithm = fs.fed_avg(MODEL.loss, optax.sgd(0.05), execution=execution,
                         aggregator=getattr(agg, reducer)())
  state = algorithm.init(MODEL.init(jax.random.key(1)))
  round_fn = jax.jit(algorithm.round)
  reference, _ = round_fn(state, _batch(zero_weight=2), jax.random.key(0))
  out, metrics = round_fn(state, _batch(nan_client=2, zero_weight=2), jax.random.key(0))
  assert _finite(out.params) and math.isfinite(float(metrics['train_loss']))
  _close(out.params, reference.params)


def test_a_late_client_that_diverged_is_dropped_by_the_deadline():
  times = np.ones(NUM_CLIENTS, np.float32)
  times[4] = 10.0   # client 4 (position 3 of the batch) is late
  clock = fs.simulate.make_clock(times)
  algorithm = fs.simulate.with_clock(fs.fed_avg(MODEL.loss, optax.sgd(0.05)), clock,
                                     fs.simulate.with_deadline(5.0))
  state = algorithm.init(MODEL.init(jax.random.key(1)))
  round_fn = jax.jit(algorithm.round)
  out, metrics = round_fn(state, _batch(nan_client=3), jax.random.key(0))
  reference, _ = round_fn(state, _batch(), jax.random.key(0))
  assert float(metrics['num_late']) == 1.0
  assert _finite(out.params)
  _close(out.params, reference.params)


def test_a_diverging_run_warns_with_its_round_and_the_cli_exits_non_zero(tmp_path, capsys):
  algorithm = fs.fed_avg(MODEL.loss, optax.sgd(0.05), server_optimizer=optax.sgd(1e38))
  sim = fs.Simulator(algorithm, MODEL, DATA, CONFIG)
  with pytest.warns(RuntimeWarning, match=r'round \d+: \w+ is (nan|inf)'):
    result = sim.run(sim.init(), progress=False)
  assert result.nonfinite_round in (1, 2)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)
    code = cli_main(['run', '--rounds', '2', '--num-clients', '6', '--clients-per-round', '3',
                     '--local-steps', '1', '--batch-size', '4', '--eval-every', '2',
                     '--server-lr', '1e38', '--quiet', '--run-dir', str(tmp_path / 'r')])
  assert code == 3
  assert 'non-finite' in capsys.readouterr().err
