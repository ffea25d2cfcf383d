"""Cost of every aggregator against the local training of one round.

Updates: random `[C, ...]` pytrees shaped like the parameters of an MLP
784-1250-10 (993,760 ≈ 1M parameters), C ∈ {10, 100, 1000}. Reference: one
compiled FedAvg round of that MLP with C = 100 clients × 100 examples, batch 20,
one local epoch (5 SGD steps), i.e. the local training of the same round.

Each aggregator is compiled once (`jit(...).lower(...).compile()`, compile time
not counted) and timed as the median of `repeats` calls (one call at C = 1000).
Reducers are timed alone; client transforms chained with `weighted_mean()`.
At C = 1000 the updates alone take 4 GB: client transforms (which copy them
several times) and secure aggregation are not run there, and a time budget
skips what remains once exceeded (reported as 'skipped'). Timings on a shared
2-core CPU are noisy; ratios are measured in one run.

    fedjax-sync run --config experiments/bench_aggregators.py [--quick]
"""

from __future__ import annotations

import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sync as fs
from fedjax_sync import aggregators as agg
from fedjax_sync import reporting
from fedjax_sync.benchmarking import median_seconds

HIDDEN = 1250
EXAMPLES, BATCH = 100, 20

REDUCERS = {
    'mean': lambda c: agg.mean(),
    'weighted_mean': lambda c: agg.weighted_mean(),
    'norm_bounded_mean': lambda c: agg.norm_bounded_mean(1.0),
    'coordinate_median': lambda c: agg.coordinate_median(),
    'trimmed_mean(0.1)': lambda c: agg.trimmed_mean(0.1),
    'krum(f=C/10)': lambda c: agg.krum(max(1, c // 10)),
    'multi_krum(f=C/10, m=C/2)': lambda c: agg.multi_krum(max(1, c // 10), max(1, c // 2)),
    'geometric_median(8)': lambda c: agg.geometric_median(8),
    'dp_fedavg': lambda c: agg.dp_fedavg(1.0, 1.0, float(c)),
    'secure_aggregation(k=8)': lambda c: agg.secure_aggregation(1.0, num_neighbors=8),
    'secure_aggregation(complete)': lambda c: agg.secure_aggregation(1.0),
}
TRANSFORMS = {
    'clip_by_norm': lambda c: agg.clip_by_norm(1.0),
    'adaptive_clip': lambda c: agg.adaptive_clip(),
    'zero_invalid_updates': lambda c: agg.zero_invalid_updates(10.0),
    'stochastic_quantize(16)': lambda c: agg.stochastic_quantize(16),
    'top_k(1%)': lambda c: agg.top_k(fraction=0.01),
    'random_k(1%)': lambda c: agg.random_k(fraction=0.01),
}
# Not run at these sizes (memory or O(C²d) PRG work); see the module docstring.
SKIP = {('secure_aggregation(complete)', 100), ('secure_aggregation(complete)', 1000),
        ('secure_aggregation(k=8)', 1000)} | {(t, 1000) for t in TRANSFORMS}


def _model(hidden=HIDDEN):
  return fs.models.mlp((784,), 10, hidden=(hidden,))


def local_training_seconds(clients: int, repeats: int, hidden: int) -> tuple[float, int]:
  """Median seconds of one compiled FedAvg round (local training dominated)."""
  model = _model(hidden)
  params = model.init(jax.random.key(0))
  algorithm = fs.fed_avg(model.loss, optax.sgd(0.1))
  steps = EXAMPLES // BATCH
  kx, ky = jax.random.split(jax.random.key(1))
  batch = fs.ClientBatch(
      data={'x': jax.random.uniform(kx, (clients, steps, BATCH, 784)),
            'y': jax.random.randint(ky, (clients, steps, BATCH), 0, 10)},
      mask=jnp.ones((clients, steps, BATCH), bool),
      client_ids=jnp.arange(clients, dtype=jnp.int32),
      weight=jnp.full((clients,), float(EXAMPLES)))
  state = algorithm.init(params)
  compiled = jax.jit(algorithm.round).lower(state, batch, jax.random.key(2)).compile()
  seconds = median_seconds(lambda s, b, k: compiled(s, b, k)[0].params,
                           (state, batch, jax.random.key(2)), repeats, slow_call_seconds=2.0)
  return seconds, fs.tree.tree_size(params)


def aggregator_seconds(aggregator, params, clients: int, repeats: int) -> float:
  key = jax.random.key(3)
  # Cheap deterministic values (a threefry draw of 1G normals would dominate the run).
  updates = jax.jit(lambda: jax.tree.map(
      lambda p: 0.01 * jnp.sin(0.37 * jnp.arange(clients * p.size, dtype=jnp.float32)
                               .reshape((clients,) + p.shape) + 0.1 * p.size), params))()
  weights = jnp.linspace(1.0, 2.0, clients)
  ids = jnp.arange(clients, dtype=jnp.int32)
  state = aggregator.init(params, clients)
  compiled = jax.jit(aggregator.apply).lower(updates, weights, state, key, ids).compile()
  seconds = median_seconds(lambda *a: compiled(*a)[0], (updates, weights, state, key, ids),
                           repeats, slow_call_seconds=2.0)
  return seconds


def run(run_dir: str, *, quick: bool = False, dataset: str | None = None,
        seeds: int | None = None, sizes=None, repeats: int | None = None,
        budget_seconds: float = 1200.0, names=None) -> dict:
  """Times every aggregator; returns {name@C: ratio to local training at C = 100}."""
  del dataset, seeds
  reporting.prepare_run_dir(run_dir, allow_existing=True)
  sizes = tuple(sizes or ((10,) if quick else (10, 100, 1000)))
  repeats = repeats or (2 if quick else 3)
  reference_clients = 10 if quick else 100
  started = time.perf_counter()
  hidden = 32 if quick else HIDDEN  # quick: a ~25k-parameter model, for CI only
  local, num_params = local_training_seconds(reference_clients, repeats, hidden)
  params = _model(hidden).init(jax.random.key(0))
  reporting.write_config(run_dir, {
      'study': 'bench_aggregators', 'num_params': num_params, 'sizes': sizes,
      'repeats': repeats, 'reference': f'FedAvg round, MLP 784-{hidden}-10, '
      f'{reference_clients} clients x {EXAMPLES} examples, batch {BATCH}, 1 epoch',
      'machine': f'{platform.processor() or platform.machine()}, {jax.device_count()} '
                 f'{jax.default_backend()} device(s)', 'quick': quick})
  rows, results = [], {}
  entries = [(n, f, 'reducer') for n, f in REDUCERS.items()] + \
            [(n, f, 'transform') for n, f in TRANSFORMS.items()]
  if names is not None:
    unknown = set(names) - {e[0] for e in entries}
    if unknown:
      raise ValueError(f'unknown aggregators {sorted(unknown)}; valid: {[e[0] for e in entries]}')
    entries = [e for e in entries if e[0] in names]
  table: dict[str, dict[int, str]] = {}
  # Sizes outermost, so that the time budget cuts the largest C first.
  for clients in sizes:
    for name, factory, kind in entries:
      cell = 'not run'
      if (name, clients) in SKIP or (quick and 'complete' in name and clients > 10):
        pass
      elif time.perf_counter() - started > budget_seconds:
        cell = 'skipped'
      else:
        aggregator = factory(clients)
        if kind == 'transform':
          aggregator = agg.chain(aggregator, agg.weighted_mean())
        seconds = aggregator_seconds(aggregator, params, clients, 1 if clients >= 1000 else repeats)
        ratio = seconds / local
        results[f'{name}@{clients}'] = ratio
        cell = f'{seconds * 1e3:.1f} ms ({100 * ratio:.1f}%)'
        rows.append({'aggregator': name, 'kind': kind, 'clients': clients, 'seconds': seconds,
                     'ratio_to_local_training': ratio})
        reporting.append_metrics(run_dir, [rows[-1]])
        print(f'{name:32s} C={clients:5d} {cell}', flush=True)
      table.setdefault(name, {})[clients] = cell
  header = ['aggregator'] + [f'C = {c}' for c in sizes]
  body = [[n] + [table[n].get(c, '') for c in sizes] for n in table]
  notes = (f'Median seconds per call for a {num_params:,}-parameter update; in parentheses the '
           f'ratio to one round of local training ({local * 1e3:.0f} ms: FedAvg round of the same '
           f'MLP with {reference_clients} clients x {EXAMPLES} examples, batch {BATCH}, one '
           f'epoch). Client transforms are timed chained with weighted_mean(). '
           f'"not run": memory (C = 1000 transforms and secure aggregation copy the 4 GB '
           f'updates several times) or O(C^2 d) mask generation (complete-graph secure '
           f'aggregation beyond C = 10).')
  reporting.write_summary(run_dir, 'Aggregator cost beside local training', header, body, notes)
  if rows:
    series = {}
    for name in table:
      pts = [(r['clients'], r['seconds']) for r in rows if r['aggregator'] == name]
      if len(pts) > 1:
        series[name] = ([p[0] for p in pts], [p[1] for p in pts])
    reporting.plot_lines(f'{run_dir}/aggregator_seconds.png', series, xlabel='clients C',
                         ylabel='seconds per call', logx=True,
                         title=f'aggregators on a {num_params:,}-parameter update')
  results['local_training_seconds'] = local
  return results


if __name__ == '__main__':
  from fedjax_sync.cli import main
  sys.exit(main(['run', '--config', __file__] + sys.argv[1:]))
