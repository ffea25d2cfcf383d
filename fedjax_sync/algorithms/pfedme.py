"""pFedMe: personalized federated learning with Moreau envelopes.

T. Dinh, Tran & Nguyen 2020, "Personalized Federated Learning with Moreau
Envelopes", NeurIPS 2020, arXiv 2006.08848, Algorithm 1.

A sampled client copies the global model, `w_i ← w`, and its personal model starts
there too, `θ_i ← w`. On every local minibatch D (the round's S steps are the
paper's R local rounds) it solves the Moreau-envelope problem approximately with K
inner gradient steps on that same D (personal learning rate p),

    θ_i ← θ_i − p (∇f_i(θ_i; D) + λ (θ_i − w_i))       (K times)

and then moves its copy of the global model toward the result,
`w_i ← w_i − η λ (w_i − θ_i)`. The server mixes, `w ← (1 − β) w + β · mean(w_i)`,
i.e. `w ← w − β · mean(w − w_i)`: an SGD server step with learning rate β on the
usual pseudo-gradient (`server_learning_rate`, default β = 1, the paper's grid is
β ∈ {1, 2}). θ warm-starts across the local steps of a round, as in the authors'
code; the paper's Algorithm 1 averages with equal weights and the authors' code by
training examples, which is the default here (pass `aggregator=mean()` for 1/S).

Each client's last personal model θ_i is kept in `ServerState.client_states`
(`[N, ...]`, the initial params until the client first participates);
`Algorithm.personalize` evaluates a client with it. `train_loss` is the loss of
θ_i on each minibatch before its inner steps.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import Aggregator, compute_dtype
from fedjax_sync.algorithms.federated import ClientOutput, federated_algorithm
from fedjax_sync.algorithms.registry import (CLIENT_LEARNING_RATE, Hyperparameter,
                                             Hyperparameters, _server_lr, register_algorithm,
                                             server_learning_rate)
from fedjax_sync.clients import conv_rewrite
from fedjax_sync.clients.conv_rewrite import KEEP_CONVOLUTIONS
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.clients.local import StepMetrics, make_local_training, masked_mean
from fedjax_sync.types import Algorithm, Params


def personal_model(params: Params, client_state: Params) -> Params:
  """The model one pFedMe client is evaluated with: its personal model θ_i."""
  del params
  return client_state


def pfedme_update(loss_fn: Callable, learning_rate: float, *, lam: float = 15.0,
                  inner_steps: int = 5, personal_learning_rate: float = 0.05,
                  unroll: int | bool = 1):
  """pFedMe's client update (Algorithm 1 of arXiv 2006.08848) for `federated_algorithm`.

  Returns `client_update(server_params, extra, θ_i, data [S, B, ...], mask [S, B],
  key) -> ClientOutput` with `update = w − w_i` and `state` the new personal model θ_i.
  """
  if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 1:
    raise ValueError(f'pFedMe inner_steps K must be an int ≥ 1, got {inner_steps!r}')
  for value, what in ((learning_rate, 'learning rate η'), (lam, 'lambda λ'),
                      (personal_learning_rate, 'personal learning rate')):
    if isinstance(value, (int, float)) and not value > 0:   # traced (Sweep) values pass
      raise ValueError(f'pFedMe {what} must be > 0, got {value!r}')
  if not getattr(loss_fn, KEEP_CONVOLUTIONS, False):
    loss_fn = conv_rewrite.loop_friendly_convolutions(loss_fn)

  def objective(params, batch, mask, key):
    return masked_mean(loss_fn(params, batch, key), mask)

  def step(carry, opt_state, batch, mask, key, anchor=None, grad_offset=None):
    del anchor, grad_offset
    w, theta = carry

    def inner(k, theta_and_loss):
      theta, first_loss = theta_and_loss
      (loss, _), g = jax.value_and_grad(objective, has_aux=True)(
          theta, batch, mask, jax.random.fold_in(key, k))
      theta = jax.tree.map(lambda t, gt, wt: (t - personal_learning_rate * (gt + lam * (t - wt))
                                              ).astype(t.dtype), theta, g, w)
      return theta, jnp.where(k == 0, loss, first_loss).astype(first_loss.dtype)

    dtype = compute_dtype(w)
    count = jnp.sum(mask.astype(dtype))
    loss0 = jnp.zeros((), dtype)
    new_theta, loss = jax.lax.fori_loop(0, inner_steps, inner, (theta, loss0))
    new_w = jax.tree.map(lambda wt, t: (wt - learning_rate * lam * (wt - t)).astype(wt.dtype),
                         w, new_theta)
    active = count > 0   # a step without a real example changes nothing
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)
    return (keep((new_w, new_theta), (w, theta)), opt_state,
            StepMetrics(loss_sum=loss * count, num_examples=count))

  train = make_local_training(step, unroll=unroll)

  def client_update(server_params, extra, client_theta, data, mask, key):
    del extra, client_theta   # θ restarts from w every round (the authors' code)
    (w, theta), _, metrics = train((server_params, server_params), (), data, mask, key)
    return ClientOutput(update=tree_lib.tree_sub(server_params, w), state=theta, aux=(),
                        metrics={'loss_sum': metrics.loss_sum,
                                 'num_examples': metrics.num_examples})

  return client_update


def pfedme(loss_fn: Callable, learning_rate: float, *, num_clients: int, lam: float = 15.0,
           inner_steps: int = 5, personal_learning_rate: float = 0.05, beta: float = 1.0,
           server_optimizer: optax.GradientTransformation | None = None,
           aggregator: Aggregator | None = None, execution: ClientExecution = ClientExecution(),
           unroll: int | bool = 1, name: str = 'pfedme') -> Algorithm:
  """pFedMe (T. Dinh et al. 2020, arXiv 2006.08848, Algorithm 1).

  Example:
    >>> algorithm = pfedme(model.loss, 0.005, num_clients=data.num_clients, lam=15.0)
    >>> state = algorithm.init(params)
    >>> state, metrics = jax.jit(algorithm.round)(state, client_batch, key)
    >>> state.client_states            # personal models θ_i, leaves [N, ...]

  Args:
    loss_fn: a stateless per-example loss `(params, batch, key) -> [B]`.
    learning_rate: η, the step of the local copy of the global model.
    num_clients: population size N (personal models are `[N, ...]`: N model copies).
    lam: λ, the Moreau-envelope regularization (paper: 15 on MNIST).
    inner_steps: K, gradient steps of each inner solve (paper: 5).
    personal_learning_rate: p, the step of the inner solve.
    beta: β, the server's mixing (`w ← (1 − β) w + β mean(w_i)`).
    server_optimizer: overrides `optax.sgd(beta)`.
    aggregator: reducer of `w − w_i` (default: the example-weighted mean).
    execution: client execution strategy and mesh.
    unroll: unrolling of the local-step loop.
    name: the algorithm's name.
  """
  if not isinstance(num_clients, int) or isinstance(num_clients, bool) or num_clients < 1:
    raise ValueError(f'pFedMe keeps a personal model per client and needs num_clients '
                     f'(population size) ≥ 1, got {num_clients!r}')
  algorithm = federated_algorithm(
      pfedme_update(loss_fn, learning_rate, lam=lam, inner_steps=inner_steps,
                    personal_learning_rate=personal_learning_rate, unroll=unroll),
      server_optimizer=server_optimizer or optax.sgd(beta), aggregator=aggregator,
      num_clients=num_clients, init_client_state=lambda params: params, execution=execution,
      name=name)
  return algorithm._replace(personalize=personal_model)


PFEDME_LAMBDA = Hyperparameter('pfedme_lambda', float, 15.0, 'pFedMe regularization λ',
                               minimum=0.0, exclusive_minimum=True)
PFEDME_INNER_STEPS = Hyperparameter('pfedme_inner_steps', int, 5,
                                    'pFedMe inner gradient steps K per minibatch', minimum=1)
PFEDME_PERSONAL_LEARNING_RATE = Hyperparameter(
    'pfedme_personal_learning_rate', float, 0.05, 'pFedMe inner (personal) learning rate',
    minimum=0.0, exclusive_minimum=True)


def _build(loss, h: Hyperparameters, **kw):
  return pfedme(loss, h.client_learning_rate, lam=h.pfedme_lambda,
                inner_steps=h.pfedme_inner_steps,
                personal_learning_rate=h.pfedme_personal_learning_rate,
                beta=_server_lr(h, 1.0), **kw)


register_algorithm('pfedme', _build,
                   'pFedMe: Moreau-envelope personalization, T. Dinh et al. 2020 '
                   '(arXiv 2006.08848); server_learning_rate is β',
                   (CLIENT_LEARNING_RATE, server_learning_rate(1.0), PFEDME_LAMBDA,
                    PFEDME_INNER_STEPS, PFEDME_PERSONAL_LEARNING_RATE))
