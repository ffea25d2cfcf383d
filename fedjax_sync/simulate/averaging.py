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
import time
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_sync import communication
from fedjax_sync.data.batching import DeviceData, to_device
from fedjax_sync.data.federated import FederatedData
from fedjax_sync.simulate.evaluation import make_evaluator
from fedjax_sync.types import Params

if TYPE_CHECKING:  # the algorithms import this module's names as aliases
  from fedjax_sync.algorithms.fda import AveragingAlgorithm, AveragingState

__all__ = ['AveragingResult', 'make_block', 'overestimate_ratio', 'run_averaging',
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


def make_block(algorithm: AveragingAlgorithm, batch_size: int) -> Callable:
  """`block(state, start, run_key, device_data, worker_clients, length)` → (state,
  stacked per-step metrics) for steps `start .. start + length − 1` (jitted; `length`
  static).

  Step t uses key `fold_in(run_key, t)` (split into a batch key and a training
  key), so results depend only on the seed and the step index. The data, the
  key and Θ (in the state) are arguments, so one compiled block serves every seed
  and threshold of a grid.
  """
  def block(state, start, run_key, device_data, worker_clients, length):
    def body(state, t):
      batch_key, train_key = jax.random.split(jax.random.fold_in(run_key, t))
      batch, mask = sample_worker_batches(batch_key, device_data, worker_clients, batch_size)
      return algorithm.step(state, batch, mask, train_key)
    return jax.lax.scan(body, state, start + jnp.arange(length))

  return jax.jit(block, static_argnums=5)


# Compiled blocks and evaluators, reused across runs of the same algorithm object
# (a Θ grid, several seeds). Values keep their data alive, so ids stay unique.
_COMPILED: dict[tuple, Any] = {}


def _signature(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return (str(treedef),) + tuple((x.shape, str(x.dtype)) for x in leaves)


def run_averaging(algorithm: AveragingAlgorithm, model, data: FederatedData, *, num_steps: int,
                  batch_size: int = 32, eval_every: int = 50, seed: int = 0,
                  threshold: float | None = None, max_bytes: int | None = None,
                  worker_clients: np.ndarray | None = None,
                  params: Params | None = None, evaluate: Callable | None = None,
                  mesh=None) -> AveragingResult:
  """Runs `num_steps` local steps of K workers, evaluating w0 every `eval_every` steps.

  Compiled programs are cached per algorithm object, batch size, block length and
  input shapes: a grid over `threshold` and `seed` compiles once.

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
  for label, value in (('num_steps', num_steps), ('batch_size', batch_size),
                       ('eval_every', eval_every)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'{label} must be a positive integer, got {value!r}')
  k = algorithm.num_workers
  if worker_clients is None:
    if k > data.num_clients:
      raise ValueError(f'{k} workers but the dataset has only {data.num_clients} clients')
    worker_clients = np.arange(k)
  worker_clients = np.asarray(worker_clients, np.int32)
  if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
    raise ValueError(f'max_bytes must be a positive integer or None, got {max_bytes!r}')
  if (worker_clients.shape != (k,) or worker_clients.min() < 0
      or worker_clients.max() >= data.num_clients):
    raise ValueError(f'worker_clients must be {k} client ids in [0, {data.num_clients}), '
                     f'got {worker_clients.tolist()}')
  data_key = ('data', id(data), id(mesh))
  if data_key not in _COMPILED:
    sharding = NamedSharding(mesh, P()) if mesh is not None else None
    _COMPILED[data_key] = (to_device(data, sharding), data)
  device_data = _COMPILED[data_key][0]
  run_key = jax.random.key(seed)
  if params is None:
    params = model.init(jax.random.fold_in(run_key, 2**31 - 1))
  if evaluate is None:
    eval_key = ('evaluate', id(data), model.evaluate)
    if eval_key not in _COMPILED:
      _COMPILED[eval_key] = (make_evaluator(model.evaluate, data, per_client=False), data)
    evaluate = _COMPILED[eval_key][0]
  cost = algorithm.cost(params)
  block_key = ('block', algorithm, batch_size)
  if block_key not in _COMPILED:
    _COMPILED[block_key] = make_block(algorithm, batch_size)
  block = _COMPILED[block_key]
  state = algorithm.init(params, threshold)
  workers = jnp.asarray(worker_clients)
  history, pieces = [], []
  compile_seconds, started = 0.0, time.perf_counter()
  t = 0
  while t < num_steps:
    length = min(eval_every, num_steps - t)
    start = jnp.asarray(t, jnp.int32)
    args = (state, start, run_key, device_data, workers)
    key = ('compiled', algorithm, batch_size, length, _signature(args))
    if key not in _COMPILED:
      t0 = time.perf_counter()
      _COMPILED[key] = (block.lower(*args, length).compile(), data)
      compile_seconds += time.perf_counter() - t0
    state, stacked = _COMPILED[key][0](*args)
    stacked = jax.device_get(stacked)
    pieces.append(stacked)
    t += length
    syncs = int(state.num_syncs)
    up, down = cost.totals(t, syncs)
    row = {'step': t, 'syncs': syncs, 'bytes_up': up, 'bytes_down': down, 'bytes': up + down,
           'train_loss': float(np.mean(stacked['loss']))}
    row.update({name: float(v) for name, v in jax.device_get(evaluate(state.anchor)).items()
                if np.ndim(v) == 0})
    if 'estimate' in stacked:
      row['estimate_mean'] = float(np.mean(stacked['estimate']))
    if 'variance' in stacked:
      row['variance_mean'] = float(np.mean(stacked['variance']))
      if 'estimate' in stacked:
        row['overestimate'] = overestimate_ratio(stacked['estimate'], stacked['variance'])
    # The aggregator's report after the block's last step (its last synchronization).
    row.update({name: float(v[-1]) for name, v in stacked.items()
                if name.startswith('aggregator/') and np.ndim(v[-1]) == 0})
    history.append(row)
    if max_bytes is not None and up + down >= max_bytes:
      break
  steps = {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}
  return AveragingResult(state=state, history=history, steps=steps, cost=cost,
                         compile_seconds=compile_seconds,
                         run_seconds=time.perf_counter() - started - compile_seconds)


def overestimate_ratio(estimate: np.ndarray, variance: np.ndarray) -> float:
  """Mean of Est/Var over the steps with Var > 0 (≥ 1 for a conservative estimator);
  NaN when no step has positive variance."""
  estimate, variance = np.asarray(estimate, np.float64), np.asarray(variance, np.float64)
  positive = variance > 1e-12
  if not positive.any():
    return math.nan
  return float(np.mean(estimate[positive] / variance[positive]))
