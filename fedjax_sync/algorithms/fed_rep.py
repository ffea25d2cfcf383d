"""FedRep: a shared representation, and a head per client trained before it.

Collins, Hassani, Mokhtari & Shakkottai 2021, "Exploiting Shared Representations for
Personalized Federated Learning", ICML 2021, arXiv 2102.07078, Algorithm 1. A sampled
client i, given the server's representation φ^t:
  1. trains its own head h_i for τ_h updates with φ^t frozen;
  2. then trains the representation for τ_φ updates with the new head frozen;
  3. sends φ_i; the server averages the representations; h_i stays on the client.

Readings of the paper: τ_φ is the round's local work (the `[S, B]` batches of the
round, one pass); τ_h is `head_epochs` passes over the same batches (the paper's
experiments use 10 epochs for the head and 1 for the body). Each phase starts a fresh
client optimizer state; frozen leaves take no gradient (`stop_gradient`, so no
backward pass through them) and no optimizer update (`optax.set_to_zero`).

The head is selected and stored as in FedPer (`fed_per.head_paths`: a regular
expression or predicate on the parameter path; default the output layer), in
`ServerState.client_states` `[N, ...]`; the server's own head follows the aggregate of
the clients' new heads, for the global test set only.
"""

from __future__ import annotations

from typing import Callable

import jax
import optax
from flax import traverse_util

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import Aggregator
from fedjax_sync.algorithms.fed_bn import personalized_params
from fedjax_sync.algorithms.fed_per import (HEAD_PATTERN, HeadFilter, _check_num_clients,
                                            check_head, head_part, head_paths, registered_head)
from fedjax_sync.algorithms.federated import ClientOutput, federated_algorithm
from fedjax_sync.algorithms.registry import (Hyperparameter, Hyperparameters, _server_lr,
                                             client_and_server, register_algorithm)
from fedjax_sync.clients.conv_rewrite import KEEP_CONVOLUTIONS
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.clients.local import make_local_step, make_local_training
from fedjax_sync.types import Algorithm, Params

# fold_in tag of a client's key for the head phase (the body phase uses the key itself).
_HEAD_STREAM = 0x4EAD


def _path_of(key_path) -> tuple:
  return tuple(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))) for k in key_path)


def partial_training(loss_fn: Callable, optimizer: optax.GradientTransformation,
                     trainable: Callable[[Params], frozenset], *, unroll: int | bool = 1):
  """Local training of the leaves whose paths are in `trainable(params)`; the others
  are constants of the loss (no gradient computed) and are never updated."""

  def labels(params):
    paths = trainable(params)
    return jax.tree_util.tree_map_with_path(
        lambda p, _: 'train' if _path_of(p) in paths else 'frozen', params)

  def frozen_loss(params, batch, key):
    paths = trainable(params)
    held = jax.tree_util.tree_map_with_path(
        lambda p, x: x if _path_of(p) in paths else jax.lax.stop_gradient(x), params)
    return loss_fn(held, batch, key)

  if getattr(loss_fn, KEEP_CONVOLUTIONS, False):   # the loss opted out of the conv rewrite
    setattr(frozen_loss, KEEP_CONVOLUTIONS, True)

  masked = optax.multi_transform({'train': optimizer, 'frozen': optax.set_to_zero()}, labels)
  return make_local_training(make_local_step(frozen_loss, masked), unroll=unroll), masked


def fed_rep_update(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
                   head: HeadFilter = None, head_epochs: int = 10, unroll: int | bool = 1):
  """FedRep's client update: `head_epochs` passes of head training (body frozen), then
  one pass of body training (head frozen); `update = w − w_k`, `state` = the new head."""
  heads = lambda params: head_paths(params, head)
  body = lambda params: frozenset(traverse_util.flatten_dict(params)) - heads(params)
  train_head, head_optimizer = partial_training(loss_fn, client_optimizer, heads, unroll=unroll)
  train_body, body_optimizer = partial_training(loss_fn, client_optimizer, body, unroll=unroll)

  def client_update(server_params, extra, client_head, data, mask, key):
    del extra
    start = personalized_params(server_params, client_head)
    head_key = jax.random.fold_in(key, _HEAD_STREAM)

    def head_epoch(carry, epoch):
      params, opt_state = carry
      params, opt_state, _ = train_head(params, opt_state, data, mask,
                                        jax.random.fold_in(head_key, epoch))
      return (params, opt_state), None

    (params, _), _ = jax.lax.scan(head_epoch, (start, head_optimizer.init(start)),
                                  jax.numpy.arange(head_epochs))
    params, _, metrics = train_body(params, body_optimizer.init(params), data, mask, key)
    return ClientOutput(update=tree_lib.tree_sub(server_params, params),
                        state=head_part(params, heads(server_params)), aux=(),
                        metrics={'loss_sum': metrics.loss_sum,
                                 'num_examples': metrics.num_examples})

  return client_update


def fed_rep(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
            num_clients: int | None = None, head: HeadFilter = None, head_epochs: int = 10,
            server_optimizer: optax.GradientTransformation | None = None,
            aggregator: Aggregator | None = None, execution: ClientExecution = ClientExecution(),
            unroll: int | bool = 1, name: str = 'fedrep') -> Algorithm:
  """FedRep (Collins et al. 2021, arXiv 2102.07078, Algorithm 1): personal head trained
  first with the representation frozen, then the shared representation.

  Example:
    >>> algorithm = fed_rep(model.loss, optax.sgd(0.05), num_clients=data.num_clients,
    ...                     head_epochs=10)
    >>> state = algorithm.init(model.init(jax.random.key(0)))

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    client_optimizer: optax optimizer of both phases (fresh state in each).
    num_clients: population size N (the heads are `[N, ...]`).
    head: the per-client layers (see `fed_per.head_paths`; None: the output layer).
    head_epochs: τ_h, passes over the round's batches training the head (≥ 0; the
      paper uses 10); the body then takes one pass.
    server_optimizer: applied to the aggregate (default `optax.sgd(1.0)`).
    aggregator: reducer of the pseudo-gradients (default: example-weighted mean).
    execution: client execution strategy and mesh.
    unroll: unrolling of the local-step loops.
  """
  _check_num_clients(num_clients, 'FedRep')
  check_head(head)
  if isinstance(head_epochs, bool) or not isinstance(head_epochs, int) or head_epochs < 0:
    raise ValueError(f'FedRep head_epochs must be an integer ≥ 0, got {head_epochs!r}')
  algorithm = federated_algorithm(
      fed_rep_update(loss_fn, client_optimizer, head=head, head_epochs=head_epochs,
                     unroll=unroll),
      server_optimizer=server_optimizer or optax.sgd(1.0), aggregator=aggregator,
      num_clients=num_clients,
      init_client_state=lambda params: head_part(params, head_paths(params, head)),
      execution=execution, name=name)
  return algorithm._replace(personalize=personalized_params)


HEAD_EPOCHS = Hyperparameter('head_epochs', int, 10, 'FedRep τ_h: passes over the round\'s '
                             'batches training the head before the body', minimum=0)


def _build(loss, h: Hyperparameters, **kw):
  return fed_rep(loss, h.client_optimizer(), head=registered_head(h), head_epochs=h.head_epochs,
                 server_optimizer=optax.sgd(_server_lr(h, 1.0)), **kw)


register_algorithm('fedrep', _build,
                   'FedRep: personal head trained first, then the shared representation, '
                   'Collins et al. 2021 (arXiv 2102.07078)',
                   (*client_and_server(1.0), HEAD_PATTERN, HEAD_EPOCHS))
