"""One conformance suite over a registry of every aggregator of the library.

Each entry is a reducer (client transforms are chained with `weighted_mean()`).
Every entry must: return the params' shape; ignore the order of the clients; be
unaffected by a zero-weight client (padding with a duplicated id included);
give the same result under jit; not recompile on a second call; and give the
same result with the client axis sharded over 4 CPU devices.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import fedjax_sync as fs
from fedjax_sync import aggregators as agg

NUM_CLIENTS = 20  # population N, for per-client state

# name -> factory returning a reducer. All use only scalar metrics in their state.
REGISTRY = {
    'mean': lambda: agg.mean(),
    'weighted_mean': lambda: agg.weighted_mean(),
    'coordinate_median': lambda: agg.coordinate_median(),
    'trimmed_mean': lambda: agg.trimmed_mean(0.2),
    'krum': lambda: agg.krum(1),
    'multi_krum': lambda: agg.multi_krum(1, 3),
    'geometric_median': lambda: agg.geometric_median(6),
    'norm_bounded_mean': lambda: agg.norm_bounded_mean(1.5),
    'clip_by_norm': lambda: agg.chain(agg.clip_by_norm(1.5), agg.weighted_mean()),
    'adaptive_clip': lambda: agg.chain(agg.adaptive_clip(1.0, 0.5), agg.weighted_mean()),
    'zero_invalid_updates': lambda: agg.chain(agg.zero_invalid_updates(4.0), agg.weighted_mean()),
    'stochastic_quantize': lambda: agg.chain(agg.stochastic_quantize(4), agg.weighted_mean()),
    'top_k': lambda: agg.chain(agg.top_k(fraction=0.25), agg.weighted_mean()),
    'random_k': lambda: agg.chain(agg.random_k(fraction=0.5), agg.weighted_mean()),
    'dp_fedavg': lambda: agg.dp_fedavg(1.0, 0.5, 6.0),
    'bulyan': lambda: agg.bulyan(1),  # 7 present clients = 4f + 3
    'rotated_quantize': lambda: agg.chain(agg.rotated_quantize(4), agg.weighted_mean()),
    'drive': lambda: agg.chain(agg.drive(), agg.weighted_mean()),
    'terngrad': lambda: agg.chain(agg.terngrad(), agg.weighted_mean()),
    'dp_ftrl': lambda: agg.dp_ftrl(1.0, 0.5, 6.0, rounds_per_tree=6),
    'secure_aggregation': lambda: agg.secure_aggregation(4.0),
    'sign_flip_then_trimmed': lambda: agg.chain(agg.sign_flip_attack(2.0, positions=(0, 5)),
                                                agg.trimmed_mean(0.25)),
    'chain_with_optax': lambda: agg.chain(agg.clip_by_norm(2.0), agg.trimmed_mean(0.1),
                                          optax.scale(0.5)),
}
# Attacks act on batch positions, so permuting clients changes who attacks.
POSITIONAL = {'sign_flip_then_trimmed'}
# Outputs compared with this tolerance (float32 sums in different orders).
TOL = dict(atol=2e-5, rtol=2e-5)


def _params():
  return {'w': jnp.zeros((3, 4), jnp.float32), 'b': jnp.zeros((4,), jnp.float32)}


def _inputs(num=8, seed=0):
  """`num` clients; the last one has weight 0 and repeats client 0's id."""
  rng = np.random.default_rng(seed)
  updates = {'w': jnp.asarray(rng.normal(size=(num, 3, 4)), jnp.float32),
             'b': jnp.asarray(rng.normal(size=(num, 4)), jnp.float32)}
  weights = jnp.asarray(np.r_[rng.uniform(1, 3, num - 1), 0.0], jnp.float32)
  ids = jnp.asarray(np.r_[rng.permutation(NUM_CLIENTS)[:num - 1], 0], jnp.int32)
  ids = ids.at[num - 1].set(ids[0])
  return updates, weights, ids


@functools.lru_cache(maxsize=None)
def _compiled(name):
  """One aggregator instance and one jitted apply per entry, shared by the tests
  (compiling once per entry and input shape keeps the suite fast); `traces`
  counts how often JAX traced it."""
  aggregator = REGISTRY[name]()
  traces = []

  def apply(updates, weights, state, key, ids):
    traces.append(1)
    return aggregator.apply(updates, weights, state, key, ids)

  return aggregator, jax.jit(apply), traces


def _run(name, updates, weights, ids, state=None, key=None, jit=True):
  aggregator, jitted, _ = _compiled(name)
  state = aggregator.init(_params(), NUM_CLIENTS) if state is None else state
  key = jax.random.key(7) if key is None else key
  fn = jitted if jit else aggregator.apply
  return fn(updates, weights, state, key, ids)


def _state_rows(state, ids):
  """The per-client state rows of `ids` (for the top-k residual), else ()."""
  rows = []
  for leaf in jax.tree.leaves(state):
    if leaf.ndim >= 1 and leaf.shape[0] == NUM_CLIENTS:
      rows.append(np.asarray(leaf)[np.asarray(ids)])
  return rows


names = sorted(REGISTRY)


@pytest.mark.parametrize('name', names)
def test_output_has_params_shape(name):
  aggregator = _compiled(name)[0]
  assert aggregator.kind == agg.REDUCER
  out, state = _run(name, *_inputs())
  chex.assert_trees_all_equal_shapes_and_dtypes(out, _params())
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))
  # The state keeps its structure (it is a lax.scan carry in the simulator).
  init = aggregator.init(_params(), NUM_CLIENTS)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, init)


@pytest.mark.parametrize('name', [n for n in names if n not in POSITIONAL])
def test_client_permutation_invariance(name):
  updates, weights, ids = _inputs()
  perm = np.random.default_rng(3).permutation(len(ids))
  out, state = _run(name, updates, weights, ids)
  out_p, state_p = _run(name, jax.tree.map(lambda x: x[perm], updates), weights[perm],
                        ids[perm])
  chex.assert_trees_all_close(out, out_p, **TOL)
  real = ids[:-1]
  for a, b in zip(_state_rows(state, real), _state_rows(state_p, real)):
    np.testing.assert_allclose(a, b, **TOL)


@pytest.mark.parametrize('name', names)
def test_zero_weight_client_changes_nothing(name):
  updates, weights, ids = _inputs()
  out, state = _run(name, updates, weights, ids)
  # Another value in the zero-weight slot: nothing changes.
  junk = jax.tree.map(lambda x: x.at[-1].set(50.0 * jnp.ones_like(x[-1])), updates)
  out_junk, state_junk = _run(name, junk, weights, ids)
  chex.assert_trees_all_close(out, out_junk, **TOL)
  chex.assert_trees_all_close(state, state_junk, **TOL)
  if name == 'secure_aggregation':
    return  # C sets the ring's quantization levels; the slot's value is checked above.
  # Removing the slot: nothing changes either (its duplicated id left the state alone).
  out_short, state_short = _run(name, jax.tree.map(lambda x: x[:-1], updates),
                                weights[:-1], ids[:-1])
  chex.assert_trees_all_close(out, out_short, **TOL)
  chex.assert_trees_all_close(state, state_short, **TOL)


@pytest.mark.parametrize('name', names)
def test_jit_equals_no_jit(name):
  inputs = _inputs()
  out_jit, state_jit = _run(name, *inputs, jit=True)
  out, state = _run(name, *inputs, jit=False)
  chex.assert_trees_all_close(out_jit, out, **TOL)
  chex.assert_trees_all_close(state_jit, state, **TOL)


@pytest.mark.parametrize('name', names)
def test_no_recompilation_on_second_call(name):
  aggregator = REGISTRY[name]()

  traces = []

  @jax.jit
  def apply(updates, weights, state, key, ids):
    traces.append(1)
    return aggregator.apply(updates, weights, state, key, ids)

  state = aggregator.init(_params(), NUM_CLIENTS)
  updates, weights, ids = _inputs(seed=0)
  _, state = apply(updates, weights, state, jax.random.key(0), ids)
  updates, weights, ids = _inputs(seed=1)
  out, _ = apply(updates, weights, state, jax.random.key(1), ids)
  jax.block_until_ready(out)
  assert len(traces) == 1


@pytest.mark.parametrize('name', names)
def test_sharded_over_four_devices_equals_one_device(name):
  assert jax.device_count() >= 4
  aggregator = _compiled(name)[0]
  mesh = fs.client_mesh(jax.devices()[:4])
  updates, weights, ids = _inputs()
  state = aggregator.init(_params(), NUM_CLIENTS)

  @jax.jit
  def sharded(updates, weights, state, key, ids):
    clients = NamedSharding(mesh, P('clients'))
    updates = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, clients), updates)
    weights = jax.lax.with_sharding_constraint(weights, clients)
    ids = jax.lax.with_sharding_constraint(ids, clients)
    return aggregator.apply(updates, weights, state, key, ids)

  out_s, state_s = sharded(updates, weights, state, jax.random.key(7), ids)
  out, state_1 = _run(name, updates, weights, ids, state=state)
  chex.assert_trees_all_close(out_s, out, **TOL)
  chex.assert_trees_all_close(state_s, state_1, **TOL)
