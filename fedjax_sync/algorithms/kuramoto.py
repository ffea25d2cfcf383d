"""Kuramoto-FedAvg: FedAvg clients with phase-weighted (synchronization) aggregation.

arXiv 2505.19605. Clients are FedAvg's; the server replaces the weighted mean by
`w ← w + κ_t Σ_k ρ_k Δ_k` with ρ_k from the phases θ_k = ∠(Δ_k, Δ̄)
(`fedjax_sync.aggregators.kuramoto`). The authors' released code uses a
different rule, available as `kuramoto_fedavg(..., mode='code')` and registered
as 'kuramoto_fedavg_code'. The aggregators themselves work with any algorithm.

Paper setup [CODE]: 10 clients, shard partition (3, 5 or 10 shards per client),
full participation, 100 rounds, batch 64, SGD lr 0.01, momentum 0.9, weight
decay 1e-5; best κ = 0.005.
"""

from __future__ import annotations

from typing import Callable

import optax

from fedjax_sync.aggregators.kuramoto import kuramoto, kuramoto_code
from fedjax_sync.algorithms.fed_avg import fed_avg
from fedjax_sync.algorithms.registry import (KAPPA, KAPPA_DECAY, Hyperparameters, client_and_server,
                                             register_algorithm)
from fedjax_sync.types import Algorithm

MODES = ('paper', 'code')


def kuramoto_fedavg(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
                    kappa: float = 0.005, decay: float = 1.0, eps_den: float = 1e-6,
                    mode: str = 'paper', coupling: float = 0.3, phase_scale: float = 1.0,
                    name: str | None = None, **kwargs) -> Algorithm:
  """Kuramoto-FedAvg (arXiv 2505.19605).

  Example:
    >>> algorithm = kuramoto_fedavg(model.loss, optax.sgd(0.01), kappa=0.005)
    >>> # metrics: 'aggregator/rho_min', 'aggregator/rho_max', 'aggregator/fallbacks'

  Args:
    loss_fn: per-example loss.
    client_optimizer: local optimizer.
    kappa: κ0 of the paper rule.
    decay: γ of κ_t = κ0 γ^t [UNCONF].
    eps_den: fallback threshold on the weights' denominator.
    mode: 'paper' (the published rule) or 'code' (the authors' released code).
    coupling: K_t of the 'code' rule (0.3 in the released code).
    phase_scale: φ_k = phase_scale · ‖Δ_k‖ in the 'code' rule (see `kuramoto_code`).
    name: the algorithm's name.
    **kwargs: forwarded to `fed_avg` (server_optimizer, num_clients, execution, ...).
  """
  if mode not in MODES:
    raise ValueError(f'kuramoto_fedavg mode must be one of {MODES}, got {mode!r}')
  if 'aggregator' in kwargs:
    raise ValueError('kuramoto_fedavg fixes its aggregator; use fed_avg(..., '
                     'aggregator=kuramoto(...)) to combine it with other stages')
  aggregator = (kuramoto(kappa, decay, eps_den) if mode == 'paper'
                else kuramoto_code(coupling, phase_scale=phase_scale))
  if name is None:
    name = 'kuramoto_fedavg' if mode == 'paper' else 'kuramoto_fedavg_code'
  return fed_avg(loss_fn, client_optimizer, aggregator=aggregator, name=name, **kwargs)


def _server(h: Hyperparameters):
  return optax.sgd(1.0 if h.server_learning_rate is None else h.server_learning_rate)


register_algorithm(
    'kuramoto_fedavg', lambda loss, h, **kw: kuramoto_fedavg(
        loss, h.client_optimizer(), kappa=h.kappa, decay=h.kappa_decay,
        server_optimizer=_server(h), **kw),
    'Kuramoto-FedAvg phase-weighted aggregation (arXiv 2505.19605)',
    (*client_and_server(1.0), KAPPA, KAPPA_DECAY))
register_algorithm(
    'kuramoto_fedavg_code', lambda loss, h, **kw: kuramoto_fedavg(
        loss, h.client_optimizer(), mode='code', server_optimizer=_server(h), **kw),
    "Kuramoto-FedAvg, the authors' released-code rule (arXiv 2505.19605)",
    client_and_server(1.0))
