"""Ditto, FedPer and FedRep against numpy oracles of their papers' updates (issue 16)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sync.algorithms import (build_algorithm, ditto, fed_avg, fed_per, fed_rep,
                                    head_paths, output_layer, partial_training)
from fedjax_sync.algorithms.registry import Hyperparameters, resolve_hyperparameters
from fedjax_sync.data import client_batch_from_arrays
from fedjax_sync.models import logistic_regression

D, POPULATION, LR = 3, 5, 0.1
ROUNDS = (([3, 0, 4], 0), ([1, 3, 2], 1))   # (sampled client ids, data seed); client 3 twice


def _round_data(seed):
  rng = np.random.default_rng(20 + seed)
  return [(rng.normal(size=(n, D)) + i).astype(np.float32) for i, n in enumerate((4, 3, 4))]


def _batch(ids, seed):
  batch = client_batch_from_arrays([{'x': x} for x in _round_data(seed)], batch_size=2)
  return batch._replace(client_ids=jnp.asarray(ids, jnp.int32))


def _batches(x):
  return [x[s:s + 2].mean(0).astype(np.float64) for s in range(0, len(x), 2)]


def _two_layer_loss(params, batch, key):
  """`½‖2a + b − x‖²` per example: body a = Dense_0, head b = Dense_1 (the output layer)."""
  del key
  a, b = params['Dense_0']['kernel'], params['Dense_1']['kernel']
  return 0.5 * jnp.sum(jnp.square(2 * a[None] + b[None] - batch['x']), axis=1)


def _two_layer_params():
  return {'Dense_0': {'kernel': jnp.asarray(np.linspace(-1, 1, D), jnp.float32)},
          'Dense_1': {'kernel': jnp.asarray(np.linspace(1, -0.5, D), jnp.float32)}}


def _run(algorithm, params):
  state = algorithm.init(params)
  step = jax.jit(algorithm.round)
  states = []
  for ids, seed in ROUNDS:
    state, _ = step(state, _batch(ids, seed), jax.random.key(seed))
    states.append(state)
  return states


def _numpy_personal_rounds(local_update):
  """Server body/head and per-client heads after each round; `local_update(a, b, x)`
  returns one client's new (a, b); the server takes the example-weighted mean of both."""
  a = np.linspace(-1, 1, D)
  b = np.linspace(1, -0.5, D)
  heads = np.tile(b, (POPULATION, 1))
  out = []
  for ids, seed in ROUNDS:
    xs = _round_data(seed)
    n = np.array([len(x) for x in xs], np.float64)
    new = [local_update(a, heads[i], x) for x, i in zip(xs, ids)]
    a = sum(w * an for w, (an, _) in zip(n / n.sum(), new))
    b = sum(w * bn for w, (_, bn) in zip(n / n.sum(), new))
    for i, (_, bn) in zip(ids, new):
      heads[i] = bn
    out.append((a.copy(), b.copy(), heads.copy()))
  return out


def _check_personal(states, expected, algorithm):
  for state, (a, b, heads) in zip(states, expected):
    np.testing.assert_allclose(state.params['Dense_0']['kernel'], a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.params['Dense_1']['kernel'], b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.client_states['Dense_1']['kernel'], heads, rtol=1e-5,
                               atol=1e-6)
    assert set(state.client_states) == {'Dense_1'}   # the body is never per client
  client = jax.tree.map(lambda s: s[3], states[-1].client_states)
  mine = algorithm.personalize(states[-1].params, client)   # shared body, own head
  np.testing.assert_array_equal(mine['Dense_0']['kernel'], states[-1].params['Dense_0']['kernel'])
  np.testing.assert_array_equal(mine['Dense_1']['kernel'], client['Dense_1']['kernel'])


def test_fedper_matches_numpy():
  def local(a, b, x):   # body and head jointly (FedPer, Algorithm 1)
    for xb in _batches(x):
      r = 2 * a + b - xb
      a, b = a - LR * 2 * r, b - LR * r
    return a, b

  algorithm = fed_per(_two_layer_loss, optax.sgd(LR), num_clients=POPULATION)
  _check_personal(_run(algorithm, _two_layer_params()), _numpy_personal_rounds(local), algorithm)


def test_fedrep_matches_numpy():
  head_epochs = 3

  def local(a, b, x):   # FedRep, Algorithm 1: τ_h head passes (body frozen), then the body
    for _ in range(head_epochs):
      for xb in _batches(x):
        b = b - LR * (2 * a + b - xb)
    for xb in _batches(x):
      a = a - LR * 2 * (2 * a + b - xb)
    return a, b

  algorithm = fed_rep(_two_layer_loss, optax.sgd(LR), num_clients=POPULATION,
                      head_epochs=head_epochs)
  _check_personal(_run(algorithm, _two_layer_params()), _numpy_personal_rounds(local), algorithm)


def _quadratic_loss(params, batch, key):
  del key
  return 0.5 * jnp.sum(jnp.square(params['w'][None] - batch['x']), axis=1)


def test_ditto_personal_models_match_numpy():
  lam = 0.5
  w = np.linspace(-1, 1, D)
  personal = np.tile(w, (POPULATION, 1))   # v_k⁰ = w⁰
  expected = []
  for ids, seed in ROUNDS:
    xs = _round_data(seed)
    n = np.array([len(x) for x in xs], np.float64)
    new_w = []
    for x, i in zip(xs, ids):
      y, v = w.copy(), personal[i].copy()
      for xb in _batches(x):
        y = y - LR * (y - xb)                          # FedAvg's local step
        v = v - LR * ((v - xb) + lam * (v - w))        # ∇F_k(v) + λ(v − w^t)
      new_w.append(y)
      personal[i] = v
    w = sum(p * y for p, y in zip(n / n.sum(), new_w))
    expected.append((w.copy(), personal.copy()))
  algorithm = ditto(_quadratic_loss, optax.sgd(LR), num_clients=POPULATION, ditto_lambda=lam)
  states = _run(algorithm, {'w': jnp.asarray(np.linspace(-1, 1, D), jnp.float32)})
  for state, (w, personal) in zip(states, expected):
    np.testing.assert_allclose(state.params['w'], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.client_states['w'], personal, rtol=1e-5, atol=1e-6)
  v4 = algorithm.personalize(states[-1].params, jax.tree.map(lambda v: v[4],
                                                            states[-1].client_states))
  np.testing.assert_array_equal(v4['w'], states[-1].client_states['w'][4])


def test_ditto_global_model_is_bitwise_fedavg():
  model = logistic_regression((D,), 4)
  rng = np.random.default_rng(0)

  def batch(ids, seed):
    del seed
    clients = [{'x': rng.normal(size=(n, D)).astype(np.float32),
                'y': rng.integers(0, 4, size=n).astype(np.int32)} for n in (4, 3, 4)]
    return client_batch_from_arrays(clients, 2)._replace(client_ids=jnp.asarray(ids, jnp.int32))

  batches = [batch(ids, seed) for ids, seed in ROUNDS]
  params = model.init(jax.random.key(0))
  runs = []
  for algorithm in (fed_avg(model.loss, optax.sgd(0.3)),
                    ditto(model.loss, optax.sgd(0.3), num_clients=POPULATION, ditto_lambda=1.0)):
    state, step = algorithm.init(params), jax.jit(algorithm.round)
    for b, (_, seed) in zip(batches, ROUNDS):
      state, _ = step(state, b, jax.random.key(seed))
    runs.append(state.params)
  for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_head_selection():
  params = {'Embed_0': {'embedding': 0}, 'Dense_2': {'kernel': 0, 'bias': 0},
            'Dense_10': {'kernel': 0}, 'Block_0': {'Dense_11': {'kernel': 0}}}
  assert output_layer(params) == ('Dense_10',)   # numeric order, shallowest depth
  assert head_paths(params) == {('Dense_10', 'kernel')}
  assert head_paths(params, r'^Dense_2/') == {('Dense_2', 'kernel'), ('Dense_2', 'bias')}
  assert head_paths(params, lambda path: path[0] == 'Embed_0') == {('Embed_0', 'embedding')}
  for head, match in ((r'^nothing', 'selects no parameter'), (r'.', 'selects every'),
                      ('(', 'not a valid regular expression')):
    with pytest.raises(ValueError, match=match):
      head_paths(params, head)
  with pytest.raises(ValueError, match='head='):
    head_paths({'Conv_0': {'kernel': 0}, 'Conv_1': {'kernel': 0}})
  with pytest.raises(ValueError, match='dict of params'):
    head_paths({'w': 0}['w'])


def test_frozen_leaves_never_move_even_with_weight_decay():
  train, optimizer = partial_training(_two_layer_loss, optax.adamw(0.1, weight_decay=0.5),
                                      lambda p: frozenset({('Dense_1', 'kernel')}))
  params = _two_layer_params()
  batch = _batch([0, 1, 2], 0)
  new, _, _ = train(params, optimizer.init(params), jax.tree.map(lambda x: x[0], batch.data),
                    batch.mask[0], jax.random.key(0))
  np.testing.assert_array_equal(new['Dense_0']['kernel'], params['Dense_0']['kernel'])
  assert np.max(np.abs(new['Dense_1']['kernel'] - params['Dense_1']['kernel'])) > 0.05


def test_registry_builds_with_the_hyperparameters():
  h = resolve_hyperparameters('fedrep', overrides={'head_pattern': 'Dense_1/', 'head_epochs': '2'})
  assert (h.head_pattern, h.head_epochs) == ('Dense_1/', 2)
  assert resolve_hyperparameters('ditto', overrides={'ditto_lambda': '0.5'}).ditto_lambda == 0.5
  with pytest.raises(ValueError, match='ditto_lambda'):
    resolve_hyperparameters('ditto', overrides={'ditto_lambda': '-1'})
  with pytest.raises(ValueError, match='head_epochs'):
    resolve_hyperparameters('fedrep', overrides={'head_epochs': '-1'})
  for name in ('ditto', 'fedper', 'fedrep'):
    algorithm = build_algorithm(name, _two_layer_loss, Hyperparameters(), num_clients=POPULATION)
    assert algorithm.personalize is not None and algorithm.num_clients == POPULATION
  with pytest.raises(ValueError, match='num_clients'):
    build_algorithm('fedper', _two_layer_loss, Hyperparameters())


def test_fedrep_contains_a_nan_client():
  """The registry's NaN-client check skips FedPer/FedRep (logistic regression has one
  layer, so no body to share); here on the two-layer model: a diverged client with
  weight > 0 is counted and its head is never written into `client_states`."""
  algorithm = fed_rep(_two_layer_loss, optax.sgd(LR), num_clients=POPULATION, head_epochs=1)
  state = algorithm.init(_two_layer_params())
  batch = _batch([3, 0, 4], 0)
  batch = batch._replace(data={'x': batch.data['x'].at[1].set(jnp.nan)})   # client 0
  new, metrics = jax.jit(algorithm.round)(state, batch, jax.random.key(0))
  assert float(metrics['nonfinite_updates']) == 1.0
  heads = np.asarray(new.client_states['Dense_1']['kernel'])
  assert np.all(np.isfinite(heads))
  np.testing.assert_array_equal(heads[0], state.client_states['Dense_1']['kernel'][0])
  assert np.max(np.abs(heads[3] - heads[0])) > 1e-3   # a finite client's head moved
