"""`loop_friendly_conv`: same values and gradients as lax, canonical inside loops."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fedjax_sync as fs
from fedjax_sync.models.conv import loop_friendly_conv

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _loss(conv, **kwargs):
  def loss(x, w):
    y = conv(jnp.tanh(x), w, **kwargs)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)
  return loss


CASES = [
    dict(shape=(3, 9, 8, 4), kernel=(3, 3, 4, 5), padding='VALID'),
    dict(shape=(2, 7, 7, 3), kernel=(5, 5, 3, 6), padding='SAME'),
    dict(shape=(2, 6, 9, 2), kernel=(2, 4, 2, 3), padding=((1, 0), (3, 2))),
    dict(shape=(4, 11, 3), kernel=(4, 3, 2), padding='SAME', dn=('NWC', 'WIO', 'NWC')),
]


@pytest.mark.parametrize('case', CASES, ids=lambda c: f'{c["kernel"]}-{c["padding"]}')
def test_values_and_gradients_equal_lax(case):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, case['shape'])
  w = jax.random.normal(kw, case['kernel'])
  n = len(case['shape']) - 2
  kwargs = dict(window_strides=(1,) * n, padding=case['padding'],
                dimension_numbers=case.get('dn', NHWC))
  ours, theirs = _loss(loop_friendly_conv, **kwargs), _loss(lax.conv_general_dilated, **kwargs)
  np.testing.assert_allclose(ours(x, w), theirs(x, w), rtol=1e-5)
  for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(theirs, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # Second order (the VJP is itself differentiable).
  hv = lambda f: jax.grad(lambda w: jnp.sum(jax.grad(f, 1)(x, w) ** 2))(w)
  np.testing.assert_allclose(hv(ours), hv(theirs), rtol=1e-3, atol=1e-4)


def test_ineligible_convolutions_fall_back_to_lax():
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 3))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  for kwargs in (dict(window_strides=(2, 2)), dict(window_strides=(1, 1), rhs_dilation=(2, 2))):
    args = dict(padding='SAME', dimension_numbers=NHWC, **kwargs)
    ours, theirs = _loss(loop_friendly_conv, **args), _loss(lax.conv_general_dilated, **args)
    for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(theirs, (0, 1))(x, w)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _loop_hlo(conv):
  loss = _loss(conv, window_strides=(1, 1), padding='VALID', dimension_numbers=NHWC)
  x = jnp.ones((3, 4, 10, 10, 3))

  def train(w):
    return lax.fori_loop(0, 3, lambda i, w: w - 0.1 * jax.grad(loss, 1)(x[i], w), w)

  return jax.jit(train).lower(jnp.ones((3, 3, 3, 8))).compile().as_text()


def test_gradient_convolutions_inside_a_loop_are_canonical():
  # The cause of slow CNN training in XLA:CPU loops: autodiff's kernel gradient has
  # batch and feature axes swapped (f01b...), which XLA:CPU only canonicalizes
  # outside loops. Ours never emits such a convolution.
  labels = lambda text: set(re.findall(r'dim_labels=(\S+?)[,\s]', text))
  canonical = lambda label: label.startswith('b01f') and label.endswith('->b01f')
  assert not all(canonical(l) for l in labels(_loop_hlo(lax.conv_general_dilated)))
  assert all(canonical(l) for l in labels(_loop_hlo(loop_friendly_conv)))


@pytest.mark.parametrize('build', [fs.models.emnist_cnn, fs.models.lenet5])
def test_models_train_the_same_with_either_convolution(build):
  shape = (12, 12, 1)   # small images: the same layers, a faster test
  fast, plain = build(shape, fast_cpu_conv=True), build(shape, fast_cpu_conv=False)
  params = fast.init(jax.random.key(0))
  batch = {'x': jax.random.randint(jax.random.key(1), (4,) + shape, 0, 256).astype(jnp.uint8),
           'y': jnp.arange(4)}
  grad = lambda m: jax.jit(jax.grad(lambda p: jnp.mean(m.loss(p, batch, None))))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grad(fast), grad(plain))
