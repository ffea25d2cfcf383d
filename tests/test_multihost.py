"""Two processes on localhost (gloo CPU collectives, 2 CPU devices each) equal one process."""

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


def test_two_processes_equal_one_process(tmp_path):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  out = str(tmp_path / 'params.npz')
  procs = []
  for pid in (0, 1):
    cmd = [sys.executable, '-m', 'fedjax_sync.simulate.multihost',
           '--coordinator', f'127.0.0.1:{port}', '--num-processes', '2', '--process-id', str(pid),
           '--rounds', str(ROUNDS), '--clients-per-round', str(CLIENTS)]
    if pid == 0:
      cmd += ['--out', out]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
    assert '4 global devices' in log
  distributed = np.load(out)
  reference = jax.tree.leaves(multihost.demo_run(ROUNDS, CLIENTS, distributed=False))
  assert len(distributed.files) == len(reference)
  for i, ref in enumerate(reference):
    np.testing.assert_allclose(distributed[f'leaf_{i}'], ref, rtol=1e-5, atol=1e-6)
  # The rounds did train: the params moved away from the initial ones.
  assert any(np.abs(ref).sum() > 0 for ref in reference)


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
