"""Bulyan, rotated quantization, DRIVE, TernGrad and DP-FTRL (issue 16) against oracles.

Bulyan against a numpy rendering of Flower's `aggregate_bulyan` rule; the
compressors on unbiasedness over many keys (tolerance from the empirical
variance), the Hadamard rotation against the Sylvester matrix, and bits by closed
forms; DP-FTRL's prefix-sum noise against the binary tree's covariance in closed
form, and without noise against the plain clipped sum.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sync import aggregators as agg
from fedjax_sync.aggregators.rotation import (hadamard_transform, padded_size, random_rotation,
                                              random_signs, undo_random_rotation)

# ------------------------------------------------------------------------------- Bulyan


def bulyan_reference(u, f):
  """Flower's `aggregate_bulyan` rule with Krum, in numpy (u: the present clients `[n, d]`).

  θ = n − 2f successive Krum picks (score: the sum of the n' − f − 2, at least 1,
  smallest squared distances to the other remaining clients; a tie goes to the
  first in list order; NaN distances count as Inf), then per coordinate the mean
  of the β = θ − 2f selected values closest to their median. With fewer than
  4f + 3 clients θ and β are clamped to at least 1 (fedjax-sync's documented
  extension; Flower raises there).
  """
  n = len(u)
  theta = max(n - 2 * f, 1)
  beta = max(theta - 2 * f, 1)
  remaining, chosen = list(range(n)), []
  for _ in range(theta):
    sub = u[remaining]
    with np.errstate(invalid='ignore'):
      d2 = ((sub[:, None] - sub[None]) ** 2).sum(-1)
    d2 = np.where(np.isnan(d2), np.inf, d2)
    k = min(max(1, len(sub) - f - 2), max(len(sub) - 1, 1))
    scores = [np.sort(np.delete(d2[i], i))[:k].sum() for i in range(len(sub))]
    chosen.append(remaining.pop(int(np.argmin(scores))))
  selected = u[chosen]
  median = np.median(selected, axis=0)
  closest = np.argsort(np.abs(selected - median), axis=0, kind='stable')[:beta]
  return np.take_along_axis(selected, closest, axis=0).mean(0)


@functools.lru_cache(maxsize=None)
def _jitted_bulyan(f):
  aggregator = agg.bulyan(f)
  return aggregator, jax.jit(aggregator.apply)


def _bulyan_run(f, flat, weights):
  aggregator, apply = _jitted_bulyan(f)
  updates = {'w': jnp.asarray(flat[:, :6].reshape(-1, 2, 3)), 'b': jnp.asarray(flat[:, 6:])}
  out, state = apply(updates, jnp.asarray(weights), aggregator.init(None), None,
                     jnp.arange(len(flat), dtype=jnp.int32))
  return np.concatenate([np.asarray(out['w']).reshape(-1), np.asarray(out['b'])]), state.metrics


def test_bulyan_equals_flowers_rule_with_attackers_and_absent_clients():
  rng = np.random.default_rng(0)
  flat = rng.normal(size=(9, 10))
  flat[[1, 4]] += rng.normal(scale=8.0, size=(2, 10))   # two far-off (Byzantine) updates
  with jax.enable_x64(True):
    for absent in ([], [3, 7], [0, 2, 5, 8]):             # 9, 7 (= 4f + 3) and 5 present
      weights = np.ones(9)
      weights[absent] = 0.0
      junk = flat.copy()
      junk[absent] = np.nan                               # an absent client's slot is never read
      got, metrics = _bulyan_run(1, junk, weights)
      present = weights > 0
      np.testing.assert_allclose(got, bulyan_reference(flat[present], 1), rtol=1e-12, atol=1e-12)
      n = int(present.sum())
      assert int(metrics['num_selected']) == max(n - 2, 1)
      assert int(metrics['num_averaged']) == max(n - 4, 1)
      assert int(metrics['assumption_met']) == int(n >= 7)


def test_bulyan_selects_non_finite_updates_last():
  rng = np.random.default_rng(1)
  flat = rng.normal(size=(11, 10))
  flat[3, 4] = np.nan
  flat[6] = np.inf
  got, metrics = _bulyan_run(2, flat.astype(np.float32), np.ones(11, np.float32))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, bulyan_reference(flat, 2), rtol=1e-5, atol=1e-6)
  assert int(metrics['num_selected']) == 7 and int(metrics['num_averaged']) == 3


def test_bulyan_refuses_too_few_clients_and_bad_arguments():
  aggregator = agg.bulyan(2)
  updates = {'w': jnp.zeros((10, 3))}
  with pytest.raises(ValueError, match=r'4f \+ 3 = 11 clients per round .* got 10'):
    aggregator.apply(updates, jnp.ones(10), aggregator.init(None))
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match='num_byzantine must be an integer'):
      agg.bulyan(bad)


# ------------------------------------------------------------------ rotation, compression


def _sylvester(n):
  h = np.ones((1, 1))
  while len(h) < n:
    h = np.block([[h, h], [h, -h]])
  return h / math.sqrt(n)


def test_hadamard_rotation_is_orthogonal_and_undone():
  eye = jnp.eye(16, dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(hadamard_transform))(eye)),
                             _sylvester(16), atol=1e-7)
  key = jax.random.key(4)
  rotation = np.asarray(jax.jit(jax.vmap(lambda e: random_rotation(key, e)))(eye)).T   # R's columns
  np.testing.assert_allclose(rotation.T @ rotation, np.eye(16), atol=1e-6)
  signs = np.diag(rotation.T @ _sylvester(16))       # R = H D: D = diag(Hᵀ R) = ±1
  np.testing.assert_allclose(np.abs(signs), 1.0, atol=1e-6)
  x = jnp.asarray(np.random.default_rng(0).normal(size=16), jnp.float32)
  round_trip = jax.jit(lambda v: undo_random_rotation(key, random_rotation(key, v)))
  np.testing.assert_allclose(round_trip(x), x, atol=1e-6)
  assert [padded_size(d) for d in (1, 2, 3, 16, 17, 1000)] == [1, 2, 4, 16, 32, 1024]
  signs = np.asarray(random_signs(key, 100_003))   # fair, independent ±1 (not a multiple of 32)
  assert signs.shape == (100_003,) and set(np.unique(signs)) == {-1.0, 1.0}
  assert abs(signs.mean()) < 5 / math.sqrt(len(signs))
  assert abs(np.mean(signs[1:] * signs[:-1])) < 5 / math.sqrt(len(signs))
  assert abs(np.mean(signs[32:] * signs[:-32])) < 5 / math.sqrt(len(signs))
  with pytest.raises(ValueError, match='power-of-two length, got 12'):
    hadamard_transform(jnp.zeros(12))


def _client_inputs():
  """3 clients of a d = 20 update (padded to 32): Gaussian, one-signed, and a zero leaf."""
  rng = np.random.default_rng(2)
  flat = rng.normal(size=(3, 20))
  flat[1] = rng.exponential(size=20)
  flat[2, 12:] = 0.0
  updates = {'w': jnp.asarray(flat[:, :12].reshape(3, 3, 4), jnp.float32),
             'b': jnp.asarray(flat[:, 12:], jnp.float32)}
  return flat, updates


def _flatten(out):
  lead = out['b'].shape[:-1]
  return np.concatenate([np.asarray(out['w']).reshape(lead + (12,)), np.asarray(out['b'])], -1)


PARAMS = {'w': jnp.zeros((3, 4), jnp.float32), 'b': jnp.zeros((8,), jnp.float32)}
IDS = jnp.array([4, 9, 2], jnp.int32)


def _draws(aggregator, updates, num_keys):
  """`[num_keys, C, d]` outputs of the transform, one compile per aggregator and shape."""
  if aggregator.name not in _DRAWS:
    state = aggregator.init(PARAMS)
    _DRAWS[aggregator.name] = jax.jit(jax.vmap(
        lambda k, u: aggregator.apply(u, None, state, k, IDS)[0], in_axes=(0, None)))
  out = _DRAWS[aggregator.name](jax.random.split(jax.random.key(0), num_keys), updates)
  # float64 before averaging: numpy sums float32 along axis 0 without pairwise summation.
  return _flatten(out).astype(np.float64)


_DRAWS = {}


@pytest.mark.parametrize('make', [lambda: agg.rotated_quantize(2), agg.terngrad],
                         ids=['rotated_quantize', 'terngrad'])
def test_quantizers_are_unbiased_over_keys_and_pass_non_finite_updates(make):
  flat, updates = _client_inputs()
  draws = _draws(make(), updates, 4000)
  mean = draws.mean(0)
  stderr = draws.std(0) / math.sqrt(len(draws))
  # Each coordinate's mean within 5 standard errors (a coordinate sent exactly: 1e-6).
  assert np.all(np.abs(mean - flat) <= 5 * stderr + 1e-6), np.max(np.abs(mean - flat) / stderr)
  if make is agg.terngrad:   # values in {−s, 0, s}, s = max |leaf| per client and leaf
    assert np.all(draws[:, 2, 12:] == 0.0)                   # a zero leaf stays zero
    for lo, hi in ((0, 12), (12, 20)):
      scale = np.abs(flat[:, lo:hi]).max(1, keepdims=True)
      part = draws[:, :, lo:hi]
      ok = np.isclose(part, 0.0) | np.isclose(np.abs(part), scale, rtol=1e-6)
      assert np.all(ok) and np.all(part * flat[:, lo:hi] >= 0)
  # An update with a non-finite entry is passed through unchanged; the others stay finite.
  sent = jax.tree.map(lambda x: x.at[1].set(jnp.inf * x[1]), updates)
  got = _draws(make(), sent, 4000)
  np.testing.assert_array_equal(got[:, 1], np.broadcast_to(_flatten(sent)[1], got[:, 1].shape))
  assert np.all(np.isfinite(got[:, [0, 2]]))


def test_drive_sends_one_bit_per_rotated_coordinate_with_the_papers_scales():
  rng = np.random.default_rng(5)
  flat = rng.normal(size=(3, 16)).astype(np.float32)   # d = 16: no padding
  updates = {'w': jnp.asarray(flat[:, :12].reshape(3, 3, 4)), 'b': jnp.asarray(flat[:, 12:])}
  params = {'w': PARAMS['w'], 'b': jnp.zeros((4,), jnp.float32)}
  key = jax.random.key(3)
  errors = {}
  for unbiased in (True, False):
    aggregator = agg.drive(unbiased)
    apply = jax.jit(aggregator.apply)
    out, _ = apply(updates, None, aggregator.init(params), key, IDS)
    got = _flatten(out)
    tree_order = np.r_[12:16, 0:12]   # the rotated vector is the leaves in tree order: b, w
    for c in range(3):
      rotation_key = jax.random.split(jax.random.fold_in(key, IDS[c]))[0]
      y = np.asarray(random_rotation(rotation_key, jnp.asarray(flat[c, tree_order])))
      scale = (np.sum(flat[c] ** 2) / np.abs(y).sum()) if unbiased else np.abs(y).mean()
      rotated = random_rotation(rotation_key, jnp.asarray(got[c, tree_order]))
      np.testing.assert_allclose(np.asarray(rotated), scale * np.sign(y), rtol=2e-5, atol=1e-6)
    if unbiased:   # ⟨x̂, x⟩ = ‖x‖² (Vargaftik et al. 2021, Sec. 4.2)
      np.testing.assert_allclose((got * flat).sum(1), (flat ** 2).sum(1), rtol=2e-5)
    errors[unbiased] = ((got - flat) ** 2).sum(1)
    sent = jax.tree.map(lambda x: x.at[1].set(x[1].at[0].set(jnp.nan)), updates)
    out, _ = apply(sent, None, aggregator.init(params), key, IDS)   # NaN: passed through
    np.testing.assert_array_equal(_flatten(out)[1], _flatten(sent)[1])
    np.testing.assert_allclose(_flatten(out)[[0, 2]], got[[0, 2]])
  assert np.all(errors[False] <= errors[True] * (1 + 1e-5))   # the biased scale has least error


def test_bits_follow_the_closed_forms_and_reach_the_metrics():
  d, n, leaves = 20, 32, 2
  expected = {'rotated_quantize(4)': 2 * 32 + n * 2, 'rotated_quantize(5)': 2 * 32 + n * 3,
              'drive': n + 32, 'terngrad': 2 * d + 32 * leaves}
  built = {'rotated_quantize(4)': agg.rotated_quantize(4),
           'rotated_quantize(5)': agg.rotated_quantize(5), 'drive': agg.drive(),
           'terngrad': agg.terngrad()}
  for name, aggregator in built.items():
    metrics = agg.aggregator_metrics(agg.chain(aggregator, agg.weighted_mean()).init(PARAMS))
    assert float(metrics['0/bits_per_client']) == expected[name], name
    np.testing.assert_allclose(float(metrics['0/compression_ratio']), 32 * d / expected[name])
  for bad in (1, 2.0, True):
    with pytest.raises(ValueError, match='rotated_quantize levels must be an integer ≥ 2'):
      agg.rotated_quantize(bad)
  with pytest.raises(ValueError, match='drive unbiased must be True or False'):
    agg.drive(1)


# ------------------------------------------------------------------------------- DP-FTRL


def _tree_nodes(t):
  """The nodes (level, t >> level) of the online binary tree whose noise sums to P_t."""
  return {(level, t >> level) for level in range(t.bit_length()) if (t >> level) & 1}


def test_dp_ftrl_prefix_noise_has_the_trees_covariance():
  sigma, rounds, tree = 0.5, 9, 7   # the tree restarts after round 7
  aggregator = agg.dp_ftrl(1.0, sigma, 1.0, rounds_per_tree=tree)
  zeros = {'w': jnp.zeros((2, 400), jnp.float32)}
  state0 = aggregator.init({'w': jnp.zeros((400,), jnp.float32)})

  def run(key):
    def step(state, t):
      out, state = aggregator.apply(zeros, jnp.ones(2), state, jax.random.fold_in(key, t))
      return state, (out['w'], state.metrics['prefix_noise_std'])
    _, (outs, stds) = jax.lax.scan(step, state0, jnp.arange(rounds))
    return jnp.cumsum(outs, axis=0), stds   # the released noisy prefix sums (g = 0, W = 1)

  sums, stds = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), 64))
  samples = np.asarray(sums).transpose(1, 0, 2).reshape(rounds, -1)   # [t, seeds·d]
  covariance = samples @ samples.T / samples.shape[1]
  # Closed form: Cov(P_s, P_t) = σ² · |shared nodes|; after the restart the first tree's
  # last prefix noise P_7 stays in every later sum.
  first = lambda t: {('first', n) for n in _tree_nodes(t)}
  nodes = [first(t) if t <= tree else first(tree) | _tree_nodes(t - tree)
           for t in range(1, rounds + 1)]
  expected = sigma ** 2 * np.array([[len(a & b) for b in nodes] for a in nodes])
  # Tolerance: 5 standard errors of a Gaussian sample covariance, √((Σ_ss Σ_tt + Σ_st²)/n).
  stderr = np.sqrt((np.outer(np.diag(expected), np.diag(expected)) + expected ** 2)
                   / samples.shape[1])
  assert np.all(np.abs(covariance - expected) <= 5 * stderr), np.abs(covariance - expected)
  np.testing.assert_allclose(np.diag(expected)[:tree], [sigma ** 2 * bin(t).count('1')
                                                        for t in range(1, tree + 1)])
  popcounts = [bin(t if t <= tree else t - tree).count('1') for t in range(1, rounds + 1)]
  np.testing.assert_allclose(np.asarray(stds)[0], sigma * np.sqrt(popcounts), rtol=1e-6)


def _clip(u, s):
  norms = np.linalg.norm(u, axis=1, keepdims=True)
  return u * np.minimum(1.0, s / np.maximum(norms, 1e-30))


def test_dp_ftrl_without_noise_is_the_clipped_sum_and_noise_does_not_depend_on_the_data():
  rng = np.random.default_rng(7)
  rounds = [rng.normal(size=(4, 6)) * rng.uniform(0.1, 3.0, size=(4, 1)) for _ in range(5)]
  weights = jnp.array([1.0, 2.0, 0.0, 1.0])
  present = np.asarray(weights) > 0
  outputs, built = {}, {z: agg.dp_ftrl(1.5, z, 4.0, rounds_per_tree=3) for z in (0.0, 0.8)}
  applies = {z: jax.jit(aggregator.apply) for z, aggregator in built.items()}
  for z, data in ((0.0, rounds), (0.8, rounds), (0.8, [0 * u for u in rounds])):
    state, apply = built[z].init({'x': jnp.zeros((6,), jnp.float32)}), applies[z]
    outs = []
    for t, u in enumerate(data):
      out, state = apply({'x': jnp.asarray(u, jnp.float32)}, weights, state,
                         jax.random.key(t), None)
      outs.append(np.asarray(out['x']))
    outputs[z, data is rounds] = np.array(outs)
  expected = np.array([_clip(u[present], 1.5).sum(0) / 4.0 for u in rounds])
  np.testing.assert_allclose(outputs[0.0, True], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(outputs[0.8, True] - outputs[0.8, False], expected, atol=2e-5)
  assert np.abs(outputs[0.8, False]).max() > 0.1   # the noise is there


def test_dp_ftrl_epsilon_composes_the_trees_rdp_through_dp_accounting():
  delta = 1e-5
  eps = agg.dp_ftrl_epsilon(4.0, 100, 3, delta)
  # RDP α·E·⌈log₂(T + 1)⌉/(2z²) is a Gaussian mechanism's with ρ = E·depth/(2z²):
  # the classic conversion ρ + 2√(ρ log(1/δ)) bounds ε from above; dp_accounting's is tighter.
  rho = 3 * math.ceil(math.log2(101)) / (2 * 4.0 ** 2)
  assert 0.7 * (rho + 2 * math.sqrt(rho * math.log(1 / delta))) < eps
  assert eps <= rho + 2 * math.sqrt(rho * math.log(1 / delta))
  # Only depth · trees / z² matters: 3 trees of depth 7 at z = 4 equal 1 tree of depth 1 at
  # z = 4/√21.
  np.testing.assert_allclose(agg.dp_ftrl_epsilon(4.0 / math.sqrt(21), 1, 1, delta), eps,
                             rtol=1e-9)
  assert agg.dp_ftrl_epsilon(8.0, 100, 3, delta) < eps < agg.dp_ftrl_epsilon(4.0, 100, 4, delta)
  for args, needle in (((0.0, 10, 1, delta), 'noise_multiplier'),
                       ((1.0, 0, 1, delta), 'rounds_per_tree must be an integer ≥ 1, got 0'),
                       ((1.0, 10, -1, delta), 'num_trees must be an integer ≥ 0, got -1'),
                       ((1.0, 10, 1, 1.5), r'delta must be in \(0, 1\), got 1.5')):
    with pytest.raises(ValueError, match=needle):
      agg.dp_ftrl_epsilon(*args)
  with pytest.raises(ValueError, match='rounds_per_tree must be an integer ≥ 1, got 2.5'):
    agg.dp_ftrl(1.0, 1.0, 1.0, 2.5)
