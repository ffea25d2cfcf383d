"""Agnostic federated learning (AFL) with domain weights.

Mohri, Sivek & Suresh 2019, "Agnostic Federated Learning", ICML 2019,
arXiv 1902.00146 (the minimax objective `min_w max_{λ ∈ Δ_D} Σ_d λ_d L_d(w)` and its
stochastic mirror/projected-gradient algorithm, Section 5), in the federated form
of FedJAX's `agnostic_fed_avg` (Ro et al. 2021, arXiv 2104.02748): clients belong
to D domains, the server keeps domain weights λ on the simplex
(`ServerState.extra.domain_weights`, uniform at start) and each round

* every sampled client reports its loss at the global model w over the examples
  of its round, and trains locally from w as FedAvg does;
* the model step is the mean of the updates weighted by
  `β_k = λ_{d(k)} n_k / N_{d(k)}` (N_d: the round's examples of domain d), the
  gradient of `Σ_d λ_d L̂_d(w)` with `L̂_d` the round's mean loss of domain d;
* λ ascends: `λ ← Π_Δ(λ + γ_λ L̂)` (Euclidean projection onto the simplex, the
  paper's projected gradient step; `domain_update='exponentiated'` is FedJAX's
  exponentiated-gradient step `λ ← λ e^{γ_λ L̂} / Σ`). Domains absent from the round
  have `L̂_d = 0`, as in FedJAX.

Domains are per client here (FedJAX's are per example): `domain_ids[k]` is the
domain of population client k; by default every client is its own domain (D = N),
for which the weighted step is the λ-weighted mean of the clients' updates.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import Aggregator
from fedjax_sync.algorithms.federated import ClientOutput, Combination, federated_algorithm
from fedjax_sync.algorithms.q_ffl import examples_loss
from fedjax_sync.algorithms.registry import (DOMAIN_LEARNING_RATE, Hyperparameters,
                                             client_and_server, register_algorithm)
from fedjax_sync.clients.execution import ClientExecution
from fedjax_sync.clients.local import make_local_step, make_local_training
from fedjax_sync.types import Algorithm

DOMAIN_UPDATES = ('projected', 'exponentiated')


class AFLExtra(NamedTuple):
  """AFL's server state beyond the model: the domain weights λ `[D]` (on the simplex)."""

  domain_weights: jax.Array


class AFLAux(NamedTuple):
  """A client's loss at the global model, summed over its round's examples, and their count."""

  loss_sum: jax.Array
  count: jax.Array


def project_to_simplex(v: jax.Array) -> jax.Array:
  """Euclidean projection of `v [D]` onto the probability simplex.

  The sort-based algorithm of Held, Wolfe & Crowder 1974 (as in Duchi et al. 2008,
  "Efficient projections onto the l1-ball", Figure 1): `max(v − θ, 0)` with the
  threshold θ that makes the result sum to 1.
  """
  d = v.shape[0]
  u = jnp.sort(v)[::-1]
  cumulative = jnp.cumsum(u) - 1.0
  index = jnp.arange(1, d + 1, dtype=v.dtype)
  support = u - cumulative / index > 0
  rho = jnp.max(jnp.where(support, jnp.arange(d), 0))
  theta = cumulative[rho] / (rho + 1).astype(v.dtype)
  return jnp.maximum(v - theta, 0.0)


def domain_losses(aux: AFLAux, weight: jax.Array, domains: jax.Array,
                  num_domains: int) -> jax.Array:
  """`L̂ [D]`: each domain's mean loss over the present clients' examples (0 if absent)."""
  present = weight > 0
  loss = jax.ops.segment_sum(jnp.where(present, aux.loss_sum, 0.0), domains, num_domains)
  count = jax.ops.segment_sum(jnp.where(present, aux.count, 0.0), domains, num_domains)
  return jnp.where(count > 0, loss / jnp.where(count > 0, count, 1.0), 0.0)


def afl(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
        num_clients: int | None = None, domain_ids=None, domain_learning_rate: float = 0.1,
        domain_update: str = 'projected', initial_domain_weights=None,
        server_optimizer: optax.GradientTransformation | None = None,
        aggregator: Aggregator | None = None, execution: ClientExecution = ClientExecution(),
        unroll: int | bool = 1, name: str = 'afl') -> Algorithm:
  """Agnostic FL (Mohri et al. 2019, arXiv 1902.00146) with FedJAX's domain weighting.

  Example:
    >>> algorithm = afl(model.loss, optax.sgd(0.1), num_clients=data.num_clients,
    ...                 domain_ids=np.arange(data.num_clients) % 2)   # two domains
    >>> state, metrics = jax.jit(algorithm.round)(algorithm.init(params), client_batch, key)
    >>> state.extra.domain_weights   # λ [2]

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    client_optimizer: local optimizer (fresh state every round).
    num_clients: population size N (required: domains are per population client).
    domain_ids: `[N]` ints in [0, D), the domain of each client (default
      `arange(N)`: every client its own domain).
    domain_learning_rate: γ_λ ≥ 0 (0 keeps λ fixed).
    domain_update: 'projected' (the paper's) or 'exponentiated' (FedJAX's).
    initial_domain_weights: `[D]` on the simplex (default uniform).
    server_optimizer: applied to the λ-weighted update (default `sgd(1)`).
    aggregator: reducer of the updates, fed the weights β_k (default `weighted_mean()`).
    execution: client execution strategy and mesh.
    unroll: unrolling of the local-step loop.
    name: the algorithm's name.
  """
  if not isinstance(num_clients, int) or isinstance(num_clients, bool) or num_clients < 1:
    raise ValueError(f'AFL assigns a domain to every population client and needs num_clients '
                     f'(the population size, ≥ 1), got {num_clients!r}')
  if domain_update not in DOMAIN_UPDATES:
    raise ValueError(f'AFL domain_update must be one of {", ".join(DOMAIN_UPDATES)}, got '
                     f'{domain_update!r}')
  if isinstance(domain_learning_rate, (int, float)) and not domain_learning_rate >= 0:
    raise ValueError(f'AFL needs domain_learning_rate ≥ 0, got {domain_learning_rate!r}')
  domains = np.arange(num_clients) if domain_ids is None else np.asarray(domain_ids)
  if domains.shape != (num_clients,) or not np.issubdtype(domains.dtype, np.integer):
    raise ValueError(f'AFL domain_ids must be {num_clients} integers (one per client), got '
                     f'shape {domains.shape} of {domains.dtype}')
  if domains.min() < 0:
    raise ValueError(f'AFL domain_ids must be ≥ 0, got {int(domains.min())}')
  num_domains = int(domains.max()) + 1
  if initial_domain_weights is None:
    initial = np.full(num_domains, 1.0 / num_domains)
  else:
    initial = np.asarray(initial_domain_weights, np.float64)
    if (initial.shape != (num_domains,) or np.any(initial < 0)
        or abs(initial.sum() - 1.0) > 1e-6):
      raise ValueError(f'AFL initial_domain_weights must be {num_domains} non-negative values '
                       f'summing to 1, got {initial.tolist()}')
  domains = jnp.asarray(domains, jnp.int32)
  train = make_local_training(make_local_step(loss_fn, client_optimizer), unroll=unroll)
  loss_at = examples_loss(loss_fn)

  def client_update(server_params, extra, client_state, data, mask, key):
    del extra, client_state
    loss_sum, count = loss_at(server_params, data, mask, key)
    params, _, metrics = train(server_params, client_optimizer.init(server_params), data, mask,
                               key)
    return ClientOutput(update=tree_lib.tree_sub(server_params, params), state=(),
                        aux=AFLAux(loss_sum=loss_sum, count=count),
                        metrics={'loss_sum': metrics.loss_sum,
                                 'num_examples': metrics.num_examples})

  def combine(aux: AFLAux, batch, extra: AFLExtra) -> Combination:
    dtype = extra.domain_weights.dtype
    client_domains = domains[batch.client_ids]
    n = jnp.where(batch.weight > 0, aux.count.astype(dtype), 0.0)
    per_domain = jax.ops.segment_sum(n, client_domains, num_domains)[client_domains]
    beta = extra.domain_weights[client_domains] * n / jnp.where(per_domain > 0, per_domain, 1.0)
    return Combination(weights=beta, normalizer=jnp.sum(beta))

  def update_weights(extra: AFLExtra, aux: AFLAux, batch, population) -> AFLExtra:
    del population
    lam = extra.domain_weights
    losses = domain_losses(aux, batch.weight, domains[batch.client_ids], num_domains)
    step = jnp.asarray(domain_learning_rate, lam.dtype) * losses.astype(lam.dtype)
    if domain_update == 'projected':
      new = project_to_simplex(lam + step)
    else:
      new = lam * jnp.exp(step - jnp.max(step))
      new = new / jnp.sum(new)
    return AFLExtra(domain_weights=new)

  def init_extra(params) -> AFLExtra:
    dtype = jnp.promote_types(jnp.result_type(*jax.tree.leaves(params)), jnp.float32)
    return AFLExtra(domain_weights=jnp.asarray(initial, dtype))

  return federated_algorithm(
      client_update, server_optimizer=server_optimizer or optax.sgd(1.0), aggregator=aggregator,
      num_clients=num_clients, init_extra=init_extra, update_extra=update_weights,
      combine=combine, execution=execution, name=name)


def _build(loss, h: Hyperparameters, **kw):
  server = optax.sgd(1.0 if h.server_learning_rate is None else h.server_learning_rate)
  return afl(loss, h.client_optimizer(), domain_learning_rate=h.domain_learning_rate,
             server_optimizer=server, **kw)


register_algorithm('afl', _build,
                   'Agnostic FL with domain weights, Mohri et al. 2019 (arXiv 1902.00146)',
                   (*client_and_server(1.0), DOMAIN_LEARNING_RATE))
