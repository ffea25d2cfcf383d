"""Steady-state FedAvg round time per client-execution strategy, against two references.

Workloads (issues #8, #14): an MLP 784-200-10 with 100 clients × 100 examples;
FedJAX's EMNIST CNN with 10 and 100 clients × 100 examples, as the project's model
(`fs.models.emnist_cnn`, `cnn_*`) and as a user would write it with plain
`flax.linen.Conv` through `fs.models.from_flax` (`stock_cnn_*`: no project helper,
its convolutions made loop-friendly by the local step); a small ResNet-style CNN
with strided convolutions and 1×1 projections on 32×32×3 inputs (`resnet_*`);
logistic regression on Synthetic(1, 1) (10 of 30 clients per round). Batch 20 and
one local epoch (S = 5 steps) throughout; plain client SGD (lr 0.1), server SGD (lr 1).

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

* `fedjax`, with `fedjax_python=PATH` (`fedjax-sync bench --fedjax-python PATH`):
  FedJAX 0.0.17's FedAvg on the same workload (CNN or MLP; random data of the same
  shapes) in a subprocess running that interpreter (`experiments/fedjax_reference.py`),
  timed in the same turns as the other variants (the wall time of one request as
  seen from here; the subprocess's own CPU time).

Reported: the median of `repeats` steady-state rounds after `warmup` rounds, compile
time separately, the ratio to the limit, to FedJAX when measured, and to the
arithmetic limit (the round's FLOPs from XLA's cost analysis of the compiled round
over a float32 matmul peak measured in the same run). FedJAX figures recorded in an
earlier run (`ANCHORS`) are printed only when FedJAX was not measured in this run, and
then labelled as recorded, with their date and machine (`fedjax_reference`). All variants of a workload are compiled
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
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
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
    'stock_cnn_10': ('stock_emnist_cnn', (28, 28, 1), 62, 10),
    'stock_cnn_100': ('stock_emnist_cnn', (28, 28, 1), 62, 100),
    'resnet_10': ('resnet_cnn', (32, 32, 3), 10, 10),
    'resnet_100': ('resnet_cnn', (32, 32, 3), 10, 100),
    'mlp_10': ('mlp', (784,), 10, 10),
    # Sequence models on 80-token sequences (a Shakespeare vocabulary of 90): the
    # char-LSTM of McMahan et al. / FedJAX and a small causal transformer.
    'char_lstm_10': ('char_lstm', (80,), 90, 10),
    'char_lstm_100': ('char_lstm', (80,), 90, 100),
    'transformer_10': ('causal_transformer', (80,), 90, 10),
    'transformer_100': ('causal_transformer', (80,), 90, 100),
}
SEQUENCE_MODELS = ('char_lstm', 'causal_transformer')


class RecordedFigure(NamedTuple):
  """A FedJAX figure recorded in an earlier run: never printed as if measured now."""
  seconds: float
  date: str
  machine: str


_ISSUE_8 = ('2026-11-22', "2-core AMD EPYC CPU (issue #8)")
# FedJAX 0.0.17 seconds per round recorded earlier (not measured by this run).
ANCHORS = {'mlp_100': RecordedFigure(0.25, *_ISSUE_8), 'cnn_10': RecordedFigure(2.35, *_ISSUE_8),
           'stock_cnn_10': RecordedFigure(2.35, *_ISSUE_8)}


def fedjax_reference(workload: str, measured_seconds: float | None = None) -> str:
  """FedJAX's figure for `workload`, saying whether it was measured in this run.

  A figure measured now wins; otherwise the recorded one (`ANCHORS`) with its date
  and machine and 'not measured in this run'; '' when there is neither.
  """
  if measured_seconds is not None:
    return f'FedJAX {measured_seconds:.4g} s/round (measured in this run)'
  anchor = ANCHORS.get(workload)
  if anchor is None:
    return ''
  return (f'FedJAX {anchor.seconds:g} s/round (recorded {anchor.date}, {anchor.machine}; '
          'not measured in this run)')


def recorded_fedjax(workload: str, measured: bool) -> dict | None:
  """The recorded FedJAX figure as a metrics field, or None when FedJAX was measured."""
  anchor = ANCHORS.get(workload)
  return None if measured or anchor is None else {**anchor._asdict(),
                                                  'measured_in_this_run': False}
# The FedJAX workload (experiments/fedjax_reference.py) that matches each of ours.
FEDJAX_WORKLOADS = {'mlp_100': ('mlp', 100), 'cnn_10': ('cnn', 10), 'cnn_100': ('cnn', 100),
                    'stock_cnn_10': ('cnn', 10), 'stock_cnn_100': ('cnn', 100)}


class StockEmnistCNN(nn.Module):
  """FedJAX's EMNIST CNN as a user writes it: plain `nn.Conv`, no project helper."""

  num_classes: int = 62

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(32, (3, 3), padding='VALID')(x))
    x = nn.relu(nn.Conv(64, (3, 3), padding='VALID')(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
    x = nn.Dropout(0.25, deterministic=not train)(x)
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class ResNetCNN(nn.Module):
  """A small ResNet-style CNN: a 3×3 stem, then per stage a residual block of two 3×3
  convolutions, the first strided (2) from the second stage on, with a strided 1×1
  projection on the shortcut; global average pooling (He et al. 2016, without
  normalization layers). Plain `nn.Conv` throughout."""

  widths: Sequence[int] = (16, 32, 64)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(self.widths[0], (3, 3), padding='SAME')(x))
    for i, width in enumerate(self.widths):
      stride = (1, 1) if i == 0 else (2, 2)
      y = nn.relu(nn.Conv(width, (3, 3), strides=stride, padding='SAME')(x))
      y = nn.Conv(width, (3, 3), padding='SAME')(y)
      if stride != (1, 1) or x.shape[-1] != width:
        x = nn.Conv(width, (1, 1), strides=stride)(x)
      x = nn.relu(x + y)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def _model(name, shape, classes):
  if name == 'emnist_cnn':
    return fs.models.emnist_cnn(shape, classes)
  if name in ('stock_emnist_cnn', 'resnet_cnn'):
    module = StockEmnistCNN(classes) if name == 'stock_emnist_cnn' else ResNetCNN(num_classes=classes)
    return fs.models.from_flax(module, jnp.zeros((1, *shape), jnp.float32), name=name)
  return fs.models.get_model(name, shape, classes)


def _random_batch(key, clients, shape, classes, tokens: bool = False) -> fs.ClientBatch:
  """`[C, S, B, ...]` random inputs: C clients × 100 examples in batches of 20.

  With `tokens`, `x` and `y` are `[.., T]` token ids (next-token targets at every
  position) for the sequence models."""
  steps = EXAMPLES // BATCH
  kx, ky = jax.random.split(key)
  if tokens:
    x = jax.random.randint(kx, (clients, steps, BATCH) + tuple(shape), 4, classes)
    y = jax.random.randint(ky, (clients, steps, BATCH) + tuple(shape), 4, classes)
  else:
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
  """The same examples as one centralized model: S steps of C·B examples each.

  Returns the call, its compile seconds, XLA scratch MB and FLOPs (cost analysis)."""
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

  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return call, compile_s, _temp_mb(compiled), (cost or {}).get('flops')


class FedjaxReference:
  """FedJAX's round for one workload, run on request in a subprocess (see the module doc).

  `call()` asks for one round and waits for it; `cpu_seconds` collects the CPU times
  the subprocess reports. Start-up (imports, data, two compiling rounds) is
  `compile_seconds`.
  """

  def __init__(self, python: str, workload: str, clients: int):
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fedjax_reference.py')
    t0 = time.perf_counter()
    self.process = subprocess.Popen([python, script, workload, str(clients)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = self.process.stdout.readline()
    if not ready.startswith('ready'):
      self.close()
      raise RuntimeError(f'{python} {script} {workload} {clients} did not start '
                         f'(is FedJAX 0.0.17 installed in that Python?); it said {ready!r}')
    self.jax_version = ready.split()[-1]
    self.compile_seconds = time.perf_counter() - t0
    self.cpu_seconds: list[float] = []

  def call(self):
    self.process.stdin.write('round\n')
    self.process.stdin.flush()
    reply = self.process.stdout.readline().split()
    if len(reply) != 2:
      raise RuntimeError(f'the FedJAX subprocess stopped (reply {reply!r})')
    self.cpu_seconds.append(float(reply[1]))

  def close(self):
    if self.process.poll() is None:
      try:
        self.process.stdin.write('quit\n')
        self.process.stdin.close()
        self.process.wait(timeout=30)
      except (OSError, subprocess.TimeoutExpired):
        self.process.kill()


def matmul_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
  """float32 matmul throughput of this machine now (median of `repeats` products)."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  product = jax.jit(lambda a: a @ a)
  jax.block_until_ready(product(a))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(product(a))
    times.append(time.perf_counter() - t0)
  return 2 * size ** 3 / statistics.median(times) / 1e9


def _executions(num_clients: int) -> list[tuple[str, fs.ClientExecution]]:
  chunk = max(1, num_clients // 10)
  return [('auto', fs.ClientExecution('auto')),
          ('vmap', fs.ClientExecution('vmap')),
          (f'chunked({chunk})', fs.ClientExecution('chunked', chunk)),
          ('sequential', fs.ClientExecution('sequential')),
          ('loop', fs.ClientExecution('loop'))]


# A variant whose trace holds more copies of the local step than this is not run:
# 'loop' with unrolled steps traces C·S copies (MLP, C = 100: 85 s to compile).
MAX_TRACED_STEPS = 100


def benchmark_workload(name: str, *, warmup: int = 2, repeats: int = 5, settle: int = 1,
                       strategies: list[str] | None = None, unrolls=(1, True),
                       baseline: bool = True, written_convolutions: bool = False,
                       fedjax_python: str | None = None, with_limit: bool = True,
                       peak_gflops: float | None = None
                       ) -> tuple[list[dict[str, Any]], list[str]]:
  """Times one workload, every variant interleaved with the others.

  Each timed round follows `settle` untimed rounds of the same variant (see
  `interleaved_medians`). Returns one row per variant (seconds, CPU seconds,
  compile seconds, XLA scratch memory of the compiled program, ratios to the limit)
  and the variants not run, with the reason. `written_convolutions` adds the
  'sequential' round without the local step's convolution rewrite. `with_limit=False`
  skips the centralized limit (its ratios are then None). With `fedjax_python`, FedJAX's round
  (when the workload has a FedJAX counterpart) is one more variant, 'fedjax'.
  With `peak_gflops`, rows carry the arithmetic limit: the limit program's FLOPs
  (XLA cost analysis; the same local-training arithmetic as a round) at that rate.
  """
  model_name, shape, classes, clients = WORKLOADS[name]
  model = _model(model_name, shape, classes)
  key = jax.random.key(0)
  params = model.init(key)
  batch = (_synthetic_batch(clients) if name == 'logreg_synthetic'
           else _random_batch(jax.random.key(1), clients, shape, classes,
                              tokens=model_name in SEQUENCE_MODELS))
  num_steps = batch.mask.shape[1]
  calls, compile_s, temp_mb, skipped = {}, {}, {}, []
  flops = None
  if with_limit:
    calls['limit'], compile_s['limit'], temp_mb['limit'], flops = _limit_call(model, params,
                                                                             batch, key)
    if model_name == 'char_lstm':
      # XLA's cost analysis counts a while loop's body once: the recurrence over the
      # sequence's T positions would be undercounted T-fold.
      flops = None
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  auto = fs.clients.resolve_strategy('auto', None, (batch.mask,), client_bytes=param_bytes)
  for label, execution in _executions(clients):
    if label == 'auto':
      label = f'auto(→{auto})'
      if strategies is not None and auto not in strategies:
        continue
    elif strategies is not None and execution.strategy not in strategies:
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
  if written_convolutions:
    # The same model without the local step's convolution rewrite (the opt-out).
    algorithm = fs.fed_avg(fs.clients.keep_convolutions(model.loss), optax.sgd(CLIENT_LR),
                           execution=fs.ClientExecution('sequential'))
    variant = 'sequential, convolutions as written'
    calls[variant], compile_s[variant], temp_mb[variant] = _round_call(algorithm, params,
                                                                       batch, key)
  if baseline:
    calls['python_loop'], compile_s['python_loop'], temp_mb['python_loop'] = _python_loop_call(
        model, params, batch, key)
  reference = None
  if fedjax_python and name in FEDJAX_WORKLOADS:
    reference = FedjaxReference(fedjax_python, *FEDJAX_WORKLOADS[name])
    calls['fedjax'], compile_s['fedjax'], temp_mb['fedjax'] = (
        reference.call, reference.compile_seconds, None)
  try:
    timings = interleaved_medians(calls, warmup=warmup, repeats=repeats, settle=settle)
  finally:
    if reference is not None:
      reference.close()
  if reference is not None:   # the subprocess's CPU time, not this process's
    cpu = statistics.median(reference.cpu_seconds[-repeats:])
    timings['fedjax'] = timings['fedjax']._replace(cpu_seconds=cpu)
  limit = timings.get('limit')
  fedjax = timings.get('fedjax')
  arithmetic_s = flops / (peak_gflops * 1e9) if peak_gflops and flops else None
  return [{'workload': name, 'variant': variant, 'seconds': t.seconds,
           'cpu_seconds': t.cpu_seconds, 'compile_seconds': compile_s[variant],
           'xla_temp_mb': temp_mb[variant],
           'ratio_to_limit': t.seconds / limit.seconds if limit else None,
           'cpu_ratio_to_limit': t.cpu_seconds / limit.cpu_seconds if limit else None,
           'ratio_to_fedjax': t.seconds / fedjax.seconds if fedjax else None,
           'gflop': flops / 1e9 if flops else None,
           'ratio_to_arithmetic_limit': t.seconds / arithmetic_s if arithmetic_s else None,
           'auto_picks': auto,
           'fedjax_recorded': recorded_fedjax(name, fedjax is not None)}
          for variant, t in timings.items()], skipped


def machine() -> str:
  return (f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, '
          f'{jax.default_backend()} backend, jax {jax.__version__}')


# The strategies timed (rolled local steps) per user-model convolutional workload,
# and whether the Python-loop baseline runs: a full sweep at 100 clients takes an
# hour ('vmap' alone runs ~60 s rounds there, 'chunked' ~35 s).
CONV_VARIANTS = {'stock_cnn_10': (['vmap', 'chunked', 'sequential', 'loop'], True),
                 'stock_cnn_100': (['sequential'], False),
                 'resnet_10': (['vmap', 'chunked', 'sequential', 'loop'], True),
                 'resnet_100': (['sequential'], False)}
# Workloads timed only to check what 'auto' picks (issue #14): the strategies that
# compile in reasonable time, rolled local steps, no Python-loop baseline.
AUTO_CHECK_VARIANTS = ['vmap', 'chunked', 'sequential']
AUTO_CHECK_WORKLOADS = ('mlp_10', 'char_lstm_10', 'char_lstm_100', 'transformer_10',
                        'transformer_100')


def run(run_dir: str, *, quick: bool = False, dataset: str | None = None,
        seeds: int | None = None, workloads: list[str] | None = None,
        fedjax_python: str | None = None) -> dict:
  """Runs the benchmark table; `quick` times only the small workloads, briefly.

  `fedjax_python`: a Python interpreter with FedJAX 0.0.17 installed; FedJAX's
  round is then timed in the same turns as ours (CNN and MLP workloads).
  `dataset` and `seeds` are accepted for the study contract and unused (timing
  uses fixed synthetic inputs and one seed).
  """
  if fedjax_python is not None and not os.access(fedjax_python, os.X_OK):
    raise ValueError(f'--fedjax-python {fedjax_python!r} is not an executable file')
  del dataset, seeds
  reporting.prepare_run_dir(run_dir)
  if workloads is None:
    workloads = (['logreg_synthetic', 'mlp_100'] if quick else
                 ['logreg_synthetic', 'mlp_100', 'cnn_10', 'cnn_100', 'stock_cnn_10',
                  'stock_cnn_100', 'resnet_10'])
  for w in workloads:
    if w not in WORKLOADS:
      raise ValueError(f'unknown workload {w!r}; valid: {", ".join(WORKLOADS)}')
  warmup, repeats = (1, 3) if quick else (2, 9)
  peak = matmul_peak_gflops()
  print(f'float32 matmul peak now: {peak:.0f} GFLOP/s', flush=True)
  reporting.write_config(run_dir, {'study': 'benchmark', 'quick': quick, 'workloads': workloads,
                                   'batch_size': BATCH, 'examples_per_client': EXAMPLES,
                                   'warmup': warmup, 'repeats': repeats, 'machine': machine(),
                                   'fedjax_python': fedjax_python,
                                   'matmul_peak_gflops': peak})
  rows, skipped = [], []
  for w in workloads:
    slow = 'cnn' in w
    # Seconds-long CNN rounds need no settling round (and could not afford one).
    kwargs = dict(warmup=1 if slow else warmup, repeats=3 if slow else repeats,
                  settle=0 if slow else 1, fedjax_python=fedjax_python, peak_gflops=peak)
    if w in CONV_VARIANTS:
      kwargs.update(strategies=CONV_VARIANTS[w][0], unrolls=(1,), baseline=CONV_VARIANTS[w][1],
                    written_convolutions=w == 'stock_cnn_10')
    if w in AUTO_CHECK_WORKLOADS:
      kwargs.update(strategies=AUTO_CHECK_VARIANTS, unrolls=(1,), baseline=False,
                    warmup=1, repeats=3, settle=0)
    if quick:
      kwargs.update(strategies=['vmap', 'sequential'], unrolls=(1,), warmup=1, repeats=2,
                    baseline=w == 'logreg_synthetic')
    new, not_run = benchmark_workload(w, **kwargs)
    skipped += not_run
    reporting.append_metrics(run_dir, new)
    for r in new:
      vs_fedjax = (f"×{r['ratio_to_fedjax']:.2f} FedJAX measured now; "
                   if r['ratio_to_fedjax'] is not None else '')
      arithmetic = (f"×{r['ratio_to_arithmetic_limit']:.1f} arithmetic limit; "
                    if r['ratio_to_arithmetic_limit'] is not None else '')
      print(f"{r['workload']:18s} {r['variant']:28s} {r['seconds']:9.4f} s "
            f"(×{r['ratio_to_limit']:.2f} limit; {vs_fedjax}{arithmetic}"
            f"CPU {r['cpu_seconds']:.4f} s, ×{r['cpu_ratio_to_limit']:.2f}; "
            f"compile {r['compile_seconds']:.1f} s; XLA temp {r['xla_temp_mb'] or 0:.1f} MB)",
            flush=True)
    strategies = [r for r in new if r['variant'] not in ('limit', 'python_loop', 'fedjax')
                  and 'as written' not in r['variant']]
    picked = [r for r in strategies if r['variant'].startswith('auto(')]
    if picked:
      # 'auto' is timed as its own variant (the same program as the one it picks).
      fastest = min((r for r in strategies if r is not picked[0]), key=lambda r: r['seconds'])
      auto_s = picked[0]['seconds']
      print(f"{w}: 'auto' picks {picked[0]['auto_picks']} ({auto_s:.4f} s); fastest other "
            f"variant: {fastest['variant']} ({fastest['seconds']:.4f} s); auto / fastest = "
            f"{auto_s / fastest['seconds']:.2f}", flush=True)
    measured = [r['seconds'] for r in new if r['variant'] == 'fedjax']
    reference = fedjax_reference(w, measured[0] if measured else None)
    if reference:
      print(f'{w}: {reference}', flush=True)
    for i, r in enumerate(new):   # the reference once per workload, in its first row
      r['_reference'] = reference if i == 0 else ''
    rows += new
  blank = lambda v: '' if v is None else v
  table = [(r['workload'], r['variant'], r['seconds'], r['ratio_to_limit'], r['cpu_seconds'],
            r['cpu_ratio_to_limit'], r['compile_seconds'], blank(r['xla_temp_mb']),
            blank(r['ratio_to_fedjax']), blank(r['gflop']),
            blank(r['ratio_to_arithmetic_limit']), r.pop('_reference', ''))
           for r in rows]
  reporting.write_summary(
      run_dir, 'FedAvg round time (median steady-state round)',
      ['workload', 'variant', 's/round', '× limit', 'CPU s/round', 'CPU × limit', 'compile s',
       'XLA temp MB', '× FedJAX (this run)', 'GFLOP', '× arithmetic limit',
       'FedJAX (measured now, or recorded: date, machine)'], table,
      notes=f'Machine: {machine()}. Synthetic random inputs of the right shapes (timing only). '
            'Wall-clock and process CPU time (all threads) of the median steady round, the '
            'variants of a workload timed in turns (interleaved), each timed round of '
            'the dense workloads after one untimed round of the same variant. XLA temp MB: '
            'the compiled program\'s scratch memory (`memory_analysis().temp_size_in_bytes`), '
            'besides its inputs (the round\'s data) and outputs. '
            f'Arithmetic limit: GFLOP / {peak:.0f} GFLOP/s (float32 matmul measured at the '
            'start of this run). × FedJAX: against FedJAX 0.0.17 timed in the same turns '
            '(subprocess, `--fedjax-python`). '
            + (f'Not run: {"; ".join(skipped)}.' if skipped else ''))
  best = {}
  for r in rows:
    if r['variant'] not in ('limit', 'python_loop', 'fedjax'):
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
              'ratio_to_limit': r['ratio_to_limit'], 'ratio_to_fedjax': r['ratio_to_fedjax'],
              'ratio_to_arithmetic_limit': r['ratio_to_arithmetic_limit'],
              'auto_picks': r['auto_picks'], 'cpu_seconds': r['cpu_seconds'],
              'cpu_ratio_to_limit': r['cpu_ratio_to_limit']} for w, r in best.items()}


if __name__ == '__main__':
  import fedjax_sync.cli
  sys.exit(fedjax_sync.cli.main(['run', '--config', __file__] + sys.argv[1:]))
