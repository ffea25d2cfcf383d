"""The shared benchmark timer."""

import jax.numpy as jnp

from fedjax_sync.benchmarking import median_seconds


def test_median_seconds_warms_up_then_times_repeats():
  calls = []
  seconds = median_seconds(lambda x: calls.append(1) or x + 1, (jnp.ones(3),), repeats=4)
  assert len(calls) == 5 and seconds >= 0.0


def test_a_slow_first_call_is_the_measurement():
  calls = []
  seconds = median_seconds(lambda x: calls.append(1) or x, (jnp.ones(3),), repeats=4,
                           slow_call_seconds=0.0)
  assert len(calls) == 1 and seconds > 0.0
