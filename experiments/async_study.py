"""Semi-asynchronous vs synchronous training against simulated wall-clock time.

The system-heterogeneity study of FedQS (arXiv 2510.07664, §5; ../shared/seeds/
fedqs_semi_async_2510.07664.txt): N = 100 clients, K = 10 updates per aggregation,
client speeds spread 1:20 or 1:100 between fastest and slowest (evenly spaced,
randomly assigned), label skew by Dirichlet α ∈ {0.1, 0.5, 1}. Five methods:

* `fedavg_sync`: synchronous FedAvg, 10 sampled clients per round, waiting for all.
* `fedavg_deadline`: the same with a deadline at the median job time (late clients
  get weight 0; the round lasts the deadline, or less when all arrived).
* `fedbuff`: FedBuff, K = 10, s(τ) = (1 + τ)^(-1/2), η_g = 1.
* `fedqs_sgd`, `fedqs_avg`: FedQS (ALGORITHMS.md), K = 10.

The synchronous methods run R rounds, the semi-asynchronous ones 2R aggregations
(`async_factor`; an aggregation of K stale updates is worth less than a round, and
costs far less time), all with the same local work (2 epochs, batch 50, client lr 0.1: FedQS's defaults). Reported: final
test accuracy (mean ± std over seeds), the simulated wall-clock to reach a target
accuracy (0.95 × synchronous FedAvg's final accuracy in that setting), and the
wall-clock cut `1 − T_method / T_fedavg_sync` at that target.

Data: the embedded default, pooled Synthetic(1, 1) examples re-partitioned by
Dirichlet α ('synthetic_pooled'); `--dataset digits` (or any registered dataset
with a `partition` option) works too. Run:

    fedjax-sync run --config experiments/async_study.py [--quick] [--seeds 2]

Writes config.json, metrics.jsonl (a row per evaluation), summary.md and
accuracy_vs_time_*.png / accuracy_vs_aggregations_*.png (one plot per setting).
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

import numpy as np
import optax

from fedjax_sync import reporting
from fedjax_sync.algorithms.fed_avg import fed_avg
from fedjax_sync.algorithms.fed_buff import fed_buff
from fedjax_sync.algorithms.fed_qs import FedQSHyperparameters, fed_qs
from fedjax_sync.data import LocalWork, registry
from fedjax_sync.models.models import get_model
from fedjax_sync.simulate.clock import (make_clock, speed_ratio_times, wait_for_all,
                                        with_clock, with_deadline)
from fedjax_sync.simulate.rounds import SimulationConfig, Simulator
from fedjax_sync.simulate.semi_async import AsyncConfig, SemiAsyncSimulator

METHODS = ('fedavg_sync', 'fedavg_deadline', 'fedbuff', 'fedqs_sgd', 'fedqs_avg')
TARGET_FRACTION = 0.95
FINAL_EVALS = 5


def _run_method(method, model, data, times, *, num_clients, buffer_size, aggregations,
                async_aggregations, work, eval_every, seed, learning_rate):
  clock = make_clock(times)
  if method.startswith('fedavg'):
    policy = (wait_for_all() if method == 'fedavg_sync'
              else with_deadline(float(np.median(times))))
    algorithm = with_clock(fed_avg(model.loss, optax.sgd(learning_rate)), clock, policy)
    sim = Simulator(algorithm, model, data,
                    SimulationConfig(aggregations, buffer_size, work, eval_every=eval_every,
                                     seed=seed, per_client_eval=False))
    result = sim.run(sim.init(), progress=False)
    wall, rows = 0.0, []
    for row in result.history:
      wall += row['round_time']
      if 'test_accuracy' in row:
        rows.append((row['round'], wall, row['test_accuracy'], row.get('mean_staleness', 0.0)))
    return rows, result.compile_seconds, result.run_seconds
  if method == 'fedbuff':
    algorithm = fed_buff(model.loss, optax.sgd(learning_rate))
  else:
    algorithm = fed_qs(model.loss, aggregation=method.split('_')[1], num_clients=num_clients,
                       hparams=FedQSHyperparameters(learning_rate=learning_rate))
  sim = SemiAsyncSimulator(algorithm, model, data, clock,
                           AsyncConfig(async_aggregations, buffer_size, work,
                                       eval_every=eval_every, seed=seed))
  result = sim.run(sim.init())
  rows = [(row['aggregation'], row['wall_clock'], row['test_accuracy'], row['mean_staleness'])
          for row in result.history if 'test_accuracy' in row]
  return rows, result.compile_seconds, result.run_seconds


def _time_to(rows, target):
  for _, wall, accuracy, _ in rows:
    if accuracy >= target:
      return wall
  return float('nan')


def run(run_dir: str, *, quick: bool = False, dataset: str | None = None,
        seeds: int | None = None, alphas: Sequence[float] | None = None,
        ratios: Sequence[float] | None = None, methods: Sequence[str] | None = None,
        aggregations: int | None = None, num_clients: int | None = None,
        buffer_size: int = 10, learning_rate: float = 0.1, async_factor: int = 2,
        progress: bool = True) -> dict:
  """Runs the study; returns headline numbers (final accuracies, wall-clock cuts)."""
  reporting.prepare_run_dir(run_dir)
  dataset = dataset or 'synthetic_pooled'
  methods = tuple(methods or METHODS)
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f'unknown methods {unknown}; valid: {", ".join(METHODS)}')
  if quick:
    alphas, ratios = alphas or (0.5,), ratios or (20.0,)
    aggregations, num_clients, seeds = aggregations or 8, num_clients or 20, seeds or 1
    buffer_size = min(buffer_size, 5)
    work, eval_every = LocalWork(batch_size=50, steps=2), 4
  else:
    alphas, ratios = alphas or (0.1, 0.5, 1.0), ratios or (20.0, 100.0)
    aggregations, num_clients, seeds = aggregations or 200, num_clients or 100, seeds or 2
    work, eval_every = LocalWork(batch_size=50, epochs=2), 10
  config = dict(dataset=dataset, methods=methods, alphas=alphas, ratios=ratios,
                aggregations=aggregations, num_clients=num_clients, buffer_size=buffer_size,
                seeds=seeds, local_work=work._asdict(), learning_rate=learning_rate,
                async_aggregations=async_factor * aggregations,
                eval_every=eval_every, target_fraction=TARGET_FRACTION,
                deadline='median job time', speed_spacing='linear, random assignment')
  reporting.write_config(run_dir, config)

  started = time.perf_counter()
  for alpha in alphas:
    data = registry.load_dataset(dataset, num_clients=num_clients, partition='dirichlet',
                                 alpha=float(alpha), seed=0)
    model = get_model(registry.default_model(dataset), data.train['x'].shape[1:],
                      data.num_classes)
    for ratio in ratios:
      for method in methods:
        for seed in range(seeds):
          times = speed_ratio_times(num_clients, ratio, seed=seed)
          rows, compile_s, run_s = _run_method(
              method, model, data, times, num_clients=num_clients, buffer_size=buffer_size,
              aggregations=aggregations, async_aggregations=async_factor * aggregations,
              work=work, eval_every=eval_every, seed=seed,
              learning_rate=learning_rate)
          reporting.append_metrics(run_dir, [
              dict(algorithm=method, alpha=alpha, speed_ratio=ratio, seed=seed, aggregation=a,
                   wall_clock=w, test_accuracy=acc, mean_staleness=st)
              for a, w, acc, st in rows])
          if progress:
            print(f'α={alpha} 1:{ratio:g} {method} seed {seed}: acc {rows[-1][2]:.4f} '
                  f'wall {rows[-1][1]:.1f} (compile {compile_s:.1f}s, run {run_s:.1f}s)',
                  flush=True)

  elapsed = time.perf_counter() - started
  return summarize(run_dir, elapsed_seconds=elapsed)


def _final(rows, last: int = FINAL_EVALS) -> float:
  """Mean test accuracy of the last `last` evaluations (single evaluations are noisy)."""
  return float(np.mean([x[2] for x in rows[-last:]]))


def summarize(run_dir: str, *, elapsed_seconds: float | None = None,
              target_fraction: float = TARGET_FRACTION) -> dict:
  """Writes summary.md and the plots from `run_dir`'s config.json and metrics.jsonl."""
  import json
  with open(f'{run_dir}/config.json') as f:
    config = json.load(f)
  results = {}
  for row in reporting.read_metrics(run_dir):
    key = (row['alpha'], row['speed_ratio'], row['algorithm'])
    runs = results.setdefault(key, {})
    runs.setdefault(row['seed'], []).append((row['aggregation'], row['wall_clock'],
                                             row['test_accuracy'], row['mean_staleness']))
  results = {k: [v[s] for s in sorted(v)] for k, v in results.items()}
  methods = [m for m in config['methods'] if any(k[2] == m for k in results)]
  table, headline = [], {}
  for alpha in config['alphas']:
    for ratio in config['ratios']:
      sync = results.get((alpha, ratio, 'fedavg_sync'))
      target = target_fraction * float(np.mean([_final(r) for r in sync])) if sync else None
      sync_time = float(np.nanmean([_time_to(r, target) for r in sync])) if sync else None
      series, bands, series_agg = {}, {}, {}
      for method in methods:
        runs = results[(alpha, ratio, method)]
        finals = [_final(r) for r in runs]
        to_target = [_time_to(r, target) for r in runs] if target else [float('nan')]
        reached = int(sum(np.isfinite(t) for t in to_target))
        mean_time = float(np.nanmean(to_target)) if reached else float('nan')
        cut = (1 - mean_time / sync_time) if sync_time and reached else float('nan')
        table.append([f'{alpha:g}', f'1:{ratio:g}', method, reporting.mean_std(finals),
                      f'{mean_time:.0f} ({reached}/{len(runs)})',
                      f'{100 * cut:.0f}%' if reached else 'not reached',
                      f'{np.mean([r[-1][1] for r in runs]):.0f}',
                      f'{np.mean([np.mean([x[3] for x in r]) for r in runs]):.1f}'])
        prefix = f'{method}/alpha={alpha:g}/ratio={ratio:g}'
        headline[f'{prefix}/final_accuracy'] = float(np.mean(finals))
        headline[f'{prefix}/time_to_target'] = mean_time
        headline[f'{prefix}/wallclock_cut'] = cut
        n = min(len(r) for r in runs)
        accuracy = np.asarray([[x[2] for x in r[:n]] for r in runs])
        series[method] = (np.mean([[x[1] for x in r[:n]] for r in runs], axis=0),
                          accuracy.mean(0))
        series_agg[method] = ([x[0] for x in runs[0][:n]], accuracy.mean(0))
        bands[method] = accuracy.std(0)
      tag = f'alpha{alpha:g}_ratio{ratio:g}'
      title = f'Dirichlet α={alpha:g}, speed 1:{ratio:g}'
      reporting.plot_lines(f'{run_dir}/accuracy_vs_time_{tag}.png', series, logx=True,
                           xlabel='simulated wall-clock', ylabel='test accuracy', title=title,
                           bands=bands)
      reporting.plot_lines(f'{run_dir}/accuracy_vs_aggregations_{tag}.png', series_agg,
                           xlabel='aggregations (rounds for the synchronous methods)',
                           ylabel='test accuracy', title=title, bands=bands)
  notes = (f"{config['aggregations']} rounds for the synchronous methods, "
           f"{config['async_aggregations']} aggregations for the semi-asynchronous ones, "
           f"N = {config['num_clients']}, K = {config['buffer_size']}, {config['seeds']} seed(s), "
           f"dataset {config['dataset']}. Final accuracy = mean of the last {FINAL_EVALS} "
           f'evaluations (mean ± std over seeds). Target = {target_fraction} × synchronous '
           'FedAvg final accuracy; time to target = first evaluation at or above it, mean over '
           'the seeds that reached it (reached/seeds); cut = 1 − time / FedAvg-sync time.')
  if elapsed_seconds is not None:
    notes += f' Total {elapsed_seconds:.0f} s on this machine.'
  reporting.write_summary(run_dir, 'Semi-asynchronous vs synchronous: accuracy and wall-clock',
                          ['α', 'speed', 'method', 'final accuracy', 'time to target',
                           'wall-clock cut', 'total wall-clock', 'mean staleness'], table, notes)
  return headline


if __name__ == '__main__':
  from fedjax_sync.cli import main
  sys.exit(main(['run', '--config', __file__] + sys.argv[1:]))
