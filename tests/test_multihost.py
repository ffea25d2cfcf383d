"""Two processes on localhost (gloo CPU collectives, 2 CPU devices each) equal one process:
the synchronous timeline, and the semi-asynchronous one (FedQS) with a checkpoint and resume."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedjax_sync.clients.execution import client_mesh
from fedjax_sync.simulate import multihost
from fedjax_sync.types import ClientBatch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS, CLIENTS = 3, 8


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch_two_processes(tmp_path, *args: str) -> np.lib.npyio.NpzFile:
  """Runs the demo on 2 local processes (2 CPU devices each); process 0's arrays."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  out = str(tmp_path / 'params.npz')
  procs = []
  for pid in (0, 1):
    cmd = [sys.executable, '-m', 'fedjax_sync.simulate.multihost',
           '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2', '--process-id', str(pid),
           *args]
    if pid == 0:
      cmd += ['--out', out]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=400)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
    assert '4 global devices' in log
  return np.load(out)


def test_two_processes_equal_one_process(tmp_path):
  distributed = _launch_two_processes(tmp_path, '--rounds', str(ROUNDS),
                                      '--clients-per-round', str(CLIENTS))
  reference = jax.tree.leaves(multihost.demo_run(ROUNDS, CLIENTS, distributed=False))
  assert len(distributed.files) == len(reference)
  for i, ref in enumerate(reference):
    np.testing.assert_allclose(distributed[f'leaf_{i}'], ref, rtol=1e-5, atol=1e-6)
  # The rounds did train: the params moved away from the initial ones.
  assert any(np.abs(ref).sum() > 0 for ref in reference)


@pytest.mark.slow
def test_fedqs_on_two_processes_equals_one_process_and_resumes_bitwise(tmp_path):
  """FedQS-SGD on the semi-asynchronous timeline, 2 hosts: crashed after a checkpoint
  at aggregation 3 and resumed to 6, it ends bitwise equal to the uninterrupted 2-host
  run, and equal to one unsharded process within the README's sharded tolerance
  (2e-6 of the state's largest value); metrics.jsonl is written once (process 0)."""
  aggregations, every = 6, 3
  run_dir = tmp_path / 'run'
  distributed = _launch_two_processes(
      tmp_path, '--timeline', 'semi_async', '--rounds', str(aggregations),
      '--clients-per-round', str(CLIENTS), '--run-dir', str(run_dir),
      '--checkpoint-every', str(every))
  reference = jax.tree.leaves(multihost.demo_run(aggregations, CLIENTS, distributed=False,
                                                 timeline='semi_async'))
  scale = max(float(np.abs(ref).max()) for ref in reference)
  assert scale > 0
  for i, ref in enumerate(reference):
    np.testing.assert_array_equal(distributed[f'leaf_{i}'], distributed[f'uninterrupted_leaf_{i}'])
    np.testing.assert_allclose(distributed[f'leaf_{i}'], ref, rtol=0, atol=2e-6 * scale)
  rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  assert [row['aggregation'] for row in rows] == list(range(1, aggregations + 1))
  assert 'test_accuracy' in rows[-1]
  assert (run_dir / 'checkpoints' / f'round_{aggregations:08d}' / 'meta.json').is_file()


def test_one_process_sharded_equals_unsharded():
  sharded = jax.tree.leaves(multihost.demo_run(2, CLIENTS, distributed=True))
  plain = jax.tree.leaves(multihost.demo_run(2, CLIENTS, distributed=False))
  for a, b in zip(sharded, plain):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_process_local_client_batch_single_process():
  mesh = client_mesh()
  c = 2 * len(jax.devices())
  local = ClientBatch(data={'x': np.arange(c * 3 * 2, dtype=np.float32).reshape(c, 3, 2)},
                      mask=np.ones((c, 3), bool), client_ids=np.arange(c, dtype=np.int32),
                      weight=np.ones((c,), np.float32))
  batch = multihost.process_local_client_batch(local, mesh)
  np.testing.assert_array_equal(np.asarray(batch.data['x']), local.data['x'])
  assert batch.data['x'].sharding.spec[0] == 'clients'
  assert len(batch.data['x'].sharding.device_set) == len(jax.devices())


def test_validation():
  with pytest.raises(ValueError, match='cpu_collectives'):
    multihost.initialize('127.0.0.1:1', 1, 0, cpu_collectives='nccl')
  with pytest.raises(ValueError, match='mesh'):
    import fedjax_sync as fs
    multihost.MultiHostSimulator(None, None, None, None, execution=fs.ClientExecution())


def test_multihost_wraps_any_runner_of_the_driver():
  import fedjax_sync as fs
  import fedjax_sync.simulate  # noqa: F401
  from fedjax_sync.simulate.clock import constant_times, make_clock

  data = fs.synthetic(1.0, 1.0, num_clients=8, seed=0)
  model = fs.models.logistic_regression((60,), 10)
  config = fs.simulate.AsyncConfig(num_aggregations=2, buffer_size=4,
                          local_work=fs.LocalWork(batch_size=5, steps=1))
  clock = make_clock(constant_times(8))
  make = lambda execution: fs.SemiAsyncSimulator(  # noqa: E731
      fs.fed_qs_sgd(model.loss, num_clients=8), model, data, clock, config,
      execution=execution)
  with pytest.raises(ValueError, match='without a mesh'):
    multihost.multihost(make(fs.ClientExecution()))
  plain = make(fs.ClientExecution('vmap', mesh=client_mesh()))
  runner = multihost.multihost(plain)
  assert isinstance(runner, multihost.MultiHost) and isinstance(runner, fs.SemiAsyncSimulator)
  assert not isinstance(plain, multihost.MultiHost)      # the original is left alone
  assert multihost.multihost(runner) is runner
  assert type(multihost.multihost(plain)) is type(runner)   # one class per runner class
  state = runner.init()
  leaves = jax.tree.leaves(state)
  assert all(x.sharding.is_fully_replicated and len(x.sharding.device_set) == len(jax.devices())
             for x in leaves if isinstance(x, jax.Array))
  with pytest.raises(ValueError, match='Sweep'):
    multihost.multihost(type('FakeSweep', (), {'members': 3})())
