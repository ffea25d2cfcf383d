"""The synchronous driver: R rounds of sampling, batching, the round and evaluation.

Between two evaluations, consecutive rounds run inside one compiled `lax.scan`
(sampling and batch construction included), so the host is visited once per
evaluation block, not once per round. Round r uses the key
`fold_in(run_key, r)`, so results depend only on the seed and the round index:
resuming from round r (with the state of round r) reproduces the same run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_sync import reporting, sinks
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.data.batching import (LocalWork, make_client_batch, pad_clients, sample_clients,
                                       to_device)
from fedjax_sync.data.federated import FederatedData
from fedjax_sync.simulate.evaluation import make_evaluator
from fedjax_sync.simulate.population import check_population, check_synchronous
from fedjax_sync.types import Algorithm, Params, ServerState


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
  """What a synchronous simulation runs.

  Attributes:
    num_rounds: R.
    clients_per_round: C, sampled without replacement each round.
    local_work: epochs or steps of local training, and the batch size.
    eval_every: evaluate every k rounds (and after the last round).
    seed: run seed; the same seed on the same machine gives bitwise-identical results.
    proportional_sampling: sample clients with probability ∝ their size.
    per_client_eval: also compute per-client accuracy at evaluation points.
  """

  num_rounds: int
  clients_per_round: int
  local_work: LocalWork
  eval_every: int = 10
  seed: int = 0
  proportional_sampling: bool = False
  per_client_eval: bool = True

  def validate(self, num_clients: int) -> 'SimulationConfig':
    for name in ('num_rounds', 'clients_per_round', 'eval_every'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive integer, got {value!r}')
    if self.clients_per_round > num_clients:
      raise ValueError(f'clients_per_round={self.clients_per_round} exceeds the '
                       f'{num_clients} clients of the dataset')
    self.local_work.validate()
    return self


class SimulationResult(NamedTuple):
  state: ServerState
  history: list[dict[str, Any]]   # one row per round; evaluation metrics at eval points
  final_eval: dict[str, Any]
  compile_seconds: float
  run_seconds: float
  # The first round whose loss or update norm is NaN or Inf (a warning names it), else None.
  nonfinite_round: int | None = None


# Metrics whose NaN or Inf means the run has diverged.
DIVERGENCE_METRICS = ('train_loss', 'update_norm', 'test_loss')


def first_nonfinite(row: dict[str, Any]) -> str | None:
  """The first of `DIVERGENCE_METRICS` in `row` that is NaN or Inf, else None."""
  for key in DIVERGENCE_METRICS:
    value = row.get(key)
    if isinstance(value, (int, float)) and not math.isfinite(value):
      return key
  return None


def warn_nonfinite(round_index: int, key: str, value) -> None:
  """The console warning of a run that became non-finite at `round_index`."""
  warnings.warn(f'round {round_index}: {key} is {value}: the run became non-finite (the model '
                'diverged or a client sent NaN/Inf); try a smaller learning rate, '
                'clip_by_norm or zero_invalid_updates', RuntimeWarning, stacklevel=3)


def block_schedule(start: int, total: int, eval_every: int,
                   block_every: int | None = None) -> Iterator[tuple[int, int, bool]]:
  """The compiled blocks a driver runs: `(first round, length, ends at an evaluation)`.

  A block ends at every multiple of `eval_every` (an evaluation), of `block_every`
  (e.g. checkpoints) and at `total`. Rounds are counted from 0; `start` rounds are
  already done. Shared by `Simulator`, `Sweep` and `SemiAsyncSimulator` (which
  counts aggregations instead of rounds).
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


def _scalar_metrics(stacked: dict[str, np.ndarray], index: int) -> dict[str, float]:
  row = {}
  for k, v in stacked.items():
    x = v[index]
    if np.ndim(x) == 0:
      row[k] = float(x)
  return row


def _to_json(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return value


class Simulator:
  """Compiles the blocks of rounds and the evaluator of one simulation.

  Example:
    >>> sim = Simulator(algorithm, model, data, config)
    >>> result = sim.run(sim.init())
  """

  def __init__(self, algorithm: Algorithm, model, data: FederatedData, config: SimulationConfig,
               *, execution: ClientExecution = ClientExecution()):
    check_synchronous(algorithm, type(self).__name__)
    check_population(algorithm, data.num_clients)
    self.algorithm = algorithm
    self.model = model
    self.data = data
    self.config = config.validate(data.num_clients)
    self.execution = execution.validate()
    mesh = execution.mesh
    sharding = NamedSharding(mesh, P()) if mesh is not None else None
    self._device_data = to_device(data, sharding)
    positive = data.counts[data.counts > 0]
    if positive.size == 0:
      raise ValueError('the dataset has no client with examples')
    self._max_count = int(positive.max())
    self.num_local_steps = config.local_work.num_steps(self._max_count)
    self._run_key = jax.random.key(config.seed)
    self._evaluate = make_evaluator(model.evaluate, data, per_client=config.per_client_eval,
                                    personalize=getattr(algorithm, 'personalize', None))
    self._blocks: dict[int, Callable] = {}

  def init(self, params: Params | None = None) -> ServerState:
    """The initial server state; params from the model with key `fold_in(seed_key, -1)`."""
    if params is None:
      params = self.model.init(jax.random.fold_in(self._run_key, 2**31 - 1))
    state = self.algorithm.init(params)
    check_population(self.algorithm, self.data.num_clients, state.client_states)
    return state

  def round_key(self, round_index) -> jax.Array:
    return jax.random.fold_in(self._run_key, round_index)

  def sample_round(self, round_index):
    """The client batch and algorithm key of round `round_index` (jittable)."""
    sample_key, batch_key, algorithm_key = jax.random.split(self.round_key(round_index), 3)
    ids = sample_clients(sample_key, self._device_data.counts, self.config.clients_per_round,
                         proportional_to_size=self.config.proportional_sampling)
    batch = make_client_batch(batch_key, self._device_data, ids, self.config.local_work,
                              max_count=self._max_count)
    return pad_clients(batch, self.execution.num_shards), algorithm_key

  def _block(self, state: ServerState, length: int) -> Callable:
    """The compiled program of `length` consecutive rounds (compiled once per length)."""
    if length not in self._blocks:
      check_population(self.algorithm, self.data.num_clients, state.client_states)
      def run_block(state, start):
        def body(s, r):
          batch, key = self.sample_round(r)
          return self.algorithm.round(s, batch, key)
        return jax.lax.scan(body, state, start + jnp.arange(length))
      # With a mesh, outputs (state, per-client metrics) come back replicated, so every
      # process of a multi-host run can read them.
      mesh = self.execution.mesh
      replicated = NamedSharding(mesh, P()) if mesh is not None else None
      self._blocks[length] = jax.jit(run_block, donate_argnums=0,
                                     out_shardings=replicated).lower(
          state, jnp.zeros((), jnp.int32)).compile()
    return self._blocks[length]

  def run_rounds(self, state: ServerState, start: int, length: int):
    """Runs rounds `start .. start + length − 1` as one compiled program.

    The input state's buffers are donated: do not use `state` afterwards (a leaf
    repeated in `state` is copied first, so any state can be donated).
    """
    state = distinct_buffers(state)
    return self._block(state, length)(state, jnp.asarray(start, jnp.int32))

  def evaluate(self, params: Params, client_states=()) -> dict[str, Any]:
    """Evaluation metrics; per-client accuracy uses `Algorithm.personalize` on
    `client_states` (FedBN: each client's own batch-norm layers) when both are given."""
    return jax.device_get(self._evaluate(params, client_states))

  def run(self, state: ServerState, *, start_round: int = 0, run_dir: str | None = None,
          progress: bool = True, on_block: Callable | None = None,
          block_every: int | None = None, tensorboard: bool = False) -> SimulationResult:
    """Runs the remaining rounds from `start_round`, evaluating every `eval_every`.

    Args:
      state: the server state after `start_round` rounds; it is copied once before
        the first block (the blocks donate their input), so it stays usable.
      start_round: the number of rounds already run.
      run_dir: if given, `metrics.jsonl` is appended there, one JSON line per round
        (NaN/Inf as null, counted in `nonfinite_metrics`); a file that already holds
        a round after `start_round` is refused (ValueError), never appended twice.
      progress: show a progress bar: it advances by a block's rounds when the block
        finishes; its rate and time left count from the end of the first
        (compiling) block and leave out later compilations (`sinks.round_rate`).
      tensorboard: also write every round's scalars (loss, accuracy, participation,
        bytes, `aggregator/...`) as TensorBoard events into `run_dir`
        (`sinks.TensorBoardWriter`, no TensorFlow needed); requires `run_dir`.
      on_block: called as `on_block(state, rounds_done, history)` after each block
        (e.g. to checkpoint).
      block_every: also end a compiled block at every multiple of this many rounds
        (checkpoint boundaries); evaluation still happens every `eval_every` only.
    """
    cfg = self.config
    history: list[dict[str, Any]] = []
    if tensorboard and not run_dir:
      raise ValueError('tensorboard=True writes event files into run_dir; pass run_dir too')
    metrics_file = reporting.open_metrics(run_dir, start_round) if run_dir else None
    events = sinks.TensorBoardWriter(run_dir) if tensorboard else None
    bar = None
    if progress:
      from tqdm.auto import tqdm
      bar = tqdm(total=cfg.num_rounds, initial=start_round, unit='round', dynamic_ncols=True,
                 bar_format='{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]',
                 postfix=sinks.format_rate(None, None))
    compile_seconds = 0.0
    started = time.perf_counter()
    clock = sinks.BlockClock()
    last_eval = ''
    evaluation: dict[str, Any] = {}
    state = fresh_buffers(state)
    nonfinite_round = None
    try:
      for r, length, evaluate_now in block_schedule(start_round, cfg.num_rounds, cfg.eval_every,
                                                    block_every):
        if length not in self._blocks:
          t0 = time.perf_counter()
          self._block(state, length)
          compile_seconds += time.perf_counter() - t0
        state, stacked = self.run_rounds(state, r, length)
        stacked = jax.device_get(stacked)
        evaluation = self.evaluate(state.params, state.client_states) if evaluate_now else {}
        for i in range(length):
          row = {'round': r + i + 1, **_scalar_metrics(stacked, i)}
          if i == length - 1:
            row.update({k: _to_json(v) for k, v in evaluation.items() if np.ndim(v) == 0})
          history.append(row)
          if nonfinite_round is None and first_nonfinite(row):
            nonfinite_round = r + i + 1
            key = first_nonfinite(row)
            warn_nonfinite(nonfinite_round, key, row[key])
          if metrics_file:
            metrics_file.write(reporting.metrics_line(row))
          if events is not None:
            events.write(row)
        if metrics_file:
          metrics_file.flush()
        if events is not None:
          events.flush()
        if bar is not None:
          rate = clock.after_block(length, compile_seconds, cfg.num_rounds - (r + length))
          if evaluation:
            last_eval = (f"acc={float(evaluation['test_accuracy']):.4f}, "
                         f"loss={float(evaluation['test_loss']):.4f}, ")
          bar.set_postfix_str(last_eval + rate, refresh=False)
          bar.update(length)
        if on_block is not None:
          on_block(state, r + length, history)
    finally:
      if bar is not None:
        bar.close()
      if metrics_file:
        metrics_file.close()
      if events is not None:
        events.close()
    if not evaluation:
      evaluation = self.evaluate(state.params, state.client_states)
    if nonfinite_round is None and history and first_nonfinite(
        {k: float(v) for k, v in evaluation.items() if np.ndim(v) == 0}):
      nonfinite_round = history[-1]['round']
      warn_nonfinite(nonfinite_round, 'test_loss', evaluation['test_loss'])
    return SimulationResult(state=state, history=history, final_eval=evaluation,
                            compile_seconds=compile_seconds,
                            run_seconds=time.perf_counter() - started - compile_seconds,
                            nonfinite_round=nonfinite_round)


def rounds_to_reach(history: list[dict[str, Any]], target: float,
                    key: str = 'test_accuracy') -> int | None:
  """The first round whose evaluated `key` reaches `target`, or None."""
  for row in history:
    if key in row and row[key] >= target:
      return int(row['round'])
  return None
