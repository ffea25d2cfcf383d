"""Per-round cost of the client-drift algorithms relative to FedAvg, at C = 10 and 100.

Each algorithm's round is jit-compiled once and timed on the same random client
batch (C clients × S local steps × batch B, an MLP on 60 features): median of
`repeats` timed rounds after a warm-up round. Expected: SAM-type methods near 2×
(two gradients per step), SCAFFOLD near 1× (option II adds O(d) per client),
FedGH's and Kuramoto's server work small. The aggregation alone is also timed
(harmonize and kuramoto vs weighted_mean on the same stacked updates), to show
FedGH's K×K Gram work against the whole round.

    fedjax-sync run --config experiments/bench_drift.py [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_sync as fs
from fedjax_sync import reporting
from fedjax_sync.benchmarking import median_seconds
from fedjax_sync.aggregators import harmonize, kuramoto, weighted_mean
from fedjax_sync.types import ClientBatch

ALGORITHMS = ('fedavg', 'scaffold', 'scaffold_modified', 'fedgh', 'fedsam', 'fedsagm',
              'kuramoto_fedavg', 'kuramoto_fedavg_code')


def _batch(num_clients, steps, batch_size, features, classes, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_clients, steps, batch_size, features)).astype(np.float32)
  y = rng.integers(0, classes, (num_clients, steps, batch_size)).astype(np.int32)
  return ClientBatch(data={'x': jnp.asarray(x), 'y': jnp.asarray(y)},
                     mask=jnp.ones((num_clients, steps, batch_size), bool),
                     client_ids=jnp.arange(num_clients, dtype=jnp.int32),
                     weight=jnp.asarray(rng.integers(50, 150, num_clients), jnp.float32))


def run(run_dir: str, *, quick: bool = False, dataset: str | None = None,
        seeds: int | None = None, clients: Sequence[int] = (10, 100),
        algorithms: Sequence[str] = ALGORITHMS, steps: int = 10, batch_size: int = 32,
        hidden: int = 200, repeats: int = 9) -> dict:
  """Times one round per algorithm; returns `{C: {algorithm: seconds}}` and ratios.

  Args:
    run_dir: output directory.
    quick: C = 10 only, 3 local steps, 2 repeats, four algorithms.
    dataset: unused (random inputs of the Synthetic shape: 60 features, 10 classes).
    seeds: unused.
    clients: client counts C.
    algorithms: registered names (FedAvg is always timed as the reference).
    steps: local steps S.
    batch_size: local batch B.
    hidden: MLP hidden width.
    repeats: timed rounds per algorithm (median reported).
  """
  del dataset, seeds
  if quick:
    clients, steps, repeats = (10,), 3, 2
    algorithms = ('fedavg', 'scaffold', 'fedgh', 'fedsam')
  algorithms = ['fedavg'] + [a for a in algorithms if a != 'fedavg']
  valid = fs.algorithms.algorithm_names()
  unknown = [a for a in algorithms if a not in valid]
  if unknown:
    raise ValueError(f'unknown algorithm(s) {unknown}; valid: {", ".join(valid)}')
  reporting.prepare_run_dir(run_dir)
  model = fs.models.mlp((60,), 10, hidden=(hidden,))
  params = model.init(jax.random.key(0))
  num_params = sum(int(x.size) for x in jax.tree.leaves(params))
  reporting.write_config(run_dir, {
      'study': 'bench_drift', 'clients': list(clients), 'algorithms': algorithms,
      'local_steps': steps, 'batch_size': batch_size, 'model': f'mlp 60-{hidden}-10',
      'num_params': num_params, 'repeats': repeats, 'devices': str(jax.devices()),
      'quick': quick})
  hparams = fs.Hyperparameters(client_learning_rate=0.05)
  seconds, rows, table = {}, [], []
  for num_clients in clients:
    batch = _batch(num_clients, steps, batch_size, 60, 10)
    key = jax.random.key(1)
    # Compile and warm up every round first, then time them interleaved: each
    # repetition times every algorithm once, so load drift on a shared machine
    # hits all algorithms alike; ratios are medians of per-repetition ratios.
    steps_fns = {}
    for name in algorithms:
      algorithm = fs.build_algorithm(name, model.loss, hparams, num_clients=num_clients)
      fn, state = jax.jit(algorithm.round), algorithm.init(params)
      jax.block_until_ready(fn(state, batch, key))
      steps_fns[name] = (fn, state)
    samples = {name: [] for name in algorithms}
    for _ in range(repeats):
      for name, (fn, state) in steps_fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(state, batch, key))
        samples[name].append(time.perf_counter() - start)
    per = {name: statistics.median(v) for name, v in samples.items()}
    ratios = {name: statistics.median(a / b for a, b in zip(v, samples['fedavg']))
              for name, v in samples.items()}
    # The aggregation alone, on stacked updates of the model's shape.
    updates = jax.tree.map(
        lambda p: jax.random.normal(jax.random.key(2), (num_clients,) + p.shape, p.dtype), params)
    aggregation = {}
    for label, agg in (('weighted_mean', weighted_mean()), ('harmonize', harmonize()),
                       ('kuramoto', kuramoto())):
      state = agg.init(params, num_clients)
      aggregation[label] = median_seconds(
          jax.jit(agg.apply), (updates, batch.weight, state, key, batch.client_ids), repeats)
    seconds[num_clients] = {'round': per, 'ratio': ratios, 'aggregation': aggregation}
    for name, t in per.items():
      ratio = ratios[name]
      rows.append({'clients': num_clients, 'algorithm': name, 'seconds': t, 'ratio': ratio})
      table.append([num_clients, name, f'{1e3 * t:.1f}', f'{ratio:.2f}'])
    for label, t in aggregation.items():
      rows.append({'clients': num_clients, 'aggregation': label, 'seconds': t,
                   'fraction_of_fedavg_round': t / per['fedavg']})
      table.append([num_clients, f'aggregation only: {label}', f'{1e3 * t:.2f}',
                    f'{t / per["fedavg"]:.3f}'])
  reporting.append_metrics(run_dir, rows)
  names = [n for n in algorithms]
  reporting.plot_lines(
      f'{run_dir}/cost_ratio.png',
      {n: (list(clients), [seconds[c]['ratio'][n] for c in clients])
       for n in names}, xlabel='clients per round C', ylabel='round time / FedAvg round time',
      title='Per-round cost relative to FedAvg', logx=True)
  notes = (f'{jax.devices()[0].platform} ({len(jax.devices())} device(s)), one process; MLP '
           f'60-{hidden}-10 ({num_params} parameters), S = {steps} local steps of batch '
           f'{batch_size}, {repeats} interleaved repetitions after warm-up; ms = median, ratio = '
           'median of per-repetition ratios to FedAvg (absolute times are noisy on a shared '
           'machine). "aggregation only" rows '
           'give the reducer alone as a fraction of a FedAvg round.')
  reporting.write_summary(run_dir, 'Per-round cost of client-drift algorithms',
                          ['C', 'algorithm', 'ms / round', '× FedAvg'], table, notes)
  return {str(c): {n: round(v, 3) for n, v in seconds[c]['ratio'].items()} for c in clients}


if __name__ == '__main__':
  from fedjax_sync.cli import main
  sys.exit(main(['run', '--config', __file__] + sys.argv[1:]))
