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
history, and the identity of the run: algorithm, data, seed, ...). A checkpoint
without `meta.json` is incomplete; one whose restored bytes do not match the digest
is corrupt; one of another run (identity or state structure) does not belong here;
`restore_latest` says so and falls back to the previous one. Saving round r keeps
the `keep` newest checkpoints up to r and never deletes one of a later round.

Paths may be relative: they are made absolute here (orbax needs absolute paths).

`run_with_checkpoints` drives any runner of the one driver (`Simulator`,
`SemiAsyncSimulator`, `AveragingSimulator`; `round` counts their units): a
checkpoint every `every` units (the compiled blocks end there), and on Ctrl-C the block in flight finishes, a
checkpoint is saved and `RunInterrupted` (a `KeyboardInterrupt`) is raised. Resuming
never starts over on its own: without a usable checkpoint it raises `ResumeError`
and changes nothing. Otherwise it rewrites `metrics.jsonl` from the checkpoint's
history (dropping rows written after it, rebuilding a missing file) and continues
from the restored round; the final state is bitwise identical to an uninterrupted
run with the same settings.
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

from fedjax_sync import reporting

CHECKPOINT_DIR = 'checkpoints'
FORMAT = 'fedjax-sync-checkpoint-1'


class Restored(NamedTuple):
  """A restored checkpoint: the state after `rounds_done` rounds and the history."""

  state: Any
  rounds_done: int
  history: list[dict[str, Any]]
  path: str


class ResumeError(ValueError):
  """A run cannot be resumed; the message names the file and the reason. Nothing was changed."""


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
  return os.path.join(os.path.abspath(directory), f'round_{rounds_done:08d}')


def _one_line(error: BaseException, limit: int = 300) -> str:
  text = ' '.join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit - 1] + '…'


def _canonical(identity):
  """`identity` as it reads back from JSON (tuples as lists, numpy scalars as numbers)."""
  return None if identity is None else json.loads(json.dumps(reporting._jsonable(identity)))


def simulation_identity(simulator) -> dict[str, Any]:
  """What a checkpoint must agree with to continue `simulator`'s run.

  The algorithm's name, the data (name, number of clients), the seed, the sampling
  (Poisson rate, availability trace: a digest of its intervals) and the local work: the state of another run may fit the same arrays (FedAvg and
  FedProx have one structure) but continuing it would mix two runs.
  """
  cfg = simulator.config
  identity = {'algorithm': getattr(simulator.algorithm, 'name', None),
              'dataset': getattr(simulator.data, 'name', None),
              'num_clients': int(simulator.data.num_clients), 'seed': cfg.seed,
              'clients_per_round': cfg.clients_per_round, 'local_work': list(cfg.local_work),
              'proportional_sampling': cfg.proportional_sampling}
  # Sampling and availability change which clients train; they are part of the identity
  # when not at their defaults (so checkpoints made before they existed still resume).
  if getattr(cfg, 'sampling', 'uniform') != 'uniform':
    identity.update(sampling=cfg.sampling, sampling_rate=cfg.sampling_rate)
  trace = getattr(simulator, 'availability', None)
  if trace is not None:
    leaves = [np.asarray(x) for x in (trace.starts, trace.ends)]
    identity.update(round_duration=getattr(cfg, 'round_duration', None),
                    availability=_digest(leaves, json.dumps(trace.period)))
  return identity


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
  """`(rounds_done, path)` of every checkpoint directory under `directory`, oldest first."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    return []
  out = []
  for name in os.listdir(directory):
    if name.startswith('round_') and name[6:].isdigit():
      out.append((int(name[6:]), os.path.join(directory, name)))
  return sorted(out)


def save(directory: str, state, rounds_done: int, history: list[dict[str, Any]], *,
         keep: int = 2, identity: dict[str, Any] | None = None) -> str:
  """Saves the state after `rounds_done` rounds and the history; returns the path.

  Args:
    directory: the checkpoint directory (e.g. `<run_dir>/checkpoints`).
    state: the `ServerState` (any pytree of arrays).
    rounds_done: rounds completed; the next round to run.
    history: metric rows so far (JSON-serializable).
    keep: number of checkpoints kept: this one and the `keep − 1` newest before it
      (older ones are deleted; one of a later round, left by an abandoned run, is
      never counted nor deleted).
    identity: what the run is (e.g. `simulation_identity(simulator)`); a restore
      given another identity refuses this checkpoint.
  """
  import orbax.checkpoint as ocp

  if not isinstance(keep, int) or keep < 1:
    raise ValueError(f'keep must be a positive integer, got {keep!r}')
  directory = os.path.abspath(directory)
  path = checkpoint_path(directory, rounds_done)
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
            'sha256': _digest(leaves, history_text), 'identity': _canonical(identity)}
    tmp = os.path.join(path, 'meta.json.tmp')
    with open(tmp, 'w') as f:
      json.dump(meta, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, 'meta.json'))   # the commit point
    earlier = [p for r, p in list_checkpoints(directory) if r < rounds_done]
    for old in earlier[:max(0, len(earlier) - (keep - 1))]:
      shutil.rmtree(old, ignore_errors=True)
  if jax.process_count() > 1:
    # Every process returns once process 0 has committed meta.json: a process that
    # reads the checkpoint right away (a resume in the same job) must not find it
    # incomplete.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f'fedjax_sync checkpoint {path}')
  return path


def _identity_difference(saved: dict, expected: dict) -> str:
  keys = [k for k in sorted(set(saved) | set(expected)) if saved.get(k) != expected.get(k)]
  return ', '.join(f'{k} {saved.get(k)!r} (checkpoint) vs {expected.get(k)!r} (this run)'
                   for k in keys)


def _load(path: str, like, identity=None) -> Restored:
  import orbax.checkpoint as ocp

  meta_file = os.path.join(path, 'meta.json')
  if not os.path.isfile(meta_file):
    raise ValueError('incomplete (no meta.json: the save did not finish)')
  with open(meta_file) as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{meta_file} is not valid JSON ({e})') from None
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    found = meta.get('format') if isinstance(meta, dict) else None
    raise ValueError(f"unknown format {found!r}, expected {FORMAT!r}")
  expected_identity = _canonical(identity)
  saved_identity = meta.get('identity')
  if expected_identity is not None and saved_identity is not None and (
      saved_identity != expected_identity):
    raise ValueError('made by another run: '
                     + _identity_difference(saved_identity, expected_identity))
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


def _restore_newest(directory: str, like, identity=None
                    ) -> tuple[Restored | None, list[tuple[str, str]]]:
  """The newest usable checkpoint (or None) and `(path, reason)` of each newer unusable one."""
  failures = []
  for _, path in reversed(list_checkpoints(directory)):
    try:
      return _load(path, like, identity), failures
    except Exception as e:  # noqa: BLE001 - any failure means: not usable, try the previous
      failures.append((path, _one_line(e)))
  return None, failures


def restore_latest(directory: str, like, *, log: Callable[[str], None] | None = None,
                   identity: dict[str, Any] | None = None) -> Restored | None:
  """Restores the newest valid checkpoint under `directory`, or None if there is none.

  A checkpoint that is incomplete, corrupt or of another simulation is reported
  through `log` (default: stderr) and the previous one is tried.

  Args:
    directory: the checkpoint directory (relative paths are fine).
    like: a state of the same structure (e.g. `simulator.init()`); gives the tree
      structure, key types and shardings of the restored arrays.
    identity: if given, checkpoints saved with another identity are refused.
  """
  log = log or (lambda m: print(m, file=sys.stderr, flush=True))
  restored, failures = _restore_newest(directory, like, identity)
  for path, reason in failures:
    log(f'fedjax-sync: checkpoint {path} is unusable ({reason}); trying the previous one')
  return restored


def restore_for_resume(run_dir: str, like, identity=None
                       ) -> tuple[Restored, list[tuple[str, str]]]:
  """The newest usable checkpoint of `run_dir`, or `ResumeError` naming what is wrong.

  Reads only: nothing in `run_dir` is changed. Also returns `(path, reason)` of each
  newer checkpoint that was unusable.
  """
  directory = os.path.join(os.path.abspath(run_dir), CHECKPOINT_DIR)
  if not os.path.isdir(run_dir):
    raise ResumeError(f'{run_dir}: no such run directory')
  if not list_checkpoints(directory):
    raise ResumeError(f'{os.path.join(run_dir, CHECKPOINT_DIR)}: no checkpoint to resume from '
                      '(was the run started with checkpoints, e.g. --checkpoint-every K?); '
                      'nothing was changed')
  restored, failures = _restore_newest(directory, like, identity)
  if restored is None:
    reasons = '; '.join(f'{os.path.basename(p)}: {r}' for p, r in failures)
    raise ResumeError(f'{os.path.join(run_dir, CHECKPOINT_DIR)}: no usable checkpoint '
                      f'({reasons}); nothing was changed')
  return restored, failures


def run_with_checkpoints(simulator, state: Any = None, *, run_dir: str,
                         every: int | None = None, resume: bool = False, keep: int = 2,
                         progress: bool = True, on_block: Callable | None = None,
                         log: Callable[[str], None] | None = None,
                         identity: dict[str, Any] | None = None,
                         on_start: Callable[[int], None] | None = None,
                         tensorboard: bool = False, evaluation_hooks=()):
  """Runs any timeline with a checkpoint every `every` units and on Ctrl-C.

  Args:
    simulator: a runner of the one driver: `Simulator`, `MultiHostSimulator`,
      `SemiAsyncSimulator` (units are aggregations), `AveragingSimulator` (units
      are local steps) or a `Sweep` (its members' rows go to
      `<run_dir>/members/<label>/metrics.jsonl`; the checkpoint holds every
      member's state and history).
    state: the initial state (default `simulator.init()`); also the template.
    run_dir: run directory (relative paths are fine); checkpoints go to
      `<run_dir>/checkpoints`, metrics to `<run_dir>/metrics.jsonl`.
    every: checkpoint every this many rounds (None: only at the end and on Ctrl-C).
    resume: continue from the newest valid checkpoint; `ResumeError` (nothing
      changed) when there is none. Without `resume`, a `run_dir` that already holds
      checkpoints or rounds is refused (ValueError).
    keep: newest checkpoints kept.
    progress: progress bar.
    on_block: extra `on_block(state, rounds_done, history)` hook (after saving).
    log: where messages go (default: stderr).
    identity: what a checkpoint must agree with (default `simulator.identity()`,
      or `simulation_identity(simulator)` for a `Simulator`); saved with each
      checkpoint.
    on_start: called as `on_start(rounds_done)` once the run is known to start
      (after a successful restore), before anything is written.
    tensorboard: also write TensorBoard event files into `run_dir` (a resumed run
      adds a new file; see `Simulator.run`).
    evaluation_hooks: extra evaluation of the driver (`Simulator.run`).

  Returns:
    the `SimulationResult`, its history covering all rounds (restored ones too).

  Raises:
    RunInterrupted: after Ctrl-C, once the block in flight finished and was saved.
    ResumeError: `resume` without a usable checkpoint.
  """
  if every is not None and (not isinstance(every, int) or every < 1):
    raise ValueError(f'checkpoint every must be a positive integer or None, got {every!r}')
  log = log or (lambda m: print(m, file=sys.stderr, flush=True))
  if identity is None:
    identity = (simulator.identity() if hasattr(simulator, 'identity')
                else simulation_identity(simulator))
  absolute = os.path.abspath(run_dir)   # orbax needs absolute paths; the user's run_dir
  directory = os.path.join(absolute, CHECKPOINT_DIR)   # is kept for messages
  state = simulator.init() if state is None else state
  # A sweep (`members = S`) keeps one history and one metrics file per member.
  members = getattr(simulator, 'members', None)
  metrics_dirs = (simulator.member_dirs(absolute) if members is not None else [absolute])
  history: list = [] if members is None else [[] for _ in range(members)]
  start = 0
  primary = jax.process_index() == 0
  if resume:
    restored, failures = restore_for_resume(run_dir, state, identity)
    for path, reason in failures:
      log(f'fedjax-sync: checkpoint {path} is unusable ({reason}); using the previous one')
    state, start, history = restored.state, restored.rounds_done, restored.history
    if on_start is not None:
      on_start(start)
    if primary:   # rows written after the checkpoint go; a lost file comes back
      for d, rows in zip(metrics_dirs, [history] if members is None else history):
        os.makedirs(d, exist_ok=True)
        reporting.write_metrics(d, rows)
    log(f'fedjax-sync: resumed from round {start} ({restored.path})')
  else:
    if list_checkpoints(directory):
      raise ValueError(f'{os.path.join(run_dir, CHECKPOINT_DIR)} already holds checkpoints; '
                       'continue with resume=True (fedjax-sync run --resume) or choose a new '
                       'run directory')
    for d in metrics_dirs:
      if reporting.last_metrics_round(d) > 0:
        reporting.open_metrics(d, 0).close()   # raises: the rounds would be written twice
    if on_start is not None:
      on_start(0)
    os.makedirs(absolute, exist_ok=True)
  num_rounds = simulator.num_units
  interrupted = threading.Event()

  def joined(new_history):
    if members is None:
      return history + new_history
    return [old + new for old, new in zip(history, new_history)]

  def hook(new_state, rounds_done, new_history):
    due = (every is not None and rounds_done % every == 0) or rounds_done == num_rounds
    if due or interrupted.is_set():
      path = save(directory, new_state, rounds_done, joined(new_history), keep=keep,
                  identity=identity)
      if interrupted.is_set() and rounds_done < num_rounds:
        log(f'fedjax-sync: interrupted; saved round {rounds_done} to {path}; '
            f'continue with --resume {run_dir}')
        raise RunInterrupted(rounds_done, path)
    if on_block is not None:
      on_block(new_state, rounds_done, joined(new_history))

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
      result = simulator.run(state, start_round=start, run_dir=absolute, progress=False,
                             evaluation_hooks=evaluation_hooks)
    else:
      result = simulator.run(state, start_round=start, run_dir=absolute, progress=progress,
                             on_block=hook, block_every=every, tensorboard=tensorboard,
                             evaluation_hooks=evaluation_hooks)
  finally:
    if in_main:
      signal.signal(signal.SIGINT, previous)
  if members is not None:
    return result._replace(histories=joined(result.histories))
  return result._replace(history=joined(result.history))
