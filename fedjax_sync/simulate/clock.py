"""A simulated clock: per-client compute-and-upload times, availability, deadlines.

Systems heterogeneity is simulated, not measured: client i's job (download,
local training, upload) takes `base_times[i]` time units, optionally multiplied by
a per-job lognormal jitter, and a job is lost with probability `dropout` (or where
a user availability mask says so). Everything is drawn inside the compiled round
from `fold_in` keys, so a run depends only on its seed.

Synchronous rounds with stragglers reuse the ordinary round: `with_clock` wraps an
`Algorithm` and sets the weights of late and dropped clients to 0 before calling
it (a weight of 0 is the engine's one mechanism for an absent client), and reports
the round's simulated duration. Three round policies (the synchronous answers to
stragglers, see the overview in `seeds/fl_update_synchronization_overview.txt`):

* `wait_for_all()`: the round lasts until the slowest live client has uploaded.
* `with_deadline(d)`: the server aggregates whatever arrived by time `d`.
* `first_m(m)`: the server proceeds as soon as `m` updates arrived; combined with
  over-selection (`over_selection`) this samples more clients than needed.

Example:
  >>> times = speed_ratio_times(100, ratio=20.0, seed=0)
  >>> clock = make_clock(times, jitter=0.1, dropout=0.05)
  >>> algorithm = with_clock(fed_avg(model.loss, optax.sgd(0.05)), clock, with_deadline(8.0))
  >>> # run it with `Simulator`; metrics['round_time'] is each round's duration.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sync.types import Algorithm, ClientBatch

POLICIES = ('wait_all', 'deadline', 'first_m')
_TIME_STREAM = 0x71
_AVAILABILITY_STREAM = 0xA7
_CLOCK_STREAM = 0xC10C


class ClientClock(NamedTuple):
  """Per-client job durations and availability (a pytree of arrays and floats).

  Attributes:
    base_times: `[N]` float32 time units of one job (compute plus upload) of each
      client.
    jitter: σ of a per-job multiplicative `exp(σ·ε)`, ε ~ N(0, 1) (0: fixed times).
    dropout: probability that a job is lost (the client drops out of it).
    availability: optional `[R, N]` bool user masks; job j of client i is possible
      only if `availability[j % R, i]`.
    trace: optional `simulate.availability.AvailabilityTrace` over simulated time:
      the asynchronous engine starts a client's job only while it is online (at the
      first online time at or after the moment it would start; `job_start_times`).
      A job in progress is not interrupted when its window closes.
  """

  base_times: jax.Array
  jitter: float = 0.0
  dropout: float = 0.0
  availability: jax.Array | None = None
  trace: Any = None

  @property
  def num_clients(self) -> int:
    return int(self.base_times.shape[0])


def constant_times(num_clients: int, time: float = 1.0) -> np.ndarray:
  """`[N]` equal job times (no stragglers)."""
  _check_positive_int(num_clients, 'num_clients')
  if not time > 0:
    raise ValueError(f'time must be > 0, got {time}')
  return np.full((num_clients,), time, np.float32)


def lognormal_times(num_clients: int, *, median: float = 1.0, sigma: float = 1.0,
                    seed: int = 0) -> np.ndarray:
  """`[N]` job times `median · exp(σ ε)`, ε ~ N(0, 1): a heavy right tail of stragglers."""
  _check_positive_int(num_clients, 'num_clients')
  if not median > 0 or sigma < 0:
    raise ValueError(f'need median > 0 and sigma ≥ 0, got median={median}, sigma={sigma}')
  rng = np.random.default_rng(seed)
  return (median * np.exp(sigma * rng.standard_normal(num_clients))).astype(np.float32)


def speed_ratio_times(num_clients: int, ratio: float, *, seed: int = 0,
                      spacing: str = 'linear') -> np.ndarray:
  """`[N]` job times from 1 (fastest) to `ratio` (slowest), e.g. 1:20 or 1:100.

  The N times are evenly spaced between 1 and `ratio` ('linear', the reading of a
  "speed ratio" in FedQS's experiments, arXiv 2510.07664 §5) or evenly spaced in
  log-time ('log', many fast and few slow clients), then randomly assigned to
  clients with `seed`, so a client's speed is independent of its data.
  """
  _check_positive_int(num_clients, 'num_clients')
  if not ratio >= 1:
    raise ValueError(f'ratio must be ≥ 1 (slowest / fastest), got {ratio}')
  if spacing == 'linear':
    times = np.linspace(1.0, ratio, num_clients)
  elif spacing == 'log':
    times = np.geomspace(1.0, ratio, num_clients)
  else:
    raise ValueError(f"unknown spacing {spacing!r}; valid: 'linear', 'log'")
  return np.random.default_rng(seed).permutation(times).astype(np.float32)


def make_clock(base_times, *, jitter: float = 0.0, dropout: float = 0.0,
               availability=None, trace=None) -> ClientClock:
  """Validates and builds a `ClientClock`.

  Args:
    base_times: `[N]` positive job times (e.g. from `speed_ratio_times`) or a user
      array.
    jitter: σ ≥ 0 of the per-job lognormal factor (times vary per round when > 0).
    dropout: probability in [0, 1) that a job is lost.
    availability: optional `[R, N]` (or `[N]`) bool masks; row `j % R` applies to
      a client's job j (a round index in synchronous training).
    trace: optional `AvailabilityTrace` of the N clients (when each can start a job
      on the asynchronous timeline; synchronous rounds take it through
      `Simulator(availability=...)`).
  """
  times = np.asarray(base_times, np.float32)
  if times.ndim != 1 or times.size == 0:
    raise ValueError(f'base_times must be a non-empty [N] array, got shape {times.shape}')
  if not np.all(np.isfinite(times)) or np.any(times <= 0):
    raise ValueError('base_times must be finite and > 0')
  if jitter < 0:
    raise ValueError(f'jitter must be ≥ 0, got {jitter}')
  if not 0 <= dropout < 1:
    raise ValueError(f'dropout must be in [0, 1), got {dropout}')
  masks = None
  if availability is not None:
    masks = np.asarray(availability, bool)
    if masks.ndim == 1:
      masks = masks[None]
    if masks.ndim != 2 or masks.shape[1] != times.size:
      raise ValueError(f'availability must be [R, {times.size}] bool, got shape {masks.shape}')
    masks = jnp.asarray(masks)
  if trace is not None and trace.num_clients != times.size:
    raise ValueError(f'the availability trace has {trace.num_clients} clients, base_times '
                     f'{times.size}')
  return ClientClock(base_times=jnp.asarray(times), jitter=float(jitter), dropout=float(dropout),
                     availability=masks, trace=trace)


def job_times(clock: ClientClock, key: jax.Array, client_ids: jax.Array,
              job_index: jax.Array) -> jax.Array:
  """`[C]` durations of job `job_index` (scalar or `[C]`) of `client_ids` `[C]`.

  The jitter of client i's job j comes from `fold_in(fold_in(key, i), j)`, so it
  does not depend on which other clients run.
  """
  base = clock.base_times[client_ids]
  if not clock.jitter:
    return base
  jobs = jnp.broadcast_to(job_index, client_ids.shape)
  def noise(i, j):
    return jax.random.normal(jax.random.fold_in(
        jax.random.fold_in(jax.random.fold_in(key, _TIME_STREAM), i), j), ())
  return base * jnp.exp(clock.jitter * jax.vmap(noise)(client_ids, jobs))


def job_start_times(clock: ClientClock, client_ids: jax.Array, time) -> jax.Array:
  """`[C]` float32: when jobs of `client_ids` wanting to start at `time` (scalar or `[C]`)
  start: `time` itself without a trace, else each client's next online time (+inf: never)."""
  time = jnp.broadcast_to(jnp.asarray(time, jnp.float32), client_ids.shape)
  if clock.trace is None:
    return time
  from fedjax_sync.simulate.availability import next_online
  return next_online(clock.trace, client_ids, time)


def job_available(clock: ClientClock, key: jax.Array, client_ids: jax.Array,
                  job_index: jax.Array) -> jax.Array:
  """`[C]` bool: whether job `job_index` of each client completes (not dropped)."""
  jobs = jnp.broadcast_to(job_index, client_ids.shape)
  available = jnp.ones(client_ids.shape, bool)
  if clock.dropout:
    def draw(i, j):
      k = jax.random.fold_in(jax.random.fold_in(
          jax.random.fold_in(key, _AVAILABILITY_STREAM), i), j)
      return jax.random.uniform(k, ()) >= clock.dropout
    available = jax.vmap(draw)(client_ids, jobs)
  if clock.availability is not None:
    rows = clock.availability.shape[0]
    available = available & clock.availability[jobs % rows, client_ids]
  return available


class RoundPolicy(NamedTuple):
  """When a synchronous round ends: `kind` in 'wait_all' | 'deadline' | 'first_m'."""

  kind: str = 'wait_all'
  deadline: float | None = None
  min_updates: int | None = None

  def validate(self) -> 'RoundPolicy':
    if self.kind not in POLICIES:
      raise ValueError(f'unknown round policy {self.kind!r}; valid: {", ".join(POLICIES)}')
    if self.kind == 'deadline' and not (self.deadline is not None and self.deadline > 0):
      raise ValueError(f'a deadline policy needs deadline > 0, got {self.deadline!r}')
    if self.kind == 'first_m' and not (isinstance(self.min_updates, int) and self.min_updates >= 1):
      raise ValueError(f'a first_m policy needs an integer min_updates ≥ 1, got {self.min_updates!r}')
    return self


def wait_for_all() -> RoundPolicy:
  """The round ends when every sampled live client has uploaded."""
  return RoundPolicy('wait_all')


def with_deadline(deadline: float) -> RoundPolicy:
  """The server aggregates what arrived by `deadline`; later clients get weight 0."""
  return RoundPolicy('deadline', deadline=float(deadline)).validate()


def first_m(min_updates: int) -> RoundPolicy:
  """The server aggregates the first `min_updates` arrivals; the rest get weight 0."""
  return RoundPolicy('first_m', min_updates=min_updates).validate()


def over_selection(clients_per_round: int, fraction: float) -> tuple[int, RoundPolicy]:
  """Over-selection: sample `ceil(C (1 + fraction))` clients, keep the first C arrivals.

  Returns:
    `(clients to sample, first_m(C))`.
  """
  _check_positive_int(clients_per_round, 'clients_per_round')
  if fraction < 0:
    raise ValueError(f'over-selection fraction must be ≥ 0, got {fraction}')
  return math.ceil(clients_per_round * (1 + fraction) - 1e-9), first_m(clients_per_round)


def apply_round_policy(policy: RoundPolicy, times: jax.Array, available: jax.Array,
                       weight: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Which sampled clients' updates count, and how long the round lasted.

  A client with weight 0 (padding) is not part of the round. A dropped client
  (`available` False) is assumed to be known to the server (it reports failure or
  the transport times out instantly), so `wait_all` and `first_m` do not wait for
  it; under a deadline the round still lasts until the deadline unless every
  sampled client arrived earlier.

  Args:
    policy: the round policy.
    times: `[C]` job durations.
    available: `[C]` bool, False for a dropped job.
    weight: `[C]` aggregation weights of the round.

  Returns:
    `(weight [C] with late and dropped clients set to 0, arrived [C] bool,
    round_time scalar)`.
  """
  policy.validate()
  present = weight > 0
  live = present & available
  live_times = jnp.where(live, times, 0.0)
  if policy.kind == 'wait_all':
    arrived = live
    round_time = jnp.max(live_times)
  elif policy.kind == 'deadline':
    arrived = live & (times <= policy.deadline)
    everyone = jnp.all(arrived == present)
    round_time = jnp.where(everyone, jnp.max(live_times), jnp.asarray(policy.deadline, times.dtype))
  else:
    order = jnp.argsort(jnp.where(live, times, jnp.inf))
    rank = jnp.zeros(times.shape, jnp.int32).at[order].set(jnp.arange(times.shape[0], dtype=jnp.int32))
    arrived = live & (rank < policy.min_updates)
    round_time = jnp.max(jnp.where(arrived, times, 0.0))
  new_weight = jnp.where(arrived, weight, jnp.zeros_like(weight))
  return new_weight, arrived, round_time


def with_clock(algorithm: Algorithm, clock: ClientClock,
               policy: RoundPolicy = RoundPolicy()) -> Algorithm:
  """Wraps a synchronous algorithm so that stragglers and dropouts get weight 0.

  The wrapped round draws the sampled clients' job times and availability for job
  `state.round` from `fold_in(key, ·)` (the inner algorithm receives the key
  unchanged, so with `wait_for_all()`, no dropout and no jitter it computes exactly
  what the unwrapped algorithm computes), zeroes the weights of late and dropped
  clients and calls the inner round. Extra metrics: `round_time` (simulated
  duration of the round; the total wall-clock is their sum), `num_arrived`,
  `num_dropped`, `num_late`.
  """
  policy = policy.validate()

  def round_fn(state, batch: ClientBatch, key):
    clock_key = jax.random.fold_in(key, _CLOCK_STREAM)
    times = job_times(clock, clock_key, batch.client_ids, state.round)
    available = job_available(clock, clock_key, batch.client_ids, state.round)
    weight, arrived, round_time = apply_round_policy(policy, times, available, batch.weight)
    present = batch.weight > 0
    new_state, metrics = algorithm.round(state, batch._replace(weight=weight), key)
    metrics = dict(metrics)
    metrics.update({
        'round_time': round_time,
        'num_arrived': jnp.sum(arrived.astype(jnp.float32)),
        'num_dropped': jnp.sum((present & ~available).astype(jnp.float32)),
        'num_late': jnp.sum((present & available & ~arrived).astype(jnp.float32)),
    })
    return new_state, metrics

  return Algorithm(init=algorithm.init, round=round_fn, name=f'{algorithm.name}+clock',
                   num_clients=getattr(algorithm, 'num_clients', None),
                   personalize=getattr(algorithm, 'personalize', None))


def _check_positive_int(value, name: str) -> None:
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'{name} must be a positive integer, got {value!r}')
