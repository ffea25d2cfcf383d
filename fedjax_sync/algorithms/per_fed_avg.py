"""Per-FedAvg: personalized FedAvg, a MAML-type meta-model.

Fallah, Mokhtari & Ozdaglar 2020, "Personalized Federated Learning: A
Meta-Learning Approach", NeurIPS 2020, arXiv 2002.07948, Algorithm 1 (local update
of eq. (8)) with the first-order (FO, eq. (9)) and Hessian-free (HF, eq. (10))
approximations.

The global model w is a meta-model: each client personalizes it with one gradient
step of size α on its own data. On its local step t a sampled client, from w_t,

    w̃ = w_t − α ∇f_i(w_t; D_t)
    FO:  w_{t+1} = w_t − β ∇f_i(w̃; D'_t)
    HF:  w_{t+1} = w_t − β (∇f_i(w̃; D'_t) − α ∇²f_i(w_t; D''_t) ∇f_i(w̃; D'_t))

with β the client learning rate; the Hessian-vector product is exact here (forward
over reverse: `jax.jvp` of the gradient), where the paper approximates it with a
finite difference of two gradients. The server averages the local models like FedAvg
(example-weighted by default; the paper's equal weights: `aggregator=mean()`).

Batches: the paper draws D, D', D'' independently. Local step t uses the round's
batch t as D, batch t + 1 as D' and batch t + 2 as D'' (indices modulo the client's
number of real steps, which come first in a round's `[S, B]` layout), as the authors'
code draws consecutive batches. With fewer real steps than batches per update (S = 1
for FO, S < 3 for HF) the same batch plays several roles.

Evaluation: the personalized model of client i is `w − α ∇f_i(w)` on its own
training data, which `Algorithm.personalize` (a function of the params and stored
per-client state, without data) cannot compute. `personalize` is therefore None: the
drivers' per-client accuracy is the meta-model's, and Per-FedAvg's own protocol is
the personalization evaluation with one local step of size α
(`fedjax_sync.simulate.personalization.personalized_evaluator(model, data, steps=1,
learning_rate=α, ...)`), or `one_step_personalization(loss_fn, α)` for one client.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import Aggregator
from fedjax_sync.algorithms.federated import ClientOutput, federated_algorithm
from fedjax_sync.algorithms.registry import (CLIENT_LEARNING_RATE, Hyperparameter,
                                             Hyperparameters, _server_lr, register_algorithm,
                                             server_learning_rate)
from fedjax_sync.clients import conv_rewrite
from fedjax_sync.clients.conv_rewrite import KEEP_CONVOLUTIONS
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.clients.local import StepMetrics, make_local_training, masked_mean
from fedjax_sync.types import Algorithm

VARIANTS = ('fo', 'hf')


def _gradient(loss_fn):
  def objective(params, batch, mask, key):
    return masked_mean(loss_fn(params, batch, key), mask)
  return jax.value_and_grad(objective, has_aux=True)


def one_step_personalization(loss_fn: Callable, alpha: float) -> Callable:
  """`personalize(params, batch, mask, key) -> params − α ∇f(params; batch)`: one
  client's Per-FedAvg personal model from a batch of its data (leaves `[B, ...]`)."""
  gradient = _gradient(loss_fn)

  def personalize(params, batch, mask, key):
    _, g = gradient(params, batch, mask, key)
    return jax.tree.map(lambda p, d: (p - alpha * d).astype(p.dtype), params, g)

  return personalize


def per_fed_avg_update(loss_fn: Callable, learning_rate: float, *, alpha: float = 0.01,
                       variant: str = 'fo', unroll: int | bool = 1):
  """Per-FedAvg's client update (Algorithm 1 of arXiv 2002.07948) for `federated_algorithm`.

  Returns `client_update(server_params, extra, client_state, data [S, B, ...],
  mask [S, B], key) -> ClientOutput` with `update = w − w_i`; `loss_sum` is the loss
  of `w_t` on each step's batch D_t.
  """
  if variant not in VARIANTS:
    raise ValueError(f'Per-FedAvg variant must be one of {", ".join(VARIANTS)}, got '
                     f'{variant!r}')
  for value, what in ((learning_rate, 'learning rate β'), (alpha, 'step size α')):
    if isinstance(value, (int, float)) and not value > 0:   # traced (Sweep) values pass
      raise ValueError(f'Per-FedAvg {what} must be > 0, got {value!r}')
  # The convolution rewrite does not support jax.jvp (the HF variant's Hessian product).
  if variant == 'fo' and not getattr(loss_fn, KEEP_CONVOLUTIONS, False):
    loss_fn = conv_rewrite.loop_friendly_convolutions(loss_fn)
  gradient = _gradient(loss_fn)
  sgd = lambda p, g, lr: jax.tree.map(lambda x, d: (x - lr * d).astype(x.dtype), p, g)

  def step(w, opt_state, batches, mask, key, anchor=None, grad_offset=None):
    del anchor, grad_offset
    batch, later, later_mask = batches
    (loss, count), g = gradient(w, batch, mask, jax.random.fold_in(key, 0))
    adapted = sgd(w, g, alpha)
    _, outer = gradient(adapted, later[0], later_mask[0], jax.random.fold_in(key, 1))
    if variant == 'hf':
      def grad_at(p):
        return gradient(p, later[1], later_mask[1], jax.random.fold_in(key, 2))[1]
      _, hessian_product = jax.jvp(grad_at, (w,), (outer,))
      outer = jax.tree.map(lambda o, h: o - alpha * h, outer, hessian_product)
    new_w = sgd(w, outer, learning_rate)
    new_w = jax.tree.map(lambda n, o: jnp.where(count > 0, n, o), new_w, w)
    return new_w, opt_state, StepMetrics(loss_sum=loss * count, num_examples=count)

  train = make_local_training(step, unroll=unroll)
  num_later = 2 if variant == 'hf' else 1

  def client_update(server_params, extra, client_state, data, mask, key):
    del extra, client_state
    num_steps = mask.shape[0]
    real_steps = jnp.maximum(jnp.sum(jnp.any(mask, axis=1)), 1)
    later = [(jnp.arange(num_steps) + j) % real_steps for j in range(1, num_later + 1)]
    later_data = tuple(jax.tree.map(lambda x, i=i: x[i], data) for i in later)
    later_mask = tuple(mask[i] for i in later)
    w, _, metrics = train(server_params, (), (data, later_data, later_mask), mask, key)
    return ClientOutput(update=tree_lib.tree_sub(server_params, w), state=(), aux=(),
                        metrics={'loss_sum': metrics.loss_sum,
                                 'num_examples': metrics.num_examples})

  return client_update


def per_fed_avg(loss_fn: Callable, learning_rate: float, *, alpha: float = 0.01,
                variant: str = 'fo', server_optimizer: optax.GradientTransformation | None = None,
                aggregator: Aggregator | None = None, num_clients: int | None = None,
                execution: ClientExecution = ClientExecution(), unroll: int | bool = 1,
                name: str | None = None) -> Algorithm:
  """Per-FedAvg (Fallah et al. 2020, arXiv 2002.07948, Algorithm 1), FO or HF.

  Example:
    >>> algorithm = per_fed_avg(model.loss, 0.005, alpha=0.01, variant='hf')
    >>> state = algorithm.init(params)
    >>> state, metrics = jax.jit(algorithm.round)(state, client_batch, key)

  Args:
    loss_fn: a stateless per-example loss `(params, batch, key) -> [B]`.
    learning_rate: β, the meta (outer) step of local training.
    alpha: α, the personalization step (the inner step of the meta-objective).
    variant: 'fo' (first-order, eq. (9)) or 'hf' (Hessian-free, eq. (10), an exact
      Hessian-vector product).
    server_optimizer: applied to the aggregated `w − w_i` (default `optax.sgd(1.0)`).
    aggregator: reducer of `w − w_i` (default: the example-weighted mean).
    num_clients: population size, needed only by aggregators with per-client state.
    execution: client execution strategy and mesh.
    unroll: unrolling of the local-step loop.
    name: the algorithm's name (default 'perfedavg_fo' or 'perfedavg_hf').
  """
  return federated_algorithm(
      per_fed_avg_update(loss_fn, learning_rate, alpha=alpha, variant=variant, unroll=unroll),
      server_optimizer=server_optimizer or optax.sgd(1.0), aggregator=aggregator,
      num_clients=num_clients, execution=execution, name=name or f'perfedavg_{variant}')


PERFEDAVG_ALPHA = Hyperparameter('perfedavg_alpha', float, 0.01,
                                 'Per-FedAvg personalization step α', minimum=0.0,
                                 exclusive_minimum=True)
PERFEDAVG_VARIANT = Hyperparameter('perfedavg_variant', str, 'fo',
                                   'Per-FedAvg variant: fo (first-order) or hf (Hessian-free)',
                                   choices=VARIANTS)


def _build(loss, h: Hyperparameters, **kw):
  return per_fed_avg(loss, h.client_learning_rate, alpha=h.perfedavg_alpha,
                     variant=h.perfedavg_variant,
                     server_optimizer=optax.sgd(_server_lr(h, 1.0)), name='perfedavg', **kw)


register_algorithm('perfedavg', _build,
                   'Per-FedAvg (FO/HF), Fallah et al. 2020 (arXiv 2002.07948); '
                   'client_learning_rate is β',
                   (CLIENT_LEARNING_RATE, server_learning_rate(1.0), PERFEDAVG_ALPHA,
                    PERFEDAVG_VARIANT))
