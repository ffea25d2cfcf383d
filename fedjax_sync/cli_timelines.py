"""`fedjax-sync run` for the semi-asynchronous and dynamic-averaging timelines.

`cli.run` hands an algorithm whose registry timeline is not 'synchronous' here:
FedBuff, FedAsync, FedQS-SGD/Avg run on `SemiAsyncSimulator` with a simulated
clock from the clock flags; FDA, local SGD and the periodic FedAvgM/FedAdam run on
`AveragingSimulator`. Both are runners of the one driver, so checkpoints
(`--checkpoint-every`), `--resume`, the progress bar and `--tensorboard` work as for
synchronous runs. The data, model, `--hparam` and `--aggregator` flags mean what
they mean for synchronous runs, and the run directory has the same `config.json`
(plus `timeline` and, for asynchronous runs, `clock`) and `metrics.jsonl`: one
row per unit of the timeline with `round` = its 1-based index (a server
aggregation, or an FDA local step, also named `aggregation` / `step`), the
training metrics, and the evaluation metrics on the last row of each
`--eval-every` block (and, with `--tensorboard`, the same rows as event files).
`--seeds`/`--sweep` on an asynchronous algorithm vmap its engine over the members
(`Sweep` with an `AsyncConfig`; every member shares the clock of the run's clock
flags). Flags this path does not support (`--clients-per-round`; for FDA the
clock, local-work and sweep flags) are one-line errors naming the timeline, never
silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time


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
    'quick': '--quick applies to --config studies',
}
_NOT_FOR_ASYNC = {
    'clients_per_round': 'the server aggregates --hparam buffer_size=K updates; every client '
                         'is always training (concurrency = --num-clients)',
    **{flag: 'round policies end synchronous rounds; the server aggregates every '
             '--hparam buffer_size=K arrivals' for flag in POLICY_FLAGS},
}
_NOT_FOR_AVERAGING = {
    'seeds': 'seed sweeps vmap synchronous rounds and asynchronous aggregations, not FDA '
             'steps; run one --seed per run',
    'sweep': 'sweeps vmap synchronous rounds and asynchronous aggregations, not FDA steps',
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
  from fedjax_sync import cli_availability
  return clock_lib.make_clock(times, jitter=args.clock_jitter, dropout=args.dropout,
                              trace=cli_availability.trace(args, num_clients))


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


def run_timeline(args, given: set[str], timeline: str, *, resuming: bool = False) -> int:
  """Runs `args.algorithm` (semi_async or averaging timeline); the exit code.

  With `resuming`, `args` are the saved options of the run in `args.resume`
  (`cli._resumed_args`) and the run continues from its newest checkpoint."""
  import fedjax_sync as fs
  from fedjax_sync import cli, cli_personalization
  from fedjax_sync.algorithms.registry import (SEMI_ASYNC, build_algorithm,
                                               hyperparameter_values)
  from fedjax_sync.data.federated import data_fingerprint
  from fedjax_sync.data.registry import default_model
  from fedjax_sync.simulate.driver import first_nonfinite

  check_flags(args, given, timeline)
  from fedjax_sync import cli_availability
  cli_availability.check(args, given, timeline)   # --availability*: job starts; no --sampling
  if not resuming:
    default = os.path.join('runs', f'{args.algorithm}-{time.strftime("%Y%m%d-%H%M%S")}')
    new_dir = cli._NewRunDirectory(args.run_dir or default)   # noqa: SLF001 - the CLI's own helpers
    cli._absolute_data_paths(args)   # noqa: SLF001
  if args.dataset is None:
    args.dataset = 'synthetic'
  hparams = cli._hyperparameters(args, given)   # noqa: SLF001
  aggregator = cli._aggregator(args)   # noqa: SLF001
  from fedjax_sync import cli_sweeps
  # The sweep's keys and values are checked before anything depends on the data.
  sweep_plan = cli_sweeps.plan_sweep(args, given) if cli_sweeps.is_sweep(args) else None
  partition = cli._partition_settings(args)   # noqa: SLF001
  data = cli._load_data(args, partition)   # noqa: SLF001
  fingerprint = data_fingerprint(data)
  if resuming:
    cli._check_data_unchanged(args, fingerprint)   # noqa: SLF001
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
    record.update(cli_availability.record(args, synchronous=False))
    if sweep_plan is not None:   # --seeds/--sweep: every member in one vmapped program
      return cli_sweeps.run_sweep(
          args, sweep_plan, model=model, model_name=model_name,
          data=data, partition=cli._partition_record(partition),   # noqa: SLF001
          fingerprint=fingerprint, work=work, execution=execution, engine=engine,
          hparams=hparams, config=config, new_dir=None if resuming else new_dir,
          resuming=resuming, clock=clock,
          extra_record={'timeline': timeline, 'clock': record['clock'],
                        **cli_availability.record(args, synchronous=False)})
    simulator = fs.SemiAsyncSimulator(algorithm, model, data, clock, config,
                                      execution=execution)
  else:
    record['simulation'] = {'num_steps': args.rounds, 'batch_size': args.batch_size,
                            'eval_every': args.eval_every, 'seed': args.seed,
                            'worker_clients': list(range(hparams.num_workers)),
                            'rounds_are': 'local steps of every worker'}
    simulator = fs.AveragingSimulator(algorithm, model, data, num_steps=args.rounds,
                                      batch_size=args.batch_size, eval_every=args.eval_every,
                                      seed=args.seed, mesh=mesh)
  state = simulator.init(initial_params(model, args.seed))
  record['cli_args'] = {k: v for k, v in vars(args).items() if k != 'resume'}
  identity = {**simulator.identity(), 'model': model_name,
              'options': cli._identity_options(args)}   # noqa: SLF001
  hooks = cli_personalization.evaluation_hooks(args, simulator, model, data,
                                               hparams.client_learning_rate)

  def write_config(run_dir):
    with open(os.path.join(run_dir, 'config.json'), 'w') as f:
      json.dump(record, f, indent=2)

  # The one driver runs, checkpoints and resumes every timeline alike.
  run_dir, result = cli.execute_run(simulator, state, args,
                                    new_dir=None if resuming else new_dir, identity=identity,
                                    write_config=write_config, evaluation_hooks=hooks)
  final = result.final_eval
  if timeline == SEMI_ASYNC:
    unit = 'aggregations'
  else:
    unit = f'local steps ({int(result.state.num_syncs)} synchronizations)'
  nonfinite = next((row['round'] for row in result.history if first_nonfinite(row)), None)
  print(f'{args.algorithm} on {data.name}: test accuracy {float(final["test_accuracy"]):.4f}, '
        f'test loss {float(final["test_loss"]):.4f} after {args.rounds} {unit} '
        f'({result.run_seconds:.1f} s, compile {result.compile_seconds:.1f} s); results in '
        f'{run_dir}')
  if nonfinite is not None:
    print(f'fedjax-sync: error: the run became non-finite (NaN/Inf) at round {nonfinite}; see '
          'metrics.jsonl', file=sys.stderr)
    return cli.NONFINITE_RUN
  return 0


def initial_params(model, seed: int):
  """The drivers' initial params (`model.init(fold_in(key(seed), 2**31 − 1))`), computed
  as one compiled program rather than op by op (each eager op compiles on its own)."""
  import jax

  return jax.jit(model.init)(jax.random.fold_in(jax.random.key(seed), 2**31 - 1))
