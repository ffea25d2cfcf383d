"""FedPer: a shared body trained by federated averaging, and a head per client.

Arivazhagan, Aggarwal, Singh & Choudhary 2019, "Federated Learning with
Personalization Layers", arXiv 1912.00818, Algorithm 1: each client trains base and
personalization layers together on its data; the server averages the base layers
only; every client keeps its own personalization layers (the "head").

The head is chosen by a parameter-path filter (`head=`): a regular expression searched
in each leaf's path written `'Dense_2/kernel'` (`'params/Dense_2/kernel'` for a
stateful `from_flax` model), or a predicate on the path tuple. The default is the
model's output layer as flax names it: the `Dense_<i>` with the largest i at the
shallowest depth (every model of `fedjax_sync.models`); a model with named layers
passes `head=` (e.g. `head='classifier/'`).

The split reuses FedBN's machinery (`fed_bn.personalized_params`): the heads live in
`ServerState.client_states` (`[N, ...]`, memory N × the head's size); a sampled client
trains from the server's body and its own head, and keeps its new head. As in FedBN,
the server's own head is never sent to a client; it follows the aggregate of the
clients' new heads (with the default server step `sgd(1.0)`, their example-weighted
mean), so the global model can still be evaluated on the global test set.
`Algorithm.personalize` gives each client's model (shared body, own head) to
per-client evaluation.
"""

from __future__ import annotations

import re
from typing import Callable, Union

import optax
from flax import traverse_util

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import Aggregator
from fedjax_sync.algorithms.fed_bn import personalized_params
from fedjax_sync.algorithms.federated import ClientOutput, federated_algorithm
from fedjax_sync.algorithms.registry import (Hyperparameter, Hyperparameters, _server_lr,
                                             client_and_server, register_algorithm)
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.clients.local import make_local_step, make_local_training
from fedjax_sync.types import Algorithm, Params, PyTree

HeadFilter = Union[str, Callable[[tuple], bool], None]

_DENSE = re.compile(r'^Dense_(\d+)$')


def _flat(params: Params, what: str) -> dict:
  if not isinstance(params, dict) or not params:
    raise ValueError(f'{what} splits the params by path and needs a (nested) dict of params '
                     f'(a flax model), got {type(params).__name__}')
  return traverse_util.flatten_dict(params)


def output_layer(params: Params) -> tuple:
  """The path of the output layer as flax names it: the `Dense_<i>` module with the
  largest i at the shallowest depth (e.g. `('Dense_1',)`)."""
  layers = {path[:-1] for path in _flat(params, 'the output layer')}
  dense = [(len(p), -int(_DENSE.match(p[-1]).group(1)), p) for p in layers
           if p and _DENSE.match(str(p[-1]))]
  if not dense:
    raise ValueError(f'no flax Dense_<i> layer to take as the head among the layers '
                     f'{sorted("/".join(map(str, p)) for p in layers)}; pass head= (a regular '
                     f'expression on the parameter path, e.g. head="classifier/")')
  return min(dense)[2]


def check_head(head: HeadFilter):
  """`head` checked when the algorithm is built (not at its first init): the compiled
  pattern of a regular expression; a ValueError for a bad pattern or type."""
  if isinstance(head, str):
    try:
      return re.compile(head)
    except re.error as e:
      raise ValueError(f'head={head!r} is not a valid regular expression: {e}') from None
  if head is not None and not callable(head):
    raise ValueError(f'head must be a regular expression, a predicate on the path tuple or '
                     f'None (the output layer), got {type(head).__name__}')
  return head


def head_paths(params: Params, head: HeadFilter = None) -> frozenset:
  """The leaf paths (tuples) of the per-client head selected by `head` (see module doc).

  Raises ValueError when the filter selects no leaf or every leaf (nothing shared).
  """
  flat = _flat(params, 'FedPer/FedRep')
  if head is None:
    layer = output_layer(params)
    chosen = {p for p in flat if p[:len(layer)] == layer}
  elif isinstance(head, str):
    pattern = check_head(head)
    chosen = {p for p in flat if pattern.search('/'.join(map(str, p)))}
  else:
    check_head(head)
    chosen = {p for p in flat if head(p)}
  names = sorted('/'.join(map(str, p)) for p in flat)
  if not chosen:
    raise ValueError(f'head={head!r} selects no parameter; the paths are {names}')
  if len(chosen) == len(flat):
    raise ValueError(f'head={head!r} selects every parameter ({names}): nothing would be '
                     'shared; choose the personal layers only')
  return frozenset(chosen)


def head_part(params: Params, paths: frozenset) -> PyTree:
  """The sub-dict of `params` holding the leaves at `paths` (a client's head)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({p: flat[p] for p in paths})


def fed_per_update(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
                   head: HeadFilter = None, unroll: int | bool = 1):
  """FedPer's client update: body and head trained jointly from the server's body and
  the client's head; `update = w − w_k` on every leaf, `state` = the new head."""
  train = make_local_training(make_local_step(loss_fn, client_optimizer), unroll=unroll)

  def client_update(server_params, extra, client_head, data, mask, key):
    del extra
    start = personalized_params(server_params, client_head)
    params, _, metrics = train(start, client_optimizer.init(start), data, mask, key)
    return ClientOutput(update=tree_lib.tree_sub(server_params, params),
                        state=head_part(params, head_paths(server_params, head)), aux=(),
                        metrics={'loss_sum': metrics.loss_sum,
                                 'num_examples': metrics.num_examples})

  return client_update


def _check_num_clients(num_clients, name: str) -> None:
  if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
    raise ValueError(f'{name} keeps a head per client and needs num_clients (population size) '
                     f'≥ 1, got {num_clients!r}')


def fed_per(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
            num_clients: int | None = None, head: HeadFilter = None,
            server_optimizer: optax.GradientTransformation | None = None,
            aggregator: Aggregator | None = None, execution: ClientExecution = ClientExecution(),
            unroll: int | bool = 1, name: str = 'fedper') -> Algorithm:
  """FedPer (Arivazhagan et al. 2019, arXiv 1912.00818, Algorithm 1): shared body,
  personal head, trained jointly.

  Example:
    >>> algorithm = fed_per(model.loss, optax.sgd(0.05), num_clients=data.num_clients)
    >>> state = algorithm.init(model.init(jax.random.key(0)))
    >>> state.client_states                     # {'Dense_1': {'kernel': [N, ...], ...}}

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    client_optimizer: optax optimizer of local training (fresh state every round).
    num_clients: population size N (the heads are `[N, ...]`).
    head: the per-client layers: a regular expression on the leaf path
      (`'Dense_2/'`), a predicate on the path tuple, or None for the output layer.
    server_optimizer: applied to the aggregate (default `optax.sgd(1.0)`).
    aggregator: reducer of the pseudo-gradients (default: example-weighted mean).
    execution: client execution strategy and mesh.
    unroll: unrolling of the local-step loop.
  """
  _check_num_clients(num_clients, 'FedPer')
  check_head(head)
  algorithm = federated_algorithm(
      fed_per_update(loss_fn, client_optimizer, head=head, unroll=unroll),
      server_optimizer=server_optimizer or optax.sgd(1.0), aggregator=aggregator,
      num_clients=num_clients,
      init_client_state=lambda params: head_part(params, head_paths(params, head)),
      execution=execution, name=name)
  return algorithm._replace(personalize=personalized_params)


HEAD_PATTERN = Hyperparameter(
    'head_pattern', str, '', 'regular expression on the parameter path (e.g. Dense_2/) '
    'selecting each client\'s own layers; empty: the output layer')


def registered_head(h: Hyperparameters) -> HeadFilter:
  """The `head=` of a registry build: `head_pattern`, or None (the output layer) when empty."""
  return h.head_pattern or None


def _build(loss, h: Hyperparameters, **kw):
  return fed_per(loss, h.client_optimizer(), head=registered_head(h),
                 server_optimizer=optax.sgd(_server_lr(h, 1.0)), **kw)


register_algorithm('fedper', _build,
                   'FedPer: shared body, per-client head, Arivazhagan et al. 2019 '
                   '(arXiv 1912.00818)', (*client_and_server(1.0), HEAD_PATTERN))
