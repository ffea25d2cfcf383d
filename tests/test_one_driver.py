"""The one driver: every timeline gets the same files, checkpoints and exact resume.

Synchronous rounds have their own resume suite (`test_resume.py`); here the
semi-asynchronous (FedBuff with a DP chain) and dynamic-averaging (FDA) timelines
go through the same `run_with_checkpoints`: a run that crashes after its first
checkpoint and is resumed ends bitwise identical to an uninterrupted one, with the
same metrics file. Each runner object is built once, so its blocks compile once.
"""

import functools
import json
import os

import jax
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync import cli, reporting, sinks
from fedjax_sync.aggregators import chain, clip_by_norm, dp_fedavg
from fedjax_sync.algorithms.fda import fda
from fedjax_sync.algorithms.fed_buff import fed_buff
from fedjax_sync.simulate import checkpoint
from fedjax_sync.simulate.clock import lognormal_times, make_clock
from fedjax_sync.simulate.driver import drive
from tests.helpers import run_rows

DATA = fs.synthetic(1.0, 1.0, num_clients=8, seed=5)
MODEL = fs.models.logistic_regression((60,), 10)
UNITS = 4


@functools.lru_cache(maxsize=None)
def _runner(timeline: str):
  if timeline == 'semi_async':
    # FedBuff with a DP chain: clipped, noised, staleness-weighted updates.
    aggregator = chain(clip_by_norm(1.0), dp_fedavg(1.0, 0.5, expected_total_weight=2.0))
    algorithm = fed_buff(MODEL.loss, optax.sgd(0.1), aggregator=aggregator)
    clock = make_clock(lognormal_times(DATA.num_clients, sigma=1.0, seed=1))
    config = fs.simulate.AsyncConfig(num_aggregations=UNITS, buffer_size=2,
                                     local_work=fs.LocalWork(batch_size=5, steps=2),
                                     eval_every=2, seed=3)
    return fs.SemiAsyncSimulator(algorithm, MODEL, DATA, clock, config)
  algorithm = fda(MODEL.loss, optax.sgd(0.1), num_workers=3, threshold=0.01,
                  estimator='naive')
  return fs.AveragingSimulator(algorithm, MODEL, DATA, num_steps=UNITS, batch_size=5,
                               eval_every=2, seed=3)


class _Crash(Exception):
  pass


def _crash_after(units):
  def on_block(state, units_done, history):
    del state, history
    if units_done == units:
      raise _Crash
  return on_block


def _host(x):
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _quiet(message):
  del message


@functools.lru_cache(maxsize=None)
def _uninterrupted(timeline, run_dir):
  runner = _runner(timeline)
  return checkpoint.run_with_checkpoints(runner, runner.init(), run_dir=run_dir, every=2,
                                         progress=False, log=_quiet, tensorboard=True)


@pytest.mark.parametrize('timeline', ['semi_async', 'averaging'])
def test_a_crashed_run_resumes_bitwise_with_the_same_files_in_every_timeline(timeline, tmp_path_factory):
  full_dir = str(tmp_path_factory.mktemp('full'))
  full = _uninterrupted(timeline, full_dir)
  runner = _runner(timeline)
  crashed = str(tmp_path_factory.mktemp('crashed'))
  with pytest.raises(_Crash):
    checkpoint.run_with_checkpoints(runner, runner.init(), run_dir=crashed, every=2,
                                    progress=False, log=_quiet, on_block=_crash_after(2))
  assert [r for r, _ in checkpoint.list_checkpoints(os.path.join(crashed, 'checkpoints'))] == [2]
  resumed = checkpoint.run_with_checkpoints(runner, runner.init(), run_dir=crashed, every=2,
                                            resume=True, progress=False, log=_quiet)
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(_host(a), _host(b))
  assert resumed.history == full.history
  rows = reporting.read_metrics(crashed)
  assert rows == reporting.read_metrics(full_dir)
  assert [r['round'] for r in rows] == list(range(1, UNITS + 1))
  unit = runner.unit
  assert [r[unit] for r in rows] == [r['round'] for r in rows]
  assert ['test_accuracy' in r for r in rows] == [False, True, False, True]
  # The same sinks as synchronous runs: TensorBoard events; a second start is refused.
  (event_file,) = [f for f in os.listdir(full_dir) if f.startswith('events.out.tfevents')]
  records = list(sinks.read_tfrecords(os.path.join(full_dir, event_file)))
  assert len(records) > UNITS   # the file version record, then ≥ one summary per unit
  with pytest.raises(ValueError, match='already holds checkpoints'):
    checkpoint.run_with_checkpoints(runner, runner.init(), run_dir=full_dir, every=2,
                                    progress=False, log=_quiet)


def test_a_checkpoint_of_another_timeline_is_refused(tmp_path):
  run_dir = str(tmp_path / 'async')
  _uninterrupted('semi_async', run_dir)
  runner = _runner('averaging')
  with pytest.raises(checkpoint.ResumeError, match='no usable checkpoint'):
    checkpoint.run_with_checkpoints(runner, runner.init(), run_dir=run_dir, resume=True,
                                    progress=False, log=_quiet)


def test_evaluation_hooks_and_early_stop_are_the_drivers():
  runner = _runner('averaging')
  calls = []

  def hook(state, units_done):
    calls.append(units_done)
    return {'anchor_norm': float(np.sqrt(sum(np.sum(np.square(x))
                                             for x in jax.tree.leaves(state.anchor))))}

  result = drive(runner, runner.init(), evaluation_hooks=[hook],
                 stop_when=lambda history: history[-1]['round'] >= 2)
  assert calls == [2] and result.units_done == 2
  (history,) = result.histories
  assert [r['round'] for r in history] == [1, 2] and history[-1]['anchor_norm'] > 0
  assert result.final_evals[0]['anchor_norm'] == history[-1]['anchor_norm']


def test_the_cli_checkpoints_and_resumes_an_asynchronous_run(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  common = ['--algorithm', 'fedbuff', '--num-clients', '6', '--hparam', 'buffer_size=2',
            '--local-steps', '2', '--eval-every', '2', '--quiet',
            '--aggregator', 'chain(clip_by_norm(1.0), weighted_mean())']
  assert cli.main(['run', *common, '--rounds', '4', '--checkpoint-every', '2',
                   '--run-dir', 'async']) == 0
  assert cli.main(['run', '--resume', 'async', '--rounds', '6', '--quiet']) == 0
  assert 'resumed from round 4' in capsys.readouterr().err
  rows = run_rows('async')
  assert [r['round'] for r in rows] == list(range(1, 7)) == [r['aggregation'] for r in rows]
  with open(os.path.join('async', 'config.json')) as f:
    assert json.load(f)['cli_args']['rounds'] == 6
  assert [r for r, _ in checkpoint.list_checkpoints('async/checkpoints')] == [4, 6]


def test_fedbuff_with_clip_and_dp_swept_over_three_seeds_resumes_bitwise(tmp_path):
  # The combination: an asynchronous algorithm, a DP aggregator chain, a
  # vmapped sweep over seeds, checkpoints, a crash and a resume.
  single = _runner('semi_async')

  def build(hyperparameters):
    del hyperparameters
    return single.algorithm

  sweep = fs.Sweep(build, MODEL, DATA, single.config, seeds=[1, 2, 3], clock=single.clock)
  assert sweep.unit == 'aggregation' and sweep.members == 3
  full_dir, crashed = str(tmp_path / 'full'), str(tmp_path / 'crashed')
  full = checkpoint.run_with_checkpoints(sweep, sweep.init(), run_dir=full_dir, every=2,
                                         progress=False, log=_quiet)
  with pytest.raises(_Crash):
    checkpoint.run_with_checkpoints(sweep, sweep.init(), run_dir=crashed, every=2,
                                    progress=False, log=_quiet, on_block=_crash_after(2))
  resumed = checkpoint.run_with_checkpoints(sweep, sweep.init(), run_dir=crashed, every=2,
                                            resume=True, progress=False, log=_quiet)
  for a, b in zip(jax.tree.leaves(full.states), jax.tree.leaves(resumed.states)):
    np.testing.assert_array_equal(_host(a), _host(b))
  assert resumed.histories == full.histories
  for a, b in zip(sweep.member_dirs(full_dir), sweep.member_dirs(crashed)):
    assert reporting.read_metrics(a) == reporting.read_metrics(b)
    assert [r['round'] for r in reporting.read_metrics(b)] == list(range(1, UNITS + 1))
  # Seeds differ; member seed=3 is the single run with seed 3 (to float tolerance).
  losses = [h[-1]['train_loss'] for h in full.histories]
  assert len(set(losses)) == 3
  reference = single.run(single.init())
  np.testing.assert_allclose([r['train_loss'] for r in full.histories[2]],
                             [r['train_loss'] for r in reference.history], rtol=1e-4)


def test_a_sweep_evaluates_each_clients_personal_model_as_the_simulator_does():
  from fedjax_sync.simulate.sweep import registered_algorithm

  build = registered_algorithm('ditto', MODEL.loss, num_clients=DATA.num_clients)
  config = fs.SimulationConfig(num_rounds=2, clients_per_round=4,
                               local_work=fs.LocalWork(batch_size=5, steps=2), eval_every=2)
  sweep = fs.Sweep(build, MODEL, DATA, config, seeds=[0, 1])
  result = sweep.run(sweep.init())
  sim = fs.Simulator(build({}), MODEL, DATA, config)
  for s in range(2):
    member = jax.tree.map(lambda x, s=s: x[s], result.states)
    expected = sim.evaluate(member.params, member.client_states)
    for key, value in expected.items():
      if np.ndim(value) == 0:
        np.testing.assert_allclose(result.final_evals[s][key], value, rtol=1e-5, err_msg=key)


def test_a_checkpoints_identity_holds_the_sampling_and_the_availability_trace():
  from fedjax_sync.simulate.availability import diurnal_availability

  work = fs.LocalWork(batch_size=5, steps=1)
  algorithm = fs.fed_avg(MODEL.loss, optax.sgd(0.1))

  def identity(**config):
    sim_config = fs.SimulationConfig(num_rounds=2, clients_per_round=4, local_work=work,
                                     **{k: v for k, v in config.items() if k != 'trace'})
    sim = fs.Simulator(algorithm, MODEL, DATA, sim_config,
                       **({'availability': config['trace']} if 'trace' in config else {}))
    return checkpoint.simulation_identity(sim)

  uniform = identity()
  assert 'sampling' not in uniform and 'availability' not in uniform   # old checkpoints resume
  poisson = identity(sampling='poisson', sampling_rate=0.5)
  assert poisson['sampling'] == 'poisson' and poisson != uniform
  trace = diurnal_availability(DATA.num_clients, seed=0)
  assert identity(trace=trace)['availability'] == identity(trace=trace)['availability']
  assert identity(trace=trace) != uniform
