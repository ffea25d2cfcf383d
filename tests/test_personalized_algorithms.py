"""APFL, pFedMe, Per-FedAvg, IFCA and HypCluster against numpy oracles of their papers'
updates on a tiny linear-regression model; IFCA/HypCluster with one cluster ≡ FedAvg.

The model is `ŷ = x·w + b` with per-example loss `½(ŷ − y)²`; with θ = [w; b] and
X̃ = [X, 1] the masked batch gradient is `X̃ᵀ(X̃θ − y)/n` and the Hessian `X̃ᵀX̃/n`,
so every oracle below is a few lines of numpy in float64. Every test runs with
`jax_enable_x64` (float64 params and data), so a round agrees with its oracle to
~1e-12 and a float32 scalar on the way (≈1e-8 error) fails: these are also the
float64 references of the five registered algorithms (tests/test_float64.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_sync.algorithms import (Hyperparameters, apfl, build_algorithm, client_models,
                                    fed_avg, hyp_cluster, ifca, initial_clusters, per_fed_avg,
                                    pfedme, resolve_hyperparameters)
from fedjax_sync.algorithms.per_fed_avg import one_step_personalization
from fedjax_sync.data.batching import client_batch_from_arrays

D = 3
POPULATION = 5
BATCH = 2
RTOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


def _all_float64(state):
  """No float32 leaf in the state: a float32 scalar on the way would have demoted one."""
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float64 for x in floats)


def _loss(params, batch, key):
  del key
  prediction = batch['x'] @ params['w'] + params['b']
  return 0.5 * jnp.square(prediction - batch['y'])


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {'w': jnp.asarray(rng.normal(size=D), jnp.float64),
          'b': jnp.asarray(rng.normal(size=1), jnp.float64)}


def _theta(params):
  return np.concatenate([np.asarray(params['w'], np.float64), np.asarray(params['b'], np.float64)])


def _clients(seed, sizes=(4, 3, 4), shift=None):
  """Per-client examples; client c's targets come from its own linear map."""
  rng = np.random.default_rng(100 + seed)
  out = []
  for c, n in enumerate(sizes):
    x = rng.normal(size=(n, D))
    slope = (shift[c] if shift is not None else c) * np.ones(D) + rng.normal(size=D) * 0.1
    y = x @ slope + 0.5
    out.append({'x': x, 'y': y})
  return out


def _batch(clients, ids, num_steps=None):
  batch = client_batch_from_arrays(clients, batch_size=BATCH, num_steps=num_steps)
  return batch._replace(client_ids=jnp.asarray(ids, jnp.int32))


def _steps(example, num_steps=None):
  """The (X̃, y) of each local step of one client (the engine's layout: batches in order)."""
  x = np.concatenate([example['x'], np.ones((len(example['x']), 1))], 1)
  x, y = x.astype(np.float64), example['y'].astype(np.float64)
  count = num_steps or -(-len(x) // BATCH)
  return [(x[s * BATCH:(s + 1) * BATCH], y[s * BATCH:(s + 1) * BATCH]) for s in range(count)]


def _grad(theta, step):
  x, y = step
  return x.T @ (x @ theta - y) / len(x)


def _hessian(step):
  x, _ = step
  return x.T @ x / len(x)


def _mean_loss(theta, example):
  x = np.concatenate([example['x'], np.ones((len(example['x']), 1))], 1).astype(np.float64)
  return np.mean(0.5 * (x @ theta - example['y']) ** 2)


def _weighted(updates, sizes):
  p = np.asarray(sizes, np.float64)
  return (p / p.sum()) @ np.stack(updates)


def _as_params(theta):
  return {'w': theta[:D], 'b': theta[D:]}


def _close(params, theta):
  np.testing.assert_allclose(_theta(params), theta, **RTOL)


# ------------------------------------------------------------------------------ APFL


def _apfl_client(w, v, alpha, example, lr, adaptive):
  """Algorithm 1 of arXiv 2003.13461 for one client; every right side before the step."""
  for s in _steps(example):
    mixed = alpha * v + (1 - alpha) * w
    g_mixed = _grad(mixed, s)
    new_alpha = float(np.clip(alpha - lr * (v - w) @ g_mixed, 0, 1)) if adaptive else alpha
    w, v, alpha = w - lr * _grad(w, s), v - lr * alpha * g_mixed, new_alpha
  return w, v, alpha


@pytest.mark.parametrize('adaptive', [True, False])
def test_apfl_matches_the_papers_update(adaptive):
  lr, alpha0 = 0.1, 0.3
  algorithm = apfl(_loss, lr, num_clients=POPULATION, alpha=alpha0, adaptive_alpha=adaptive)
  state = algorithm.init(_params())
  step = jax.jit(algorithm.round)
  w = _theta(state.params)
  v = {i: None for i in range(POPULATION)}   # v_i starts from w at the client's first round
  alpha = {i: alpha0 for i in range(POPULATION)}
  for r, ids in enumerate(([3, 0, 4], [1, 3, 2])):   # client 3 twice: its state persists
    clients = _clients(r)
    state, _ = step(state, _batch(clients, ids), jax.random.key(r))
    new_ws = []
    for example, i in zip(clients, ids):
      start = w.copy() if v[i] is None else v[i]
      wi, v[i], alpha[i] = _apfl_client(w, start, alpha[i], example, lr, adaptive)
      new_ws.append(wi)
    w = w - _weighted([w - wi for wi in new_ws], [len(c['x']) for c in clients])
  _close(state.params, w)
  for i in range(POPULATION):
    one = jax.tree.map(lambda x: x[i], state.client_states)
    np.testing.assert_allclose(float(one.alpha), alpha[i], **RTOL)
    # The personalized model: α_i v_i + (1 − α_i) w with the current global w.
    local = w if v[i] is None else v[i]
    _close(algorithm.personalize(state.params, one), alpha[i] * local + (1 - alpha[i]) * w)
    if v[i] is not None:
      _close(one.local_params, v[i])
  np.testing.assert_array_equal(np.asarray(state.client_states.started),
                                [v[i] is not None for i in range(POPULATION)])
  _all_float64(state)
  if adaptive:
    assert any(abs(alpha[i] - alpha0) > 1e-3 for i in range(POPULATION))
  else:
    assert all(alpha[i] == alpha0 for i in range(POPULATION))


# ---------------------------------------------------------------------------- pFedMe


def test_pfedme_matches_the_papers_update():
  lr, lam, k_inner, plr, beta = 0.05, 2.0, 3, 0.1, 1.5
  algorithm = pfedme(_loss, lr, num_clients=POPULATION, lam=lam, inner_steps=k_inner,
                     personal_learning_rate=plr, beta=beta)
  state = algorithm.init(_params())
  step = jax.jit(algorithm.round)
  w = _theta(state.params)
  personal = {i: w.copy() for i in range(POPULATION)}
  for r, ids in enumerate(([3, 0, 4], [1, 3, 2])):
    clients = _clients(r)
    state, metrics = step(state, _batch(clients, ids), jax.random.key(r))
    new_ws = []
    for example, i in zip(clients, ids):
      wi, theta = w.copy(), w.copy()   # θ restarts from w each round (authors' code)
      for s in _steps(example):
        for _ in range(k_inner):
          theta = theta - plr * (_grad(theta, s) + lam * (theta - wi))
        wi = wi - lr * lam * (wi - theta)
      new_ws.append(wi)
      personal[i] = theta
    # w ← (1 − β) w + β Σ p_i w_i
    w = (1 - beta) * w + beta * _weighted(new_ws, [len(c['x']) for c in clients])
  _close(state.params, w)
  for i in range(POPULATION):
    one = jax.tree.map(lambda x: x[i], state.client_states)
    _close(algorithm.personalize(state.params, one), personal[i])
  assert np.isfinite(float(metrics['train_loss']))
  _all_float64(state)


# ------------------------------------------------------------------------ Per-FedAvg


def _per_fed_avg_client(w, example, lr, alpha, variant, num_steps):
  steps = _steps(example, num_steps)
  real = [s for s in steps if len(s[0])]
  for t in range(len(real)):
    d, d1, d2 = real[t], real[(t + 1) % len(real)], real[(t + 2) % len(real)]
    adapted = w - alpha * _grad(w, d)
    outer = _grad(adapted, d1)
    if variant == 'hf':
      outer = outer - alpha * _hessian(d2) @ outer
    w = w - lr * outer
  return w


@pytest.mark.parametrize('variant', ['fo', 'hf'])
def test_per_fed_avg_matches_the_papers_update(variant):
  lr, alpha = 0.05, 0.2
  algorithm = per_fed_avg(_loss, lr, alpha=alpha, variant=variant)
  state = algorithm.init(_params())
  step = jax.jit(algorithm.round)
  w = _theta(state.params)
  # Client sizes 6, 2, 5 in batches of 2: 3, 1 and 3 real steps of 3 (the second
  # client's D' and D'' are its one batch again; the third's last batch has 1 example).
  for r in range(2):
    clients = _clients(r, sizes=(6, 2, 5))
    state, _ = step(state, _batch(clients, [0, 1, 2]), jax.random.key(r))
    new_ws = [_per_fed_avg_client(w, c, lr, alpha, variant, 3) for c in clients]
    other = 'fo' if variant == 'hf' else 'hf'   # the Hessian term matters on this data
    assert np.max(np.abs(new_ws[0] - _per_fed_avg_client(w, clients[0], lr, alpha, other,
                                                         3))) > 1e-4
    w = w - _weighted([w - wi for wi in new_ws], [len(c['x']) for c in clients])
  _close(state.params, w)
  _all_float64(state.params)
  assert algorithm.personalize is None


def test_one_step_personalization_is_a_gradient_step():
  params, example = _params(), _clients(0)[0]
  personalize = jax.jit(one_step_personalization(_loss, 0.3))
  got = personalize(params, {k: jnp.asarray(v) for k, v in example.items()},
                    jnp.ones(len(example['x']), bool), jax.random.key(0))
  x = np.concatenate([example['x'], np.ones((len(example['x']), 1))], 1).astype(np.float64)
  theta = _theta(params)
  _close(got, theta - 0.3 * x.T @ (x @ theta - example['y']) / len(x))


# ------------------------------------------------------------------ IFCA, HypCluster


def test_one_cluster_equals_fed_avg():
  # hyp_cluster is the same round under another name (one compile suffices here).
  assert hyp_cluster(_loss, optax.sgd(0.1), num_clusters=1).name == 'hypcluster'
  params = _params()
  clustered = ifca(_loss, optax.sgd(0.1), num_clusters=1, num_clients=POPULATION)
  plain = fed_avg(_loss, optax.sgd(0.1))
  sc, sp = clustered.init(params), plain.init(params)
  step_c, step_p = jax.jit(clustered.round), jax.jit(plain.round)
  for r, ids in enumerate(([3, 0, 4], [1, 3, 2], [0, 2, 4])):
    batch = _batch(_clients(r), ids)
    sc, mc = step_c(sc, batch, jax.random.key(r))
    sp, mp = step_p(sp, batch, jax.random.key(r))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14),
                 sc.params, sp.params)
    np.testing.assert_allclose(float(mc['train_loss']), float(mp['train_loss']), rtol=1e-12)
  np.testing.assert_array_equal(np.asarray(sc.client_states), [0, 0, 0, 0, 0])


def test_ifca_matches_the_papers_update_with_two_clusters():
  lr = 0.1
  start = [np.r_[np.zeros(D), 0.0], np.r_[3.0 * np.ones(D), 0.5]]
  clusters = _stack_params(start)
  algorithm = ifca(_loss, optax.sgd(lr), num_clusters=2, num_clients=POPULATION,
                   initial_clusters_fn=lambda p: clusters)
  state = algorithm.init(_params())
  step = jax.jit(algorithm.round)
  thetas, totals = [t.copy() for t in start], np.zeros(2)
  choices = np.full(POPULATION, -1)
  for r, ids in enumerate(([3, 0, 4], [1, 3, 2], [0, 2, 4])):
    # Clients 0 and 3 follow slope 0, the others slope 3: the two cluster models' data.
    clients = _clients(r, shift=[3 * (i not in (0, 3)) for i in ids])
    state, metrics = step(state, _batch(clients, ids), jax.random.key(r))
    members = {0: [], 1: []}
    for example, i in zip(clients, ids):
      j = int(np.argmin([_mean_loss(t, example) for t in thetas]))
      y = thetas[j].copy()
      for s in _steps(example):
        y = y - lr * _grad(y, s)
      members[j].append((thetas[j] - y, len(example['x'])))
      choices[i] = j
    for j, updates in members.items():
      if updates:   # a cluster that nobody chose keeps its model
        thetas[j] = thetas[j] - _weighted([u for u, _ in updates], [n for _, n in updates])
        totals[j] += sum(n for _, n in updates)
    np.testing.assert_array_equal(np.asarray(metrics['client_cluster']),
                                  [choices[i] for i in ids])
  for j in range(2):
    _close(jax.tree.map(lambda x: x[j], state.extra.cluster_params), thetas[j])
  np.testing.assert_allclose(np.asarray(state.extra.cluster_weight), totals)
  np.testing.assert_array_equal(np.asarray(state.client_states), choices)
  _close(state.params, thetas[int(np.argmax(totals))])
  _all_float64((state.params, state.opt_state, state.extra))
  assert set(choices[[0, 3]]) != set(choices[[1, 2, 4]])   # the two groups were told apart
  models = client_models(state)
  for i in range(POPULATION):
    _close(jax.tree.map(lambda x: x[i], models), thetas[choices[i]])
  # A client whose update is not finite is left out of its cluster (same shapes: no
  # recompilation): the cluster models stay finite and its choice is not recorded.
  clients = _clients(5, shift=[0, 3, 3])
  clients[1]['x'] = clients[1]['x'] * np.nan
  new, metrics = step(state, _batch(clients, [0, 1, 2]), jax.random.key(5))
  assert float(metrics['nonfinite_updates']) == 1.0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((new.params, new.extra)))
  assert int(new.client_states[1]) == choices[1]


def _stack_params(thetas):
  return {'w': jnp.asarray(np.stack([t[:D] for t in thetas]), jnp.float64),
          'b': jnp.asarray(np.stack([t[D:] for t in thetas]), jnp.float64)}


def test_initial_clusters_perturb_copies_of_the_params():
  params = {'w': jnp.arange(2000, dtype=jnp.float32) / 1000.0, 'b': jnp.zeros((3,))}
  clusters = initial_clusters(params, 3, init_scale=0.5, seed=1)
  assert clusters['w'].shape == (3, 2000) and clusters['b'].shape == (3, 3)
  np.testing.assert_array_equal(np.asarray(clusters['w'][0]), np.asarray(params['w']))
  flat = np.concatenate([np.asarray(params['w']), np.zeros(3)])
  rms = np.sqrt(np.mean(flat ** 2))
  noise = np.asarray(clusters['w'][1:] - params['w'][None])
  np.testing.assert_allclose(noise.std(), 0.5 * rms, rtol=0.05)
  assert not np.allclose(noise[0], noise[1])


# ------------------------------------------------------------------------ registry


@pytest.mark.parametrize('name, overrides', [
    ('apfl', {'apfl_alpha': '0.5', 'apfl_adaptive_alpha': 'true'}),
    ('pfedme', {'pfedme_lambda': '5', 'pfedme_inner_steps': '2'}),
    ('perfedavg', {'perfedavg_variant': 'hf', 'perfedavg_alpha': '0.1'}),
    ('ifca', {'num_clusters': '3', 'cluster_init_scale': '0.5'}),
    ('hypcluster', {'num_clusters': '1'}),
])
def test_registered_with_their_hyperparameters(name, overrides):
  hparams = resolve_hyperparameters(name, Hyperparameters(client_learning_rate=0.05), overrides)
  algorithm = build_algorithm(name, _loss, hparams, num_clients=POPULATION)
  state = algorithm.init(_params())
  if name in ('ifca', 'hypcluster'):
    assert state.extra.cluster_params['w'].shape == (int(overrides['num_clusters']), D)
  with pytest.raises(ValueError, match=list(overrides)[0]):
    resolve_hyperparameters(name, overrides={list(overrides)[0]: '-1'})
