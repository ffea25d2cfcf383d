"""FedQS: classification, learning-rate and momentum rules, feedback weights, engine runs."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync.algorithms.fed_buff import fed_buff
from fedjax_sync.algorithms.fed_qs import (FBC, FUC, SBC, SUC, FedQSHyperparameters, classify,
                                           fed_qs, fed_qs_avg, fed_qs_sgd, feedback_weights)
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.data import LocalWork, synthetic
from fedjax_sync.models.models import logistic_regression
from fedjax_sync.simulate.clock import make_clock
from fedjax_sync.simulate.semi_async import AsyncConfig, SemiAsyncSimulator

WORK = LocalWork(batch_size=10, steps=2)


def _oracle(angles, counts, lrs, population_angles, population_counts, h=FedQSHyperparameters()):
  """Plain-Python transcription of the rules in ALGORITHMS.md."""
  mean_count = sum(population_counts) / len(population_counts)
  freq = [c / mean_count for c in population_counts]
  positive_f = [f for f in freq if f > 0]
  f_bar = sum(positive_f) / len(positive_f)
  positive_a = [a for a in population_angles if a > 0]
  a_bar = sum(positive_a) / len(positive_a)
  out = []
  for theta, count, lr in zip(angles, counts, lrs):
    f = count / mean_count
    fast, biased = f > f_bar, theta > a_bar
    kind = (FBC if biased else FUC) if fast else (SBC if biased else SUC)
    factor = min(f_bar / f, h.max_factor) if f > 0 else h.max_factor
    new_lr = {FBC: lr, FUC: lr - h.adjust_rate * factor}.get(kind, lr + h.adjust_rate * factor)
    new_lr = min(max(new_lr, h.min_learning_rate), h.max_learning_rate)
    ratio = a_bar / theta if theta > 0 else math.inf
    momentum = 0.1 + min(20 * (0.1 * ratio - 0.1), 0.4)
    momentum = 0.0 if kind == FBC else min(max(momentum, 0.0), 0.5)
    out.append((kind, new_lr, momentum))
  return out, a_bar, f_bar


def test_classification_on_hand_made_similarities_and_frequencies():
  population_angles = [0.2, 0.4, 0.6, 0.0, 0.8, 0.3]    # 0 = unknown
  population_counts = [4.0, 1.0, 3.0, 0.0, 2.0, 2.0]
  # θ̄ = mean(0.2, 0.4, 0.6, 0.8, 0.3) = 0.46; f = c / 2 → f̄ = mean(2, .5, 1.5, 1, 1) = 1.2
  learning_rates = [0.1, 0.1, 0.1, 0.1, 0.1, 0.199]
  result = classify(jnp.asarray(population_angles), jnp.asarray(population_counts),
                    jnp.asarray(learning_rates), jnp.asarray(population_angles),
                    jnp.asarray(population_counts))
  # By hand: c0 fast+aligned, c1 slow+aligned, c2 fast+biased, c3 unknown → slow+aligned,
  # c4 slow+biased, c5 slow+aligned.
  np.testing.assert_array_equal(result.client_type, [FUC, SUC, FBC, SUC, SBC, SUC])
  assert float(result.angle_threshold[0]) == pytest.approx(0.46)
  assert float(result.frequency_threshold[0]) == pytest.approx(1.2)
  np.testing.assert_allclose(
      result.learning_rate,
      [0.1 - 0.002 * 0.6, 0.1 + 0.002 * 2.4, 0.1, 0.1 + 0.002 * 9, 0.1 + 0.002 * 1.2, 0.2],
      rtol=1e-5)
  # momentum: c0 θ̄/θ = 2.3 → 0.1 + min(20 · 0.13, 0.4) = 0.5; FBC → 0;
  # c1 θ̄/θ = 1.15 → 0.1 + 20 · 0.015 = 0.4; c4 θ̄/θ = 0.575 → negative → clipped to 0.
  np.testing.assert_allclose(result.momentum, [0.5, 0.4, 0.0, 0.5, 0.0, 0.5], atol=1e-5)
  expected, _, _ = _oracle(population_angles, population_counts, learning_rates,
                           population_angles, population_counts)
  np.testing.assert_array_equal(result.client_type, [e[0] for e in expected])
  np.testing.assert_allclose(result.learning_rate, [e[1] for e in expected], rtol=1e-5)
  np.testing.assert_allclose(result.momentum, [e[2] for e in expected], atol=1e-5)


def test_classification_matches_the_oracle_on_random_populations():
  rng = np.random.default_rng(0)
  for _ in range(5):
    angles = rng.uniform(0, 1.5, 20) * (rng.uniform(size=20) > 0.2)
    counts = rng.integers(0, 8, 20).astype(float)
    lrs = rng.uniform(1e-3, 0.2, 20)
    result = classify(jnp.asarray(angles, jnp.float32), jnp.asarray(counts, jnp.float32),
                      jnp.asarray(lrs, jnp.float32), jnp.asarray(angles, jnp.float32),
                      jnp.asarray(counts, jnp.float32))
    expected, _, _ = _oracle(list(angles), list(counts), list(lrs), list(angles), list(counts))
    np.testing.assert_array_equal(result.client_type, [e[0] for e in expected])
    np.testing.assert_allclose(result.learning_rate, [e[1] for e in expected], rtol=1e-5)
    np.testing.assert_allclose(result.momentum, [e[2] for e in expected], atol=1e-5)


def test_feedback_weights_match_a_hand_computation():
  n = jnp.asarray([10.0, 30.0, 20.0, 40.0])
  feedback = jnp.asarray([True, False, True, False])
  counts = jnp.asarray([1.0, 2.0, 3.0, 0.0])
  angles = jnp.asarray([0.5, 0.1, 1.5, 0.2])
  valid = jnp.asarray([True, True, True, False])
  p = feedback_weights(n, feedback, counts, jnp.asarray(10.0), angles, jnp.asarray(0.5), valid)
  boost0 = (math.e / 2) ** (0.1 - 0.1) * (1 + 1.0 ** 2)
  boost2 = (math.e / 2) ** (0.1 - 0.3) * (1 + 2.0 ** 2)     # θ/θ̄ = 3 is capped at 2
  raw = np.array([10 * boost0, 30.0, 20 * boost2, 0.0])
  np.testing.assert_allclose(p, raw / raw.sum(), rtol=1e-6)


def _setup():
  data = synthetic(num_clients=8, seed=0)
  return data, logistic_regression((60,), 10)


def test_first_aggregation_equals_fedbuff_with_the_slow_aligned_rules():
  # Before any aggregation every client is unknown-angle and never aggregated:
  # SUC with F = 9 (η = 0.1 + 0.002 · 9) and momentum 0.5, no feedback, p = n_i/Σn.
  data, model = _setup()
  clock = make_clock(np.linspace(1.0, 8.0, 8))
  config = AsyncConfig(1, 4, WORK, seed=4)
  qs = SemiAsyncSimulator(fed_qs_sgd(model.loss, num_clients=8), model, data, clock, config)
  reference = SemiAsyncSimulator(
      fed_buff(model.loss, optax.sgd(0.118, momentum=0.5), staleness_exponent=0.0,
               example_weighted=True), model, data, clock, config)
  a, metrics = qs.run_aggregations(qs.init(), 1)
  b, _ = reference.run_aggregations(reference.init(), 1)
  chex.assert_trees_all_close(a.server.params, b.server.params, atol=1e-6)
  assert float(metrics['num_SUC'][0]) == 4 and float(metrics['num_feedback'][0]) == 0
  clients = a.server.client_states
  np.testing.assert_array_equal(clients.count, [1, 1, 1, 1, 0, 0, 0, 0])  # fastest four
  np.testing.assert_allclose(clients.learning_rate, [0.118] * 4 + [0.1] * 4, rtol=1e-6)


@pytest.mark.parametrize('builder', [fed_qs_sgd, fed_qs_avg])
def test_runs_deterministic_sharded_and_keeps_state_for_contributors_only(builder):
  data, model = _setup()
  clock = make_clock(np.linspace(1.0, 20.0, 8), dropout=0.2)
  results = []
  # Sharding is algorithm-agnostic engine code: check it once (FedQS-SGD) to save a compile.
  meshes = (None, fs.client_mesh()) if builder is fed_qs_sgd else (None,)
  for mesh in meshes:
    sim = SemiAsyncSimulator(builder(model.loss, num_clients=8), model, data, clock,
                             AsyncConfig(8, 4, WORK, eval_every=8, seed=1),
                             execution=ClientExecution('vmap', None, mesh))
    results.append(sim.run(sim.init(), evaluate=False))
    if mesh is None:  # the same seed again, from a fresh init
      results.append(sim.run(sim.init(), evaluate=False))
  chex.assert_trees_all_equal(results[0].state.server, results[1].state.server)
  if len(results) == 3:
    chex.assert_trees_all_close(results[0].state.server.params, results[2].state.server.params,
                                atol=1e-5)
  clients = results[0].state.server.client_states
  contributions = sum(r['num_participants'] for r in results[0].history)
  assert float(jnp.sum(clients.count)) == contributions
  np.testing.assert_array_equal(clients.has_update, clients.count > 0)
  assert np.all(np.isfinite(jax.tree.leaves(results[0].state.server.params)[0]))
  types = sum(r[f'num_{t}'] for r in results[0].history for t in ('FBC', 'FUC', 'SUC', 'SBC'))
  assert types == contributions


def test_fed_qs_validates_options():
  data, model = _setup()
  with pytest.raises(ValueError, match='aggregation'):
    fed_qs(model.loss, aggregation='median', num_clients=8)
  with pytest.raises(ValueError, match='num_clients'):
    fed_qs(model.loss, num_clients=0)
  with pytest.raises(ValueError):
    fed_qs(model.loss, num_clients=8,
           hparams=FedQSHyperparameters(min_learning_rate=0.5, max_learning_rate=0.2))
