"""Robust aggregation under model poisoning on the embedded default, Synthetic(1, 1).

f = 3 of the K = 10 clients of every round are Byzantine (the first three batch
positions; clients are sampled at random, so three random clients per round).
Attacks: none; sign flip (the attackers send −5Δ); scaling (they send 100Δ).
Defences: FedAvg's weighted mean, coordinate median, trimmed mean β = 0.3 (trims
the f = 3 largest and smallest values), Krum (f = 3) and the geometric median
(8 Weiszfeld iterations). 30 clients, 20 local SGD steps of batch 10, lr 0.01,
server sgd(1.0). Test accuracy every 10 rounds, mean ± std over seeds. Run:

    fedjax-sync run --config experiments/robustness.py [--quick] [--seeds K]
"""

from __future__ import annotations

import math
import sys

import numpy as np
import optax

import fedjax_sync as fs
from fedjax_sync import aggregators as agg
from fedjax_sync import reporting

NUM_ATTACKERS = 3
CLIENTS_PER_ROUND = 10
ATTACKS = {
    'none': lambda: None,
    'sign_flip': lambda: agg.sign_flip_attack(5.0, num_attackers=NUM_ATTACKERS),
    'scale': lambda: agg.scale_attack(100.0, num_attackers=NUM_ATTACKERS),
}
DEFENCES = {
    'fedavg': lambda: agg.weighted_mean(),
    'median': lambda: agg.coordinate_median(),
    'trimmed_mean': lambda: agg.trimmed_mean(0.3),
    'krum': lambda: agg.krum(NUM_ATTACKERS),
    'geometric_median': lambda: agg.geometric_median(8),
}
QUICK_ATTACKS = ('none', 'sign_flip')
QUICK_DEFENCES = ('fedavg', 'median', 'krum')


def _finite(x):
  return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else float('nan')


def run(run_dir: str, *, quick: bool = False, dataset: str | None = None,
        seeds: int | None = None, rounds: int | None = None) -> dict:
  """Runs every (attack, defence) pair; returns final mean test accuracies."""
  if dataset not in (None, 'synthetic'):
    raise ValueError(f"this study runs on 'synthetic' only, got dataset={dataset!r}")
  num_seeds = seeds or (1 if quick else 3)
  num_rounds = rounds or (10 if quick else 100)
  eval_every = 5 if quick else 10
  attacks = QUICK_ATTACKS if quick else tuple(ATTACKS)
  defences = QUICK_DEFENCES if quick else tuple(DEFENCES)
  reporting.prepare_run_dir(run_dir, allow_existing=True)
  data = fs.synthetic(1.0, 1.0, num_clients=30, seed=0)
  model = fs.models.logistic_regression((60,), 10)
  work = fs.LocalWork(batch_size=10, steps=20)
  reporting.write_config(run_dir, {
      'study': 'robustness', 'dataset': data.name, 'attacks': attacks, 'defences': defences,
      'num_attackers': NUM_ATTACKERS, 'clients_per_round': CLIENTS_PER_ROUND,
      'rounds': num_rounds, 'local_work': work._asdict(), 'client_lr': 0.01, 'seeds': num_seeds})
  curves: dict[tuple[str, str], list[list[float]]] = {}
  losses: dict[tuple[str, str], list[float]] = {}
  eval_rounds: list[int] = []
  for attack in attacks:
    for defence in defences:
      stages = [s for s in (ATTACKS[attack](), DEFENCES[defence]()) if s is not None]
      aggregator = agg.chain(*stages)
      algorithm = fs.fed_avg(model.loss, optax.sgd(0.01), aggregator=aggregator,
                             num_clients=data.num_clients, name=f'{defence}/{attack}')
      for seed in range(num_seeds):
        config = fs.SimulationConfig(num_rounds=num_rounds, clients_per_round=CLIENTS_PER_ROUND,
                                     local_work=work, eval_every=eval_every, seed=seed,
                                     per_client_eval=False)
        sim = fs.Simulator(algorithm, model, data, config)
        result = sim.run(sim.init(), progress=False)
        rows = [r for r in result.history if 'test_accuracy' in r]
        eval_rounds = [r['round'] for r in rows]
        curves.setdefault((attack, defence), []).append(
            [_finite(r['test_accuracy']) for r in rows])
        losses.setdefault((attack, defence), []).append(_finite(rows[-1].get('test_loss',
                                                                               float('nan'))))
        reporting.append_metrics(run_dir, [{'attack': attack, 'algorithm': defence, 'seed': seed,
                                            **r} for r in result.history])
  for attack in attacks:
    series = {d: (eval_rounds, np.mean(curves[(attack, d)], 0)) for d in defences}
    bands = {d: np.std(curves[(attack, d)], 0) for d in defences}
    reporting.plot_lines(f'{run_dir}/accuracy_{attack}.png', series, bands=bands, xlabel='round',
                         ylabel='test accuracy',
                         title=f'attack: {attack} ({NUM_ATTACKERS} of {CLIENTS_PER_ROUND} clients)')
  header = ['defence'] + [f'{a}: final accuracy' for a in attacks]
  table = [[d] + [reporting.mean_std([c[-1] for c in curves[(a, d)]]) for a in attacks]
           for d in defences]
  loss_table = reporting.markdown_table(
      ['defence'] + [f'{a}: final test loss' for a in attacks],
      [[d] + [reporting.mean_std(losses[(a, d)]) for a in attacks] for d in defences])
  notes = ('Final test accuracy (round {}), mean ± std over {} seeds; nan = diverged '
           '(non-finite parameters). Plots: accuracy_<attack>.png.\n\n{}').format(
               eval_rounds[-1], num_seeds, loss_table)
  reporting.write_summary(run_dir, f'Robust aggregation on {data.name}: {NUM_ATTACKERS} of '
                          f'{CLIENTS_PER_ROUND} clients attack', header, table, notes)
  return {f'{a}/{d}': float(np.mean([c[-1] for c in curves[(a, d)]]))
          for a in attacks for d in defences}


if __name__ == '__main__':
  from fedjax_sync.cli import main
  sys.exit(main(['run', '--config', __file__] + sys.argv[1:]))
