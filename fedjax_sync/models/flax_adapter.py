"""Any flax model as a fedjax-sync `Model`: linen or NNX, stateless or stateful.

`from_flax(module, example_x)` wraps a `flax.linen.Module` or a `flax.nnx.Module`
into `Model(init, apply, loss, evaluate, name)`, the interface the engine and the
drivers use. The params pytree it trains is a plain nested dict:

* a stateless model: its parameters (linen's `params` collection, or NNX's
  `nnx.Param` variables as a pure dict), exactly what a hand-written `Model` holds;
* a model with mutable state (BatchNorm): `{'params': ..., 'batch_stats': ...}`
  (linen: every collection `init` creates; NNX: `nnx.BatchStat` under
  `'batch_stats'`, other non-parameter variables under `'state'`). Its loss returns
  `(losses [B], {collection: new value})`; the local step ignores those
  collections' gradients and takes their train-mode update at every step
  (`clients.local.split_loss_output`). Evaluation runs in eval mode on the stored
  statistics. The collections travel with the params: FedAvg averages them like
  parameters, FedBN (`algorithms.fed_bn`) keeps them per client.

Randomness (dropout) comes from the key the engine gives the loss: the client's
key folded with the step, so two clients never share a dropout mask and a seed
replays exactly.
"""

from __future__ import annotations

import inspect
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fedjax_sync.models.models import Model

OUTPUTS = ('classification', 'sequence')
# Keyword arguments that switch a module between training and evaluation, and the
# value each takes in training.
TRAIN_ARGUMENTS = {'train': True, 'training': True, 'is_training': True,
                   'deterministic': False}


def _scale_uint8(x: jax.Array) -> jax.Array:
  return x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x


def classification_metrics(logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy and correctness `[B]` of logits `[B, K]` against labels `batch['y'] [B]`."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['y'])
  return losses, (jnp.argmax(logits, -1) == batch['y'])


def masked_token_metrics(logits: jax.Array, batch: dict, pad_label: int | None = 0,
                         unscored_labels: Sequence[int] = ()) -> tuple[jax.Array, jax.Array]:
  """Per-sequence mean token cross-entropy and token accuracy `[B]`, padding masked.

  Logits `[B, T, V]`, labels `batch['y'] [B, T]`; tokens whose label is `pad_label`
  count nowhere (None: every token counts), tokens labelled one of
  `unscored_labels` (e.g. EOS) count in the loss but not in the accuracy. Each
  sequence weighs equally in the engine's mean over examples; a sequence without
  a real token scores 0.
  """
  labels = batch['y']
  token_losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  real = (jnp.ones(labels.shape, bool) if pad_label is None else labels != pad_label)
  scored = real
  for label in unscored_labels:
    scored = scored & (labels != label)
  count = lambda m: jnp.maximum(jnp.sum(m, axis=-1), 1).astype(token_losses.dtype)
  losses = jnp.sum(jnp.where(real, token_losses, 0.0), axis=-1) / count(real)
  hits = jnp.where(scored, jnp.argmax(logits, -1) == labels, False)
  return losses, jnp.sum(hits, axis=-1).astype(token_losses.dtype) / count(scored)


def _train_argument(call: Callable, requested: str | None) -> str | None:
  parameters = inspect.signature(call).parameters
  if requested == 'auto':
    return next((name for name in TRAIN_ARGUMENTS if name in parameters), None)
  if requested is None:
    return None
  if requested not in TRAIN_ARGUMENTS:
    raise ValueError(f'train_argument {requested!r} is not one of '
                     f"{', '.join(['auto', 'None', *TRAIN_ARGUMENTS])}")
  if requested not in parameters:
    raise ValueError(f'train_argument {requested!r} is not a parameter of the module '
                     f'(its parameters: {", ".join(parameters) or "none"})')
  return requested


def _mode(argument: str | None, train: bool) -> dict:
  if argument is None:
    return {}
  return {argument: train if TRAIN_ARGUMENTS[argument] else not train}


def _stream_keys(key: jax.Array, streams: Sequence[str]) -> dict:
  """The first stream gets `key` itself, the others `fold_in(key, i)`."""
  return {s: key if i == 0 else jax.random.fold_in(key, i) for i, s in enumerate(streams)}


def _linen_forward(module: nn.Module, example_x, train_argument, rng_streams, mutable):
  argument = _train_argument(module.__call__, train_argument)

  def init(key):
    rngs = {'params': key, **_stream_keys(jax.random.fold_in(key, 1), rng_streams)}
    return module.init(rngs, example_x, **_mode(argument, False))

  shapes = jax.eval_shape(init, jax.random.key(0))
  collections = tuple(k for k in shapes if k != 'params')
  if mutable is not None:
    unknown = [c for c in mutable if c not in collections]
    if unknown:
      raise ValueError(f'mutable collections {unknown} are not created by the module; '
                       f'it has {", ".join(collections) or "no collection besides params"}')
    collections = tuple(mutable)
  stateful = bool(collections)

  def model_init(key):
    variables = init(key)
    if not stateful:
      return variables['params']
    return {k: variables[k] for k in ('params', *collections)}

  def forward(params, x, key, train):
    variables = params if stateful else {'params': params}
    rngs = _stream_keys(key, rng_streams) if (train and key is not None) else {}
    mode = _mode(argument, train)
    if train and stateful:
      out, updates = module.apply(variables, x, rngs=rngs, mutable=list(collections), **mode)
      return out, {k: updates[k] for k in collections}
    return module.apply(variables, x, rngs=rngs, **mode), None

  return model_init, forward, stateful


def _nnx_forward(module: nnx.Module, train_argument, rng_streams):
  argument = _train_argument(type(module).__call__, train_argument)
  graphdef, param_state, stats_state, rng_state, other_state = nnx.split(
      module, nnx.Param, nnx.BatchStat, nnx.RngState, ...)
  tags = sorted({v.tag for v in jax.tree.leaves(rng_state, is_leaf=lambda v: isinstance(
      v, nnx.RngKey)) if isinstance(v, nnx.RngKey)})
  parts = {'params': param_state, 'batch_stats': stats_state, 'state': other_state}
  collections = tuple(k for k in ('batch_stats', 'state') if jax.tree.leaves(parts[k]))
  stateful = bool(collections)
  initial = {k: nnx.to_pure_dict(parts[k]) for k in ('params', *collections)}

  copy = lambda state: jax.tree.map(lambda v: v, state)

  def as_state(template, pure):
    state = copy(template)  # the template stays untouched
    nnx.replace_by_pure_dict(state, pure)
    return state

  def model_init(key):
    # NNX initializes at construction: `key` is unused, the module's own values are
    # the initial params (construct it with `nnx.Rngs(seed)` to choose them).
    del key
    return initial if stateful else initial['params']

  def forward(params, x, key, train):
    pure = params if stateful else {'params': params}
    # Fresh variables on every call: NNX refuses to mutate a variable created under
    # another trace (the reseeding below, BatchNorm's update).
    states = {k: as_state(parts[k], pure[k]) if k in pure else copy(parts[k]) for k in parts}
    model = nnx.merge(graphdef, states['params'], states['batch_stats'], copy(rng_state),
                      states['state'])
    if train:
      model.train()
      if tags and key is not None:
        nnx.reseed(model, **_stream_keys(key, tags))
    else:
      model.eval()
    out = model(x, **_mode(argument, train))
    if not (train and stateful):
      return out, None
    _, new_params, new_stats, _, new_other = nnx.split(
        model, nnx.Param, nnx.BatchStat, nnx.RngState, ...)
    del new_params
    new = {'batch_stats': new_stats, 'state': new_other}
    return out, {k: nnx.to_pure_dict(new[k]) for k in collections}

  return model_init, forward, stateful


def from_flax(module: nn.Module | nnx.Module, example_x, *, output: str = 'classification',
              pad_label: int | None = 0, unscored_labels: Sequence[int] = (),
              per_example_loss: Callable | None = None,
              train_argument: str | None = 'auto', rng_streams: Sequence[str] = ('dropout',),
              mutable: Sequence[str] | None = None, scale_uint8: bool = True,
              name: str | None = None) -> Model:
  """A fedjax-sync `Model` from a flax linen or NNX module.

  Example:
    >>> class CNN(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train=False):
    ...     x = nn.Conv(8, (3, 3))(x)
    ...     x = nn.BatchNorm(use_running_average=not train)(x)
    ...     return nn.Dense(10)(nn.relu(x).reshape(x.shape[0], -1))
    >>> model = fedjax_sync.models.from_flax(CNN(), data.train['x'][:1])
    >>> params = model.init(jax.random.key(0))    # {'params': ..., 'batch_stats': ...}
    >>> algorithm = fedjax_sync.fed_avg(model.loss, optax.sgd(0.1))

  Args:
    module: a `flax.linen.Module` (initialized by `Model.init(key)`) or a constructed
      `flax.nnx.Module` (its current values are the initial params).
    example_x: an input batch `[B, ...]` (e.g. `data.train['x'][:1]`), for shapes.
    output: 'classification' (logits `[B, K]`, labels `[B]`) or 'sequence' (logits
      `[B, T, V]`, labels `[B, T]`, per-token loss and accuracy averaged over each
      sequence's real tokens).
    pad_label: for 'sequence', the label of padded tokens (None: no padding).
    unscored_labels: for 'sequence', labels left out of the accuracy only (e.g.
      EOS, as FedJAX's `accuracy_no_eos`).
    per_example_loss: your own `(outputs, batch) -> [B]` training and evaluation
      loss instead of cross-entropy (accuracy stays the output kind's).
    train_argument: the keyword of `__call__` that switches training on ('train',
      'training', 'is_training', or 'deterministic', passed negated); 'auto' takes
      the first of them the signature has; None passes none. NNX modules are also
      switched with `.train()` / `.eval()`.
    rng_streams: linen rng names drawn in training (the first gets the loss's key,
      the others keys folded from it). NNX modules are reseeded on every stream
      their `nnx.Rngs` hold.
    mutable: linen collections updated in training (default: every collection
      `init` creates besides 'params').
    scale_uint8: scale `uint8` inputs (images) to [0, 1]; other dtypes (token ids)
      pass unchanged.
    name: the model's name (default: the module's class name).

  Returns:
    `Model(init, apply, loss, evaluate, name)`: `init(key) -> params`; `apply(params,
    x, key=None, train=False) -> outputs` (training needs a key); `loss(params, batch,
    key) -> [B]`, or `(losses [B], state update)` for a stateful model; `evaluate(params,
    batch) -> (loss [B], correct [B])` in evaluation mode.
  """
  if output not in OUTPUTS:
    raise ValueError(f'output {output!r} is not one of {", ".join(OUTPUTS)}')
  if isinstance(rng_streams, str):
    rng_streams = (rng_streams,)
  prepare = _scale_uint8 if scale_uint8 else (lambda x: x)
  example_x = prepare(jnp.asarray(example_x))
  if isinstance(module, nn.Module):
    model_init, forward, stateful = _linen_forward(module, example_x, train_argument,
                                                   tuple(rng_streams), mutable)
  elif isinstance(module, nnx.Module):
    if mutable is not None:
      raise ValueError('mutable= selects linen collections; an NNX module keeps its '
                       'nnx.BatchStat and other non-parameter variables as state')
    model_init, forward, stateful = _nnx_forward(module, train_argument, tuple(rng_streams))
  else:
    raise TypeError(f'from_flax takes a flax.linen.Module or a flax.nnx.Module, got '
                    f'{type(module).__name__}')

  if output == 'classification':
    metrics = classification_metrics
  else:
    metrics = lambda logits, batch: masked_token_metrics(logits, batch, pad_label,
                                                         tuple(unscored_labels))

  def score(outputs, batch):
    losses, correct = metrics(outputs, batch)
    if per_example_loss is not None:
      losses = per_example_loss(outputs, batch)
    return losses, correct

  def apply(params, x, key=None, train=False):
    return forward(params, prepare(x), key, train and key is not None)[0]

  def loss(params, batch, key):
    outputs, state = forward(params, prepare(batch['x']), key, True)
    losses = (per_example_loss(outputs, batch) if per_example_loss is not None
              else metrics(outputs, batch)[0])
    return losses if state is None else (losses, state)

  def evaluate(params, batch):
    return score(apply(params, batch['x']), batch)

  # One compilation instead of one per operation (eager initialization of a
  # convolutional network compiles dozens of small programs).
  return Model(init=jax.jit(model_init), apply=apply, loss=loss, evaluate=evaluate,
               name=name or type(module).__name__)

