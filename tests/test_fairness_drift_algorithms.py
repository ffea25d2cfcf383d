"""q-FFL, AFL, FedNova, FedDyn, Mime and MimeLite against numpy oracles of their papers.

Every test runs in float64 (`jax.enable_x64`, so an oracle agrees to ~1e-12 and a
float32 scalar on the way would fail) on a linear regression `½(x·w − y)²` with
three clients of unequal sizes (2, 2 and 3 local steps of batch 2), two rounds, a
client sampled twice (its persistent state is read back). The oracles are plain
per-client numpy loops written from the papers' update rules. Equivalences:
q-FedAvg with q = 0 is the unweighted mean of FedAvg's local models; FedNova with
equal local steps is FedAvg.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sync import aggregators as agg
from fedjax_sync.algorithms import (Hyperparameters, afl, build_algorithm, fed_avg, fed_dyn,
                                    fed_nova, mime, project_to_simplex, q_ffl)
from fedjax_sync.data.batching import client_batch_from_arrays

D = 3
POPULATION = 5
LR = 0.1
BATCH = 2
ROUNDS = (([3, 0, 4], 0), ([1, 3, 2], 1))   # (client ids, data seed); client 3 twice
SIZES = (4, 3, 5)                          # 2, 2 and 3 local steps of batch 2
TOL = dict(rtol=1e-11, atol=1e-12)
W0 = np.array([0.3, -0.2, 0.5])


def _loss(params, batch, key):
  del key
  return 0.5 * jnp.square(batch['x'] @ params['w'] - batch['y'])


def _client_data(seed, sizes=SIZES):
  rng = np.random.default_rng(100 + seed)
  out = []
  for i, n in enumerate(sizes):
    x = rng.normal(size=(n, D))
    y = x @ (np.arange(1, D + 1) * (i - 1.0)) + rng.normal(size=n)
    out.append((x, y))
  return out


def _batch(ids, seed, sizes=SIZES):
  data = _client_data(seed, sizes)
  batch = client_batch_from_arrays([{'x': x, 'y': y} for x, y in data], batch_size=BATCH)
  return batch._replace(client_ids=jnp.asarray(ids, jnp.int32))


def _grad(w, x, y):
  """Gradient of the mean loss over the examples (x [n, D], y [n])."""
  return x.T @ (x @ w - y) / len(y)


def _mean_loss(w, x, y):
  return float(np.mean(0.5 * (x @ w - y) ** 2))


def _batches(x, y):
  return [(x[s:s + BATCH], y[s:s + BATCH]) for s in range(0, len(y), BATCH)]


def _local_sgd(w, x, y, lr=LR, momentum=0.0, correction=None):
  """Local SGD (optax's heavy ball: m ← g + β m, step −lr·m) over the client's batches
  in order; `correction(y, xb, yb, g)` may change each step's gradient."""
  v, m = w.copy(), np.zeros_like(w)
  for xb, yb in _batches(x, y):
    g = _grad(v, xb, yb)
    if correction is not None:
      g = correction(v, xb, yb, g)
    m = g + momentum * m
    v = v - lr * m
  return v


def _run(algorithm, rounds=ROUNDS, sizes=SIZES, init_state=None):
  """Two jitted rounds (one compilation); the states after each."""
  state = init_state if init_state is not None else algorithm.init({'w': jnp.asarray(W0)})
  step = jax.jit(algorithm.round)
  states = []
  for ids, seed in rounds:
    state, metrics = step(state, _batch(ids, seed, sizes), jax.random.key(seed))
    assert state.params['w'].dtype == jnp.float64
    states.append(state)
  for leaf in jax.tree.leaves((state.opt_state, state.client_states, state.extra)):
    assert leaf.dtype != jnp.float32, algorithm.name
  return states, metrics


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


# ------------------------------------------------------------------------- q-FFL

def _q_ffl_oracle(q):
  w, out = W0.copy(), []
  for _, seed in ROUNDS:
    deltas, hs = [], []
    for x, y in _client_data(seed):
      f = _mean_loss(w, x, y) + 1e-10
      dw = (w - _local_sgd(w, x, y)) / LR          # L (w − w̄_k), L = 1/lr
      deltas.append(f ** q * dw)
      hs.append(q * f ** (q - 1) * dw @ dw + f ** q / LR)
    w = w - np.sum(deltas, axis=0) / np.sum(hs)
    out.append(w.copy())
  return out


def test_q_ffl_matches_algorithm_2():
  states, _ = _run(q_ffl(_loss, LR, q=2.0))
  for state, want in zip(states, _q_ffl_oracle(2.0)):
    np.testing.assert_allclose(np.asarray(state.params['w']), want, **TOL)


def test_q_ffl_with_q_0_is_the_unweighted_mean_of_fedavg_local_models():
  """q = 0: `w − Σ L(w − w̄_k) / (K L)` = mean_k w̄_k, FedAvg's local models averaged 1/K."""
  fair, _ = _run(q_ffl(_loss, LR, q=0.0))
  plain, _ = _run(fed_avg(_loss, optax.sgd(LR), aggregator=agg.mean()))
  for a, b, want in zip(fair, plain, _q_ffl_oracle(0.0)):
    np.testing.assert_allclose(np.asarray(a.params['w']), np.asarray(b.params['w']), **TOL)
    np.testing.assert_allclose(np.asarray(a.params['w']), want, **TOL)
  x, y = zip(*_client_data(ROUNDS[0][1]))
  local = [_local_sgd(W0, xi, yi) for xi, yi in zip(x, y)]
  np.testing.assert_allclose(np.asarray(fair[0].params['w']), np.mean(local, axis=0), **TOL)


# ----------------------------------------------------------------------- FedNova

def _fed_nova_oracle(momentum, server_lr):
  w, out = W0.copy(), []
  for _, seed in ROUNDS:
    data = _client_data(seed)
    n = np.array([len(y) for _, y in data], float)
    p = n / n.sum()
    tau = np.array([len(_batches(x, y)) for x, y in data], float)
    # ‖a_i‖₁ of heavy-ball local SGD: Σ_{k=1..τ} (1 − ρ^k)/(1 − ρ) (τ for plain SGD).
    norms = np.array([sum((1 - momentum ** k) / (1 - momentum) for k in range(1, int(t) + 1))
                      for t in tau])
    d = [(w - _local_sgd(w, x, y, momentum=momentum)) / a for (x, y), a in zip(data, norms)]
    w = w - server_lr * (p @ norms) * np.sum([pi * di for pi, di in zip(p, d)], axis=0)
    out.append(w.copy())
  return out


def test_fed_nova_matches_normalized_averaging_with_unequal_steps():
  momentum, server_lr = 0.5, 0.7   # local heavy ball: ‖a_i‖₁ is not τ_i
  states, _ = _run(fed_nova(_loss, LR, momentum=momentum, server_learning_rate=server_lr))
  want = _fed_nova_oracle(momentum, server_lr)
  for state, expected in zip(states, want):
    np.testing.assert_allclose(np.asarray(state.params['w']), expected, **TOL)
  # With unequal steps FedNova is not FedAvg: the oracle would not catch a missing normalization.
  data = _client_data(ROUNDS[0][1])
  n = np.array([len(y) for _, y in data], float)
  fedavg = W0 - (n / n.sum()) @ np.stack([W0 - _local_sgd(W0, x, y, momentum=momentum)
                                          for x, y in data]) * server_lr
  assert np.max(np.abs(want[0] - fedavg)) > 1e-4


def test_fed_nova_with_equal_steps_is_fed_avg():
  equal = (4, 4, 4)
  nova, _ = _run(fed_nova(_loss, LR), sizes=equal)
  plain, _ = _run(fed_avg(_loss, optax.sgd(LR)), sizes=equal)
  for a, b in zip(nova, plain):
    np.testing.assert_allclose(np.asarray(a.params['w']), np.asarray(b.params['w']), **TOL)


# ------------------------------------------------------------------------ FedDyn

def test_fed_dyn_matches_algorithm_1():
  alpha = 0.3
  states, _ = _run(fed_dyn(_loss, LR, alpha=alpha, num_clients=POPULATION))
  w, h, g = W0.copy(), np.zeros(D), np.zeros((POPULATION, D))
  for (ids, seed), state in zip(ROUNDS, states):
    thetas = []
    for (x, y), k in zip(_client_data(seed), ids):
      # ∇ of L_k(θ) − ⟨g_k, θ⟩ + (α/2)‖θ − w‖².
      theta = _local_sgd(w, x, y, correction=lambda v, xb, yb, grad, k=k: (
          grad - g[k] + alpha * (v - w)))
      g[k] = g[k] - alpha * (theta - w)
      thetas.append(theta)
    h = h - alpha / POPULATION * np.sum([t - w for t in thetas], axis=0)
    w = np.mean(thetas, axis=0) - h / alpha
    np.testing.assert_allclose(np.asarray(state.params['w']), w, **TOL)
    np.testing.assert_allclose(np.asarray(state.extra.h['w']), h, **TOL)
    np.testing.assert_allclose(np.asarray(state.client_states['w']), g, **TOL)


# --------------------------------------------------------------------------- AFL

def _simplex_oracle(v):
  """Projection onto the simplex by bisection on the threshold θ: Σ max(v − θ, 0) = 1."""
  low, high = v.min() - 1.0, v.max()
  for _ in range(200):
    mid = 0.5 * (low + high)
    low, high = (mid, high) if np.maximum(v - mid, 0).sum() > 1 else (low, mid)
  return np.maximum(v - 0.5 * (low + high), 0)


def test_project_to_simplex_matches_bisection():
  rng = np.random.default_rng(0)
  project = jax.jit(project_to_simplex)
  for v in [rng.normal(size=4) * 3, np.array([0.2, 0.3, 0.4, 0.1]), np.array([5.0, -1, 0, 2])]:
    out = np.asarray(project(jnp.asarray(v)))
    np.testing.assert_allclose(out, _simplex_oracle(v), atol=1e-12)
    assert abs(out.sum() - 1) < 1e-12 and out.min() >= 0


@pytest.mark.parametrize('domain_update', ['projected', 'exponentiated'])
def test_afl_matches_domain_weighted_rounds(domain_update):
  domain_ids = np.array([0, 1, 0, 1, 1])   # round 1: clients 3, 0, 4 → domains 1, 0, 1
  gamma = 0.5
  states, _ = _run(afl(_loss, optax.sgd(LR), num_clients=POPULATION, domain_ids=domain_ids,
                       domain_learning_rate=gamma, domain_update=domain_update))
  w, lam = W0.copy(), np.array([0.5, 0.5])
  for (ids, seed), state in zip(ROUNDS, states):
    data = _client_data(seed)
    dom = domain_ids[ids]
    n = np.array([len(y) for _, y in data], float)
    per_domain = np.array([n[dom == d].sum() for d in range(2)])
    beta = lam[dom] * n / per_domain[dom]
    u = np.stack([w - _local_sgd(w, x, y) for x, y in data])
    loss_sums = np.array([_mean_loss(w, x, y) * len(y) for x, y in data])
    domain_loss = np.array([loss_sums[dom == d].sum() / per_domain[d] for d in range(2)])
    w = w - beta @ u / beta.sum()
    if domain_update == 'projected':
      lam = _simplex_oracle(lam + gamma * domain_loss)
    else:
      lam = lam * np.exp(gamma * domain_loss)
      lam = lam / lam.sum()
    np.testing.assert_allclose(np.asarray(state.params['w']), w, **TOL)
    np.testing.assert_allclose(np.asarray(state.extra.domain_weights), lam, **TOL)
  assert lam.max() > 0.5   # the domain weights moved


def test_afl_refuses_bad_domains():
  with pytest.raises(ValueError, match='domain_ids must be 5 integers'):
    afl(_loss, optax.sgd(LR), num_clients=POPULATION, domain_ids=[0, 1])
  with pytest.raises(ValueError, match='domain_update must be one of projected, exponentiated'):
    afl(_loss, optax.sgd(LR), num_clients=POPULATION, domain_update='mirror')
  with pytest.raises(ValueError, match='needs num_clients'):
    afl(_loss, optax.sgd(LR))


# ------------------------------------------------------------------ Mime, MimeLite

@pytest.mark.parametrize('lite', [False, True])
def test_mime_matches_frozen_server_momentum(lite):
  beta, server_lr = 0.6, 0.8
  states, metrics = _run(mime(_loss, LR, momentum=beta, server_learning_rate=server_lr,
                              lite=lite))
  w, m = W0.copy(), np.zeros(D)
  for (_, seed), state in zip(ROUNDS, states):
    data = _client_data(seed)
    n = np.array([len(y) for _, y in data], float)
    c = (n / n.sum()) @ np.stack([_grad(w, x, y) for x, y in data])   # full batch at x
    x0 = w.copy()

    def step(v, xb, yb, g):
      corrected = g if lite else g - _grad(x0, xb, yb) + c
      # The paper's momentum form, with the server's m frozen (never updated locally).
      return (1 - beta) * corrected + beta * m

    local = [_local_sgd(w, x, y, correction=step) for x, y in data]
    w = w - server_lr * (n / n.sum()) @ np.stack([w - v for v in local])
    m = (1 - beta) * c + beta * m
    np.testing.assert_allclose(np.asarray(state.params['w']), w, **TOL)
    np.testing.assert_allclose(np.asarray(state.extra.control['w']), c, **TOL)
    momentum = [x for x in jax.tree.leaves(state.extra.base_state) if x.shape == (D,)]
    np.testing.assert_allclose(np.asarray(momentum[0]), m, **TOL)
  # 3 clients. Up: update and gradient; down: model, momentum (D float64 values and the
  # ema's int32 step count) and, for Mime only, c.
  assert float(metrics['bytes_up']) == 3 * 2 * D * 8
  assert float(metrics['bytes_down']) == 3 * ((2 if lite else 3) * D * 8 + 4)


def test_registry_builds_each_with_its_hyperparameters():
  h = Hyperparameters(client_learning_rate=LR, q=0.0, feddyn_alpha=0.3, server_momentum=0.6)
  for name in ('qffl', 'fednova', 'feddyn', 'afl', 'mime', 'mimelite'):
    algorithm = build_algorithm(name, _loss, h, num_clients=POPULATION)
    assert algorithm.name == name
  with pytest.raises(ValueError, match='hyperparameter q = -1'):
    from fedjax_sync.algorithms import resolve_hyperparameters
    resolve_hyperparameters('qffl', overrides={'q': '-1'})
