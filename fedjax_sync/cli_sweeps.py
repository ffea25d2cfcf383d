"""`fedjax-sync run --seeds N` and `--sweep KEY=V1,V2,...`: many members, one compiled program.

A sweep run trains every member of the grid `seeds × values` (seeds `--seed`,
`--seed + 1`, ..., `--seed + N − 1`; the data stay fixed by `--data-seed`) as one
vmapped program (`fedjax_sync.simulate.sweep.Sweep`) and writes one run directory:

  RUN_DIR/config.json                     the whole run, its members listed
  RUN_DIR/members/<label>/config.json     what a single `fedjax-sync run` of that
                                          member would write (its seed, its values)
  RUN_DIR/members/<label>/metrics.jsonl   that member's rows, appended after each block

Labels name the swept values, then the seed: `seed=1`,
`client_learning_rate=0.1,seed=0`. Member `seed=s` computes what `fedjax-sync run
--seed s` computes (to float tolerance: the vmapped program may fuse differently).
`fedjax-sync plot RUN_DIR` draws the members, seeds of one configuration as mean ± std.

Only hyperparameters the algorithm uses as arrays can be swept in one program
(learning rates); a key used in Python control flow is an error naming the keys
that can. Sweeps run synchronous rounds and are not checkpointed yet.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import NamedTuple

from fedjax_sync.simulate.sweep import MEMBERS_DIR, member_label

# `Sweep` draws each member's keys from a seed in [0, 2**31).
MAX_SWEEP_SEED = 2**31 - 1
# The clock and round-policy flags of `run` (a sweep takes none of them yet).
_CLOCK_FLAGS = ('clock', 'clock_sigma', 'speed_ratio', 'clock_jitter', 'dropout', 'deadline',
                'first_m', 'over_selection')


def sweep_assignment(text: str) -> str:
  """`KEY=V1,V2,...` with spaces removed (the values are typed later, per algorithm)."""
  key, sep, values = text.partition('=')
  key = key.strip()
  items = [v.strip() for v in values.split(',')]
  if not sep or not key.isidentifier() or not all(items):
    raise argparse.ArgumentTypeError(
        f'{text!r} is not KEY=V1,V2,...; valid: e.g. client_learning_rate=0.05,0.1 (keys: '
        'fedjax-sync list --algorithm NAME)')
  return f'{key}={",".join(items)}'


def is_sweep(args) -> bool:
  """Whether `run` was asked for several members (`--seeds` or `--sweep`)."""
  return bool(getattr(args, 'seeds', None) or getattr(args, 'sweep', None))


def _sweep_flags(args) -> str:
  flags = []
  if getattr(args, 'seeds', None):
    flags.append(f'--seeds {args.seeds}')
  flags += [f'--sweep {s}' for s in getattr(args, 'sweep', None) or []]
  return ' '.join(flags)


def check_options(args) -> None:
  """Options a sweep cannot take yet: one-line errors, never silently ignored."""
  if not is_sweep(args):
    return
  from fedjax_sync.algorithms.registry import (AVERAGING, SEMI_ASYNC, SYNCHRONOUS, algorithm_names,
                                               algorithm_timeline)
  timeline = algorithm_timeline(args.algorithm)
  if timeline == AVERAGING:
    vmappable = algorithm_names(SYNCHRONOUS) + algorithm_names(SEMI_ASYNC)
    raise ValueError(f'{_sweep_flags(args)} with --algorithm {args.algorithm}: sweeps run the '
                     f'synchronous and semi-asynchronous timelines, and {args.algorithm} runs on '
                     f'the {timeline} timeline; valid: {", ".join(vmappable)}, or one '
                     f'fedjax-sync run per seed/value of {args.algorithm}')
  if getattr(args, 'shard', False):
    raise ValueError(f'--shard with {_sweep_flags(args)}: a sweep vmaps its members on one '
                     'device set and cannot shard clients; valid: drop --shard')
  from fedjax_sync.cli import _flag, _run_options, build_parser
  defaults = {dest: action.default for dest, action in _run_options(build_parser()).items()}
  for dest in _CLOCK_FLAGS if timeline == SYNCHRONOUS else ():
    if dest in defaults and getattr(args, dest, defaults[dest]) != defaults[dest]:
      raise ValueError(f'{_flag(dest)} does not apply to --seeds/--sweep ({_sweep_flags(args)}): '
                       'sweeps do not simulate a clock or round policy yet (each seed would draw '
                       f'its own clock); valid: drop {_flag(dest)}, or one fedjax-sync run per '
                       'seed/value')


class SweepPlan(NamedTuple):
  """The members of a sweep run: `seeds × values` (every key's values, in key order)."""
  seeds: list[int]
  values: dict[str, list[float]]


def sweepable_keys(algorithm: str) -> list[str]:
  """The algorithm's float hyperparameters: the keys `--sweep` may name (if they trace)."""
  from fedjax_sync.algorithms.registry import algorithm_hyperparameters
  return [h.name for h in algorithm_hyperparameters(algorithm) if h.type is float]


def plan_sweep(args, given: set[str] = frozenset()) -> SweepPlan:
  """The seeds and swept values of `args`, checked against `--algorithm`'s hyperparameters.

  Raises:
    ValueError (one line): a sweep that cannot run (see `check_options`), a seed out of
      range, an unknown or non-float key (naming the valid ones), a key also set by
      `--hparam` or its dedicated flag, a bad or repeated value.
  """
  from fedjax_sync.algorithms.registry import algorithm_hyperparameters

  check_options(args)
  count = args.seeds or 1
  last = args.seed + count - 1
  if last > MAX_SWEEP_SEED:
    raise ValueError(f'--seed {args.seed} with --seeds {count}: the last member seed would be '
                     f'{last}; valid: --seed + --seeds − 1 ≤ {MAX_SWEEP_SEED} (a sweep draws its '
                     'keys from seeds below 2^31)')
  seeds = list(range(args.seed, args.seed + count))
  specs = {h.name: h for h in algorithm_hyperparameters(args.algorithm)}
  valid = sweepable_keys(args.algorithm)
  from fedjax_sync.cli import _HYPERPARAMETER_FLAGS, _flag   # the dedicated flags of run
  fixed = {item.partition('=')[0] for item in getattr(args, 'hparam', None) or []}
  fixed |= {field for dest, field in _HYPERPARAMETER_FLAGS.items() if dest in given}
  values: dict[str, list[float]] = {}
  for item in getattr(args, 'sweep', None) or []:
    key, _, texts = item.partition('=')
    if key not in valid:
      what = (f'is a {specs[key].type.__name__} hyperparameter of {args.algorithm}'
              if key in specs else f'is not a hyperparameter of {args.algorithm}')
      raise ValueError(f'--sweep {item}: {key!r} {what}; valid --sweep keys for '
                       f'{args.algorithm}: {", ".join(valid) or "none"}')
    if key in values:
      raise ValueError(f'--sweep {key} is given twice; valid: each key once, its values '
                       f'comma-separated (--sweep {key}=V1,V2,...)')
    if key in fixed:
      flags = {field: dest for dest, field in _HYPERPARAMETER_FLAGS.items()}
      setter = _flag(flags[key]) if key in flags and flags[key] in given else f'--hparam {key}'
      raise ValueError(f'--sweep {item} and {setter} both set {key}; give one of them')
    parsed = []
    for text in texts.split(','):
      try:
        parsed.append(specs[key].parse(text))
      except ValueError as e:
        raise ValueError(f'--sweep {item}: {" ".join(str(e).split())}') from None
    repeated = sorted({v for v in parsed if parsed.count(v) > 1})
    if repeated:
      raise ValueError(f'--sweep {item}: the value {repeated[0]!r} is given twice; valid: '
                       'distinct values')
    values[key] = parsed
  return SweepPlan(seeds, values)




def member_run_dirs(run_dirs: list[str]) -> list[str]:
  """`run_dirs` with each sweep run directory replaced by its members' directories."""
  out = []
  for d in run_dirs:
    members = os.path.join(d, MEMBERS_DIR)
    if not os.path.isfile(os.path.join(d, 'metrics.jsonl')) and os.path.isdir(members):
      out += [os.path.join(members, m) for m in sorted(os.listdir(members))
              if os.path.isfile(os.path.join(members, m, 'metrics.jsonl'))]
    else:
      out.append(d)
  return out


def _untraceable_error(args, sweep, error: ValueError) -> ValueError:
  """The one-line error of a key the algorithm cannot trace, naming the keys it can."""
  swept = list(sweep.settings[0])
  swept.remove('seed')
  culprits = sweep.untraceable_hyperparameters() or swept
  candidates = sweepable_keys(args.algorithm)
  bad = set(sweep.untraceable_hyperparameters(candidates))
  valid = [k for k in candidates if k not in bad]
  return ValueError(
      f'--sweep {", ".join(culprits)}: {args.algorithm} uses {" and ".join(culprits)} as a '
      'Python value (control flow or a static shape), so it cannot be swept in one compiled '
      f'program; valid --sweep keys for {args.algorithm}: {", ".join(valid) or "none"} (or one '
      f'run per value with --hparam {culprits[0]}=V)')


def run_sweep(args, plan: SweepPlan, *, model, model_name: str, data, partition, fingerprint,
              work, execution, engine: dict, hparams, config, new_dir=None,
              resuming: bool = False, clock=None, extra_record: dict | None = None) -> int:
  """Runs the members of `plan` as one `Sweep` and writes the run directory (see module doc).

  `config` is a `SimulationConfig` (synchronous rounds) or an `AsyncConfig` with the
  `clock` (semi-asynchronous aggregations). With `--checkpoint-every` the whole sweep
  is checkpointed; `resuming` continues the sweep in `args.resume`.
  """
  import numpy as np

  from fedjax_sync.algorithms.registry import hyperparameter_values
  from fedjax_sync.cli import NONFINITE_RUN, _identity_options, _model_error, execute_run
  from fedjax_sync.simulate.driver import first_nonfinite
  from fedjax_sync.simulate.sweep import _TRACER_ERRORS, Sweep, registered_algorithm

  build = registered_algorithm(args.algorithm, model.loss, hparams, timeline=None,
                               num_clients=data.num_clients, execution=execution, **engine)
  sweep = Sweep(build, model, data, config, seeds=plan.seeds, hyperparameters=plan.values,
                execution=execution, clock=clock)
  labels = [member_label(s) for s in sweep.settings]
  cli_args = {k: v for k, v in vars(args).items() if k != 'resume'}
  identity = {**sweep.identity(), 'algorithm': args.algorithm, 'model': model_name,
              'options': _identity_options(args)}

  def record(setting, run_dir, options):
    return {'command': 'run', 'algorithm': args.algorithm, 'dataset': args.dataset,
            'model': model_name, 'num_clients': data.num_clients,
            'data_seed': args.data_seed, 'partition': partition,
            'data_fingerprint': fingerprint,
            'hyperparameters': hyperparameter_values(
                args.algorithm, dataclasses.replace(hparams, **{
                    k: v for k, v in setting.items() if k != 'seed'})),
            'aggregator': args.aggregator,
            'simulation': {**dataclasses.asdict(config), 'seed': setting['seed'],
                           'local_work': work._asdict()},
            **(extra_record or {}),
            'execution': {'strategy': args.execution, 'chunk_size': args.chunk_size,
                          'devices': execution.num_shards},
            'cli_args': {**options, 'run_dir': run_dir}}

  def write_configs(run_dir):
    members = []
    for setting, label in zip(sweep.settings, labels):
      member_dir = os.path.join(run_dir, MEMBERS_DIR, label)
      os.makedirs(member_dir, exist_ok=True)
      # What `fedjax-sync run` of this member alone would be given and would write.
      hparam = (args.hparam or []) + [f'{k}={v!r}' for k, v in setting.items() if k != 'seed']
      options = {**cli_args, 'seed': setting['seed'], 'seeds': None, 'sweep': None,
                 'hparam': hparam or None}
      with open(os.path.join(member_dir, 'config.json'), 'w') as f:
        json.dump(record(setting, member_dir, options), f, indent=2)
      members.append({'label': label, 'run_dir': os.path.join(MEMBERS_DIR, label), **setting})
    top = record({'seed': args.seed}, run_dir, cli_args)
    top.update(members=members, sweep={'seeds': plan.seeds, 'hyperparameters': plan.values})
    with open(os.path.join(run_dir, 'config.json'), 'w') as f:
      json.dump(top, f, indent=2)

  try:
    try:
      states = sweep.init()
    except TypeError as e:
      raise _model_error(args, model_name, data, e) from None
    # The driver appends each member's rows to members/<label>/metrics.jsonl; the whole
    # sweep is checkpointed and resumed as one run.
    run_dir, result = execute_run(sweep, states, args, new_dir=new_dir, identity=identity,
                                  write_config=write_configs)
  except ValueError as e:
    if isinstance(e.__cause__, _TRACER_ERRORS):
      raise _untraceable_error(args, sweep, e) from None
    raise

  accuracy = np.array([float(f['test_accuracy']) for f in result.final_evals])
  loss = np.array([float(f['test_loss']) for f in result.final_evals])
  if len(labels) > 1:
    for label, a, l in zip(labels, accuracy, loss):
      print(f'  {label}: test accuracy {a:.4f}, test loss {l:.4f}')
  print(f'{args.algorithm} on {data.name}, {len(labels)} members in one program: test accuracy '
        f'{accuracy.mean():.4f} ± {accuracy.std():.4f}, test loss {loss.mean():.4f} ± '
        f'{loss.std():.4f} (mean ± std) after {args.rounds} {sweep.unit}s '
        f'({result.run_seconds:.1f} s, '
        f'compile {result.compile_seconds:.1f} s); results in '
        f'{os.path.join(run_dir, MEMBERS_DIR)}')
  diverged = []
  for label, history, final in zip(labels, result.histories, result.final_evals):
    bad = next((row['round'] for row in history if first_nonfinite(row)), None)
    if bad is None and not (np.isfinite(float(final['test_loss']))):
      bad = args.rounds
    if bad is not None:
      diverged.append(f'{label} at round {bad}')
  if diverged:
    print(f'fedjax-sync: error: member(s) became non-finite (NaN/Inf): {"; ".join(diverged)}; '
          'see their metrics.jsonl', file=sys.stderr)
    return NONFINITE_RUN
  return 0
