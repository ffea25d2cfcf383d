"""The dynamic-averaging timeline's driver: FDA and fixed-period averaging, compiled.

A step-level `AveragingAlgorithm` (`fedjax_sync.algorithms.fda`: `fda`,
`local_sgd`, `periodic_fed_avg_m`, `periodic_fed_adam`, `dynamic_averaging`) runs
here: every local step of the K workers draws fresh minibatches inside the compiled
program (`sample_worker_batches`), blocks of steps between evaluations are one
`lax.scan` (`make_block`), and `run_averaging` evaluates the last synchronized
model after each block, with exact cumulative byte counts and an optional byte
budget. Compiled blocks are reused across runs of the same algorithm object (a grid
of thresholds and seeds compiles once).

Example:
  >>> algorithm = fda(model.loss, optax.sgd(0.05), num_workers=5, threshold=0.5)
  >>> result = run_averaging(algorithm, model, data, num_steps=500, batch_size=32)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_sync import communication
from fedjax_sync.data.batching import DeviceData, to_device
from fedjax_sync.data.federated import FederatedData
from fedjax_sync.simulate.driver import drive, fresh_buffers, tick_unit
from fedjax_sync.simulate.evaluation import make_evaluator
from fedjax_sync.simulate.rounds import SimulationResult
from fedjax_sync.types import Params

if TYPE_CHECKING:  # the algorithms import this module's names as aliases
  from fedjax_sync.algorithms.fda import AveragingAlgorithm, AveragingState

__all__ = ['AveragingResult', 'AveragingSimulator', 'make_block', 'overestimate_ratio', 'run_averaging',
           'sample_worker_batches']


def sample_worker_batches(key: jax.Array, data: DeviceData, worker_clients: jax.Array,
                          batch_size: int) -> tuple[dict, jax.Array]:
  """Fresh minibatches `{[K, B, ...]}`, mask `[K, B]` of K workers (inside jit).

  Worker k draws `batch_size` examples uniformly with replacement from its client
  `worker_clients[k]`'s rows `offsets : offsets + counts`, from the key
  `fold_in(key, worker_clients[k])`. A client without examples gets a fully masked
  batch (its step changes nothing).
  """
  def one(cid):
    n = data.counts[cid]
    draws = jax.random.randint(jax.random.fold_in(key, cid), (batch_size,), 0,
                               jnp.maximum(n, 1))
    return data.offsets[cid] + draws, jnp.broadcast_to(n > 0, (batch_size,))

  rows, mask = jax.vmap(one)(worker_clients)
  return {k: v[rows] for k, v in data.train.items()}, mask


class AveragingResult(NamedTuple):
  """Outcome of `run_averaging`.

  Attributes:
    state: the final `AveragingState`.
    history: one row per evaluation: step, syncs, bytes_up/bytes_down (exact
      cumulative), bytes, test_accuracy, test_loss, train_loss, and the block's
      mean estimate, mean true variance and `overestimate` (mean Est/Var); with an
      aggregator, its `aggregator/...` metrics after the block's last step.
    steps: per-step numpy arrays (`estimate`, `variance`, `synced`, `loss`,
      `aggregator/...`).
    cost: the static `CommunicationCost`.
    compile_seconds, run_seconds: wall-clock split.
  """

  state: AveragingState
  history: list[dict[str, Any]]
  steps: dict[str, np.ndarray]
  cost: communication.CommunicationCost
  compile_seconds: float
  run_seconds: float


def make_block(algorithm: AveragingAlgorithm, batch_size: int, ticks: bool = False) -> Callable:
  """`block(state, start, run_key, device_data, worker_clients, length)` → (state,
  stacked per-step metrics) for steps `start .. start + length − 1` (jitted; `length`
  static). With `ticks`, `block(..., length, every)` also reports every `every`-th
  step to `drive`'s progress bar (`driver.tick_unit`).

  Step t uses key `fold_in(run_key, t)` (split into a batch key and a training
  key), so results depend only on the seed and the step index. The data, the
  key and Θ (in the state) are arguments, so one compiled block serves every seed
  and threshold of a grid.
  """
  def block(state, start, run_key, device_data, worker_clients, length, *every):
    def body(state, t):
      batch_key, train_key = jax.random.split(jax.random.fold_in(run_key, t))
      batch, mask = sample_worker_batches(batch_key, device_data, worker_clients, batch_size)
      state, metrics = algorithm.step(state, batch, mask, train_key)
      if ticks:
        state = tick_unit(t - start + 1, state, *every)
      return state, metrics
    return jax.lax.scan(body, state, start + jnp.arange(length))

  return jax.jit(block, static_argnums=5)


# Compiled blocks, evaluators and uploaded data, reused across runs of the same
# algorithm object (a Θ grid, several seeds). Values keep their data alive, so ids
# stay unique.
_COMPILED: dict[tuple, Any] = {}


def _signature(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return (str(treedef),) + tuple((x.shape, str(x.dtype)) for x in leaves)


def _check_positive(**values) -> None:
  for label, value in values.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f'{label} must be a positive integer, got {value!r}')


class AveragingSimulator:
  """The dynamic-averaging timeline on the one driver (`simulate.driver.drive`).

  The unit is one local step of every worker; blocks of steps between evaluations
  are one compiled `lax.scan` (`make_block`), reused across simulators of the same
  algorithm object, batch size and data (a grid of Θ and seeds compiles once: the
  run key and Θ are arguments, not constants). Each row carries the step's
  `train_loss`, `synced`, cumulative `syncs`, the estimator's `estimate` and the
  true `variance`, the aggregator's metrics; evaluated rows add the last
  synchronized model's test metrics and the exact cumulative `bytes_up`,
  `bytes_down` and `bytes`. Checkpoints and resume: `run_with_checkpoints`.

  Example:
    >>> sim = AveragingSimulator(fda(model.loss, optax.sgd(0.05), num_workers=5,
    ...                              threshold=0.5), model, data, num_steps=500)
    >>> result = sim.run(sim.init())
  """

  unit = 'step'
  members = None
  unit_ticks = True

  def __init__(self, algorithm: AveragingAlgorithm, model, data: FederatedData, *,
               num_steps: int, batch_size: int = 32, eval_every: int = 50, seed: int = 0,
               threshold: float | None = None, worker_clients: np.ndarray | None = None,
               evaluate: Callable | None = None, mesh=None):
    _check_positive(num_steps=num_steps, batch_size=batch_size, eval_every=eval_every)
    k = algorithm.num_workers
    if worker_clients is None:
      if k > data.num_clients:
        raise ValueError(f'{k} workers but the dataset has only {data.num_clients} clients')
      worker_clients = np.arange(k)
    worker_clients = np.asarray(worker_clients, np.int32)
    if (worker_clients.shape != (k,) or worker_clients.min() < 0
        or worker_clients.max() >= data.num_clients):
      raise ValueError(f'worker_clients must be {k} client ids in [0, {data.num_clients}), '
                       f'got {worker_clients.tolist()}')
    self.algorithm, self.model, self.data, self.mesh = algorithm, model, data, mesh
    self.num_units, self.batch_size, self.eval_every = num_steps, batch_size, eval_every
    self.seed, self.threshold = seed, threshold
    self.worker_clients = worker_clients
    data_key = ('data', id(data), id(mesh))
    if data_key not in _COMPILED:
      sharding = NamedSharding(mesh, P()) if mesh is not None else None
      _COMPILED[data_key] = (to_device(data, sharding), data)
    self._device_data = _COMPILED[data_key][0]
    if evaluate is None:
      eval_key = ('evaluate', id(data), model.evaluate)
      if eval_key not in _COMPILED:
        _COMPILED[eval_key] = (make_evaluator(model.evaluate, data, per_client=False), data)
      evaluate = _COMPILED[eval_key][0]
    self._evaluate = evaluate
    block_key = ('block', algorithm, batch_size)
    if block_key not in _COMPILED:
      _COMPILED[block_key] = make_block(algorithm, batch_size)
    self._jitted = _COMPILED[block_key]
    self._run_key = jax.random.key(seed)
    self._workers = jnp.asarray(worker_clients)
    self._cost = None

  def init(self, params: Params | None = None) -> AveragingState:
    """Every worker at `params` (default: the model's init from `fold_in(key(seed),
    2**31 − 1)`, as every driver draws it); Θ from `threshold` when given."""
    if params is None:
      params = self.model.init(jax.random.fold_in(self._run_key, 2**31 - 1))
    return self.algorithm.init(params, self.threshold)

  def cost(self, state: AveragingState) -> communication.CommunicationCost:
    """The static per-step and per-synchronization byte counts of this run."""
    if self._cost is None:
      self._cost = self.algorithm.cost(state.anchor)
    return self._cost

  def _args(self, state, start):
    return (state, jnp.asarray(start, jnp.int32), self._run_key, self._device_data,
            self._workers)

  def _key(self, state, length, ticks: bool = False):
    return ('compiled', self.algorithm, self.batch_size, length,
            _signature(self._args(state, 0))) + (('ticks',) if ticks else ())

  def is_compiled(self, state: AveragingState, length: int, ticks: bool = False) -> bool:
    return self._key(state, length, ticks) in _COMPILED

  def compile(self, state: AveragingState, length: int, ticks: bool = False) -> None:
    key = self._key(state, length, ticks)
    if key not in _COMPILED:
      if ticks:
        block_key = ('block', self.algorithm, self.batch_size, 'ticks')
        if block_key not in _COMPILED:
          _COMPILED[block_key] = make_block(self.algorithm, self.batch_size, ticks=True)
        program = _COMPILED[block_key].lower(*self._args(state, 0), length,
                                             jnp.zeros((), jnp.int32))
      else:
        program = self._jitted.lower(*self._args(state, 0), length)
      _COMPILED[key] = (program.compile(), self.data)

  def run_units(self, state: AveragingState, start: int, length: int, ticks: int = 0):
    """Steps `start .. start + length − 1`; `ticks=k`: the program that reports every
    k-th step to `drive`'s progress bar."""
    key = self._key(state, length, bool(ticks))
    if key not in _COMPILED:
      self.compile(state, length, bool(ticks))
    every = (jnp.asarray(ticks, jnp.int32),) if ticks else ()
    state, stacked = _COMPILED[key][0](*self._args(state, start), *every)
    stacked = dict(stacked)
    stacked['train_loss'] = stacked.pop('loss')
    # Cumulative synchronizations after each step of the block.
    syncs = jnp.cumsum(stacked['synced'].astype(jnp.int32))
    stacked['syncs'] = state.num_syncs - syncs[-1] + syncs
    self.step_metrics = tuple(stacked)
    return state, stacked

  def evaluate_state(self, state: AveragingState) -> dict[str, Any]:
    up, down = self.cost(state).totals(int(state.step), int(state.num_syncs))
    return {**jax.device_get(self._evaluate(state.anchor)), 'bytes_up': up, 'bytes_down': down,
            'bytes': up + down}

  def evaluated_model(self, state: AveragingState):
    """`(the last synchronized model, no per-client state)`: what this timeline evaluates."""
    return state.anchor, ()

  def identity(self) -> dict[str, Any]:
    """What a checkpoint must agree with to continue this run."""
    return {'algorithm': self.algorithm.name, 'dataset': getattr(self.data, 'name', None),
            'num_clients': int(self.data.num_clients), 'seed': self.seed,
            'timeline': 'averaging', 'batch_size': self.batch_size,
            'worker_clients': self.worker_clients.tolist()}

  def run(self, state: AveragingState, *, start_round: int | None = None,
          run_dir: str | None = None, progress: bool = False, tensorboard: bool = False,
          on_block: Callable | None = None, block_every: int | None = None,
          evaluation_hooks: Sequence[Callable] = (), max_bytes: int | None = None
          ) -> SimulationResult:
    """Runs the remaining local steps through the one driver; one row per step.

    Args:
      state: the state after `start_round` steps (default: `state.step`); copied
        once before the first (donating) block, so it stays usable.
      run_dir, progress, tensorboard, on_block, block_every, evaluation_hooks: as
        `Simulator.run`.
      max_bytes: stop at the first evaluation where the communicated bytes (up +
        down) reach this budget (overshooting by at most one block).
    """
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
      raise ValueError(f'max_bytes must be a positive integer or None, got {max_bytes!r}')
    start = int(state.step) if start_round is None else start_round
    stop = None
    if max_bytes is not None:
      stop = lambda history: history[-1].get('bytes', 0) >= max_bytes   # noqa: E731
    result = drive(self, fresh_buffers(state), start=start, run_dirs=run_dir,
                   progress=progress, tensorboard=tensorboard, on_block=on_block,
                   block_every=block_every, evaluation_hooks=evaluation_hooks, stop_when=stop)
    return SimulationResult(state=result.state, history=result.histories[0],
                            final_eval=result.final_evals[0],
                            compile_seconds=result.compile_seconds,
                            run_seconds=result.run_seconds, nonfinite_round=result.nonfinite[0])


def run_averaging(algorithm: AveragingAlgorithm, model, data: FederatedData, *, num_steps: int,
                  batch_size: int = 32, eval_every: int = 50, seed: int = 0,
                  threshold: float | None = None, max_bytes: int | None = None,
                  worker_clients: np.ndarray | None = None,
                  params: Params | None = None, evaluate: Callable | None = None,
                  mesh=None) -> AveragingResult:
  """Runs `num_steps` local steps of K workers, evaluating w0 every `eval_every` steps.

  A functional front of `AveragingSimulator` (the one driver) whose history has one
  row per evaluation. Compiled programs are cached per algorithm object, batch size,
  block length and input shapes: a grid over `threshold` and `seed` compiles once.

  Args:
    algorithm: from `fda`, `local_sgd`, `periodic_fed_adam`, ...
    model: a `fedjax_sync.models.Model` (init and evaluate).
    data: the federated data; worker k holds client `worker_clients[k]`
      (default: clients 0..K−1).
    num_steps: the budget of local steps.
    batch_size: B.
    eval_every: steps per compiled block; the last synchronized model w0 (what the
      server holds) is evaluated on the global test set after each block.
    seed: the run seed (initial params from `fold_in(key(seed), 2**31 − 1)`).
    threshold: overrides the FDA algorithm's Θ for this run.
    max_bytes: optional budget of communicated bytes (up + down): the run stops
      at the first evaluation point where the total reaches it (so it may overshoot
      by at most one block's communication).
    worker_clients: `[K]` client ids of the workers.
    params: optional initial params.
    evaluate: optional `evaluate(params) -> {'test_accuracy', 'test_loss', ...}`
      (default: a compiled evaluator of `model.evaluate` on `data.test`).
    mesh: optional 'clients' mesh; the data is replicated over it.
  """
  _check_positive(num_steps=num_steps, batch_size=batch_size, eval_every=eval_every)
  if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
    raise ValueError(f'max_bytes must be a positive integer or None, got {max_bytes!r}')
  sim = AveragingSimulator(algorithm, model, data, num_steps=num_steps, batch_size=batch_size,
                           eval_every=eval_every, seed=seed, threshold=threshold,
                           worker_clients=worker_clients, evaluate=evaluate, mesh=mesh)
  state = sim.init(params)
  result = sim.run(state, start_round=0, max_bytes=max_bytes)
  rows = result.history
  steps = {name: np.asarray([row[name] for row in rows])
           for name in sim.step_metrics if name != 'syncs'}
  steps['loss'] = steps.pop('train_loss')
  history, begin = [], 0
  for end, row in enumerate(rows, 1):
    if 'bytes' not in row:
      continue
    block = {name: v[begin:end] for name, v in steps.items()}
    begin = end
    out = {'step': row['step'], 'syncs': row['syncs'], 'bytes_up': row['bytes_up'],
           'bytes_down': row['bytes_down'], 'bytes': row['bytes'],
           'train_loss': float(np.mean(block['loss']))}
    out.update({k: v for k, v in row.items()
                if k not in sim.step_metrics and k not in out and k not in ('round', 'step')
                and not k.startswith('aggregator/')})
    if 'estimate' in block:
      out['estimate_mean'] = float(np.mean(block['estimate']))
    if 'variance' in block:
      out['variance_mean'] = float(np.mean(block['variance']))
      if 'estimate' in block:
        out['overestimate'] = overestimate_ratio(block['estimate'], block['variance'])
    out.update({k: v for k, v in row.items() if k.startswith('aggregator/')})
    history.append(out)
  return AveragingResult(state=result.state, history=history, steps=steps,
                         cost=sim.cost(result.state), compile_seconds=result.compile_seconds,
                         run_seconds=result.run_seconds)


def overestimate_ratio(estimate: np.ndarray, variance: np.ndarray) -> float:
  """Mean of Est/Var over the steps with Var > 0 (≥ 1 for a conservative estimator);
  NaN when no step has positive variance."""
  estimate, variance = np.asarray(estimate, np.float64), np.asarray(variance, np.float64)
  positive = variance > 1e-12
  if not positive.any():
    return math.nan
  return float(np.mean(estimate[positive] / variance[positive]))
