"""FedDyn: federated learning with dynamic regularization.

Acar, Zhao, Matas, Mattina, Whatmough & Saligrama 2021, "Federated Learning Based
on Dynamic Regularization", ICLR 2021, arXiv 2111.04263, Algorithm 1.

Each client k keeps `g_k = ∇L_k(θ_k^{t−1})` (`ServerState.client_states`, leaves
`[N, ...]`, zero at start) and the server keeps `h` (`ServerState.extra`, zero at
start). A sampled client approximately minimizes its dynamically regularized loss

    L_k(θ) − ⟨g_k, θ⟩ + (α/2) ‖θ − θ^{t−1}‖²

by local SGD from θ^{t−1} (the engine's proximal term with μ = α and the gradient
offset −g_k), then sets `g_k ← g_k − α (θ_k^t − θ^{t−1})`. The server steps

    h^t = h^{t−1} − (α/m) Σ_{k∈P_t} (θ_k^t − θ^{t−1}),
    θ^t = (1/|P_t|) Σ_{k∈P_t} θ_k^t − h^t / α,

m the population size N. With u_k = θ^{t−1} − θ_k^t, the pseudo-gradient of this
step is `mean_P u_k + (1/m) Σ_P u_k + h^{t−1}/α`: the aggregator (default the plain
`mean()`, the paper's) reduces the u_k with weight `1 + |P|/m`, and `h^{t−1}/α`
is added. Zero-weight (padded) and non-finite clients neither move h nor have
their g_k written back.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp
import optax

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import Aggregator, compute_dtype, mean
from fedjax_sync.algorithms.federated import ClientOutput, Combination, federated_algorithm
from fedjax_sync.algorithms.registry import (CLIENT_LEARNING_RATE, CLIENT_MOMENTUM, FEDDYN_ALPHA,
                                             Hyperparameters, register_algorithm)
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.clients.local import make_local_step, make_local_training
from fedjax_sync.types import Algorithm, Params


class FedDynExtra(NamedTuple):
  """FedDyn's server state beyond the model: `h`, the running sum of client drifts."""

  h: Params


def fed_dyn_update(loss_fn: Callable, client_optimizer: optax.GradientTransformation,
                   alpha: float, *, unroll: int | bool = 1):
  """The FedDyn client: local steps on the regularized loss, then the new `g_k`.

  Returns `client_update(server_params, extra, g_k, data [S, B, ...], mask [S, B], key)
  -> ClientOutput` with `update = θ^{t−1} − θ_k`, `state = g_k⁺`, `aux = update`
  (for the server's h).
  """
  train = make_local_training(make_local_step(loss_fn, client_optimizer, prox_mu=alpha),
                              unroll=unroll)

  def client_update(server_params, extra, linear_term, data, mask, key):
    del extra
    offset = tree_lib.tree_scale(linear_term, -1.0)
    params, _, metrics = train(server_params, client_optimizer.init(server_params), data, mask,
                               key, anchor=server_params, grad_offset=offset)
    update = tree_lib.tree_sub(server_params, params)
    # g_k ← g_k − α (θ_k − θ^{t−1}) = g_k + α u_k.
    new_linear = tree_lib.tree_add(linear_term, tree_lib.tree_scale(update, alpha))
    return ClientOutput(update=update, state=new_linear, aux=update,
                        metrics={'loss_sum': metrics.loss_sum,
                                 'num_examples': metrics.num_examples})

  return client_update


def fed_dyn(loss_fn: Callable, learning_rate: float, *, alpha: float = 0.01,
            num_clients: int | None = None, momentum: float = 0.0,
            aggregator: Aggregator | None = None,
            execution: ClientExecution = ClientExecution(), unroll: int | bool = 1,
            name: str = 'feddyn') -> Algorithm:
  """FedDyn (Acar et al. 2021, arXiv 2111.04263, Algorithm 1).

  Example:
    >>> algorithm = fed_dyn(model.loss, 0.1, alpha=0.01, num_clients=data.num_clients)
    >>> state = algorithm.init(params)   # h = 0, g_k = 0 for all N clients
    >>> state, metrics = jax.jit(algorithm.round)(state, client_batch, key)
    >>> state.extra.h, state.client_states   # h [...], g_k [N, ...]

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    learning_rate: local SGD step size.
    alpha: regularization α > 0 (the paper's grid: 0.1, 0.01, 0.001).
    num_clients: population size m (h moves by (α/m) Σ_P drifts); required.
    momentum: local heavy-ball momentum (0 in the paper).
    aggregator: reducer of the client drifts u_k (default `mean()`, the paper's
      plain mean over the participants).
    execution: client execution strategy and mesh.
    unroll: unrolling of the local-step loop.
    name: the algorithm's name.
  """
  if num_clients is None:
    raise ValueError('FedDyn keeps a linear term per client and needs num_clients, the '
                     'population size: fed_dyn(loss_fn, learning_rate, '
                     'num_clients=data.num_clients)')
  if not isinstance(num_clients, int) or isinstance(num_clients, bool) or num_clients < 1:
    raise ValueError(f'FedDyn needs num_clients (population size) ≥ 1, got {num_clients!r}')
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise ValueError(f'FedDyn needs alpha > 0 (it divides h), got {alpha!r}')
  alpha = float(alpha)
  optimizer = optax.sgd(learning_rate, momentum=momentum or None)

  def combine(drifts, batch, extra: FedDynExtra) -> Combination:
    del drifts
    present = (batch.weight > 0).astype(compute_dtype(extra.h))
    count = jnp.sum(present)
    # Σ_P u / normalizer = mean_P u + (1/m) Σ_P u.
    normalizer = count * num_clients / (num_clients + count)
    return Combination(weights=present, normalizer=normalizer,
                       offset=tree_lib.tree_scale(extra.h, 1.0 / alpha))

  def update_h(extra: FedDynExtra, drifts, batch, population) -> FedDynExtra:
    present = (batch.weight > 0).astype(compute_dtype(drifts))
    step = tree_lib.client_weighted_sum(drifts, present * (alpha / population))
    return FedDynExtra(h=tree_lib.tree_add(extra.h, step))

  return federated_algorithm(
      fed_dyn_update(loss_fn, optimizer, alpha, unroll=unroll),
      server_optimizer=optax.sgd(1.0),
      aggregator=aggregator if aggregator is not None else mean(),
      num_clients=num_clients, init_client_state=tree_lib.tree_zeros_like,
      init_extra=lambda params: FedDynExtra(h=tree_lib.tree_zeros_like(params)),
      update_extra=update_h, combine=combine, execution=execution, name=name)


def _build(loss, h: Hyperparameters, **kw):
  return fed_dyn(loss, h.client_learning_rate, alpha=h.feddyn_alpha, momentum=h.client_momentum,
                 **kw)


register_algorithm('feddyn', _build,
                   'FedDyn dynamic regularization, Acar et al. 2021 (arXiv 2111.04263)',
                   (CLIENT_LEARNING_RATE, CLIENT_MOMENTUM, FEDDYN_ALPHA))
