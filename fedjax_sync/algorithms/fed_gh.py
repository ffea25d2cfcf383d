"""FedGH: FedAvg clients with gradient-harmonized aggregation.

Zhang, Sun & Chen 2023, "Tackling the Non-IID Issue in Heterogeneous Federated
Learning by Gradient Harmonization", arXiv 2309.06692. Clients run plain local
SGD; the server projects conflicting pseudo-gradients apart pairwise (in the
K×K Gram space, `fedjax_sync.aggregators.harmonize`) and takes the example-weighted
mean. No hyperparameters beyond FedAvg's. Metrics per round:
`aggregator/conflicts_before`, `aggregator/conflicts_after`, `aggregator/num_pairs`.
"""

from __future__ import annotations

from typing import Callable

import optax

from fedjax_sync.aggregators.harmonize import harmonize
from fedjax_sync.algorithms.fed_avg import fed_avg
from fedjax_sync.algorithms.registry import Hyperparameters, client_and_server, register_algorithm
from fedjax_sync.types import Algorithm


def fed_gh(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
           mode: str = 'original', name: str = 'fedgh', **kwargs) -> Algorithm:
  """FedGH (arXiv 2309.06692): `fed_avg` with the `harmonize(mode)` reducer.

  Example:
    >>> algorithm = fed_gh(model.loss, optax.sgd(0.001))

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    client_optimizer: local optimizer.
    mode: 'original' (paper notation, default) or 'running' [UNCONF].
    name: the algorithm's name.
    **kwargs: forwarded to `fed_avg` (server_optimizer, execution, num_clients, ...);
      `aggregator` is fixed to `harmonize(mode)`.
  """
  if 'aggregator' in kwargs:
    raise ValueError('fed_gh fixes its aggregator to harmonize(mode); use '
                     'fed_avg(..., aggregator=chain(..., harmonize())) to combine stages')
  return fed_avg(loss_fn, client_optimizer, aggregator=harmonize(mode), name=name, **kwargs)


def _build(loss, h: Hyperparameters, **kw):
  server = optax.sgd(1.0 if h.server_learning_rate is None else h.server_learning_rate)
  return fed_gh(loss, h.client_optimizer(), server_optimizer=server, **kw)


register_algorithm('fedgh', _build,
                   'FedGH gradient harmonization, Zhang, Sun & Chen 2023 (arXiv 2309.06692)',
                   client_and_server(1.0))
