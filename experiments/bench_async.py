"""Benchmark: aggregations per second, semi-asynchronous engine vs synchronous rounds.

Both run K = 10 clients per server update on the same data and model (logistic
regression, 60 features, 10 classes, 20 examples per client, 2 local steps of
batch 10), compiled as one `lax.scan` block of `L` updates:

* sync: `Simulator(fed_avg)` rounds (sampling, batching, training, aggregation);
* sync without sampler: the same rounds with clients `(r K + i) mod N` (the
  driver's without-replacement sampler costs O(N log N) per round);
* semi-async: `SemiAsyncSimulator(fed_buff)` aggregations (top-K of N finish
  times, ring-buffer gather of K start models, batching, training, aggregation,
  restart bookkeeping), clients with speeds 1:20 and 10% dropout.

At N = 100 and N = 10,000 clients. The event handling is O(N) array work per
aggregation (top-k, restarts) plus a ring buffer of max_staleness + 1 models
(here 2N/K, so that no update is discarded for staleness). Timings: median over
repeats after a warm-up, on this machine. Run:

    fedjax-sync run --config experiments/bench_async.py [--quick]
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sync import reporting
from fedjax_sync.benchmarking import interleaved_medians
from fedjax_sync.algorithms.fed_avg import fed_avg
from fedjax_sync.algorithms.fed_buff import fed_buff
from fedjax_sync.data import LocalWork, from_client_indices, make_client_batch
from fedjax_sync.models.models import logistic_regression
from fedjax_sync.simulate.clock import make_clock, speed_ratio_times
from fedjax_sync.simulate.rounds import SimulationConfig, Simulator
from fedjax_sync.simulate.semi_async import AsyncConfig, SemiAsyncSimulator


def _data(num_clients: int, per_client: int = 20, seed: int = 0):
  rng = np.random.default_rng(seed)
  n = num_clients * per_client
  x = rng.normal(size=(n, 60)).astype(np.float32)
  w = rng.normal(size=(60, 10))
  y = np.argmax(x @ w, axis=1).astype(np.int32)
  indices = np.arange(n).reshape(num_clients, per_client)
  test = {'x': x[:500], 'y': y[:500]}
  return from_client_indices({'x': x, 'y': y}, list(indices), test, num_classes=10,
                             name=f'bench {num_clients} clients')


def _stateful(step, state):
  """A no-argument call that advances `state` by one `step` (for the interleaved timer)."""
  holder = [state]

  def call():
    holder[0], out = step(holder[0])
    return out

  return call


def run(run_dir: str, *, quick: bool = False, dataset: str | None = None,
        seeds: int | None = None, sizes=(100, 10_000), buffer_size: int = 10,
        block: int | None = None, repeats: int | None = None, progress: bool = True) -> dict:
  """Times both engines; returns aggregations/second and their ratio per N."""
  del dataset, seeds  # the benchmark builds its own data
  reporting.prepare_run_dir(run_dir)
  block = block or (20 if quick else 100)
  repeats = repeats or (2 if quick else 5)
  sizes = (100, 1_000) if quick and tuple(sizes) == (100, 10_000) else tuple(sizes)
  work = LocalWork(batch_size=10, steps=2)
  model = logistic_regression((60,), 10)
  reporting.write_config(run_dir, dict(sizes=sizes, buffer_size=buffer_size, block=block,
                                       repeats=repeats, local_work=work._asdict(),
                                       model='logistic_regression(60 → 10)',
                                       clock='speed ratio 1:20, dropout 0.1',
                                       devices=[str(d) for d in jax.devices()]))
  rows, headline = [], {}
  for n in sizes:
    data = _data(n)
    sync = Simulator(fed_avg(model.loss, optax.sgd(0.05)), model, data,
                     SimulationConfig(block, buffer_size, work, eval_every=block,
                                      per_client_eval=False))
    t0 = time.perf_counter()
    sync_state = sync.init()
    sync._block(sync_state, block)
    sync_compile = time.perf_counter() - t0
    counter = {'round': 0}

    def sync_step(state):
      out = sync.run_rounds(state, counter['round'], block)
      counter['round'] += block
      return out


    # The same synchronous rounds without the sampler: clients (r K + i) mod N. The
    # driver's `sample_clients` (a without-replacement draw of C of N, O(N) per
    # round) is excluded; this isolates training + aggregation.
    algorithm = sync.algorithm

    def cyclic_block(state, start):
      def body(s, r):
        ids = ((r * buffer_size + jnp.arange(buffer_size)) % n).astype(jnp.int32)
        _, batch_key, key = jax.random.split(jax.random.fold_in(jax.random.key(0), r), 3)
        batch = make_client_batch(batch_key, sync._device_data, ids, work,
                                  max_count=sync._max_count)
        return algorithm.round(s, batch, key)
      return jax.lax.scan(body, state, start + jnp.arange(block))

    cyclic = jax.jit(cyclic_block, donate_argnums=0)
    cyclic_state = jax.tree.map(jnp.copy, sync.init())

    clock = make_clock(speed_ratio_times(n, 20.0), dropout=0.1)
    semi = SemiAsyncSimulator(fed_buff(model.loss, optax.sgd(0.05)), model, data, clock,
                              AsyncConfig(block, buffer_size, work, eval_every=block,
                                          max_staleness=max(32, 2 * n // buffer_size)))
    t0 = time.perf_counter()
    semi_state = semi.init()
    semi._block(semi_state, block)
    semi_compile = time.perf_counter() - t0
    # The three engines take turns (one warm-up each), so load drift hits them alike.
    timings = interleaved_medians(
        {'sync': _stateful(sync_step, sync_state),
         'cyclic': _stateful(lambda s: cyclic(s, jnp.asarray(0, jnp.int32)), cyclic_state),
         'semi': _stateful(lambda s: semi.run_aggregations(s, block), semi_state)},
        warmup=1, repeats=repeats)
    sync_seconds, cyclic_seconds, semi_seconds = (
        timings[k].seconds for k in ('sync', 'cyclic', 'semi'))
    sync_rate, semi_rate = block / sync_seconds, block / semi_seconds
    cyclic_rate = block / cyclic_seconds
    ratio, cyclic_ratio = sync_rate / semi_rate, cyclic_rate / semi_rate
    rows.append([n, buffer_size, f'{sync_rate:.1f}', f'{cyclic_rate:.1f}', f'{semi_rate:.1f}',
                 f'{ratio:.2f}', f'{cyclic_ratio:.2f}', f'{sync_compile:.1f}',
                 f'{semi_compile:.1f}'])
    reporting.append_metrics(run_dir, [dict(num_clients=n, sync_aggregations_per_s=sync_rate,
                                            async_aggregations_per_s=semi_rate,
                                            sync_no_sampling_per_s=cyclic_rate,
                                            slowdown=ratio, slowdown_vs_no_sampling=cyclic_ratio, sync_compile_s=sync_compile,
                                            async_compile_s=semi_compile)])
    headline[f'N={n}/sync_per_s'] = sync_rate
    headline[f'N={n}/async_per_s'] = semi_rate
    headline[f'N={n}/sync_no_sampling_per_s'] = cyclic_rate
    headline[f'N={n}/slowdown'] = ratio
    headline[f'N={n}/slowdown_vs_no_sampling'] = cyclic_ratio
    if progress:
      print(f'N={n}: sync {sync_rate:.1f}/s (no sampler {cyclic_rate:.1f}/s), semi-async '
            f'{semi_rate:.1f}/s, slowdown {ratio:.2f}x ({cyclic_ratio:.2f}x)', flush=True)
  reporting.write_summary(
      run_dir, 'Semi-asynchronous engine vs synchronous rounds (aggregations per second)',
      ['N', 'K', 'sync rounds/s', 'sync rounds/s without sampler', 'semi-async aggregations/s',
       'slowdown vs sync', 'slowdown vs sync without sampler', 'sync compile s',
       'async compile s'], rows,
      f'Median of {repeats} blocks of {block} after a warm-up; target: slowdown ≤ 1.5.')
  return headline


if __name__ == '__main__':
  from fedjax_sync.cli import main
  sys.exit(main(['run', '--config', __file__] + sys.argv[1:]))
