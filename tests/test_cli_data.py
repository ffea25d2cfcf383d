"""The command line's data options: --data-path, --data-seed, the partition flags, and
the data fingerprint that config.json records and `--resume` checks.

Data come from a tiny .npz (160 examples of 6 features, 4 classes); option checks
and partitions go through the CLI's own loading (`cli._load_data`) without
training; one short run (one round of logistic regression, checkpointed) covers config.json
and resuming.
"""

import argparse
import json
import os
import shutil

import numpy as np
import pytest

from fedjax_sync import cli
from fedjax_sync.data.federated import data_fingerprint
from fedjax_sync.simulate import checkpoint

NUM_CLASSES = 4


def _write_npz(path, seed=0, shift=0.0):
  rng = np.random.default_rng(seed)
  y_train = np.repeat(np.arange(NUM_CLASSES), 40)     # 40 examples of each class
  x_train = rng.normal(size=(160, 6)).astype(np.float32) + y_train[:, None] + shift
  y_test = np.arange(20) % NUM_CLASSES
  x_test = rng.normal(size=(20, 6)).astype(np.float32) + y_test[:, None]
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return str(path)


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
  return _write_npz(tmp_path_factory.mktemp('data') / 'tiny.npz')


def _data(*argv):
  """The data `fedjax-sync run ARGV` would train on, and its partition settings."""
  args = cli.build_parser().parse_args(['run', '--num-clients', '4', *argv])
  args.dataset = args.dataset or 'synthetic'
  partition = cli._partition_settings(args)
  return cli._load_data(args, partition), partition


def _labels_per_client(data):
  return [len(np.unique(data.client(k)['y'])) for k in range(data.num_clients)]


def _top_label_share(data):
  """The mean over clients of the share of their most frequent label."""
  return np.mean([np.bincount(data.client(k)['y'], minlength=NUM_CLASSES).max() / data.counts[k]
                  for k in range(data.num_clients)])


def test_the_data_seed_alone_fixes_the_data(npz):
  base = data_fingerprint(_data('--dataset', 'npz', '--data-path', npz, '--seed', '0')[0])
  other_seed = data_fingerprint(_data('--dataset', 'npz', '--data-path', npz, '--seed', '7')[0])
  other_data = data_fingerprint(_data('--dataset', 'npz', '--data-path', npz,
                                      '--data-seed', '1')[0])
  assert base == other_seed
  assert base['sha256'] != other_data['sha256']
  assert base['num_examples'] == other_data['num_examples'] == 160
  # Generated data too: --seed no longer regenerates synthetic's clients.
  synthetic = [data_fingerprint(_data('--seed', s)[0])['sha256'] for s in ('0', '5')]
  assert synthetic[0] == synthetic[1]
  assert data_fingerprint(_data('--data-seed', '5')[0])['sha256'] != synthetic[0]


def test_partition_flags_shape_the_clients(npz):
  source = ('--dataset', 'npz', '--data-path', npz)
  iid, settings = _data(*source, '--partition', 'iid')
  assert settings == {'partition': 'iid'}
  assert sorted(iid.counts.tolist()) == [40, 40, 40, 40]
  assert min(_labels_per_client(iid)) >= 3          # 40 random rows hold most labels
  skewed, settings = _data(*source, '--alpha', '0.05')      # dirichlet is the default
  assert settings == {'partition': 'dirichlet', 'alpha': 0.05}
  # Small α: a few labels dominate each client (IID: about a quarter each).
  assert _top_label_share(skewed) > 0.7 and _top_label_share(iid) < 0.45
  assert skewed.counts.max() > 40                   # and client sizes vary
  for shards in (1, 2):
    data, settings = _data(*source, '--partition', 'shards', '--shards-per-client', str(shards))
    assert settings == {'partition': 'shards', 'shards_per_client': shards}
    assert max(_labels_per_client(data)) <= shards
    assert data.num_examples == 160                 # every example dealt once
    np.testing.assert_array_equal(np.sort(data.train['y']), np.repeat(np.arange(4), 40))


def _leaf(tmp_path):
  path = tmp_path / 'leaf.json'
  users = {f'u{i}': {'x': [[0.5] * 3] * 4, 'y': [0, 1, 0, 1]} for i in range(3)}
  path.write_text(json.dumps({'users': list(users), 'num_samples': [4] * 3,
                              'user_data': users}))
  return str(path)


BAD = {
    # case: (argv after `run`, built from (npz, tmp_path); texts the one line contains)
    'alpha 0': (lambda n, t: ['--alpha', '0'], ["--alpha: '0'", 'valid: a finite number > 0']),
    'alpha inf': (lambda n, t: ['--alpha', 'inf'], ["'inf'", 'valid']),
    'shards 0': (lambda n, t: ['--shards-per-client', '0'], ['--shards-per-client', "'0'",
                                                             'valid: 1 to']),
    'shards infeasible': (lambda n, t: ['--dataset', 'npz', '--data-path', n, '--num-clients', '4',
                                        '--partition',
                                        'shards', '--shards-per-client', '50'],
                          ['--shards-per-client 50', 'valid: 1 to 40']),
    'shards too few': (lambda n, t: ['--dataset', 'npz', '--data-path', n, '--num-clients',
                                     '2', '--partition', 'shards', '--shards-per-client', '1'],
                       ['--shards-per-client 1', 'valid: 2 to 80']),
    'partition unknown': (lambda n, t: ['--partition', 'zipf'], ['--partition', 'iid']),
    'alpha with shards': (lambda n, t: ['--dataset', 'npz', '--data-path', n, '--partition',
                                        'shards', '--alpha', '0.1'],
                          ['--alpha 0.1 applies to --partition dirichlet']),
    'shards with default': (lambda n, t: ['--dataset', 'npz', '--data-path', n,
                                          '--shards-per-client', '2'],
                            ['applies to --partition shards']),
    'partition on synthetic': (lambda n, t: ['--partition', 'iid'],
                               ["--dataset 'synthetic' has its own clients", 'synthetic_pooled']),
    'alpha on shakespeare': (lambda n, t: ['--dataset', 'shakespeare', '--alpha', '0.1'],
                             ["'shakespeare' has its own clients", 'valid']),
    'partition on a LEAF file': (lambda n, t: ['--dataset', _leaf(t), '--partition', 'iid'],
                                 ['has its own clients']),
    'npz without --data-path': (lambda n, t: ['--dataset', 'npz'], ['--data-path FILE.npz']),
    'npz missing file': (lambda n, t: ['--dataset', 'npz', '--data-path', str(t / 'no.npz')],
                         ['no.npz']),
    '--data-path on synthetic': (lambda n, t: ['--data-path', n],
                                 ["--data-path", "--dataset 'synthetic'", 'npz']),
    '--data-path with a path dataset': (lambda n, t: ['--dataset', _leaf(t), '--data-path', n],
                                        ['a --dataset given as a path']),
    'data seed negative': (lambda n, t: ['--data-seed', '-1'], ['--data-seed', 'valid']),
    'partition with --config': (lambda n, t: ['--config', 'study.py', '--partition', 'iid'],
                                ['--partition does not apply to --config']),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_data_options_are_one_line_exit_2_and_leave_nothing(case, npz, tmp_path, capsys,
                                                                monkeypatch):
  monkeypatch.chdir(tmp_path)
  build, needles = BAD[case]
  argv = ['run', '--rounds', '1', '--quiet', '--run-dir', 'out', *build(npz, tmp_path)]
  before = sorted(os.listdir(tmp_path))
  try:
    code = cli.main(argv)
  except SystemExit as e:   # argparse errors
    code = e.code
  err = capsys.readouterr().err.strip()
  assert code == 2, err
  assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
  for needle in needles:
    assert needle in err, err
  assert sorted(os.listdir(tmp_path)) == before


SMALL = ['--num-clients', '4', '--clients-per-round', '2', '--local-steps', '1',
         '--batch-size', '4', '--eval-every', '1', '--model', 'logistic_regression',
         '--quiet']


def _config(run_dir):
  with open(os.path.join(run_dir, 'config.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def run_dir(npz, tmp_path_factory):
  """One checkpointed one-round run of the .npz (--data-path), made as runs were before
  --data-seed existed (data seed = --seed = 2)."""
  path = str(tmp_path_factory.mktemp('runs') / 'run')
  assert cli.main(['run', '--dataset', 'npz', '--data-path', npz, *SMALL, '--rounds', '1',
                   '--seed', '2', '--data-seed', '2', '--checkpoint-every', '1',
                   '--run-dir', path]) == 0
  return path


def test_config_records_the_data_seed_partition_and_fingerprint(run_dir, npz):
  record = _config(run_dir)
  assert record['data_seed'] == 2
  assert record['cli_args']['data_path'] == os.path.abspath(npz)
  assert record['partition'] == {'partition': 'dirichlet', 'alpha': 0.5, 'method': 'per_class'}
  expected = data_fingerprint(_data('--dataset', 'npz', '--data-path', npz, '--seed', '9',
                                    '--data-seed', '2')[0])
  assert record['data_fingerprint'] == expected
  assert record['data_fingerprint']['num_examples'] == 160
  assert record['data_fingerprint']['counts']['max'] > 40      # Dirichlet(0.5) sizes vary


def test_resume_refuses_data_changed_under_the_run(run_dir, tmp_path, capsys):
  copy = str(tmp_path / 'run')
  shutil.copytree(run_dir, copy)
  changed = _write_npz(tmp_path / 'changed.npz', shift=0.25)   # same shapes, other values
  before = {name: open(os.path.join(copy, name), 'rb').read()
            for name in ('config.json', 'metrics.jsonl')}
  capsys.readouterr()
  assert cli.main(['run', '--resume', copy, '--rounds', '2', '--data-path', changed]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'the data changed under the run' in err, err
  assert before == {name: open(os.path.join(copy, name), 'rb').read() for name in before}
  # Another --data-seed on resume contradicts the recorded one.
  assert cli.main(['run', '--resume', copy, '--data-seed', '3']) == 2
  assert '--data-seed 3 contradicts' in capsys.readouterr().err


def test_a_run_made_before_data_seeds_resumes_as_it_was_made(run_dir, tmp_path):
  """A config.json without data_seed (older runs: --seed seeded the data) resumes with
  data seed = --seed, the same data, and the identity its checkpoints were saved with."""
  old = str(tmp_path / 'old')
  shutil.copytree(run_dir, old)
  record = _config(old)
  for key in ('data_seed', 'partition', 'data_fingerprint'):
    del record[key]
  for key in ('data_seed', 'partition', 'alpha', 'shards_per_client'):
    del record['cli_args'][key]
  with open(os.path.join(old, 'config.json'), 'w') as f:
    json.dump(record, f)
  args = cli._resumed_args(argparse.Namespace(resume=old), set())
  assert args.data_seed == args.seed == 2
  data = cli._load_data(args, cli._partition_settings(args))
  assert data_fingerprint(data) == _config(run_dir)['data_fingerprint']
  cli._check_data_unchanged(args, data_fingerprint(data))   # nothing recorded: no check
  (_, newest), = checkpoint.list_checkpoints(os.path.join(old, 'checkpoints'))
  with open(os.path.join(newest, 'meta.json')) as f:
    saved = json.load(f)['identity']['options']
  assert saved == checkpoint._canonical(cli._identity_options(args))
  assert 'data_seed' not in saved and 'partition' not in saved
