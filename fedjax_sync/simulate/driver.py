"""The one driver: every timeline runs through the same loop.

A *timeline* says how simulated time advances and which clients train from which
model; a *unit* is one step of it:

=================  ===============  ===========================================
timeline           unit             runner
=================  ===============  ===========================================
synchronous        round            `Simulator`, `MultiHostSimulator`, `Sweep`
semi-asynchronous  aggregation      `SemiAsyncSimulator`
dynamic averaging  local step       `AveragingSimulator` (FDA, Local-SGD, ...)
=================  ===============  ===========================================

Everything else is the driver's, identically for all of them (`drive`): blocks of
units compiled as one `lax.scan` (a block ends at every evaluation, at every
multiple of `block_every` — checkpoints — and at the end), evaluation after a
block (the runner's own, plus user `evaluation_hooks`), one metrics row per unit
(`round` counts units whatever the timeline; the unit's own name is a second key),
`metrics.jsonl` and TensorBoard sinks, the progress bar (its rate leaves out
compilation), the first non-finite unit, `on_block` callbacks (checkpoints,
`fedjax_sync.simulate.checkpoint.run_with_checkpoints`, which therefore resumes
every timeline) and an optional early stop. A runner with `members = S` is a
vmapped sweep: its metrics carry a leading `[S]` axis and the driver keeps one
history (and one run directory) per member.

A runner provides:

  unit: str                     # 'round', 'aggregation' or 'step'
  num_units: int                # total units of the run
  eval_every: int               # units between evaluations
  members: int | None           # S for a sweep, None for one simulation
  is_compiled(state, length) -> bool
  compile(state, length)        # compiles the block of `length` units
  run_units(state, start, length) -> (state, stacked metrics)   # donates `state`
  evaluate_state(state) -> dict # host values ([S] arrays for a sweep)
  evaluated_model(state) -> (params, client_states)   # what evaluation hooks read
  unit_ticks: bool              # optional: is_compiled/compile take `ticks=True`,
                                # run_units `ticks=k` (report every k-th unit)

Progress while a block runs: a runner with `unit_ticks = True` compiles, when the
driver shows a progress bar, a second program of each block length whose scan body
ends with `tick_unit` (an unordered `jax.debug.callback`, after the unit's state is
computed, on every k-th unit; k is an argument, so changing it never recompiles),
so the bar advances while the block runs. Without a bar (or with
`progress='block'`) the runners compile and run exactly the program they always
did (no callback).

Round r's keys come from `fold_in(run_key, r)` in every timeline, so the unit
index is the whole position of the random streams and a run resumed at unit r
(with the state after r units) continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
import warnings
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sync import reporting, sinks

__all__ = ['DIVERGENCE_METRICS', 'CompiledBlocks', 'DriveResult', 'Runner', 'block_schedule', 'check_alive',
           'distinct_buffers', 'drive', 'first_nonfinite', 'fresh_buffers', 'listen_to_units',
           'tick_unit', 'warn_nonfinite']

# Metrics whose NaN or Inf means the run has diverged.
DIVERGENCE_METRICS = ('train_loss', 'update_norm', 'test_loss')

class Runner(Protocol):
  """What `drive` needs from a timeline (see the module docstring)."""

  unit: str
  num_units: int
  eval_every: int
  members: int | None

  def is_compiled(self, state, length: int) -> bool: ...

  def compile(self, state, length: int) -> None: ...

  def run_units(self, state, start: int, length: int): ...

  def evaluate_state(self, state) -> dict[str, Any]: ...

  def evaluated_model(self, state) -> tuple[Any, Any]: ...


# -- progress per unit: a host callback at the end of every unit of a ticking block ----

# A ticking block reports about this many units a second (the stride is set from the
# last block's seconds per unit), and at most `FIRST_BLOCK_TICKS` units in a block
# before any unit has been timed.
TICKS_PER_SECOND = 4.0
FIRST_BLOCK_TICKS = 100

_unit_listeners: list[Callable[[int], None]] = []
_listeners_lock = threading.Lock()


def _unit_finished(position) -> None:
  """Host side of `tick_unit` (runs on the runtime's thread, not the driver's)."""
  with _listeners_lock:
    listeners = tuple(_unit_listeners)
  for listener in listeners:
    listener(int(position))


def tick_unit(position, carry, every):
  """In a runner's scan body: reports that unit `position` (1-based, counted from the
  start of the block) is done, once `carry` (the unit's new state) is computed, when
  `position` is a multiple of `every` (a traced int32, the driver's stride).

  Returns `carry` unchanged (pass it on as the scan's carry: the
  `optimization_barrier` that ties the callback to the new state only orders, it
  computes nothing). The callback is unordered (`jax.debug.callback`) under a
  `lax.cond` on unbatched scalars: under `vmap` (a sweep, `every` and the position
  unbatched) it reports once per unit, not once per member. A host callback costs
  0.3-6 ms on the loaded 2-core CPU (a thread hand-off and the GIL), hence the
  stride (`drive` picks it: `TICKS_PER_SECOND`). Listeners: `listen_to_units`.
  """
  position, carry = jax.lax.optimization_barrier((jnp.asarray(position, jnp.int32), carry))
  jax.lax.cond(position % every == 0, lambda p: jax.debug.callback(_unit_finished, p),
               lambda p: None, position)
  return carry


class listen_to_units:
  """Context manager: `listener(position)` is called on every `tick_unit` while inside.

  `position` is the unit's 1-based index within its block. It runs on the XLA
  runtime's thread: keep it short and thread-safe. Used by `drive` for its progress
  bar; tests use it to see every unit of a ticking run.
  """

  def __init__(self, listener: Callable[[int], None]):
    self._listener = listener

  def __enter__(self):
    with _listeners_lock:
      _unit_listeners.append(self._listener)
    return self

  def __exit__(self, *exc):
    with _listeners_lock:
      _unit_listeners.remove(self._listener)


class _UnitBar:
  """The driver's progress bar fed unit by unit (ticks) or block by block.

  `on_tick` runs on the runtime's thread, `end_block` on the driver's: a lock keeps
  the bar, its clock (`sinks.BlockClock`, fed one unit at a time: its first unit
  starts the clock, so compilation, which precedes a block's first unit, is left
  out) and the rate text consistent.
  """

  def __init__(self, bar, total: int, start: int, every_unit: bool):
    self.bar, self.total, self.every_unit = bar, total, every_unit
    self.clock = sinks.BlockClock()
    self.lock = threading.Lock()
    self.block_start, self.block_length = start, 0
    self.compile_seconds = 0.0
    self.last_eval = ''
    self.rate = sinks.format_rate(None, None)
    self.unit_seconds = None
    self.block_began = 0.0

  def stride(self, length: int) -> int:
    """Report every how many units in the next block of `length` units."""
    if self.every_unit:
      return 1
    if self.unit_seconds is None:
      return max(1, -(-length // FIRST_BLOCK_TICKS))
    every = int(1.0 / (TICKS_PER_SECOND * max(self.unit_seconds, 1e-9)))
    return min(max(every, 1), length)

  def begin_block(self, start: int, length: int, compile_seconds: float) -> None:
    with self.lock:
      self.block_start, self.block_length = start, length
      self.compile_seconds = compile_seconds
      self.block_began = time.perf_counter()

  def on_tick(self, position: int) -> None:
    with self.lock:
      done = self.block_start + position
      if not 0 < position <= self.block_length or done <= self.bar.n:
        return    # another driver's unit, or a repeat
      units = done - self.bar.n
      self.rate = self.clock.after_block(units, self.compile_seconds, self.total - done)
      self.bar.set_postfix_str(self.last_eval + self.rate, refresh=False)
      self.bar.update(units)

  def end_block(self, units_done: int, compile_seconds: float, last_eval: str,
                ticked: bool) -> None:
    with self.lock:
      length = units_done - self.block_start
      if length > 0:
        self.unit_seconds = (time.perf_counter() - self.block_began) / length
      self.last_eval = last_eval
      if not ticked:
        self.rate = self.clock.after_block(units_done - self.bar.n, compile_seconds,
                                           self.total - units_done)
      self.bar.set_postfix_str(self.last_eval + self.rate, refresh=False)
      self.bar.update(units_done - self.bar.n)   # 0 when every tick arrived


class CompiledBlocks:
  """The driver's cache view shared by runners that compile their blocks themselves.

  A runner with a `_blocks` dict filled by `_block(state, length, ticks)` (under
  `block_key(length, ticks)`) gets `is_compiled`, `compile` and `unit_ticks` here
  instead of repeating them.
  """

  unit_ticks = True

  @staticmethod
  def block_key(length: int, ticks: bool = False):
    """The `_blocks` key of the block of `length` units (the ticking copy apart)."""
    return (length, 'ticks') if ticks else length

  def is_compiled(self, state, length: int, ticks: bool = False) -> bool:
    del state
    return self.block_key(length, ticks) in self._blocks

  def compile(self, state, length: int, ticks: bool = False) -> None:
    self._block(state, length, ticks)


class DriveResult(NamedTuple):
  """What `drive` returns.

  Attributes:
    state: the state after the last unit run.
    histories: one list of rows per member (one list for a single simulation);
      a row per unit, evaluation metrics on the last unit of an evaluated block.
    final_evals: the last evaluation of each member.
    compile_seconds, run_seconds: wall-clock split (run time excludes compiling).
    nonfinite: per member, the first unit whose loss or update norm is NaN/Inf.
    units_done: the number of units completed (less than `num_units` after a stop).
  """

  state: Any
  histories: list[list[dict[str, Any]]]
  final_evals: list[dict[str, Any]]
  compile_seconds: float
  run_seconds: float
  nonfinite: list[int | None]
  units_done: int


def first_nonfinite(row: Mapping[str, Any]) -> str | None:
  """The first of `DIVERGENCE_METRICS` in `row` that is NaN or Inf, else None."""
  for key in DIVERGENCE_METRICS:
    value = row.get(key)
    if isinstance(value, (int, float)) and not math.isfinite(value):
      return key
  return None


def warn_nonfinite(unit_index: int, key: str, value, unit: str = 'round') -> None:
  """The console warning of a run that became non-finite at `unit_index`."""
  warnings.warn(f'{unit} {unit_index}: {key} is {value}: the run became non-finite (the model '
                'diverged or a client sent NaN/Inf); try a smaller learning rate, '
                'clip_by_norm or zero_invalid_updates', RuntimeWarning, stacklevel=4)


def block_schedule(start: int, total: int, eval_every: int,
                   block_every: int | None = None) -> Iterator[tuple[int, int, bool]]:
  """The compiled blocks a driver runs: `(first unit, length, ends at an evaluation)`.

  A block ends at every multiple of `eval_every` (an evaluation), of `block_every`
  (e.g. checkpoints) and at `total`. Units are counted from 0; `start` units are
  already done.
  """
  r = start
  while r < total:
    length = min(eval_every - r % eval_every, total - r)
    if block_every:
      length = min(length, block_every - r % block_every)
    end = r + length
    yield r, length, end % eval_every == 0 or end == total
    r = end


def fresh_buffers(state):
  """A copy of `state` whose array leaves are new, pairwise distinct buffers.

  The drivers donate the state to their compiled blocks, and donation fails
  (`Attempt to donate the same buffer twice`) when two leaves share a buffer, which
  happens whenever an `init` returns one array twice (`step=z, fallbacks=z`) or a
  jitted `init` returns equal constants. Copying once before the first block makes
  donation safe for any state, and leaves the caller's `state` alive.
  """
  check_alive(state)
  return jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x,
                      state)


def check_alive(state) -> None:
  """Raises a `ValueError` naming the cause when a leaf of `state` was donated already."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    if isinstance(leaf, jax.Array) and leaf.is_deleted():
      raise ValueError(
          f'the state leaf {jax.tree_util.keystr(path)} was deleted: it was donated to an '
          'earlier run_rounds/run_aggregations call; pass the state that call returned')


def distinct_buffers(state):
  """`state` with any repeated array leaf copied, so that the state can be donated."""
  check_alive(state)
  seen = set()

  def one(x):
    if not isinstance(x, jax.Array):
      return x
    if id(x) in seen:
      return jnp.array(x, copy=True)
    seen.add(id(x))
    return x

  return jax.tree.map(one, state)


def _json(value):
  if isinstance(value, (np.floating, np.integer, np.bool_)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return value


def _member_view(tree: Mapping[str, Any], member: int | None) -> dict[str, np.ndarray]:
  if member is None:
    return dict(tree)
  return {k: np.asarray(v)[member] for k, v in tree.items()}


def _scalars(values: Mapping[str, Any], index: int | None = None) -> dict[str, Any]:
  """The scalar entries of `values` (at `index` of a stacked axis when given)."""
  row = {}
  for k, v in values.items():
    x = np.asarray(v) if index is None else np.asarray(v)[index]
    if x.ndim == 0:
      row[k] = _json(x)
  return row


def _evaluation(runner, state, units_done: int, hooks, evaluate: bool) -> dict[str, Any]:
  """The runner's evaluation (unless `evaluate` is False) merged with every hook's."""
  out = dict(runner.evaluate_state(state)) if evaluate else {}
  for hook in hooks:
    out.update(jax.device_get(dict(hook(state, units_done))))
  return out


@dataclasses.dataclass
class _Member:
  """The driver's bookkeeping of one simulation: its rows and sinks."""

  history: list[dict[str, Any]]
  metrics_file: Any = None
  events: Any = None
  nonfinite: int | None = None
  evaluation: dict[str, Any] = dataclasses.field(default_factory=dict)


def drive(runner: Runner, state, *, start: int = 0,
          run_dirs: Sequence[str | None] | str | None = None, progress: bool = False,
          tensorboard: bool = False, on_block: Callable | None = None,
          block_every: int | None = None,
          evaluation_hooks: Sequence[Callable[[Any, int], Mapping[str, Any]]] = (),
          settings: Sequence[Mapping[str, Any]] | None = None,
          stop_when: Callable[[list[dict[str, Any]]], bool] | None = None,
          description: str | None = None, evaluate: bool = True) -> DriveResult:
  """Runs units `start .. runner.num_units − 1` of `runner` from `state`.

  Args:
    runner: a timeline runner (`Simulator`, `SemiAsyncSimulator`,
      `AveragingSimulator`, `Sweep`).
    state: the state after `start` units (the runner's `run_units` donates its
      input; callers pass a private copy).
    start: units already done.
    run_dirs: where `metrics.jsonl` is appended (one per member; a single path for
      a single simulation); a file that already holds a unit after `start` is
      refused (ValueError), never appended twice.
    progress: True: a progress bar that advances while a block runs (runners with
      `unit_ticks`; per block otherwise), about `TICKS_PER_SECOND` times a second
      (every k-th unit, k from the last block's speed); 'unit': after every unit
      (costs a host callback per unit: 0.3-6 ms on a loaded 2-core CPU); 'block':
      when a block ends (the compiled program has no callback); False: no bar.
      Rate and time left leave out compilation.
    tensorboard: also write TensorBoard event files into the run directories.
    on_block: `on_block(state, units_done, histories)` after each block (single
      simulation: `histories` is the one history list); e.g. to checkpoint.
    block_every: also end a block at every multiple of this many units.
    evaluation_hooks: `hook(state, units_done) -> {name: value}` called at every
      evaluation and merged into the evaluated row (for a sweep the values are
      `[S]` arrays); e.g. personalized evaluation, communicated bytes.
    settings: per-member constant columns added to every row (sweep settings).
    stop_when: `stop_when(history of member 0)` after each evaluated block; True
      ends the run there (e.g. a byte budget).
    description: the progress bar's label.
    evaluate: False skips the runner's evaluation (hooks still run).
  """
  members = runner.members
  count = 1 if members is None else members
  if run_dirs is None:
    run_dirs = [None] * count
  elif isinstance(run_dirs, (str, os.PathLike)):
    if members is not None:
      raise ValueError('a sweep writes one run directory per member: pass a list of them')
    run_dirs = [run_dirs]
  run_dirs = list(run_dirs)
  if len(run_dirs) != count:
    raise ValueError(f'{len(run_dirs)} run directories for {count} members')
  if tensorboard and any(d is None for d in run_dirs):
    raise ValueError('tensorboard=True writes event files into run_dir; pass run_dir too')
  unit = runner.unit
  book = [_Member(history=[]) for _ in range(count)]
  if not (isinstance(progress, bool) or progress in ('unit', 'block')):
    raise ValueError(f"progress must be True, False, 'unit' or 'block', got {progress!r}")
  bar = None
  ticks = ({'ticks': True} if progress in (True, 'unit') and getattr(runner, 'unit_ticks', False)
           else {})
  listening = listen_to_units(lambda position: bar.on_tick(position)) if ticks else None
  compile_seconds = 0.0
  started = time.perf_counter()
  units_done = start
  try:
    for m, run_dir in zip(book, run_dirs):
      if run_dir:
        m.metrics_file = reporting.open_metrics(run_dir, start)
        if tensorboard:
          m.events = sinks.TensorBoardWriter(run_dir)
    if progress:
      from tqdm.auto import tqdm
      bar = _UnitBar(tqdm(total=runner.num_units, initial=start, unit=unit, dynamic_ncols=True,
                          desc=description,
                          bar_format='{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]',
                          postfix=sinks.format_rate(None, None)), runner.num_units, start,
                     every_unit=progress == 'unit')
      if listening is not None:
        listening.__enter__()
    last_eval = ''
    for r, length, evaluate_now in block_schedule(start, runner.num_units, runner.eval_every,
                                                  block_every):
      if not runner.is_compiled(state, length, **ticks):
        t0 = time.perf_counter()
        runner.compile(state, length, **ticks)
        compile_seconds += time.perf_counter() - t0
      if bar is not None:
        bar.begin_block(r, length, compile_seconds)
      if ticks:
        state, stacked = runner.run_units(state, r, length, ticks=bar.stride(length))
      else:
        state, stacked = runner.run_units(state, r, length)
      stacked = jax.device_get(stacked)
      units_done = r + length
      evaluation: dict[str, Any] = {}
      if evaluate_now:
        evaluation = _evaluation(runner, state, units_done, evaluation_hooks, evaluate)
      for s, m in enumerate(book):
        member = None if members is None else s
        metrics = _member_view(stacked, member)
        member_eval = _member_view(evaluation, member)
        if evaluate_now:
          m.evaluation = member_eval
        for i in range(length):
          row = {'round': r + i + 1}
          if unit != 'round':
            row[unit] = r + i + 1
          if settings is not None:
            row.update(settings[s])
          row.update(_scalars(metrics, i))
          if i == length - 1:
            row.update(_scalars(member_eval))
          m.history.append(row)
          bad = first_nonfinite(row) if m.nonfinite is None else None
          if bad:
            m.nonfinite = r + i + 1
            where = bad if settings is None else f'{bad} of member {dict(settings[s])}'
            warn_nonfinite(m.nonfinite, where, row[bad], unit)
          if m.metrics_file:
            m.metrics_file.write(reporting.metrics_line(row))
          if m.events is not None:
            m.events.write({k: v for k, v in row.items()
                            if settings is None or k not in settings[s] or k == 'round'})
        if m.metrics_file:
          m.metrics_file.flush()
        if m.events is not None:
          m.events.flush()
      if bar is not None:
        if evaluation and 'test_accuracy' in evaluation:
          accuracy = np.asarray(evaluation['test_accuracy'], np.float64)
          loss = np.asarray(evaluation.get('test_loss', np.nan), np.float64)
          prefix = '' if members is None else 'mean '
          last_eval = (f'{prefix}acc={float(np.mean(accuracy)):.4f}, '
                       f'{prefix}loss={float(np.mean(loss)):.4f}, ')
        bar.end_block(units_done, compile_seconds, last_eval, ticked=bool(ticks))
      if on_block is not None:
        on_block(state, units_done,
                 book[0].history if members is None else [m.history for m in book])
      if stop_when is not None and evaluate_now and stop_when(book[0].history):
        break
  finally:
    if bar is not None:
      if listening is not None:
        listening.__exit__(None, None, None)
      bar.bar.close()
    for m in book:
      if m.metrics_file:
        m.metrics_file.close()
      if m.events is not None:
        m.events.close()
  if not book[0].evaluation and (evaluate or evaluation_hooks):   # nothing was run
    evaluation = _evaluation(runner, state, units_done, evaluation_hooks, evaluate)
    for s, m in enumerate(book):
      m.evaluation = _member_view(evaluation, None if members is None else s)
  for m in book:
    if m.nonfinite is None and m.history:
      bad = first_nonfinite(_scalars(m.evaluation))
      if bad:
        m.nonfinite = m.history[-1]['round']
        warn_nonfinite(m.nonfinite, bad, m.evaluation[bad], unit)
  return DriveResult(state=state, histories=[m.history for m in book],
                     final_evals=[m.evaluation for m in book],
                     compile_seconds=compile_seconds,
                     run_seconds=time.perf_counter() - started - compile_seconds,
                     nonfinite=[m.nonfinite for m in book], units_done=units_done)
