"""The semi-asynchronous engine: buffered aggregation on a simulated clock, compiled.

Rules (../ALGORITHMS.md, "Semi-asynchronous FL"; FedBuff, Nguyen et al. 2022,
arXiv 2106.06639; FedQS, arXiv 2510.07664): every client is always busy with one
job. A job starts from the latest global model, whose version v the client
records, and finishes `job_times` later. When K updates have arrived the server
aggregates them, the version becomes t + 1, and those K clients start new jobs
from the new model. The staleness of an update is τ = t − v.

An event loop is not needed: the next aggregation is exactly the K earliest
finishers, found with `lax.top_k` on the `[N]` finish times. One step of the
compiled `lax.scan` is one aggregation:

  1. ids [K] = the K smallest finish times among jobs that will arrive; the clock
     moves to the largest of them.
  2. Each update is trained from the model version its client started from, read
     from a ring buffer of the last H = max_staleness + 1 global models (`[H, ...]`
     leaves, indexed by version mod H). An update older than `max_staleness` has
     lost its model and is discarded (weight 0; counted in `num_discarded`).
  3. The K clients train under `map_clients` (vmap / chunked / sequential, sharded
     over the 'clients' mesh axis), the algorithm's `server_update` aggregates.
  4. The new model is written to the ring buffer and the K clients restart.

Availability traces (`ClientClock.trace`): a client starts a job only while it
is online, at the first online time at or after the moment it would start (the
model it trains from is still the one of that moment: an approximation, as for
lost jobs below); a client never online again never finishes.

Lost jobs (dropout or availability masks): such a job never arrives; at the first
aggregation after its would-be finish time the client starts a new job, from that
finish time and the newest model (an approximation: the model pushed at the
aggregation, not the one current at the finish time; documented choice). At most
K lost clients restart per aggregation (the earliest); the rest restart at the
next one, with the same restart time.

Keys mirror the synchronous driver: aggregation t uses `fold_in(run_key, t)`
split into (unused, batch key, algorithm key), and the algorithm key is split
into (client root, server key) with client keys `fold_in(client_root, id)`. So
with N equally fast clients and K = N the engine reproduces synchronous FedAvg
with full participation round for round (tested).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_sync import communication
from fedjax_sync.clients.execution import ClientExecution, map_clients, replicate, shard_client_axis
from fedjax_sync.data.batching import LocalWork, make_client_batch, to_device
from fedjax_sync.data.federated import FederatedData
from fedjax_sync.simulate.clock import ClientClock, job_available, job_start_times, job_times
from fedjax_sync.simulate.evaluation import make_evaluator
from fedjax_sync.simulate.population import check_asynchronous, check_population
from fedjax_sync.simulate.driver import (CompiledBlocks, distinct_buffers, drive, fresh_buffers,
                                         tick_unit)
from fedjax_sync.types import ClientBatch, Params, PyTree, ServerState

RESTARTS = ('new_model', 'current_model')
_CLOCK_STREAM = 0xC10C


class AsyncRound(NamedTuple):
  """What the server knows about the K updates of one aggregation.

  Attributes:
    client_ids: `[K]` int32 clients whose updates are aggregated.
    weight: `[K]` float, the number of examples of each update; 0 for an update
      that does not count (discarded as too stale, or no arrival at all).
    staleness: `[K]` int32 τ = t − v.
    start_versions: `[K]` int32 version v each update was trained from.
    start_params: params pytree with `[K, ...]` leaves, the model each client
      started from.
    key: the server's key for this aggregation.
  """

  client_ids: jax.Array
  weight: jax.Array
  staleness: jax.Array
  start_versions: jax.Array
  start_params: Params
  key: jax.Array


class AsyncAlgorithm(NamedTuple):
  """A semi-asynchronous algorithm: four pure functions.

  Attributes:
    init: `init(params) -> ServerState` (per-client state `[N, ...]` in
      `client_states`).
    client_inputs: `(state, client_ids [K], start_versions [K], history) ->` a pytree
      with `[K, ...]` leaves handed to each client (e.g. FedQS's learning rate and
      momentum), computed before training; `history` has `[H, ...]` leaves.
    client_update: `(start_params, client_input, data [S, B, ...], mask [S, B], key)
      -> ClientOutput` for one client; `update` is the pseudo-gradient
      `start_params − local_params`.
    server_update: `(state, outputs: ClientOutput [K], AsyncRound) -> (state,
      metrics)`; returns the new params (the engine advances `round`).
    name: a human-readable name.
    num_clients: the population N of its per-client state, or None when it keeps
      none; `SemiAsyncSimulator` checks it against the data.
  """

  init: Callable[[Params], ServerState]
  client_inputs: Callable[..., PyTree]
  client_update: Callable[..., Any]
  server_update: Callable[..., tuple[ServerState, dict]]
  name: str = 'async'
  num_clients: int | None = None


class AsyncState(NamedTuple):
  """The whole state of a semi-asynchronous run (a pytree).

  Attributes:
    server: the algorithm's `ServerState`; `server.round` is the version t.
    history: ring buffer of global models, leaves `[H, ...]`, version v at `v % H`.
    start_version: `[N]` int32 version each client's current job started from.
    finish_time: `[N]` float32 simulated time its current job finishes.
    arrives: `[N]` bool, False when the current job is lost (dropout).
    jobs: `[N]` int32 number of jobs each client has started (keys its job times).
    now: float32 scalar simulated time of the last aggregation.
  """

  server: ServerState
  history: Params
  start_version: jax.Array
  finish_time: jax.Array
  arrives: jax.Array
  jobs: jax.Array
  now: jax.Array


BatchFn = Callable[[jax.Array, jax.Array], ClientBatch]


def make_async_engine(algorithm: AsyncAlgorithm, clock: ClientClock, batch_fn: BatchFn, *,
                      buffer_size: int, max_staleness: int = 32, restart: str = 'new_model',
                      run_key: jax.Array,
                      execution: ClientExecution = ClientExecution()):
  """Builds `(init, step)` of the semi-asynchronous engine.

  Args:
    algorithm: an `AsyncAlgorithm` (e.g. `fed_buff`, `fed_qs_sgd`).
    clock: per-client job durations and availability (N = clock.num_clients).
    batch_fn: `(batch_key, client_ids [K]) -> ClientBatch` of those clients.
    buffer_size: K, updates per aggregation.
    max_staleness: updates with τ > max_staleness are discarded; the ring buffer
      holds max_staleness + 1 models.
    restart: 'new_model' (default, the issue's reading: the K aggregated clients
      start their next job at the aggregation time from the new model) or
      'current_model' (a client restarts the moment it uploads, from the model
      current then, as in FedBuff's client loop; staleness ≥ 1 for all but
      the K-th).
    run_key: the run's key.
    execution: client execution; K must be a multiple of the mesh's device count.

  Returns:
    `init(params) -> AsyncState` and `step(state) -> (state, metrics)`, both
    jittable; `step` is one aggregation.
  """
  num_clients = clock.num_clients
  check_asynchronous(algorithm, 'make_async_engine')
  check_population(algorithm, num_clients)
  execution = execution.validate()
  if not isinstance(buffer_size, int) or not 1 <= buffer_size <= num_clients:
    raise ValueError(f'buffer_size must be an integer in [1, {num_clients}], got {buffer_size!r}')
  if not isinstance(max_staleness, int) or max_staleness < 0:
    raise ValueError(f'max_staleness must be a non-negative integer, got {max_staleness!r}')
  if restart not in RESTARTS:
    raise ValueError(f'unknown restart {restart!r}; valid: {", ".join(RESTARTS)}')
  if buffer_size % execution.num_shards:
    raise ValueError(f'buffer_size={buffer_size} must be a multiple of the '
                     f'{execution.num_shards} devices of the mesh')
  ring = max_staleness + 1
  clock_key = jax.random.fold_in(run_key, _CLOCK_STREAM)
  all_ids = jnp.arange(num_clients, dtype=jnp.int32)
  may_drop = bool(clock.dropout) or clock.availability is not None

  def init(params: Params) -> AsyncState:
    server = algorithm.init(params)
    check_population(algorithm, num_clients, server.client_states)
    history = jax.tree.map(lambda x: jnp.broadcast_to(x, (ring,) + x.shape).astype(x.dtype),
                           server.params)
    jobs = jnp.zeros((num_clients,), jnp.int32)
    return AsyncState(
        server=server, history=history,
        start_version=jnp.zeros((num_clients,), jnp.int32),
        finish_time=(job_start_times(clock, all_ids, 0.0)
                     + job_times(clock, clock_key, all_ids, jobs)).astype(jnp.float32),
        arrives=job_available(clock, clock_key, all_ids, jobs),
        jobs=jobs + 1, now=jnp.zeros((), jnp.float32))

  def step(state: AsyncState):
    version = state.server.round
    ranking = jnp.where(state.arrives, state.finish_time, jnp.inf)
    negative, ids = jax.lax.top_k(-ranking, buffer_size)
    ids = ids.astype(jnp.int32)
    finish = -negative
    arrived = jnp.isfinite(finish)
    now = jnp.maximum(state.now, jnp.max(jnp.where(arrived, finish, -jnp.inf)))
    start_versions = state.start_version[ids]
    staleness = version - start_versions
    fresh = staleness <= max_staleness

    _, batch_key, algorithm_key = jax.random.split(jax.random.fold_in(run_key, version), 3)
    batch = batch_fn(batch_key, ids)
    weight = jnp.where(arrived & fresh, batch.weight, jnp.zeros_like(batch.weight))
    start_params = jax.tree.map(lambda h: h[start_versions % ring], state.history)
    client_root, server_key = jax.random.split(algorithm_key)
    keys = jax.vmap(lambda i: jax.random.fold_in(client_root, i))(ids)
    inputs = algorithm.client_inputs(state.server, ids, start_versions, state.history)
    sharded = shard_client_axis((start_params, inputs, batch.data, batch.mask, keys),
                                execution.mesh)
    outputs = map_clients(algorithm.client_update, sharded, execution,
                          client_bytes=communication.model_bytes(state.server.params))
    info = AsyncRound(client_ids=ids, weight=weight, staleness=staleness,
                      start_versions=start_versions, start_params=start_params, key=server_key)
    server, metrics = algorithm.server_update(state.server, outputs, info)
    server = server._replace(round=version + 1)
    new_params = replicate(server.params, execution.mesh)
    history = jax.tree.map(lambda h, p: h.at[(version + 1) % ring].set(p), state.history,
                           new_params)

    # Restart the aggregated clients.
    if restart == 'new_model':
      restart_time, restart_version = jnp.broadcast_to(now, ids.shape), version + 1
    else:
      restart_time, restart_version = finish, version
    jobs_k = state.jobs[ids]
    restart_time = job_start_times(clock, ids, restart_time)   # waits for an online window
    duration = job_times(clock, clock_key, ids, jobs_k)
    finish_time = state.finish_time.at[ids].set(
        jnp.where(arrived, restart_time + duration, state.finish_time[ids]))
    start_version = state.start_version.at[ids].set(
        jnp.where(arrived, restart_version, start_versions))
    arrives = state.arrives.at[ids].set(
        jnp.where(arrived, job_available(clock, clock_key, ids, jobs_k), state.arrives[ids]))
    jobs = state.jobs.at[ids].add(arrived.astype(jnp.int32))

    num_lost = jnp.zeros((), jnp.float32)
    if may_drop:
      # Lost jobs whose time has passed: the client starts again, at its lost job's
      # finish time, from the newest model. At most K per aggregation (the earliest),
      # so that the work stays O(K) draws plus one O(N) top-k; the others wait for
      # the next aggregation (their restart *time* is unaffected).
      overdue = jnp.where(~arrives & (finish_time <= now), finish_time, jnp.inf)
      negative_lost, lost_ids = jax.lax.top_k(-overdue, buffer_size)
      lost = jnp.isfinite(negative_lost)
      lost_jobs = jobs[lost_ids]
      lost_finish = finish_time[lost_ids]
      finish_time = finish_time.at[lost_ids].set(jnp.where(
          lost, job_start_times(clock, lost_ids, lost_finish)
          + job_times(clock, clock_key, lost_ids, lost_jobs), lost_finish))
      start_version = start_version.at[lost_ids].set(
          jnp.where(lost, version + 1, start_version[lost_ids]))
      arrives = arrives.at[lost_ids].set(jnp.where(
          lost, job_available(clock, clock_key, lost_ids, lost_jobs), arrives[lost_ids]))
      jobs = jobs.at[lost_ids].add(lost.astype(jnp.int32))
      num_lost = jnp.sum(lost.astype(jnp.float32))

    counted = (weight > 0).astype(jnp.float32)
    metrics = dict(metrics)
    metrics.update({
        'wall_clock': now,
        'client_ids': ids,
        'weight': weight,
        'staleness': staleness,
        'mean_staleness': jnp.sum(counted * staleness) / jnp.maximum(jnp.sum(counted), 1.0),
        'max_staleness': jnp.max(jnp.where(weight > 0, staleness, 0)),
        'num_discarded': jnp.sum((arrived & ~fresh).astype(jnp.float32)),
        'num_restarted_lost': num_lost,
    })
    new_state = AsyncState(server=server, history=history, start_version=start_version,
                           finish_time=finish_time, arrives=arrives, jobs=jobs, now=now)
    return new_state, metrics

  return init, step


@dataclasses.dataclass(frozen=True)
class AsyncConfig:
  """What a semi-asynchronous simulation runs.

  Attributes:
    num_aggregations: T server aggregations.
    buffer_size: K updates per aggregation.
    local_work: local epochs or steps and batch size of every job.
    max_staleness: bound of the ring buffer; staler updates are discarded.
    restart: 'new_model' or 'current_model' (see `make_async_engine`).
    eval_every: evaluate every k aggregations (and after the last).
    seed: run seed.
  """

  num_aggregations: int
  buffer_size: int
  local_work: LocalWork
  max_staleness: int = 32
  restart: str = 'new_model'
  eval_every: int = 10
  seed: int = 0

  def validate(self) -> 'AsyncConfig':
    for name in ('num_aggregations', 'buffer_size', 'eval_every'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive integer, got {value!r}')
    self.local_work.validate()
    return self


class AsyncResult(NamedTuple):
  state: AsyncState
  history: list[dict[str, Any]]   # one row per aggregation; evaluation at eval points
  final_eval: dict[str, Any]
  compile_seconds: float
  run_seconds: float


class SemiAsyncSimulator(CompiledBlocks):
  """Runs a semi-asynchronous algorithm on a `FederatedData` with a simulated clock.

  Blocks of `eval_every` aggregations run as one compiled `lax.scan`; keys and
  initial params follow `Simulator` (params from `fold_in(seed_key, 2**31 − 1)`).

  Example:
    >>> clock = make_clock(speed_ratio_times(100, 20.0))
    >>> sim = SemiAsyncSimulator(fed_buff(model.loss, optax.sgd(0.05)), model, data, clock,
    ...                          AsyncConfig(200, 10, LocalWork(50, epochs=2)))
    >>> result = sim.run(sim.init())   # rows carry 'wall_clock' and 'test_accuracy'
  """

  def __init__(self, algorithm: AsyncAlgorithm, model, data: FederatedData, clock: ClientClock,
               config: AsyncConfig, *, execution: ClientExecution = ClientExecution()):
    check_asynchronous(algorithm, type(self).__name__)
    check_population(algorithm, data.num_clients)
    if clock.num_clients != data.num_clients:
      raise ValueError(f'the clock has {clock.num_clients} clients, the data {data.num_clients}')
    self.algorithm, self.model, self.data, self.clock = algorithm, model, data, clock
    self.config = config.validate()
    self.execution = execution.validate()
    sharding = NamedSharding(execution.mesh, P()) if execution.mesh is not None else None
    device_data = to_device(data, sharding)
    positive = data.counts[data.counts > 0]
    if positive.size == 0:
      raise ValueError('the dataset has no client with examples')
    max_count = int(positive.max())
    work = config.local_work

    def batch_fn(key, ids):
      return make_client_batch(key, device_data, ids, work, max_count=max_count)

    self._run_key = jax.random.key(config.seed)
    self._init, self._step = make_async_engine(
        algorithm, clock, batch_fn, buffer_size=config.buffer_size,
        max_staleness=config.max_staleness, restart=config.restart, run_key=self._run_key,
        execution=execution)
    self._evaluate = make_evaluator(model.evaluate, data, per_client=False)
    self._blocks: dict[int, Callable] = {}

  def init(self, params: Params | None = None) -> AsyncState:
    if params is None:
      params = self.model.init(jax.random.fold_in(self._run_key, 2**31 - 1))
    # Fresh buffers: equal constants may share one, and the blocks donate the state.
    return jax.tree.map(jnp.copy, jax.jit(self._init)(params))

  def _block(self, state: AsyncState, length: int, ticks: bool = False) -> Callable:
    cache = self.block_key(length, ticks)
    if cache not in self._blocks:
      check_population(self.algorithm, self.data.num_clients, state.server.client_states)
      def run_block(s, *every):
        if not ticks:
          return jax.lax.scan(lambda c, _: self._step(c), s, None, length=length)
        def body(c, i):
          c, metrics = self._step(c)
          return tick_unit(i + 1, c, *every), metrics
        return jax.lax.scan(body, s, jnp.arange(length))
      self._blocks[cache] = jax.jit(run_block, donate_argnums=0).lower(
          state, *([jnp.zeros((), jnp.int32)] if ticks else [])).compile()
    return self._blocks[cache]

  def run_aggregations(self, state: AsyncState, length: int, ticks: int = 0):
    """Runs `length` aggregations as one compiled program (donates `state`; a leaf
    repeated in `state` is copied first). `ticks=k`: the program that reports every
    k-th aggregation to `drive`'s progress bar (`driver.tick_unit`)."""
    state = distinct_buffers(state)
    every = (jnp.asarray(ticks, jnp.int32),) if ticks else ()
    return self._block(state, length, bool(ticks))(state, *every)

  def evaluate(self, params: Params) -> dict[str, Any]:
    return jax.device_get(self._evaluate(params))

  def run(self, state: AsyncState, *, start_round: int | None = None,
          run_dir: str | None = None, progress: bool = False, tensorboard: bool = False,
          on_block: Callable | None = None, block_every: int | None = None,
          evaluation_hooks: Sequence[Callable] = (), evaluate: bool = True) -> AsyncResult:
    """Runs the configured aggregations through the one driver (`simulate.driver.drive`).

    Rows have 'aggregation' (= 'round', the driver's unit counter), 'wall_clock' and
    the scalar metrics, plus 'test_accuracy' / 'test_loss' every `eval_every`.
    `state` is copied once before the first (donating) block, so it stays usable.

    Args:
      state: the state after `start_round` aggregations.
      start_round: aggregations already done (default: `state.server.round`).
      run_dir, progress, tensorboard, on_block, block_every, evaluation_hooks: as
        `Simulator.run` (metrics.jsonl, TensorBoard events, progress bar,
        checkpoint hooks, extra evaluation).
      evaluate: evaluate the global model after each block (False: training only).
    """
    start = int(state.server.round) if start_round is None else start_round
    result = drive(self, fresh_buffers(state), start=start, run_dirs=run_dir,
                   progress=progress, tensorboard=tensorboard, on_block=on_block,
                   block_every=block_every, evaluation_hooks=evaluation_hooks,
                   evaluate=evaluate)
    return AsyncResult(state=result.state, history=result.histories[0],
                       final_eval=result.final_evals[0] if evaluate else {},
                       compile_seconds=result.compile_seconds, run_seconds=result.run_seconds)

  # The driver's view of this runner (`fedjax_sync.simulate.driver.Runner`).
  unit = 'aggregation'
  members = None

  @property
  def num_units(self) -> int:
    return self.config.num_aggregations

  @property
  def eval_every(self) -> int:
    return self.config.eval_every



  def run_units(self, state: AsyncState, start: int, length: int, ticks: int = 0):
    del start   # the version counter in the state is the position
    return self.run_aggregations(state, length, ticks)

  def evaluate_state(self, state: AsyncState) -> dict[str, Any]:
    return self.evaluate(state.server.params)

  def evaluated_model(self, state: AsyncState):
    """`(global params, per-client states)`: the model this timeline evaluates."""
    return state.server.params, state.server.client_states

  def identity(self) -> dict[str, Any]:
    """What a checkpoint must agree with to continue this run."""
    cfg = self.config
    return {'algorithm': self.algorithm.name, 'dataset': getattr(self.data, 'name', None),
            'num_clients': int(self.data.num_clients), 'seed': cfg.seed,
            'timeline': 'semi_async', 'buffer_size': cfg.buffer_size,
            'local_work': list(cfg.local_work), 'max_staleness': cfg.max_staleness,
            'restart': cfg.restart}
