"""Tuning the client learning rate by hypergradient descent through R federated rounds.

A round of fedjax-sync is a pure function, so the validation loss of the global model
after R rounds of FedAvg, L(η), is a differentiable function of the client learning
rate η (docs/differentiable_rounds.md). This study descends it in θ = log η:

    g = dL(w_R(e^θ)) / dθ      (jax.grad through sampling, R rounds of local SGD and
                                the server steps: unrolled differentiation, as in
                                Maclaurin et al. 2015, arXiv 1502.03492)
    θ ← θ − Adam(g)            (a few outer steps; Adam makes the step size in log η
                                independent of the hypergradient's scale)

starting from a deliberately small η. Hypergradient descent in Baydin et al. 2018
(arXiv 1703.04782) adapts η online from one step's derivative; here each
hypergradient sees the whole R-round run, with the same clients, batches and keys in
every outer step (drawn once on the host), so the outer loop descends one fixed
function. The held-out examples are split in two: the validation half drives the
tuning, the test half only reports it.

Data: FedProx's Synthetic(1, 1) (default) or scikit-learn's 8×8 digits (Dirichlet
α = 0.5), multinomial logistic regression. Run:

    python experiments/hypergradient.py [--quick] [--dataset digits] [--run-dir DIR]

It prints a table of (outer step, η, validation loss, test loss, hypergradient) and
the tuned η (the outer step of lowest validation loss) and, with a run directory,
writes config.json, metrics.jsonl and summary.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sync as fs

DATASETS = ('synthetic', 'digits')


def _settings(quick: bool) -> dict:
  if quick:
    return dict(num_clients=10, rounds=4, clients_per_round=5, local_steps=5, batch_size=10,
                outer_steps=6, initial_learning_rate=0.003, outer_learning_rate=0.7)
  return dict(num_clients=30, rounds=10, clients_per_round=10, local_steps=10, batch_size=10,
              outer_steps=15, initial_learning_rate=0.003, outer_learning_rate=0.3)


def _load(dataset: str, num_clients: int):
  if dataset == 'synthetic':
    data = fs.data.synthetic(1.0, 1.0, num_clients=num_clients, seed=0)
    return data, fs.models.logistic_regression(data.train['x'].shape[1:], data.num_classes)
  if dataset == 'digits':
    data = fs.data.digits(num_clients, partition='dirichlet', alpha=0.5, seed=0)
    return data, fs.models.logistic_regression(data.train['x'].shape[1:], data.num_classes)
  raise ValueError(f'unknown dataset {dataset!r}; valid: {", ".join(DATASETS)}')


def _split_held_out(test: dict, seed: int) -> tuple[dict, dict]:
  """The held-out examples cut into a validation half and a test half."""
  n = len(test['y'])
  order = np.random.default_rng(seed).permutation(n)
  half = n // 2
  take = lambda rows: {k: jnp.asarray(v[rows]) for k, v in test.items()}  # noqa: E731
  return take(order[:half]), take(order[half:])


def draw_rounds(data, cfg: dict, seed: int) -> fs.ClientBatch:
  """The clients and local batches of every round, drawn once on the host.

  Round r samples `clients_per_round` distinct clients; each trains `local_steps`
  batches of `batch_size` from a shuffle of its own examples (repeated when it has
  fewer). Returns one `ClientBatch` with leaves `[R, C, S, B, ...]`: every evaluation
  of the objective replays exactly these rounds, so the outer loop descends one fixed
  function of η.
  """
  rng = np.random.default_rng(seed)
  slots = cfg['local_steps'] * cfg['batch_size']
  rounds = []
  for _ in range(cfg['rounds']):
    ids = np.sort(rng.choice(data.num_clients, cfg['clients_per_round'], replace=False))
    examples = []
    for k in ids:
      own = data.client(int(k))
      rows = np.resize(rng.permutation(len(own['y'])), slots)
      examples.append({name: values[rows] for name, values in own.items()})
    batch = fs.data.client_batch_from_arrays(examples, batch_size=cfg['batch_size'],
                                             num_steps=cfg['local_steps'])
    rounds.append(batch._replace(
        client_ids=jnp.asarray(ids, jnp.int32),
        weight=jnp.asarray(np.minimum(data.counts[ids], slots), jnp.float32)))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *rounds)


def make_objective(model, params, rounds: fs.ClientBatch, validation: dict, test: dict):
  """`loss(log_lr) -> (validation loss, test loss)` of the global model after the
  FedAvg rounds `rounds` (leaves `[R, ...]`) from `params`, with client learning rate
  `exp(log_lr)`. The algorithm is built inside the function, so the learning rate is
  a traced value; the rounds run in one `lax.scan`."""
  num_rounds = rounds.weight.shape[0]

  def objective(log_lr):
    algorithm = fs.fed_avg(model.loss, optax.sgd(jnp.exp(log_lr)))

    def one_round(state, round_input):
      batch, r = round_input
      state, _ = algorithm.round(state, batch, jax.random.fold_in(jax.random.key(0), r))
      return state, None

    state, _ = jax.lax.scan(one_round, algorithm.init(params),
                            (rounds, jnp.arange(num_rounds)))
    mean_loss = lambda split: jnp.mean(model.evaluate(state.params, split)[0])  # noqa: E731
    return mean_loss(validation), mean_loss(test)

  return objective


def tune(objective, cfg: dict) -> list[dict]:
  """Runs the outer loop; one row per outer step (η and the losses before the step),
  plus a last row for the tuned η."""
  hypergradient = jax.jit(jax.value_and_grad(objective, has_aux=True))
  outer = optax.adam(cfg['outer_learning_rate'])

  @jax.jit
  def outer_step(grad, outer_state, log_lr):
    updates, outer_state = outer.update(grad, outer_state)
    return optax.apply_updates(log_lr, updates), outer_state

  log_lr = jnp.asarray(math.log(cfg['initial_learning_rate']), jnp.float32)
  outer_state = outer.init(log_lr)
  rows = []
  for step in range(cfg['outer_steps'] + 1):
    (validation_loss, test_loss), grad = hypergradient(log_lr)
    row = {'outer_step': step, 'client_learning_rate': math.exp(float(log_lr)),
           'validation_loss': float(validation_loss), 'test_loss': float(test_loss),
           'hypergradient': float(grad)}
    if not all(math.isfinite(v) for v in row.values()):
      raise FloatingPointError(f'outer step {step}: a non-finite loss or hypergradient at '
                               f'client lr {row["client_learning_rate"]:.4g} ({row}); lower '
                               'outer_learning_rate or the number of rounds')
    rows.append(row)
    if step == cfg['outer_steps']:
      break
    log_lr, outer_state = outer_step(grad, outer_state, log_lr)
  return rows


def format_table(rows: list[dict]) -> str:
  lines = [f'{"outer step":>10}  {"client lr":>10}  {"val loss":>9}  {"test loss":>9}  '
           f'{"dL/dlog lr":>11}']
  for r in rows:
    lines.append(f'{r["outer_step"]:>10}  {r["client_learning_rate"]:>10.4g}  '
                 f'{r["validation_loss"]:>9.4f}  {r["test_loss"]:>9.4f}  '
                 f'{r["hypergradient"]:>11.4g}')
  return '\n'.join(lines)


def run(run_dir: str | None = None, *, quick: bool = False, dataset: str | None = None,
        seeds: int | None = 1, progress: bool = True, **overrides) -> dict:
  """Tunes the client learning rate for each seed; returns the headline.

  Args:
    run_dir: where to write config.json, metrics.jsonl and summary.md (None: print only).
    quick: the small setting (4 rounds, 6 outer steps; < 20 s on a 2-core CPU).
    dataset: 'synthetic' (default) or 'digits'.
    seeds: number of seeds (initial model, sampled clients and batches).
    progress: print the table of each seed.
    overrides: any key of the settings (rounds, outer_steps, initial_learning_rate, ...).
  """
  dataset = dataset or 'synthetic'
  seeds = seeds or 1
  if not isinstance(seeds, int) or seeds < 1:
    raise ValueError(f'seeds must be a positive integer, got {seeds!r}')
  cfg = _settings(quick)
  unknown = set(overrides) - set(cfg)
  if unknown:
    raise ValueError(f'unknown setting(s) {sorted(unknown)}; valid: {sorted(cfg)}')
  cfg.update(overrides)
  data, model = _load(dataset, cfg['num_clients'])
  validation, test = _split_held_out(data.test, seed=0)
  all_rows, table, started = [], [], time.perf_counter()
  for seed in range(seeds):
    params = jax.jit(model.init)(jax.random.key(seed))
    objective = make_objective(model, params, draw_rounds(data, cfg, seed), validation, test)
    rows = tune(objective, cfg)
    for row in rows:
      row['seed'] = seed
    all_rows += rows
    # The tuned η is the one of lowest validation loss among the outer steps (the last
    # when the descent is monotone; long horizons make the hypergradient erratic).
    first, best = rows[0], min(rows, key=lambda r: r['validation_loss'])
    table.append([seed, first['client_learning_rate'], best['client_learning_rate'],
                  first['validation_loss'], best['validation_loss'], first['test_loss'],
                  best['test_loss']])
    if progress:
      print(f'seed {seed} ({data.name}, {cfg["rounds"]} rounds of FedAvg per evaluation):')
      print(format_table(rows))
      print(f'tuned: client lr {best["client_learning_rate"]:.4g} (outer step '
            f'{best["outer_step"]}), validation loss {first["validation_loss"]:.4f} -> '
            f'{best["validation_loss"]:.4f}, test loss {first["test_loss"]:.4f} -> '
            f'{best["test_loss"]:.4f}')
  seconds = time.perf_counter() - started
  headline = {
      'dataset': data.name, 'seconds': round(seconds, 2),
      'initial_learning_rate': cfg['initial_learning_rate'],
      'tuned_learning_rate': float(np.mean([r[2] for r in table])),
      'validation_loss_before': float(np.mean([r[3] for r in table])),
      'validation_loss_after': float(np.mean([r[4] for r in table])),
      'test_loss_before': float(np.mean([r[5] for r in table])),
      'test_loss_after': float(np.mean([r[6] for r in table])),
  }
  if run_dir is not None:
    fs.reporting.prepare_run_dir(run_dir, allow_existing=True)
    fs.reporting.write_config(run_dir, {'study': 'hypergradient', 'dataset': dataset,
                                        'quick': quick, 'seeds': seeds, **cfg})
    fs.reporting.write_metrics(run_dir, all_rows)
    fs.reporting.write_summary(
        run_dir, f'Hypergradient descent on the client learning rate ({data.name})',
        ['seed', 'lr before', 'lr after', 'val loss before', 'val loss after',
         'test loss before', 'test loss after'], table,
        notes=f'{cfg["outer_steps"]} outer Adam steps (lr {cfg["outer_learning_rate"]}) on '
              f'log η; "after" is the outer step of lowest validation loss. Each step '
              f'evaluates {cfg["rounds"]} FedAvg rounds of '
              f'{cfg["clients_per_round"]} clients × {cfg["local_steps"]} local steps. '
              f'{seconds:.1f} s in all.')
  return headline


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true', help='the small setting (< 20 s)')
  parser.add_argument('--dataset', choices=DATASETS, default='synthetic')
  parser.add_argument('--seeds', type=int, default=1)
  parser.add_argument('--run-dir', default=None, help='write config.json, metrics.jsonl, '
                      'summary.md there')
  args = parser.parse_args(argv)
  headline = run(args.run_dir, quick=args.quick, dataset=args.dataset, seeds=args.seeds)
  print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in headline.items()})
  return 0


if __name__ == '__main__':
  sys.exit(main())
