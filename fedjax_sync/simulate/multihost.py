"""Many hosts: JAX's multi-controller runtime with the client axis over a global mesh.

Every host runs the same program (SPMD, one process per host or per GPU):

    import fedjax_sync as fs
    from fedjax_sync.simulate import multihost

    multihost.initialize()        # jax.distributed.initialize (+ gloo on CPU)
    mesh = fs.client_mesh()       # all devices of all processes, axis 'clients'
    execution = fs.ClientExecution('vmap', mesh=mesh)
    algorithm = fs.fed_avg(model.loss, optax.sgd(0.1), execution=execution)
    sim = multihost.MultiHostSimulator(algorithm, model, data, config, execution=execution)
    result = sim.run(sim.init(), progress=multihost.is_primary())

Data placement (the simple, valid mode implemented by `MultiHostSimulator`): every
process holds the same `FederatedData` (load it from the same files with the same
seed) and the same run key, so every process samples the same clients and builds
the same `[C, S, B, ...]` round input inside the compiled round; XLA's SPMD
partitioner then keeps only each device's `C / D` clients' slice, so each device
trains only its own clients, and the weighted mean is an all-reduce over the
'clients' axis. The server state is replicated on every device; metrics and
evaluation are computed identically on every process. This costs host memory
(the dataset on every host) but no data movement per round.

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

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_sync.clients.execution import CLIENT_AXIS
from fedjax_sync.data.batching import DeviceData
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


class MultiHostSimulator(Simulator):
  """A `Simulator` whose state lives on a mesh spanning several processes.

  Every process holds the same dataset and config and runs the same calls; see the
  module docstring. With a single process it behaves as `Simulator` with a mesh.
  """

  def __init__(self, algorithm, model, data, config, *, execution):
    if execution.mesh is None:
      raise ValueError('MultiHostSimulator needs an execution with a mesh '
                       '(fedjax_sync.client_mesh() spans every process)')
    super().__init__(algorithm, model, data, config, execution=execution)
    mesh = execution.mesh
    # Replicated training data on every device of the global mesh (identical on
    # every process: each process fills its own devices from its host copy).
    self._device_data = DeviceData(
        train={k: replicate_global(v, mesh) for k, v in data.train.items()},
        offsets=replicate_global(data.offsets.astype(np.int32), mesh),
        counts=replicate_global(data.counts.astype(np.int32), mesh))

  def init(self, params=None):
    state = super().init(params)
    return replicate_global(to_host(state), self.execution.mesh)

  def run_rounds(self, state, start, length):
    state, metrics = super().run_rounds(state, start, length)
    return state, to_host(metrics)

  def evaluate(self, params, client_states=()):
    # Evaluation is cheap next to training: every process evaluates its host copy.
    return jax.device_get(self._evaluate(to_host(params), to_host(client_states)))


def _demo(argv=None) -> int:
  """`python -m fedjax_sync.simulate.multihost --coordinator H:P --num-processes N
  --process-id I [--rounds R] [--out params.npz]`: FedAvg on Synthetic(1, 1) with the
  client axis over every process's devices; process 0 writes the final params."""
  import argparse

  parser = argparse.ArgumentParser(description=_demo.__doc__)
  parser.add_argument('--coordinator', default=None)
  parser.add_argument('--num-processes', type=int, default=None)
  parser.add_argument('--process-id', type=int, default=None)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--clients-per-round', type=int, default=8)
  parser.add_argument('--out', default=None)
  args = parser.parse_args(argv)
  if args.num_processes is not None and args.num_processes > 1:
    initialize(args.coordinator, args.num_processes, args.process_id)
  params = demo_run(args.rounds, args.clients_per_round, distributed=True)
  if is_primary() and args.out:
    np.savez(args.out, **{f'leaf_{i}': x for i, x in enumerate(jax.tree.leaves(params))})
  print(f'process {jax.process_index()}/{jax.process_count()}: '
        f'{len(jax.devices())} global devices, done', flush=True)
  return 0


def demo_run(rounds: int, clients_per_round: int, *, distributed: bool) -> Any:
  """A few FedAvg rounds on Synthetic(1, 1) sharded over every device; host params.

  With `distributed=False` the same rounds run in one process, unsharded: the
  reference the multi-process test compares against.
  """
  import optax

  import fedjax_sync as fs
  from fedjax_sync.clients.execution import ClientExecution, client_mesh

  data = fs.synthetic(1.0, 1.0, num_clients=16, seed=0)
  model = fs.models.logistic_regression((60,), 10)
  mesh = client_mesh() if distributed else None
  execution = ClientExecution('vmap', mesh=mesh)
  algorithm = fs.fed_avg_m(model.loss, optax.sgd(0.05), execution=execution)
  config = fs.SimulationConfig(num_rounds=rounds, clients_per_round=clients_per_round,
                               local_work=fs.LocalWork(batch_size=10, steps=4),
                               eval_every=rounds, seed=0, per_client_eval=False)
  cls = MultiHostSimulator if distributed else Simulator
  sim = cls(algorithm, model, data, config, execution=execution)
  result = sim.run(sim.init(), progress=False)
  return to_host(result.state.params)


if __name__ == '__main__':
  import sys
  sys.exit(_demo())
