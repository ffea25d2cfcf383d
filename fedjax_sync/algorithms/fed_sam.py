"""FedSAM and FedSAGM: FedAvg whose clients run sharpness-aware local optimizers.

FedSAM: Qu et al. 2022, "Generalized Federated Learning via Sharpness Aware
Minimization", arXiv 2206.02618 (also Caldarola et al. 2022, arXiv 2203.11834):
FedAvg with SAM as the local optimizer. FedSAGM: the seed report's FedAvg with
SAGM (Wang et al., CVPR 2023, arXiv 2303.10353) as the local optimizer. The local
optimizers live in `fedjax_sync.clients.sam` and compose with any server side;
these builders only fix the server side to FedAvg's.

Also here: `sharpness`, a first-order estimate of the global model's sharpness,
`max_{‖ε‖≤ρ} L(w + ε) − L(w) ≈ L(w + ρ g/‖g‖) − L(w)` with `g = ∇L(w)`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_sync import tree as tree_lib
from fedjax_sync.algorithms.fed_avg import fed_avg
from fedjax_sync.algorithms.registry import (SAGM_ALPHA, SAM_RHO, Hyperparameters,
                                             client_and_server, register_algorithm)
from fedjax_sync.clients.local import masked_mean
from fedjax_sync.clients.sam import NORM_EPS, sagm, sam
from fedjax_sync.types import Algorithm


def fed_sam(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
            rho: float = 0.05, name: str = 'fedsam', **kwargs) -> Algorithm:
  """FedSAM (arXiv 2206.02618): FedAvg with `sam(client_optimizer, rho)` locally.

  Example:
    >>> algorithm = fed_sam(model.loss, optax.sgd(0.01), rho=0.05)

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    client_optimizer: the base optimizer SAM wraps (fresh state every round).
    rho: SAM radius (0.05 in the SAM paper; 0.001 in the seed report).
    name: the algorithm's name.
    **kwargs: forwarded to `fed_avg` (server_optimizer, aggregator, execution, ...).
  """
  return fed_avg(loss_fn, sam(client_optimizer, rho), name=name, **kwargs)


def fed_sagm(loss_fn: Callable, client_optimizer: optax.GradientTransformation, *,
             rho: float = 0.05, alpha: float = 0.001, name: str = 'fedsagm',
             **kwargs) -> Algorithm:
  """FedSAGM: FedAvg with `sagm(client_optimizer, rho, alpha)` locally (arXiv 2303.10353).

  Args:
    loss_fn: per-example loss.
    client_optimizer: the base optimizer SAGM wraps.
    rho: ascent radius (seed report: 0.001).
    alpha: gradient-matching step (seed report: 0.01).
    name: the algorithm's name.
    **kwargs: forwarded to `fed_avg`.
  """
  return fed_avg(loss_fn, sagm(client_optimizer, rho, alpha), name=name, **kwargs)


def sharpness(loss_fn: Callable, params, batch, rho: float, *, mask: jax.Array | None = None,
              key: jax.Array | None = None) -> jax.Array:
  """First-order sharpness `L(w + ρ g/‖g‖) − L(w)` of the masked mean loss on `batch`.

  The maximum loss increase within the ρ-ball, to first order in ρ (the SAM
  paper's inner maximization, arXiv 2010.01412 Eq. 2). A flat minimum gives ≈ 0.

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    params: the model (e.g. the global model after a round).
    batch: leaves `[B, ...]`.
    rho: radius ρ > 0.
    mask: optional `[B]` bool; padded examples are ignored.
    key: loss key (dropout); default a fixed key, so the two losses agree.

  Returns:
    A scalar.
  """
  if not rho > 0:
    raise ValueError(f'sharpness rho must be > 0, got {rho!r}')
  key = jax.random.key(0) if key is None else key

  def objective(p):
    losses = loss_fn(p, batch, key)
    m = jnp.ones(losses.shape, bool) if mask is None else mask
    return masked_mean(losses, m)[0]

  loss, grads = jax.value_and_grad(objective)(params)
  scale = rho / (tree_lib.tree_norm(grads) + NORM_EPS)
  perturbed = jax.tree.map(lambda p, g: p + scale.astype(p.dtype) * g, params, grads)
  return objective(perturbed) - loss


def _server(h: Hyperparameters):
  return optax.sgd(1.0 if h.server_learning_rate is None else h.server_learning_rate)


register_algorithm(
    'fedsam', lambda loss, h, **kw: fed_sam(
        loss, h.client_optimizer(), rho=h.sam_rho, server_optimizer=_server(h), **kw),
    'FedSAM: FedAvg with SAM local steps, Qu et al. 2022 (arXiv 2206.02618)',
    (*client_and_server(1.0), SAM_RHO))
register_algorithm(
    'fedsagm', lambda loss, h, **kw: fed_sagm(
        loss, h.client_optimizer(), rho=h.sam_rho, alpha=h.sagm_alpha,
        server_optimizer=_server(h), **kw),
    'FedSAGM: FedAvg with SAGM local steps (Wang et al. CVPR 2023, arXiv 2303.10353)',
    (*client_and_server(1.0), SAM_RHO, SAGM_ALPHA))
