"""The synchronous driver: R rounds of sampling, batching, the round and evaluation.

Between two evaluations, consecutive rounds run inside one compiled `lax.scan`
(sampling and batch construction included), so the host is visited once per
evaluation block, not once per round. Round r uses the key
`fold_in(run_key, r)`, so results depend only on the seed and the round index:
resuming from round r (with the state of round r) reproduces the same run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.data.batching import (LocalWork, make_client_batch, pad_clients,
                                       poisson_sample_clients, sample_clients, to_device)
from fedjax_sync.data.federated import FederatedData
# Moved to the one driver; these names stay importable from here.
from fedjax_sync.simulate.driver import (DIVERGENCE_METRICS, CompiledBlocks, block_schedule,  # noqa: F401
                                         check_alive, distinct_buffers, drive, first_nonfinite,
                                         fresh_buffers, tick_unit, warn_nonfinite)
from fedjax_sync.simulate.availability import AvailabilityTrace, is_online
from fedjax_sync.simulate.evaluation import make_evaluator
from fedjax_sync.simulate.population import check_population, check_synchronous
from fedjax_sync.types import Algorithm, Params, ServerState


SAMPLINGS = ('uniform', 'poisson')


def draw_participants(key: jax.Array, counts: jax.Array, config: 'SimulationConfig',
                      available: jax.Array | None = None):
  """The round's client ids, which of them take part, and the sampling metrics.

  Returns:
    `(ids [C], present [C] bool, metrics)`: ids not present get weight 0 (padding:
    fewer clients available than C, or fewer Poisson draws than C_max). Metrics:
    `num_available` with an availability mask; `num_sampled` and `num_overflow`
    with Poisson sampling; none otherwise.
  """
  metrics = {}
  if available is not None:
    metrics['num_available'] = jnp.sum(available.astype(jnp.float32))
  if config.sampling == 'poisson':
    ids, present, drawn, overflow = poisson_sample_clients(
        key, counts.shape[0], config.sampling_rate, config.clients_per_round,
        available=available)
    metrics.update(num_sampled=drawn, num_overflow=overflow)
    return ids, present, metrics
  ids = sample_clients(key, counts, config.clients_per_round,
                       proportional_to_size=config.proportional_sampling, available=available)
  present = jnp.ones(ids.shape, bool) if available is None else available[ids]
  return ids, present, metrics


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
  """What a synchronous simulation runs.

  Attributes:
    num_rounds: R.
    clients_per_round: C, sampled without replacement each round; with
      `sampling='poisson'`, C_max, the static size of the round's client arrays
      (`data.batching.poisson_max_clients` gives one with negligible overflow).
    local_work: epochs or steps of local training, and the batch size.
    eval_every: evaluate every k rounds (and after the last round).
    seed: run seed; the same seed on the same machine gives bitwise-identical results.
    proportional_sampling: sample clients with probability ∝ their size.
    per_client_eval: also compute per-client accuracy at evaluation points.
    sampling: 'uniform' (C clients without replacement, or ∝ size with
      `proportional_sampling`) or 'poisson' (each client independently with
      probability `sampling_rate`, as user-level DP accounting assumes; rounds
      report `num_sampled` and `num_overflow`).
    sampling_rate: q ∈ (0, 1] of Poisson sampling.
    round_duration: simulated time units between two rounds: round r happens at
      time r · round_duration (used by an availability trace).
  """

  num_rounds: int
  clients_per_round: int
  local_work: LocalWork
  eval_every: int = 10
  seed: int = 0
  proportional_sampling: bool = False
  per_client_eval: bool = True
  sampling: str = 'uniform'
  sampling_rate: float | None = None
  round_duration: float = 1.0

  def validate(self, num_clients: int) -> 'SimulationConfig':
    for name in ('num_rounds', 'clients_per_round', 'eval_every'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f'{name} must be a positive integer, got {value!r}')
    if self.clients_per_round > num_clients:
      raise ValueError(f'clients_per_round={self.clients_per_round} exceeds the '
                       f'{num_clients} clients of the dataset')
    if self.sampling not in SAMPLINGS:
      raise ValueError(f'unknown sampling {self.sampling!r}; valid: {", ".join(SAMPLINGS)}')
    if self.sampling == 'poisson':
      q = self.sampling_rate
      if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
        raise ValueError(f"sampling='poisson' needs a sampling_rate in (0, 1], got {q!r}")
      if self.proportional_sampling:
        raise ValueError("proportional_sampling does not apply to sampling='poisson'; valid: "
                         'one of them')
    elif self.sampling_rate is not None:
      raise ValueError(f"sampling_rate={self.sampling_rate!r} applies to sampling='poisson', "
                       f'not {self.sampling!r}')
    if not (isinstance(self.round_duration, (int, float)) and self.round_duration > 0
            and self.round_duration < float('inf')):
      raise ValueError(f'round_duration must be a finite number > 0, got {self.round_duration!r}')
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


class Simulator(CompiledBlocks):
  """Compiles the blocks of rounds and the evaluator of one simulation.

  With `availability` (an `AvailabilityTrace` of the data's clients), round r
  happens at simulated time r · `config.round_duration` and samples only the
  clients online then (`draw_participants`); every round reports `num_available`.

  Example:
    >>> sim = Simulator(algorithm, model, data, config)
    >>> result = sim.run(sim.init())
  """

  def __init__(self, algorithm: Algorithm, model, data: FederatedData, config: SimulationConfig,
               *, execution: ClientExecution = ClientExecution(),
               availability: AvailabilityTrace | None = None):
    check_synchronous(algorithm, type(self).__name__)
    check_population(algorithm, data.num_clients)
    self.algorithm = algorithm
    self.model = model
    self.data = data
    self.config = config.validate(data.num_clients)
    self.execution = execution.validate()
    if availability is not None and availability.num_clients != data.num_clients:
      raise ValueError(f'the availability trace has {availability.num_clients} clients, the '
                       f'data {data.num_clients}')
    self.availability = availability
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
    batch, algorithm_key, _ = self.sample_round_with_metrics(round_index)
    return batch, algorithm_key

  def sample_round_with_metrics(self, round_index):
    """`(batch, algorithm key, sampling metrics)` of round `round_index` (jittable); clients
    sampled as padding (unavailable, or beyond the Poisson draws) have weight 0."""
    sample_key, batch_key, algorithm_key = jax.random.split(self.round_key(round_index), 3)
    available = None
    if self.availability is not None:
      time = jnp.asarray(round_index, jnp.float32) * jnp.float32(self.config.round_duration)
      available = is_online(self.availability, jnp.arange(self.data.num_clients), time)
    ids, present, metrics = draw_participants(sample_key, self._device_data.counts,
                                              self.config, available)
    batch = make_client_batch(batch_key, self._device_data, ids, self.config.local_work,
                              max_count=self._max_count)
    if available is not None or self.config.sampling == 'poisson':
      batch = batch._replace(weight=jnp.where(present, batch.weight,
                                              jnp.zeros_like(batch.weight)))
    return pad_clients(batch, self.execution.num_shards), algorithm_key, metrics

  def _block(self, state: ServerState, length: int, ticks: bool = False) -> Callable:
    """The compiled program of `length` consecutive rounds (compiled once per length;
    with `ticks`, a second program reporting each round to the progress bar)."""
    cache = self.block_key(length, ticks)
    if cache not in self._blocks:
      check_population(self.algorithm, self.data.num_clients, state.client_states)
      def run_block(state, start, *every):
        def body(s, r):
          batch, key, sampling = self.sample_round_with_metrics(r)
          s, metrics = self.algorithm.round(s, batch, key)
          if ticks:
            s = tick_unit(r - start + 1, s, *every)
          return s, ({**metrics, **sampling} if sampling else metrics)
        return jax.lax.scan(body, state, start + jnp.arange(length))
      # With a mesh, outputs (state, per-client metrics) come back replicated, so every
      # process of a multi-host run can read them.
      mesh = self.execution.mesh
      replicated = NamedSharding(mesh, P()) if mesh is not None else None
      self._blocks[cache] = jax.jit(run_block, donate_argnums=0,
                                    out_shardings=replicated).lower(
          state, *[jnp.zeros((), jnp.int32)] * (2 if ticks else 1)).compile()
    return self._blocks[cache]

  def run_rounds(self, state: ServerState, start: int, length: int, ticks: int = 0):
    """Runs rounds `start .. start + length − 1` as one compiled program.

    The input state's buffers are donated: do not use `state` afterwards (a leaf
    repeated in `state` is copied first, so any state can be donated). `ticks=k`:
    the program that reports every k-th round to `drive`'s progress bar
    (`driver.tick_unit`).
    """
    state = distinct_buffers(state)
    every = (jnp.asarray(ticks, jnp.int32),) if ticks else ()
    return self._block(state, length, bool(ticks))(state, jnp.asarray(start, jnp.int32), *every)

  def evaluate(self, params: Params, client_states=()) -> dict[str, Any]:
    """Evaluation metrics of the global params (`test_*`, `client_accuracy*`) and, when
    the algorithm has `Algorithm.personalize` and `client_states` are given, of each
    client's personal model (`personalized_accuracy*`; FedBN: its own batch-norm
    layers, Ditto: v_k, FedPer/FedRep: its own head)."""
    return jax.device_get(self._evaluate(params, client_states))

  def run(self, state: ServerState, *, start_round: int = 0, run_dir: str | None = None,
          progress: bool = True, on_block: Callable | None = None,
          block_every: int | None = None, tensorboard: bool = False,
          evaluation_hooks: Sequence[Callable] = ()) -> SimulationResult:
    """Runs the remaining rounds from `start_round`, evaluating every `eval_every`.

    Args:
      state: the server state after `start_round` rounds; it is copied once before
        the first block (the blocks donate their input), so it stays usable.
      start_round: the number of rounds already run.
      run_dir: if given, `metrics.jsonl` is appended there, one JSON line per round
        (NaN/Inf as null, counted in `nonfinite_metrics`); a file that already holds
        a round after `start_round` is refused (ValueError), never appended twice.
      progress: show a progress bar that advances while a block runs, about 4 times a
        second (a host callback every k-th round; `driver.drive` explains 'unit' and
        'block'); its rate and time left leave out compilation (`sinks.round_rate`).
      tensorboard: also write every round's scalars (loss, accuracy, participation,
        bytes, `aggregator/...`) as TensorBoard events into `run_dir`
        (`sinks.TensorBoardWriter`, no TensorFlow needed); requires `run_dir`.
      on_block: called as `on_block(state, rounds_done, history)` after each block
        (e.g. to checkpoint).
      block_every: also end a compiled block at every multiple of this many rounds
        (checkpoint boundaries); evaluation still happens every `eval_every` only.
      evaluation_hooks: `hook(state, rounds_done) -> {name: value}` merged into
        every evaluation (e.g. `personalized_evaluation`).

    The loop is the one driver's (`fedjax_sync.simulate.driver.drive`), shared by
    every timeline.
    """
    result = drive(self, fresh_buffers(state), start=start_round, run_dirs=run_dir,
                   progress=progress, tensorboard=tensorboard, on_block=on_block,
                   block_every=block_every, evaluation_hooks=evaluation_hooks)
    return SimulationResult(state=result.state, history=result.histories[0],
                            final_eval=result.final_evals[0],
                            compile_seconds=result.compile_seconds,
                            run_seconds=result.run_seconds, nonfinite_round=result.nonfinite[0])

  # The driver's view of this runner (`fedjax_sync.simulate.driver.Runner`).
  unit = 'round'
  members = None

  @property
  def num_units(self) -> int:
    return self.config.num_rounds

  @property
  def eval_every(self) -> int:
    return self.config.eval_every



  def run_units(self, state: ServerState, start: int, length: int, ticks: int = 0):
    return self.run_rounds(state, start, length, ticks)

  def evaluate_state(self, state: ServerState) -> dict[str, Any]:
    return self.evaluate(state.params, state.client_states)

  @property
  def evaluation_names(self) -> tuple[str, ...]:
    """The scalar metrics `evaluate_state` reports (per-client ones with
    `per_client_eval`; `personalized_accuracy_*` too for an algorithm with
    `personalize`)."""
    names = ('test_accuracy', 'test_loss')
    if self.config.per_client_eval:
      prefixes = ['client_accuracy']
      if getattr(self.algorithm, 'personalize', None) is not None:
        prefixes.append('personalized_accuracy')
      names += tuple(f'{prefix}_{stat}' for prefix in prefixes
                     for stat in ('mean', 'var', 'median', 'worst_decile'))
    return names

  def evaluated_model(self, state: ServerState):
    """`(global params, per-client states)`: the model this timeline evaluates."""
    return state.params, state.client_states


def rounds_to_reach(history: list[dict[str, Any]], target: float,
                    key: str = 'test_accuracy') -> int | None:
  """The first round whose evaluated `key` reaches `target`, or None."""
  for row in history:
    if key in row and row[key] >= target:
      return int(row['round'])
  return None
