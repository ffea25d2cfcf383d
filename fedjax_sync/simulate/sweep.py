"""Sweeps: S independent simulations compiled and run as ONE program with `jax.vmap`.

A sweep stacks S server states along a leading simulation axis `[S, ...]` and
vmaps a block of rounds (the same `lax.scan` as `Simulator.run_rounds`) over it:
each simulation has its own run key (hence its own initial params, client samples,
batch shuffles and algorithm keys) and its own hyperparameter values. The data
are uploaded once and shared. The result of simulation `s` equals that of a
`Simulator` run with the same seed and hyperparameters (to float tolerance: the
vmapped program may fuse differently); `tests/test_sweep.py` checks this.

Traced hyperparameters: the algorithm is rebuilt inside the trace by
`build(hyperparameters)` where each swept value is a scalar `jax.Array`, so only
hyperparameters used as arrays can be swept: learning rates (optax accepts an array
learning rate), FedProx's μ. Values used in Python control flow (a momentum that
switches a code path) cannot; sweep those with separate runs.

The grid is the product `seeds × values` of every swept hyperparameter.

Example:
  >>> build = registered_algorithm('fedavg', model.loss, Hyperparameters())
  >>> sweep = Sweep(build, model, data, config, seeds=[0, 1, 2],
  ...               hyperparameters={'client_learning_rate': [0.01, 0.1]})
  >>> result = sweep.run(sweep.init())        # 6 simulations, one compiled program
  >>> result.histories[0][-1]['test_accuracy']
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sync.algorithms.registry import (Hyperparameters, algorithm_hyperparameters,
                                             build_algorithm)
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.data.batching import make_client_batch, pad_clients, to_device
from fedjax_sync.data.federated import FederatedData
from fedjax_sync.simulate.evaluation import make_evaluator
from fedjax_sync.simulate.population import check_population, check_synchronous
from fedjax_sync.simulate.clock import ClientClock
from fedjax_sync.simulate.driver import (CompiledBlocks, distinct_buffers, drive, fresh_buffers,
                                         tick_unit)
from fedjax_sync.simulate.population import check_asynchronous
from fedjax_sync.simulate.rounds import SimulationConfig, draw_participants
from fedjax_sync.simulate.semi_async import AsyncConfig, make_async_engine
from fedjax_sync.types import Algorithm, ServerState

MEMBERS_DIR = 'members'

BuildAlgorithm = Callable[[Mapping[str, jax.Array]], Algorithm]

# The key from which `Simulator.init` draws the initial params.
_INIT_INDEX = 2**31 - 1


def registered_algorithm(name: str, loss_fn: Callable, base: Hyperparameters = Hyperparameters(),
                         **engine_kwargs) -> BuildAlgorithm:
  """A `build(hyperparameters)` for a registered algorithm: swept fields replace `base`'s.

  Args:
    name: a registered algorithm name (see `fedjax_sync.algorithms.registry`).
    loss_fn: per-example loss of the model.
    base: the fixed hyperparameters.
    **engine_kwargs: e.g. `aggregator=`, `num_clients=`, `execution=`.

  The swept names must be hyperparameters of algorithm `name`
  (`algorithm_hyperparameters(name)`, the `--hparam` keys): another field of
  `Hyperparameters` would be ignored by the algorithm, so it is refused.
  """
  listed = [h.name for h in algorithm_hyperparameters(name)]   # unknown name: ValueError now

  def build(hyperparameters):
    unknown = sorted(set(hyperparameters) - set(listed))
    if unknown:
      raise ValueError(f'unknown hyperparameter(s) {unknown} for algorithm {name!r}; valid: '
                       f'{", ".join(listed) or "none"}')
    return build_algorithm(name, loss_fn, dataclasses.replace(base, **hyperparameters),
                           **engine_kwargs)

  return build


class SweepResult(NamedTuple):
  """The outcome of a sweep.

  Attributes:
    states: final server states stacked `[S, ...]`.
    settings: `[S]` dicts `{'seed': ..., <hyperparameter>: ...}` in grid order.
    histories: per simulation, one row per round (evaluation metrics at eval points).
    final_evals: per simulation, the last evaluation (scalars and `[N]` arrays).
    compile_seconds: time spent compiling blocks.
    run_seconds: time spent running (excluding compilation).
  """

  states: ServerState
  settings: list[dict[str, Any]]
  histories: list[list[dict[str, Any]]]
  final_evals: list[dict[str, Any]]
  compile_seconds: float
  run_seconds: float


class Sweep(CompiledBlocks):
  """S independent simulations of one algorithm as one vmapped compiled program.

  Args:
    build: `build(hyperparameters: dict[str, scalar Array]) -> Algorithm` (see
      `registered_algorithm`); called inside the trace.
    model: the model (`init`, `evaluate`).
    data: the federated data (shared by all simulations).
    config: the simulation config; its `seed` is ignored (seeds come from `seeds`).
    seeds: run seeds; simulation with seed s uses the keys of `Simulator` with seed s.
    hyperparameters: `{name: [values]}` swept as a grid with the seeds.
    execution: client execution strategy (vmap/chunked/sequential; no mesh).
  """

  def __init__(self, build: BuildAlgorithm, model, data: FederatedData,
               config: SimulationConfig | AsyncConfig, *, seeds: Sequence[int],
               hyperparameters: Mapping[str, Sequence[float]] | None = None,
               execution: ClientExecution = ClientExecution(), clock: ClientClock | None = None):
    seeds = [int(s) for s in seeds]
    if not seeds:
      raise ValueError('a sweep needs at least one seed, got seeds=[]')
    if len(set(seeds)) != len(seeds):
      raise ValueError(f'seeds must be distinct, got {seeds}')
    if any(not 0 <= s < 2**31 for s in seeds):
      raise ValueError(f'seeds must lie in [0, 2**31), got {seeds}')
    hyperparameters = {k: _numbers(k, vs) for k, vs in (hyperparameters or {}).items()}
    for k, vs in hyperparameters.items():
      if not vs:
        raise ValueError(f'hyperparameter {k!r} has no values to sweep')
    if execution.mesh is not None:
      raise ValueError('a sweep runs on one device set; give an execution without mesh '
                       '(mesh=None)')
    self.build = build
    self.model = model
    self.data = data
    self.asynchronous = isinstance(config, AsyncConfig)
    if self.asynchronous:
      if clock is None:
        raise ValueError('an asynchronous sweep (AsyncConfig) needs the clients\' clock: '
                         'Sweep(..., clock=make_clock(...))')
      if clock.num_clients != data.num_clients:
        raise ValueError(f'the clock has {clock.num_clients} clients, the data '
                         f'{data.num_clients}')
      self.config = config.validate()
    else:
      if clock is not None:
        raise ValueError('clock= applies to asynchronous sweeps (AsyncConfig); a synchronous '
                         'algorithm takes its clock through simulate.with_clock')
      self.config = config.validate(data.num_clients)
    self.clock = clock
    self.execution = execution.validate()
    names = sorted(hyperparameters)
    self.settings = [dict(seed=s, **dict(zip(names, values)))
                     for s, *values in itertools.product(seeds, *(hyperparameters[k] for k in names))]
    self.num_simulations = len(self.settings)
    self._hyper_names = names
    self._run_keys = jax.vmap(jax.random.key)(
        jnp.asarray([s['seed'] for s in self.settings], jnp.uint32))
    self._hypers = {k: jnp.asarray([s[k] for s in self.settings], jnp.float32) for k in names}
    self._device_data = to_device(data)
    positive = data.counts[data.counts > 0]
    if positive.size == 0:
      raise ValueError('the dataset has no client with examples')
    self._max_count = int(positive.max())
    per_client = (not self.asynchronous) and config.per_client_eval
    # Per-client accuracy of algorithms with personal models (FedBN, Ditto, ...) uses
    # each client's own model, as `Simulator` does (the builder is called outside the
    # trace once, with the first member's values, only to read `personalize`).
    self._personalize = None
    if per_client:
      first = {k: self.settings[0][k] for k in names}
      self._personalize = getattr(build(first), 'personalize', None)
    self._evaluate = jax.jit(jax.vmap(make_evaluator(model.evaluate, data, per_client=per_client,
                                                     personalize=self._personalize)))
    self._blocks: dict[int, Callable] = {}
    self._init: Callable | None = None

  def _sample_round(self, run_key, round_index):
    """The same key schedule as `Simulator.sample_round`, for one simulation's run key."""
    sample_key, batch_key, algorithm_key = jax.random.split(
        jax.random.fold_in(run_key, round_index), 3)
    ids, present, _ = draw_participants(sample_key, self._device_data.counts, self.config)
    batch = make_client_batch(batch_key, self._device_data, ids, self.config.local_work,
                              max_count=self._max_count)
    if self.config.sampling == 'poisson':   # undrawn slots are weight-0 padding
      batch = batch._replace(weight=jnp.where(present, batch.weight,
                                              jnp.zeros_like(batch.weight)))
    return pad_clients(batch, self.execution.num_shards), algorithm_key

  def init(self) -> ServerState:
    """Stacked `[S, ...]` initial states; simulation s's params are those of `Simulator.init`."""
    # The params as `Simulator.init` draws them (op by op), then stacked: a vmapped (or
    # jitted) model init batches the random draws into one program that XLA:CPU compiles
    # slowly (8-13 s for a logistic regression in a vmapped init, 2026-11-30, loaded
    # 2-core CPU). The algorithms' init, which reads the traced hyperparameters, is vmapped.
    params = [self.model.init(jax.random.fold_in(self._run_keys[s], _INIT_INDEX))
              for s in range(self.num_simulations)]
    params = jax.tree.map(lambda *leaves: jnp.stack(leaves), *params)
    if self._init is None:
      self._init = jax.jit(jax.vmap(self._member_init))
    with self._traceable_hyperparameters():
      return self._init(params, self._hypers, self._run_keys)

  def _engine(self, hypers, run_key):
    """The semi-asynchronous engine `(init, step)` of one member (inside the trace)."""
    algorithm = self.build(hypers)
    check_asynchronous(algorithm, 'Sweep')
    cfg = self.config

    def batch_fn(key, ids):
      return make_client_batch(key, self._device_data, ids, cfg.local_work,
                               max_count=self._max_count)

    return make_async_engine(algorithm, self.clock, batch_fn, buffer_size=cfg.buffer_size,
                             max_staleness=cfg.max_staleness, restart=cfg.restart,
                             run_key=run_key, execution=self.execution)

  def _member_init(self, params, hypers, run_key):
    """One member's initial state (synchronous: the algorithm's; asynchronous: the engine's)."""
    if self.asynchronous:
      return self._engine(hypers, run_key)[0](params)
    algorithm = self.build(hypers)
    check_synchronous(algorithm, 'Sweep')
    state = algorithm.init(params)
    check_population(algorithm, self.data.num_clients, state.client_states)
    return state

  def _member_block(self, state, run_key, hypers, start, length: int, every=None):
    """`length` units of one member from unit `start`, as one `lax.scan`; with
    `every` (unbatched), every `every`-th unit reports to the progress bar
    (`driver.tick_unit`: once per unit for the whole sweep, not per member)."""
    if self.asynchronous:
      step = self._engine(hypers, run_key)[1]
      if every is None:
        return jax.lax.scan(lambda c, _: step(c), state, None, length=length)

      def ticking(c, i):
        c, metrics = step(c)
        return tick_unit(i + 1, c, every), metrics

      return jax.lax.scan(ticking, state, jnp.arange(length))
    algorithm = self.build(hypers)
    check_synchronous(algorithm, 'Sweep')
    check_population(algorithm, self.data.num_clients, state.client_states)

    def body(s, r):
      batch, key = self._sample_round(run_key, r)
      s, metrics = algorithm.round(s, batch, key)
      if every is not None:
        s = tick_unit(r - start + 1, s, every)
      return s, metrics

    return jax.lax.scan(body, state, start + jnp.arange(length))

  def _block(self, states, length: int, ticks: bool = False) -> Callable:
    cache = self.block_key(length, ticks)
    if cache not in self._blocks:
      def one(state, run_key, hypers, start, *every):
        return self._member_block(state, run_key, hypers, start, length, *every)
      block = jax.vmap(one, in_axes=(0, 0, 0, None) + ((None,) if ticks else ()))
      with self._traceable_hyperparameters():
        self._blocks[cache] = jax.jit(block, donate_argnums=0).lower(
            states, self._run_keys, self._hypers,
            *[jnp.zeros((), jnp.int32)] * (2 if ticks else 1)).compile()
    return self._blocks[cache]

  @contextlib.contextmanager
  def _traceable_hyperparameters(self):
    """Turns JAX's tracer error for a hyperparameter used in Python control flow
    (FedProx's `if mu:`, a momentum that selects an optimizer) into a `ValueError`
    naming the hyperparameter and the fix."""
    try:
      yield
    except _TRACER_ERRORS as e:
      culprits = self.untraceable_hyperparameters() or self._hyper_names
      raise ValueError(
          f'cannot sweep {", ".join(map(repr, culprits))} in one compiled program: the '
          f'algorithm uses it as a Python value (control flow or a static shape), not as an '
          f'array. Sweep only hyperparameters used as arrays (learning rates), and run one '
          f'Sweep (or Simulator) per value of {", ".join(map(repr, culprits))}, fixing it in '
          f'the base hyperparameters') from e

  def untraceable_hyperparameters(self, names: Sequence[str] | None = None) -> list[str]:
    """The names that fail to trace as arrays, each probed alone (abstractly, no compile).

    Args:
      names: hyperparameters to probe (default: the swept ones); the swept others
        are held at their first values as Python floats.

    Returns:
      Those of `names` that the algorithm uses as Python values (control flow, a
      static shape), in the order given: they cannot be swept in one program.
    """
    names = list(self._hyper_names if names is None else names)
    first = {k: self.settings[0][k] for k in self._hyper_names}
    culprits = []
    for name in names:
      def probe(run_key, value, name=name):
        hypers = {**first, name: value}
        params = self.model.init(jax.random.fold_in(run_key, _INIT_INDEX))
        state = self._member_init(params, hypers, run_key)
        return self._member_block(state, run_key, hypers, 0, 1)
      try:
        jax.eval_shape(probe, self._run_keys[0], jnp.asarray(first.get(name, 0.5), jnp.float32))
      except _TRACER_ERRORS:
        culprits.append(name)
    return culprits

  def run_rounds(self, states: ServerState, start: int, length: int, ticks: int = 0):
    """Rounds `start .. start + length − 1` of every simulation, as one program.

    Returns `(states [S, ...], metrics {name: [S, length, ...]})`; `states` is donated
    (a leaf repeated in `states` is copied first). `ticks=k`: the program that
    reports every k-th unit to `drive`'s progress bar.
    """
    states = distinct_buffers(states)
    every = (jnp.asarray(ticks, jnp.int32),) if ticks else ()
    return self._block(states, length, bool(ticks))(states, self._run_keys, self._hypers,
                                                    jnp.asarray(start, jnp.int32), *every)

  def evaluate(self, states: ServerState) -> dict[str, np.ndarray]:
    """Evaluation metrics of every simulation, stacked `[S, ...]`."""
    params, client_states = self.evaluated_model(states)
    return jax.device_get(self._evaluate(
        params, client_states if self._personalize is not None else ()))

  def run(self, states, *, start_round: int = 0, run_dir: str | None = None,
          progress: bool = False, tensorboard: bool = False, on_block: Callable | None = None,
          block_every: int | None = None, evaluation_hooks: Sequence[Callable] = ()
          ) -> SweepResult:
    """Runs every simulation through the one driver, evaluating every `eval_every` units.

    `states` (the stacked states after `start_round` units) is copied once before the
    first (donating) block, so it stays usable.

    Args:
      run_dir: if given, member s appends its rows to
        `<run_dir>/members/<member_label(settings[s])>/metrics.jsonl` (created).
      progress, tensorboard, block_every, evaluation_hooks: as `Simulator.run`
        (hooks return `[S]` values).
      on_block: `on_block(states, units_done, histories)` after each block (e.g. to
        checkpoint: `run_with_checkpoints` takes a sweep).
    """
    run_dirs = None
    if run_dir is not None:
      run_dirs = self.member_dirs(run_dir)
      for d in run_dirs:
        os.makedirs(d, exist_ok=True)
    result = drive(self, fresh_buffers(states), start=start_round, run_dirs=run_dirs,
                   progress=progress, tensorboard=tensorboard, on_block=on_block,
                   block_every=block_every, evaluation_hooks=evaluation_hooks,
                   settings=self.settings,
                   description=f'{self.num_simulations} simulations')
    return SweepResult(states=result.state, settings=list(self.settings),
                       histories=result.histories, final_evals=result.final_evals,
                       compile_seconds=result.compile_seconds, run_seconds=result.run_seconds)

  def member_dirs(self, run_dir: str) -> list[str]:
    """`<run_dir>/members/<label>` of every member, in grid order."""
    return [os.path.join(run_dir, MEMBERS_DIR, member_label(s)) for s in self.settings]

  # The driver's view of this runner (`fedjax_sync.simulate.driver.Runner`).
  @property
  def unit(self) -> str:
    return 'aggregation' if self.asynchronous else 'round'

  @property
  def members(self) -> int:
    return self.num_simulations

  @property
  def num_units(self) -> int:
    return self.config.num_aggregations if self.asynchronous else self.config.num_rounds

  @property
  def eval_every(self) -> int:
    return self.config.eval_every




  def run_units(self, states, start: int, length: int, ticks: int = 0):
    return self.run_rounds(states, start, length, ticks)

  def evaluate_state(self, states) -> dict[str, Any]:
    return self.evaluate(states)

  def evaluated_model(self, states):
    """`(params [S, ...], client states [S, N, ...])` of every member."""
    server = states.server if self.asynchronous else states
    return server.params, server.client_states

  def identity(self) -> dict[str, Any]:
    """What a checkpoint must agree with to continue this sweep."""
    cfg = self.config
    return {'sweep': [dict(s) for s in self.settings],
            'dataset': getattr(self.data, 'name', None),
            'num_clients': int(self.data.num_clients),
            'timeline': 'semi_async' if self.asynchronous else 'synchronous',
            'local_work': list(cfg.local_work),
            **({'buffer_size': cfg.buffer_size, 'max_staleness': cfg.max_staleness,
                'restart': cfg.restart} if self.asynchronous else
               {'clients_per_round': cfg.clients_per_round,
                'proportional_sampling': cfg.proportional_sampling})}


def member_label(setting: Mapping[str, Any]) -> str:
  """`client_learning_rate=0.1,seed=0`: a member's swept values by name, then its seed."""
  parts = [f'{k}={setting[k]!r}' for k in sorted(setting) if k != 'seed']
  return ','.join(parts + [f'seed={setting["seed"]}'])


# What JAX raises when a traced value is used where a Python value is needed.
_TRACER_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
                  jax.errors.TracerArrayConversionError)


def _numbers(name: str, values) -> list[float]:
  """The swept values of `name` as floats, or a ValueError naming the first that is not."""
  out = []
  for v in values:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
      raise ValueError(f'hyperparameter {name!r}: swept values must be numbers, got {v!r}; '
                       'sweep a non-numeric setting with one Sweep per value')
    out.append(float(v))
  return out
