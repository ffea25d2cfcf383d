"""The federated data container, synthetic data, batching and evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sync as fs
from fedjax_sync.data import FederatedData, LocalWork, make_client_batch, to_device
from fedjax_sync.simulate import make_evaluator


def test_synthetic_is_seeded_and_shaped_as_fedprox():
  a = fs.synthetic(1.0, 1.0, seed=0)
  b = fs.synthetic(1.0, 1.0, seed=0)
  c = fs.synthetic(1.0, 1.0, seed=1)
  assert a.num_clients == 30 and a.train['x'].shape[1] == 60 and a.num_classes == 10
  np.testing.assert_array_equal(a.train['x'], b.train['x'])
  assert not np.array_equal(a.counts, c.counts)
  # n_k = floor(LogNormal(4, 2)) + 50, split 90/10: every client has ≥ 45 training examples.
  assert a.counts.min() >= 45
  assert np.all(a.test_client[:-1] <= a.test_client[1:])
  assert set(np.unique(a.train['y'])) <= set(range(10))


def test_synthetic_iid_shares_one_labelling_model():
  data = fs.synthetic(iid=True, num_clients=5, seed=0)
  assert data.name == 'synthetic_iid'
  # Under IID every client's label distribution is similar: no client has a single class.
  for k in range(5):
    assert len(np.unique(data.client(k)['y'])) > 1


def test_container_rejects_inconsistent_offsets():
  with pytest.raises(ValueError, match='contiguous'):
    FederatedData(train={'x': np.zeros((5, 2)), 'y': np.zeros(5)}, offsets=np.array([0, 3]),
                  counts=np.array([2, 3]), test={'x': np.zeros((1, 2)), 'y': np.zeros(1)},
                  test_client=None, num_classes=2)
  with pytest.raises(ValueError, match='disagree'):
    FederatedData(train={'x': np.zeros((5, 2)), 'y': np.zeros(4)}, offsets=np.array([0]),
                  counts=np.array([5]), test={'x': np.zeros((1, 2)), 'y': np.zeros(1)},
                  test_client=None, num_classes=2)


def _tiny():
  # Client k holds examples whose x equals their global row index.
  counts = np.array([3, 7, 0, 5])
  n = counts.sum()
  return FederatedData(train={'x': np.arange(n, dtype=np.float32)[:, None], 'y': np.zeros(n, np.int32)},
                       offsets=np.concatenate([[0], np.cumsum(counts)[:-1]]), counts=counts,
                       test={'x': np.zeros((2, 1), np.float32), 'y': np.zeros(2, np.int32)},
                       test_client=None, num_classes=2)


def test_epoch_batches_cover_each_example_exactly_epochs_times():
  data = _tiny()
  work = LocalWork(batch_size=4, epochs=2)
  batch = make_client_batch(jax.random.key(0), to_device(data), jnp.asarray([0, 1, 3, 2], jnp.int32),
                            work, max_count=7)
  assert batch.mask.shape == (4, work.num_steps(7), 4)
  np.testing.assert_array_equal(np.asarray(batch.weight), [3, 7, 5, 0])
  for c, k in enumerate([0, 1, 3, 2]):
    rows = np.asarray(batch.data['x'][c])[np.asarray(batch.mask[c])][:, 0].astype(int)
    start, n = int(data.offsets[k]), int(data.counts[k])
    assert len(rows) == 2 * n
    np.testing.assert_array_equal(np.bincount(rows - start, minlength=n) if n else [], [2] * n)


def test_step_batches_are_full_and_cycle_through_epochs():
  data = _tiny()
  work = LocalWork(batch_size=4, steps=5)  # 20 slots: client 0 (3 examples) cycles ~7 epochs
  batch = make_client_batch(jax.random.key(1), to_device(data), jnp.asarray([0, 2], jnp.int32),
                            work, max_count=7)
  assert bool(jnp.all(batch.mask[0])) and not bool(jnp.any(batch.mask[1]))
  rows = np.asarray(batch.data['x'][0]).reshape(-1).astype(int)
  counts = np.bincount(rows, minlength=3)
  assert counts.min() >= 6 and counts.max() <= 7  # 20 draws, reshuffled every 3
  np.testing.assert_array_equal(np.asarray(batch.weight), [3, 0])


def test_local_work_validation_names_the_bad_value():
  with pytest.raises(ValueError, match='exactly one'):
    LocalWork(batch_size=4).validate()
  with pytest.raises(ValueError, match='batch_size'):
    LocalWork(batch_size=0, steps=1).validate()


def test_evaluator_matches_numpy_per_client_accuracy():
  data = fs.synthetic(1.0, 1.0, num_clients=6, seed=2)
  model = fs.models.logistic_regression((60,), 10)
  params = model.init(jax.random.key(0))
  result = make_evaluator(model.evaluate, data, chunk_size=64)(params)
  logits = np.asarray(model.apply(params, jnp.asarray(data.test['x'])))
  correct = logits.argmax(1) == data.test['y']
  assert float(result['test_accuracy']) == pytest.approx(correct.mean(), abs=1e-6)
  per_client = [correct[data.test_client == k].mean() for k in range(6)]
  np.testing.assert_allclose(np.asarray(result['client_accuracy']), per_client, atol=1e-6)
  assert float(result['client_accuracy_var']) == pytest.approx(np.var(per_client), abs=1e-6)
  assert float(result['client_accuracy_worst_decile']) == pytest.approx(min(per_client), abs=1e-6)


def test_chain_validates_order_when_built():
  import optax
  from fedjax_sync.aggregators import chain, mean, stateless, weighted_mean
  identity = stateless(lambda u, w, k, ids: u, kind='transform', name='identity')
  with pytest.raises(ValueError, match='2 reducers'):
    chain(mean(), weighted_mean())
  with pytest.raises(ValueError, match='after the reducer'):
    chain(weighted_mean(), identity)
  with pytest.raises(ValueError, match='before the reducer'):
    chain(optax.scale(2.0), weighted_mean())
  agg = chain(identity, weighted_mean(), optax.scale(2.0))
  updates = {'a': jnp.asarray([[1.0, 2.0], [3.0, 4.0]])}
  out, _ = jax.jit(agg.apply)(updates, jnp.asarray([1.0, 3.0]), agg.init({'a': jnp.zeros(2)}, 2),
                              jax.random.key(0), jnp.arange(2))
  np.testing.assert_allclose(out['a'], 2 * np.array([2.5, 3.5]))


@pytest.mark.parametrize('n', [1, 2, 3, 7, 45, 777, 5000])
def test_keyed_permutation_is_a_bijection(n):
  from fedjax_sync.data.batching import _FEISTEL_ROUNDS, _keyed_permutation
  keys = jnp.broadcast_to(jax.random.bits(jax.random.key(n), (_FEISTEL_ROUNDS,)), (n, _FEISTEL_ROUNDS))
  out = np.asarray(_keyed_permutation(jnp.arange(n, dtype=jnp.int32), jnp.asarray(n), keys))
  np.testing.assert_array_equal(np.sort(out), np.arange(n))


def test_keyed_permutation_places_every_example_uniformly():
  """Over 20,000 keys, the chi-square of (example, position) counts is near its dof."""
  from fedjax_sync.data.batching import _FEISTEL_ROUNDS, _keyed_permutation
  n, trials = 7, 20000
  keys = jax.random.bits(jax.random.key(0), (trials, _FEISTEL_ROUNDS))
  perms = jax.jit(jax.vmap(lambda k: _keyed_permutation(
      jnp.arange(n, dtype=jnp.int32), jnp.asarray(n), jnp.broadcast_to(k, (n, _FEISTEL_ROUNDS)))))(keys)
  perms = np.asarray(perms)
  counts = np.stack([np.bincount(perms[:, i], minlength=n) for i in range(n)])
  expected = trials / n
  chi2_per_dof = ((counts - expected) ** 2 / expected).sum() / (n - 1) ** 2
  # Uniform: mean 1, std sqrt(2/36) ≈ 0.24; a 4-round network gave 16 here.
  assert chi2_per_dof < 2.0
