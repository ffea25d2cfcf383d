"""`fedjax-sync run --seeds N --sweep KEY=V1,V2,...`: one vmapped program, one member directory each.

One tiny sweep (3 seeds × 2 client learning rates, 1 round of 1 local step) carries the
checks: a member equals the single `fedjax-sync run` of its seed and value; with one
local SGD step from the same initial model and batches, the update of learning rate
0.1 is exactly twice that of 0.05 (the update norm doubles, the round's training loss,
taken before the step, is the same). The errors need no compilation.
"""

import os

import numpy as np
import pytest

from fedjax_sync import cli
from fedjax_sync.algorithms import registry
from fedjax_sync.cli_sweeps import member_label, member_run_dirs
from tests.helpers import cli_error as _error, run_config as _config, run_rows as _rows

TINY = ['--rounds', '1', '--num-clients', '6', '--clients-per-round', '3', '--local-steps', '1',
        '--batch-size', '5', '--eval-every', '1', '--execution', 'vmap', '--quiet']
SWEEP = ['--seed', '1', '--seeds', '3', '--sweep', 'client_learning_rate=0.05, 0.1']
LABELS = [f'client_learning_rate={lr},seed={s}' for s in (1, 2, 3) for lr in (0.05, 0.1)]


def _member(run_dir, label):
  return os.path.join(run_dir, 'members', label)


@pytest.fixture(scope='module')
def sweep_dir(tmp_path_factory):
  run_dir = str(tmp_path_factory.mktemp('sweep') / 'run')
  assert cli.main(['run', *TINY, *SWEEP, '--run-dir', run_dir]) == 0
  return run_dir


def test_one_directory_per_member_and_the_whole_run_listed(sweep_dir):
  assert sorted(os.listdir(os.path.join(sweep_dir, 'members'))) == sorted(LABELS)
  top = _config(sweep_dir)
  assert [m['label'] for m in top['members']] == LABELS
  assert top['sweep'] == {'seeds': [1, 2, 3], 'hyperparameters': {'client_learning_rate':
                                                                   [0.05, 0.1]}}
  assert not os.path.exists(os.path.join(sweep_dir, 'metrics.jsonl'))
  for member in top['members']:
    config = _config(os.path.join(sweep_dir, member['run_dir']))
    # What a single run of this member writes: its own seed and value, the same data.
    assert config['simulation']['seed'] == config['cli_args']['seed'] == member['seed']
    assert config['hyperparameters']['client_learning_rate'] == member['client_learning_rate']
    assert config['cli_args']['hparam'] == [f"client_learning_rate={member['client_learning_rate']}"]
    assert config['cli_args']['seeds'] is None and config['cli_args']['sweep'] is None
    assert config['data_seed'] == 0 and config['data_fingerprint'] == top['data_fingerprint']
    rows = _rows(os.path.join(sweep_dir, member['run_dir']))
    assert [r['round'] for r in rows] == [1]
    assert np.isfinite(rows[0]['test_loss'])


def test_a_member_equals_the_single_run_of_its_seed_and_value(sweep_dir, tmp_path):
  single = str(tmp_path / 'single')
  assert cli.main(['run', *TINY, '--seed', '2', '--client-lr', '0.1', '--run-dir', single]) == 0
  mine = _rows(_member(sweep_dir, 'client_learning_rate=0.1,seed=2'))
  theirs = _rows(single)
  assert len(mine) == len(theirs) == 1
  for key, value in theirs[0].items():
    np.testing.assert_allclose(mine[0][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  mine_config = _config(_member(sweep_dir, 'client_learning_rate=0.1,seed=2'))
  theirs_config = _config(single)
  for key in set(theirs_config) - {'cli_args'}:
    assert mine_config[key] == theirs_config[key], key


def test_members_differ_as_the_swept_learning_rate_says(sweep_dir):
  finals = {}
  for seed in (1, 2, 3):
    low = _rows(_member(sweep_dir, f'client_learning_rate=0.05,seed={seed}'))[0]
    high = _rows(_member(sweep_dir, f'client_learning_rate=0.1,seed={seed}'))[0]
    # One SGD step from the same model on the same batches: Δ(2η) = 2 Δ(η).
    np.testing.assert_allclose(high['update_norm'], 2 * low['update_norm'], rtol=1e-5)
    np.testing.assert_allclose(high['train_loss'], low['train_loss'], rtol=1e-6)
    finals[seed] = low['train_loss']
  assert len(set(np.round(list(finals.values()), 6))) == 3   # the seeds really differ


def test_plot_draws_the_members_of_a_sweep_directory(sweep_dir):
  assert member_run_dirs([sweep_dir]) == [_member(sweep_dir, label) for label in sorted(LABELS)]
  assert cli.main(['plot', sweep_dir]) == 0
  assert os.path.getsize(os.path.join(sweep_dir, 'overlay.png')) > 0


def test_member_labels():
  assert member_label({'seed': 4}) == 'seed=4'
  assert member_label({'seed': 0, 'server_learning_rate': 1.0, 'client_learning_rate': 1e-05}) \
      == 'client_learning_rate=1e-05,server_learning_rate=1.0,seed=0'


def test_an_untraceable_key_names_the_keys_that_can_be_swept(tmp_path, capsys):
  run_dir = str(tmp_path / 'run')
  err = _error(['run', *TINY, '--sweep', 'client_momentum=0.5,0.9', '--run-dir', run_dir], capsys)
  assert 'fedavg uses client_momentum as a Python value' in err
  assert err.endswith('valid --sweep keys for fedavg: client_learning_rate, server_learning_rate '
                      '(or one run per value with --hparam client_momentum=V)')
  assert not os.path.exists(run_dir)   # nothing ran: nothing left behind


@pytest.mark.parametrize('extra,message', [
    (['--sweep', 'learning_rate=0.1'], "--sweep learning_rate=0.1: 'learning_rate' is not a "
     'hyperparameter of fedavg; valid --sweep keys for fedavg: client_learning_rate, '
     'client_momentum, server_learning_rate'),
    (['--algorithm', 'scaffold', '--sweep', 'scaffold_option=I,II'], "'scaffold_option' is a "
     'str hyperparameter of scaffold; valid --sweep keys for scaffold: client_learning_rate'),
    (['--sweep', 'client_learning_rate=0.1,-1'], '--sweep client_learning_rate=0.1,-1: '
     'hyperparameter client_learning_rate = -1.0 is not valid; expected float > 0'),
    (['--sweep', 'client_learning_rate=0.1,0.10'], "the value 0.1 is given twice"),
    (['--sweep', 'client_learning_rate'], 'is not KEY=V1,V2,...'),
    (['--sweep', 'client_learning_rate=0.1', '--client-lr', '0.2'],
     '--sweep client_learning_rate=0.1 and --client-lr both set client_learning_rate'),
    (['--sweep', 'client_learning_rate=0.1', '--hparam', 'client_learning_rate=0.2'],
     'and --hparam client_learning_rate both set client_learning_rate'),
    (['--seeds', '2', '--shard'], '--shard with --seeds 2'),
    (['--seeds', '2', '--dropout', '0.1'], '--dropout does not apply to --seeds/--sweep '
     '(--seeds 2): sweeps do not simulate a clock or round policy yet'),
    (['--seeds', '2', '--seed', str(2**31 - 1)], 'the last member seed would be 2147483648'),
    (['--sweep', 'client_learning_rate=0.1', '--config', 'x.py'], '--sweep does not apply to '
     '--config'),
])
def test_bad_sweeps_are_one_line_errors(extra, message, tmp_path, capsys):
  run_dir = str(tmp_path / 'run')
  err = _error(['run', *TINY, *extra, '--run-dir', run_dir], capsys)
  assert message in err
  assert not os.path.exists(run_dir)


def test_a_sweep_without_checkpoints_cannot_be_resumed(sweep_dir, capsys):
  err = _error(['run', '--resume', sweep_dir], capsys)
  assert 'no checkpoint to resume from' in err and 'nothing was changed' in err


def test_seeds_with_an_fda_algorithm_name_the_timelines_that_sweep(tmp_path, capsys):
  averaging = registry.algorithm_names('averaging')
  err = _error(['run', *TINY, '--algorithm', averaging[0], '--seeds', '2', '--run-dir',
                str(tmp_path / 'run')], capsys)
  assert (f'--seeds 2 with --algorithm {averaging[0]}: sweeps run the synchronous and '
          'semi-asynchronous timelines') in err
  assert 'fedavg' in err and 'fedbuff' in err


def test_an_asynchronous_sweep_is_checkpointed_and_resumed(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.main(['run', '--algorithm', 'fedbuff', '--rounds', '2', '--num-clients', '6',
                   '--hparam', 'buffer_size=2', '--local-steps', '1', '--batch-size', '5',
                   '--eval-every', '1', '--quiet', '--seeds', '2', '--checkpoint-every', '1',
                   '--run-dir', 'sweep']) == 0
  assert cli.main(['run', '--resume', 'sweep', '--rounds', '3', '--quiet']) == 0
  for seed in (0, 1):
    rows = _rows(_member('sweep', f'seed={seed}'))
    assert [r['aggregation'] for r in rows] == [1, 2, 3]
    assert all(r['seed'] == seed for r in rows)
  assert _config('sweep')['timeline'] == 'semi_async'
