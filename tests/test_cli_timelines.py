"""`fedjax-sync run` for the semi-asynchronous (FedBuff, FedAsync, FedQS) and the
dynamic-averaging (FDA, local SGD, periodic FedAvgM/FedAdam) timelines.

Two tiny runs (4 clients, logistic regression on Synthetic) check the run directory;
the rest are argument errors, refused before any data is loaded or compiled.
"""

import math
import os

import pytest

from fedjax_sync import cli
from fedjax_sync.algorithms import registry
from tests.helpers import cli_error as _error, run_config as _config, run_rows as _rows

ASYNC = ['fedasync', 'fedbuff', 'fedqs_avg', 'fedqs_sgd']
AVERAGING = ['fda', 'local_sgd', 'periodic_fedadam', 'periodic_fedavgm']
TINY = ['--num-clients', '4', '--batch-size', '4', '--execution', 'vmap', '--quiet']


def test_the_registry_records_each_algorithm_timeline():
  assert registry.algorithm_names('semi_async') == ASYNC
  assert registry.algorithm_names('averaging') == AVERAGING
  synchronous = registry.algorithm_names()   # the default: what Simulator and Sweep run
  assert 'fedavg' in synchronous and not set(synchronous) & set(ASYNC + AVERAGING)
  assert set(registry.algorithm_names(None)) == set(synchronous + ASYNC + AVERAGING)
  for name in ASYNC + AVERAGING:
    assert 'arXiv' in registry.algorithm_descriptions()[name], name
    for h in registry.algorithm_hyperparameters(name):
      assert h.help and h.check(h.default) == h.default, (name, h)
  # Each algorithm's own engine default: FedAsync aggregates every update (K = 1).
  assert registry.resolve_hyperparameters('fedasync').buffer_size == 1
  assert registry.resolve_hyperparameters('fedbuff').buffer_size == 10
  # Build paths do not mix timelines up.
  with pytest.raises(ValueError, match=r"'fedbuff' runs on the semi_async timeline "
                                       r'\(SemiAsyncSimulator\), not synchronous'):
    registry.build_algorithm('fedbuff', lambda *a: 0.0)
  with pytest.raises(ValueError, match='runs on the synchronous timeline'):
    registry.build_algorithm('fedavg', lambda *a: 0.0, timeline='averaging')


def test_list_names_them_and_their_hyperparameters(capsys):
  capsys.readouterr()
  assert cli.main(['list']) == 0
  out = capsys.readouterr().out
  listed = {line.split()[0] for line in out.splitlines() if line.startswith('  ')}
  assert set(ASYNC + AVERAGING) <= listed
  assert cli.main(['list', '--algorithm', 'fedbuff']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert 'arXiv 2106.06639' in lines[0] and 'semi_async' in lines[0]
  by_key = {line.split()[0]: line for line in lines[2:]}
  assert 'default 10' in by_key['buffer_size'] and 'default 0.5' in by_key['staleness_exponent']
  assert cli.main(['list', '--algorithm', 'fda']) == 0
  lines = capsys.readouterr().out.splitlines()
  by_key = {line.split()[0]: line for line in lines[2:]}
  assert {'threshold', 'estimator', 'num_workers'} <= set(by_key)
  assert 'linear' in by_key['estimator'] and 'local steps' in lines[0]


def test_fedbuff_with_an_aggregator_writes_the_run_directory(tmp_path, capsys):
  run_dir = str(tmp_path / 'fedbuff')
  argv = ['run', '--algorithm', 'fedbuff', *TINY, '--rounds', '2', '--eval-every', '2',
          '--local-steps', '1', '--hparam', 'buffer_size=2', '--hparam', 'staleness_exponent=1',
          '--aggregator', 'chain(clip_by_norm(1.0), weighted_mean())', '--clock', 'speed_ratio',
          '--speed-ratio', '4', '--tensorboard', '--run-dir', run_dir]
  assert cli.main(argv) == 0
  assert 'after 2 aggregations' in capsys.readouterr().out
  config = _config(run_dir)
  assert config['algorithm'] == 'fedbuff' and config['timeline'] == 'semi_async'
  assert config['aggregator'] == 'chain(clip_by_norm(1.0), weighted_mean())'
  assert config['hyperparameters']['buffer_size'] == 2
  assert config['hyperparameters']['staleness_exponent'] == 1.0
  assert config['simulation']['num_aggregations'] == 2
  assert config['clock'] == {'model': 'speed_ratio', 'ratio': 4.0, 'jitter': 0.0, 'dropout': 0.0,
                             'seed': 0}
  assert config['data_seed'] == 0 and config['data_fingerprint']['num_clients'] == 4
  rows = _rows(run_dir)
  assert [r['round'] for r in rows] == [1, 2] == [r['aggregation'] for r in rows]
  assert all(math.isfinite(r['train_loss']) for r in rows)
  assert math.isfinite(rows[-1]['test_loss']) and 'test_loss' not in rows[0]
  assert all(r['num_participants'] == 2 for r in rows)   # K = 2 updates each
  assert all(r['aggregator/0/clipped_fraction'] >= 0 for r in rows)
  from fedjax_sync import sinks
  (events_file,) = sinks.event_files(run_dir)
  events = [e for e in sinks.read_events(events_file) if e['scalars']]
  assert [e['step'] for e in events] == [1, 2]
  assert events[1]['scalars']['test_loss'] == pytest.approx(rows[1]['test_loss'])
  # Times run from 1 to 4: the clock moves forward with every aggregation.
  assert 1.0 <= rows[0]['wall_clock'] < rows[1]['wall_clock'] <= 8.0


def test_fda_writes_one_row_per_local_step(tmp_path, capsys):
  run_dir = str(tmp_path / 'fda')
  argv = ['run', '--algorithm', 'fda', *TINY, '--rounds', '4', '--eval-every', '2', '--hparam',
          'num_workers=2', '--hparam', 'threshold=0', '--hparam', 'estimator=naive',
          '--run-dir', run_dir]   # (FDA with an aggregator: tests/test_timeline_aggregators.py)
  assert cli.main(argv) == 0
  config = _config(run_dir)
  assert config['timeline'] == 'averaging' and config['hyperparameters']['threshold'] == 0.0
  assert config['hyperparameters']['estimator'] == 'naive'   # (linear draws ξ op by op: slow)
  assert config['aggregator'] is None
  rows = _rows(run_dir)
  assert [r['round'] for r in rows] == [1, 2, 3, 4] == [r['step'] for r in rows]
  assert all(math.isfinite(r['train_loss']) for r in rows)
  # Θ = 0: the workers synchronize after every step in which they moved.
  assert [r['syncs'] for r in rows] == [1, 2, 3, 4] and all(r['synced'] for r in rows)
  assert [('test_loss' in r) for r in rows] == [False, True, False, True]
  assert math.isfinite(rows[-1]['test_loss']) and rows[3]['bytes'] > rows[1]['bytes'] > 0
  assert '4 local steps (4 synchronizations)' in capsys.readouterr().out


def test_a_bad_hparam_of_an_async_algorithm_names_the_valid_ones(tmp_path, capsys):
  err = _error(['run', '--algorithm', 'fedasync', '--hparam', 'threshold=0.5',
                '--run-dir', str(tmp_path / 'x')], capsys)
  assert "unknown hyperparameter 'threshold' for algorithm 'fedasync'" in err
  assert 'mixing' in err and 'buffer_size' in err
  err = _error(['run', '--algorithm', 'fedasync', '--hparam', 'mixing=1.5'], capsys)
  assert 'mixing = 1.5 is not valid' in err
  assert not os.path.exists(tmp_path / 'x')


@pytest.mark.parametrize('argv,expected', [
    (['--algorithm', 'fedqs_sgd', '--clients-per-round', '3'],
     '--clients-per-round does not apply to --algorithm fedqs_sgd (the semi_async timeline)'),
    (['--algorithm', 'fda', '--local-steps', '3'],
     '--local-steps does not apply to --algorithm fda (the averaging timeline)'),
    (['--algorithm', 'local_sgd', '--dropout', '0.1'],
     '--dropout does not apply to --algorithm local_sgd (the averaging timeline)'),
    (['--algorithm', 'local_sgd', '--deadline', '2'],
     '--deadline does not apply to --algorithm local_sgd (the averaging timeline)'),
    (['--algorithm', 'fedasync', '--first-m', '2'],
     '--first-m does not apply to --algorithm fedasync (the semi_async timeline)'),
    (['--algorithm', 'fedavg', '--deadline', '2', '--first-m', '2'],
     '--deadline and --first-m are two round policies'),
    (['--algorithm', 'fedavg', '--clock', 'lognormal', '--seeds', '2'],
     '--clock does not apply to --seeds/--sweep'),
    (['--algorithm', 'fedavg', '--clients-per-round', '3', '--over-selection', '0.5'],
     '--over-selection 0.5 samples 5 clients per round, more than the 4 clients'),
    (['--algorithm', 'fedbuff', '--speed-ratio', '3'],
     '--speed-ratio applies to --clock speed_ratio, not constant'),
    (['--algorithm', 'fedbuff', '--hparam', 'buffer_size=9'],
     'buffer_size=9 exceeds the 4 clients'),
])
def test_flags_that_do_not_apply_to_the_timeline_are_one_line_errors(argv, expected, capsys):
  err = _error(['run', *argv, '--num-clients', '4'], capsys)
  assert expected in err, err


def test_resume_of_a_directory_without_a_run_names_what_is_missing(tmp_path, capsys):
  err = _error(['run', '--algorithm', 'fedbuff', '--resume', str(tmp_path)], capsys)
  assert 'config.json is missing' in err


def test_round_policy_flags_wrap_the_synchronous_algorithm():
  from fedjax_sync import cli_timelines

  def parse(*flags):
    return cli.build_parser().parse_args(['run', '--clients-per-round', '4', *flags])

  algorithm = registry.build_algorithm('fedavg', lambda *a: 0.0)
  assert cli_timelines.synchronous_clock(parse(), algorithm, 10) == (algorithm, 4)
  wrapped, sampled = cli_timelines.synchronous_clock(parse('--over-selection', '0.5'),
                                                     algorithm, 10)
  assert sampled == 6 and wrapped.name == 'fedavg+clock'
  assert cli_timelines.synchronous_clock_record(parse('--over-selection', '0.5'))[
      'round_policy'] == {'kind': 'over_selection', 'fraction': 0.5, 'keeps_first': 4}
  record = cli_timelines.synchronous_clock_record(parse('--clock', 'lognormal', '--first-m', '3'))
  assert record['round_policy'] == {'kind': 'first_m', 'min_updates': 3}
  assert record['clock'] == {'model': 'lognormal', 'sigma': 1.0, 'jitter': 0.0, 'dropout': 0.0,
                             'seed': 0}
  assert cli_timelines.synchronous_clock_record(parse()) == {}


@pytest.mark.slow
def test_a_synchronous_run_with_a_deadline_drops_the_late_clients(tmp_path):
  # Job times evenly from 1 to 4 over the 4 clients (1, 2, 3, 4 in some order); all 4
  # sampled every round; a deadline of 2.5 keeps exactly the two fastest.
  run_dir = str(tmp_path / 'deadline')
  argv = ['run', '--algorithm', 'fedavg', *TINY, '--clients-per-round', '4', '--rounds', '2',
          '--eval-every', '2', '--local-steps', '1', '--clock', 'speed_ratio', '--speed-ratio',
          '4', '--deadline', '2.5', '--run-dir', run_dir]
  assert cli.main(argv) == 0
  config = _config(run_dir)
  assert config['round_policy'] == {'kind': 'deadline', 'deadline': 2.5}
  assert config['clock']['model'] == 'speed_ratio' and config['clock']['ratio'] == 4.0
  rows = _rows(run_dir)
  assert [(r['num_arrived'], r['num_late'], r['round_time']) for r in rows] == [(2, 2, 2.5)] * 2
  assert all(math.isfinite(r['train_loss']) for r in rows)
  assert 'round_policy' not in _config_of_plain_run(tmp_path)


def _config_of_plain_run(tmp_path):
  """config.json of a synchronous run without clock flags (written before any round)."""
  from fedjax_sync import cli_timelines
  args = cli.build_parser().parse_args(['run', '--dropout', '0'])
  assert not cli_timelines.clock_in_use(args)
  options = cli._identity_options(args)   # checkpoints made before the clock flags resume
  assert not set(options) & set(cli_timelines.CLOCK_DEFAULTS)
  return cli_timelines.synchronous_clock_record(args)
