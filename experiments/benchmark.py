"""Steady-state FedAvg round time per client-execution strategy, against two references.

Workloads (issue #8): an MLP 784-200-10 with 100 clients × 100 examples; FedJAX's
EMNIST CNN with 10 and 100 clients × 100 examples; logistic regression on
Synthetic(1, 1) (10 of 30 clients per round). Batch 20 and one local epoch (S = 5
steps) throughout; plain client SGD (lr 0.1), server SGD (lr 1).

Inputs are synthetic random arrays of the right shapes (except the Synthetic(1, 1)
workload, which samples a real round): this is a timing study, not a training one.

For each workload it times, in one process:

* every client-execution strategy of `ClientExecution` ('vmap', 'chunked',
  'sequential', 'loop'), with the local-step scan rolled (`unroll=1`) and fully
  unrolled (`unroll=True`): one compiled FedAvg round (`algorithm.round` under jit);
* `python_loop`: what a user would otherwise write — a Python loop over clients and
  steps calling a jitted local step, then a jitted weighted average and server step;
* `limit`: the same examples trained as one centralized model, S steps of batches
  of C·B examples (one compiled scan).

Reported: the median of `repeats` steady-state rounds after `warmup` rounds, compile
time separately, and the ratio to the limit. All variants of a workload are compiled
first, then timed in turns (`interleaved_medians`), so the ratios come from one run
under the same load; each timed round of the dense workloads follows one untimed
round of the same variant, so that it measures consecutive rounds (as in a
simulation) rather than a round right after another variant. Variants tracing more
than `MAX_TRACED_STEPS` local steps ('loop' with unrolled steps at C = 100) are
listed as not run.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_sync as fs
from fedjax_sync import reporting
from fedjax_sync.benchmarking import interleaved_medians
from fedjax_sync.clients.local import make_local_step

BATCH = 20
EXAMPLES = 100
CLIENT_LR = 0.1

# (name, model factory, input shape, classes, clients per round)
WORKLOADS = {
    'mlp_100': ('mlp', (784,), 10, 100),
    'cnn_10': ('emnist_cnn', (28, 28, 1), 62, 10),
    'cnn_100': ('emnist_cnn', (28, 28, 1), 62, 100),
    'logreg_synthetic': ('logistic_regression', (60,), 10, 10),
}
ANCHORS = {'mlp_100': 0.25, 'cnn_10': 2.35}   # FedJAX 0.0.17 on this 2-core CPU (issue #8)


def _model(name, shape, classes):
  if name == 'emnist_cnn':
    return fs.models.emnist_cnn(shape, classes)
  return fs.models.get_model(name, shape, classes)


def _random_batch(key, clients, shape, classes) -> fs.ClientBatch:
  """`[C, S, B, ...]` random inputs: C clients × 100 examples in batches of 20."""
  steps = EXAMPLES // BATCH
  kx, ky = jax.random.split(key)
  x = jax.random.uniform(kx, (clients, steps, BATCH) + tuple(shape), jnp.float32)
  y = jax.random.randint(ky, (clients, steps, BATCH), 0, classes)
  return fs.ClientBatch(data={'x': x, 'y': y}, mask=jnp.ones((clients, steps, BATCH), bool),
                        client_ids=jnp.arange(clients, dtype=jnp.int32),
                        weight=jnp.full((clients,), float(EXAMPLES), jnp.float32))


def _synthetic_batch(clients) -> fs.ClientBatch:
  data = fs.synthetic(1.0, 1.0, num_clients=30, seed=0)
  model = fs.models.logistic_regression((60,), 10)
  algorithm = fs.fed_avg(model.loss, optax.sgd(CLIENT_LR))
  config = fs.SimulationConfig(num_rounds=1, clients_per_round=clients,
                               local_work=fs.LocalWork(batch_size=BATCH, epochs=1))
  sim = fs.Simulator(algorithm, model, data, config)
  batch, _ = jax.jit(sim.sample_round)(0)
  return batch


def _temp_mb(compiled) -> float:
  """XLA's scratch memory of a compiled program (buffers besides inputs and outputs)."""
  return compiled.memory_analysis().temp_size_in_bytes / 2**20


def _round_call(algorithm, params, batch, key):
  """One compiled FedAvg round on a donated state: `(call, compile seconds, temp MB)`."""
  state = jax.tree.map(jnp.copy, algorithm.init(params))   # donated below
  t0 = time.perf_counter()
  compiled = jax.jit(algorithm.round, donate_argnums=0).lower(state, batch, key).compile()
  compile_s = time.perf_counter() - t0
  holder = [state]

  def call():
    holder[0], _ = compiled(holder[0], batch, key)
    return holder[0].params

  return call, compile_s, _temp_mb(compiled)


def _python_loop_call(model, params, batch, key):
  """The baseline a user would write: Python loops, a jitted step per client step."""
  optimizer = optax.sgd(CLIENT_LR)
  step = jax.jit(make_local_step(model.loss, optimizer))
  num_clients, num_steps = batch.mask.shape[:2]
  clients = [(jax.tree.map(lambda x: x[c], batch.data), batch.mask[c]) for c in range(num_clients)]
  weights = [float(w) for w in np.asarray(batch.weight)]

  @jax.jit
  def accumulate(total, global_params, local_params, w):
    return jax.tree.map(lambda t, g, l: t + w * (g - l), total, global_params, local_params)

  @jax.jit
  def server(global_params, total, total_weight):
    return jax.tree.map(lambda g, t: g - t / total_weight, global_params, total)

  holder = [params]

  def call():
    global_params = holder[0]
    total = jax.tree.map(jnp.zeros_like, global_params)
    for c, (data, mask) in enumerate(clients):
      p, o = global_params, optimizer.init(global_params)
      ckey = jax.random.fold_in(key, c)
      for s in range(num_steps):
        p, o, _ = step(p, o, jax.tree.map(lambda x: x[s], data), mask[s],
                       jax.random.fold_in(ckey, s))
      total = accumulate(total, global_params, p, weights[c])
    holder[0] = server(global_params, total, sum(weights))
    return holder[0]

  t0 = time.perf_counter()
  jax.block_until_ready(call())   # the first call compiles the step
  return call, time.perf_counter() - t0, None


def _limit_call(model, params, batch, key):
  """The same examples as one centralized model: S steps of C·B examples each."""
  optimizer = optax.sgd(CLIENT_LR)
  step = make_local_step(model.loss, optimizer)
  num_clients, num_steps, b = batch.mask.shape
  merge = lambda x: jnp.swapaxes(x, 0, 1).reshape((num_steps, num_clients * b) + x.shape[3:])
  data, mask = jax.tree.map(merge, batch.data), merge(batch.mask)

  def train(p, data, mask, key):
    def body(carry, xs):
      p, o = carry
      d, m, s = xs
      p, o, _ = step(p, o, d, m, jax.random.fold_in(key, s))
      return (p, o), None
    (p, _), _ = jax.lax.scan(body, (p, optimizer.init(p)), (data, mask, jnp.arange(num_steps)),
                             unroll=True)
    return p

  t0 = time.perf_counter()
  compiled = jax.jit(train).lower(params, data, mask, key).compile()
  compile_s = time.perf_counter() - t0
  holder = [params]

  def call():
    holder[0] = compiled(holder[0], data, mask, key)
    return holder[0]

  return call, compile_s, _temp_mb(compiled)


def _executions(num_clients: int) -> list[tuple[str, fs.ClientExecution]]:
  chunk = max(1, num_clients // 10)
  return [('vmap', fs.ClientExecution('vmap')),
          (f'chunked({chunk})', fs.ClientExecution('chunked', chunk)),
          ('sequential', fs.ClientExecution('sequential')),
          ('loop', fs.ClientExecution('loop'))]


# A variant whose trace holds more copies of the local step than this is not run:
# 'loop' with unrolled steps traces C·S copies (MLP, C = 100: 85 s to compile).
MAX_TRACED_STEPS = 100


def benchmark_workload(name: str, *, warmup: int = 2, repeats: int = 5, settle: int = 1,
                       strategies: list[str] | None = None, unrolls=(1, True),
                       baseline: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
  """Times one workload, every variant interleaved with the others.

  Each timed round follows `settle` untimed rounds of the same variant (see
  `interleaved_medians`). Returns one row per variant (seconds, CPU seconds,
  compile seconds, XLA scratch memory of the compiled program, ratios to the limit)
  and the variants not run, with the reason.
  """
  model_name, shape, classes, clients = WORKLOADS[name]
  model = _model(model_name, shape, classes)
  key = jax.random.key(0)
  params = model.init(key)
  batch = (_synthetic_batch(clients) if name == 'logreg_synthetic'
           else _random_batch(jax.random.key(1), clients, shape, classes))
  num_steps = batch.mask.shape[1]
  calls, compile_s, temp_mb, skipped = {}, {}, {}, []
  calls['limit'], compile_s['limit'], temp_mb['limit'] = _limit_call(model, params, batch, key)
  for label, execution in _executions(clients):
    if strategies is not None and execution.strategy not in strategies:
      continue
    for unroll in unrolls:
      variant = f'{label}, unroll={unroll}'
      copies = ((clients if execution.strategy == 'loop' else 1)
                * (num_steps if unroll is True else 1))
      if copies > MAX_TRACED_STEPS:
        skipped.append(f'{name} {variant}: {copies} traced local steps (> {MAX_TRACED_STEPS})')
        continue
      algorithm = fs.fed_avg(model.loss, optax.sgd(CLIENT_LR), execution=execution, unroll=unroll)
      calls[variant], compile_s[variant], temp_mb[variant] = _round_call(algorithm, params,
                                                                         batch, key)
  if baseline:
    calls['python_loop'], compile_s['python_loop'], temp_mb['python_loop'] = _python_loop_call(
        model, params, batch, key)
  timings = interleaved_medians(calls, warmup=warmup, repeats=repeats, settle=settle)
  limit = timings['limit']
  return [{'workload': name, 'variant': variant, 'seconds': t.seconds,
           'cpu_seconds': t.cpu_seconds, 'compile_seconds': compile_s[variant],
           'xla_temp_mb': temp_mb[variant],
           'ratio_to_limit': t.seconds / limit.seconds,
           'cpu_ratio_to_limit': t.cpu_seconds / limit.cpu_seconds,
           'fedjax_anchor_seconds': ANCHORS.get(name)}
          for variant, t in timings.items()], skipped


def machine() -> str:
  return (f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, '
          f'{jax.default_backend()} backend, jax {jax.__version__}')


def run(run_dir: str, *, quick: bool = False, dataset: str | None = None,
        seeds: int | None = None, workloads: list[str] | None = None) -> dict:
  """Runs the benchmark table; `quick` times only the small workloads, briefly.

  `dataset` and `seeds` are accepted for the study contract and unused (timing
  uses fixed synthetic inputs and one seed).
  """
  del dataset, seeds
  reporting.prepare_run_dir(run_dir)
  if workloads is None:
    workloads = ['logreg_synthetic', 'mlp_100'] if quick else list(WORKLOADS)
  for w in workloads:
    if w not in WORKLOADS:
      raise ValueError(f'unknown workload {w!r}; valid: {", ".join(WORKLOADS)}')
  warmup, repeats = (1, 3) if quick else (2, 9)
  reporting.write_config(run_dir, {'study': 'benchmark', 'quick': quick, 'workloads': workloads,
                                   'batch_size': BATCH, 'examples_per_client': EXAMPLES,
                                   'warmup': warmup, 'repeats': repeats, 'machine': machine()})
  rows, skipped = [], []
  for w in workloads:
    slow = w.startswith('cnn')
    # Seconds-long CNN rounds need no settling round (and could not afford one).
    kwargs = dict(warmup=1 if slow else warmup, repeats=3 if slow else repeats,
                  settle=0 if slow else 1)
    if quick:
      kwargs.update(strategies=['vmap', 'sequential'], unrolls=(1,), warmup=1, repeats=2,
                    baseline=w == 'logreg_synthetic')
    new, not_run = benchmark_workload(w, **kwargs)
    skipped += not_run
    reporting.append_metrics(run_dir, new)
    for r in new:
      print(f"{r['workload']:18s} {r['variant']:28s} {r['seconds']:9.4f} s "
            f"(×{r['ratio_to_limit']:.2f} limit; CPU {r['cpu_seconds']:.4f} s, "
            f"×{r['cpu_ratio_to_limit']:.2f}; compile {r['compile_seconds']:.1f} s; "
            f"XLA temp {r['xla_temp_mb'] or 0:.1f} MB)", flush=True)
    rows += new
  table = [(r['workload'], r['variant'], r['seconds'], r['ratio_to_limit'], r['cpu_seconds'],
            r['cpu_ratio_to_limit'], r['compile_seconds'],
            r['xla_temp_mb'] if r['xla_temp_mb'] is not None else '',
            r['fedjax_anchor_seconds'] if r['fedjax_anchor_seconds'] is not None else '')
           for r in rows]
  reporting.write_summary(
      run_dir, 'FedAvg round time (median steady-state round)',
      ['workload', 'variant', 's/round', '× limit', 'CPU s/round', 'CPU × limit', 'compile s',
       'XLA temp MB', 'FedJAX s/round'], table,
      notes=f'Machine: {machine()}. Synthetic random inputs of the right shapes (timing only). '
            'Wall-clock and process CPU time (all threads) of the median steady round, the '
            'variants of a workload timed in turns (interleaved), each timed round of '
            'the dense workloads after one untimed round of the same variant. XLA temp MB: '
            'the compiled program\'s scratch memory (`memory_analysis().temp_size_in_bytes`), '
            'besides its inputs (the round\'s data) and outputs. '
            + (f'Not run: {"; ".join(skipped)}.' if skipped else ''))
  best = {}
  for r in rows:
    if r['variant'] not in ('limit', 'python_loop'):
      if r['workload'] not in best or r['seconds'] < best[r['workload']]['seconds']:
        best[r['workload']] = r
  series = {}
  for w in workloads:
    sub = [r for r in rows if r['workload'] == w]
    series[w] = (list(range(len(sub))), [r['ratio_to_limit'] for r in sub])
  reporting.plot_lines(os.path.join(run_dir, 'ratio_to_limit.png'), series,
                       xlabel='variant index (see summary.md)', ylabel='round time / limit',
                       title='FedAvg round time relative to the centralized limit')
  return {w: {'best_variant': r['variant'], 'seconds': r['seconds'],
              'ratio_to_limit': r['ratio_to_limit'], 'cpu_seconds': r['cpu_seconds'],
              'cpu_ratio_to_limit': r['cpu_ratio_to_limit']} for w, r in best.items()}


if __name__ == '__main__':
  import fedjax_sync.cli
  sys.exit(fedjax_sync.cli.main(['run', '--config', __file__] + sys.argv[1:]))
