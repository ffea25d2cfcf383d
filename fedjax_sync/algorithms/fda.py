"""Federated Dynamic Averaging (FDA) and fixed-period averaging, step by step.

Theologitis et al. 2024, "Communication-Efficient Distributed Deep Learning via
Federated Dynamic Averaging", arXiv 2405.20988. K workers train from the last
synchronized model w0, each on its own data, keeping their local optimizer state
across synchronizations. After every local step each worker sends a small local
state (see `fda_estimators`); the workers synchronize iff the estimate of the
model variance exceeds Θ (the round terminating condition, RTC). A synchronization
averages the workers' models (plainly, or weighted by ‖u_k‖²), applies an optional
server optimizer to the averaged pseudo-gradient `w0 − w̄`, and broadcasts.

The same harness runs the fixed-interval baselines: synchronize every τ steps
(local SGD = FedAvg with τ local steps and full participation; FedAvgM and FedAdam
apply their server optimizer at each synchronization).

Every algorithm here accepts an `aggregator` (compression, clipping, DP, secure
aggregation, robust reducers, chains): at a synchronization it reduces the
workers' pseudo-gradients `w0 − w_k` with the worker weights (1/K, or ∝ ‖u_k‖²)
as its weights; its state persists in `AveragingState.aggregator_state`.

Everything is a pure function of pytrees: `step(state, batch, mask, key)` runs one
local step of all K workers (vmapped / sharded via `map_clients`), the estimate and
the conditional synchronization (`lax.cond`); the driver `run_averaging`
(`fedjax_sync.simulate.averaging`, also importable from here) scans it over a block
of steps in one compiled program, compiled once per block length.

Example:
  >>> model = fedjax_sync.models.logistic_regression((60,), 10)
  >>> algorithm = fda(model.loss, optax.sgd(0.05), num_workers=5, threshold=0.5,
  ...                 estimator='linear')
  >>> result = run_averaging(algorithm, model, data, num_steps=500, batch_size=32)
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sync import communication
from fedjax_sync import tree as tree_lib
from fedjax_sync.aggregators.base import (Aggregator, aggregator_metrics, compute_dtype,
                                          validate_aggregator, weighted_sum_via)
from fedjax_sync.algorithms.fda_estimators import (VarianceEstimator, get_estimator,
                                                   true_variance)
from fedjax_sync.clients.execution import ClientExecution, map_clients, shard_client_axis
from fedjax_sync.clients.local import make_local_step
from fedjax_sync.types import Params, PyTree

WEIGHTINGS = ('plain', 'drift')


class AveragingState(NamedTuple):
  """State of K workers between local steps.

  Attributes:
    params: `[K, ...]` the workers' models w_k.
    opt_state: `[K, ...]` the workers' local optimizer states.
    anchor: `[...]` the last synchronized model w0.
    server_opt_state: the server optimizer's state (applied at synchronizations).
    estimator_state: the variance estimator's state (ξ, sketch hashes, ...).
    step: int32, local steps taken.
    num_syncs: int32, synchronizations so far.
    threshold: Θ of the RTC in the params' float dtype (a value, not a constant of
      the program, so a grid of thresholds and seeds shares one compiled program);
      ∞ when periodic.
    aggregator_state: the synchronization aggregator's state (`()` without one);
      per-worker state (a top-k residual) is `[K, ...]`, indexed by worker.
  """

  params: Params
  opt_state: PyTree
  anchor: Params
  server_opt_state: PyTree
  estimator_state: PyTree
  step: jax.Array
  num_syncs: jax.Array
  threshold: jax.Array
  aggregator_state: PyTree = ()


class AveragingAlgorithm(NamedTuple):
  """A step-level averaging algorithm (FDA or fixed-period).

  Attributes:
    init: `init(params, threshold=None) -> AveragingState` (all workers start at
      `params`; `threshold` overrides the algorithm's Θ).
    step: `step(state, batch {[K, B, ...]}, mask [K, B], key) -> (state, metrics)`;
      metrics: `estimate`, `variance` (true, before any sync), `synced` (bool),
      `loss` (example-weighted mean training loss of the step).
    cost: `cost(params) -> communication.CommunicationCost`, static byte counts.
    num_workers: K.
    name: e.g. 'fda-linear(Θ=0.5)'.
  """

  init: Callable[[Params], AveragingState]
  step: Callable[..., tuple[AveragingState, dict]]
  cost: Callable[[Params], communication.CommunicationCost]
  num_workers: int
  name: str


def dynamic_averaging(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                      num_workers: int, estimator: VarianceEstimator | str | None = None,
                      threshold: float | None = None, period: int | None = None,
                      server_optimizer: optax.GradientTransformation | None = None,
                      weighting: str = 'plain', reset_optimizer_on_sync: bool = False,
                      track_variance: bool = True, simulation_shortcut: bool = False,
                      aggregator: Aggregator | None = None,
                      execution: ClientExecution = ClientExecution(),
                      name: str | None = None) -> AveragingAlgorithm:
  """Step-level model averaging of K workers with a dynamic or periodic trigger.

  Give either `estimator` and `threshold` (FDA: synchronize iff Est > Θ after a
  step; arXiv 2405.20988, Algorithm 1) or `period` (synchronize after every τ-th
  step). With Θ = 0 the workers synchronize after every step in which they moved;
  with Θ = ∞ never.

  Args:
    loss_fn: per-example loss `(params, batch, key) -> [B]`.
    optimizer: the workers' local optax optimizer; its state is kept across
      synchronizations unless `reset_optimizer_on_sync`.
    num_workers: K.
    estimator: a `VarianceEstimator` or a name ('naive', 'naive_per_layer',
      'linear', 'sketch').
    threshold: Θ ≥ 0 (may be `math.inf`).
    period: τ ≥ 1, for fixed-period averaging.
    server_optimizer: optax transform applied at each synchronization to the
      averaged pseudo-gradient `w0 − w̄` (default `optax.sgd(1.0)`: w0 ← w̄).
    weighting: 'plain' (w̄ = mean_k w_k) or 'drift' (weights ∝ ‖u_k‖², plain when
      no worker moved).
    reset_optimizer_on_sync: restart the local optimizer states at each sync.
    track_variance: also compute the true variance each step (a simulation-only
      metric costing about as much as the naive estimator; off for benchmarks).
    simulation_shortcut: compute Est with the estimator's `estimate_from_drifts`
      when it has one (the sketch: one sketch of ū instead of K); the decisions and
      the bytes counted are unchanged, only the simulation is cheaper.
    aggregator: optional reducer of the workers' pseudo-gradients `u_k = w0 − w_k`
      at each synchronization, with the worker weights ρ_k (1/K, or ∝ ‖u_k‖² with
      'drift'; Σ ρ = 1) as its weights: the averaged pseudo-gradient becomes
      `A(u; ρ)` (`weighted_mean()` gives `w0 − w̄`). Client ids are worker indices
      0..K−1 (per-worker state such as a top-k residual is `[K, ...]`); the key
      is `fold_in(step key, K)`. Its metrics are reported every step as
      `aggregator/<stage>/<name>` (the values of the last synchronization). The
      counted bytes stay those of full-precision models.
    execution: how the K workers' steps are mapped (vmap / chunked / sequential,
      sharded over a 'clients' mesh; K must divide by the device count).
    name: the algorithm's name.

  Returns:
    an `AveragingAlgorithm`.
  """
  if not isinstance(num_workers, int) or num_workers < 1:
    raise ValueError(f'num_workers must be a positive integer, got {num_workers!r}')
  if weighting not in WEIGHTINGS:
    raise ValueError(f'unknown weighting {weighting!r}; valid: {", ".join(WEIGHTINGS)}')
  dynamic = estimator is not None or threshold is not None
  if dynamic == (period is not None):
    raise ValueError('give either estimator and threshold (FDA) or period (fixed-interval), '
                     f'got estimator={estimator!r}, threshold={threshold!r}, period={period!r}')
  if dynamic:
    if estimator is None or threshold is None:
      raise ValueError('FDA needs both estimator and threshold, got '
                       f'estimator={estimator!r}, threshold={threshold!r}')
    if isinstance(estimator, str):
      estimator = get_estimator(estimator)
    if not (isinstance(threshold, (int, float)) and threshold >= 0):
      raise ValueError(f'threshold must be a number ≥ 0 (math.inf allowed), got {threshold!r}')
  elif not isinstance(period, int) or period < 1:
    raise ValueError(f'period must be a positive integer, got {period!r}')
  execution = execution.validate()
  if aggregator is not None:
    aggregator = validate_aggregator(aggregator)
  server_optimizer = server_optimizer or optax.sgd(1.0)
  local_step = make_local_step(loss_fn, optimizer)
  default_threshold = float(threshold) if dynamic else math.inf
  if name is None:
    name = f'fda-{estimator.name}(Θ={threshold:g})' if dynamic else f'periodic(τ={period})'

  def stack(tree):
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_workers,) + jnp.shape(x)), tree)

  def init(params, threshold=None):
    if threshold is None:
      threshold = default_threshold
    elif not dynamic:
      raise ValueError('a threshold applies to FDA only, not to fixed-period averaging')
    elif not (isinstance(threshold, (int, float)) and threshold >= 0):
      raise ValueError(f'threshold must be a number ≥ 0 (math.inf allowed), got {threshold!r}')
    return AveragingState(
        params=stack(params), opt_state=stack(optimizer.init(params)), anchor=params,
        server_opt_state=server_optimizer.init(params),
        estimator_state=estimator.init(params) if dynamic else (),
        step=jnp.zeros((), jnp.int32), num_syncs=jnp.zeros((), jnp.int32),
        threshold=jnp.asarray(threshold, compute_dtype(params)),
        aggregator_state=(aggregator.init(params, num_workers) if aggregator is not None
                          else ()))

  def cost(params):
    floats = estimator.num_floats(params) if dynamic else 0
    return communication.averaging_cost(params, num_workers, floats)

  def synchronize(state: AveragingState, params, opt_state, key):
    if weighting == 'drift':
      drift_sq = tree_lib.client_sq_norms(
          jax.tree.map(lambda w, a: w - a[None], params, state.anchor))
      total = jnp.sum(drift_sq)
      weights = jnp.where(total > 0, drift_sq / jnp.where(total > 0, total, 1.0),
                          jnp.full_like(drift_sq, 1.0 / num_workers))
    else:
      weights = jnp.full((num_workers,), 1.0 / num_workers, compute_dtype(state.anchor))
    aggregator_state = state.aggregator_state
    if aggregator is None:
      average = tree_lib.client_weighted_sum(params, weights)
      pseudo_gradient = tree_lib.tree_sub(state.anchor, average)
    else:
      worker_updates = jax.tree.map(lambda a, w: a[None] - w, state.anchor, params)
      pseudo_gradient, aggregator_state = weighted_sum_via(
          aggregator, worker_updates, weights, aggregator_state, key,
          jnp.arange(num_workers, dtype=jnp.int32))
    updates, server_opt_state = server_optimizer.update(
        pseudo_gradient, state.server_opt_state, state.anchor)
    anchor = optax.apply_updates(state.anchor, updates)
    estimator_state = (estimator.update(state.estimator_state, state.anchor, anchor)
                       if dynamic else state.estimator_state)
    new_params = shard_client_axis(stack(anchor), execution.mesh)
    if reset_optimizer_on_sync:
      opt_state = shard_client_axis(stack(optimizer.init(anchor)), execution.mesh)
    return new_params, opt_state, anchor, server_opt_state, estimator_state, aggregator_state

  def step(state: AveragingState, batch, mask, key):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num_workers))
    inputs = shard_client_axis((state.params, state.opt_state, batch, mask, keys),
                               execution.mesh)
    params, opt_state, step_metrics = map_clients(
        lambda p, o, b, m, k: local_step(p, o, b, m, k), inputs, execution,
        client_bytes=communication.model_bytes((state.params, state.opt_state)) // num_workers)
    drifts = jax.tree.map(lambda w, a: w - a[None], params, state.anchor)
    metrics = {}
    if dynamic and simulation_shortcut and estimator.estimate_from_drifts is not None:
      est = estimator.estimate_from_drifts(drifts, state.estimator_state)
    elif dynamic:
      local_states = jax.vmap(estimator.local_state, in_axes=(0, None))(
          drifts, state.estimator_state)
      est = estimator.estimate(local_states, state.estimator_state)
    if dynamic:
      do_sync = est > state.threshold
      metrics['estimate'] = est
    else:
      do_sync = (state.step + 1) % period == 0
    if track_variance:
      metrics['variance'] = true_variance(drifts)
    keep = (params, opt_state, state.anchor, state.server_opt_state, state.estimator_state,
            state.aggregator_state)
    params, opt_state, anchor, server_opt_state, estimator_state, aggregator_state = (
        jax.lax.cond(do_sync, lambda: synchronize(state, params, opt_state,
                                                  jax.random.fold_in(key, num_workers)),
                     lambda: keep))
    examples = jnp.sum(step_metrics.num_examples)
    metrics['loss'] = jnp.sum(step_metrics.loss_sum) / jnp.maximum(examples, 1)
    metrics['synced'] = do_sync
    metrics.update({f'aggregator/{k}': v for k, v in aggregator_metrics(aggregator_state).items()})
    new_state = AveragingState(
        params=params, opt_state=opt_state, anchor=anchor, server_opt_state=server_opt_state,
        estimator_state=estimator_state, step=state.step + 1,
        num_syncs=state.num_syncs + do_sync.astype(jnp.int32), threshold=state.threshold,
        aggregator_state=aggregator_state)
    return new_state, metrics

  return AveragingAlgorithm(init=init, step=step, cost=cost, num_workers=num_workers, name=name)


def fda(loss_fn: Callable, optimizer: optax.GradientTransformation, *, num_workers: int,
        threshold: float, estimator: VarianceEstimator | str = 'linear',
        **kwargs) -> AveragingAlgorithm:
  """Federated Dynamic Averaging (arXiv 2405.20988): synchronize iff Est > Θ.

  See `dynamic_averaging` for the options (weighting, server optimizer, mesh).
  """
  return dynamic_averaging(loss_fn, optimizer, num_workers=num_workers, estimator=estimator,
                           threshold=threshold, **kwargs)


def local_sgd(loss_fn: Callable, optimizer: optax.GradientTransformation, *, num_workers: int,
              period: int, **kwargs) -> AveragingAlgorithm:
  """FedAvg with every-τ-steps synchronization and full participation (local SGD;
  McMahan et al. 2017, arXiv 1602.05629): w0 ← mean_k w_k every τ steps."""
  return dynamic_averaging(loss_fn, optimizer, num_workers=num_workers, period=period,
                           name=kwargs.pop('name', f'fedavg(τ={period})'), **kwargs)


def periodic_fed_avg_m(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                       num_workers: int, period: int, server_learning_rate: float = 1.0,
                       server_momentum: float = 0.9, **kwargs) -> AveragingAlgorithm:
  """FedAvgM (Hsu et al. 2019, arXiv 1909.06335) every τ steps: server momentum on the
  averaged pseudo-gradient."""
  return dynamic_averaging(
      loss_fn, optimizer, num_workers=num_workers, period=period,
      server_optimizer=optax.sgd(server_learning_rate, momentum=server_momentum),
      name=kwargs.pop('name', f'fedavgm(τ={period})'), **kwargs)


def periodic_fed_adam(loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                      num_workers: int, period: int, server_learning_rate: float = 0.01,
                      b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3,
                      **kwargs) -> AveragingAlgorithm:
  """FedAdam (Reddi et al. 2021, arXiv 2003.00295, Algorithm 2) every τ steps."""
  from fedjax_sync.algorithms.fed_opt import server_adaptive
  return dynamic_averaging(
      loss_fn, optimizer, num_workers=num_workers, period=period,
      server_optimizer=server_adaptive('adam', server_learning_rate, b1, b2, tau),
      name=kwargs.pop('name', f'fedadam(τ={period})'), **kwargs)


# The driver lives in `fedjax_sync.simulate.averaging` (algorithms/ holds algorithms
# only); these names stay importable from here. Imported last: the simulate package
# imports the algorithm registry, which may import this module.
from fedjax_sync.simulate.averaging import (AveragingResult, make_block,  # noqa: E402,F401
                                            overestimate_ratio, run_averaging,
                                            sample_worker_batches)
