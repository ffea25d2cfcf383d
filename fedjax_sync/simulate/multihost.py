"""Many hosts: JAX's multi-controller runtime with the client axis over a global mesh.

Every host runs the same program (SPMD, one process per host or per GPU):

    import fedjax_sync as fs
    from fedjax_sync.simulate import multihost

    multihost.initialize()        # jax.distributed.initialize (+ gloo on CPU)
    mesh = fs.client_mesh()       # all devices of all processes, axis 'clients'
    execution = fs.ClientExecution('vmap', mesh=mesh)
    algorithm = fs.fed_avg(model.loss, optax.sgd(0.1), execution=execution)
    sim = multihost.MultiHostSimulator(algorithm, model, data, config, execution=execution)
    result = sim.run(sim.init())  # metrics.jsonl and the progress bar on process 0

Every timeline of the one driver runs the same way: `multihost(runner)` turns a
`SemiAsyncSimulator` (FedBuff, FedAsync, FedQS; built with the mesh's execution)
or an `AveragingSimulator` (FDA; `mesh=`) into a `MultiHost` runner of the same
class, and `run_with_checkpoints` checkpoints and resumes it on every process.

Data placement (the simple, valid mode implemented by `MultiHost`): every
process holds the same `FederatedData` (load it from the same files with the same
seed) and the same run key, so every process samples the same clients (or the
same K earliest finishers, or the same worker batches) and builds the same
`[C, S, B, ...]` input inside the compiled block; XLA's SPMD partitioner then keeps
only each device's `C / D` clients' slice, so each device trains only its own
clients, and the weighted mean is an all-reduce over the 'clients' axis. The
state is replicated on every device (outputs XLA leaves sharded are all-gathered
after each block); metrics and evaluation are computed identically on every
process. This costs host memory (the dataset on every host) but no data movement
per round.

Feeding each process only its own clients' data (`process_local_client_batch`, via
`jax.make_array_from_process_local_data`) is the building block for datasets too
large to replicate: each process builds the batch of its own clients `[C / P, ...]`
and the global `[C, ...]` array is assembled without copying; pass it to
`jax.jit(algorithm.round)` yourself.

Launch:

* TPU pod slice: run the same script on every host of the slice, e.g.
  `gcloud compute tpus tpu-vm ssh NAME --worker=all --command="python run.py"`;
  `jax.distributed.initialize()` needs no arguments there (it reads the TPU
  metadata); `client_mesh()` spans every chip of the slice.
* GPU cluster with SLURM: `srun --ntasks-per-node=<GPUs per node> python run.py`;
  `jax.distributed.initialize()` reads the SLURM environment (one process per GPU).
  Without SLURM pass `coordinator_address='host0:1234', num_processes=P,
  process_id=i` on each process (and `local_device_ids` for one GPU per process).
* CPU hosts (and the test): as above with explicit arguments; `initialize` selects
  the gloo CPU collectives.

The number of clients per round must be a multiple of the global device count
(pad with zero-weight clients: done by `Simulator.sample_round`).
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_sync.clients.execution import CLIENT_AXIS
from fedjax_sync.simulate.rounds import Simulator
from fedjax_sync.types import ClientBatch


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               local_device_ids: Sequence[int] | None = None,
               cpu_collectives: str = 'gloo') -> None:
  """`jax.distributed.initialize`, with CPU collectives selected for CPU-only runs.

  Call it first thing, on every process, before any other JAX call. On TPU pods and
  SLURM clusters all arguments may be omitted.

  Args:
    coordinator_address: 'host:port' of process 0.
    num_processes: total number of processes.
    process_id: this process's index in `[0, num_processes)`.
    local_device_ids: the local devices this process uses (e.g. one GPU each).
    cpu_collectives: the CPU collectives implementation ('gloo' or 'mpi'), used
      when the platform is CPU (cross-process all-reduces need one).
  """
  valid = ('gloo', 'mpi')
  if cpu_collectives not in valid:
    raise ValueError(f'cpu_collectives must be one of {valid}, got {cpu_collectives!r}')
  jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             local_device_ids=local_device_ids)


def is_primary() -> bool:
  """True on process 0 (the one that writes files and shows progress)."""
  return jax.process_index() == 0


def replicate_global(tree: Any, mesh: Mesh) -> Any:
  """Host values (identical on every process) → arrays replicated over the global mesh."""
  sharding = NamedSharding(mesh, P())

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
  """Replicated global arrays → host numpy (every process gets the full value)."""

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError(f'array of shape {x.shape} is sharded across processes; '
                         'only replicated arrays can be read on one host')
      x = x.addressable_data(0)
    return np.asarray(x)

  return jax.tree.map(get, tree)


def process_local_client_batch(local: ClientBatch, mesh: Mesh) -> ClientBatch:
  """Assembles a global `[C, ...]` ClientBatch from each process's own clients.

  Process p passes the batch of its own `C / P` clients (in process order, clients
  of process 0 first); the result is sharded over the 'clients' axis of `mesh`
  (`jax.make_array_from_process_local_data`, no cross-host copy).
  """
  sharding = NamedSharding(mesh, P(CLIENT_AXIS))
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local)


def _runner_mesh(runner) -> Mesh | None:
  """The mesh a runner's compiled programs shard the clients over."""
  execution = getattr(runner, 'execution', None)
  mesh = getattr(execution, 'mesh', None)
  return mesh if mesh is not None else getattr(runner, 'mesh', None)


@functools.lru_cache(maxsize=None)
def _gather_program(mesh: Mesh):
  """One jitted identity whose outputs are replicated over `mesh` (compiled once per
  tree structure, shapes and input shardings)."""
  return jax.jit(lambda tree: tree, out_shardings=NamedSharding(mesh, P()))


def _replicated(tree: Any, mesh: Mesh) -> Any:
  """`tree` with its global arrays replicated over `mesh` (all-gathered when not).

  The synchronous blocks already return replicated outputs; the other runners let
  XLA choose (per-client metrics come back sharded over the clients), and both the
  host and the next block (compiled for a replicated state) need them replicated.
  """
  leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  if all(x.sharding.is_fully_replicated for x in leaves):
    return tree
  return _gather_program(mesh)(tree)


class MultiHost:
  """Mixin: a runner of the one driver whose state lives on a multi-process mesh.

  Put it before the runner class (`class X(MultiHost, SemiAsyncSimulator)`), or
  let `multihost(runner)` do it for an existing runner. Every process holds the
  same dataset, config and seed and makes the same calls (module docstring). On
  top of the runner it:

  * replicates the initial state over the global mesh (`init`);
  * keeps the state replicated after every block and brings the metrics to the
    host (`run_units`), so the driver reads them on every process;
  * evaluates the host copy of the model on every process (`evaluate_state`,
    `evaluate`, `evaluated_model` and the evaluation hooks see host arrays);
  * writes `metrics.jsonl`, TensorBoard events and the progress bar on process 0
    only (`run`); checkpoints (`simulate.checkpoint`) are written by every
    process through orbax, which coordinates them.

  With one process it runs as the plain runner with a mesh.
  """

  # Every process must run the same compiled programs; only process 0 shows a
  # progress bar, so the bar advances per block, never from a ticking program.
  unit_ticks = False

  @property
  def global_mesh(self) -> Mesh:
    mesh = _runner_mesh(self)
    if mesh is None:
      raise ValueError(f'{type(self).__name__} needs a mesh: build the runner with '
                       'execution=ClientExecution(..., mesh=fedjax_sync.client_mesh()) '
                       '(AveragingSimulator: mesh=client_mesh()); it spans every process')
    return mesh

  def init(self, params=None):
    return replicate_global(to_host(super().init(params)), self.global_mesh)

  def run_units(self, state, start, length, *args, **kwargs):
    state, metrics = _replicated(super().run_units(state, start, length, *args, **kwargs),
                                 self.global_mesh)
    return state, to_host(metrics)

  def evaluate(self, *args, **kwargs):
    return super().evaluate(*to_host(args), **to_host(kwargs))

  def evaluate_state(self, state):
    # Evaluation is cheap next to training: every process evaluates its host copy.
    return super().evaluate_state(to_host(state))

  def evaluated_model(self, state):
    return to_host(super().evaluated_model(state))

  def run(self, state, *, run_dir=None, progress: bool | None = None, tensorboard=False,
          evaluation_hooks: Sequence = (), **kwargs):
    """The runner's `run`; files and the progress bar on process 0 only.

    `progress=None` (the default) shows the bar on process 0. Evaluation hooks
    receive the host copy of the state.
    """
    primary = is_primary()
    if progress is None:
      progress = primary
    hooks = [lambda s, n, h=h: h(to_host(s), n) for h in evaluation_hooks]
    if not primary:
      run_dir, progress, tensorboard = None, False, False
    return super().run(state, run_dir=run_dir, progress=progress, tensorboard=tensorboard,
                       evaluation_hooks=hooks, **kwargs)


_CLASSES: dict[type, type] = {}


def multihost(runner):
  """`runner` (a `Simulator`, `SemiAsyncSimulator` or `AveragingSimulator` built with
  the global mesh) as a `MultiHost` runner of the same class; the original object
  is left as it was (the copy shares its data and compiled programs).

  Example (on every process):
    >>> multihost.initialize()
    >>> execution = fs.ClientExecution('vmap', mesh=fs.client_mesh())
    >>> sim = multihost.multihost(fs.SemiAsyncSimulator(fs.fed_qs_sgd(model.loss,
    ...     num_clients=100), model, data, clock, config, execution=execution))
    >>> result = sim.run(sim.init())
  """
  if isinstance(runner, MultiHost):
    return runner
  if getattr(runner, 'members', None) is not None:
    raise ValueError('a Sweep runs on one device set (it takes no mesh); run each member '
                     'as its own multi-host runner')
  if _runner_mesh(runner) is None:
    raise ValueError(f'{type(runner).__name__} was built without a mesh: pass '
                     'execution=ClientExecution(..., mesh=fedjax_sync.client_mesh()) '
                     '(AveragingSimulator: mesh=client_mesh()), which spans every process')
  cls = type(runner)
  if cls not in _CLASSES:
    _CLASSES[cls] = type(f'MultiHost{cls.__name__}', (MultiHost, cls),
                         {'__doc__': f'`{cls.__name__}` on a multi-process mesh (`MultiHost`).'})
  wrapped = copy.copy(runner)
  wrapped.__class__ = _CLASSES[cls]
  return wrapped


class MultiHostSimulator(MultiHost, Simulator):
  """A `Simulator` whose state lives on a mesh spanning several processes.

  Every process holds the same dataset and config and runs the same calls; see the
  module docstring. With a single process it behaves as `Simulator` with a mesh.
  (`multihost(Simulator(...))` is the same runner.)
  """

  def __init__(self, algorithm, model, data, config, *, execution):
    if execution.mesh is None:
      raise ValueError('MultiHostSimulator needs an execution with a mesh '
                       '(fedjax_sync.client_mesh() spans every process)')
    super().__init__(algorithm, model, data, config, execution=execution)


TIMELINES = ('synchronous', 'semi_async', 'averaging')


def _demo(argv=None) -> int:
  """`python -m fedjax_sync.simulate.multihost --coordinator H:P --num-processes N
  --process-id I [--timeline synchronous|semi_async|averaging] [--rounds R]
  [--run-dir D --checkpoint-every K] [--out params.npz]`: a few units of FedAvgM
  (synchronous), FedQS-SGD (semi_async) or FDA (averaging) on Synthetic(1, 1) with
  the client axis over every process's devices; process 0 writes the final params.
  With `--run-dir`, the run crashes after `--checkpoint-every` units
  (checkpointed), resumes from the checkpoint to the end, and the same units run
  uninterrupted too (saved as `uninterrupted_leaf_*`; `demo_resume`)."""
  import argparse

  parser = argparse.ArgumentParser(description=_demo.__doc__)
  parser.add_argument('--coordinator', default=None)
  parser.add_argument('--num-processes', type=int, default=None)
  parser.add_argument('--process-id', type=int, default=None)
  parser.add_argument('--timeline', choices=TIMELINES, default='synchronous')
  parser.add_argument('--rounds', type=int, default=3,
                      help='units: rounds, aggregations or local steps')
  parser.add_argument('--clients-per-round', type=int, default=8,
                      help='clients per round, updates per aggregation (K) or workers')
  parser.add_argument('--run-dir', default=None)
  parser.add_argument('--checkpoint-every', type=int, default=None)
  parser.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  if args.num_processes is not None and args.num_processes > 1:
    initialize(args.coordinator, args.num_processes, args.process_id)
  if args.run_dir is None:
    params = demo_run(args.rounds, args.clients_per_round, distributed=True,
                      timeline=args.timeline)
    arrays = {f'leaf_{i}': x for i, x in enumerate(jax.tree.leaves(params))}
  else:
    params, straight = demo_resume(args.rounds, args.clients_per_round,
                                   timeline=args.timeline, run_dir=args.run_dir,
                                   checkpoint_every=args.checkpoint_every)
    arrays = {f'leaf_{i}': x for i, x in enumerate(jax.tree.leaves(params))}
    arrays.update({f'uninterrupted_leaf_{i}': x
                   for i, x in enumerate(jax.tree.leaves(straight))})
  if is_primary() and args.out:
    np.savez(args.out, **arrays)
  print(f'process {jax.process_index()}/{jax.process_count()}: '
        f'{len(jax.devices())} global devices, done', flush=True)
  return 0


def demo_runner(units: int, clients_per_round: int, *, distributed: bool,
                timeline: str = 'synchronous'):
  """The demo's runner of `timeline` on Synthetic(1, 1) (16 clients, logistic
  regression): FedAvgM rounds, FedQS-SGD aggregations (a 1:4 speed-ratio clock) or
  FDA local steps. `distributed=True`: sharded over every device of every process
  (a `MultiHost` runner); False: one process, unsharded (the reference)."""
  import optax

  import fedjax_sync as fs
  from fedjax_sync.clients.execution import ClientExecution, client_mesh

  if timeline not in TIMELINES:
    raise ValueError(f'unknown timeline {timeline!r}; valid: {", ".join(TIMELINES)}')
  data = fs.synthetic(1.0, 1.0, num_clients=16, seed=0)
  model = fs.models.logistic_regression((60,), 10)
  mesh = client_mesh() if distributed else None
  execution = ClientExecution('vmap', mesh=mesh)
  work = fs.LocalWork(batch_size=10, steps=4)
  if timeline == 'synchronous':
    algorithm = fs.fed_avg_m(model.loss, optax.sgd(0.05), execution=execution)
    config = fs.SimulationConfig(num_rounds=units, clients_per_round=clients_per_round,
                                 local_work=work, eval_every=units, seed=0,
                                 per_client_eval=False)
    runner = Simulator(algorithm, model, data, config, execution=execution)
  elif timeline == 'semi_async':
    from fedjax_sync.simulate.clock import make_clock, speed_ratio_times
    from fedjax_sync.simulate.semi_async import AsyncConfig, SemiAsyncSimulator
    algorithm = fs.fed_qs_sgd(model.loss, num_clients=data.num_clients)
    clock = make_clock(speed_ratio_times(data.num_clients, 4.0))
    config = AsyncConfig(num_aggregations=units, buffer_size=clients_per_round,
                         local_work=work, max_staleness=8, eval_every=units, seed=0)
    runner = SemiAsyncSimulator(algorithm, model, data, clock, config, execution=execution)
  else:
    from fedjax_sync.algorithms.fda import fda
    from fedjax_sync.simulate.averaging import AveragingSimulator
    algorithm = fda(model.loss, optax.sgd(0.05), num_workers=clients_per_round,
                    threshold=0.05, execution=execution)
    runner = AveragingSimulator(algorithm, model, data, num_steps=units, batch_size=10,
                                eval_every=units, seed=0, mesh=mesh)
  return multihost(runner) if distributed else runner


def _global_params(state, timeline: str):
  if timeline == 'synchronous':
    return to_host(state.params)
  return to_host(state.server.params if timeline == 'semi_async' else state.anchor)


def demo_run(rounds: int, clients_per_round: int, *, distributed: bool,
             timeline: str = 'synchronous') -> Any:
  """A few units of `timeline` (`demo_runner`); the final global params on the host.

  With `distributed=False` the same units run in one process, unsharded: the
  reference the multi-process test compares against.
  """
  runner = demo_runner(rounds, clients_per_round, distributed=distributed, timeline=timeline)
  return _global_params(runner.run(runner.init(), progress=False).state, timeline)


class _Crash(Exception):
  """The demo's simulated crash after a checkpoint."""


def demo_resume(rounds: int, clients_per_round: int, *, timeline: str, run_dir: str,
                checkpoint_every: int) -> tuple[Any, Any]:
  """Checkpoint + resume on every process: `(resumed params, uninterrupted params)`.

  One multi-host runner of `rounds` units runs under `run_with_checkpoints` with a
  checkpoint every `checkpoint_every` units and crashes after the first one; a
  second `run_with_checkpoints(resume=True)` continues from it to the end; then the
  same runner runs all units without interruption (same blocks: nothing is
  compiled twice).
  """
  from fedjax_sync.simulate.checkpoint import run_with_checkpoints

  if not isinstance(checkpoint_every, int) or not 1 <= checkpoint_every < rounds:
    raise ValueError(f'checkpoint_every must be an integer in [1, {rounds}), '
                     f'got {checkpoint_every!r}')
  runner = demo_runner(rounds, clients_per_round, distributed=True, timeline=timeline)

  def crash(state, units_done, history):
    del state, history
    if units_done == checkpoint_every:
      raise _Crash(units_done)

  try:
    run_with_checkpoints(runner, run_dir=run_dir, every=checkpoint_every, progress=False,
                         on_block=crash)
  except _Crash:
    pass
  resumed = run_with_checkpoints(runner, run_dir=run_dir, every=checkpoint_every,
                                 resume=True, progress=False, log=lambda m: None)
  straight = runner.run(runner.init(), block_every=checkpoint_every, progress=False)
  return (_global_params(resumed.state, timeline), _global_params(straight.state, timeline))


if __name__ == '__main__':
  import sys
  sys.exit(_demo())
