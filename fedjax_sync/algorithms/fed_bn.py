"""FedBN: federated averaging with local batch normalization.

Li, Jiang, Zhang, Kamp & Dou 2021, "FedBN: Federated Learning on Non-IID Features
via Local Batch Normalization", ICLR 2021, arXiv 2102.07623, Algorithm 1: every
client keeps its batch-normalization layers; the server averages every other layer.

The model is a stateful `models.from_flax` model, params `{'params': ...,
'batch_stats': ...}`. Each client's local part — the `batch_stats` collection and,
as in the paper's Algorithm 1, the parameters (scale, bias) of every layer that holds
statistics — lives in `ServerState.client_states` as `[N, ...]` arrays. A sampled
client trains from the server's shared layers and its own local part, and keeps its
new local part; the server aggregates the shared layers like FedAvg. With
`local_affine=False` only the statistics stay local (the scale and bias are averaged).

The server's own copy of the local part is never sent to a client. It follows the
aggregate of the clients' new values like any other leaf (with the default server
step `sgd(1.0)`, their example-weighted mean), so the global test set still has
statistics to be evaluated with; per-client evaluation (`Simulator`, per-client
accuracy) uses each client's own local part (`personalized_params`). A client that
never participated keeps the initial values.
"""

from __future__ import annotations

from typing import Callable, Sequence

import optax
from flax import traverse_util

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import Aggregator
from fedjax_sync.algorithms.federated import ClientOutput, federated_algorithm
from fedjax_sync.algorithms.registry import (Hyperparameters, _server_lr, client_and_server,
                                             register_algorithm)
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.clients.local import make_local_step, make_local_training
from fedjax_sync.types import Algorithm, Params, PyTree


def local_part(params: Params, local_collections: Sequence[str] = ('batch_stats',),
               local_affine: bool = True) -> PyTree:
  """The leaves of `params` a FedBN client keeps: the local collections and, with
  `local_affine`, the `params` of every layer that has an entry in them."""
  if not isinstance(params, dict) or 'params' not in params:
    raise ValueError(f'FedBN needs a stateful model whose params are {{"params": ..., '
                     f'{", ".join(map(repr, local_collections))}: ...}} (models.from_flax on a '
                     f'module with BatchNorm); got top-level keys '
                     f'{sorted(params) if isinstance(params, dict) else type(params).__name__}')
  missing = [c for c in local_collections if c not in params]
  if missing:
    raise ValueError(f'FedBN keeps the collections {list(local_collections)} per client, but '
                     f'the params have no {missing} (their keys: {sorted(params)})')
  part = {c: params[c] for c in local_collections}
  if local_affine:
    layers = {path[:-1] for c in local_collections
              for path in traverse_util.flatten_dict(params[c])}
    flat = traverse_util.flatten_dict(params['params'])
    part['params'] = traverse_util.unflatten_dict(
        {path: leaf for path, leaf in flat.items() if path[:-1] in layers})
  return part


def personalized_params(params: Params, client_part: PyTree) -> Params:
  """The params one client evaluates with: the shared layers of `params` and the
  client's own local part (a `local_part` tree)."""
  merged = traverse_util.flatten_dict(params)
  merged.update(traverse_util.flatten_dict(client_part))
  return traverse_util.unflatten_dict(merged)


def fed_bn_update(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
                  local_collections: Sequence[str] = ('batch_stats',), local_affine: bool = True,
                  unroll: int | bool = 1):
  """FedBN's client update: local training from the shared layers and the client's
  local part; `update = w − w_k` (for the local leaves, the server copy minus the
  client's new values), `state` = the client's new local part."""
  train = make_local_training(make_local_step(loss_fn, client_optimizer), unroll=unroll)

  def client_update(server_params, extra, client_part, data, mask, key):
    del extra
    start = personalized_params(server_params, client_part)
    params, _, metrics = train(start, client_optimizer.init(start), data, mask, key)
    return ClientOutput(update=tree_lib.tree_sub(server_params, params),
                        state=local_part(params, local_collections, local_affine), aux=(),
                        metrics={'loss_sum': metrics.loss_sum,
                                 'num_examples': metrics.num_examples})

  return client_update


def fed_bn(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
           num_clients: int, local_collections: Sequence[str] = ('batch_stats',),
           local_affine: bool = True, server_optimizer: optax.GradientTransformation | None = None,
           aggregator: Aggregator | None = None, execution: ClientExecution = ClientExecution(),
           unroll: int | bool = 1, name: str = 'fedbn') -> Algorithm:
  """FedBN (Li et al. 2021, arXiv 2102.07623, Algorithm 1): local batch normalization.

  Example:
    >>> model = fedjax_sync.models.from_flax(CNNWithBatchNorm(), data.train['x'][:1])
    >>> algorithm = fed_bn(model.loss, optax.sgd(0.05), num_clients=data.num_clients)
    >>> state = algorithm.init(model.init(jax.random.key(0)))
    >>> state.client_states['batch_stats']          # leaves [N, ...]
    >>> personalized_params(state.params, jax.tree.map(lambda s: s[3], state.client_states))

  Args:
    loss_fn: a stateful per-example loss `(params, batch, key) -> (losses [B], state
      update)` (`models.from_flax`).
    client_optimizer: optax optimizer of local training (fresh state every round).
    num_clients: population size N (the local parts are `[N, ...]`).
    local_collections: the collections kept per client.
    local_affine: also keep the parameters of the layers that hold those collections
      (BatchNorm's scale and bias) per client, as the paper does; False averages them.
    server_optimizer: applied to the aggregate (default `optax.sgd(1.0)`).
    aggregator: reducer of the pseudo-gradients (default: example-weighted mean).
    execution: client execution strategy and mesh.
    unroll: unrolling of the local-step loop.
  """
  if not isinstance(num_clients, int) or num_clients < 1:
    raise ValueError(f'FedBN needs num_clients (population size) ≥ 1, got {num_clients!r}')
  if isinstance(local_collections, str):
    local_collections = (local_collections,)
  local_collections = tuple(local_collections)
  if not local_collections or 'params' in local_collections:
    raise ValueError(f'local_collections must name state collections other than "params", '
                     f'got {local_collections!r}')
  algorithm = federated_algorithm(
      fed_bn_update(loss_fn, client_optimizer, local_collections=local_collections,
                    local_affine=local_affine, unroll=unroll),
      server_optimizer=server_optimizer or optax.sgd(1.0), aggregator=aggregator,
      num_clients=num_clients,
      init_client_state=lambda params: local_part(params, local_collections, local_affine),
      execution=execution, name=name)
  return algorithm._replace(personalize=personalized_params)


def _build(loss, h: Hyperparameters, **kw):
  return fed_bn(loss, h.client_optimizer(), server_optimizer=optax.sgd(_server_lr(h, 1.0)), **kw)


register_algorithm('fedbn', _build,
                   'FedBN: local batch normalization, Li et al. 2021 (arXiv 2102.07623)',
                   client_and_server(1.0))
