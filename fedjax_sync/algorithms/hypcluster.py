"""HypCluster: hypothesis-based clustering, as FedJAX implements it.

Mansour, Mohri, Ro & Suresh 2020, "Three Approaches for Personalization with
Applications to Federated Learning", arXiv 2002.10619, Section 3 (HypCluster), in
the federated form of FedJAX's `hyp_cluster`: every round, each sampled client
assigns itself to the hypothesis (cluster model) with the lowest average loss on its
data (the "maximization" step), trains from it like a FedAvg client, and each
cluster model takes its own server-optimizer step on the example-weighted mean
update of its clients (the "expectation" step); a cluster that no client chose this
round keeps its model and optimizer state.

That is the round of IFCA with model averaging (`fedjax_sync.algorithms.ifca`,
Ghosh et al. 2020), whose state layout, evaluation and initialization this shares
(see `ifca.clustered_algorithm`): the two papers arrive at the same alternating
procedure. Differences from FedJAX: the assignment uses the client's examples of the
round (FedJAX evaluates its whole dataset), and the initial hypotheses are perturbed
copies of one params pytree or `initial_clusters_fn` (FedJAX offers independent
random draws and a k-means++-style initializer that trains client models first; the
latter is not implemented here). With `num_clusters=1` the run is FedAvg's.
"""

from __future__ import annotations

from typing import Callable

import optax

from fedjax_sync.algorithms.ifca import (CLUSTERED_HYPERPARAMETERS, clustered_algorithm,
                                         clustered_builder)
from fedjax_sync.algorithms.registry import register_algorithm
from fedjax_sync.types import Algorithm


def hyp_cluster(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
                num_clusters: int = 2, **kwargs) -> Algorithm:
  """HypCluster (Mansour et al. 2020, arXiv 2002.10619), FedJAX's federated form.

  Example:
    >>> algorithm = hyp_cluster(model.loss, optax.sgd(0.05), num_clusters=2,
    ...                         num_clients=data.num_clients)
    >>> state = algorithm.init(params)
    >>> state, metrics = jax.jit(algorithm.round)(state, client_batch, key)
    >>> metrics['client_cluster']    # [C] the hypothesis each client chose

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    client_optimizer: optax optimizer of local training.
    num_clusters: the number of hypotheses (1: FedAvg).
    **kwargs: `ifca.clustered_algorithm`'s (num_clients, server_optimizer, aggregator,
      init_scale, init_seed, initial_clusters_fn, execution, unroll, name).
  """
  kwargs.setdefault('name', 'hypcluster')
  return clustered_algorithm(loss_fn, client_optimizer, num_clusters=num_clusters, **kwargs)


register_algorithm('hypcluster', clustered_builder(hyp_cluster),
                   'HypCluster, Mansour et al. 2020 (arXiv 2002.10619), as in FedJAX',
                   CLUSTERED_HYPERPARAMETERS)
