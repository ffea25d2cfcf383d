"""Checkpoints: bitwise round trips, corrupt-checkpoint fallback, Ctrl-C and --resume."""

import functools
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync import cli
from fedjax_sync.simulate import checkpoint


@functools.lru_cache(maxsize=None)
def _simulator(num_rounds=8, eval_every=3, seed=0):
  # Cached: a Simulator is stateless apart from its compiled blocks, so tests share one.
  data = fs.synthetic(1.0, 1.0, num_clients=12, seed=0)
  model = fs.models.logistic_regression((60,), 10)
  algorithm = fs.fed_avg_m(model.loss, optax.sgd(0.05), server_learning_rate=1.0,
                           server_momentum=0.9)
  config = fs.SimulationConfig(num_rounds=num_rounds, clients_per_round=4,
                               local_work=fs.LocalWork(batch_size=10, steps=3),
                               eval_every=eval_every, seed=seed, per_client_eval=False)
  return fs.Simulator(algorithm, model, data, config)


def _assert_bitwise(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def _example_state():
  return fs.ServerState(
      params={'w': jnp.arange(6.0).reshape(2, 3), 'b': jnp.array([1.5], jnp.float32)},
      opt_state=(optax.EmptyState(), {'mu': jnp.ones((2, 3))}),
      aggregator_state={'key': jax.random.key(7), 'count': jnp.int32(3)},
      client_states={'c': jnp.linspace(0, 1, 20).reshape(10, 2)},
      extra=(), round=jnp.int32(5))


def test_save_restore_bitwise_with_keys_and_empty_nodes(tmp_path):
  state = _example_state()
  history = [{'round': 1, 'train_loss': 0.5}]
  checkpoint.save(str(tmp_path), state, 5, history)
  restored = checkpoint.restore_latest(str(tmp_path), _example_state())
  assert restored.rounds_done == 5 and restored.history == history
  key = restored.state.aggregator_state['key']
  assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(jax.random.key(7)))
  restored_plain = restored.state._replace(aggregator_state=restored.state.aggregator_state['count'])
  _assert_bitwise(restored_plain, state._replace(aggregator_state=state.aggregator_state['count']))


def test_keep_deletes_old_checkpoints(tmp_path):
  state = _example_state()
  for r in (2, 4, 6):
    checkpoint.save(str(tmp_path), state, r, [], keep=2)
  assert [r for r, _ in checkpoint.list_checkpoints(str(tmp_path))] == [4, 6]


def test_a_stale_later_checkpoint_never_deletes_a_new_one(tmp_path):
  # round 10 is left by an abandoned run; the resumed run saves rounds 4 and 6.
  state = _example_state()
  checkpoint.save(str(tmp_path), state, 10, [], keep=1)
  for r in (4, 6):
    checkpoint.save(str(tmp_path), state, r, [], keep=1)
    assert r in [k for k, _ in checkpoint.list_checkpoints(str(tmp_path))]
  assert [r for r, _ in checkpoint.list_checkpoints(str(tmp_path))] == [6, 10]


def test_relative_checkpoint_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  checkpoint.save('rel/checkpoints', _example_state(), 3, [{'round': 3}])
  restored = checkpoint.restore_latest('./rel/../rel/checkpoints', _example_state())
  assert restored.rounds_done == 3 and os.path.isabs(restored.path)


def _corrupt_largest_file(path):
  files = [os.path.join(root, f) for root, _, fs_ in os.walk(os.path.join(path, 'state'))
           for f in fs_]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    size = os.path.getsize(largest)
    f.truncate(size // 2)


@pytest.mark.parametrize('damage', ['truncate', 'no_meta', 'flip_history'])
def test_corrupt_checkpoint_falls_back_to_previous(tmp_path, damage):
  old = _example_state()
  new = old._replace(params={'w': old.params['w'] + 1.0, 'b': old.params['b']})
  checkpoint.save(str(tmp_path), old, 3, [{'round': 3}])
  path = checkpoint.save(str(tmp_path), new, 6, [{'round': 6}])
  if damage == 'truncate':
    _corrupt_largest_file(path)
  elif damage == 'no_meta':
    os.remove(os.path.join(path, 'meta.json'))
  else:
    with open(os.path.join(path, 'history.json'), 'w') as f:
      f.write('[{"round": 7}]')
  messages = []
  restored = checkpoint.restore_latest(str(tmp_path), _example_state(), log=messages.append)
  assert restored.rounds_done == 3
  np.testing.assert_array_equal(restored.state.params['w'], old.params['w'])
  assert len(messages) == 1 and 'round_00000006' in messages[0] and 'previous' in messages[0]


def test_restore_rejects_other_structure(tmp_path):
  checkpoint.save(str(tmp_path), _example_state(), 3, [])
  other = _example_state()._replace(params={'w': jnp.zeros((3, 3)), 'b': jnp.zeros((1,))})
  messages = []
  assert checkpoint.restore_latest(str(tmp_path), other, log=messages.append) is None
  assert 'differs' in messages[0]


def test_interrupt_and_resume_bitwise_identical(tmp_path):
  # Uninterrupted reference with the same checkpoint period.
  reference = checkpoint.run_with_checkpoints(_simulator(), run_dir=str(tmp_path / 'ref'),
                                              every=2, progress=False)
  # The same run, Ctrl-C during round block 3..4 (delivered as a real SIGINT).
  run_dir = str(tmp_path / 'run')
  os.makedirs(run_dir)

  def send_sigint(state, rounds_done, history):
    if rounds_done == 2:
      os.kill(os.getpid(), signal.SIGINT)

  with pytest.raises(checkpoint.RunInterrupted) as info:
    checkpoint.run_with_checkpoints(_simulator(), run_dir=run_dir, every=2, progress=False,
                                    on_block=send_sigint, log=lambda m: None)
  # Blocks end at rounds 2, 3 (evaluation), 4, 6, 8: the block in flight (round 3)
  # finished, then the state was saved.
  assert info.value.rounds_done == 3
  # Pretend the process died after writing round 5's metrics line but before saving.
  with open(os.path.join(run_dir, 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps({'round': 5, 'train_loss': 123.0}) + '\n{"round": 6, "tra')
  resumed = checkpoint.run_with_checkpoints(_simulator(), run_dir=run_dir, every=2, resume=True,
                                            progress=False, log=lambda m: None)
  _assert_bitwise(resumed.state, reference.state)
  assert resumed.history == reference.history
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['round'] for r in rows] == list(range(1, 9))
  assert rows == reference.history


def test_checkpointed_run_equals_plain_run(tmp_path):
  plain = _simulator().run(_simulator().init(), progress=False)
  checkpointed = checkpoint.run_with_checkpoints(_simulator(), run_dir=str(tmp_path), every=2,
                                                 progress=False)
  _assert_bitwise(checkpointed.state, plain.state)
  assert ([r['train_loss'] for r in checkpointed.history]
          == [r['train_loss'] for r in plain.history])
  eval_rounds = [r['round'] for r in checkpointed.history if 'test_accuracy' in r]
  assert eval_rounds == [3, 6, 8]   # checkpoint blocks do not add evaluations


def test_cli_checkpoint_every_and_resume(tmp_path, capsys):
  b = str(tmp_path / 'b')
  assert cli.main(['run', '--rounds', '6', '--num-clients', '8', '--clients-per-round', '3',
                   '--local-steps', '2', '--eval-every', '3', '--quiet', '--run-dir', b,
                   '--checkpoint-every', '2']) == 0
  directory = os.path.join(b, checkpoint.CHECKPOINT_DIR)
  ckpts = checkpoint.list_checkpoints(directory)
  assert [r for r, _ in ckpts] == [4, 6]
  template = _cli_template(b)
  first = checkpoint.restore_latest(directory, template)
  with open(os.path.join(b, 'metrics.jsonl')) as f:
    rows_first = [json.loads(line) for line in f]
  # Lose the last checkpoint, then resume: rounds 5 and 6 run again.
  import shutil
  shutil.rmtree(ckpts[-1][1])
  assert cli.main(['run', '--resume', b, '--quiet']) == 0
  assert 'resumed from round 4' in capsys.readouterr().err
  with open(os.path.join(b, 'metrics.jsonl')) as f:
    rows_second = [json.loads(line) for line in f]
  assert rows_second == rows_first and len(rows_first) == 6
  second = checkpoint.restore_latest(directory, template)
  assert second.rounds_done == 6
  _assert_bitwise(second.state, first.state)


def _cli_template(run_dir):
  with open(os.path.join(run_dir, 'config.json')) as f:
    cfg = json.load(f)['cli_args']
  data = fs.synthetic(1.0, 1.0, num_clients=cfg['num_clients'], seed=cfg['seed'])
  model = fs.models.logistic_regression((60,), 10)
  algorithm = fs.build_algorithm(cfg['algorithm'], model.loss, fs.Hyperparameters(),
                                 num_clients=cfg['num_clients'])
  return algorithm.init(model.init(jax.random.key(0)))


def test_resume_errors(tmp_path):
  assert cli.main(['run', '--resume', str(tmp_path / 'missing')]) == 2
  with pytest.raises(ValueError, match='every'):
    checkpoint.run_with_checkpoints(_simulator(), run_dir=str(tmp_path), every=0)
  with pytest.raises(ValueError, match='keep'):
    checkpoint.save(str(tmp_path), _example_state(), 1, [], keep=0)
