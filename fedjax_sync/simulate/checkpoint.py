"""Checkpoints of a whole simulation with orbax: long runs lose nothing.

A checkpoint holds everything a run needs to continue bit for bit:

* the whole `ServerState` (params, server optimizer state, aggregator state,
  per-client state `[N, ...]`, algorithm extra state, round counter);
* the number of rounds done. The RNG needs nothing more: round r's key is
  `fold_in(run_key, r)` from the seed (`Simulator.round_key`), so the round index
  *is* the sampler's and the RNG's position;
* the metrics history so far (one row per round, as in `metrics.jsonl`).

Layout: `<run_dir>/checkpoints/round_<r:08d>/` with `state/` (orbax, the state's
leaves as a flat dict of arrays, no pickle), `history.json` and, written last,
`meta.json` (round, leaf shapes and dtypes, and a SHA-256 digest of the leaves and
history). A checkpoint without `meta.json` is incomplete; one whose restored bytes do
not match the digest is corrupt; either way `restore_latest` says so and falls back
to the previous one. The newest `keep` checkpoints are kept.

`run_with_checkpoints` drives a `Simulator`: a checkpoint every `every` rounds (the
compiled blocks end on those rounds), and on Ctrl-C the block in flight finishes, a
checkpoint is saved and `RunInterrupted` (a `KeyboardInterrupt`) is raised. Resuming
truncates `metrics.jsonl` to the restored round and continues; the final state is
bitwise identical to an uninterrupted run with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import threading
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from fedjax_sync.types import ServerState

CHECKPOINT_DIR = 'checkpoints'
FORMAT = 'fedjax-sync-checkpoint-1'


class Restored(NamedTuple):
  """A restored checkpoint: the state after `rounds_done` rounds and the history."""

  state: Any
  rounds_done: int
  history: list[dict[str, Any]]
  path: str


class RunInterrupted(KeyboardInterrupt):
  """Ctrl-C during `run_with_checkpoints`: the checkpoint of `rounds_done` is saved."""

  def __init__(self, rounds_done: int, path: str):
    super().__init__(f'interrupted after round {rounds_done}; checkpoint saved in {path}')
    self.rounds_done = rounds_done
    self.path = path


def _is_key(x) -> bool:
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host_leaves(state) -> list[np.ndarray]:
  """The state's leaves as host numpy arrays (typed PRNG keys as their key data)."""
  leaves = jax.tree.leaves(state)
  leaves = [jax.random.key_data(x) if _is_key(x) else x for x in leaves]
  out = []
  for x in leaves:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      # Multi-process: the simulation state is replicated; every process holds it.
      x = x.addressable_data(0)
    out.append(np.asarray(x))
  return out


def _digest(leaves: list[np.ndarray], history_text: str) -> str:
  h = hashlib.sha256()
  for x in leaves:
    h.update(str((x.shape, x.dtype.str)).encode())
    h.update(np.ascontiguousarray(x).tobytes())
  h.update(history_text.encode())
  return h.hexdigest()


def checkpoint_path(directory: str, rounds_done: int) -> str:
  return os.path.join(directory, f'round_{rounds_done:08d}')


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
  """`(rounds_done, path)` of every checkpoint directory under `directory`, oldest first."""
  if not os.path.isdir(directory):
    return []
  out = []
  for name in os.listdir(directory):
    if name.startswith('round_') and name[6:].isdigit():
      out.append((int(name[6:]), os.path.join(directory, name)))
  return sorted(out)


def save(directory: str, state, rounds_done: int, history: list[dict[str, Any]], *,
         keep: int = 2) -> str:
  """Saves the state after `rounds_done` rounds and the history; returns the path.

  Args:
    directory: the checkpoint directory (e.g. `<run_dir>/checkpoints`).
    state: the `ServerState` (any pytree of arrays).
    rounds_done: rounds completed; the next round to run.
    history: metric rows so far (JSON-serializable).
    keep: number of newest checkpoints to keep (older ones are deleted).
  """
  import orbax.checkpoint as ocp

  if not isinstance(keep, int) or keep < 1:
    raise ValueError(f'keep must be a positive integer, got {keep!r}')
  path = os.path.abspath(checkpoint_path(directory, rounds_done))
  leaves = _host_leaves(state)
  history_text = json.dumps(history)
  primary = jax.process_index() == 0
  if primary and os.path.exists(path):
    shutil.rmtree(path)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(path, 'state'),
                    {f'leaf_{i:05d}': x for i, x in enumerate(leaves)}, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if primary:
    with open(os.path.join(path, 'history.json'), 'w') as f:
      f.write(history_text)
    meta = {'format': FORMAT, 'rounds_done': int(rounds_done), 'num_leaves': len(leaves),
            'shapes': [list(x.shape) for x in leaves], 'dtypes': [x.dtype.str for x in leaves],
            'sha256': _digest(leaves, history_text)}
    tmp = os.path.join(path, 'meta.json.tmp')
    with open(tmp, 'w') as f:
      json.dump(meta, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, 'meta.json'))   # the commit point
    for _, old in list_checkpoints(directory)[:-keep]:
      shutil.rmtree(old, ignore_errors=True)
  return path


def _load(path: str, like) -> Restored:
  import orbax.checkpoint as ocp

  meta_file = os.path.join(path, 'meta.json')
  if not os.path.isfile(meta_file):
    raise ValueError('incomplete (no meta.json: the save did not finish)')
  with open(meta_file) as f:
    meta = json.load(f)
  if meta.get('format') != FORMAT:
    raise ValueError(f"unknown format {meta.get('format')!r}, expected {FORMAT!r}")
  template, treedef = jax.tree.flatten(like)
  expected = _host_leaves_spec(template)
  found = list(zip(map(tuple, meta['shapes']), meta['dtypes']))
  if found != expected:
    raise ValueError(f'state structure differs from this simulation ({len(found)} leaves '
                     f'saved, {len(expected)} expected, or different shapes/dtypes)')
  with open(os.path.join(path, 'history.json')) as f:
    history_text = f.read()
  checkpointer = ocp.StandardCheckpointer()
  try:
    restored = checkpointer.restore(os.path.join(path, 'state'))
  finally:
    checkpointer.close()
  leaves = [np.asarray(restored[f'leaf_{i:05d}']) for i in range(meta['num_leaves'])]
  if _digest(leaves, history_text) != meta['sha256']:
    raise ValueError('corrupt (SHA-256 of the restored arrays does not match meta.json)')
  out = []
  for x, t in zip(leaves, template):
    if _is_key(t):
      out.append(jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)))
    elif isinstance(t, jax.Array):
      sharding = t.sharding
      out.append(jax.make_array_from_callback(x.shape, sharding, lambda idx, x=x: x[idx]))
    else:
      out.append(x)
  return Restored(jax.tree.unflatten(treedef, out), int(meta['rounds_done']),
                  json.loads(history_text), path)


def _host_leaves_spec(template) -> list[tuple[tuple[int, ...], str]]:
  spec = []
  for t in template:
    if _is_key(t):
      t = jax.eval_shape(jax.random.key_data, t)
    spec.append((tuple(np.shape(t)), np.dtype(t.dtype).str))
  return spec


def restore_latest(directory: str, like, *, log: Callable[[str], None] | None = None
                   ) -> Restored | None:
  """Restores the newest valid checkpoint under `directory`, or None if there is none.

  A checkpoint that is incomplete, corrupt or of another simulation is reported
  through `log` (default: stderr) and the previous one is tried.

  Args:
    directory: the checkpoint directory.
    like: a state of the same structure (e.g. `simulator.init()`); gives the tree
      structure, key types and shardings of the restored arrays.
  """
  log = log or (lambda m: print(m, file=sys.stderr, flush=True))
  for rounds_done, path in reversed(list_checkpoints(directory)):
    try:
      return _load(path, like)
    except Exception as e:  # noqa: BLE001 - any failure means: not usable, try the previous
      log(f'fedjax-sync: checkpoint {path} is unusable ({e}); trying the previous one')
  return None


def _truncate_metrics(run_dir: str, rounds_done: int) -> None:
  """Drops `metrics.jsonl` rows beyond `rounds_done` (written after the last checkpoint)."""
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        break   # a line cut by the interruption: nothing after it is kept
      if row.get('round', 0) <= rounds_done:
        keep.append(line if line.endswith('\n') else line + '\n')
  with open(path, 'w') as f:
    f.writelines(keep)


def run_with_checkpoints(simulator, state: ServerState | None = None, *, run_dir: str,
                         every: int | None = None, resume: bool = False, keep: int = 2,
                         progress: bool = True, on_block: Callable | None = None,
                         log: Callable[[str], None] | None = None):
  """Runs a `Simulator` with a checkpoint every `every` rounds and on Ctrl-C.

  Args:
    simulator: the `Simulator`.
    state: the initial state (default `simulator.init()`); also the template.
    run_dir: run directory; checkpoints go to `<run_dir>/checkpoints`, metrics to
      `<run_dir>/metrics.jsonl`.
    every: checkpoint every this many rounds (None: only at the end and on Ctrl-C).
    resume: continue from the newest valid checkpoint (from scratch if none).
    keep: newest checkpoints kept.
    progress: progress bar.
    on_block: extra `on_block(state, rounds_done, history)` hook (after saving).
    log: where messages go (default: stderr).

  Returns:
    the `SimulationResult`, its history covering all rounds (restored ones too).

  Raises:
    RunInterrupted: after Ctrl-C, once the block in flight finished and was saved.
  """
  if every is not None and (not isinstance(every, int) or every < 1):
    raise ValueError(f'checkpoint every must be a positive integer or None, got {every!r}')
  log = log or (lambda m: print(m, file=sys.stderr, flush=True))
  directory = os.path.join(run_dir, CHECKPOINT_DIR)
  os.makedirs(run_dir, exist_ok=True)
  state = simulator.init() if state is None else state
  history: list[dict[str, Any]] = []
  start = 0
  if resume:
    restored = restore_latest(directory, state, log=log)
    if restored is None:
      log(f'fedjax-sync: no usable checkpoint in {directory}; starting from round 0')
    else:
      state, start, history = restored.state, restored.rounds_done, restored.history
      log(f'fedjax-sync: resuming from {restored.path} (round {start})')
    if jax.process_index() == 0:
      _truncate_metrics(run_dir, start)
  num_rounds = simulator.config.num_rounds
  interrupted = threading.Event()
  last_saved = [start]

  def hook(new_state, rounds_done, new_history):
    due = (every is not None and rounds_done % every == 0) or rounds_done == num_rounds
    if due or interrupted.is_set():
      path = save(directory, new_state, rounds_done, history + new_history, keep=keep)
      last_saved[0] = rounds_done
      if interrupted.is_set() and rounds_done < num_rounds:
        log(f'fedjax-sync: interrupted; saved round {rounds_done} to {path}; '
            f'continue with --resume {run_dir}')
        raise RunInterrupted(rounds_done, path)
    if on_block is not None:
      on_block(new_state, rounds_done, history + new_history)

  def handler(signum, frame):
    del signum, frame
    if interrupted.is_set():   # a second Ctrl-C stops at once
      raise KeyboardInterrupt
    interrupted.set()
    log('fedjax-sync: Ctrl-C: finishing the rounds in flight, then saving '
        '(Ctrl-C again to stop without saving)')

  in_main = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGINT, handler) if in_main else None
  try:
    if start >= num_rounds:
      result = simulator.run(state, start_round=start, run_dir=run_dir, progress=False)
    else:
      result = simulator.run(state, start_round=start, run_dir=run_dir, progress=progress,
                             on_block=hook, block_every=every)
  finally:
    if in_main:
      signal.signal(signal.SIGINT, previous)
  return result._replace(history=history + result.history)


def resumed_cli_args(args):
  """The `fedjax-sync run` options of the run in `args.resume` (from its config.json).

  The saved options are used as they were, except `--quiet` and
  `--checkpoint-every`, which the resuming command may change.
  """
  import argparse

  run_dir = args.resume
  config_file = os.path.join(run_dir, 'config.json')
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f'--resume {run_dir!r}: no config.json there; is it a run directory?')
  with open(config_file) as f:
    saved = json.load(f).get('cli_args')
  if not isinstance(saved, dict):
    raise ValueError(f'--resume {run_dir!r}: config.json has no cli_args (not made by '
                     '`fedjax-sync run`)')
  merged = dict(saved)
  merged['resume'] = run_dir
  merged['run_dir'] = run_dir
  merged['quiet'] = args.quiet
  if args.checkpoint_every is not None:
    merged['checkpoint_every'] = args.checkpoint_every
  return argparse.Namespace(**merged)
