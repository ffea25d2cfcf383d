"""Runs lose nothing: resume from any path, never start over, never write a round twice.

One tiny simulation (6 Synthetic(1, 1) clients, logistic regression, one local step,
4 rounds) serves every test; its compiled blocks are shared through a cache.
"""

import functools
import hashlib
import json
import math
import os
import shutil

import jax
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync import cli, reporting
from fedjax_sync.simulate import checkpoint

DATA = fs.synthetic(1.0, 1.0, num_clients=6, seed=3)
MODEL = fs.models.logistic_regression((60,), 10)


@functools.lru_cache(maxsize=None)
def _simulator(num_rounds: int, name: str = 'fedavg') -> fs.Simulator:
  algorithm = (fs.fed_avg(MODEL.loss, optax.sgd(0.1)) if name == 'fedavg' else
               fs.fed_sgd(MODEL.loss))
  config = fs.SimulationConfig(num_rounds=num_rounds, clients_per_round=3,
                               local_work=fs.LocalWork(batch_size=4, steps=1), eval_every=2,
                               per_client_eval=False)
  return fs.Simulator(algorithm, MODEL, DATA, config)


@functools.lru_cache(maxsize=None)
def _uninterrupted():
  return _simulator(4).run(_simulator(4).init(), progress=False)


def _run(run_dir, **kwargs):
  kwargs.setdefault('log', lambda message: None)
  return checkpoint.run_with_checkpoints(_simulator(4), run_dir=run_dir, every=2,
                                         progress=False, **kwargs)


class _Crash(Exception):
  pass


def _crash_after(rounds):
  def on_block(state, rounds_done, history):
    if rounds_done == rounds:
      raise _Crash
  return on_block


def _run_two_rounds_then_crash(run_dir):
  """Rounds 1-2 done and saved (a checkpoint every 2 rounds), then the process dies."""
  with pytest.raises(_Crash):
    _run(run_dir, on_block=_crash_after(2))


def _assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _rows(run_dir):
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _tree_digest(path) -> str:
  """SHA-256 over every file's relative path and bytes under `path`."""
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(root, name)
      h.update(os.path.relpath(full, path).encode())
      with open(full, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


@pytest.mark.parametrize('form', ['rel', './rel', 'a/../rel', 'from another directory'])
def test_resume_from_a_relative_path_continues_and_never_reruns(form, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  os.makedirs('a')
  _run_two_rounds_then_crash('rel')
  path = form
  if form == 'from another directory':
    os.makedirs('elsewhere')
    monkeypatch.chdir('elsewhere')
    path = os.path.join('..', 'rel')
  messages, blocks = [], []
  result = _run(path, resume=True, log=messages.append,
                on_block=lambda state, rounds_done, history: blocks.append(rounds_done))
  assert any('resumed from round 2' in m for m in messages), messages
  assert blocks == [4]                      # rounds 1-2 were not run again
  reference = _uninterrupted()
  _assert_bitwise(result.state, reference.state)
  assert result.history == reference.history
  assert _rows(path) == reference.history  # each round exactly once
  restored = checkpoint.restore_latest(os.path.join(path, 'checkpoints'), _simulator(4).init())
  assert restored.rounds_done == 4


def test_missing_metrics_are_rebuilt_from_the_checkpoint(tmp_path):
  run_dir = str(tmp_path / 'run')
  first = _run(run_dir)
  os.remove(os.path.join(run_dir, 'metrics.jsonl'))
  _run(run_dir, resume=True)
  assert _rows(run_dir) == first.history and len(first.history) == 4


@pytest.mark.parametrize('damage', ['no checkpoint', 'every checkpoint corrupt',
                                    'another algorithm', 'missing run directory'])
def test_resume_without_a_usable_checkpoint_is_an_error_and_changes_nothing(damage, tmp_path):
  run_dir = str(tmp_path / 'run')
  _run_two_rounds_then_crash(run_dir)
  simulator = _simulator(4)
  if damage == 'no checkpoint':
    shutil.rmtree(os.path.join(run_dir, 'checkpoints'))
  elif damage == 'every checkpoint corrupt':
    for _, path in checkpoint.list_checkpoints(os.path.join(run_dir, 'checkpoints')):
      with open(os.path.join(path, 'meta.json'), 'w') as f:
        f.write('{"format": ')
  elif damage == 'another algorithm':
    simulator = _simulator(4, 'fedsgd')     # another run
  else:
    run_dir = str(tmp_path / 'nowhere')
  before = _tree_digest(tmp_path)
  with pytest.raises(checkpoint.ResumeError) as info:
    checkpoint.run_with_checkpoints(simulator, run_dir=run_dir, resume=True, progress=False,
                                    log=lambda message: None)
  message = str(info.value)
  assert len(message.splitlines()) == 1 and run_dir in message
  expected = {'no checkpoint': 'no checkpoint', 'every checkpoint corrupt': 'not valid JSON',
              'another algorithm': 'made by another run: algorithm',
              'missing run directory': 'no such run directory'}[damage]
  assert expected in message, message
  assert _tree_digest(tmp_path) == before


def test_a_run_directory_with_rounds_is_never_appended_twice(tmp_path):
  run_dir = str(tmp_path / 'run')
  simulator = _simulator(4)
  simulator.run(simulator.init(), run_dir=_mkdir(run_dir), progress=False)
  before = _tree_digest(run_dir)
  with pytest.raises(ValueError, match='already holds rounds up to 4'):
    simulator.run(simulator.init(), run_dir=run_dir, progress=False)
  with pytest.raises(ValueError, match='already holds rounds up to 4'):
    simulator.run(simulator.init(), start_round=2, run_dir=run_dir, progress=False)
  with pytest.raises(ValueError, match='already holds rounds up to 4'):
    _run(run_dir)
  assert _tree_digest(run_dir) == before
  checkpointed = str(tmp_path / 'checkpointed')
  _run_two_rounds_then_crash(checkpointed)
  os.remove(os.path.join(checkpointed, 'metrics.jsonl'))
  with pytest.raises(ValueError, match='already holds checkpoints'):
    _run(checkpointed)


def _mkdir(path):
  os.makedirs(path)
  return path


def test_metrics_lines_are_strict_json_with_nonfinite_values_counted(tmp_path):
  rows = [{'round': 1, 'train_loss': float('nan'), 'test_loss': np.float32('inf'),
           'client_losses': [1.0, -math.inf]}, {'round': 2, 'train_loss': 0.5}]
  reporting.append_metrics(str(tmp_path), rows)

  def no_constants(name):
    raise AssertionError(f'bare {name} in metrics.jsonl')

  with open(tmp_path / 'metrics.jsonl') as f:
    parsed = [json.loads(line, parse_constant=no_constants) for line in f]
  assert parsed == [{'round': 1, 'train_loss': None, 'test_loss': None,
                     'client_losses': [1.0, None], 'nonfinite_metrics': 3},
                    {'round': 2, 'train_loss': 0.5}]
  assert reporting.last_metrics_round(str(tmp_path)) == 2


# ------------------------------------------------------------------ the command line

ARGS = ['--num-clients', '6', '--clients-per-round', '3', '--local-steps', '1',
        '--batch-size', '4', '--eval-every', '2', '--quiet']


@pytest.fixture(scope='module')
def uninterrupted_run(tmp_path_factory):
  """A 6-round command-line run, checkpoints every 2 rounds (kept: 4 and 6)."""
  run_dir = str(tmp_path_factory.mktemp('saved') / 'run')
  assert cli.main(['run', *ARGS, '--rounds', '6', '--checkpoint-every', '2',
                   '--run-dir', run_dir]) == 0
  return run_dir


@pytest.fixture
def saved_run(uninterrupted_run, tmp_path):
  """The same run as if started with --rounds 4: what `fedjax-sync run --rounds 4` leaves.

  Its round-4 checkpoint holds the state and the 4 rows of history a 4-round run
  saves (round 4 is an evaluation round either way, and rounds are keyed by their
  index), so only config.json and the later checkpoint and rows differ.
  """
  run_dir = str(tmp_path / 'saved')
  shutil.copytree(uninterrupted_run, run_dir)
  shutil.rmtree(os.path.join(run_dir, 'checkpoints', 'round_00000006'))
  reporting.write_metrics(run_dir, _rows(run_dir)[:4])
  path = os.path.join(run_dir, 'config.json')
  with open(path) as f:
    record = json.load(f)
  record['cli_args']['rounds'] = record['simulation']['num_rounds'] = 4
  with open(path, 'w') as f:
    json.dump(record, f, indent=2)
  return run_dir


def test_cli_resume_from_a_relative_path_extends_to_an_uninterrupted_run(
    saved_run, uninterrupted_run, tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  shutil.move(saved_run, 'rel')
  capsys.readouterr()
  assert cli.main(['run', '--resume', './rel', '--rounds', '6']) == 0
  err = capsys.readouterr().err
  assert 'resumed from round 4' in err and 'unusable' not in err
  assert _rows('rel') == _rows(uninterrupted_run) and len(_rows('rel')) == 6
  # The final checkpoints hold the same state and history (same SHA-256 of both).
  metas = []
  for d in ('rel', uninterrupted_run):
    with open(os.path.join(d, 'checkpoints', 'round_00000006', 'meta.json')) as f:
      metas.append(json.load(f))
  assert metas[0]['sha256'] == metas[1]['sha256']
  with open(os.path.join('rel', 'config.json')) as f:
    assert json.load(f)['cli_args']['rounds'] == 6


def _edit_config(run_dir, **changes):
  path = os.path.join(run_dir, 'config.json')
  with open(path) as f:
    record = json.load(f)
  record['cli_args'].update(changes)
  with open(path, 'w') as f:
    json.dump(record, f)


BAD_RESUMES = {
    # case: (damage to the copied run, extra options, text the error contains)
    'config.json missing': (lambda d: os.remove(os.path.join(d, 'config.json')), [],
                            'config.json is missing'),
    'config.json malformed': (lambda d: open(os.path.join(d, 'config.json'), 'w').write('{"cli'),
                              [], 'config.json is not valid JSON'),
    'config.json bad value': (lambda d: _edit_config(d, rounds='many'), [],
                              "config.json: cli_args 'rounds'"),
    'other algorithm in config.json': (lambda d: _edit_config(d, algorithm='fedprox'), [],
                                       'no usable checkpoint'),
    'other model in config.json': (lambda d: _edit_config(d, model='mlp'), [],
                                   'no usable checkpoint'),
    'no checkpoints': (lambda d: shutil.rmtree(os.path.join(d, 'checkpoints')), [],
                       'no checkpoint to resume from'),
    'contradicting --algorithm': (None, ['--algorithm', 'fedprox'], '--algorithm'),
    'contradicting --client-lr': (None, ['--client-lr', '0.5'], '--client-lr'),
    'fewer --rounds': (None, ['--rounds', '3'], '--rounds 3 is fewer'),
}


@pytest.mark.parametrize('case', sorted(BAD_RESUMES))
def test_cli_bad_resume_is_one_line_exit_2_and_changes_nothing(case, saved_run, tmp_path,
                                                               capsys):
  run_dir = saved_run
  damage, extra, needle = BAD_RESUMES[case]
  if damage is not None:
    damage(run_dir)
  before = _tree_digest(tmp_path)
  capsys.readouterr()
  assert cli.main(['run', '--resume', run_dir, *extra]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and needle in err, err
  assert _tree_digest(tmp_path) == before
