"""IFCA: the iterative federated clustering algorithm, and the clustered round it shares
with HypCluster.

Ghosh, Chung, Yin & Ramchandran 2020, "An Efficient Framework for Clustered
Federated Learning", NeurIPS 2020, arXiv 2006.04088, Algorithm 2 (model averaging).

The server keeps K cluster models θ_1..θ_K. Every sampled client evaluates all K on
its data (the mean loss over the examples of its round) and picks the cluster with
the lowest loss, ĵ = argmin_j F_i(θ_j); it trains from θ_ĵ like a FedAvg client and
returns `θ_ĵ − θ_i`. Each cluster's model then takes the server step of FedAvg on
the updates of the clients that chose it; a cluster no client chose keeps its model
and server-optimizer state. With K = 1 the round is FedAvg's: same client keys, same
local training, same weighted mean (tests: equal to `fed_avg` to float rounding).

State layout (`ServerState`):
* `extra`: `ClusterState(cluster_params, cluster_weight)`, the K models stacked on a
  leading axis `[K, ...]` and the total weight (examples) of the clients that have
  chosen each cluster so far `[K]`.
* `params`: the model of the cluster with the largest `cluster_weight` (ties: the
  lowest index; cluster 0 before the first round). This is the global model the
  drivers evaluate on the global test set: the one cluster model that has served
  the most examples.
* `opt_state`, `aggregator_state`: one per cluster, stacked `[K, ...]` (an
  aggregator with per-client state keeps K copies of it).
* `client_states`: with `num_clients`, `[N]` int32, the cluster each client chose
  when it last took part (−1: never).

Evaluation: `Algorithm.personalize` is a function of the global params and one
client's stored state, so it cannot reach the cluster models in `extra`; it is None
and the drivers' per-client accuracy is that of the global params above. Use
`client_models(state)` for each client's cluster model (its latest choice), or
`clusters_by_loss` to choose on held-out data.

Readings chosen here: the paper's Algorithm 2 averages a cluster's models with
equal weights (its clients have equal sizes); the default aggregator here is the
example-weighted mean, so that K = 1 is FedAvg exactly (pass `aggregator=mean()` for
the paper's form). The paper initializes the K models at random; `Algorithm.init`
receives one params pytree, so cluster 0 is those params and cluster j ≥ 1 is
`params + σ ε_j`, ε_j ~ N(0, 1) elementwise with a fixed key, σ = `init_scale` × the
root-mean-square of all parameters (× 1 when they are all zero); pass
`initial_clusters=` to choose them yourself (e.g. K independent `model.init` draws).
A client whose update is not finite is left out of its cluster's aggregate (and its
choice is not recorded): the cluster models are persistent state, which never takes
in a non-finite client output (`nonfinite_updates` counts it). The gradient-averaging
variant of the paper (its option I) is not implemented.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sync import communication
from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import (Aggregator, aggregator_metrics, compute_dtype,
                                          validate_aggregator, weighted_mean)
from fedjax_sync.algorithms.fed_avg import local_training_update
from fedjax_sync.algorithms.federated import round_metrics
from fedjax_sync.algorithms.registry import (Hyperparameter, Hyperparameters, _server_lr,
                                             client_and_server, register_algorithm)
from fedjax_sync.clients.execution import (ClientExecution, map_clients, replicate,
                                           shard_client_axis)
from fedjax_sync.clients.local import masked_mean
from fedjax_sync.types import Algorithm, ClientBatch, Params, PyTree, ServerState

# Folded into a client's key for its cluster choice; local step s uses fold_in(key, s).
_SELECTION_STREAM = 2**31 - 2


class ClusterState(NamedTuple):
  """The clustered algorithms' server state beyond the global params (`ServerState.extra`).

  Attributes:
    cluster_params: the K cluster models, leaves `[K, ...]`.
    cluster_weight: `[K]` total weight (examples) of the clients that chose each cluster.
  """

  cluster_params: Params
  cluster_weight: jax.Array


@functools.partial(jax.jit, static_argnums=(1,), static_argnames=('seed',))
def initial_clusters(params: Params, num_clusters: int, *, init_scale: float = 1.0,
                     seed: int = 0) -> Params:
  """K models stacked `[K, ...]`: `params` and K − 1 perturbed copies of it.

  Copy j ≥ 1 is `params + σ ε_j`, ε_j ~ N(0, 1) elementwise (key `fold_in(key(seed),
  j)`), σ = `init_scale` × RMS of all floating-point parameters (`init_scale` when
  they are all zero); non-float leaves are copied. One compiled program (eager, the
  per-leaf draws took seconds of op-by-op compilation).
  """
  leaves, treedef = jax.tree.flatten(params)
  floats = [x for x in leaves if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  dtype = compute_dtype(params)
  size = sum(x.size for x in floats)
  sq = sum(jnp.sum(jnp.square(jnp.asarray(x, dtype))) for x in floats) if floats else 0.0
  rms = jnp.sqrt(sq / max(size, 1))
  sigma = init_scale * jnp.where(rms > 0, rms, 1.0)
  root = jax.random.key(seed)
  copies = [leaves]
  for j in range(1, num_clusters):
    key = jax.random.fold_in(root, j)
    copies.append([
        (x + sigma * jax.random.normal(jax.random.fold_in(key, i), jnp.shape(x), dtype)
         ).astype(x.dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x
        for i, x in enumerate(leaves)])
  return jax.tree.unflatten(treedef, [jnp.stack(xs) for xs in zip(*copies)])


def cluster_losses(loss_fn: Callable, cluster_params: Params, data: PyTree, mask: jax.Array,
                   key: jax.Array) -> jax.Array:
  """`[K]` mean loss of each cluster model over one client's examples (`[S, B, ...]`)."""

  def one_cluster(params):
    def body(total, xs):
      batch, m, s = xs
      loss, count = masked_mean(loss_fn(params, batch, jax.random.fold_in(key, s)), m)
      return (total[0] + loss * count, total[1] + count), None
    zero = jnp.zeros((), compute_dtype(params))
    (loss_sum, count), _ = jax.lax.scan(body, (zero, zero),
                                        (data, mask, jnp.arange(mask.shape[0])))
    return loss_sum / jnp.maximum(count, 1)

  return jax.vmap(one_cluster)(cluster_params)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def _take(stacked, index):
  return jax.tree.map(lambda x: x[index], stacked)


def client_models(state: ServerState) -> Params:
  """Each client's cluster model (its latest choice; the global params for a client
  that never took part), leaves `[N, ...]` — N model copies, for evaluation."""
  assignment = state.client_states
  if not hasattr(assignment, 'shape'):
    raise ValueError('client_models needs the per-client cluster choices: build the '
                     'algorithm with num_clients=data.num_clients')
  chosen = _take(state.extra.cluster_params, jnp.maximum(assignment, 0))
  return jax.tree.map(lambda c, g: jnp.where(
      (assignment >= 0).reshape((-1,) + (1,) * g.ndim), c, g[None]), chosen, state.params)


def clustered_algorithm(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
                        num_clusters: int, num_clients: int | None = None,
                        server_optimizer: optax.GradientTransformation | None = None,
                        aggregator: Aggregator | None = None, init_scale: float = 1.0,
                        init_seed: int = 0,
                        initial_clusters_fn: Callable[[Params], Params] | None = None,
                        execution: ClientExecution = ClientExecution(), unroll: int | bool = 1,
                        name: str = 'clustered') -> Algorithm:
  """The clustered round of IFCA and HypCluster (see the module docstring).

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]` (stateless when
      `num_clusters > 1`: choosing a cluster evaluates the loss).
    client_optimizer: optax optimizer of local training (fresh state every round).
    num_clusters: K ≥ 1.
    num_clients: population size N; with it, each client's latest choice is kept.
    server_optimizer: per-cluster server step (default `optax.sgd(1.0)`).
    aggregator: reducer of a cluster's updates (default `weighted_mean()`).
    init_scale: σ of the perturbed initial copies, relative to the params' RMS.
    init_seed: seed of those perturbations.
    initial_clusters_fn: `params -> [K, ...]` stacked initial cluster models
      (overrides `init_scale`/`init_seed`).
    execution: client execution strategy and mesh.
    unroll: unrolling of the local-step loop.
    name: the algorithm's name.
  """
  if not isinstance(num_clusters, int) or isinstance(num_clusters, bool) or num_clusters < 1:
    raise ValueError(f'{name}: num_clusters must be an int ≥ 1, got {num_clusters!r}')
  if num_clients is not None and (not isinstance(num_clients, int) or num_clients < 1):
    raise ValueError(f'{name}: num_clients must be an int ≥ 1 or None, got {num_clients!r}')
  if isinstance(init_scale, (int, float)) and not init_scale >= 0:
    raise ValueError(f'{name}: init_scale must be ≥ 0, got {init_scale!r}')
  aggregator = validate_aggregator(aggregator if aggregator is not None else weighted_mean())
  server_optimizer = server_optimizer or optax.sgd(1.0)
  execution = execution.validate()
  train = local_training_update(loss_fn, client_optimizer, unroll=unroll)
  k_clusters = num_clusters

  def init(params: Params) -> ServerState:
    if initial_clusters_fn is not None:
      clusters = initial_clusters_fn(params)
      bad = [x.shape for x, p in zip(jax.tree.leaves(clusters), jax.tree.leaves(params))
             if x.shape != (k_clusters,) + jnp.shape(p)]
      if bad or jax.tree.structure(clusters) != jax.tree.structure(params):
        raise ValueError(f'{name}: initial_clusters_fn must return the params stacked '
                         f'[{k_clusters}, ...]; got leaf shapes '
                         f'{[x.shape for x in jax.tree.leaves(clusters)]}')
    else:
      clusters = initial_clusters(params, k_clusters, init_scale=init_scale, seed=init_seed)
    one = [_take(clusters, j) for j in range(k_clusters)]
    client_states = (jnp.full((num_clients,), -1, jnp.int32) if num_clients is not None
                     else ())
    return ServerState(
        params=one[0],
        opt_state=_stack([server_optimizer.init(p) for p in one]),
        aggregator_state=_stack([aggregator.init(p, num_clients) for p in one]),
        client_states=client_states,
        extra=ClusterState(cluster_params=clusters,
                           cluster_weight=jnp.zeros((k_clusters,), compute_dtype(params))),
        round=jnp.zeros((), jnp.int32))

  def round_fn(state: ServerState, batch: ClientBatch, key: jax.Array):
    client_root, aggregator_key = jax.random.split(key)
    keys = jax.vmap(lambda i: jax.random.fold_in(client_root, i))(batch.client_ids)
    clusters = replicate(state.extra.cluster_params, execution.mesh)

    def one_client(data, mask, k):
      if k_clusters == 1:
        choice = jnp.zeros((), jnp.int32)
      else:
        losses = cluster_losses(loss_fn, clusters, data, mask,
                                jax.random.fold_in(k, _SELECTION_STREAM))
        choice = jnp.argmin(losses).astype(jnp.int32)
      output = train(_take(clusters, choice), (), (), data, mask, k)
      return output, choice

    inputs = shard_client_axis((batch.data, batch.mask, keys), execution.mesh)
    model_bytes = communication.model_bytes(state.params)
    outputs, choice = map_clients(one_client, inputs, execution, client_bytes=model_bytes)

    accepted = (batch.weight > 0) & tree_lib.client_all_finite(outputs.update)
    weight = jnp.where(accepted, batch.weight, jnp.zeros_like(batch.weight))
    member = choice[None, :] == jnp.arange(k_clusters, dtype=jnp.int32)[:, None]   # [K, C]
    cluster_weights = jnp.where(member, weight[None, :], jnp.zeros_like(weight)[None, :])
    cluster_keys = (aggregator_key[None] if k_clusters == 1
                    else jax.random.split(aggregator_key, k_clusters))

    def per_cluster(w_k, aggregator_state, key_k, opt_state, params):
      aggregate, new_aggregator_state = aggregator.apply(
          outputs.update, w_k, aggregator_state, key_k, batch.client_ids)
      updates, new_opt_state = server_optimizer.update(aggregate, opt_state, params)
      new_params = optax.apply_updates(params, updates)
      chosen = jnp.sum(w_k) > 0   # a cluster nobody chose keeps its model and state
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(chosen, n, o), new, old)
      return (keep(new_params, params), keep(new_opt_state, opt_state),
              keep(new_aggregator_state, aggregator_state), aggregate)

    new_clusters, opt_state, aggregator_state, aggregates = jax.vmap(per_cluster)(
        cluster_weights, state.aggregator_state, cluster_keys, state.opt_state,
        state.extra.cluster_params)
    cluster_weight = state.extra.cluster_weight + jnp.sum(cluster_weights, axis=1).astype(
        state.extra.cluster_weight.dtype)
    new_params = _take(new_clusters, jnp.argmax(cluster_weight))
    client_states = state.client_states
    if num_clients is not None:
      client_states = tree_lib.scatter_clients(client_states, batch.client_ids, choice, accepted)

    metrics = round_metrics(outputs, batch, aggregates, state.params)
    metrics['bytes_down'] = metrics['bytes_down'] * k_clusters   # all K models go down
    metrics['client_cluster'] = choice.astype(jnp.float32)
    metrics['num_active_clusters'] = jnp.sum(jnp.any(member & accepted[None, :], axis=1)
                                             ).astype(jnp.float32)
    for j in range(k_clusters):
      prefix = 'aggregator/' if k_clusters == 1 else f'aggregator/cluster{j}/'
      metrics.update({prefix + k: v for k, v in
                      aggregator_metrics(_take(aggregator_state, j)).items()})
    new_state = ServerState(params=new_params, opt_state=opt_state,
                            aggregator_state=aggregator_state, client_states=client_states,
                            extra=ClusterState(cluster_params=new_clusters,
                                               cluster_weight=cluster_weight),
                            round=state.round + 1)
    return new_state, metrics

  return Algorithm(init=init, round=round_fn, name=name, num_clients=num_clients)


def ifca(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
         num_clusters: int = 2, **kwargs) -> Algorithm:
  """IFCA (Ghosh et al. 2020, arXiv 2006.04088, Algorithm 2 with model averaging).

  Example:
    >>> algorithm = ifca(model.loss, optax.sgd(0.05), num_clusters=3,
    ...                  num_clients=data.num_clients)
    >>> state = algorithm.init(params)
    >>> state, metrics = jax.jit(algorithm.round)(state, client_batch, key)
    >>> state.extra.cluster_params   # leaves [3, ...]; state.client_states: choices [N]

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    client_optimizer: optax optimizer of local training.
    num_clusters: K, the number of cluster models (1: FedAvg).
    **kwargs: `clustered_algorithm`'s (num_clients, server_optimizer, aggregator,
      init_scale, init_seed, initial_clusters_fn, execution, unroll, name).
  """
  kwargs.setdefault('name', 'ifca')
  return clustered_algorithm(loss_fn, client_optimizer, num_clusters=num_clusters, **kwargs)


NUM_CLUSTERS = Hyperparameter('num_clusters', int, 2, 'number of cluster models K (1: FedAvg)',
                              minimum=1)
CLUSTER_INIT_SCALE = Hyperparameter(
    'cluster_init_scale', float, 1.0, 'initial clusters: params + σ·N(0,1), σ = scale × '
    'RMS(params)', minimum=0.0)
CLUSTERED_HYPERPARAMETERS = (*client_and_server(1.0), NUM_CLUSTERS, CLUSTER_INIT_SCALE)


def clustered_builder(build: Callable) -> Callable:
  """A registry builder for a clustered algorithm built by `build(loss, optimizer, **kw)`."""
  def builder(loss, h: Hyperparameters, **kw):
    return build(loss, h.client_optimizer(), num_clusters=h.num_clusters,
                 init_scale=h.cluster_init_scale,
                 server_optimizer=optax.sgd(_server_lr(h, 1.0)), **kw)
  return builder


register_algorithm('ifca', clustered_builder(ifca),
                   'IFCA: iterative federated clustering, Ghosh et al. 2020 (arXiv 2006.04088)',
                   CLUSTERED_HYPERPARAMETERS)
