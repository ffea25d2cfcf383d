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


def test_interleaved_medians_warm_up_then_take_turns():
  from fedjax_sync.benchmarking import interleaved_medians
  order = []
  calls = {name: (lambda name=name: order.append(name) or jnp.ones(2)) for name in 'abc'}
  timings = interleaved_medians(calls, warmup=2, repeats=3)
  assert order == ['a', 'a', 'b', 'b', 'c', 'c'] + ['a', 'b', 'c'] * 3
  assert set(timings) == set('abc')
  assert all(t.seconds >= 0.0 and t.cpu_seconds >= 0.0 for t in timings.values())


def test_benchmark_workload_rows_and_skips(monkeypatch):
  import os
  from fedjax_sync.cli import _load_study
  bench = _load_study(os.path.join(os.path.dirname(__file__), '..', 'experiments',
                                   'benchmark.py'))
  monkeypatch.setattr(bench, 'MAX_TRACED_STEPS', 4)   # 'loop' traces C·S = 10·5 steps
  rows, skipped = bench.benchmark_workload('logreg_synthetic', strategies=['sequential', 'loop'],
                                           unrolls=(1, True), warmup=0, repeats=1)
  variants = [r['variant'] for r in rows]
  assert variants == ['limit', 'sequential, unroll=1', 'python_loop']
  assert len(skipped) == 3 and all('traced local steps' in s for s in skipped)
  limit = rows[0]
  assert limit['ratio_to_limit'] == 1.0
  for r in rows:
    assert r['seconds'] > 0 and r['compile_seconds'] > 0
    assert abs(r['ratio_to_limit'] - r['seconds'] / limit['seconds']) < 1e-12
  assert rows[1]['xla_temp_mb'] >= 0 and rows[-1]['xla_temp_mb'] is None   # no program


def test_interleaved_medians_settle_before_each_timed_call():
  from fedjax_sync.benchmarking import interleaved_medians
  order = []
  calls = {name: (lambda name=name: order.append(name) or jnp.ones(2)) for name in 'ab'}
  interleaved_medians(calls, warmup=0, repeats=2, settle=1)
  assert order == ['a', 'a', 'b', 'b'] * 2


def test_interleaved_medians_rejects_bad_counts():
  import pytest
  from fedjax_sync.benchmarking import interleaved_medians
  call = {'a': lambda: jnp.ones(1)}
  with pytest.raises(ValueError, match='repeats must be an integer ≥ 1, got 0'):
    interleaved_medians(call, warmup=0, repeats=0)
  with pytest.raises(ValueError, match='settle must be an integer ≥ 0, got -1'):
    interleaved_medians(call, warmup=0, repeats=1, settle=-1)
  with pytest.raises(ValueError, match='no calls'):
    interleaved_medians({}, warmup=0, repeats=1)
