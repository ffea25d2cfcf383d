"""Scale: whole simulations as one program, 10,000 clients per round, 10^6 clients.

Three measurements on this machine (each configuration in its own subprocess so that
its peak resident memory, `ru_maxrss`, is its own):

* `scan_1000`: 1,000 rounds of FedAvg, logistic regression on Synthetic(1, 1) (30
  clients), 10 clients per round, 20 local steps of batch 10, as one compiled
  `lax.scan` (`Simulator.run_rounds`); seconds per round excluding compile.
* `c10k_logreg`, `c10k_mlp`: one round with C = 10,000 clients (20 examples each, one
  step of batch 20) with `ClientExecution('chunked', 100)`: updates are reduced chunk
  by chunk (`map_reduce_clients`), so at most 100 clients' updates exist at once.
  `*_sequential` run one client at a time, also reduced as produced.
  `c1k_mlp_vmap` / `c1k_mlp_chunked` / `c1k_mlp_sequential` compare peak memory
  with all `[C, d]` updates materialized (vmap) at C = 1,000. Inputs are random (timing and memory
  only); MLP inputs are uint8 images (784 bytes per example).
* `n1m`: a population of N = 1,000,000 Synthetic(1, 1)-style clients (4 examples
  each: the paper's clients have ≥ 50, which would need ~100 GB here) held in the
  flat `FederatedData` layout; host bytes per client, the time of sampling 10
  clients without replacement, and FedAvg rounds with 10 clients per round.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = ('scan_1000', 'sweep', 'c10k_logreg', 'c10k_mlp', 'c10k_mlp_sequential',
           'c1k_mlp_vmap', 'c1k_mlp_chunked', 'c1k_mlp_sequential', 'n1m')
QUICK_CONFIGS = ('scan_1000', 'c10k_logreg')


def _peak_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _scan(quick: bool) -> dict:
  import optax

  import fedjax_sync as fs

  rounds = 100 if quick else 1000
  data = fs.synthetic(1.0, 1.0, num_clients=30, seed=0)
  model = fs.models.logistic_regression((60,), 10)
  algorithm = fs.fed_avg(model.loss, optax.sgd(0.01))
  config = fs.SimulationConfig(num_rounds=rounds, clients_per_round=10,
                               local_work=fs.LocalWork(batch_size=10, steps=20),
                               eval_every=rounds, per_client_eval=False)
  sim = fs.Simulator(algorithm, model, data, config)
  state = sim.init()
  t0 = time.perf_counter()
  sim._block(state, rounds)   # compile once
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(3):
    s = sim.init()
    t0 = time.perf_counter()
    s, metrics = sim.run_rounds(s, 0, rounds)
    s.params['Dense_0']['kernel'].block_until_ready()
    times.append(time.perf_counter() - t0)
  times.sort()
  return {'rounds': rounds, 'clients_per_round': 10, 'compile_s': compile_s,
          'ms_per_round': 1000 * times[1] / rounds,
          'final_train_loss': float(metrics['train_loss'][-1])}


def _sweep(quick: bool) -> dict:
  """4 seeds × 2 client learning rates as one vmapped program vs one after another."""
  import jax
  import optax

  import fedjax_sync as fs
  from fedjax_sync.algorithms.registry import Hyperparameters
  from fedjax_sync.simulate.sweep import Sweep, registered_algorithm

  rounds = 50 if quick else 200
  seeds, lrs = [0, 1, 2, 3], [0.01, 0.05]
  data = fs.synthetic(1.0, 1.0, num_clients=30, seed=0)
  model = fs.models.logistic_regression((60,), 10)
  config = fs.SimulationConfig(num_rounds=rounds, clients_per_round=10,
                               local_work=fs.LocalWork(batch_size=10, steps=20),
                               eval_every=rounds, per_client_eval=False)
  sweep = Sweep(registered_algorithm('fedavg', model.loss, Hyperparameters()), model, data,
                config, seeds=seeds, hyperparameters={'client_learning_rate': lrs})
  states = sweep.init()
  t0 = time.perf_counter()
  sweep._block(states, rounds)
  sweep_compile = time.perf_counter() - t0
  t0 = time.perf_counter()
  states, _ = sweep.run_rounds(states, 0, rounds)
  jax.block_until_ready(states.params)
  sweep_s = time.perf_counter() - t0
  one_by_one, compile_total = 0.0, 0.0
  for seed in seeds:
    for lr in lrs:
      algorithm = fs.fed_avg(model.loss, optax.sgd(lr))
      sim = fs.Simulator(algorithm, model, data, fs.SimulationConfig(
          num_rounds=rounds, clients_per_round=10, local_work=config.local_work,
          eval_every=rounds, seed=seed, per_client_eval=False))
      state = sim.init()
      t0 = time.perf_counter()
      sim._block(state, rounds)
      compile_total += time.perf_counter() - t0
      t0 = time.perf_counter()
      state, _ = sim.run_rounds(state, 0, rounds)
      jax.block_until_ready(state.params)
      one_by_one += time.perf_counter() - t0
  return {'simulations': len(seeds) * len(lrs), 'rounds': rounds, 'compile_s': sweep_compile,
          'sweep_s': sweep_s, 'sequential_s': one_by_one,
          'sequential_compile_s': compile_total, 'speedup': one_by_one / sweep_s,
          'speedup_with_compile': (one_by_one + compile_total) / (sweep_s + sweep_compile),
          'ms_per_round': 1000 * sweep_s / rounds}


def _many_clients(model_name: str, clients: int, strategy: str, chunk: int | None) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  import fedjax_sync as fs

  import numpy as np

  b = 20
  rng = np.random.default_rng(0)   # numpy: no transient int32/uint32 copies of the inputs
  if model_name == 'mlp':
    model = fs.models.mlp((784,), 10)
    x = jnp.asarray(rng.integers(0, 256, (clients, 1, b, 784), dtype=np.uint8))
  else:
    model = fs.models.logistic_regression((60,), 10)
    x = jnp.asarray(rng.standard_normal((clients, 1, b, 60), dtype=np.float32))
  y = jnp.asarray(rng.integers(0, 10, (clients, 1, b), dtype=np.int32))
  batch = fs.ClientBatch(data={'x': x, 'y': y}, mask=jnp.ones((clients, 1, b), bool),
                         client_ids=jnp.arange(clients, dtype=jnp.int32),
                         weight=jnp.full((clients,), float(b)))
  execution = fs.ClientExecution(strategy, chunk)
  algorithm = fs.fed_avg(model.loss, optax.sgd(0.1), execution=execution)
  state = algorithm.init(model.init(jax.random.key(0)))
  before = _peak_mb()
  t0 = time.perf_counter()
  step = jax.jit(algorithm.round).lower(state, batch, jax.random.key(3)).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for r in range(3):
    t0 = time.perf_counter()
    state, metrics = step(state, batch, jax.random.key(r))
    jax.block_until_ready(state.params)
    times.append(time.perf_counter() - t0)
  params = sum(int(v.size) for v in jax.tree.leaves(state.params))
  return {'model': model_name, 'clients': clients, 'strategy': strategy, 'chunk': chunk,
          'params': params, 'updates_all_clients_mb': clients * params * 4 / 2**20,
          'input_mb': (x.nbytes + y.nbytes) / 2**20, 'compile_s': compile_s,
          's_per_round': sorted(times)[1], 'peak_rss_mb_before_round': before,
          'train_loss': float(metrics['train_loss'])}


def compact_synthetic_population(num_clients: int, examples: int, *, seed: int = 0,
                                 block: int = 100_000):
  """A Synthetic(1, 1)-style population (FedProx's generator, fixed client size).

  Generated in blocks of clients so that the per-client models `W_k` never all
  exist at once; returns a `FederatedData` in the flat layout.
  """
  import numpy as np

  from fedjax_sync.data.federated import FederatedData

  rng = np.random.default_rng(seed)
  d, k = 60, 10
  sigma = np.arange(1, d + 1, dtype=np.float32) ** -1.2
  xs, ys = [], []
  for start in range(0, num_clients, block):
    n = min(block, num_clients - start)
    u = rng.normal(0, 1.0, (n, 1, 1)).astype(np.float32)
    big_b = rng.normal(0, 1.0, (n, 1)).astype(np.float32)
    w = (u + rng.standard_normal((n, d, k), dtype=np.float32))
    bias = (u[:, 0] + rng.standard_normal((n, k), dtype=np.float32))
    v = big_b + rng.standard_normal((n, d), dtype=np.float32)
    x = v[:, None, :] + rng.standard_normal((n, examples, d), dtype=np.float32) * np.sqrt(sigma)
    y = np.argmax(np.einsum('ned,ndk->nek', x, w) + bias[:, None], axis=-1).astype(np.int32)
    xs.append(x.reshape(-1, d))
    ys.append(y.reshape(-1))
  x, y = np.concatenate(xs), np.concatenate(ys)
  counts = np.full((num_clients,), examples, np.int64)
  offsets = np.arange(num_clients, dtype=np.int64) * examples
  test = {'x': x[:1000], 'y': y[:1000]}
  return FederatedData(train={'x': x, 'y': y}, offsets=offsets, counts=counts, test=test,
                       test_client=None, num_classes=k,
                       name=f'synthetic(1,1)-style N={num_clients}')


def _million(quick: bool) -> dict:
  import jax
  import optax

  import fedjax_sync as fs
  from fedjax_sync.data.batching import sample_clients

  n = 100_000 if quick else 1_000_000
  t0 = time.perf_counter()
  data = compact_synthetic_population(n, 4)
  generate_s = time.perf_counter() - t0
  counts = jax.numpy.asarray(data.counts.astype('int32'))
  sample = jax.jit(lambda key: sample_clients(key, counts, 10))
  sample(jax.random.key(0)).block_until_ready()
  t0 = time.perf_counter()
  for r in range(5):
    sample(jax.random.key(r)).block_until_ready()
  sample_ms = 1000 * (time.perf_counter() - t0) / 5
  model = fs.models.logistic_regression((60,), 10)
  algorithm = fs.fed_avg(model.loss, optax.sgd(0.1))
  config = fs.SimulationConfig(num_rounds=20, clients_per_round=10,
                               local_work=fs.LocalWork(batch_size=4, epochs=1),
                               eval_every=20, per_client_eval=False)
  sim = fs.Simulator(algorithm, model, data, config)
  state = sim.init()
  t0 = time.perf_counter()
  sim._block(state, 20)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  state, _ = sim.run_rounds(state, 0, 20)
  jax.block_until_ready(state.params)
  return {'population': n, 'examples_per_client': 4,
          'host_bytes_per_client': data.host_bytes_per_client(),
          'generate_s': generate_s, 'sample_10_of_N_ms': sample_ms, 'compile_s': compile_s,
          'ms_per_round': 1000 * (time.perf_counter() - t0) / 20}


def measure(name: str, quick: bool = False) -> dict:
  """Runs one configuration in this process and returns its figures with peak RSS."""
  if name == 'scan_1000':
    out = _scan(quick)
  elif name == 'sweep':
    out = _sweep(quick)
  elif name == 'c10k_logreg':
    out = _many_clients('logreg', 1000 if quick else 10_000, 'chunked', 100)
  elif name == 'c10k_mlp':
    out = _many_clients('mlp', 10_000, 'chunked', 100)
  elif name == 'c1k_mlp_vmap':
    out = _many_clients('mlp', 1000, 'vmap', None)
  elif name == 'c10k_mlp_sequential':
    out = _many_clients('mlp', 10_000, 'sequential', None)
  elif name == 'c1k_mlp_chunked':
    out = _many_clients('mlp', 1000, 'chunked', 100)
  elif name == 'c1k_mlp_sequential':
    out = _many_clients('mlp', 1000, 'sequential', None)
  elif name == 'n1m':
    out = _million(quick)
  else:
    raise ValueError(f'unknown configuration {name!r}; valid: {", ".join(CONFIGS)}')
  out['peak_rss_mb'] = _peak_mb()
  return out


def run(run_dir: str, *, quick: bool = False, dataset: str | None = None,
        seeds: int | None = None, configs: list[str] | None = None) -> dict:
  """Measures each configuration in a subprocess; writes the study files.

  `dataset` and `seeds` are accepted for the study contract and unused.
  """
  from fedjax_sync import reporting

  del dataset, seeds
  reporting.prepare_run_dir(run_dir)
  configs = list(configs or (QUICK_CONFIGS if quick else CONFIGS))
  for c in configs:
    if c not in CONFIGS:
      raise ValueError(f'unknown configuration {c!r}; valid: {", ".join(CONFIGS)}')
  reporting.write_config(run_dir, {'study': 'scale', 'quick': quick, 'configs': configs})
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  results = {}
  for c in configs:
    code = (f'import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); '
            f'import scale; print("RESULT " + json.dumps(scale.measure({c!r}, {quick!r})))')
    proc = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=root))
    lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
    if proc.returncode != 0 or not lines:
      raise RuntimeError(f'scale configuration {c} failed:\n{proc.stderr[-3000:]}')
    results[c] = json.loads(lines[-1][7:])
    reporting.append_metrics(run_dir, [{'config': c, **results[c]}])
    print(c, json.dumps(results[c]), flush=True)
  rows = []
  for c, r in results.items():
    speed = (f"{r['ms_per_round']:.3f} ms/round" if 'ms_per_round' in r
             else f"{r['s_per_round']:.3f} s/round")
    rows.append((c, speed, f"{r['compile_s']:.1f}", f"{r['peak_rss_mb']:.0f}",
                 ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                           for k, v in r.items()
                           if k not in ('ms_per_round', 's_per_round', 'compile_s',
                                        'peak_rss_mb'))))
  reporting.write_summary(run_dir, 'Scale', ['configuration', 'speed', 'compile s',
                                             'peak RSS MB', 'details'], rows)
  if 'scan_1000' in results:
    r = results['scan_1000']
    reporting.plot_lines(os.path.join(run_dir, 'scan.png'),
                         {'ms/round': ([r['rounds']], [r['ms_per_round']])},
                         xlabel='rounds in one program', ylabel='ms per round')
  return {c: r.get('ms_per_round', r.get('s_per_round')) for c, r in results.items()}


if __name__ == '__main__':
  import fedjax_sync.cli
  sys.exit(fedjax_sync.cli.main(['run', '--config', __file__] + sys.argv[1:]))
