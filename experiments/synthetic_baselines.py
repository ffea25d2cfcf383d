"""The FedAvg family on the embedded default, Synthetic(1, 1) with 30 clients.

FedAvg, FedProx (μ = 1, FedProx's best on this data), FedSGD and FedAdam; 10
clients per round, 20 local steps of batch 10, client lr 0.01; test accuracy
every 10 rounds, mean ± std over seeds. Run:

    fedjax-sync run --config experiments/synthetic_baselines.py
"""

from __future__ import annotations

import sys

import numpy as np

import fedjax_sync as fs
from fedjax_sync import reporting

ALGORITHMS = ('fedavg', 'fedprox', 'fedsgd', 'fedadam')


def run(run_dir: str, *, quick: bool = False, dataset: str | None = None,
        seeds: int | None = None, rounds: int | None = None) -> dict:
  if dataset not in (None, 'synthetic'):
    raise ValueError(f"this study runs on 'synthetic' only, got dataset={dataset!r}")
  num_seeds = seeds or (1 if quick else 3)
  num_rounds = rounds or (10 if quick else 200)
  eval_every = 5 if quick else 10
  reporting.prepare_run_dir(run_dir, allow_existing=True)
  data = fs.synthetic(1.0, 1.0, num_clients=30, seed=0)
  model = fs.models.logistic_regression((60,), 10)
  work = fs.LocalWork(batch_size=10, steps=20)
  hparams = fs.Hyperparameters(mu=1.0)
  reporting.write_config(run_dir, {
      'study': 'synthetic_baselines', 'dataset': data.name, 'algorithms': ALGORITHMS,
      'rounds': num_rounds, 'clients_per_round': 10, 'local_work': work._asdict(),
      'hyperparameters': hparams.__dict__, 'seeds': num_seeds})
  curves: dict[str, list[list[float]]] = {}
  eval_rounds: list[int] = []
  for name in ALGORITHMS:
    algorithm = fs.build_algorithm(name, model.loss, hparams, num_clients=data.num_clients)
    for seed in range(num_seeds):
      config = fs.SimulationConfig(num_rounds=num_rounds, clients_per_round=10, local_work=work,
                                   eval_every=eval_every, seed=seed)
      sim = fs.Simulator(algorithm, model, data, config)
      result = sim.run(sim.init(), progress=False)
      rows = [r for r in result.history if 'test_accuracy' in r]
      eval_rounds = [r['round'] for r in rows]
      curves.setdefault(name, []).append([r['test_accuracy'] for r in rows])
      reporting.append_metrics(run_dir, [{'algorithm': name, 'seed': seed, **r}
                                         for r in result.history])
  series = {n: (eval_rounds, np.mean(c, 0)) for n, c in curves.items()}
  bands = {n: np.std(c, 0) for n, c in curves.items()}
  reporting.plot_lines(f'{run_dir}/accuracy.png', series, bands=bands, xlabel='round',
                       ylabel='test accuracy', title='Synthetic(1, 1), 30 clients, 10 per round')
  marks = [i for i, r in enumerate(eval_rounds) if r in (eval_rounds[len(eval_rounds) // 4],
                                                          eval_rounds[len(eval_rounds) // 2],
                                                          eval_rounds[-1])]
  header = ['algorithm'] + [f'round {eval_rounds[i]}' for i in marks]
  table = [[n] + [reporting.mean_std([c[i] for c in curves[n]]) for i in marks] for n in ALGORITHMS]
  reporting.write_summary(run_dir, f'Test accuracy on {data.name} (mean ± std over {num_seeds} seeds)',
                          header, table)
  return {n: float(np.mean([c[-1] for c in curves[n]])) for n in ALGORITHMS}


if __name__ == '__main__':
  from fedjax_sync.cli import main
  sys.exit(main(['run', '--config', __file__] + sys.argv[1:]))
