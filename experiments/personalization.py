"""Personalization study: FedAvg (with and without fine-tuning), Ditto, FedPer, FedRep,
APFL, pFedMe, Per-FedAvg (FO and HF) and IFCA on label-skewed digits.

Issue 16's evidence. Every method is judged by the same protocol
(`fedjax_sync.simulate.personalization.personalized_evaluator`): each client's
model is evaluated on that client's held-out examples (the last 20% of its training
examples, `hold_out_client_test`), and the distribution over clients is summarized
by its mean and the mean of its worst decile. What "each client's model" is differs:

| method | the client's model |
|---|---|
| FedAvg | the global model (no personalization) |
| FedAvg + FT | the global model after K local SGD steps on the client (K = `finetune_steps`) |
| FedAvg + 1 step | the global model after one SGD step (Per-FedAvg's budget, for comparison) |
| Ditto, FedPer, FedRep, APFL, pFedMe | the algorithm's own personal model (`Algorithm.personalize`), as it is |
| Per-FedAvg FO / HF | the meta-model after one SGD step of α on the client (the paper's protocol) |
| IFCA | the model of the cluster the client chose last (`ifca.client_models`) |

The global test accuracy (`test_accuracy`) is that of the global params on the union of
the held-out examples (for IFCA: the cluster model with the most example weight).

Setting: scikit-learn's 8×8 digits split into 20 clients × 2 label shards (each client
holds about two digits), the `mlp` model, 10 clients per round, 10 local steps of
batch 16, client SGD lr 0.05, server lr 1. Hyperparameters are the registry's
defaults except Per-FedAvg's α, set to the client lr (all listed in config.json); none
were tuned. The seeds of one method run as ONE compiled program (`fedjax_sync.simulate.
Sweep`, vmapped over seeds); the personalization evaluation is a driver evaluation hook
vmapped over the sweep's members. The partition is fixed (partition seed 0); the seeds
vary the initial model, the client samples and the batch shuffles.

Shakespeare (`--dataset shakespeare`, when `fedjax-sync prepare shakespeare` has been
run) is a reduced section: see `run_shakespeare`.

    fedjax-sync run --config experiments/personalization.py [--quick] [--seeds 3]

Writes config.json, metrics.jsonl (one row per method, seed and evaluation),
summary.md (mean ± std over seeds) and personalization.png (bars) /
personalized_accuracy.png (per-client mean accuracy against rounds).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_sync as fs
from fedjax_sync import reporting
from fedjax_sync.algorithms.ifca import client_models
from fedjax_sync.data import registry
from fedjax_sync.simulate import Sweep, registered_algorithm
from fedjax_sync.simulate.personalization import hold_out_client_test, personalized_evaluator


class Method(NamedTuple):
  """One row of the study: an algorithm run and how its clients' models are evaluated.

  `evaluation`: 'global' (the global params), 'finetune' (K steps from the global
  params), 'own' (`Algorithm.personalize` of the client states), 'one_step' (one step
  of α, Per-FedAvg's protocol) or 'clusters' (each client's IFCA cluster model).
  """
  label: str
  algorithm: str
  evaluation: str
  hyperparameters: dict


METHODS = (
    Method('fedavg', 'fedavg', 'global', {}),
    Method('fedavg+ft', 'fedavg', 'finetune', {}),
    Method('fedavg+1step', 'fedavg', 'one_step', {}),
    Method('ditto', 'ditto', 'own', {}),
    Method('fedper', 'fedper', 'own', {}),
    Method('fedrep', 'fedrep', 'own', {}),
    Method('apfl', 'apfl', 'own', {}),
    Method('pfedme', 'pfedme', 'own', {}),
    Method('perfedavg_fo', 'perfedavg', 'one_step', {'perfedavg_variant': 'fo'}),
    Method('perfedavg_hf', 'perfedavg', 'one_step', {'perfedavg_variant': 'hf'}),
    Method('ifca', 'ifca', 'clusters', {}),
)
QUICK_METHODS = ('fedavg', 'fedavg+ft', 'ditto', 'perfedavg_fo', 'ifca')
STATISTICS = ('personalized_accuracy_mean', 'personalized_accuracy_median',
              'personalized_accuracy_worst_decile', 'personalized_loss_mean',
              'client_accuracy_mean', 'client_accuracy_median', 'client_accuracy_worst_decile',
              'client_loss_mean')
# The global model's statistics under the names of the personalized ones: what the
# 'global' method reports, read off another evaluator of the same run when there is one.
AS_GLOBAL = {'personalized_accuracy_mean': 'client_accuracy_mean',
             'personalized_accuracy_median': 'client_accuracy_median',
             'personalized_accuracy_worst_decile': 'client_accuracy_worst_decile',
             'personalized_loss_mean': 'client_loss_mean'}
EVALUATION_KEY = 0x9E5   # folded into each seed's key: no key the rounds use


def run(run_dir: str, *, quick: bool = False, dataset: str | None = None,
        seeds: int | None = None, methods: Sequence[str] | None = None,
        rounds: int | None = None, num_clients: int = 20, shards_per_client: int = 2,
        clients_per_round: int = 10, local_steps: int = 10, batch_size: int = 16,
        client_lr: float = 0.05, finetune_steps: int = 10, holdout: float = 0.2,
        eval_every: int | None = None, data_dir: str | None = None,
        progress: bool = False) -> dict:
  """Runs the study; returns the headline numbers (means over seeds per method).

  Args:
    run_dir: output directory (created; must be new or empty).
    quick: CI size: 2 seeds, 4 rounds, five methods (FedAvg, FedAvg + FT, Ditto,
      Per-FedAvg FO, IFCA: every evaluation path).
    dataset: 'digits' (default) or 'shakespeare' (the reduced section, `run_shakespeare`).
    seeds: number of seeds (default 3; quick 2).
    methods: labels of `METHODS` to run (default all; quick `QUICK_METHODS`).
    rounds: communication rounds (default 40; quick 4).
    num_clients, shards_per_client: the label-skewed partition of digits.
    clients_per_round: clients sampled per round.
    local_steps, batch_size, client_lr: local work (SGD) of every method.
    finetune_steps: K of FedAvg + FT (SGD steps of `client_lr`, batch `batch_size`).
    holdout: fraction of each client's examples held out for its evaluation.
    eval_every: rounds between evaluations (default rounds / 4).
    data_dir: the Shakespeare cache directory (for dataset='shakespeare').
    progress: progress bars.
  """
  if dataset == 'shakespeare':
    return run_shakespeare(run_dir, quick=quick, seeds=seeds, data_dir=data_dir,
                           progress=progress)
  if dataset not in (None, 'digits'):
    raise ValueError(f"dataset must be 'digits' or 'shakespeare', got {dataset!r}")
  num_seeds = seeds or (2 if quick else 3)
  num_rounds = rounds or (4 if quick else 40)
  every = eval_every or max(1, num_rounds // 4)
  labels = list(methods or (QUICK_METHODS if quick else [m.label for m in METHODS]))
  by_label = {m.label: m for m in METHODS}
  unknown = [m for m in labels if m not in by_label]
  if unknown:
    raise ValueError(f'unknown method(s) {unknown}; valid: {", ".join(by_label)}')
  for name, value in (('client_lr', client_lr), ('holdout', holdout)):
    if not value > 0:
      raise ValueError(f'{name} must be positive, got {value!r}')
  reporting.prepare_run_dir(run_dir)

  data = hold_out_client_test(
      registry.load_dataset('digits', num_clients=num_clients, seed=0, partition='shards',
                            shards_per_client=shards_per_client), holdout)
  model = fs.models.get_model('mlp', data.train['x'].shape[1:], data.num_classes)
  config = fs.SimulationConfig(num_rounds=num_rounds, clients_per_round=clients_per_round,
                               local_work=fs.LocalWork(batch_size=batch_size, steps=local_steps),
                               eval_every=every, per_client_eval=False)
  base = fs.Hyperparameters(client_learning_rate=client_lr, server_learning_rate=1.0,
                            perfedavg_alpha=client_lr)
  reporting.write_config(run_dir, {
      'study': 'personalization', 'dataset': data.name, 'num_clients': num_clients,
      'partition': f'shards, {shards_per_client} label shards per client (partition seed 0)',
      'holdout': holdout, 'model': 'mlp', 'rounds': num_rounds, 'eval_every': every,
      'clients_per_round': clients_per_round, 'local_steps': local_steps,
      'batch_size': batch_size, 'client_lr': client_lr, 'client_optimizer': 'sgd',
      'server_lr': 1.0, 'finetune_steps': finetune_steps, 'seeds': list(range(num_seeds)),
      'methods': {m: {'algorithm': by_label[m].algorithm, 'evaluation': by_label[m].evaluation,
                      **by_label[m].hyperparameters} for m in labels},
      'hyperparameters': {k: getattr(base, k) for k in (
          'ditto_lambda', 'head_epochs', 'apfl_alpha', 'apfl_adaptive_alpha', 'pfedme_lambda',
          'pfedme_inner_steps', 'pfedme_personal_learning_rate', 'perfedavg_alpha',
          'num_clusters', 'cluster_init_scale')},
      'quick': quick})

  rows, seconds = _run_methods(run_dir, model, data, config, base,
                               [by_label[label] for label in labels], num_seeds,
                               finetune_steps, batch_size, client_lr, progress)
  notes = (f'{data.name}; mlp; {num_seeds} seeds (mean ± population std), round {num_rounds}; '
           f'{clients_per_round} of {num_clients} clients per round, {local_steps} local SGD '
           f'steps of batch {batch_size}, client lr {client_lr:g}, server lr 1; FedAvg + FT: '
           f'{finetune_steps} SGD steps of lr {client_lr:g}; Per-FedAvg: one step of '
           f'α = {client_lr:g}. Personalized accuracy: each client\'s model on its own held-out '
           f'examples; the worst decile is the mean of the lowest max(1, ⌊k/10⌋) clients. '
           'Registry-default hyperparameters (see config.json), untuned. Seconds: the sweep '
           'of all seeds, compilation included (FedAvg and FedAvg + FT share one sweep).')
  return _report(run_dir, 'Personalization on label-skewed digits', notes, rows, seconds,
                 labels, num_rounds, num_seeds)


def _report(run_dir, title, notes, rows, seconds, labels, num_rounds, num_seeds) -> dict:
  """summary.md, the two PNGs, and the headline numbers (means over seeds)."""
  finals = {label: [r for r in rows if r['method'] == label and r['round'] == num_rounds]
            for label in labels}
  table = [[label, reporting.mean_std([r['test_accuracy'] for r in finals[label]]),
            reporting.mean_std([r['personalized_accuracy_mean'] for r in finals[label]]),
            reporting.mean_std([r['personalized_accuracy_median'] for r in finals[label]]),
            reporting.mean_std([r['personalized_accuracy_worst_decile'] for r in finals[label]]),
            f'{seconds[label]:.0f}'] for label in labels]
  header = ['method', 'global test acc', 'personalized acc mean', 'median', 'worst decile',
            's (sweep incl. compile)']
  reporting.write_summary(run_dir, title, header, table, notes)
  _plots(run_dir, rows, labels, finals, num_seeds, title)
  return {'personalized_accuracy_mean': {l: float(np.mean(
              [r['personalized_accuracy_mean'] for r in finals[l]])) for l in labels},
          'personalized_accuracy_worst_decile': {l: float(np.mean(
              [r['personalized_accuracy_worst_decile'] for r in finals[l]])) for l in labels},
          'test_accuracy': {l: float(np.mean([r['test_accuracy'] for r in finals[l]]))
                            for l in labels},
          'seconds': seconds}


def _run_methods(run_dir, model, data, config, base, methods, num_seeds, finetune_steps,
                 batch_size, client_lr, progress):
  """Runs `methods` (one seed sweep per algorithm and hyperparameters; FedAvg serves
  both FedAvg rows); returns `(rows, seconds per method)` and appends the rows to
  metrics.jsonl run by run."""
  runs: dict[tuple, list[Method]] = {}
  for m in methods:
    runs.setdefault((m.algorithm, tuple(sorted(m.hyperparameters.items()))), []).append(m)
  rows, seconds = [], {}
  for (name, overrides), members in runs.items():
    hparams = dataclasses.replace(base, **dict(overrides))
    started = time.perf_counter()
    sweep = Sweep(registered_algorithm(name, model.loss, hparams, num_clients=data.num_clients),
                  model, data, config, seeds=range(num_seeds))
    algorithm = fs.build_algorithm(name, model.loss, hparams, num_clients=data.num_clients)
    # Every evaluator also reports the global model's figures (client_*): the plain
    # 'global' method needs no evaluator of its own when the run has another one.
    evaluated = [m for m in members if m.evaluation != 'global'] or members[:1]
    hooks = [_hook(m, _evaluator(m, model, data, algorithm, finetune_steps, batch_size,
                                 client_lr), range(num_seeds)) for m in evaluated]
    result = sweep.run(sweep.init(), progress=progress, evaluation_hooks=hooks)
    for m in members:
      seconds[m.label] = round(time.perf_counter() - started, 1)
      source = m if m in evaluated else evaluated[0]
      names = ({k: AS_GLOBAL.get(k, k) for k in STATISTICS} if m.evaluation == 'global'
               else {k: k for k in STATISTICS})
      for setting, history in zip(result.settings, result.histories):
        for row in history:
          if f'{source.label}/personalized_accuracy_mean' not in row:
            continue
          rows.append({'method': m.label, 'algorithm': name, 'seed': setting['seed'],
                       'round': row['round'], 'test_accuracy': row['test_accuracy'],
                       'test_loss': row['test_loss'],
                       **{k: row[f'{source.label}/{names[k]}'] for k in STATISTICS}})
    reporting.append_metrics(run_dir, [r for r in rows if r['algorithm'] == name
                                       and r['method'] in {m.label for m in members}])
  return rows, seconds


def _evaluator(method: Method, model, data, algorithm, finetune_steps: int, batch_size: int,
               learning_rate: float):
  """`(evaluate, starting)`: the personalized evaluator of `method` and the map from the
  sweep's stacked states to what it evaluates, `(params [S], client_states [S])`."""
  if method.evaluation == 'global':
    evaluate = personalized_evaluator(model, data, steps=0, learning_rate=learning_rate,
                                      batch_size=batch_size)
    return evaluate, lambda states: (states.params, ())
  if method.evaluation == 'finetune':
    evaluate = personalized_evaluator(model, data, steps=finetune_steps,
                                      learning_rate=learning_rate, batch_size=batch_size)
    return evaluate, lambda states: (states.params, ())
  if method.evaluation == 'one_step':
    evaluate = personalized_evaluator(model, data, steps=1, learning_rate=learning_rate,
                                      batch_size=batch_size)
    return evaluate, lambda states: (states.params, ())
  if method.evaluation == 'own':
    evaluate = personalized_evaluator(model, data, steps=0, learning_rate=learning_rate,
                                      batch_size=batch_size, personalize=algorithm.personalize)
    return evaluate, lambda states: (states.params, states.client_states)
  if method.evaluation == 'clusters':
    evaluate = personalized_evaluator(model, data, steps=0, learning_rate=learning_rate,
                                      batch_size=batch_size, personalize=lambda _, own: own)
    return evaluate, lambda states: (states.params, jax.vmap(client_models)(states))
  raise ValueError(f'unknown evaluation {method.evaluation!r}; valid: global, finetune, '
                   'one_step, own, clusters')


def _hook(method: Method, evaluator, seeds) -> Callable:
  """A driver evaluation hook over the sweep's members: `{label/statistic: [S]}`."""
  evaluate, starting = evaluator
  roots = jnp.stack([jax.random.key_data(jax.random.fold_in(jax.random.key(s), EVALUATION_KEY))
                     for s in seeds])

  @jax.jit
  def evaluate_members(params, client_states, units_done):
    keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.wrap_key_data(k), units_done))(roots)
    out = jax.vmap(evaluate)(params, keys, client_states)
    return {k: out[k] for k in STATISTICS}

  def hook(states, units_done):
    params, client_states = starting(states)
    out = evaluate_members(params, client_states, jnp.asarray(units_done, jnp.int32))
    return {f'{method.label}/{k}': v for k, v in out.items()}

  return hook


def _plots(run_dir, rows, labels, finals, num_seeds, title):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  bars = (('test_accuracy', 'global model, test set'),
          ('personalized_accuracy_mean', 'personalized, mean over clients'),
          ('personalized_accuracy_worst_decile', 'personalized, worst decile'))
  fig, ax = plt.subplots(figsize=(9.5, 4.4), dpi=110)
  x = np.arange(len(labels))
  width = 0.27
  for i, (key, name) in enumerate(bars):
    values = np.array([[r[key] for r in finals[l]] for l in labels], np.float64)
    ax.bar(x + (i - 1) * width, values.mean(1), width, yerr=values.std(1), capsize=2,
           label=name)
  ax.set_xticks(x, labels, rotation=25, ha='right', fontsize=8)
  ax.set_ylabel('accuracy on held-out examples')
  ax.set_ylim(0, 1.2)
  ax.grid(axis='y', alpha=0.3)
  ax.legend(fontsize=8, loc='upper center', ncol=3)
  ax.set_title(f'{title}, final round (mean ± std over {num_seeds} seeds)', fontsize=10)
  fig.tight_layout()
  fig.savefig(f'{run_dir}/personalization.png')
  plt.close(fig)
  series = reporting.curves([{**r, 'algorithm': r['method']} for r in rows],
                            'personalized_accuracy_mean', ('algorithm',))
  reporting.plot_lines(f'{run_dir}/personalized_accuracy.png',
                       {k: (v[0], v[1]) for k, v in series.items()},
                       bands={k: v[2] for k, v in series.items()}, xlabel='round',
                       ylabel='personalized accuracy, mean over clients',
                       title=f'{title} (mean ± std over seeds)')


SHAKESPEARE_METHODS = ('fedavg', 'fedavg+ft', 'ditto', 'fedper')


def shakespeare_subset(data, num_clients: int, max_train: int, max_test: int):
  """The first `num_clients` roles with at least `max_train` training and `max_test`
  held-out sequences, each cut to its first `max_train` / `max_test` of them (the
  engine pays every client the step count of the largest, so equal sizes waste nothing)."""
  held = np.bincount(data.test_client, minlength=data.num_clients)
  chosen = np.flatnonzero((data.counts >= max_train) & (held >= max_test))[:num_clients]
  if chosen.size < num_clients:
    raise ValueError(f'only {chosen.size} Shakespeare roles have ≥ {max_train} training and '
                     f'≥ {max_test} held-out sequences; valid: num_clients ≤ {chosen.size}')
  train_rows = np.concatenate([np.arange(data.offsets[c], data.offsets[c] + max_train)
                               for c in chosen])
  test_rows = np.concatenate([np.flatnonzero(data.test_client == c)[:max_test] for c in chosen])
  return fs.FederatedData(
      train={k: v[train_rows] for k, v in data.train.items()},
      offsets=np.arange(num_clients, dtype=np.int64) * max_train,
      counts=np.full(num_clients, max_train, np.int64),
      test={k: v[test_rows] for k, v in data.test.items()},
      test_client=np.repeat(np.arange(num_clients, dtype=np.int32), max_test),
      num_classes=data.num_classes,
      name=f'Shakespeare, {num_clients} roles × {max_train} training / {max_test} held-out '
           'sequences')


def run_shakespeare(run_dir: str, *, quick: bool = False, seeds: int | None = None,
                    data_dir: str | None = None, progress: bool = False,
                    methods: Sequence[str] = SHAKESPEARE_METHODS, rounds: int | None = None,
                    num_clients: int | None = None, hidden_size: int | None = None) -> dict:
  """The reduced Shakespeare section (needs `fedjax-sync prepare shakespeare`).

  A one-layer character LSTM (`char_lstm`, `hidden_size` units; McMahan et al.'s has
  two of 256) on `num_clients` roles (default 64; quick 8), each cut to 32 training and
  8 held-out sequences of 80 characters (quick 8 / 4), 10 roles per round (quick 4),
  one local epoch of batch 4, client SGD lr 1 (Reddi et al. 2021's Shakespeare
  setting), server lr 1; FedAvg + FT fine-tunes for one epoch (8 steps) of the same.
  Methods: FedAvg, FedAvg + FT, Ditto, FedPer (the output Dense layer as the head).
  Accuracy is per sequence (next-character accuracy without PAD and EOS, averaged over
  a client's sequences), not FedJAX's token-weighted figure.
  """
  from fedjax_sync.data.shakespeare import shakespeare
  from fedjax_sync.models import char_lstm

  num_seeds = seeds or (2 if quick else 3)
  num_rounds = rounds or (2 if quick else 20)
  clients = num_clients or (8 if quick else 64)
  max_train, max_test = (8, 4) if quick else (32, 8)
  hidden = hidden_size or (16 if quick else 64)
  per_round = min(4 if quick else 10, clients)
  by_label = {m.label: m for m in METHODS}
  unknown = [m for m in methods if m not in SHAKESPEARE_METHODS]
  if unknown:
    raise ValueError(f'unknown Shakespeare method(s) {unknown}; valid: '
                     f'{", ".join(SHAKESPEARE_METHODS)}')
  data = shakespeare_subset(shakespeare(cache_dir=data_dir), clients, max_train, max_test)
  reporting.prepare_run_dir(run_dir)
  model = char_lstm((data.train['x'].shape[1],), data.num_classes, hidden_sizes=(hidden,))
  steps = max_train // 4
  config = fs.SimulationConfig(num_rounds=num_rounds, clients_per_round=per_round,
                               local_work=fs.LocalWork(batch_size=4, steps=steps),
                               eval_every=max(1, num_rounds // 2), per_client_eval=False)
  base = fs.Hyperparameters(client_learning_rate=1.0, server_learning_rate=1.0)
  reporting.write_config(run_dir, {
      'study': 'personalization', 'dataset': data.name, 'model': f'char_lstm ({hidden},)',
      'rounds': num_rounds, 'eval_every': config.eval_every, 'clients_per_round': per_round,
      'local_steps': steps, 'batch_size': 4, 'client_lr': 1.0, 'server_lr': 1.0,
      'finetune_steps': steps, 'seeds': list(range(num_seeds)), 'methods': list(methods),
      'ditto_lambda': base.ditto_lambda, 'quick': quick})
  rows, seconds = _run_methods(run_dir, model, data, config, base,
                               [by_label[m] for m in methods], num_seeds, steps, 4, 1.0,
                               progress)
  notes = (f'{data.name}; char_lstm with one LSTM layer of {hidden}; {num_seeds} seeds (mean ± '
           f'population std), round {num_rounds}; {per_round} roles per round, one epoch '
           f'({steps} steps) of batch 4, client SGD lr 1, server lr 1; FedAvg + FT: {steps} '
           'SGD steps of lr 1; Ditto λ = 0.1; FedPer: the output layer is personal. Accuracy: '
           'next-character accuracy (PAD and EOS excluded) averaged per sequence, then over '
           "a role's held-out sequences.")
  return _report(run_dir, 'Personalization on Shakespeare (reduced)', notes, rows, seconds,
                 list(methods), num_rounds, num_seeds)


if __name__ == '__main__':
  from fedjax_sync.cli import main
  sys.exit(main(['run', '--config', __file__] + sys.argv[1:]))
