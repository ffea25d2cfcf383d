"""FedBN (Li et al. 2021, arXiv 2102.07623): batch-norm layers kept per client."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync.algorithms.fed_bn import fed_bn, local_part, personalized_params
from fedjax_sync.clients.local import make_local_step, make_local_training
from fedjax_sync.data import client_batch_from_arrays, from_client_indices
from fedjax_sync.models import from_flax, mlp
from fedjax_sync.simulate import make_evaluator

NUM_CLIENTS, LEARNING_RATE = 3, 0.2


class BatchNormNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Dense(6)(x))
    return nn.Dense(3)(nn.relu(x))


def _examples():
  """Feature shift, FedBN's setting: client c's inputs are scaled and shifted."""
  rng = np.random.default_rng(0)
  examples = []
  for c in range(NUM_CLIENTS):
    z = rng.normal(size=(12, 4)).astype(np.float32)
    examples.append({'x': z * (1 + c) + 2.0 * c, 'y': np.argmax(z[:, :3], 1).astype(np.int32)})
  return examples


@functools.lru_cache(maxsize=None)
def _setup():
  examples = _examples()
  model = from_flax(BatchNormNet(), examples[0]['x'][:1])
  batch = client_batch_from_arrays(examples, 4)
  train = make_local_training(make_local_step(model.loss, optax.sgd(LEARNING_RATE)))

  @jax.jit
  def local_runs(starts, round_key):
    """Oracle: every client's own local run from its own start (leaves [C, ...])."""
    client_root = jax.random.split(round_key)[0]
    return jax.vmap(lambda p, d, m, c: train(p, optax.sgd(LEARNING_RATE).init(p), d, m,
                                             jax.random.fold_in(client_root, c))[0])(
        starts, batch.data, batch.mask, batch.client_ids)

  return model, batch, local_runs, model.init(jax.random.key(0))


def _stack(trees):
  return jax.tree.map(lambda *leaves: np.stack(leaves), *trees)


def _run(algorithm, params, batch, rounds=2):
  round_fn = jax.jit(algorithm.round)
  states = [algorithm.init(params)]
  for r in range(rounds):
    states.append(round_fn(states[-1], batch, jax.random.key(r))[0])
  return jax.device_get(states)


def test_shared_layers_follow_fedavg_and_statistics_stay_with_their_client():
  """Statistics only: train-mode BatchNorm never reads its running statistics, so
  the shared params are FedAvg's, and each client's statistics are its own runs'."""
  model, batch, local_runs, params = _setup()
  fedbn = _run(fed_bn(model.loss, optax.sgd(LEARNING_RATE), num_clients=NUM_CLIENTS,
                      local_affine=False), params, batch)
  fedavg = _run(fs.fed_avg(model.loss, optax.sgd(LEARNING_RATE)), params, batch)
  chex.assert_trees_all_close(fedbn[-1].params['params'], fedavg[-1].params['params'],
                              rtol=1e-5, atol=1e-6)
  stats = _stack([params['batch_stats']] * NUM_CLIENTS)
  for r in range(2):
    shared = _stack([fedavg[r].params['params']] * NUM_CLIENTS)
    stats = jax.device_get(local_runs({'params': shared, 'batch_stats': stats},
                                      jax.random.key(r)))['batch_stats']
  assert set(fedbn[-1].client_states) == {'batch_stats'}
  chex.assert_trees_all_close(fedbn[-1].client_states['batch_stats'], stats, rtol=1e-5, atol=1e-6)
  means = stats['BatchNorm_0']['mean']
  assert np.abs(means[1] - means[0]).max() > 0.5            # shifted features, own statistics
  averaged = fedavg[-1].params['batch_stats']['BatchNorm_0']['mean']
  assert np.abs(means - averaged).max() > 0.5


@functools.lru_cache(maxsize=None)
def _default_fedbn_run():
  model, batch, _, params = _setup()
  return _run(fed_bn(model.loss, optax.sgd(LEARNING_RATE), num_clients=NUM_CLIENTS),
              params, batch)


def test_batch_norm_layers_stay_local_as_in_algorithm_1():
  """Default: scale, bias and statistics per client; oracle: the rounds by hand."""
  model, batch, local_runs, params = _setup()
  fedbn = _default_fedbn_run()
  server = params
  parts = _stack([local_part(params)] * NUM_CLIENTS)
  weights = np.asarray(batch.weight) / np.sum(np.asarray(batch.weight))
  for r in range(2):
    starts = jax.vmap(personalized_params, in_axes=(None, 0))(server, parts)
    finals = jax.device_get(local_runs(starts, jax.random.key(r)))
    parts = local_part(finals)
    server = jax.tree.map(lambda leaf: np.tensordot(weights, leaf, 1), finals)
  chex.assert_trees_all_close(fedbn[-1].client_states, parts, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(fedbn[-1].params, server, rtol=1e-5, atol=1e-6)
  assert set(fedbn[-1].client_states['params']) == {'BatchNorm_0'}   # Dense layers are shared
  scales = parts['params']['BatchNorm_0']['scale']
  assert np.abs(scales[2] - scales[0]).max() > 1e-4


def test_per_client_evaluation_uses_each_clients_own_layers():
  model, batch, _, params = _setup()
  examples = _examples()
  data = from_client_indices(
      {k: np.concatenate([e[k] for e in examples]) for k in ('x', 'y')},
      [np.arange(12 * c, 12 * (c + 1)) for c in range(NUM_CLIENTS)],
      {k: np.concatenate([e[k] for e in examples]) for k in ('x', 'y')},
      num_classes=3, name='feature shift')
  state = _default_fedbn_run()[-1]
  evaluate = make_evaluator(model.evaluate, data, chunk_size=16, personalize=personalized_params)
  personal = jax.device_get(evaluate(state.params, state.client_states))
  shared_only = jax.device_get(evaluate(state.params))
  own = jax.jit(lambda p, part, b: model.evaluate(personalized_params(p, part), b)[1])
  for c, e in enumerate(examples):
    part = jax.tree.map(lambda s: s[c], state.client_states)
    want = float(np.mean(own(state.params, part, e)))
    np.testing.assert_allclose(personal['personalized_accuracy'][c], want, rtol=1e-6)
  assert np.abs(personal['personalized_accuracy'] - shared_only['client_accuracy']).max() > 0
  assert personal['test_accuracy'] == shared_only['test_accuracy']   # global test: server params
  # Issue 16's naming: client_accuracy* describe the global params, personal models
  # carry the personalized_ prefix (with every statistic); without client states
  # there is no personal model to report.
  np.testing.assert_array_equal(personal['client_accuracy'], shared_only['client_accuracy'])
  assert personal['personalized_accuracy_mean'] == pytest.approx(
      np.mean(personal['personalized_accuracy']))
  assert personal['personalized_accuracy_var'] == pytest.approx(
      np.var(personal['personalized_accuracy']), abs=1e-6)
  assert not any(k.startswith('personalized_') for k in shared_only)
  # The Simulator evaluates FedBN's clients the same way (Algorithm.personalize).
  algorithm = fed_bn(model.loss, optax.sgd(LEARNING_RATE), num_clients=NUM_CLIENTS)
  config = fs.SimulationConfig(num_rounds=1, clients_per_round=NUM_CLIENTS,
                               local_work=fs.LocalWork(batch_size=4, steps=3))
  sim = fs.Simulator(algorithm, model, data, config)
  simulated = sim.evaluate(state.params, state.client_states)
  np.testing.assert_allclose(simulated['personalized_accuracy'], personal['personalized_accuracy'])
  np.testing.assert_allclose(simulated['client_accuracy'], personal['client_accuracy'])
  scalars = {k for k, v in simulated.items() if np.ndim(v) == 0}
  assert scalars == set(sim.evaluation_names)


def test_registry_and_errors():
  model, batch, _, params = _setup()
  algorithm = fs.build_algorithm('fedbn', model.loss, num_clients=NUM_CLIENTS)
  assert algorithm.name == 'fedbn' and algorithm.personalize is personalized_params
  clocked = fs.simulate.with_clock(algorithm, fs.simulate.make_clock(np.ones(NUM_CLIENTS)))
  assert clocked.personalize is personalized_params
  assert 'fedbn' in fs.algorithms.algorithm_names()
  stateless = mlp((4,), 3).init(jax.random.key(0))
  with pytest.raises(ValueError, match='stateful model.*Dense_0'):
    algorithm.init(stateless)
  with pytest.raises(ValueError, match=r"no \['cache'\]"):
    fed_bn(model.loss, optax.sgd(0.1), num_clients=3, local_collections=('cache',)).init(params)
  with pytest.raises(ValueError, match='other than "params"'):
    fed_bn(model.loss, optax.sgd(0.1), num_clients=3, local_collections=('params',))
  with pytest.raises(ValueError, match='num_clients'):
    fed_bn(model.loss, optax.sgd(0.1), num_clients=0)
  fedsgd = fs.fed_sgd(model.loss)   # differentiates the loss itself: a clear error, when traced
  with pytest.raises(ValueError, match='needs a stateless loss'):
    jax.eval_shape(fedsgd.round, fedsgd.init(params), batch, jax.random.key(0))
