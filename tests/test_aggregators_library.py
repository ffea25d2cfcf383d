"""Oracle tests of the aggregator library against numpy and closed forms."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync import aggregators as agg
from fedjax_sync.aggregators import secure


def _apply(aggregator, updates, weights=None, ids=None, state=None, key=None, num_clients=None):
  params = jax.tree.map(lambda x: x[0], updates)
  state = aggregator.init(params, num_clients) if state is None else state
  key = jax.random.key(0) if key is None else key
  return jax.jit(aggregator.apply)(updates, weights, state, key, ids)


def _rng(seed=0):
  return np.random.default_rng(seed)


# ---------------------------------------------------------------- robust reducers


@pytest.mark.parametrize('num', [7, 8])
def test_coordinate_median_matches_numpy(num):
  x = _rng(num).normal(size=(num, 5, 3)).astype(np.float32)
  x[:, 0, 0] = 1.0  # ties
  w = np.ones(num, np.float32)
  w[2] = 0.0
  out, state = _apply(agg.coordinate_median(), {'a': x}, jnp.asarray(w))
  np.testing.assert_array_equal(np.asarray(out['a']), np.median(x[w > 0], axis=0).astype(np.float32))
  assert int(state.metrics['num_present']) == num - 1


def test_coordinate_median_exact_on_large_leaf_with_padding_chunks():
  x = _rng(1).normal(size=(5, 4096 + 37)).astype(np.float32) * 1e3
  out, _ = _apply(agg.coordinate_median(), x, jnp.ones(5))
  np.testing.assert_array_equal(np.asarray(out), np.median(x, axis=0))


@pytest.mark.parametrize('beta,num', [(0.1, 10), (0.2, 9), (0.34, 7), (0.0, 4)])
def test_trimmed_mean_matches_numpy(beta, num):
  rng = _rng(num)
  x = rng.integers(-3, 4, size=(num, 6, 2)).astype(np.float32)  # many ties
  x[:, :2] = rng.normal(size=(num, 2, 2))
  w = np.r_[np.ones(num - 1), 0.0].astype(np.float32)
  out, state = _apply(agg.trimmed_mean(beta), {'a': x}, jnp.asarray(w))
  present = np.sort(x[w > 0], axis=0)
  k = present.shape[0]
  b = int(math.floor(beta * k + 1e-6))
  np.testing.assert_allclose(np.asarray(out['a']), present[b:k - b].mean(axis=0), atol=1e-6)
  assert int(state.metrics['num_trimmed_per_side']) == b


def _krum_loop(x, f, m):
  """Direct loop over pairs (numpy, float64)."""
  k = len(x)
  flat = x.reshape(k, -1).astype(np.float64)
  scores = []
  for i in range(k):
    d = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(k) if j != i)
    scores.append(sum(d[:max(k - f - 2, 1)]))
  best = np.argsort(scores, kind='stable')[:m]
  return flat[best].mean(axis=0).reshape(x.shape[1:]), best


@pytest.mark.parametrize('f,m', [(1, 1), (2, 1), (1, 3), (0, 5)])
def test_krum_and_multi_krum_match_direct_loop(f, m):
  rng = _rng(f * 10 + m)
  x = rng.normal(size=(9, 4, 3)).astype(np.float32)
  x[:2] += 20.0  # two outliers
  w = np.r_[np.ones(8), 0.0].astype(np.float32)
  ids = jnp.arange(100, 109)
  out, state = _apply(agg.multi_krum(f, m), {'a': x}, jnp.asarray(w), ids)
  expected, best = _krum_loop(x[:8], f, m)
  np.testing.assert_allclose(np.asarray(out['a']), expected, rtol=1e-5, atol=1e-5)
  assert int(state.metrics['selected_client']) == 100 + best[0]
  assert int(state.metrics['num_selected']) == m
  assert not set(best) & {0, 1}  # the outliers are never selected


def _weiszfeld_numpy(x, w, iters, nu):
  flat = x.reshape(len(x), -1).astype(np.float64)
  p = w / w.sum()
  z = p @ flat
  for _ in range(iters):
    beta = w / np.maximum(np.linalg.norm(flat - z, axis=1), nu)
    z = beta @ flat / beta.sum()
  return z.reshape(x.shape[1:])


def test_geometric_median_matches_numpy_weiszfeld():
  rng = _rng(5)
  x = rng.normal(size=(6, 10)).astype(np.float32)
  x[0] += 50.0
  w = np.array([1.0, 2.0, 1.0, 3.0, 0.5, 0.0], np.float32)
  out, state = _apply(agg.geometric_median(20, 1e-6), x, jnp.asarray(w))
  expected = _weiszfeld_numpy(x[:5], w[:5].astype(np.float64), 20, 1e-6)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4)
  objective = np.sum(w[:5] * np.linalg.norm(x[:5] - expected, axis=1)) / w[:5].sum()
  np.testing.assert_allclose(float(state.metrics['objective']), objective, rtol=1e-4)
  # Robust: far less pulled by the outlier than the weighted mean.
  mean = (w[:5] @ x[:5]) / w[:5].sum()
  assert np.linalg.norm(np.asarray(out)) < 0.3 * np.linalg.norm(mean)


def test_norm_bounded_mean_matches_numpy():
  x = _rng(2).normal(size=(5, 8)).astype(np.float32) * np.array([[0.1], [1], [3], [5], [0.5]],
                                                                   np.float32)
  w = np.array([1, 2, 3, 1, 0], np.float32)
  out, state = _apply(agg.norm_bounded_mean(1.0), x, jnp.asarray(w))
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  clipped = x * np.minimum(1.0, 1.0 / norms)
  np.testing.assert_allclose(np.asarray(out), (w @ clipped) / w.sum(), rtol=1e-5, atol=1e-6)
  present = w > 0
  assert float(state.metrics['clipped_fraction']) == pytest.approx(
      np.mean(norms[present, 0] > 1.0))


# ---------------------------------------------------------------- client transforms


def test_clip_by_norm_bounds_norm_keeps_direction():
  x = {'a': _rng(3).normal(size=(6, 4, 5)).astype(np.float32),
       'b': _rng(4).normal(size=(6, 3)).astype(np.float32)}
  x['a'][0] *= 1e-3
  out, state = _apply(agg.clip_by_norm(2.0), x, jnp.ones(6))
  norms_in = np.sqrt(np.sum(x['a'].reshape(6, -1) ** 2, 1) + np.sum(x['b'] ** 2, 1))
  norms_out = np.asarray(fs.tree.client_sq_norms(out)) ** 0.5
  np.testing.assert_allclose(norms_out, np.minimum(norms_in, 2.0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out['b']),
                             x['b'] * np.minimum(1, 2.0 / norms_in)[:, None], rtol=1e-5)
  assert float(state.metrics['clipped_fraction']) == pytest.approx(np.mean(norms_in > 2.0))


def test_adaptive_clip_geometric_update():
  x = np.diag(np.array([0.5, 1.0, 2.0, 4.0], np.float32))  # norms 0.5, 1, 2, 4
  aggregator = agg.adaptive_clip(initial_clip_norm=1.5, target_quantile=0.5, learning_rate=0.2)
  w = jnp.array([1.0, 1.0, 1.0, 0.0])  # client 4 absent
  out, state = _apply(aggregator, x, w)
  # unclipped fraction among the 3 present = 2/3; C ← 1.5 exp(−0.2 (2/3 − 0.5)).
  assert float(state.clip_norm) == pytest.approx(1.5 * math.exp(-0.2 * (2 / 3 - 0.5)), rel=1e-6)
  assert float(state.metrics['clip_norm']) == pytest.approx(1.5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out), axis=1)[:3], [0.5, 1.0, 1.5],
                             rtol=1e-6)
  # Iterating drives C to the median norm of the present clients (1.0) and keeps it
  # within one step factor exp(0.2 · 1/6) of it.
  for _ in range(200):
    _, state = _apply(aggregator, x, w, state=state)
  step = math.exp(0.2 / 6)
  assert 1.0 / step - 1e-4 <= float(state.clip_norm) <= step + 1e-4


def test_zero_invalid_updates_counts_and_zeroes():
  x = np.ones((5, 3), np.float32)
  x[1, 0] = np.nan
  x[2, 2] = np.inf
  x[3] *= 10.0
  x[4, 0] = np.nan  # absent client: zeroed but not counted
  out, state = _apply(agg.zero_invalid_updates(max_norm=5.0), x, jnp.array([1, 1, 1, 1, 0.0]))
  np.testing.assert_array_equal(np.asarray(out), np.r_[np.ones((1, 3)), np.zeros((4, 3))])
  assert int(state.metrics['zeroed_count']) == 3
  out, state = _apply(agg.zero_invalid_updates(), x, jnp.ones(5))
  assert int(state.metrics['zeroed_count']) == 3  # the oversized one is kept without max_norm
  np.testing.assert_array_equal(np.asarray(out[3]), x[3])


def test_stochastic_quantize_unbiased_on_grid_with_bits():
  """Mean of T = 4000 draws within 5 standard errors of the input (fixed seed).

  Each coordinate's draw has variance ≤ (‖v‖/s)²/4, so the standard error of the
  mean is ≤ ‖v‖/(2s√T); 5 standard errors bound a false failure by ~1e-5 per
  coordinate."""
  levels, draws = 4, 4000
  v = _rng(6).normal(size=(1, 12)).astype(np.float32)
  aggregator = agg.stochastic_quantize(levels)
  state = aggregator.init(v[0])
  stacked = jnp.broadcast_to(jnp.asarray(v), (draws, 12))
  out, state = jax.jit(aggregator.apply)(stacked, jnp.ones(draws), state, jax.random.key(1),
                                         jnp.arange(draws))
  out = np.asarray(out)
  norm = np.linalg.norm(v)
  bound = 5 * norm / (2 * levels * math.sqrt(draws))
  assert np.max(np.abs(out.mean(0) - v[0])) < bound
  grid = out / norm * levels  # ξ · sign, integers in [−s, s]
  np.testing.assert_allclose(grid, np.round(grid), atol=1e-4)
  assert np.abs(grid).max() <= levels + 1e-4
  assert float(state.metrics['bits_per_client']) == 32 + 12 * (1 + 3)


def test_top_k_error_feedback_conserves_mass_and_persists_per_client():
  rng = _rng(7)
  num_clients, d, k = 6, 10, 3
  aggregator = agg.top_k(k)
  params = jnp.zeros((d,))
  state = aggregator.init(params, num_clients)
  apply = jax.jit(aggregator.apply)
  residual = np.zeros((num_clients, d), np.float32)
  for step in range(4):
    chosen = rng.permutation(num_clients)[:3]
    ids = np.r_[chosen, chosen[0]].astype(np.int32)
    w = np.array([1, 1, 1, 0], np.float32)  # the last slot repeats an id with weight 0
    x = rng.normal(size=(4, d)).astype(np.float32)
    old = residual[ids]
    sent, state = apply(jnp.asarray(x), jnp.asarray(w), state, None, jnp.asarray(ids))
    sent = np.asarray(sent)
    assert np.all(np.sum(sent != 0, axis=1) == k)
    new = np.asarray(state.residual)
    # sent + new residual = input + old residual (exactly: each coordinate is
    # either sent or kept).
    np.testing.assert_array_equal(sent[:3] + new[ids[:3]], x[:3] + old[:3])
    # Kept coordinates are the k largest |input + old residual|.
    corrected = x[:3] + old[:3]
    for c in range(3):
      top = np.argsort(-np.abs(corrected[c]))[:k]
      assert set(np.flatnonzero(sent[c])) == set(top)
    untouched = np.setdiff1d(np.arange(num_clients), ids[:3])
    np.testing.assert_array_equal(new[untouched], residual[untouched])
    residual = new
  assert float(state.metrics['bits_per_client']) == k * (32 + 4)


def test_top_k_requires_population_size():
  with pytest.raises(ValueError, match='num_clients'):
    agg.top_k(2).init(jnp.zeros(4), None)
  with pytest.raises(ValueError, match='exactly one of k and fraction'):
    agg.top_k(2, fraction=0.1)


def test_random_k_unbiased_and_sparse():
  d, draws = 50, 4000
  v = np.linspace(-1, 1, d).astype(np.float32)
  aggregator = agg.random_k(fraction=0.2)
  out, _ = _apply(aggregator, jnp.broadcast_to(jnp.asarray(v), (draws, d)), jnp.ones(draws),
                  jnp.arange(draws))
  out = np.asarray(out)
  kept = np.mean(out != 0)
  assert abs(kept - 0.2) < 0.01
  # Each draw is v/p with prob p else 0: std per coordinate ≤ |v| √((1−p)/p).
  bound = 5 * np.abs(v) * math.sqrt(0.8 / 0.2) / math.sqrt(draws) + 1e-6
  assert np.all(np.abs(out.mean(0) - v) <= bound)


def test_attacks_rewrite_chosen_positions():
  x = jnp.ones((5, 2))
  out, state = _apply(agg.sign_flip_attack(3.0, num_attackers=2), x, jnp.array([1, 1, 1, 0, 1.0]))
  np.testing.assert_array_equal(np.asarray(out[:, 0]), [-3, -3, 1, 1, 1])
  assert int(state.metrics['num_attackers']) == 2
  out, state = _apply(agg.scale_attack(10.0, positions=(1, 3)), x, jnp.array([1, 1, 1, 0, 1.0]))
  np.testing.assert_array_equal(np.asarray(out[:, 0]), [1, 10, 1, 10, 1])
  assert int(state.metrics['num_attackers']) == 1  # position 3 is absent
  out, _ = _apply(agg.scale_attack(2.0, fraction=0.4), x, jnp.ones(5))
  np.testing.assert_array_equal(np.asarray(out[:, 0]), [2, 2, 1, 1, 1])
  with pytest.raises(ValueError, match='exactly one'):
    agg.scale_attack(2.0)


# ---------------------------------------------------------------- privacy


def test_dp_fedavg_noise_std_matches_sigma():
  d, clip, z, expected = 40000, 0.5, 1.3, 4.0
  x = jnp.zeros((3, d))
  out, state = _apply(agg.dp_fedavg(clip, z, expected), x, jnp.ones(3), key=jax.random.key(3))
  measured = float(np.std(np.asarray(out)))
  # Sample std of n normals: relative standard error 1/√(2n) ≈ 0.35%; 2% is ≈ 5.7 SE.
  assert measured == pytest.approx(z * clip / expected, rel=0.02)
  assert float(state.metrics['noise_std_of_mean']) == pytest.approx(z * clip / expected)


def test_dp_fedavg_without_noise_is_clipped_fixed_denominator_sum():
  x = _rng(8).normal(size=(4, 6)).astype(np.float32) * 3
  w = np.array([5.0, 1.0, 2.0, 0.0], np.float32)
  out, state = _apply(agg.dp_fedavg(1.0, 0.0, 10.0), x, jnp.asarray(w))
  clipped = x * np.minimum(1.0, 1.0 / np.linalg.norm(x, axis=1, keepdims=True))
  np.testing.assert_allclose(np.asarray(out), clipped[:3].sum(0) / 10.0, rtol=1e-5, atol=1e-6)
  assert float(state.metrics['total_weight']) == 3.0
  out, _ = _apply(agg.dp_fedavg(1.0, 0.0, 10.0, weight_cap=2.0), x, jnp.asarray(w))
  omega = np.minimum(w / 2.0, 1.0)
  np.testing.assert_allclose(np.asarray(out), omega @ clipped / 10.0, rtol=1e-5, atol=1e-6)


def test_dp_accounting_properties():
  eps = agg.dp_epsilon(1.0, 0.01, 1000, 1e-5)
  assert 1.0 < eps < 4.0
  assert agg.dp_epsilon(1.0, 0.01, 1000, 1e-5, accountant='pld') <= eps
  assert agg.dp_epsilon(1.0, 0.01, 2000, 1e-5) > eps
  assert agg.dp_epsilon(2.0, 0.01, 1000, 1e-5) < eps
  z = agg.dp_noise_multiplier(eps, 0.01, 1000, 1e-5)
  assert z == pytest.approx(1.0, rel=1e-2)
  with pytest.raises(ValueError, match='accountant'):
    agg.dp_epsilon(1.0, 0.01, 10, 1e-5, accountant='moments')
  with pytest.raises(ValueError, match='sampling_rate'):
    agg.dp_epsilon(1.0, 1.5, 10, 1e-5)


# ---------------------------------------------------------------- secure aggregation


@pytest.mark.parametrize('neighbors,bits', [(None, 32), (2, 32), (4, 20)])
def test_secure_sum_exact_with_and_without_dropouts(neighbors, bits):
  num, d = 9, 64
  x = _rng(9).uniform(-1, 1, size=(num, d)).astype(np.float32)
  ids = jnp.asarray(_rng(10).permutation(50)[:num], jnp.int32)
  levels = secure.ring_levels(num, bits)
  encoded = secure.quantize_to_ring(jnp.asarray(x), 1.0, levels, bits)
  key = jax.random.key(11)
  options = dict(num_neighbors=neighbors, modulus_bits=bits)
  masked = jax.jit(functools.partial(secure.mask_inputs, **options))(encoded, ids, key)
  unmask = jax.jit(functools.partial(secure.unmask_sum, **options))
  # What the server sees carries no visible trace of the inputs.
  assert np.mean(np.asarray(masked) == np.asarray(encoded)) < 0.01
  for dropped in ([], [3], [0, 4, 8]):
    survivors = np.ones(num, bool)
    survivors[dropped] = False
    total = unmask(masked, jnp.asarray(survivors), ids, key)
    plain = np.sum(np.asarray(encoded, np.uint64)[survivors], axis=0) % (1 << bits)
    np.testing.assert_array_equal(np.asarray(total, np.uint64), plain)  # integer equality
    signed = np.round(x[survivors] * levels).astype(np.int64).sum(0)
    np.testing.assert_array_equal(np.asarray(secure.decode_ring_sum(total, bits)), signed)


def test_secure_aggregation_mean_abort_and_metrics():
  num, d = 6, 30
  x = _rng(12).uniform(-2, 2, size=(num, d)).astype(np.float32)
  w = jnp.array([1, 1, 0, 1, 1, 1.0])
  out, state = _apply(agg.secure_aggregation(1.0), x, w, jnp.arange(num), key=jax.random.key(2))
  plain = np.clip(x, -1, 1)[np.asarray(w) > 0].mean(0)
  levels = secure.ring_levels(num)
  assert np.max(np.abs(np.asarray(out) - plain)) <= 0.5 / levels + 1e-6
  assert int(state.metrics['dropped']) == 1 and int(state.metrics['aborted']) == 0
  assert int(state.metrics['prg_expansions']) == num * (num - 1) + num
  out, state = _apply(agg.secure_aggregation(1.0, threshold=6), x, w, jnp.arange(num))
  assert int(state.metrics['aborted']) == 1
  np.testing.assert_array_equal(np.asarray(out), 0.0)


# ---------------------------------------------------------------- composition


def test_chain_of_library_stages_and_order_errors():
  x = {'a': jnp.asarray(_rng(13).normal(size=(8, 5)), jnp.float32)}
  chained = agg.chain(agg.clip_by_norm(1.0), agg.stochastic_quantize(16), agg.trimmed_mean(0.1),
                      optax.scale(-1.0))
  out, state = _apply(chained, x, jnp.ones(8), jnp.arange(8))
  assert out['a'].shape == (5,)
  metrics = agg.aggregator_metrics(state)
  assert {'0/clipped_fraction', '1/bits_per_client', '2/num_trimmed_per_side'} <= set(metrics)
  with pytest.raises(ValueError, match='reducers'):
    agg.chain(agg.coordinate_median(), agg.krum(1))
  with pytest.raises(ValueError, match='after the reducer'):
    agg.chain(agg.trimmed_mean(0.1), agg.clip_by_norm(1.0))
  with pytest.raises(ValueError, match='beta'):
    agg.trimmed_mean(0.5)
  with pytest.raises(ValueError, match='num_byzantine'):
    agg.krum(-1)
  with pytest.raises(ValueError, match='clip_norm'):
    agg.clip_by_norm(0.0)
  with pytest.raises(ValueError, match='num_neighbors'):
    agg.secure_aggregation(num_neighbors=3)


def test_error_feedback_residual_lives_in_server_state():
  """top-k's per-client residual rides in ServerState.aggregator_state through FedAvg."""
  from tests.helpers import classification_data, init_params, softmax_loss
  x, y = classification_data(n=48, d=5, k=3)
  data = {'x': jnp.asarray(x.reshape(4, 2, 6, 5), jnp.float32),
          'y': jnp.asarray(y.reshape(4, 2, 6), jnp.int32)}
  batch = fs.ClientBatch(data=data, mask=jnp.ones((4, 2, 6), bool),
                         client_ids=jnp.array([3, 7, 1, 3], jnp.int32),
                         weight=jnp.array([12.0, 12.0, 12.0, 0.0]))
  aggregator = agg.chain(agg.top_k(4), agg.weighted_mean())
  algorithm = fs.fed_avg(softmax_loss, optax.sgd(0.1), aggregator=aggregator, num_clients=10)
  state = algorithm.init(init_params(dtype=np.float32))
  state, metrics = jax.jit(algorithm.round)(state, batch, jax.random.key(0))
  residual = state.aggregator_state.stages[0].residual
  norms = np.asarray(fs.tree.client_sq_norms(residual))
  assert np.all(norms[[1, 3, 7]] > 0) and np.all(np.delete(norms, [1, 3, 7]) == 0)
  assert 'aggregator/0/residual_norm' in metrics
