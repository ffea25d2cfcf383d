"""Every timeline takes `aggregator=`: FedBuff, FedAsync, FedQS and FDA against numpy.

The server steps are checked on hand-made buffers (no training, so the oracles are
exact): `weighted_mean()` equals the default path, DP clipping and noise, the
trimmed mean and top-k compression follow numpy, zero-weight NaN updates stay out,
float64 stays float64. Short engine runs check that the aggregator's state persists
across aggregations, its metrics reach the run's history, and nothing retraces.
"""

import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sync import aggregators as agg
from fedjax_sync.algorithms.fed_buff import fed_async, fed_buff
from fedjax_sync.algorithms.fed_qs import (SUC, Classification, fed_qs_avg, fed_qs_sgd,
                                           feedback_weights)
from fedjax_sync.algorithms.federated import ClientOutput
from fedjax_sync.data import LocalWork, synthetic
from fedjax_sync.models.models import logistic_regression
from fedjax_sync.simulate.averaging import run_averaging
from fedjax_sync.simulate.clock import make_clock
from fedjax_sync.simulate.semi_async import AsyncConfig, AsyncRound, SemiAsyncSimulator
from tests.helpers import numpy_softmax_grad, softmax_loss

# The package exports the function `fda`, which shadows the module attribute.
fda_algorithms = importlib.import_module('fedjax_sync.algorithms.fda')

D, CLASSES = 4, 3
WORK = LocalWork(batch_size=10, steps=2)


def _params(rng, dtype=jnp.float32):
  return {'w': jnp.asarray(rng.normal(size=(D, CLASSES)), dtype),
          'b': jnp.asarray(rng.normal(size=(CLASSES,)), dtype)}


def _stacked_flat(tree):
  """Leaves `[C, ...]` → `[C, d]` float64 numpy, in tree order."""
  leaves = jax.tree.leaves(tree)
  return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], 1)


def _single_flat(tree):
  return np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in jax.tree.leaves(tree)])


def _buffer(rng, staleness, weight, *, dtype=jnp.float32, scale=1.0, nan_absent=True):
  """A buffer of K pseudo-gradients (an absent one holds NaN) and its `AsyncRound`."""
  k = len(staleness)
  updates = {'w': rng.normal(size=(k, D, CLASSES)) * scale, 'b': rng.normal(size=(k, CLASSES))}
  absent = np.asarray(weight) == 0
  if nan_absent and absent.any():
    updates['w'][absent] = np.nan
  updates = jax.tree.map(lambda x: jnp.asarray(x, dtype), updates)
  start = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=(k,) + x.shape[1:]), dtype), updates)
  outputs = ClientOutput(update=updates, state=(), aux=(),
                         metrics={'loss_sum': jnp.ones((k,)), 'num_examples': jnp.full((k,), 2.0)})
  info = AsyncRound(client_ids=jnp.arange(k, dtype=jnp.int32) + 10,
                    weight=jnp.asarray(weight, jnp.float32),
                    staleness=jnp.asarray(staleness, jnp.int32),
                    start_versions=jnp.zeros((k,), jnp.int32), start_params=start,
                    key=jax.random.key(42))
  return outputs, info


STALENESS = [0, 1, 3, 0, 2, 5]
WEIGHT = [3.0, 5.0, 0.0, 2.0, 4.0, 1.0]   # the third update is discarded (and NaN)


def _server_step(algorithm, params, outputs, info):
  state = algorithm.init(params)
  return jax.jit(algorithm.server_update)(state, outputs, info)


def _fed_buff_oracle(params, outputs, example_weighted, learning_rate):
  """numpy FedBuff: w − η Σ_i c_i s(τ_i) u_i over the counted updates."""
  counted = np.asarray(WEIGHT) > 0
  base = np.where(counted, np.asarray(WEIGHT) if example_weighted else 1.0, 0.0)
  coef = base / base.sum() * (1.0 + np.asarray(STALENESS, np.float64)) ** -0.5
  u = _stacked_flat(outputs.update)
  return _single_flat(params) - learning_rate * coef[counted] @ u[counted]


def test_fed_buff_with_weighted_mean_equals_the_default_step():
  rng = np.random.default_rng(0)
  params = _params(rng)
  outputs, info = _buffer(rng, STALENESS, WEIGHT)
  for example_weighted in (False, True):
    via, _ = _server_step(fed_buff(softmax_loss, optax.sgd(0.1), server_learning_rate=0.7,
                                   example_weighted=example_weighted,
                                   aggregator=agg.weighted_mean()), params, outputs, info)
    assert np.all(np.isfinite(_single_flat(via.params)))  # the NaN update has weight 0
    np.testing.assert_allclose(_single_flat(via.params),
                               _fed_buff_oracle(params, outputs, example_weighted, 0.7),
                               rtol=1e-6, atol=1e-6)


def test_fed_buff_clip_then_dp_matches_numpy():
  rng = np.random.default_rng(1)
  params = _params(rng)
  outputs, info = _buffer(rng, STALENESS, WEIGHT, scale=3.0)
  clip, dp_clip, z, expected_total = 1.0, 0.8, 0.5, 5.0
  u = _stacked_flat(outputs.update)
  counted = np.asarray(WEIGHT) > 0
  s = (1.0 + np.asarray(STALENESS, np.float64)) ** -0.5
  mass = np.sum(s[counted]) / counted.sum()   # b_i = 1: mean discount of the counted updates
  clipped = []
  for row in u[counted]:
    row = row * min(1.0, clip / np.linalg.norm(row))
    clipped.append(row * min(1.0, dp_clip / np.linalg.norm(row)))
  noiseless = mass * np.sum(clipped, 0) / expected_total
  # The noise: dp_fedavg's stage key (chain splits the server key per stage), one
  # normal draw per leaf, σ = z·S on the sum, divided by W, times the mass.
  stage_key = jax.random.split(info.key, 2)[1]
  draws = [np.asarray(jax.random.normal(jax.random.fold_in(stage_key, i), x.shape[1:]),
                      np.float64).reshape(-1)
           for i, x in enumerate(jax.tree.leaves(outputs.update))]
  noise = mass * z * dp_clip * np.concatenate(draws) / expected_total
  algorithm = fed_buff(softmax_loss, optax.sgd(0.1), server_learning_rate=0.5,
                       aggregator=agg.chain(agg.clip_by_norm(clip),
                                            agg.dp_fedavg(dp_clip, z, expected_total)))
  new, metrics = _server_step(algorithm, params, outputs, info)
  step = (_single_flat(params) - _single_flat(new.params)) / 0.5
  np.testing.assert_allclose(step, noiseless + noise, rtol=1e-5, atol=1e-6)
  assert np.abs(noise).max() > 1e-3 and np.abs(noiseless).max() > 1e-3   # both parts count
  np.testing.assert_allclose(metrics['aggregator/1/noise_std'], z * dp_clip)
  np.testing.assert_allclose(metrics['aggregator/1/clipped_fraction'], 1.0)
  np.testing.assert_allclose(metrics['aggregator/0/clipped_fraction'],
                             np.mean(np.linalg.norm(u[counted], axis=1) > clip))


def test_fed_buff_trimmed_mean_matches_numpy_and_ignores_discarded_nan():
  rng = np.random.default_rng(2)
  params = _params(rng)
  algorithm = fed_buff(softmax_loss, optax.sgd(0.1), aggregator=agg.trimmed_mean(0.2),
                       example_weighted=True)
  step = jax.jit(algorithm.server_update)
  outputs, info = _buffer(rng, STALENESS, WEIGHT)
  new, metrics = step(algorithm.init(params), outputs, info)
  counted = np.asarray(WEIGHT) > 0
  u = np.sort(_stacked_flat(outputs.update)[counted], axis=0)
  trimmed = u[1:-1].mean(0)                           # ⌊0.2 · 5⌋ = 1 per side
  n = np.asarray(WEIGHT)[counted]
  s = (1.0 + np.asarray(STALENESS, np.float64)[counted]) ** -0.5
  mass = np.sum(n * s) / np.sum(n)                    # b_i = n_i with example_weighted
  np.testing.assert_allclose(_single_flat(params) - _single_flat(new.params), mass * trimmed,
                             rtol=1e-5, atol=1e-6)
  assert int(metrics['aggregator/num_trimmed_per_side']) == 1
  # Every update discarded (and NaN): the model does not move.
  nothing = info._replace(weight=jnp.zeros_like(info.weight))
  outputs = outputs._replace(update=jax.tree.map(lambda x: jnp.full_like(x, jnp.nan),
                                                 outputs.update))
  new, _ = step(algorithm.init(params), outputs, nothing)
  chex.assert_trees_all_equal(new.params, params)


def test_fed_async_with_an_aggregator():
  rng = np.random.default_rng(4)
  params = _params(rng)
  outputs, info = _buffer(rng, [2, 0, 1], [1.0, 0.0, 3.0])
  plain, plain_metrics = _server_step(fed_async(softmax_loss, optax.sgd(0.1), mixing=0.6),
                                      params, outputs, info)
  via, metrics = _server_step(fed_async(softmax_loss, optax.sgd(0.1), mixing=0.6,
                                        aggregator=agg.weighted_mean()), params, outputs, info)
  chex.assert_trees_all_close(via.params, plain.params, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(metrics['mixing_rate'], plain_metrics['mixing_rate'])
  # The paper's K = 1, w ← (1 − r) w + r (w^v − A(u)), r = α (1 + τ)^(-1/2): clipping
  # acts on the one update (a robust reducer over one update would be the identity).
  one_out, one_info = _buffer(rng, [3], [2.0])
  u = _stacked_flat(one_out.update)[0]
  start = _stacked_flat(one_info.start_params)[0]
  rate = 0.6 * (1.0 + 3) ** -0.5
  new, _ = _server_step(fed_async(softmax_loss, optax.sgd(0.1), mixing=0.6,
                                  aggregator=agg.norm_bounded_mean(0.1)), params, one_out, one_info)
  expected = (1 - rate) * _single_flat(params) + rate * (start - u * 0.1 / np.linalg.norm(u))
  np.testing.assert_allclose(_single_flat(new.params), expected, rtol=1e-5, atol=1e-6)


def _fed_qs_round(rng, weight):
  """A FedQS buffer with hand-made decisions (two feedback clients) and its weights p."""
  k = len(weight)
  outputs, info = _buffer(rng, [0] * k, weight)
  decision = Classification(
      client_type=jnp.full((k,), SUC, jnp.int32), learning_rate=jnp.full((k,), 0.1),
      momentum=jnp.full((k,), 0.5), angle=jnp.asarray(rng.uniform(0.1, 1.0, k), jnp.float32),
      angle_threshold=jnp.full((k,), 0.5), frequency=jnp.ones((k,)),
      frequency_threshold=jnp.ones((k,)))
  feedback = jnp.asarray(np.arange(k) % 2 == 0)
  aux = {'feedback': feedback, 'probe_loss': jnp.ones((k,)), 'decision': decision,
         'momentum': decision.momentum}
  outputs = outputs._replace(aux=aux)
  valid = info.weight > 0
  p = feedback_weights(info.weight, feedback, jnp.zeros((k,)), jnp.zeros(()), decision.angle,
                       decision.angle_threshold[0], valid)
  return outputs, info._replace(client_ids=jnp.arange(k, dtype=jnp.int32)), np.asarray(p)


def test_fed_qs_server_steps_through_an_aggregator():
  rng = np.random.default_rng(6)
  params = _params(rng)
  outputs, info, p = _fed_qs_round(rng, WEIGHT)
  assert p[2] == 0 and np.isclose(p.sum(), 1.0)
  # FedQS-SGD: weighted_mean() is the default step w − η_g Σ p_i u_i.
  build = lambda **kw: fed_qs_sgd(softmax_loss, num_clients=len(WEIGHT),  # noqa: E731
                                  server_learning_rate=0.5, **kw)
  via, _ = _server_step(build(aggregator=agg.weighted_mean()), params, outputs, info)
  u = _stacked_flat(outputs.update)
  np.testing.assert_allclose(_single_flat(via.params),
                             _single_flat(params) - 0.5 * (p[p > 0] @ u[p > 0]),
                             rtol=1e-5, atol=1e-6)
  # FedQS-Avg with a trimmed mean: Σ p_i w^{v_i} − trimmed(u) (Σ p = 1, so no rescaling).
  algorithm = fed_qs_avg(softmax_loss, num_clients=len(WEIGHT), aggregator=agg.trimmed_mean(0.2))
  new, metrics = _server_step(algorithm, params, outputs, info)
  counted = p > 0
  trimmed = np.sort(u[counted], axis=0)[1:-1].mean(0)
  start = _stacked_flat(info.start_params)
  np.testing.assert_allclose(_single_flat(new.params), p[counted] @ start[counted] - trimmed,
                             rtol=1e-5, atol=1e-5)
  assert int(metrics['aggregator/num_trimmed_per_side']) == 1
  # FedQS's own record of the clients' updates is the raw update, not the aggregate.
  np.testing.assert_allclose(_stacked_flat(new.client_states.previous_update)[0], -u[0],
                             rtol=1e-6)


def test_float64_stays_float64_with_an_aggregator():
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    params = _params(rng, jnp.float64)
    outputs, info = _buffer(rng, STALENESS, WEIGHT, dtype=jnp.float64)
    via, _ = _server_step(fed_buff(softmax_loss, optax.sgd(0.1), aggregator=agg.chain(
        agg.clip_by_norm(1e6), agg.weighted_mean())), params, outputs, info)
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(via.params))
  # A float32 scalar on the way (a weight, the mass, a staleness factor) would be ~1e-8 off.
  np.testing.assert_allclose(_single_flat(via.params),
                             _fed_buff_oracle(params, outputs, False, 1.0), rtol=1e-12, atol=1e-12)


def test_an_aggregator_that_does_not_reduce_is_rejected():
  for build in (fed_buff, fed_async):
    with pytest.raises(ValueError, match='does not reduce'):
      build(softmax_loss, optax.sgd(0.1), aggregator=agg.clip_by_norm(1.0))
  with pytest.raises(ValueError, match='does not reduce'):
    fed_qs_sgd(softmax_loss, num_clients=4, aggregator=agg.top_k(2))
  with pytest.raises(ValueError, match='does not reduce'):
    fda_algorithms.local_sgd(softmax_loss, optax.sgd(0.1), num_workers=2, period=1,
                             aggregator=agg.clip_by_norm(1.0))


# ---------------------------------------------------------------------------------
# An engine run: state persists, metrics reach the history, one trace.

def test_semi_async_run_keeps_the_residual_and_reports_metrics_without_retracing():
  data = synthetic(num_clients=8, seed=0)
  model = logistic_regression((60,), 10)
  clock = make_clock(np.linspace(1.0, 5.0, 8))
  config = AsyncConfig(4, 2, LocalWork(batch_size=10, steps=1), eval_every=2, seed=1)
  aggregator = agg.chain(agg.top_k(fraction=0.1), agg.weighted_mean())
  algorithm = fed_buff(model.loss, optax.sgd(0.05), aggregator=aggregator, num_clients=8)
  traces = []
  counted = algorithm._replace(client_update=lambda *a: (traces.append(1),
                                                         algorithm.client_update(*a))[1])
  sim = SemiAsyncSimulator(counted, model, data, clock, config)
  result = sim.run(sim.init(), evaluate=False)
  rows = result.history
  assert len(rows) == 4 and all(r['aggregator/0/residual_norm'] > 0 for r in rows)
  assert all(r['aggregator/0/bits_per_client'] < 32 * 610 for r in rows)
  # The residual persists: after the run it is nonzero exactly for the clients
  # aggregated so far (the same two blocks again, already compiled, give their ids).
  state, ids = sim.init(), set()
  for _ in range(2):
    state, metrics = sim.run_aggregations(state, 2)
    ids |= set(np.asarray(metrics['client_ids']).ravel().tolist())
  assert len(traces) == 1                   # four blocks of two aggregations, one program
  residual = result.state.server.aggregator_state.stages[0].residual
  norms = np.linalg.norm(_stacked_flat(residual), axis=1)
  assert set(np.flatnonzero(norms > 0).tolist()) == ids and len(ids) < 8
  chex.assert_trees_all_equal(state.server.aggregator_state, result.state.server.aggregator_state)


# ---------------------------------------------------------------------------------
# FDA: the synchronization through an aggregator.

K, B = 4, 6


def _worker_batches(seed):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(K, B, D)) + np.arange(K)[:, None, None], jnp.float32)
  y = jnp.asarray(rng.integers(0, CLASSES, size=(K, B)), jnp.int32)
  return {'x': x, 'y': y}, jnp.ones((K, B), bool)


def _top_k_rows(rows, k):
  out = np.zeros_like(rows)
  for i, row in enumerate(rows):
    keep = np.argsort(-np.abs(row), kind='stable')[:k]
    out[i, keep] = row[keep]
  return out


def test_fda_synchronization_through_compression_matches_numpy():
  rng = np.random.default_rng(6)
  params = _params(rng)
  kk = 5
  compressed = fda_algorithms.local_sgd(softmax_loss, optax.sgd(0.3), num_workers=K, period=1,
                                        aggregator=agg.chain(agg.top_k(kk), agg.weighted_mean()))
  batch, mask = _worker_batches(0)
  key = jax.random.key(3)
  state, metrics = jax.jit(compressed.step)(compressed.init(params), batch, mask, key)
  assert bool(metrics['synced'])
  w0 = _single_flat(params)
  # Each worker's one SGD step in numpy; u_k = w0 − w_k = η ∇L_k(w0).
  u = np.stack([0.3 * _single_flat(numpy_softmax_grad(params, np.asarray(batch['x'][k]),
                                                      np.asarray(batch['y'][k])))
                for k in range(K)])
  sent = _top_k_rows(u, kk)
  np.testing.assert_allclose(_single_flat(state.anchor), w0 - sent.mean(0), rtol=1e-5, atol=1e-6)
  residual = _stacked_flat(state.aggregator_state.stages[0].residual)
  np.testing.assert_allclose(residual, u - sent, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics['aggregator/0/residual_norm'],
                             np.mean(np.linalg.norm(u - sent, axis=1)), rtol=1e-5)
  # weighted_mean() with drift weights ρ_k ∝ ‖u_k‖² is the default rule w0 − Σ ρ_k u_k.
  drift = fda_algorithms.local_sgd(softmax_loss, optax.sgd(0.3), num_workers=K, period=1,
                                   weighting='drift', aggregator=agg.weighted_mean())
  state, _ = jax.jit(drift.step)(drift.init(params), batch, mask, key)
  rho = np.sum(u ** 2, 1) / np.sum(u ** 2)
  np.testing.assert_allclose(_single_flat(state.anchor), w0 - rho @ u, rtol=1e-5, atol=1e-6)


def test_fda_run_with_compression_reports_and_does_not_retrace():
  data = synthetic(num_clients=K, seed=0)
  model = logistic_regression((60,), 10)
  traces = []

  def counting_loss(p, batch, key):
    traces.append(1)
    return model.loss(p, batch, key)

  aggregator = agg.chain(agg.top_k(fraction=0.05), agg.weighted_mean())
  algorithm = fda_algorithms.fda(counting_loss, optax.sgd(0.3), num_workers=K, threshold=0.0,
                                 estimator='naive', aggregator=aggregator, track_variance=False)
  evaluate = lambda p: {'test_accuracy': jnp.zeros(())}  # noqa: E731
  runs = [run_averaging(algorithm, model, data, num_steps=4, batch_size=8, eval_every=2,
                        seed=seed, evaluate=evaluate)
          for seed in (0, 1)]
  assert len(traces) == 1                   # two runs of two blocks: one compiled block
  result = runs[0]
  assert int(result.state.num_syncs) == 4
  assert result.steps['aggregator/0/bits_per_client'].shape == (4,)
  assert all(row['aggregator/0/compression_ratio'] > 1 for row in result.history)
  assert np.all(np.isfinite(_single_flat(result.state.anchor)))
  assert all(row['aggregator/0/residual_norm'] > 0 for row in result.history)
  # Another seed draws other batches.
  assert not np.allclose(_single_flat(runs[1].state.anchor), _single_flat(result.state.anchor))
