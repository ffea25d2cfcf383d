"""Small flax models for federated simulation, with their per-example losses.

A `Model` bundles `init(key) -> params`, `apply(params, x, key, train) -> logits`,
a per-example training loss `loss(params, batch, key) -> [B]` (the engine masks
and averages), and `evaluate(params, batch) -> (loss [B], correct [B])`.
Integer (uint8) image inputs are scaled to [0, 1] inside the model, so datasets
stay compact on the host and the device.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from fedjax_sync.models.conv import loop_friendly_conv


class Model(NamedTuple):
  init: Callable
  apply: Callable
  loss: Callable
  evaluate: Callable
  name: str


def _prepare(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.integer):
    return x.astype(jnp.float32) / 255.0
  return x


def _classifier(module: nn.Module, input_shape: Sequence[int], name: str) -> Model:
  def init(key):
    return module.init({'params': key}, jnp.zeros((1, *input_shape), jnp.float32),
                       train=False)['params']

  def apply(params, x, key=None, train=False):
    rngs = {'dropout': key} if (train and key is not None) else {}
    return module.apply({'params': params}, _prepare(x), train=train and key is not None,
                        rngs=rngs)

  def loss(params, batch, key):
    logits = apply(params, batch['x'], key, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])

  def evaluate(params, batch):
    logits = apply(params, batch['x'])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])
    return losses, (jnp.argmax(logits, -1) == batch['y'])

  return Model(init=init, apply=apply, loss=loss, evaluate=evaluate, name=name)


class _Logistic(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


class _MLP(nn.Module):
  hidden: Sequence[int]
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False):
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def conv_function(fast_cpu_conv: bool):
  """The convolution the models use: `loop_friendly_conv` or plain `lax`."""
  return loop_friendly_conv if fast_cpu_conv else lax.conv_general_dilated


class _EmnistCNN(nn.Module):
  """The CNN of FedJAX's EMNIST benchmark (Reddi et al. 2021's `cnn` variant)."""

  num_classes: int
  dropout: bool
  fast_cpu_conv: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    conv = conv_function(self.fast_cpu_conv)
    x = nn.relu(nn.Conv(32, (3, 3), padding='VALID', conv_general_dilated=conv)(x))
    x = nn.relu(nn.Conv(64, (3, 3), padding='VALID', conv_general_dilated=conv)(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
    if self.dropout:
      x = nn.Dropout(0.25, deterministic=not train)(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128)(x))
    if self.dropout:
      x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


def logistic_regression(input_shape: Sequence[int], num_classes: int) -> Model:
  """Multinomial logistic regression (FedProx's model for Synthetic data)."""
  return _classifier(_Logistic(num_classes), input_shape, 'logistic_regression')


def mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (200,)) -> Model:
  """A ReLU multilayer perceptron (784-200-10 by default on MNIST-shaped inputs)."""
  return _classifier(_MLP(tuple(hidden), num_classes), input_shape, 'mlp')


def emnist_cnn(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 62, *,
               dropout: bool = True, fast_cpu_conv: bool = True) -> Model:
  """FedJAX's EMNIST CNN: conv32-conv64-maxpool-dropout-dense128-dropout-dense.

  `fast_cpu_conv` uses `loop_friendly_conv` (fast gradients inside XLA:CPU loops,
  reverse-mode autodiff only); False uses `lax.conv_general_dilated`.
  """
  return _classifier(_EmnistCNN(num_classes, dropout, fast_cpu_conv), input_shape,
                     'emnist_cnn')


MODELS = {
    'logistic_regression': logistic_regression,
    'mlp': mlp,
    'emnist_cnn': emnist_cnn,
}


def get_model(name: str, input_shape: Sequence[int], num_classes: int) -> Model:
  """A model by name (see `MODELS`)."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; valid: {", ".join(sorted(MODELS))}')
  return MODELS[name](tuple(input_shape), num_classes)

from fedjax_sync.models.lenet import lenet5  # noqa: E402  (lenet builds on _classifier above)
MODELS['lenet5'] = lenet5

from fedjax_sync.models.sequence import (causal_transformer, char_lstm,  # noqa: E402
                                         word_lstm)
MODELS.update(char_lstm=char_lstm, causal_transformer=causal_transformer, word_lstm=word_lstm)
