"""`models.from_flax`: linen and NNX modules as a `Model`, stateful ones included."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import fedjax_sync as fs
from fedjax_sync.clients.local import make_local_step, make_local_training
from fedjax_sync.data import client_batch_from_arrays
from fedjax_sync.models import from_flax, mlp
from fedjax_sync.models.flax_adapter import masked_token_metrics


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(3)(x)


class LinenBatchNorm(nn.Module):
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    return nn.Dense(3)(x)


class NNXDropoutMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(5, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
    self.dropout = nnx.Dropout(0.2, rngs=rngs)
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.dropout(nnx.relu(self.norm(self.hidden(x)))))


def _data(n=24, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 5)).astype(np.float32)
  return x, np.argmax(x[:, :3], axis=1).astype(np.int32)


def test_linen_mlp_equals_the_hand_written_model():
  x, y = _data()
  batch = {'x': jnp.asarray(x), 'y': jnp.asarray(y)}
  ours, reference = from_flax(LinenMLP(), x[:1]), mlp((5,), 3, hidden=(16,))
  assert ours.name == 'LinenMLP'
  key = jax.random.key(0)
  params = ours.init(key)
  chex.assert_trees_all_equal(params, jax.jit(reference.init)(key))
  # uint8 images are scaled to [0, 1] as the hand-written models do.
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 5)), jnp.uint8)
  everything = lambda m: jax.jit(lambda p, b, k: (  # one compilation: eager ops compile one by one
      m.apply(p, b['x']), m.loss(p, b, k), m.evaluate(p, b), m.apply(p, images)))
  chex.assert_trees_all_equal(everything(ours)(params, batch, key),
                              everything(reference)(params, batch, key))


def test_nnx_module_trains_with_statistics_averaged_and_dropout_per_client_key():
  """One compiled FedAvg round of an NNX module with BatchNorm and dropout.

  Clients 0 and 1 hold the same data: only their dropout keys differ.
  """
  xs = [_data(12, seed) for seed in (0, 0, 1)]
  client_batch = client_batch_from_arrays([{'x': x, 'y': y} for x, y in xs], 4)
  model = from_flax(NNXDropoutMLP(nnx.Rngs(0)), xs[0][0][:1])
  params = model.init(jax.random.key(0))
  assert set(params) == {'params', 'batch_stats'}
  algorithm = fs.fed_avg(model.loss, optax.sgd(0.3))
  round_fn = jax.jit(algorithm.round)
  state = algorithm.init(params)
  key = jax.random.key(5)
  after_one, metrics = round_fn(state, client_batch, key)
  _, again = round_fn(state, client_batch, key)
  _, other_seed = round_fn(state, client_batch, jax.random.key(6))
  losses = np.asarray(metrics['client_loss'])
  assert abs(losses[0] - losses[1]) > 1e-4                   # own dropout key per client
  np.testing.assert_array_equal(losses, np.asarray(again['client_loss']))    # replays per seed
  assert np.abs(losses - np.asarray(other_seed['client_loss'])).max() > 1e-4
  # Oracle: each client's own local run (the engine's client keys), then the
  # example-weighted mean of every leaf, the running statistics included.
  train = make_local_training(make_local_step(model.loss, optax.sgd(0.3)))
  finals = jax.jit(lambda p, data, mask: jax.vmap(lambda d, m, c: train(
      p, optax.sgd(0.3).init(p), d, m, jax.random.fold_in(jax.random.split(key)[0], c))[0])(
          data, mask, jnp.arange(3)))(params, client_batch.data, client_batch.mask)
  finals = jax.device_get(finals)
  # The statistics moved at every step: 3 steps of momentum 0.5 keep 1/8 of the init.
  assert np.abs(finals['batch_stats']['norm']['var'] - 1.0).max(axis=1).min() > 1e-2
  weights = np.asarray(client_batch.weight) / np.sum(np.asarray(client_batch.weight))
  expected = jax.tree.map(lambda leaf: np.tensordot(weights, leaf, 1), finals)
  chex.assert_trees_all_close(jax.device_get(after_one.params), expected, rtol=1e-5, atol=1e-6)
  # It trains.
  x = np.concatenate([x for x, _ in xs])
  batch = {'x': jnp.asarray(x), 'y': jnp.asarray(np.concatenate([y for _, y in xs]))}
  evaluate = jax.jit(model.evaluate)
  before = float(jnp.mean(evaluate(params, batch)[0]))
  for r in range(12):
    state, _ = round_fn(state, client_batch, jax.random.key(r))
  loss, correct = evaluate(state.params, batch)
  assert float(jnp.mean(loss)) < 0.6 * before and float(jnp.mean(correct)) > 0.8
  # Evaluation is in eval mode: the stored statistics, whatever the batch.
  first = {'x': x[:1], 'y': batch['y'][:1]}
  chex.assert_trees_all_close(evaluate(state.params, first)[0], loss[:1], rtol=1e-5)


def test_linen_state_update_and_dropout_keys():
  x, y = _data(8)
  batch = {'x': jnp.asarray(x), 'y': jnp.asarray(y)}
  model = from_flax(LinenBatchNorm(dropout=0.5), x[:1])
  params = model.init(jax.random.key(0))
  assert set(params) == {'params', 'batch_stats'}
  loss = jax.jit(model.loss)
  losses, update = loss(params, batch, jax.random.key(1))
  assert set(update) == {'batch_stats'}
  mean = update['batch_stats']['BatchNorm_0']['mean']
  hidden = x @ np.asarray(params['params']['Dense_0']['kernel']) + np.asarray(
      params['params']['Dense_0']['bias'])
  np.testing.assert_allclose(mean, 0.5 * hidden.mean(0), rtol=1e-4, atol=1e-6)  # momentum 0.5
  same, _ = loss(params, batch, jax.random.key(1))
  other, _ = loss(params, batch, jax.random.key(2))
  np.testing.assert_array_equal(losses, same)
  assert float(jnp.max(jnp.abs(losses - other))) > 1e-4
  plain = jax.jit(from_flax(LinenBatchNorm(dropout=0.0), x[:1]).loss)
  np.testing.assert_array_equal(plain(params, batch, jax.random.key(1))[0],
                                plain(params, batch, jax.random.key(2))[0])


class TinyLanguageModel(nn.Module):
  @nn.compact
  def __call__(self, tokens, train=False):
    return nn.Dense(7)(nn.Embed(7, 4)(tokens))


def test_sequence_outputs_mask_padding():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  labels = rng.integers(1, 7, size=(3, 5)).astype(np.int32)
  labels[0, 3:] = 0
  labels[2, :] = 0                        # a sequence without a real token
  labels[1, 0] = 2                        # an EOS: in the loss, not in the accuracy
  losses, accuracy = jax.jit(lambda a, b: masked_token_metrics(a, {'y': b}, unscored_labels=(2,)))(
      logits, labels)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  for b in range(3):
    real, scored = labels[b] != 0, (labels[b] != 0) & (labels[b] != 2)
    token_loss = -logp[b, np.arange(5), labels[b]]
    hits = logits[b].argmax(-1) == labels[b]
    want_loss = token_loss[real].mean() if real.any() else 0.0
    want_accuracy = hits[scored].mean() if scored.any() else 0.0
    np.testing.assert_allclose(losses[b], want_loss, rtol=1e-5)
    np.testing.assert_allclose(accuracy[b], want_accuracy, rtol=1e-6)
  tokens = rng.integers(0, 7, size=(4, 5)).astype(np.int32)   # int32 ids are not rescaled
  model = from_flax(TinyLanguageModel(), tokens[:1], output='sequence')
  params = model.init(jax.random.key(0))
  batch = {'x': jnp.asarray(tokens), 'y': jnp.asarray(labels[[0, 1, 0, 1]])}
  got, want, loss = jax.jit(lambda p, b: (
      model.evaluate(p, b), masked_token_metrics(model.apply(p, b['x']), b),
      model.loss(p, b, jax.random.key(0))))(params, batch)
  chex.assert_trees_all_close(got, want)
  chex.assert_trees_all_close(loss, want[0])


def test_your_own_loss_and_bad_arguments():
  x, y = _data()
  batch = {'x': jnp.asarray(x), 'y': jnp.asarray(y)}
  smooth = lambda logits, b: optax.softmax_cross_entropy(
      logits, optax.smooth_labels(jax.nn.one_hot(b['y'], 3), 0.1))
  model = from_flax(LinenMLP(), x[:1], per_example_loss=smooth)
  params = model.init(jax.random.key(0))
  chex.assert_trees_all_close(*jax.jit(lambda p, b: (
      model.loss(p, b, None), smooth(model.apply(p, b['x']), b)))(params, batch))
  with pytest.raises(ValueError, match="'regression'.*classification, sequence"):
    from_flax(LinenMLP(), x[:1], output='regression')
  with pytest.raises(ValueError, match="'deterministic' is not a parameter"):
    from_flax(LinenMLP(), x[:1], train_argument='deterministic')
  with pytest.raises(ValueError, match=r"\['cache'\] are not created"):
    from_flax(LinenBatchNorm(), x[:1], mutable=('cache',))
  with pytest.raises(TypeError, match='got function'):
    from_flax(lambda v: v, x[:1])
