"""Client execution: chunked rounds that reduce updates as they are produced."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync import tree as tree_lib
from fedjax_sync.clients.execution import ClientExecution, map_reduce_clients
from fedjax_sync.data.batching import client_batch_from_arrays, pad_clients

MODEL = fs.models.logistic_regression((6,), 3)


def _batch(sizes, seed=0):
  rng = np.random.default_rng(seed)
  clients = [{'x': rng.normal(size=(n, 6)).astype(np.float32),
              'y': rng.integers(0, 3, size=n).astype(np.int32)} for n in sizes]
  return client_batch_from_arrays(clients, batch_size=4, num_steps=3)


def _round(execution, batch):
  algorithm = fs.fed_avg(MODEL.loss, optax.sgd(0.1), execution=execution)
  state = algorithm.init(MODEL.init(jax.random.key(0)))
  return jax.jit(algorithm.round)(state, batch, jax.random.key(1))


def _materialized_round(batch):
  """The reference: every update materialized, `[C, d]`, then reduced by the aggregator.

  A chain is not the plain weighted mean, so the round cannot stream."""
  aggregator = fs.chain(fs.weighted_mean(), optax.scale(1.0))
  algorithm = fs.fed_avg(MODEL.loss, optax.sgd(0.1), execution=ClientExecution('vmap'),
                         aggregator=aggregator)
  state = algorithm.init(MODEL.init(jax.random.key(0)))
  return jax.jit(algorithm.round)(state, batch, jax.random.key(1))


STREAMED = [ClientExecution('vmap'), ClientExecution('sequential'), ClientExecution('loop'),
            ClientExecution('chunked', 2), ClientExecution('chunked', 7)]


@pytest.mark.parametrize('execution', STREAMED, ids=lambda e: f'{e.strategy}{e.chunk_size or ""}')
@pytest.mark.parametrize('sharded', [False, True])
def test_streamed_round_equals_materialized(execution, sharded):
  batch = _batch([5, 12, 0, 9, 3, 12, 7])   # one empty client; 7 is prime
  reference, ref_metrics = _materialized_round(batch)
  if sharded:
    execution = execution._replace(mesh=fs.client_mesh())
  state, metrics = _round(execution, pad_clients(batch, execution.num_shards))
  chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  jax.tree.map(chex_close, state.params, reference.params)
  for k in ('train_loss', 'update_norm', 'num_participants', 'client_drift_rms'):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-4, atol=1e-6)
  chex_close(metrics['client_loss'][:7], ref_metrics['client_loss'])
  # Every round reports the RMS drift; only a materialized one the mean distance.
  assert 'client_drift' not in metrics and 'client_drift' in ref_metrics


def test_drift_rms_closed_form():
  # client_drift_rms² = Σ p_k ‖u_k − ū‖² (weighted variance of the updates).
  batch = _batch([4, 8, 12])
  algorithm = fs.fed_avg(MODEL.loss, optax.sgd(0.1))
  params = MODEL.init(jax.random.key(0))
  state = algorithm.init(params)
  train = fs.make_local_training(fs.make_local_step(MODEL.loss, optax.sgd(0.1)))
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.split(jax.random.key(1))[0], i))(
      batch.client_ids)
  opt_state = optax.sgd(0.1).init(params)
  local = jax.vmap(lambda d, m, k: train(params, opt_state, d, m, k)[0])(batch.data, batch.mask, keys)
  updates = jax.tree.map(lambda g, l: g[None] - l, params, local)
  flat = np.asarray(tree_lib.client_flatten(updates), np.float64)
  p = np.asarray(batch.weight, np.float64) / float(np.sum(batch.weight))
  mean = p @ flat
  expected = np.sqrt(p @ np.sum((flat - mean) ** 2, axis=1))
  del state, algorithm
  _, metrics = _round(ClientExecution('chunked', 2), batch)
  np.testing.assert_allclose(metrics['client_drift_rms'], expected, rtol=1e-4)


def test_non_linear_aggregator_materializes_and_still_agrees():
  # A chain is not the plain weighted mean: the chunked strategy falls back to
  # map_clients (all [C, d] updates), still equal to vmap.
  batch = _batch([5, 12, 9])
  agg = fs.chain(fs.weighted_mean(), optax.scale(1.0))
  runs = []
  for execution in (ClientExecution('vmap'), ClientExecution('chunked', 2)):
    algorithm = fs.fed_avg(MODEL.loss, optax.sgd(0.1), execution=execution, aggregator=agg)
    state = algorithm.init(MODEL.init(jax.random.key(0)))
    runs.append(jax.jit(algorithm.round)(state, batch, jax.random.key(1)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
               runs[0][0].params, runs[1][0].params)
  assert 'client_drift' in runs[1][1]


@pytest.mark.parametrize('execution', STREAMED, ids=lambda e: f'{e.strategy}{e.chunk_size or ""}')
def test_map_reduce_clients_oracle(execution):
  x = jnp.arange(10 * 3, dtype=jnp.float32).reshape(10, 3)
  w = jnp.linspace(0.0, 1.0, 10)
  total, per, sq = map_reduce_clients(lambda a: (a * 2.0, a[0]), (x,), w, execution)
  np.testing.assert_allclose(total, np.asarray(w) @ (2.0 * np.asarray(x)), rtol=1e-6)
  np.testing.assert_array_equal(per, x[:, 0])
  np.testing.assert_allclose(sq, np.sum((2.0 * np.asarray(x)) ** 2, axis=1), rtol=1e-6)


def test_execution_validation():
  with pytest.raises(ValueError, match='chunk_size'):
    ClientExecution('chunked', 0).validate()
  with pytest.raises(ValueError, match="unknown client execution 'batched'; valid: vmap"):
    ClientExecution('batched').validate()


@pytest.mark.parametrize('execution', STREAMED, ids=lambda e: f'{e.strategy}{e.chunk_size or ""}')
def test_streamed_round_traces_the_loss_once_and_compiles_once(execution):
  rounds, losses = [], []

  def counted_loss(params, batch, key):
    losses.append(1)
    return MODEL.loss(params, batch, key)

  algorithm = fs.fed_avg(counted_loss, optax.sgd(0.1), execution=execution)

  def counted(state, batch, key):
    rounds.append(1)
    return algorithm.round(state, batch, key)

  round_fn = jax.jit(counted)
  state = algorithm.init(MODEL.init(jax.random.key(0)))
  for r in range(3):
    state, _ = round_fn(state, _batch([5, 6, 7], seed=r), jax.random.key(r))
  assert len(rounds) == 1
  # One trace of the local step (the scan body) per traced client function; 'loop'
  # traces one client function per client.
  assert len(losses) == (3 if execution.strategy == 'loop' else 1)


def test_auto_strategy_resolves_by_size_on_cpu_and_agrees():
  from fedjax_sync.clients.execution import CPU_VMAP_MAX_BYTES, resolve_strategy
  update = lambda x: x * 2.0
  small = jnp.zeros((10, CPU_VMAP_MAX_BYTES // 40))   # 10 clients' outputs: exactly the limit
  big = jnp.zeros((11, CPU_VMAP_MAX_BYTES // 40))
  assert resolve_strategy('auto', update, (small,)) == 'vmap'
  assert resolve_strategy('auto', update, (big,)) == 'sequential'
  assert resolve_strategy('chunked', update, (big,)) == 'chunked'
  batch = _batch([5, 12, 9])
  reference, _ = _materialized_round(batch)
  state, _ = _round(ClientExecution('auto'), batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
               state.params, reference.params)


def test_floyd_sampling_of_a_large_population_is_distinct_and_uniform():
  from fedjax_sync.data.batching import FLOYD_MIN_POPULATION, sample_clients
  n = FLOYD_MIN_POPULATION
  counts = jnp.ones((n,), jnp.int32)
  sample = jax.jit(jax.vmap(lambda k: sample_clients(k, counts, 8)))
  ids = np.asarray(sample(jax.random.split(jax.random.key(0), 4000)))
  assert ids.min() >= 0 and ids.max() < n
  assert all(len(set(row)) == 8 for row in ids)
  # Uniform inclusion: each of 16 equal blocks of ids gets 1/16 of the 32,000 draws
  # (expected 2000, sd ≈ 43; a bias toward the top ids would show in the last block).
  blocks = np.bincount(ids.ravel() * 16 // n, minlength=16)
  assert np.all(np.abs(blocks - 2000) < 250), blocks


@pytest.mark.parametrize('sharded', [False, True])
def test_loop_strategy_agrees_with_vmap(sharded):
  batch = _batch([5, 12, 9, 4])
  reference, ref_metrics = _round(ClientExecution('vmap'), batch)
  mesh = fs.client_mesh() if sharded else None
  state, metrics = _round(ClientExecution('loop', mesh=mesh), batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
               state.params, reference.params)
  np.testing.assert_allclose(metrics['client_loss'], ref_metrics['client_loss'], rtol=1e-5)


@pytest.mark.parametrize('strategy', ['sequential', 'chunked'])
def test_streamed_round_memory_does_not_grow_with_the_clients(strategy):
  # XLA's scratch memory for the compiled round: streamed rounds hold one client's
  # (or one chunk's) update, so it stays flat from 8 to 64 clients; a materialized
  # round holds all C updates, so it grows with C.
  model = fs.models.mlp((32,), 4, hidden=(256,))   # 9,476 params: 37 KB per update
  params = model.init(jax.random.key(0))

  def temp_bytes(clients, aggregator=None):
    rng = np.random.default_rng(0)
    data = [{'x': rng.normal(size=(8, 32)).astype(np.float32),
             'y': rng.integers(0, 4, size=8).astype(np.int32)} for _ in range(clients)]
    batch = client_batch_from_arrays(data, batch_size=4, num_steps=2)
    kwargs = {} if aggregator is None else {'aggregator': aggregator}
    algorithm = fs.fed_avg(model.loss, optax.sgd(0.1),
                           execution=ClientExecution(strategy, 4 if strategy == 'chunked' else None),
                           **kwargs)
    compiled = jax.jit(algorithm.round).lower(algorithm.init(params), batch,
                                              jax.random.key(1)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  update = 9476 * 4
  streamed = [temp_bytes(c) for c in (8, 64)]
  assert streamed[1] - streamed[0] < 4 * update, streamed
  materialized = [temp_bytes(c, fs.chain(fs.weighted_mean(), optax.scale(1.0))) for c in (8, 64)]
  assert materialized[1] - materialized[0] > 50 * update, materialized


@pytest.mark.parametrize('strategy', ['sequential', 'vmap'])
def test_padded_local_steps_are_skipped_on_cpu_and_change_nothing(strategy):
  # Clients of 2, 5 and 12 examples, batch 4, 3 steps: 1 + 2 + 3 real steps of 9.
  calls = []

  def counted_loss(params, batch, key):
    jax.debug.callback(lambda: calls.append(1))
    return MODEL.loss(params, batch, key)

  batch = _batch([2, 5, 12])
  results = {}
  for skip in (True, False):
    optimizer = optax.sgd(0.1)
    step = fs.make_local_step(counted_loss, optimizer)
    train = fs.make_local_training(step, skip_padded_steps=skip)
    params = MODEL.init(jax.random.key(0))
    run = lambda d, m: train(params, optimizer.init(params), d, m, jax.random.key(1))[::2]
    if strategy == 'vmap':
      run = jax.vmap(run)
    else:
      run = lambda d, m, one=run: jax.lax.map(lambda a: one(*a), (d, m))
    calls.clear()
    results[skip] = jax.block_until_ready(jax.jit(run)(batch.data, batch.mask))
    results[skip, 'calls'] = len(calls)
  jax.tree.map(np.testing.assert_array_equal, results[True], results[False])
  if strategy == 'sequential':   # one client at a time branches around its padded steps
    assert (results[False, 'calls'], results[True, 'calls']) == (9, 6)
  else:   # one batched call per step; under vmap a cond is a select of both branches
    assert (results[False, 'calls'], results[True, 'calls']) == (3, 3)
