"""Timing helpers shared by the benchmark scripts in `experiments/`."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

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
