"""Personalization evaluation (fedjax_sync.simulate.personalization) against numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sync.data.federated import FederatedData, from_client_indices
from fedjax_sync.models import logistic_regression
from fedjax_sync.simulate import make_evaluator
from fedjax_sync.simulate.personalization import (accuracy_distribution, hold_out_client_test,
                                                  personalized_evaluation,
                                                  personalized_evaluator)
from fedjax_sync.types import ServerState

NUM_CLIENTS, TRAIN_PER_CLIENT, FEATURES, CLASSES = 5, 8, 4, 3
HELD_OUT = (3, 5, 0, 4, 6)   # client 2 has no held-out example: left out of the statistics
MODEL = logistic_regression((FEATURES,), CLASSES)


@functools.lru_cache(maxsize=None)
def _data() -> FederatedData:
  """Concept shift: client c's label is its own rotation of one rule, so fine-tuning helps."""
  rng = np.random.default_rng(0)
  xs, ys, test_x, test_y, owners = [], [], [], [], []
  for c in range(NUM_CLIENTS):
    x = 3 * rng.normal(size=(TRAIN_PER_CLIENT + HELD_OUT[c], FEATURES)).astype(np.float32)
    y = ((np.argmax(x[:, :CLASSES], 1) + c) % CLASSES).astype(np.int32)  # own label shift
    xs.append(x[:TRAIN_PER_CLIENT]), ys.append(y[:TRAIN_PER_CLIENT])
    test_x.append(x[TRAIN_PER_CLIENT:]), test_y.append(y[TRAIN_PER_CLIENT:])
    owners.append(np.full(HELD_OUT[c], c, np.int32))
  # Test rows interleaved (not sorted by owner): the evaluator must find each client's own.
  perm = rng.permutation(sum(HELD_OUT))
  test = {'x': np.concatenate(test_x)[perm], 'y': np.concatenate(test_y)[perm]}
  indices = np.arange(NUM_CLIENTS * TRAIN_PER_CLIENT).reshape(NUM_CLIENTS, TRAIN_PER_CLIENT)
  return from_client_indices({'x': np.concatenate(xs), 'y': np.concatenate(ys)}, list(indices),
                             test, num_classes=CLASSES, name='skewed',
                             test_client=np.concatenate(owners)[perm])


def _np_softmax(logits):
  z = np.exp(logits - logits.max(1, keepdims=True))
  return z / z.sum(1, keepdims=True)


def _np_fine_tune(w, b, x, y, steps, lr):
  """Full-batch gradient descent on the mean cross-entropy (batch_size = the client's size)."""
  onehot = np.eye(CLASSES)[y]
  for _ in range(steps):
    g = (_np_softmax(x @ w + b) - onehot) / len(x)
    w, b = w - lr * x.T @ g, b - lr * g.sum(0)
  return w, b


def _np_metrics(w, b, x, y):
  p = _np_softmax(x @ w + b)
  return np.mean(np.argmax(p, 1) == y), np.mean(-np.log(p[np.arange(len(y)), y]))


def _params():
  return MODEL.init(jax.random.key(3))


def _np_params(params):
  layer = params['Dense_0']
  return np.asarray(layer['kernel'], np.float64), np.asarray(layer['bias'], np.float64)


def _client(data, c):
  own = np.asarray(data.test_client) == c
  return data.client(c), {k: np.asarray(v)[own] for k, v in data.test.items()}


@pytest.mark.parametrize('steps', [0, 3])
def test_fine_tuning_matches_numpy_for_every_client(steps):
  data, lr = _data(), 0.5
  evaluate = personalized_evaluator(MODEL, data, steps=steps, learning_rate=lr,
                                    batch_size=TRAIN_PER_CLIENT, client_chunk_size=2,
                                    eval_batch_size=4)
  out = jax.device_get(evaluate(_params(), jax.random.key(0)))
  w0, b0 = _np_params(_params())
  accuracies, losses, global_accuracies = [], [], []
  for c in range(NUM_CLIENTS):
    train, test = _client(data, c)
    if not len(test['y']):
      assert np.isnan(out['personalized_accuracy'][c]) and np.isnan(out['client_accuracy'][c])
      continue
    w, b = _np_fine_tune(w0, b0, train['x'].astype(np.float64), train['y'], steps, lr)
    accuracy, loss = _np_metrics(w, b, test['x'], test['y'])
    accuracies.append(accuracy), losses.append(loss)
    global_accuracies.append(_np_metrics(w0, b0, test['x'], test['y'])[0])
    np.testing.assert_allclose(out['personalized_accuracy'][c], accuracy, atol=1e-6)
  assert int(out['num_evaluated_clients']) == NUM_CLIENTS - 1
  np.testing.assert_allclose(out['personalized_accuracy_mean'], np.mean(accuracies), atol=1e-6)
  np.testing.assert_allclose(out['personalized_accuracy_median'], np.median(accuracies),
                             atol=1e-6)
  np.testing.assert_allclose(out['personalized_loss_mean'], np.mean(losses), rtol=1e-4)
  np.testing.assert_allclose(out['client_accuracy_mean'], np.mean(global_accuracies), atol=1e-6)
  if steps == 0:   # K = 0: the global model's own per-client accuracy, every statistic
    for stat in ('mean', 'var', 'median', 'worst_decile'):
      assert out[f'personalized_accuracy_{stat}'] == out[f'client_accuracy_{stat}']
    assert out['personalized_loss_mean'] == out['client_loss_mean']
  else:   # the skewed clients gain from fine-tuning (else the oracle comparison is vacuous)
    assert out['personalized_accuracy_mean'] > out['client_accuracy_mean'] + 0.1


def test_global_statistics_agree_with_make_evaluator():
  data = _data()
  ours = personalized_evaluator(MODEL, data, steps=0, learning_rate=0.1, batch_size=4)(
      _params(), jax.random.key(0))
  theirs = make_evaluator(MODEL.evaluate, data)(_params())
  for name in ('client_accuracy_mean', 'client_accuracy_var', 'client_accuracy_median',
               'client_accuracy_worst_decile'):
    np.testing.assert_allclose(ours[name], theirs[name], atol=1e-6)
  np.testing.assert_allclose(ours['client_accuracy'], theirs['client_accuracy'], atol=1e-6)


def test_accuracy_distribution_of_a_known_population():
  values = jnp.asarray(np.r_[np.arange(20) / 20.0, 0.0, 0.0])  # last two: clients without data
  present = jnp.asarray(np.r_[np.ones(20, bool), False, False])
  stats = jax.device_get(accuracy_distribution(values, present, 'x'))
  np.testing.assert_allclose(stats['x_mean'], np.mean(np.arange(20) / 20.0), atol=1e-7)
  np.testing.assert_allclose(stats['x_median'], 9.5 / 20.0, atol=1e-7)
  np.testing.assert_allclose(stats['x_worst_decile'], (0.0 + 0.05) / 2, atol=1e-7)  # 2 of 20
  np.testing.assert_allclose(stats['x_var'], np.var(np.arange(20) / 20.0), atol=1e-7)
  few = jax.device_get(accuracy_distribution(jnp.asarray([0.9, 0.3, 0.6]),
                                             jnp.ones(3, bool), 'y'))
  np.testing.assert_allclose(few['y_worst_decile'], 0.3, atol=1e-7)   # at least one client


def test_personal_starting_models():
  """With `personalize`, client k starts from its own model; K = 0 evaluates it as is."""
  data = _data()
  rng = np.random.default_rng(9)
  own = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(NUM_CLIENTS,) + p.shape), p.dtype),
                     _params())
  evaluate = personalized_evaluator(MODEL, data, steps=0, learning_rate=0.1, batch_size=4,
                                    personalize=lambda params, state: state)
  out = jax.device_get(evaluate(_params(), jax.random.key(0), own))
  for c in (0, 4):
    _, test = _client(data, c)
    w, b = _np_params(jax.tree.map(lambda s: s[c], own))
    np.testing.assert_allclose(out['personalized_accuracy'][c],
                               _np_metrics(w, b, test['x'], test['y'])[0], atol=1e-6)
  state = ServerState(params=_params(), opt_state=(), aggregator_state=(), client_states=own,
                      extra=(), round=jnp.zeros((), jnp.int32))
  hooked = personalized_evaluation(evaluate, jax.random.key(1))(state, 3)   # a driver hook
  assert 'personalized_accuracy' not in hooked   # only the scalar statistics
  assert hooked['personalized_accuracy_mean'] == out['personalized_accuracy_mean']
  w, b = _np_params(_params())  # the global statistics still describe the global params
  _, test = _client(data, 4)
  np.testing.assert_allclose(out['client_accuracy'][4], _np_metrics(w, b, test['x'],
                                                                     test['y'])[0], atol=1e-6)


def test_data_without_held_out_split_is_an_error_with_the_remedy():
  data = _data()
  pooled = FederatedData(train=data.train, offsets=data.offsets, counts=data.counts,
                         test=data.test, test_client=None, num_classes=CLASSES, name='pooled')
  with pytest.raises(ValueError, match='hold_out_client_test'):
    personalized_evaluator(MODEL, pooled, steps=1, learning_rate=0.1, batch_size=4)
  split = hold_out_client_test(pooled, 0.25)
  np.testing.assert_array_equal(split.counts, [6] * NUM_CLIENTS)
  np.testing.assert_array_equal(np.bincount(split.test_client), [2] * NUM_CLIENTS)
  np.testing.assert_array_equal(split.test['x'][:2], data.train['x'][6:8])  # client 0's last 2
  with pytest.raises(ValueError, match='fraction'):
    hold_out_client_test(pooled, 1.5)


@pytest.mark.parametrize('kwargs, match', [
    ({'steps': -1}, 'steps'), ({'learning_rate': 0.0}, 'learning_rate'),
    ({'batch_size': 0}, 'batch_size'), ({'client_chunk_size': 2.5}, 'client_chunk_size')])
def test_bad_arguments_name_the_value(kwargs, match):
  args = dict(steps=1, learning_rate=0.1, batch_size=4) | kwargs
  with pytest.raises(ValueError, match=match):
    personalized_evaluator(MODEL, _data(), **args)
