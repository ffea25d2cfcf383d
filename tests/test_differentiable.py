"""Differentiable rounds: `jax.grad` through R rounds equals central finite differences.

A round is a pure function of the state, the client batch and a key, so the loss of
the global model after R rounds is a differentiable function of any hyperparameter
that enters as a traced value (the client or server learning rate inside
`optax.sgd(lr)`). Each test here builds the algorithm *inside* the differentiated
function (so the learning rates are traced values, not Python floats baked into the
builder), runs R = 2–4 rounds of a linear softmax model on tiny fixed data in float64,
and compares `jax.grad` with central finite differences to 1e-6 relative.

Where the function is only piecewise smooth, the tests say so: FDA's `lax.cond`
synchronization (the gradient holds between threshold crossings and is undefined at
one), the clock's event ordering and the sampler (zero gradient), clipping at the
boundary (one-sided derivatives differ), Krum's selection (a selector, piecewise), and
the coordinate median and trimmed mean (wrong gradients: their order statistics are
computed on integer keys).
docs/differentiable_rounds.md cites each test.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync.data import client_batch_from_arrays
from tests.helpers import classification_data, init_params, softmax_loss

D, K = 5, 3
SIZES = (7, 5, 9, 3)                         # four clients of unequal sizes
ROUNDS = ((0, 1, 2), (1, 2, 3), (0, 2, 3))   # fixed participants of R = 3 rounds
RTOL = 1e-6
REL_STEP = 1e-5                               # central differences: error ~1e-10 in float64


def _client_examples():
  x, y = classification_data(n=sum(SIZES), d=D, k=K, seed=0)
  bounds = np.cumsum((0,) + SIZES)
  return [{'x': x[a:b], 'y': y[a:b]} for a, b in zip(bounds[:-1], bounds[1:])], (x, y)


def _global_loss(params, pooled):
  """Mean cross-entropy over every client's training examples (the global objective)."""
  return jnp.mean(softmax_loss(params, pooled, None))


def _round_batches(examples):
  """The fixed `ClientBatch`es of the rounds of `ROUNDS` (batch 4, 3 local steps),
  stacked `[R, C, ...]` for a `lax.scan` over rounds (one traced round, not R)."""
  batches = []
  for ids in ROUNDS:
    batch = client_batch_from_arrays([examples[i] for i in ids], batch_size=4, num_steps=3)
    batches.append(batch._replace(client_ids=jnp.asarray(ids, jnp.int32)))
  return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def _round_keys(num_rounds):
  return jax.vmap(lambda r: jax.random.fold_in(jax.random.key(0), r))(jnp.arange(num_rounds))


def _check_gradient(fn, x, *, has_aux=False, nonzero=None, compiled=None):
  """`jax.grad(fn)(x)` against central differences `(f(x + h e_i) − f(x − h e_i)) / 2h`.

  One compiled `value_and_grad` serves the gradient and every finite-difference
  evaluation (pass `compiled`, a jitted `value_and_grad(fn)`, to reuse one). `nonzero`
  lists the entries whose gradient must be clearly nonzero (so the comparison could
  fail); the others must be exactly 0. Returns the gradient and
  the aux values at x, x + h e_i, x − h e_i (when `has_aux`).
  """
  x = np.asarray(x, np.float64)
  if compiled is None:
    compiled = jax.jit(jax.value_and_grad(fn, has_aux=has_aux))

  def evaluate(point):
    out, grad = compiled(point)
    value, aux = out if has_aux else (out, None)
    return float(value), aux, grad

  _, aux, grad = evaluate(x)
  auxes = [aux]
  fd = np.zeros_like(x)
  for i in range(x.size):
    h = REL_STEP * abs(x[i])
    step = np.zeros_like(x)
    step[i] = h
    (plus, aux_plus, _), (minus, aux_minus, _) = evaluate(x + step), evaluate(x - step)
    auxes += [aux_plus, aux_minus]
    fd[i] = (plus - minus) / (2 * h)
  grad = np.asarray(grad)
  nonzero = range(x.size) if nonzero is None else nonzero
  for i in range(x.size):
    if i in nonzero:
      assert abs(grad[i]) > 1e-4, (i, grad)
      np.testing.assert_allclose(grad[i], fd[i], rtol=RTOL)
    else:
      assert grad[i] == 0.0 and fd[i] == 0.0, (i, grad, fd)
  return grad, auxes


# ---------------------------------------------------------------------------------
# Synchronous rounds: the client and the server learning rate.

# Each builder takes the traced (client lr, server lr). FedProx's μ, the server momentum
# β and FedAdam's β1, β2, τ stay Python floats (μ is validated and branched on when the
# algorithm is built, so it cannot be traced). FedProx runs with FedAvgM's server step
# (`fed_avg_m` is `fed_avg` with `optax.sgd(η_s, momentum=β)`), so one compiled program
# covers the proximal local step and server momentum; FedAvg itself runs in
# `test_gradient_through_the_simulator_sampler_and_a_deadline`.
SYNC_BUILDERS = {
    'fedprox_fedavgm': lambda lr, slr: fs.fed_prox(
        softmax_loss, optax.sgd(lr), mu=0.3, server_optimizer=optax.sgd(slr, momentum=0.9)),
    'fedadam': lambda lr, slr: fs.fed_adam(softmax_loss, optax.sgd(lr),
                                           server_learning_rate=slr),
    'scaffold': lambda lr, slr: fs.scaffold(softmax_loss, lr, num_clients=len(SIZES),
                                            server_learning_rate=slr),
}
SYNC_POINTS = {'fedadam': (0.2, 0.05)}        # (client lr, server lr); default (0.2, 0.8)
# Each compiled gradient program costs 5-8 s of XLA:CPU compilation on a 2-core machine:
# the quick suite (-m 'not slow') keeps one synchronous, the FDA, the aggregator and the
# example tests; the others are marked slow.
SLOW = pytest.mark.slow


@pytest.mark.parametrize('name', ['fedprox_fedavgm', pytest.param('fedadam', marks=SLOW),
                                  pytest.param('scaffold', marks=SLOW)])
def test_sync_rounds_gradient_matches_finite_differences(name):
  """d loss(w_R) / d(client lr, server lr) after R = 3 rounds of fixed clients."""
  with jax.enable_x64(True):
    examples, (x, y) = _client_examples()
    pooled = {'x': jnp.asarray(x), 'y': jnp.asarray(y)}
    batches = _round_batches(examples)
    params0 = init_params(D, K, dtype=jnp.float64)

    def loss_after_rounds(rates):
      algorithm = SYNC_BUILDERS[name](rates[0], rates[1])
      state = algorithm.init(params0)
      one_round = lambda s, xs: (algorithm.round(s, *xs)[0], None)  # noqa: E731
      state, _ = jax.lax.scan(one_round, state, (batches, _round_keys(len(ROUNDS))))
      return _global_loss(state.params, pooled)

    _check_gradient(loss_after_rounds, SYNC_POINTS.get(name, (0.2, 0.8)))


@SLOW
def test_gradient_through_the_simulator_sampler_and_a_deadline():
  """Rounds driven by `Simulator.sample_round` (top-k client sampling, Feistel batch
  shuffles) under `with_clock(..., with_deadline(...))`: the sampled ids, the batches
  and the deadline mask are constants of the learning rates, so d/d lr matches finite
  differences, and the gradient with respect to a client's job time is exactly 0 (the
  mask `time <= deadline` is a comparison)."""
  with jax.enable_x64(True):
    examples, (x, y) = _client_examples()
    bounds = np.cumsum((0,) + SIZES)
    data = fs.FederatedData(train={'x': x, 'y': y}, offsets=bounds[:-1].astype(np.int64),
                            counts=np.asarray(SIZES, np.int64), test={'x': x, 'y': y},
                            test_client=None, num_classes=K)
    model = fs.models.logistic_regression((D,), K)
    config = fs.SimulationConfig(num_rounds=3, clients_per_round=3,
                                 local_work=fs.LocalWork(batch_size=3, steps=2),
                                 per_client_eval=False)
    sim = fs.Simulator(fs.fed_avg(model.loss, optax.sgd(0.1)), model, data, config)
    params0 = jax.tree.map(lambda p: p.astype(jnp.float64),
                           jax.jit(model.init)(jax.random.key(1)))
    pooled = {'x': jnp.asarray(x), 'y': jnp.asarray(y)}
    times = np.array([1.0, 3.0, 1.5, 2.5])   # deadline 2: clients 1 and 3 are late

    def loss_after_rounds(hyper):
      clock = fs.simulate.ClientClock(
          base_times=jnp.asarray(times, jnp.float32).at[0].set(hyper[2].astype(jnp.float32)))
      algorithm = fs.simulate.with_clock(
          fs.fed_avg(model.loss, optax.sgd(hyper[0]), server_optimizer=optax.sgd(hyper[1])),
          clock, fs.simulate.with_deadline(2.0))
      state = algorithm.init(params0)

      def one_round(state, r):
        state, metrics = algorithm.round(state, *sim.sample_round(r))
        return state, metrics['num_late']

      state, late = jax.lax.scan(one_round, state, jnp.arange(config.num_rounds))
      return jnp.mean(model.evaluate(state.params, pooled)[0]), late

    _, auxes = _check_gradient(loss_after_rounds, (0.3, 0.9, 1.0), has_aux=True,
                               nonzero=(0, 1))
    assert float(jnp.sum(auxes[0])) > 0   # the deadline did drop clients


# ---------------------------------------------------------------------------------
# Semi-asynchronous timeline: FedBuff and FedAsync on a deterministic clock.

ASYNC_TIMES = (1.0, 1.7, 2.6, 4.1)   # distinct speeds: updates arrive stale


@SLOW
@pytest.mark.parametrize('name', ['fedbuff', 'fedasync'])
def test_async_aggregations_gradient_matches_finite_differences(name):
  """d loss / d(client lr[, server lr]) after 5 aggregations of `make_async_engine`.

  FedBuff's server step is built from `server_optimizer=optax.sgd(traced)` (its
  `server_learning_rate` argument is validated as a Python number); FedAsync's mixing
  α stays a Python float for the same reason. Staleness is an integer and the order
  of arrivals comes from `lax.top_k` on finish times: the gradient with respect to a
  client's job time is exactly 0 (last entry)."""
  with jax.enable_x64(True):
    examples, (x, y) = _client_examples()
    pooled = {'x': jnp.asarray(x), 'y': jnp.asarray(y)}
    everyone = client_batch_from_arrays(examples, batch_size=4, num_steps=3)
    batch_fn = lambda key, ids: jax.tree.map(lambda a: a[ids], everyone)  # noqa: E731
    params0 = init_params(D, K, dtype=jnp.float64)
    buffer_size = 2 if name == 'fedbuff' else 1

    def loss_after_aggregations(hyper):
      if name == 'fedbuff':
        algorithm = fs.fed_buff(softmax_loss, optax.sgd(hyper[0]),
                                server_optimizer=optax.sgd(hyper[1]))
      else:
        algorithm = fs.algorithms.fed_async(softmax_loss, optax.sgd(hyper[0]), mixing=0.6)
      clock = fs.simulate.ClientClock(base_times=jnp.asarray(ASYNC_TIMES, jnp.float32)
                                      .at[1].set(hyper[-1].astype(jnp.float32)))
      init, step = fs.simulate.make_async_engine(algorithm, clock, batch_fn,
                                                 buffer_size=buffer_size, max_staleness=4,
                                                 run_key=jax.random.key(0))
      one = lambda s, _: (lambda out: (out[0], out[1]['max_staleness']))(step(s))  # noqa: E731
      state, staleness = jax.lax.scan(one, init(params0), None, length=5)
      return _global_loss(state.server.params, pooled), staleness

    point = (0.2, 0.8, ASYNC_TIMES[1]) if name == 'fedbuff' else (0.2, ASYNC_TIMES[1])
    nonzero = (0, 1) if name == 'fedbuff' else (0,)
    _, auxes = _check_gradient(loss_after_aggregations, point, has_aux=True, nonzero=nonzero)
    assert int(jnp.max(auxes[0])) >= 1   # some updates were stale


# ---------------------------------------------------------------------------------
# Dynamic averaging (FDA): piecewise differentiable in the learning rates.

FDA_STEPS, FDA_WORKERS, FDA_THRESHOLD = 6, 3, 0.05


@functools.cache
def _fda_value_and_grad():
  """One compiled `value_and_grad` of `_fda_problem` for both FDA tests (call it under
  `jax.enable_x64(True)`)."""
  return jax.jit(jax.value_and_grad(_fda_problem(), has_aux=True))


def _fda_problem():
  """The loss of FDA's global model w0 after 6 steps, as a function of (client lr,
  server lr, Θ), with the per-step synchronization decisions as aux."""
  examples, (x, y) = _client_examples()
  pooled = {'x': jnp.asarray(x), 'y': jnp.asarray(y)}
  rng = np.random.default_rng(3)
  rows = [rng.integers(0, SIZES[k], size=(FDA_STEPS, 4)) for k in range(FDA_WORKERS)]
  batches = {name: jnp.asarray(np.stack([np.stack([examples[k][name][rows[k][t]]
                                                   for k in range(FDA_WORKERS)])
                                         for t in range(FDA_STEPS)]))
             for name in ('x', 'y')}   # [T, K, B, ...]
  mask = jnp.ones((FDA_WORKERS, 4), bool)
  params0 = init_params(D, K, dtype=jnp.float64)

  def loss_after_steps(hyper):
    algorithm = fs.algorithms.fda(softmax_loss, optax.sgd(hyper[0]), num_workers=FDA_WORKERS,
                                  threshold=FDA_THRESHOLD, estimator='linear',
                                  server_optimizer=optax.sgd(hyper[1]))
    # Θ is a state value: replaced by the traced hyper[2] (init validates a number).
    state = algorithm.init(params0)._replace(threshold=hyper[2])

    def one_step(state, xs):
      state, metrics = algorithm.step(state, xs[0], mask, xs[1])
      return state, metrics['synced']

    state, synced = jax.lax.scan(one_step, state, (batches, _round_keys(FDA_STEPS)))
    return _global_loss(state.anchor, pooled), synced

  return loss_after_steps


def test_fda_gradient_matches_finite_differences_between_threshold_crossings():
  """Away from a crossing the `lax.cond` decisions are locally constant: the gradient
  with respect to the learning rates matches finite differences (the decisions at
  x ± h equal those at x), and the gradient with respect to Θ is exactly 0."""
  with jax.enable_x64(True):
    _, auxes = _check_gradient(None, (0.3, 0.9, FDA_THRESHOLD), has_aux=True,
                               nonzero=(0, 1), compiled=_fda_value_and_grad())
  decisions = [np.asarray(a).tolist() for a in auxes]
  assert all(d == decisions[0] for d in decisions)
  assert any(decisions[0]) and not all(decisions[0])   # gradients flow through syncs too


def test_fda_loss_jumps_at_a_threshold_crossing():
  """Where a synchronization decision flips, the loss is discontinuous in the learning
  rate: bisection finds lr* to 1e-12 with a loss jump far above any finite slope, so
  the gradient at lr* is undefined (on each side it is finite and correct)."""
  with jax.enable_x64(True):
    value_and_grad = _fda_value_and_grad()
    at = lambda lr: value_and_grad(np.array([lr, 0.9, FDA_THRESHOLD]))  # noqa: E731
    low, high = 0.05, 0.6
    syncs = lambda lr: int(jnp.sum(at(lr)[0][1]))  # noqa: E731
    syncs_low = syncs(low)
    assert syncs_low != syncs(high)
    for _ in range(45):
      mid = 0.5 * (low + high)
      if syncs(mid) == syncs_low:
        low = mid
      else:
        high = mid
    (loss_low, _), grad_low = at(low)
    (loss_high, _), grad_high = at(high)
    jump = abs(float(loss_high) - float(loss_low))
    slope = max(abs(float(grad_low[0])), abs(float(grad_high[0])))
  assert high - low < 1e-11
  assert jump > 1e-6 and jump / (high - low) > 1e4 * slope


# ---------------------------------------------------------------------------------
# Aggregators: clipping, Krum and the coordinate median.

def _updates(seed=0, num=5, dim=4):
  rng = np.random.default_rng(seed)
  return {'w': jnp.asarray(rng.normal(size=(num, dim)))}


def test_clip_by_norm_gradient_is_one_sided_at_the_boundary():
  """`Δ·min(1, S/‖Δ‖)`: below S the derivative with respect to a scale of Δ is Δ,
  above S it is 0 (the clipped update is S·Δ/‖Δ‖); at ‖Δ‖ = S the one-sided finite
  differences differ, so the gradient there is undefined."""
  with jax.enable_x64(True):
    updates = _updates()
    norm = float(jnp.linalg.norm(updates['w'][0]))
    clip = fs.aggregators.clip_by_norm(1.0)
    state = clip.init({'w': updates['w'][0]})
    weights = jnp.ones((5,))

    def first_client(scale):
      out, _ = clip.apply({'w': updates['w'] * scale}, weights, state, None, None)
      return jnp.sum(out['w'][0])

    derivative = jax.jit(jax.grad(first_client))
    first_client = jax.jit(first_client)
    below, above = 0.5 / norm, 2.0 / norm
    np.testing.assert_allclose(derivative(below), float(jnp.sum(updates['w'][0])), rtol=1e-12)
    assert float(derivative(above)) == pytest.approx(0.0, abs=1e-12)
    edge, h = 1.0 / norm, 1e-7 / norm
    left = (first_client(edge) - first_client(edge - h)) / h
    right = (first_client(edge + h) - first_client(edge)) / h
    expected = float(jnp.sum(updates['w'][0]))
  np.testing.assert_allclose(float(left), expected, rtol=1e-5)
  assert abs(float(right)) < 1e-6


def test_clipping_a_zero_update_keeps_the_gradient_finite():
  """A client whose update is exactly 0 (a padded client without data: its update
  `w − w` has tangent 0 from the second round on) must not make the gradient through
  `clip_by_norm` NaN (2 rounds of FedAvg + clipping with padded clients
  gave a NaN hypergradient before `tree._direct_clip_factors` kept 0 out of sqrt)."""
  with jax.enable_x64(True):
    updates = _updates(seed=3, num=3).copy()
    updates['w'] = updates['w'].at[2].set(0.0)
    clip = fs.aggregators.chain(fs.aggregators.clip_by_norm(10.0), fs.aggregators.weighted_mean())
    state = clip.init({'w': updates['w'][0]})
    weights = jnp.asarray([1.0, 2.0, 0.0])
    total = lambda scale: jnp.sum(clip.apply({'w': updates['w'] * scale}, weights, state,  # noqa: E731
                                             None, jnp.arange(3))[0]['w'])
    grad = float(jax.jit(jax.grad(total))(0.3))
  # Unclipped (norms < 10): the derivative of Σ mean(s·u) in s is Σ mean(u).
  np.testing.assert_allclose(grad, float(np.sum(np.asarray(updates['w'][:2]).T @ [1 / 3, 2 / 3])),
                             rtol=1e-12)


def test_krum_gradient_is_the_selected_clients_indicator():
  """Krum returns one client's update: its gradient is 1 on the selected client's
  entries and 0 elsewhere, equal to finite differences while the selection holds
  (it changes, and the output jumps, when the scores cross)."""
  with jax.enable_x64(True):
    updates = _updates(seed=1)
    krum = fs.aggregators.krum(1)
    state = krum.init({'w': updates['w'][0]})
    weights = jnp.ones((5,))
    apply = lambda u: krum.apply({'w': u}, weights, state, None, None)  # noqa: E731
    grad = np.asarray(jax.jit(jax.grad(lambda u: jnp.sum(apply(u)[0]['w'])))(updates['w']))
    apply = jax.jit(apply)
    aggregate = lambda u: float(jnp.sum(apply(u)[0]['w']))  # noqa: E731
    selected = int(apply(updates['w'])[1].metrics['selected_client'])
    expected = np.zeros_like(grad)
    expected[selected] = 1.0
    np.testing.assert_array_equal(grad, expected)
    h = 1e-6
    for c, j in ((selected, 2), ((selected + 1) % 5, 0)):
      bumped = np.asarray(updates['w']).copy()
      bumped[c, j] += h
      fd = (aggregate(jnp.asarray(bumped)) - aggregate(updates['w'])) / h
      np.testing.assert_allclose(fd, expected[c, j], atol=1e-8)


def test_order_statistic_reducers_pass_the_gradient_of_their_selection():
  """The coordinate median and the trimmed mean find their order statistics on
  order-preserving integer keys of the floats (exact in float32 and float64); their
  values are made differentiable as the mean of the entries they select, so the
  median's gradient is the middle client's indicator and `trimmed_mean(0)`'s is 1/K
  for every entry, as finite differences say; `trimmed_mean(0.2)` of 5 clients keeps
  the middle 3 (1/3 each)."""
  with jax.enable_x64(True):
    updates = _updates(seed=2)
    weights = jnp.ones((5,))
    order = np.argsort(np.asarray(updates['w'][:, 0]))
    middle3 = np.where(np.isin(np.arange(5), order[1:4]), 1 / 3, 0.0)
    for aggregator, expected in (
        (fs.aggregators.coordinate_median(), np.eye(5)[order[2]]),
        (fs.aggregators.trimmed_mean(0.0), np.full(5, 0.2)),
        (fs.aggregators.trimmed_mean(0.2), middle3)):
      state = aggregator.init({'w': updates['w'][0]})
      def first(u, aggregator=aggregator, state=state):
        return aggregator.apply({'w': u}, weights, state, None, None)[0]['w'][0]

      grad = np.asarray(jax.jit(jax.grad(first))(updates['w']))
      first = jax.jit(first)
      fd = np.zeros(5)
      for c in range(5):
        bumped = np.asarray(updates['w']).copy()
        bumped[c, 0] += 1e-7
        fd[c] = (float(first(jnp.asarray(bumped))) - float(first(updates['w']))) / 1e-7
      np.testing.assert_allclose(grad[:, 0], expected, atol=1e-12)
      assert np.all(grad[:, 1:] == 0.0)
      np.testing.assert_allclose(fd, expected, atol=1e-6)


# ---------------------------------------------------------------------------------
# The example: experiments/hypergradient.py at its --quick size.

def test_hypergradient_example_quick_lowers_the_validation_loss(tmp_path):
  import importlib.util
  import json
  import pathlib

  path = pathlib.Path(__file__).resolve().parent.parent / 'experiments' / 'hypergradient.py'
  spec = importlib.util.spec_from_file_location('study_hypergradient', path)
  study = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(study)
  headline = study.run(str(tmp_path), quick=True, progress=False)
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['outer_step'] for r in rows] == list(range(study._settings(True)['outer_steps'] + 1))
  assert headline['validation_loss_after'] < headline['validation_loss_before'] - 0.5
  assert headline['tuned_learning_rate'] > headline['initial_learning_rate']
  assert rows[0]['hypergradient'] < 0    # a small η: the loss falls as η grows
  assert 'lr after' in (tmp_path / 'summary.md').read_text()
