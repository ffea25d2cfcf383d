"""Timing helpers shared by the benchmark scripts in `experiments/`."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax


def median_seconds(fn: Callable, args: Sequence, repeats: int, *,
                   slow_call_seconds: float | None = None) -> float:
  """Median wall seconds of `fn(*args)` over `repeats` calls after one untimed call.

  The untimed call compiles and warms up. With `slow_call_seconds`, a first call
  slower than that is returned as the measurement (for configurations whose
  repetitions would take too long; compile beforehand so that it is steady).
  """
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  if slow_call_seconds is not None and first > slow_call_seconds:
    return first
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


class Timing(NamedTuple):
  """Median wall-clock and process CPU seconds (all threads) of one call."""

  seconds: float
  cpu_seconds: float


def interleaved_medians(calls: Mapping[str, Callable[[], Any]], *, warmup: int,
                        repeats: int, settle: int = 0) -> dict[str, Timing]:
  """Times several variants of the same work, interleaved round-robin.

  Each call is run `warmup` times untimed, then the variants take turns for
  `repeats` timed calls each (A B C A B C ...), so slow drift of a shared
  machine's load falls on all variants alike and their ratios stay comparable.
  With `settle`, each timed call follows that many untimed calls of the same
  variant, so it measures consecutive calls (as a simulation makes them) rather
  than a call right after another variant's, whose caches it would inherit.
  Each result is blocked on (`jax.block_until_ready`) before the clock
  stops.
  """
  for name, value, least in (('warmup', warmup, 0), ('repeats', repeats, 1), ('settle', settle, 0)):
    if not isinstance(value, int) or value < least:
      raise ValueError(f'{name} must be an integer ≥ {least}, got {value!r}')
  if not calls:
    raise ValueError('no calls to time')
  for call in calls.values():
    for _ in range(warmup):
      jax.block_until_ready(call())
  wall: dict[str, list[float]] = {name: [] for name in calls}
  cpu: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      for _ in range(settle):
        jax.block_until_ready(call())
      start, cpu_start = time.perf_counter(), time.process_time()
      jax.block_until_ready(call())
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - cpu_start)
  return {name: Timing(statistics.median(wall[name]), statistics.median(cpu[name]))
          for name in calls}
