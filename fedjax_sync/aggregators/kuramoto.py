"""Kuramoto-FedAvg's phase-weighted aggregation, and the authors' released-code rule.

Paper rule (arXiv 2505.19605, "Kuramoto-FedAvg: Using Synchronization Dynamics to
Improve Federated Learning Optimization under Statistical Heterogeneity"), with
client updates Δ_k, p_k = n_k/Σn and Δ̄ = Σ_k p_k Δ_k:

    θ_k = arccos(clip(cos(Δ_k, Δ̄), −1, 1)),   θ̄ = (1/K) Σ_k θ_k,
    ρ_k = sin(θ̄ − θ_k) / Σ_j sin(θ̄ − θ_j),    w ← w + κ_t Σ_k ρ_k Δ_k,

with κ_t = κ0 γ^t (the paper gives no schedule [UNCONF]; γ = 1 is a constant κ).

Aggregators receive pseudo-gradients u_k = −Δ_k. Flipping every vector flips Δ̄
too, so every cosine, θ_k and ρ_k is unchanged, and the output `κ_t Σ ρ_k u_k` is
the pseudo-gradient of the paper's step (apply it with `optax.sgd(1.0)`).

Numerical hazard: Σ_j (θ̄ − θ_j) = 0 exactly, so Σ_j sin(θ̄ − θ_j) ≈ −(1/6) Σ d_j³
is small with no fixed sign and ρ_k is typically far outside [0, 1] (θ = (0.1,
0.2, 0.6) gives ρ ≈ (66.6, 33.5, −99.1)); the κ_t factor is then what keeps the
step in range. Guards: a zero-norm update (or a zero mean) gets θ = 0; when
|Σ sin| < `eps_den` (e.g. all updates parallel: 0/0) the weights fall back to
ρ = p, and the state counts how often. The weights ρ are reported as metrics.

Released-code rule [CODE] (`kuramoto_code`): with a scalar phase φ_k per client,
w_avg = Σ p_k w_k and S = (1/(K−1)) Σ_i Σ_{j≠i} cos(φ_j − φ_i)(w_j − w_avg),
clamped elementwise to ±`clamp`, the new model is w_avg + K_t S with K_t = 0.3.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import REDUCER, Aggregator, compute_dtype


class KuramotoState(NamedTuple):
  """State of `kuramoto` / `kuramoto_code`.

  Attributes:
    step: int32 number of aggregations done (t in κ_t = κ0 γ^t).
    fallbacks: int32 number of aggregations whose weights fell back to ρ = p.
    metrics: the last aggregation's `kappa`, `fallback` (0/1), `fallbacks`
      (running count), `rho_min`, `rho_max` over present clients and, when the
      population size N is given to `init`, `rho` [N] and `theta` [N]: each
      client's weight and phase at its latest participation (by client id).
  """

  step: jax.Array
  fallbacks: jax.Array
  metrics: dict


def _normalized_weights(weights, num, dtype=jnp.float32):
  w = (jnp.ones((num,), dtype) if weights is None else weights).astype(dtype)
  present = w > 0
  total = jnp.sum(w)
  return w / jnp.where(total > 0, total, 1.0), present


def _client_dots(updates, vector) -> jax.Array:
  """`[C]` inner products of each client's slice with one params-shaped vector."""
  parts = [jnp.sum((x * v[None]).reshape(x.shape[0], -1), axis=1)
           for x, v in zip(jax.tree.leaves(updates), jax.tree.leaves(vector))]
  return sum(parts[1:], parts[0])


def kuramoto_weights(updates, weights, eps_den: float = 1e-6):
  """The paper's synchronization weights.

  Args:
    updates: leaves `[C, ...]` (updates or pseudo-gradients; the result is the same).
    weights: `[C]` example weights (0 = absent client).
    eps_den: fallback threshold on |Σ_j sin(θ̄ − θ_j)|.

  Returns:
    `(rho [C], theta [C], fallback bool)`; absent clients get ρ = 0 and θ = 0.
  """
  num = jax.tree.leaves(updates)[0].shape[0]
  dtype = compute_dtype(updates)
  p, present = _normalized_weights(weights, num, dtype)
  mean_update = tree_lib.client_weighted_sum(updates, p)
  dots = _client_dots(updates, mean_update).astype(dtype)
  norms = jnp.sqrt(jnp.maximum(tree_lib.client_sq_norms(updates), 0.0)).astype(dtype)
  mean_norm = tree_lib.tree_norm(mean_update).astype(dtype)
  denom = norms * mean_norm
  valid = present & (denom > 0)
  cosine = jnp.where(valid, dots / jnp.where(valid, denom, 1.0), 1.0)
  theta = jnp.where(valid, jnp.arccos(jnp.clip(cosine, -1.0, 1.0)), 0.0)
  count = jnp.maximum(jnp.sum(present), 1)
  mean_theta = jnp.sum(jnp.where(present, theta, 0.0)) / count
  sines = jnp.where(present, jnp.sin(mean_theta - theta), 0.0)
  total = jnp.sum(sines)
  fallback = jnp.abs(total) < eps_den
  rho = jnp.where(fallback, p, sines / jnp.where(fallback, 1.0, total))
  return jnp.where(present, rho, 0.0), theta, fallback


def kuramoto(kappa: float = 0.005, decay: float = 1.0, eps_den: float = 1e-6) -> Aggregator:
  """Kuramoto-FedAvg's phase-weighted reducer (arXiv 2505.19605), usable with any algorithm.

  Example:
    >>> algorithm = fed_avg(model.loss, optax.sgd(0.01), aggregator=kuramoto(0.005))

  Args:
    kappa: coupling κ0 > 0 (paper's best 0.005; 0.3 degrades).
    decay: γ in κ_t = κ0 γ^t, 0 < γ ≤ 1 [UNCONF: the paper gives no schedule].
    eps_den: when |Σ_j sin(θ̄ − θ_j)| < eps_den the weights fall back to ρ = p.
  """
  # κ0 and γ may be traced scalars (a `Sweep` over kappa); only numbers are checked.
  if isinstance(kappa, (int, float)) and not kappa > 0:
    raise ValueError(f'kuramoto kappa must be > 0, got {kappa!r}')
  if isinstance(decay, (int, float)) and not 0 < decay <= 1:
    raise ValueError(f'kuramoto decay must be in (0, 1], got {decay!r}')
  if not eps_den >= 0:
    raise ValueError(f'kuramoto eps_den must be >= 0, got {eps_den!r}')

  def init(params, num_clients=None):
    dtype = compute_dtype(params)
    z = jnp.zeros((), jnp.int32)
    metrics = {'kappa': jnp.asarray(kappa, dtype), 'fallback': z, 'fallbacks': z,
               'rho_min': jnp.zeros((), dtype), 'rho_max': jnp.zeros((), dtype)}
    if num_clients is not None:
      metrics['rho'] = jnp.zeros((num_clients,), dtype)
      metrics['theta'] = jnp.zeros((num_clients,), dtype)
    return KuramotoState(step=z, fallbacks=z, metrics=metrics)

  def apply(updates, weights, state, key=None, client_ids=None):
    del key
    rho, theta, fallback = kuramoto_weights(updates, weights, eps_den)
    dtype = rho.dtype
    kappa_t = (jnp.asarray(kappa, dtype)
               * jnp.asarray(decay, dtype) ** state.step.astype(dtype))
    out = tree_lib.client_weighted_sum(updates, kappa_t * rho)
    fallbacks = state.fallbacks + fallback.astype(jnp.int32)
    present = (weights > 0) if weights is not None else jnp.ones(rho.shape, bool)
    metrics = {'kappa': kappa_t, 'fallback': fallback.astype(jnp.int32), 'fallbacks': fallbacks,
               'rho_min': jnp.min(jnp.where(present, rho, jnp.inf)),
               'rho_max': jnp.max(jnp.where(present, rho, -jnp.inf))}
    if 'rho' in state.metrics:
      ids = (jnp.arange(rho.shape[0], dtype=jnp.int32) if client_ids is None else client_ids)
      for name, value in (('rho', rho), ('theta', theta)):
        metrics[name] = tree_lib.scatter_clients(state.metrics[name], ids, value, present)
    return out, KuramotoState(step=state.step + 1, fallbacks=fallbacks, metrics=metrics)

  return Aggregator(init, apply, REDUCER, 'kuramoto')


def kuramoto_code(coupling: float = 0.3, clamp: float = 1e3, phase_scale: float = 1.0) -> Aggregator:
  """The authors' released-code Kuramoto rule [CODE], a separate aggregator.

  In pseudo-gradients (u_k = w − w_k, ū = Σ p_k u_k): w_j − w_avg = ū − u_j, so the
  output is `ū − K_t · clip(S, ±clamp)` with
  `S = (1/(K−1)) Σ_j (Σ_{i≠j} cos(φ_j − φ_i)) (ū − u_j)`.

  Deviation: the released code's phase φ_k is the client's mean per-batch gradient
  norm, which an aggregator (it sees only updates) cannot observe. Here
  `φ_k = phase_scale · ‖u_k‖`; for K plain-SGD steps of size η, `phase_scale =
  1/(η K)` makes φ_k the norm of the client's mean gradient (a lower bound of the
  mean per-batch norm). Only phase differences matter.

  Args:
    coupling: K_t (0.3 in the released code).
    clamp: elementwise bound on S (1e3 in the released code).
    phase_scale: φ_k = phase_scale · ‖u_k‖.
  """
  for label, value in (('coupling', coupling), ('clamp', clamp), ('phase_scale', phase_scale)):
    if not value > 0:
      raise ValueError(f'kuramoto_code {label} must be > 0, got {value!r}')

  def init(params, num_clients=None):
    del num_clients
    z = jnp.zeros((), jnp.int32)
    return KuramotoState(step=z, fallbacks=z,
                         metrics={'kappa': jnp.asarray(coupling, compute_dtype(params))})

  def apply(updates, weights, state, key=None, client_ids=None):
    del key, client_ids
    num = jax.tree.leaves(updates)[0].shape[0]
    dtype = compute_dtype(updates)
    p, present = _normalized_weights(weights, num, dtype)
    mean_update = tree_lib.client_weighted_sum(updates, p)
    sq_norms = tree_lib.client_sq_norms(updates).astype(dtype)
    phase = phase_scale * jnp.sqrt(jnp.maximum(sq_norms, 0.0))
    pair = present[:, None] & present[None, :] & ~jnp.eye(num, dtype=bool)
    couplings = jnp.sum(jnp.where(pair, jnp.cos(phase[:, None] - phase[None, :]), 0.0), axis=0)
    count = jnp.sum(present.astype(dtype))
    coef = couplings / jnp.maximum(count - 1.0, 1.0)
    # S = Σ_j coef_j (ū − u_j) = (Σ_j coef_j) ū − Σ_j coef_j u_j
    weighted = tree_lib.client_weighted_sum(updates, coef)
    total_coef = jnp.sum(coef)
    sync = jax.tree.map(lambda m, s: jnp.clip(total_coef.astype(m.dtype) * m - s, -clamp, clamp),
                        mean_update, weighted)
    out = jax.tree.map(lambda m, s: m - jnp.asarray(coupling, m.dtype) * s, mean_update, sync)
    metrics = {'kappa': jnp.asarray(coupling, dtype)}
    return out, KuramotoState(step=state.step + 1, fallbacks=state.fallbacks, metrics=metrics)

  return Aggregator(init, apply, REDUCER, 'kuramoto_code')
