"""Core types shared by every part of fedjax-sync.

Shapes use `C` for the clients of a round, `N` for the whole population, `S` for
local steps and `B` for the local batch size.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

import jax

PyTree = Any
Params = PyTree
Metrics = dict[str, jax.Array]


class ClientBatch(NamedTuple):
  """The input of one round: the local data of the C participating clients.

  Attributes:
    data: pytree whose leaves are `[C, S, B, ...]` (e.g. `{'x': ..., 'y': ...}`).
    mask: `[C, S, B]` bool, False marks a padded example; a padded example
      contributes nothing to gradients, losses or counts.
    client_ids: `[C]` int32 population indices of the clients, used to derive
      per-client keys and to gather/scatter per-client persistent state.
    weight: `[C]` float aggregation weights; by default the number of real
      examples of each client. A weight of 0 marks an absent or padded client:
      it changes neither the aggregate nor any persistent state.
  """

  data: PyTree
  mask: jax.Array
  client_ids: jax.Array
  weight: jax.Array


class ServerState(NamedTuple):
  """The whole state of a federated algorithm between rounds (a pytree).

  Attributes:
    params: the global model.
    opt_state: state of the server optax optimizer.
    aggregator_state: state of the aggregator (see `fedjax_sync.aggregators`).
    client_states: per-client persistent state, leaves `[N, ...]`, gathered and
      scattered by `ClientBatch.client_ids`; `()` when the algorithm keeps none.
    extra: algorithm-specific server state (e.g. SCAFFOLD's control variate).
    round: int32 scalar, the number of rounds completed.
  """

  params: Params
  opt_state: PyTree
  aggregator_state: PyTree
  client_states: PyTree
  extra: PyTree
  round: jax.Array


class Algorithm(NamedTuple):
  """A federated algorithm: a pair of pure functions.

  Attributes:
    init: `init(params) -> ServerState`.
    round: `round(state, client_batch, key) -> (state, metrics)`; jit-compilable,
      metrics are arrays (scalars or `[C]` per-client values).
    name: a human-readable name.
    num_clients: the population N the algorithm was built for (its per-client
      state is `[N, ...]`), or None when it keeps none; the drivers check it
      against the data's number of clients.
    personalize: `(params, client_state) -> params` one client is evaluated with
      (FedBN: the shared layers and the client's own batch-norm layers), or None
      when every client uses the global params; the drivers' per-client
      evaluation applies it to `ServerState.client_states`.
  """

  init: Callable[[Params], ServerState]
  round: Callable[[ServerState, ClientBatch, jax.Array], tuple[ServerState, Metrics]]
  name: str = 'algorithm'
  num_clients: int | None = None
  personalize: Callable[[Params, PyTree], Params] | None = None


class PerExampleLoss(Protocol):
  """`loss_fn(params, batch, key) -> [B]` per-example losses of one batch."""

  def __call__(self, params: Params, batch: PyTree, key: jax.Array) -> jax.Array:
    ...
