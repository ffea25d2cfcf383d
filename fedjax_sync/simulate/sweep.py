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
learning rate). Values used in Python control flow (FedProx's μ, a momentum that
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
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sync import sinks
from fedjax_sync.algorithms.registry import (Hyperparameters, algorithm_hyperparameters,
                                             build_algorithm)
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.data.batching import make_client_batch, pad_clients, sample_clients, to_device
from fedjax_sync.data.federated import FederatedData
from fedjax_sync.simulate.evaluation import make_evaluator
from fedjax_sync.simulate.population import check_population, check_synchronous
from fedjax_sync.simulate.rounds import (SimulationConfig, block_schedule, distinct_buffers,
                                         fresh_buffers)
from fedjax_sync.types import Algorithm, ServerState

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


class Sweep:
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

  def __init__(self, build: BuildAlgorithm, model, data: FederatedData, config: SimulationConfig,
               *, seeds: Sequence[int], hyperparameters: Mapping[str, Sequence[float]] | None = None,
               execution: ClientExecution = ClientExecution()):
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
    self.config = config.validate(data.num_clients)
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
    self._evaluate = jax.jit(jax.vmap(
        make_evaluator(model.evaluate, data, per_client=config.per_client_eval)))
    self._blocks: dict[int, Callable] = {}
    self._init: Callable | None = None

  def _sample_round(self, run_key, round_index):
    """The same key schedule as `Simulator.sample_round`, for one simulation's run key."""
    sample_key, batch_key, algorithm_key = jax.random.split(
        jax.random.fold_in(run_key, round_index), 3)
    ids = sample_clients(sample_key, self._device_data.counts, self.config.clients_per_round,
                         proportional_to_size=self.config.proportional_sampling)
    batch = make_client_batch(batch_key, self._device_data, ids, self.config.local_work,
                              max_count=self._max_count)
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
      def one(params, hypers):
        algorithm = self.build(hypers)
        check_synchronous(algorithm, 'Sweep')
        state = algorithm.init(params)
        check_population(algorithm, self.data.num_clients, state.client_states)
        return state
      self._init = jax.jit(jax.vmap(one))
    with self._traceable_hyperparameters():
      return self._init(params, self._hypers)

  def _block(self, states: ServerState, length: int) -> Callable:
    if length not in self._blocks:
      def one(state, run_key, hypers, start):
        algorithm = self.build(hypers)
        check_synchronous(algorithm, 'Sweep')
        check_population(algorithm, self.data.num_clients, state.client_states)
        def body(s, r):
          batch, key = self._sample_round(run_key, r)
          return algorithm.round(s, batch, key)
        return jax.lax.scan(body, state, start + jnp.arange(length))
      block = jax.vmap(one, in_axes=(0, 0, 0, None))
      with self._traceable_hyperparameters():
        self._blocks[length] = jax.jit(block, donate_argnums=0).lower(
            states, self._run_keys, self._hypers, jnp.zeros((), jnp.int32)).compile()
    return self._blocks[length]

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
        algorithm = self.build({**first, name: value})
        state = algorithm.init(self.model.init(jax.random.fold_in(run_key, _INIT_INDEX)))
        batch, key = self._sample_round(run_key, 0)
        return algorithm.round(state, batch, key)
      try:
        jax.eval_shape(probe, self._run_keys[0], jnp.asarray(first.get(name, 0.5), jnp.float32))
      except _TRACER_ERRORS:
        culprits.append(name)
    return culprits

  def run_rounds(self, states: ServerState, start: int, length: int):
    """Rounds `start .. start + length − 1` of every simulation, as one program.

    Returns `(states [S, ...], metrics {name: [S, length, ...]})`; `states` is donated
    (a leaf repeated in `states` is copied first).
    """
    states = distinct_buffers(states)
    return self._block(states, length)(states, self._run_keys, self._hypers,
                                       jnp.asarray(start, jnp.int32))

  def evaluate(self, states: ServerState) -> dict[str, np.ndarray]:
    """Evaluation metrics of every simulation, stacked `[S, ...]`."""
    return jax.device_get(self._evaluate(states.params))

  def run(self, states: ServerState, *, progress: bool = False,
          on_block: Callable[[int, list[list[dict[str, Any]]]], None] | None = None
          ) -> SweepResult:
    """Runs all rounds of every simulation, evaluating every `config.eval_every` rounds.

    `states` is copied once before the first (donating) block, so it stays usable.
    `on_block(rounds_done, new_rows)`, if given, is called after each block with each
    simulation's rows of that block (`new_rows[s]`), e.g. to append them to files.
    """
    cfg = self.config
    histories: list[list[dict[str, Any]]] = [[] for _ in self.settings]
    bar = None
    if progress:
      from tqdm.auto import tqdm
      bar = tqdm(total=cfg.num_rounds, unit='round', dynamic_ncols=True,
                 desc=f'{self.num_simulations} simulations',
                 bar_format='{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]',
                 postfix=sinks.format_rate(None, None))
    clock = sinks.BlockClock()   # rate from the end of the first (compiling) block
    compile_seconds, started = 0.0, time.perf_counter()
    evaluation: dict[str, np.ndarray] = {}
    states = fresh_buffers(states)
    try:
      for r, length, _ in block_schedule(0, cfg.num_rounds, cfg.eval_every):
        if length not in self._blocks:
          t0 = time.perf_counter()
          self._block(states, length)
          compile_seconds += time.perf_counter() - t0
        states, stacked = self.run_rounds(states, r, length)
        stacked = jax.device_get(stacked)
        evaluation = self.evaluate(states)
        before = [len(h) for h in histories]
        for s, history in enumerate(histories):
          for i in range(length):
            row = {'round': r + i + 1, **self.settings[s]}
            row.update({k: float(v[s, i]) for k, v in stacked.items() if np.ndim(v) == 2})
            if i == length - 1:
              row.update({k: float(v[s]) for k, v in evaluation.items() if np.ndim(v) == 1})
            history.append(row)
        if on_block is not None:
          on_block(r + length, [h[n:] for h, n in zip(histories, before)])
        if bar is not None:
          rate = clock.after_block(length, compile_seconds, cfg.num_rounds - (r + length))
          bar.set_postfix_str(
              f"mean acc={float(np.mean(evaluation['test_accuracy'])):.4f}, {rate}", refresh=False)
          bar.update(length)
    finally:
      if bar is not None:
        bar.close()
    if not evaluation:
      evaluation = self.evaluate(states)
    finals = [{k: v[s] for k, v in evaluation.items()} for s in range(self.num_simulations)]
    return SweepResult(states=states, settings=list(self.settings), histories=histories,
                       final_evals=finals, compile_seconds=compile_seconds,
                       run_seconds=time.perf_counter() - started - compile_seconds)


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
