"""Client availability over simulated time: traces of online intervals.

A client can be sampled (synchronous rounds) or start a job (the semi-asynchronous
timeline) only while it is online. Availability is a set of half-open intervals
`[start, end)` of simulated time per client, optionally repeating with a
`period` (a day): `AvailabilityTrace`, stored as padded `[N, M]` arrays so that
the questions "who is online at time t" and "when is client i next online" are
O(N·M) array operations inside the compiled round.

Two sources:

* `load_availability_csv(path, num_clients, period=None)`: a user file, the
  header `client_id,start,end` then one interval per line (times in simulated
  time units, the clock's; `0 ≤ start < end`, and `end ≤ period` when a period is
  given). Clients without a line are never online. `save_availability_csv`
  writes the same format.
* `diurnal_availability(...)`: each client is online for one window of
  `online_fraction · day_length` a day, starting at its own phase. Bonawitz et
  al. 2019, "Towards Federated Learning at Scale: System Design" (arXiv
  1902.01046, Sec. 2 and 9 "Bias"), report that devices are eligible only while
  idle, charging and on an unmetered network, mostly at night in their time zone,
  so the participating population follows a daily cycle. Here the phases are
  drawn from the density `(1 + a·cos(2π(φ − c)/P))/P` on the day `[0, P)`, which
  makes the expected fraction of clients online at time t the closed form
  `diurnal_online_fraction(t) = w + (a/π)·sin(πw)·cos(2π(t − peak)/P)`
  (w = online_fraction, a = amplitude; c = peak − wP/2): `a = 0` gives a flat
  fraction w, `a = 1` the strongest daily swing.

Synchronous rounds see round r at simulated time `r · round_duration`
(`SimulationConfig.round_duration`); the asynchronous engine starts a client's job
at the first online time at or after the moment it would start (`next_online`).
"""

from __future__ import annotations

import csv
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ['AvailabilityTrace', 'diurnal_availability', 'diurnal_online_fraction',
           'is_online', 'load_availability_csv', 'make_availability', 'next_online',
           'save_availability_csv']

CSV_HEADER = ('client_id', 'start', 'end')


class AvailabilityTrace(NamedTuple):
  """Per-client online intervals `[start, end)` (a pytree of arrays and a float).

  Attributes:
    starts: `[N, M]` float32 interval starts; unused slots hold +inf.
    ends: `[N, M]` float32 interval ends; unused slots hold +inf.
    period: the intervals repeat every `period` time units (None: they happen once;
      a client is offline after its last interval).
  """

  starts: jax.Array
  ends: jax.Array
  period: float | None = None

  @property
  def num_clients(self) -> int:
    return int(self.starts.shape[0])


def make_availability(intervals, num_clients: int, *, period: float | None = None,
                      where: str = 'availability') -> AvailabilityTrace:
  """Validates `(client_id, start, end)` triples and builds an `AvailabilityTrace`.

  Args:
    intervals: an iterable of `(client_id, start, end)`; overlapping intervals of
      a client are allowed (online in their union).
    num_clients: N; every client id must be in [0, N).
    period: optional repetition period > 0; then every `end ≤ period`.
    where: a name for error messages (e.g. the file).
  """
  if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
    raise ValueError(f'num_clients must be a positive integer, got {num_clients!r}')
  if period is not None and not (isinstance(period, (int, float)) and math.isfinite(period)
                                 and period > 0):
    raise ValueError(f'{where}: period must be a finite number > 0, got {period!r}')
  per_client: list[list[tuple[float, float]]] = [[] for _ in range(num_clients)]
  for client, start, end in intervals:
    _check_interval(client, start, end, num_clients, period, where)
    per_client[client].append((float(start), float(end)))
  width = max(1, max(len(p) for p in per_client))
  starts = np.full((num_clients, width), np.inf, np.float32)
  ends = np.full((num_clients, width), np.inf, np.float32)
  for i, spans in enumerate(per_client):
    for j, (s, e) in enumerate(sorted(spans)):
      starts[i, j], ends[i, j] = s, e
  return AvailabilityTrace(starts=jnp.asarray(starts), ends=jnp.asarray(ends),
                           period=None if period is None else float(period))


def _check_interval(client, start, end, num_clients: int, period, where: str) -> None:
  if client < 0 or client >= num_clients:
    raise ValueError(f'{where}: client_id {client} is out of range; valid: 0 to '
                     f'{num_clients - 1} ({num_clients} clients)')
  if not (math.isfinite(start) and math.isfinite(end)):
    raise ValueError(f'{where}: interval ({start}, {end}) of client {client} is not finite')
  if not 0 <= start < end:
    raise ValueError(f'{where}: interval ({start}, {end}) of client {client} needs '
                     '0 ≤ start < end')
  if period is not None and end > period:
    raise ValueError(f'{where}: interval ({start}, {end}) of client {client} ends after the '
                     f'period {period}; valid: end ≤ period')


def is_online(trace: AvailabilityTrace, client_ids: jax.Array, time) -> jax.Array:
  """`[C]` bool: whether each of `client_ids` is online at simulated `time` (scalar or `[C]`)."""
  starts, ends = trace.starts[client_ids], trace.ends[client_ids]
  t = jnp.broadcast_to(jnp.asarray(time, jnp.float32), client_ids.shape)
  if trace.period is not None:
    t = jnp.mod(t, jnp.float32(trace.period))
  return jnp.any((starts <= t[:, None]) & (t[:, None] < ends), axis=1)


def next_online(trace: AvailabilityTrace, client_ids: jax.Array, time) -> jax.Array:
  """`[C]` float32: the earliest time ≥ `time` at which each client is online (+inf: never)."""
  starts = trace.starts[client_ids]
  t = jnp.broadcast_to(jnp.asarray(time, jnp.float32), client_ids.shape)
  online = is_online(trace, client_ids, t)
  if trace.period is None:
    later = jnp.min(jnp.where(starts > t[:, None], starts, jnp.inf), axis=1)
  else:
    period = jnp.float32(trace.period)
    phase = jnp.mod(t, period)
    # The next start in this period, else the first start of the next period.
    ahead = jnp.where(starts > phase[:, None], starts - phase[:, None],
                      starts + period - phase[:, None])
    later = t + jnp.min(ahead, axis=1)   # +inf when the client has no interval
  return jnp.where(online, t, later)


def diurnal_online_fraction(time, *, day_length: float = 24.0, online_fraction: float = 0.5,
                            amplitude: float = 0.5, peak: float = 0.0):
  """The expected fraction of clients online at `time` under `diurnal_availability`:
  `w + (a/π)·sin(πw)·cos(2π(t − peak)/P)` (numpy, elementwise)."""
  w, a, p = online_fraction, amplitude, day_length
  return w + (a / math.pi) * math.sin(math.pi * w) * np.cos(
      2 * math.pi * (np.asarray(time, np.float64) - peak) / p)


def diurnal_availability(num_clients: int, *, day_length: float = 24.0,
                         online_fraction: float = 0.5, amplitude: float = 0.5,
                         peak: float = 0.0, seed: int = 0) -> AvailabilityTrace:
  """Each client online one window of `online_fraction · day_length` per day.

  Client i's window starts at its phase φ_i, drawn (with `seed`) from the density
  `(1 + a·cos(2π(φ − c)/P))/P` with c = peak − wP/2, so that the fraction online is
  `diurnal_online_fraction` in expectation (largest at `peak`); a window that
  crosses midnight is stored as two intervals. See the module docstring for the
  pattern's source (Bonawitz et al. 2019).

  Args:
    num_clients: N.
    day_length: P > 0, the period in simulated time units.
    online_fraction: w ∈ (0, 1], the share of the day each client is online.
    amplitude: a ∈ [0, 1], how strongly the population online swings over the day.
    peak: the time of day at which the most clients are online.
    seed: seed of the phases.
  """
  if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
    raise ValueError(f'num_clients must be a positive integer, got {num_clients!r}')
  if not (math.isfinite(day_length) and day_length > 0):
    raise ValueError(f'day_length must be a finite number > 0, got {day_length!r}')
  if not 0 < online_fraction <= 1:
    raise ValueError(f'online_fraction must be in (0, 1], got {online_fraction!r}')
  if not 0 <= amplitude <= 1:
    raise ValueError(f'amplitude must be in [0, 1], got {amplitude!r}')
  if not math.isfinite(peak):
    raise ValueError(f'peak must be finite, got {peak!r}')
  period, width = float(day_length), float(online_fraction) * float(day_length)
  center = peak - width / 2
  rng = np.random.default_rng(seed)
  phases = np.empty((0,))
  while phases.size < num_clients:   # rejection sampling from the cosine density
    draw = rng.uniform(0.0, period, 2 * num_clients)
    keep = rng.uniform(0.0, 1.0 + amplitude, draw.size) < (
        1.0 + amplitude * np.cos(2 * math.pi * (draw - center) / period))
    phases = np.concatenate([phases, draw[keep]])
  phases = phases[:num_clients]
  if online_fraction == 1:
    intervals = [(i, 0.0, period) for i in range(num_clients)]
  else:
    intervals = []
    for i, start in enumerate(phases):
      end = start + width
      intervals.append((i, float(start), float(min(end, period))))
      if end > period:
        intervals.append((i, 0.0, float(end - period)))
  return make_availability(intervals, num_clients, period=period, where='diurnal_availability')


def load_availability_csv(path: str, num_clients: int, *,
                          period: float | None = None) -> AvailabilityTrace:
  """Reads a `client_id,start,end` CSV file (see the module docstring); errors name the
  file, the line and the bad value."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'availability file {path!r} does not exist; valid: a CSV file '
                            'with the header client_id,start,end')
  if period is not None:   # checked before the lines, so that a bad period is named as such
    make_availability([], 1, period=period, where=f'availability file {path!r}')
  rows = []
  try:
    with open(path, newline='', encoding='utf-8') as f:
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None or tuple(h.strip() for h in header) != CSV_HEADER:
        raise ValueError(f'availability file {path!r}: the first line is {header!r}; valid: '
                         'the header client_id,start,end')
      for row in reader:
        line = reader.line_num
        if not row or all(not c.strip() for c in row):
          continue
        if len(row) != 3:
          raise ValueError(f'availability file {path!r} line {line}: {len(row)} fields '
                           f'{row!r}; valid: client_id,start,end')
        try:
          client = int(row[0])
        except ValueError:
          raise ValueError(f'availability file {path!r} line {line}: client_id {row[0]!r} is '
                           'not an integer') from None
        try:
          start, end = float(row[1]), float(row[2])
        except ValueError:
          raise ValueError(f'availability file {path!r} line {line}: start/end {row[1]!r}, '
                           f'{row[2]!r} are not numbers') from None
        _check_interval(client, start, end, num_clients, period,
                        f'availability file {path!r} line {line}')
        rows.append((client, start, end))
  except UnicodeDecodeError:
    raise ValueError(f'availability file {path!r} is not UTF-8 text; valid: a CSV file with '
                     'the header client_id,start,end') from None
  return make_availability(rows, num_clients, period=period,
                           where=f'availability file {path!r}')


def save_availability_csv(path: str, trace: AvailabilityTrace) -> None:
  """Writes `trace`'s intervals as a `client_id,start,end` CSV file (the period is not
  stored: give it again to `load_availability_csv`)."""
  starts, ends = np.asarray(trace.starts), np.asarray(trace.ends)
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(CSV_HEADER)
    for i in range(starts.shape[0]):
      for s, e in zip(starts[i], ends[i]):
        if np.isfinite(s):
          writer.writerow([i, repr(float(s)), repr(float(e))])
