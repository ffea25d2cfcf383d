"""`fedjax-sync run` for the semi-asynchronous and dynamic-averaging timelines.

`cli.run` hands an algorithm whose registry timeline is not 'synchronous' here:
FedBuff, FedAsync, FedQS-SGD/Avg run on `SemiAsyncSimulator` with a simulated
clock from the clock flags; FDA, local SGD and the periodic FedAvgM/FedAdam run on
`run_averaging`. The data, model, `--hparam` and `--aggregator` flags mean what
they mean for synchronous runs, and the run directory has the same `config.json`
(plus `timeline` and, for asynchronous runs, `clock`) and `metrics.jsonl`: one
row per unit of the timeline with `round` = its 1-based index (a server
aggregation, or an FDA local step, also named `aggregation` / `step`), the
training metrics, and the evaluation metrics on the last row of each
`--eval-every` block (and, with `--tensorboard`, the same rows as event files).
Flags this path does not support (checkpoints, `--resume`, `--seeds`/`--sweep`,
`--clients-per-round`, and for FDA the clock and local-work flags) are one-line
errors naming the timeline, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

# --clock NAME: how each client's job time is drawn (fedjax_sync.simulate.clock).
CLOCKS = ('constant', 'lognormal', 'speed_ratio')
CLOCK_FLAGS = ('clock', 'clock_sigma', 'speed_ratio', 'clock_jitter', 'dropout')
# How a synchronous round ends (fedjax_sync.simulate.clock round policies).
POLICY_FLAGS = ('deadline', 'first_m', 'over_selection')
CLOCK_DEFAULTS = {'clock': 'constant', 'clock_sigma': 1.0, 'speed_ratio': 10.0,
                  'clock_jitter': 0.0, 'dropout': 0.0, 'deadline': None, 'first_m': None,
                  'over_selection': None}

# Flags of synchronous runs that these timelines do not take, with the reason.
_NOT_SUPPORTED = {
    'checkpoint_every': 'checkpoints are not implemented for this timeline yet',
    'resume': 'checkpoints (hence --resume) are not implemented for this timeline yet',
    'seeds': 'seed sweeps run synchronous rounds only; run one --seed per run',
    'sweep': 'hyperparameter sweeps run synchronous rounds only',
    'quick': '--quick applies to --config studies',
}
_NOT_FOR_ASYNC = {
    'clients_per_round': 'the server aggregates --hparam buffer_size=K updates; every client '
                         'is always training (concurrency = --num-clients)',
    **{flag: 'round policies end synchronous rounds; the server aggregates every '
             '--hparam buffer_size=K arrivals' for flag in POLICY_FLAGS},
}
_NOT_FOR_AVERAGING = {
    'clients_per_round': 'all --hparam num_workers=K workers train every step',
    'local_steps': 'FDA timelines take one local step per unit; --rounds counts steps',
    'local_epochs': 'FDA timelines take one local step per unit; --rounds counts steps',
    **{flag: 'the dynamic-averaging timeline has no simulated clock'
       for flag in CLOCK_FLAGS + POLICY_FLAGS},
}


def _flag(dest: str) -> str:
  return '--' + dest.replace('_', '-')


def check_flags(args, given: set[str], timeline: str) -> None:
  """A one-line ValueError for the first flag given that `timeline` does not take."""
  from fedjax_sync.algorithms.registry import SEMI_ASYNC, SYNCHRONOUS

  if timeline == SYNCHRONOUS:
    used = [d for d in CLOCK_FLAGS + POLICY_FLAGS if d in given]
    if used and (getattr(args, 'seeds', None) or getattr(args, 'sweep', None)):
      raise ValueError(f'{_flag(used[0])} does not apply to --seeds/--sweep (the vmapped '
                       'sweep runs without a simulated clock yet); valid: one run per seed')
    policies = [d for d in POLICY_FLAGS if getattr(args, d, None) is not None]
    if len(policies) > 1:
      raise ValueError(f'{_flag(policies[0])} and {_flag(policies[1])} are two round '
                       'policies; valid: one of --deadline, --first-m, --over-selection')
    first = getattr(args, 'first_m', None)
    if first is not None and first > args.clients_per_round:
      raise ValueError(f'--first-m {first} exceeds --clients-per-round '
                       f'{args.clients_per_round}; valid: --first-m ≤ {args.clients_per_round}')
  else:
    extra = _NOT_FOR_ASYNC if timeline == SEMI_ASYNC else _NOT_FOR_AVERAGING
    for dest, why in {**_NOT_SUPPORTED, **extra}.items():
      if dest in given and getattr(args, dest, None) not in (None, False):
        raise ValueError(f'{_flag(dest)} does not apply to --algorithm {args.algorithm} (the '
                         f'{timeline} timeline): {why}')
  if timeline != 'averaging':
    clock = getattr(args, 'clock', 'constant')
    if 'clock_sigma' in given and clock != 'lognormal':
      raise ValueError(f'--clock-sigma applies to --clock lognormal, not {clock}')
    if 'speed_ratio' in given and clock != 'speed_ratio':
      raise ValueError(f'--speed-ratio applies to --clock speed_ratio, not {clock}')


def make_cli_clock(args, num_clients: int):
  """The `ClientClock` of the clock flags; base times drawn with `--seed`."""
  from fedjax_sync.simulate import clock as clock_lib

  if args.clock == 'constant':
    times = clock_lib.constant_times(num_clients)
  elif args.clock == 'lognormal':
    times = clock_lib.lognormal_times(num_clients, sigma=args.clock_sigma, seed=args.seed)
  else:
    times = clock_lib.speed_ratio_times(num_clients, args.speed_ratio, seed=args.seed)
  return clock_lib.make_clock(times, jitter=args.clock_jitter, dropout=args.dropout)


def clock_in_use(args) -> bool:
  """Whether the clock and policy flags ask for more than instant, always-there clients
  waiting for each other (what a synchronous round without a clock computes)."""
  return any(getattr(args, d, v) != v for d, v in CLOCK_DEFAULTS.items())


def synchronous_clock(args, algorithm, num_clients: int):
  """`(algorithm, clients to sample per round)`: the synchronous `algorithm` wrapped by
  `with_clock` with the flags' clock and round policy (`--deadline D`, `--first-m M`,
  `--over-selection F`: sample ⌈C (1 + F)⌉, keep the first C), or unchanged."""
  from fedjax_sync.simulate import clock as clock_lib

  if not clock_in_use(args):
    return algorithm, args.clients_per_round
  sampled, policy = args.clients_per_round, clock_lib.wait_for_all()
  if args.deadline is not None:
    policy = clock_lib.with_deadline(args.deadline)
  elif args.first_m is not None:
    policy = clock_lib.first_m(args.first_m)
  elif args.over_selection is not None:
    sampled, policy = clock_lib.over_selection(args.clients_per_round, args.over_selection)
    if sampled > num_clients:
      raise ValueError(f'--over-selection {args.over_selection} samples {sampled} clients per '
                       f'round, more than the {num_clients} clients of the data; valid: '
                       f'--clients-per-round × (1 + F) ≤ {num_clients}')
  clock = make_cli_clock(args, num_clients)
  return clock_lib.with_clock(algorithm, clock, policy), sampled


def synchronous_clock_record(args) -> dict:
  """`{'clock': ..., 'round_policy': ...}` for a synchronous run's config.json (empty
  without a clock)."""
  if not clock_in_use(args):
    return {}
  policy = {'kind': 'wait_all'}
  if args.deadline is not None:
    policy = {'kind': 'deadline', 'deadline': args.deadline}
  elif args.first_m is not None:
    policy = {'kind': 'first_m', 'min_updates': args.first_m}
  elif args.over_selection is not None:
    policy = {'kind': 'over_selection', 'fraction': args.over_selection,
              'keeps_first': args.clients_per_round}
  return {'clock': clock_record(args), 'round_policy': policy}


def clock_record(args) -> dict:
  record = {'model': args.clock, 'jitter': args.clock_jitter, 'dropout': args.dropout,
            'seed': args.seed}
  if args.clock == 'lognormal':
    record['sigma'] = args.clock_sigma
  if args.clock == 'speed_ratio':
    record['ratio'] = args.speed_ratio
  return record


def _limit(args, key: str, value: int, num_clients: int) -> None:
  if value > num_clients:
    raise ValueError(f'--hparam {key}={value} exceeds the {num_clients} clients of --dataset '
                     f'{args.dataset!r}; valid: {key} ≤ {num_clients} (or raise --num-clients)')


def run_timeline(args, given: set[str], timeline: str) -> int:
  """Runs `args.algorithm` (semi_async or averaging timeline); the exit code."""
  import fedjax_sync as fs
  from fedjax_sync import cli, reporting, sinks
  from fedjax_sync.algorithms.registry import (SEMI_ASYNC, build_algorithm,
                                               hyperparameter_values)
  from fedjax_sync.data.federated import data_fingerprint
  from fedjax_sync.data.registry import default_model
  from fedjax_sync.simulate.driver import first_nonfinite, warn_nonfinite

  check_flags(args, given, timeline)
  default = os.path.join('runs', f'{args.algorithm}-{time.strftime("%Y%m%d-%H%M%S")}')
  new_dir = cli._NewRunDirectory(args.run_dir or default)   # noqa: SLF001 - the CLI's own helpers
  cli._absolute_data_paths(args)   # noqa: SLF001
  if args.dataset is None:
    args.dataset = 'synthetic'
  hparams = cli._hyperparameters(args, given)   # noqa: SLF001
  aggregator = cli._aggregator(args)   # noqa: SLF001
  partition = cli._partition_settings(args)   # noqa: SLF001
  data = cli._load_data(args, partition)   # noqa: SLF001
  fingerprint = data_fingerprint(data)
  model_name = args.model or default_model(args.dataset)
  if args.chunk_size is not None and args.execution != 'chunked':
    raise ValueError(f"--chunk-size applies to --execution chunked, not {args.execution!r}")
  try:
    model = fs.models.get_model(model_name, data.train['x'].shape[1:], data.num_classes)
    cli._trace_model_on(model, cli._example_batch(data))   # noqa: SLF001
  except Exception as e:  # noqa: BLE001 - a model that cannot trace on this data
    raise cli._model_error(args, model_name, data, e) from None   # noqa: SLF001
  mesh = fs.client_mesh() if args.shard else None
  execution = fs.ClientExecution(args.execution, args.chunk_size, mesh).validate()
  engine = {'aggregator': aggregator} if aggregator is not None else {}
  if timeline == SEMI_ASYNC:
    _limit(args, 'buffer_size', hparams.buffer_size, data.num_clients)
  else:
    _limit(args, 'num_workers', hparams.num_workers, data.num_clients)
  try:
    algorithm = build_algorithm(args.algorithm, model.loss, hparams, timeline=timeline,
                                num_clients=data.num_clients, execution=execution, **engine)
  except ValueError as e:
    if aggregator is None:
      raise
    raise ValueError(f'--aggregator {args.aggregator!r} with --algorithm {args.algorithm}: '
                     f'{cli._one_line(e)}') from None   # noqa: SLF001

  record = {'command': 'run', 'algorithm': args.algorithm, 'timeline': timeline,
            'dataset': args.dataset, 'model': model_name, 'num_clients': data.num_clients,
            'data_seed': args.data_seed,
            'partition': cli._partition_record(partition),   # noqa: SLF001
            'data_fingerprint': fingerprint,
            'hyperparameters': hyperparameter_values(args.algorithm, hparams),
            'aggregator': args.aggregator,
            'execution': {'strategy': args.execution, 'chunk_size': args.chunk_size,
                          'devices': execution.num_shards}}
  if timeline == SEMI_ASYNC:
    steps = args.local_steps if (args.local_steps or args.local_epochs) else 20
    work = fs.LocalWork(batch_size=args.batch_size, epochs=args.local_epochs,
                        steps=None if args.local_epochs else steps)
    config = fs.simulate.AsyncConfig(
        num_aggregations=args.rounds, buffer_size=hparams.buffer_size, local_work=work,
        max_staleness=hparams.max_staleness, restart=hparams.restart,
        eval_every=args.eval_every, seed=args.seed)
    clock = make_cli_clock(args, data.num_clients)
    record['simulation'] = {**dataclasses.asdict(config), 'local_work': work._asdict(),
                            'rounds_are': 'server aggregations'}
    record['clock'] = clock_record(args)
    simulator = fs.SemiAsyncSimulator(algorithm, model, data, clock, config,
                                      execution=execution)
    state = simulator.init(initial_params(model, args.seed))
  else:
    record['simulation'] = {'num_steps': args.rounds, 'batch_size': args.batch_size,
                            'eval_every': args.eval_every, 'seed': args.seed,
                            'worker_clients': list(range(hparams.num_workers)),
                            'rounds_are': 'local steps of every worker'}
  record['cli_args'] = {k: v for k, v in vars(args).items() if k != 'resume'}

  with new_dir:
    run_dir = new_dir.create()
    with open(os.path.join(run_dir, 'config.json'), 'w') as f:
      json.dump(record, f, indent=2)
    if timeline == SEMI_ASYNC:
      result = simulator.run(state)
      rows = [{'round': row['aggregation'], **row} for row in result.history]
      final, unit = result.final_eval, 'aggregations'
    else:
      result = fs.simulate.run_averaging(
          algorithm, model, data, num_steps=args.rounds, batch_size=args.batch_size,
          eval_every=args.eval_every, seed=args.seed, mesh=mesh,
          params=initial_params(model, args.seed))
      rows = averaging_rows(result)
      final = rows[-1]
      unit = f'local steps ({int(result.state.num_syncs)} synchronizations)'
    reporting.write_metrics(run_dir, rows)
    if args.tensorboard:
      events = sinks.TensorBoardWriter(run_dir)
      try:
        for row in rows:
          events.write(row)
      finally:
        events.close()
  nonfinite = next((row['round'] for row in rows if first_nonfinite(row)), None)
  print(f'{args.algorithm} on {data.name}: test accuracy {float(final["test_accuracy"]):.4f}, '
        f'test loss {float(final["test_loss"]):.4f} after {args.rounds} {unit} '
        f'({result.run_seconds:.1f} s, compile {result.compile_seconds:.1f} s); results in '
        f'{run_dir}')
  if nonfinite is not None:
    key = first_nonfinite(next(r for r in rows if r['round'] == nonfinite))
    warn_nonfinite(nonfinite, key, 'non-finite')
    print(f'fedjax-sync: error: the run became non-finite (NaN/Inf) at round {nonfinite}; see '
          'metrics.jsonl', file=sys.stderr)
    return cli.NONFINITE_RUN
  return 0


def initial_params(model, seed: int):
  """The drivers' initial params (`model.init(fold_in(key(seed), 2**31 − 1))`), computed
  as one compiled program rather than op by op (each eager op compiles on its own)."""
  import jax

  return jax.jit(model.init)(jax.random.fold_in(jax.random.key(seed), 2**31 - 1))


def averaging_rows(result) -> list[dict]:
  """`metrics.jsonl` rows of a `run_averaging` result: one per local step (`round` =
  `step`, `train_loss`, `estimate`, `variance`, `synced`, cumulative `syncs`), with the
  evaluation (test metrics, bytes) on the last step of each block."""
  steps = result.steps
  syncs = np.cumsum(np.asarray(steps['synced'], np.int64))
  evaluations = {row['step']: row for row in result.history}
  rows = []
  for t in range(len(syncs)):
    row = {'round': t + 1, 'step': t + 1, 'train_loss': float(steps['loss'][t]),
           'synced': bool(steps['synced'][t]), 'syncs': int(syncs[t])}
    for name in steps:
      if name not in ('loss', 'synced') and np.ndim(steps[name][t]) == 0:
        row[name] = float(steps[name][t])
    if t + 1 in evaluations:
      row.update({k: v for k, v in evaluations[t + 1].items()
                  if k not in ('step', 'syncs', 'train_loss')})
    rows.append(row)
  return rows
