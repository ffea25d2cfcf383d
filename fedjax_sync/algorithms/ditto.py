"""Ditto: a global model trained as FedAvg, and one personal model per client.

Li, Hu, Beirami & Smith 2021, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021, arXiv 2012.04221, Algorithm 1. Each client k solves

    min_{v_k}  h_k(v_k; w*) = F_k(v_k) + (λ/2) ‖v_k − w*‖²

around the global model w*, which is trained exactly as FedAvg trains it. In a round,
a sampled client receives w^t, runs FedAvg's local update from w^t (its pseudo-gradient
goes to the aggregator as FedAvg's does), and separately runs its local steps on v_k
with the gradient `∇F_k(v_k) + λ (v_k − w^t)`, keeping the new v_k.

Readings of the paper:
- The personal steps use the same batches of the round as the global steps (the
  paper runs "s local iterations" of each on the client's data) and their own optimizer
  (default: the client optimizer, the paper's single η).
- v_k starts as the initial global model w^0 (Algorithm 1's input v_k^0; the released
  code initializes every personal model to the same initial weights), so a client
  never sampled is evaluated with w^0.
- The proximal anchor is w^t, the global model the client received this round.

The personal models are `ServerState.client_states`, leaves `[N, ...]`: memory N ×
the model size. `Algorithm.personalize` returns client k's v_k, so per-client
evaluation (`make_evaluator(personalize=...)`, `simulate.personalization.
personalized_evaluator(personalize=...)`) measures the personal models, reported
under `personalized_*` names; `test_*` metrics describe the global model.
"""

from __future__ import annotations

from typing import Callable

import jax
import optax

from fedjax_sync.aggregators.base import Aggregator
from fedjax_sync.algorithms.fed_avg import local_training_update
from fedjax_sync.algorithms.federated import federated_algorithm
from fedjax_sync.algorithms.registry import (Hyperparameter, Hyperparameters, _server_lr,
                                             client_and_server, register_algorithm)
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.clients.local import make_local_step, make_local_training
from fedjax_sync.types import Algorithm, Params, PyTree

# fold_in tag of a client's key for its personal steps (the global steps use the key itself,
# so the global model sees FedAvg's keys).
_PERSONAL_STREAM = 0x0D1770


def personal_model(params: Params, client_state: PyTree) -> Params:
  """The params client k is evaluated with: its personal model v_k (its client state)."""
  del params
  return client_state


def ditto_update(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
                 ditto_lambda: float,
                 personal_optimizer: optax.GradientTransformation | None = None,
                 unroll: int | bool = 1):
  """Ditto's client update: FedAvg's (same pseudo-gradient, same key), then the personal
  model's steps on `F_k(v) + (λ/2)‖v − w^t‖²`; the new v_k is the client's state."""
  global_update = local_training_update(loss_fn, client_optimizer, unroll=unroll)
  personal_optimizer = personal_optimizer or client_optimizer
  train_personal = make_local_training(
      make_local_step(loss_fn, personal_optimizer, prox_mu=ditto_lambda), unroll=unroll)

  def client_update(server_params, extra, personal, data, mask, key):
    output = global_update(server_params, extra, (), data, mask, key)
    new_personal, _, _ = train_personal(
        personal, personal_optimizer.init(personal), data, mask,
        jax.random.fold_in(key, _PERSONAL_STREAM), anchor=server_params)
    return output._replace(state=new_personal)

  return client_update


def ditto(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
          num_clients: int | None = None, ditto_lambda: float = 0.1,
          personal_optimizer: optax.GradientTransformation | None = None,
          server_optimizer: optax.GradientTransformation | None = None,
          aggregator: Aggregator | None = None, execution: ClientExecution = ClientExecution(),
          unroll: int | bool = 1, name: str = 'ditto') -> Algorithm:
  """Ditto (Li et al. 2021, arXiv 2012.04221, Algorithm 1): FedAvg plus personal models.

  The global params equal `fed_avg`'s with the same optimizers, aggregator, data and
  keys; `client_states` holds every client's personal model v_k.

  Example:
    >>> algorithm = ditto(model.loss, optax.sgd(0.05), num_clients=data.num_clients,
    ...                   ditto_lambda=0.1)
    >>> state = algorithm.init(model.init(jax.random.key(0)))
    >>> state, metrics = jax.jit(algorithm.round)(state, client_batch, key)
    >>> v_3 = algorithm.personalize(state.params, jax.tree.map(lambda v: v[3],
    ...                                                       state.client_states))

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    client_optimizer: optax optimizer of the global model's local training.
    num_clients: population size N (personal models are `[N, ...]`).
    ditto_lambda: λ ≥ 0, the pull of each personal model towards the global one (0:
      purely local models; large: the global model). The paper tunes λ per dataset in
      {0.05, 0.1, 0.2, 0.5, 1, 2}.
    personal_optimizer: optimizer of the personal steps (default: `client_optimizer`).
    server_optimizer: applied to the aggregate (default `optax.sgd(1.0)`).
    aggregator: reducer of the pseudo-gradients (default: example-weighted mean).
    execution: client execution strategy and mesh.
    unroll: unrolling of the local-step loops.
  """
  if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
    raise ValueError(f'Ditto needs num_clients (population size) ≥ 1, got {num_clients!r}')
  if not ditto_lambda >= 0:
    raise ValueError(f'Ditto needs ditto_lambda (λ) ≥ 0, got {ditto_lambda!r}')
  algorithm = federated_algorithm(
      ditto_update(loss_fn, client_optimizer, ditto_lambda=ditto_lambda,
                   personal_optimizer=personal_optimizer, unroll=unroll),
      server_optimizer=server_optimizer or optax.sgd(1.0), aggregator=aggregator,
      num_clients=num_clients, init_client_state=lambda params: params, execution=execution,
      name=name)
  return algorithm._replace(personalize=personal_model)


DITTO_LAMBDA = Hyperparameter('ditto_lambda', float, 0.1,
                              'Ditto λ: pull of personal models to the global one', minimum=0.0)


def _build(loss, h: Hyperparameters, **kw):
  return ditto(loss, h.client_optimizer(), ditto_lambda=h.ditto_lambda,
               server_optimizer=optax.sgd(_server_lr(h, 1.0)), **kw)


register_algorithm('ditto', _build,
                   'Ditto: FedAvg plus per-client personal models, Li et al. 2021 '
                   '(arXiv 2012.04221)', (*client_and_server(1.0), DITTO_LAMBDA))
