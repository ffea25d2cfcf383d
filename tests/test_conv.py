"""`loop_friendly_conv`: same values and gradients as lax, canonical inside loops."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
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


def test_strided_and_dilated_convolutions_equal_lax():
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


# --- The local step's rewrite: every convolution of any loss, any configuration. ---

from fedjax_sync.clients.conv_rewrite import loop_friendly_convolutions  # noqa: E402

GENERAL = [
    dict(x=(2, 9, 9, 4), w=(3, 3, 4, 6), strides=(2, 2), padding='SAME', dn=NHWC),
    dict(x=(2, 9, 9, 4), w=(3, 3, 2, 6), strides=(1, 2), padding='VALID', rhs_dilation=(2, 1),
         feature_group_count=2, dn=NHWC),
    dict(x=(2, 4, 9, 9), w=(6, 4, 3, 3), strides=(2, 1), padding=((1, 2), (0, 1)),
         lhs_dilation=(1, 2), dn=('NCHW', 'OIHW', 'NCHW')),
    dict(x=(4, 9, 3), w=(3, 3, 5), strides=(3,), padding='SAME', dn=('NWC', 'WIO', 'NWC')),
    dict(x=(2, 5, 6, 7, 2), w=(2, 3, 2, 2, 4), strides=(1, 2, 2), padding='SAME',
         dn=('NDHWC', 'DHWIO', 'NDHWC')),
    dict(x=(6, 3, 7, 7), w=(3, 3, 3, 6), strides=(2, 1), padding='SAME', batch_group_count=3,
         dn=('NCHW', 'HWIO', 'NHWC')),
    dict(x=(2, 6, 6, 4), w=(3, 3, 1, 4), strides=(1, 1), padding='SAME', feature_group_count=4,
         dn=NHWC),
]


def _general_loss(case):
  kwargs = {k: v for k, v in case.items() if k not in ('x', 'w', 'strides', 'dn')}
  return _loss(lax.conv_general_dilated, window_strides=case['strides'],
               dimension_numbers=case['dn'], **kwargs)


@pytest.mark.parametrize('case', GENERAL, ids=['stride', 'dilated-grouped', 'nchw-lhs-dilated',
                                               '1d', '3d', 'batch-groups', 'depthwise'])
def test_rewritten_loss_equals_lax_in_values_and_gradients(case):
  x = jax.random.normal(jax.random.key(0), case['x'])
  w = jax.random.normal(jax.random.key(1), case['w'])
  plain = _general_loss(case)
  fast = loop_friendly_convolutions(plain)
  compiled = jax.jit(jax.value_and_grad(fast, (0, 1))).lower(x, w).compile()
  value, grads = compiled(x, w)
  expected_value, expected_grads = jax.jit(jax.value_and_grad(plain, (0, 1)))(x, w)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  for a, b in zip(grads, expected_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert _all_canonical(compiled.as_text()), _labels(compiled.as_text())


def _labels(text):
  return set(re.findall(r'dim_labels=(\S+?)[,\s]', text))


def _all_canonical(text):
  labels = _labels(text)
  return bool(labels) and all(re.fullmatch(r'b(\d*)f_\1io->b\1f', l) for l in labels)


def test_second_order_gradients_of_the_rewrite_equal_lax():
  case = GENERAL[1]
  x = jax.random.normal(jax.random.key(0), case['x'])
  w = jax.random.normal(jax.random.key(1), case['w'])
  plain = _general_loss(case)
  hv = lambda f: jax.grad(lambda w: jnp.sum(jax.grad(f, 1)(x, w) ** 2))(w)
  np.testing.assert_allclose(hv(loop_friendly_convolutions(plain)), hv(plain), rtol=1e-3,
                             atol=1e-4)


def test_rewrite_reaches_convolutions_in_jit_scan_cond_and_checkpoint():
  conv = lambda x, w: lax.conv_general_dilated(x, w, (2, 2), 'SAME', dimension_numbers=NHWC)

  def loss(x, w):
    y = jax.jit(conv)(x, w)
    y = y + jax.checkpoint(conv)(x, w)
    y = lax.cond(jnp.sum(x) > 0, lambda: conv(x, w), lambda: conv(-x, w)) + y
    y2, _ = lax.scan(lambda c, _: (c + conv(x, w * c[0, 0, 0, 0]), None), y, None, length=2)
    return jnp.sum(jnp.sin(y2))

  x = jax.random.normal(jax.random.key(0), (2, 7, 7, 3))
  w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4)) * 0.3
  compiled = jax.jit(jax.value_and_grad(loop_friendly_convolutions(loss), (0, 1))).lower(
      x, w).compile()
  value, grads = compiled(x, w)
  expected_value, expected_grads = jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  for a, b in zip(grads, expected_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert _all_canonical(compiled.as_text()), _labels(compiled.as_text())


def test_forward_mode_of_the_rewrite_is_a_clear_error_and_jvp_inside_the_loss_works():
  conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)
  x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 2))
  fast = loop_friendly_convolutions(lambda x, w: jnp.sum(conv(x, w) ** 2))
  with pytest.raises(TypeError, match='custom_vjp'):
    jax.jvp(lambda w: fast(x, w), (w,), (w,))
  # A loss that uses jax.jvp itself is traced first, then rewritten.
  inner = lambda x, w: jnp.sum(jax.jvp(lambda v: conv(x, v), (w,), (w,))[1] ** 2)
  np.testing.assert_allclose(jax.grad(loop_friendly_convolutions(inner), 1)(x, w),
                             jax.grad(inner, 1)(x, w), rtol=1e-5)


class _StockCNN(nn.Module):
  """FedJAX's EMNIST CNN layout with plain nn.Conv, narrower (for speed)."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(4, (3, 3), padding='VALID')(x))
    x = nn.relu(nn.Conv(8, (3, 3), padding='VALID')(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


class _ResNetCNN(nn.Module):
  """A residual stage with a strided 3×3 convolution and a strided 1×1 projection."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    y = nn.Conv(8, (3, 3))(nn.relu(nn.Conv(8, (3, 3), strides=(2, 2))(x)))
    x = nn.relu(y + nn.Conv(8, (1, 1), strides=(2, 2))(x))
    return nn.Dense(5)(jnp.mean(x, axis=(1, 2)))


@pytest.mark.parametrize('module,shape', [(_StockCNN(), (10, 10, 1)), (_ResNetCNN(), (8, 8, 3))],
                         ids=['stock-cnn', 'resnet'])
def test_no_non_canonical_convolution_in_the_local_training_loop(module, shape):
  model = fs.models.from_flax(module, jnp.zeros((1,) + shape))
  params = model.init(jax.random.key(0))
  data = {'x': jax.random.uniform(jax.random.key(1), (3, 4) + shape), 'y': jnp.zeros((3, 4), int)}
  mask = jnp.ones((3, 4), bool)
  optimizer = optax.sgd(0.1)

  def compiled(**flag):
    train = fs.make_local_training(fs.make_local_step(model.loss, optimizer, **flag))
    run = jax.jit(lambda p: train(p, optimizer.init(p), data, mask, jax.random.key(2))[0])
    return run, run.lower(params).compile().as_text()

  (fast, fast_hlo), (plain, plain_hlo) = compiled(), compiled(loop_friendly_convolutions=False)
  assert 'while' in fast_hlo and _all_canonical(fast_hlo), _labels(fast_hlo)
  assert not _all_canonical(plain_hlo)   # the check can fail: autodiff's own gradients
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               fast(params), plain(params))
  marked = fs.make_local_step(fs.clients.keep_convolutions(model.loss), optimizer)
  step_jaxpr = str(jax.make_jaxpr(lambda p: marked(p, optimizer.init(p), jax.tree.map(
      lambda v: v[0], data), mask[0], jax.random.key(2))[0])(params))
  assert 'custom_vjp' not in step_jaxpr and 'conv_general_dilated' in step_jaxpr


@pytest.mark.parametrize('shape,window', [((3, 7, 6, 4), (1, 2, 2, 1)),     # NHWC, odd rows cut
                                          ((3, 4, 9, 8), (1, 1, 3, 2)),     # NCHW
                                          ((2, 9, 5), (1, 3, 1)),           # 1-D
                                          ((2, 4, 4, 4, 2), (1, 2, 2, 2, 1))],  # 3-D
                         ids=['nhwc', 'nchw', '1d', '3d'])
def test_tiled_max_pool_equals_reduce_window_with_ties(shape, window):
  from fedjax_sync.models.pool import tiled_max_pool
  x = jax.random.normal(jax.random.key(0), shape)
  x = jnp.round(jax.nn.relu(x) * 2) / 2     # many ties: zeros and repeated halves
  pool = lambda v: jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, window, window, 'VALID')
  g = jax.random.normal(jax.random.key(1), pool(x).shape)
  np.testing.assert_array_equal(tiled_max_pool(x, window), pool(x))
  np.testing.assert_array_equal(jax.vjp(lambda v: tiled_max_pool(v, window), x)[1](g)[0],
                                jax.vjp(pool, x)[1](g)[0])
  # The rewrite uses it for tiling pools only; an overlapping pool stays as written.
  overlapping = lambda v: jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, window,
                                                (1,) * len(window), 'VALID')
  for f in (pool, overlapping):
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(f(v) * f(v)))(x),
                                  jax.grad(loop_friendly_convolutions(
                                      lambda v: jnp.sum(f(v) * f(v))))(x))
  assert 'custom_vjp' in str(jax.make_jaxpr(loop_friendly_convolutions(pool))(x))
  assert 'custom_vjp' not in str(jax.make_jaxpr(loop_friendly_convolutions(overlapping))(x))
