"""Sequence models for next-token prediction: char-LSTM, word-LSTM, a causal transformer.

Batches hold token sequences `x [B, T]` (inputs) and `y [B, T]` (next-token
targets) in the project's token layout (`TokenLayout`): PAD = 0, BOS = 1, EOS = 2,
the vocabulary, and the last `num_oov_buckets` ids for out-of-vocabulary tokens
(Shakespeare's 90 ids fit it with one OOV id; see `fedjax_sync.data.shakespeare`).

Losses and metrics (shapes `[B]`, one value per sequence, so the engine's masking
and averaging of examples applies unchanged):

* `loss`: per-token cross-entropy averaged over the sequence's real tokens (targets
  that are not PAD). Only a client's last sequence is partly padded, so averaging
  these per sequence weighs tokens equally up to that one row.
* `evaluate`: `(loss, accuracy)` with accuracy the fraction of correct next tokens
  among targets that are neither PAD nor EOS (FedJAX's `accuracy_no_eos`).
* `sequence_metrics`: token-weighted totals over a whole set, as FedJAX reports them:
  `token_loss` (over non-PAD targets), `accuracy_no_eos`, `accuracy_in_vocab` (the
  same targets, with PAD, BOS, EOS and OOV excluded from the predictions, so an OOV
  target is always a miss) and `token_oov_rate`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sync.models.models import Model


class TokenLayout(NamedTuple):
  """Reserved ids: PAD, BOS, EOS first; the last `num_oov_buckets` ids are OOV."""

  pad: int = 0
  bos: int = 1
  eos: int = 2
  num_oov_buckets: int = 1

  def oov_ids(self, vocab_size: int) -> tuple[int, ...]:
    return tuple(range(vocab_size - self.num_oov_buckets, vocab_size))


class _LSTMLanguageModel(nn.Module):
  """Embedding → stacked LSTMs → (optional projection) → logits over the vocabulary."""

  vocab_size: int
  embedding_size: int
  hidden_sizes: Sequence[int]
  projection_size: int | None = None

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.Embed(self.vocab_size, self.embedding_size)(x.astype(jnp.int32))
    for width in self.hidden_sizes:
      h = nn.RNN(nn.OptimizedLSTMCell(width))(h)
    if self.projection_size is not None:
      h = nn.Dense(self.projection_size)(h)
    return nn.Dense(self.vocab_size)(h)


class _CausalBlock(nn.Module):
  width: int
  num_heads: int

  @nn.compact
  def __call__(self, h, mask):
    a = nn.LayerNorm()(h)
    h = h + nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(a, a, mask=mask)
    m = nn.LayerNorm()(h)
    m = nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(m)))
    return h + m


class _CausalTransformer(nn.Module):
  """A pre-LayerNorm decoder-only transformer (Vaswani et al. 2017, arXiv 1706.03762)."""

  vocab_size: int
  max_length: int
  width: int
  depth: int
  num_heads: int

  @nn.compact
  def __call__(self, x, train=False):
    length = x.shape[-1]
    h = nn.Embed(self.vocab_size, self.width)(x.astype(jnp.int32))
    positions = self.param('positions', nn.initializers.normal(0.02),
                           (self.max_length, self.width))
    h = h + positions[None, :length]
    mask = nn.make_causal_mask(jnp.ones(x.shape, jnp.int32))
    for _ in range(self.depth):
      h = _CausalBlock(self.width, self.num_heads)(h, mask)
    return nn.Dense(self.vocab_size)(nn.LayerNorm()(h))


def _token_terms(logits, targets, layout: TokenLayout):
  """Per-token cross-entropy `[B, T]` and the masks of real and scored targets."""
  token_loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  real = targets != layout.pad
  scored = real & (targets != layout.eos)
  return token_loss, real, scored


def sequence_model(module: nn.Module, sequence_length: int, vocab_size: int, name: str,
                   layout: TokenLayout = TokenLayout()) -> Model:
  """Wraps a flax module `x [B, T] -> logits [B, T, V]` as a `Model` (see module doc)."""
  if vocab_size <= 3 + layout.num_oov_buckets:
    raise ValueError(f'vocab_size {vocab_size} leaves no room for tokens beside PAD, BOS, EOS '
                     f'and {layout.num_oov_buckets} OOV id(s)')

  def init(key):
    return module.init({'params': key}, jnp.zeros((1, sequence_length), jnp.int32))['params']

  def apply(params, x, key=None, train=False):
    return module.apply({'params': params}, x)

  def loss(params, batch, key):
    token_loss, real, _ = _token_terms(apply(params, batch['x']), batch['y'], layout)
    return (jnp.sum(jnp.where(real, token_loss, 0.0), -1)
            / jnp.maximum(jnp.sum(real, -1), 1).astype(token_loss.dtype))

  def evaluate(params, batch):
    logits = apply(params, batch['x'])
    token_loss, real, scored = _token_terms(logits, batch['y'], layout)
    mean_loss = (jnp.sum(jnp.where(real, token_loss, 0.0), -1)
                 / jnp.maximum(jnp.sum(real, -1), 1).astype(token_loss.dtype))
    hits = (jnp.argmax(logits, -1) == batch['y']) & scored
    accuracy = jnp.sum(hits, -1) / jnp.maximum(jnp.sum(scored, -1), 1)
    return mean_loss, accuracy.astype(jnp.float32)

  model = Model(init=init, apply=apply, loss=loss, evaluate=evaluate, name=name)
  return model


def sequence_metrics(model: Model, params, x: np.ndarray, y: np.ndarray, *,
                     layout: TokenLayout = TokenLayout(), chunk_size: int = 512) -> dict:
  """Token-weighted metrics of `model` on `x, y [n, T]` (FedJAX's definitions).

  Returns `token_loss`, `accuracy_no_eos`, `accuracy_in_vocab`, `token_oov_rate`,
  `num_tokens` (non-PAD targets) as Python floats.
  """
  x, y = np.asarray(x), np.asarray(y)
  if x.shape != y.shape or x.ndim != 2:
    raise ValueError(f'x and y must both be [n, T], got {x.shape} and {y.shape}')
  n = x.shape[0]
  padded = -(-n // chunk_size) * chunk_size
  xs = np.zeros((padded, x.shape[1]), np.int32)
  ys = np.zeros((padded, x.shape[1]), np.int32)  # padding rows are all PAD: they count nothing
  xs[:n], ys[:n] = x, y
  xs = xs.reshape(-1, chunk_size, x.shape[1])
  ys = ys.reshape(-1, chunk_size, x.shape[1])
  sums = jax.device_get(_metric_sums(model, layout)(params, xs, ys))
  return {k: float(v) for k, v in sums.items()}


_METRIC_CACHE: dict = {}


def _metric_sums(model: Model, layout: TokenLayout) -> Callable:
  cache_key = (model, layout)
  if cache_key in _METRIC_CACHE:
    return _METRIC_CACHE[cache_key]

  @jax.jit
  def sums(params, xs, ys):
    def one(carry, chunk):
      x, y = chunk
      logits = model.apply(params, x)
      vocab = logits.shape[-1]
      token_loss, real, scored = _token_terms(logits, y, layout)
      excluded = jnp.zeros((vocab,), bool).at[
          jnp.array((layout.pad, layout.bos, layout.eos) + layout.oov_ids(vocab))].set(True)
      in_vocab_pred = jnp.argmax(jnp.where(excluded[None, None, :], -jnp.inf, logits), -1)
      is_oov = jnp.isin(y, jnp.array(layout.oov_ids(vocab)))
      terms = (jnp.sum(jnp.where(real, token_loss, 0.0)), jnp.sum(real),
               jnp.sum((jnp.argmax(logits, -1) == y) & scored),
               jnp.sum((in_vocab_pred == y) & scored), jnp.sum(scored),
               jnp.sum(is_oov & real))
      return jax.tree.map(lambda c, t: c + t.astype(jnp.float32), carry, terms), None

    zero = tuple(jnp.zeros((), jnp.float32) for _ in range(6))
    (loss_sum, tokens, hits, hits_in_vocab, scored, oov), _ = jax.lax.scan(one, zero, (xs, ys))
    return {'token_loss': loss_sum / jnp.maximum(tokens, 1),
            'accuracy_no_eos': hits / jnp.maximum(scored, 1),
            'accuracy_in_vocab': hits_in_vocab / jnp.maximum(scored, 1),
            'token_oov_rate': oov / jnp.maximum(tokens, 1), 'num_tokens': tokens}

  _METRIC_CACHE[cache_key] = sums
  return sums


def _sequence_length(input_shape: Sequence[int], name: str) -> int:
  shape = tuple(input_shape)
  if len(shape) != 1:
    raise ValueError(f'{name} needs token sequences x [n, T] (input_shape (T,)), got '
                     f'input_shape {shape}')
  return int(shape[0])


def char_lstm(input_shape: Sequence[int] = (80,), num_classes: int = 90, *,
              embedding_size: int = 8, hidden_sizes: Sequence[int] = (256, 256),
              layout: TokenLayout = TokenLayout()) -> Model:
  """Character LSTM of McMahan et al. 2017 (arXiv 1602.05629, §3 Shakespeare) and FedJAX.

  An 8-dimensional character embedding, two LSTM layers of 256 units and a dense
  layer to the `num_classes` (vocabulary) logits at every position.
  """
  length = _sequence_length(input_shape, 'char_lstm')
  return sequence_model(_LSTMLanguageModel(num_classes, embedding_size, tuple(hidden_sizes)),
                        length, num_classes, 'char_lstm', layout)


def word_lstm(input_shape: Sequence[int] = (20,), num_classes: int = 10004, *,
              embedding_size: int = 96, hidden_size: int = 670, projection_size: int = 96,
              layout: TokenLayout = TokenLayout()) -> Model:
  """Word LSTM for Stack Overflow next-word prediction (Reddi et al. 2021, arXiv 2003.00295,
  Table 7: embedding 96, one LSTM layer of 670, dense 96, dense to the vocabulary)."""
  length = _sequence_length(input_shape, 'word_lstm')
  return sequence_model(_LSTMLanguageModel(num_classes, embedding_size, (hidden_size,),
                                           projection_size),
                        length, num_classes, 'word_lstm', layout)


def causal_transformer(input_shape: Sequence[int] = (80,), num_classes: int = 90, *,
                       width: int = 64, depth: int = 2, num_heads: int = 4,
                       layout: TokenLayout = TokenLayout()) -> Model:
  """A small decoder-only transformer: learned positions, `depth` pre-LN causal blocks."""
  length = _sequence_length(input_shape, 'causal_transformer')
  if width % num_heads:
    raise ValueError(f'width {width} must be divisible by num_heads {num_heads}')
  return sequence_model(_CausalTransformer(num_classes, length, width, depth, num_heads),
                        length, num_classes, 'causal_transformer', layout)
