"""Aggregator expressions (`parse_aggregator`, `--aggregator EXPR`) and the aggregator registry.

An expression builds the same aggregator as the Python call it spells; anything
outside the literal grammar (imports, attributes, lambdas, operators, unknown
names or keywords) is a one-line ValueError and nothing is evaluated.
"""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sync import aggregators as agg
from fedjax_sync.aggregators import registry
from tests.test_aggregator_conformance import REGISTRY as CONFORMANCE

NUM_CLIENTS = 10


def _inputs():
  rng = np.random.default_rng(0)
  updates = {'w': jnp.asarray(rng.normal(size=(6, 3, 2)), jnp.float32),
             'b': jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)}
  weights = jnp.asarray([1.0, 2.0, 0.5, 3.0, 1.5, 0.0], jnp.float32)
  ids = jnp.asarray([3, 1, 7, 0, 9, 2], jnp.int32)
  return updates, weights, ids


def _apply(*aggregators):
  """Each aggregator's (output, new state) from init on the same inputs and key, in one
  compiled program (eager dispatch of many small ops is slower than one compile)."""
  updates, weights, ids = _inputs()
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), updates)
  states = [a.init(params, NUM_CLIENTS) for a in aggregators]

  @jax.jit
  def apply(states):
    return [a.apply(updates, weights, s, jax.random.key(0), ids)
            for a, s in zip(aggregators, states)]

  return apply(states)


# (expression, the Python call it spells). Every expression is also compared by its
# stage names, which carry the arguments (clip_by_norm(1), trimmed_mean(0.1), ...).
ROUND_TRIPS = [
    ('chain(clip_by_norm(1.0), trimmed_mean(0.1))',
     lambda: agg.chain(agg.clip_by_norm(1.0), agg.trimmed_mean(0.1))),
    ('chain(sign_flip_attack(2.0, positions=(0, 3)), multi_krum(1, num_selected=3))',
     lambda: agg.chain(agg.sign_flip_attack(2.0, positions=(0, 3)), agg.multi_krum(1, 3))),
    ('dp_fedavg(1.0, 0.5, expected_total_weight=6.0)', lambda: agg.dp_fedavg(1.0, 0.5, 6.0)),
    ('chain(scale_attack(-3, num_attackers=1), top_k(fraction=0.25), geometric_median(4))',
     lambda: agg.chain(agg.scale_attack(-3, num_attackers=1), agg.top_k(fraction=0.25),
                       agg.geometric_median(4))),
]
# Computed (not only named) in one compiled program: the first three pairs, and a
# tight clip against the plain mean (a parser that dropped arguments would pass a
# comparison of two default-built aggregators, not this one).
COMPUTED = 3
CLIP_EXPRESSION = 'chain(clip_by_norm(0.01), weighted_mean())'


@functools.lru_cache(maxsize=None)
def _computed():
  pairs = [(agg.parse_aggregator(e), build()) for e, build in ROUND_TRIPS[:COMPUTED]]
  pairs.append((agg.parse_aggregator(CLIP_EXPRESSION), agg.weighted_mean()))
  results = _apply(*[a for pair in pairs for a in pair])
  return [(results[2 * i], results[2 * i + 1]) for i in range(len(pairs))]


@pytest.mark.parametrize('index', range(len(ROUND_TRIPS)), ids=[e for e, _ in ROUND_TRIPS])
def test_expression_equals_the_python_call_on_the_same_inputs(index):
  expression, build = ROUND_TRIPS[index]
  parsed, built = agg.parse_aggregator(expression), build()
  assert parsed.name == built.name and parsed.kind == built.kind == agg.REDUCER
  if index < COMPUTED:
    (out_parsed, state_parsed), (out_built, state_built) = _computed()[index]
    chex.assert_trees_all_equal(out_parsed, out_built)
    chex.assert_trees_all_equal(state_parsed, state_built)


def test_expression_arguments_reach_the_computation():
  (clipped, _), (plain, _) = _computed()[COMPUTED]
  norm = np.sqrt(sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(clipped)))
  assert norm <= 0.01 + 1e-6
  assert norm < 0.5 * np.sqrt(sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(plain)))


def test_canonical_spelling_ignores_spaces_and_number_forms():
  canonical = agg.canonical_aggregator_expression
  assert canonical(' chain( clip_by_norm(1.), trimmed_mean( beta = .1 ) ) ') == (
      'chain(clip_by_norm(1.0), trimmed_mean(beta=0.1))')
  assert canonical('krum(2)') == 'krum(2)'


# (expression, text the one-line error must contain)
REFUSED = [
    ("__import__('os')", "unknown aggregator '__import__'"),
    ("__import__('os').system('touch PWNED')", 'attribute access'),
    ('agg.mean()', 'attribute access agg.mean'),
    ('mean().apply', 'attribute access'),
    ('lambda: mean()', 'lambda is not allowed'),
    ('chain(lambda u: u, mean())', 'lambda is not allowed'),
    ('bogus_mean()', "unknown aggregator 'bogus_mean'; valid: adaptive_clip, bulyan, chain"),
    ('trimmed_mean(beta=0.1, betta=2)', "trimmed_mean() has no argument 'betta'; valid: beta"),
    ('top_k(fraction=0.1, k_max=3)', "no argument 'k_max'; valid: k, fraction, error_feedback"),
    ('trimmed_mean(x)', "unknown name 'x'"),
    ('trimmed_mean(0.1 + 0.2)', 'BinOp syntax is not allowed'),
    ('trimmed_mean(*[0.1])', 'write the arguments out'),
    ("trimmed_mean(**{'beta': 0.1})", 'write the keyword arguments out'),
    ('trimmed_mean()', "missing a required argument: 'beta'"),
    ('trimmed_mean(0.1, 0.2)', 'too many positional arguments'),
    ('trimmed_mean(0.7)', 'trimmed_mean(0.7):'),
    ('sign_flip_attack(2.0)', 'give exactly one of num_attackers'),
    ('trimmed_mean(1e999)', 'not a finite number'),
    ("trimmed_mean(b'x')", 'bytes'),
    ('mean', 'mean must be called'),
    ('clip_by_norm(1.0)', 'does not reduce'),
    ('chain(mean(), mean())', '2 reducers'),
    ('chain(', 'not valid syntax'),
    ('mean(); import os', 'not valid syntax'),
    ('[mean()]', 'not an aggregator call'),
    ('mean()[0]', 'Subscript syntax is not allowed'),
    ('(m := mean())', 'NamedExpr syntax is not allowed'),
    ('trimmed_mean(-(0.1))', 'trimmed_mean(-0.1):'),   # a sign on a number: the value -0.1
    ('trimmed_mean(-x)', 'a sign applies to a number only'),
    ('chain(' * 2000 + ')' * 2000, 'too long'),
]


@pytest.mark.parametrize('expression,needle', REFUSED, ids=[e[:40] for e, _ in REFUSED])
def test_outside_the_grammar_is_a_one_line_error_naming_the_problem(expression, needle, tmp_path,
                                                                    monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError) as error:
    agg.parse_aggregator(expression)
  message = str(error.value)
  assert needle in message
  assert '\n' not in message
  assert not (tmp_path / 'PWNED').exists()   # nothing was evaluated


def test_the_registry_holds_every_exported_aggregator_constructor():
  # Exported names that are not constructors of an Aggregator.
  not_constructors = {'REDUCER', 'TRANSFORM', 'Aggregator', 'ChainState', 'EmptyState',
                      'MetricsState', 'aggregator_metrics', 'stateless', 'validate_aggregator',
                      'dp_epsilon', 'dp_ftrl_epsilon', 'dp_noise_multiplier',
                      'participation_epsilon', 'weighted_sum_via', 'aggregator_names',
                      'aggregator_signatures', 'canonical_aggregator_expression',
                      'parse_aggregator', 'register_aggregator'}
  assert set(agg.__all__) - not_constructors == set(agg.aggregator_names())
  for name in agg.aggregator_names():
    assert getattr(agg, name) is registry._REGISTRY[name]


# Registered aggregators outside the conformance suite (tests/test_aggregator_conformance.py),
# each with the reason and where it is tested instead.
NOT_IN_CONFORMANCE = {
    'harmonize': 'depends on the order of the clients by design (FedGH visits pairs in batch '
                 'order): tests/test_fed_gh.py, float64 reference in tests/test_float64.py',
    'kuramoto': 'tests/test_kuramoto.py and the float64 reference in tests/test_float64.py',
    'kuramoto_code': 'tests/test_kuramoto.py and the float64 reference in tests/test_float64.py',
    'scale_attack': 'positional like sign_flip_attack: float64 reference in '
                    'tests/test_float64.py',
}


def test_every_registered_aggregator_is_in_the_conformance_suite_or_exempted_with_reason():
  """Registering an aggregator puts it under test: it must join the conformance registry."""
  covered = set(CONFORMANCE)
  for make in CONFORMANCE.values():
    covered |= set(re.findall(r'[A-Za-z_]\w*', make().name))
  missing = set(agg.aggregator_names()) - covered - set(NOT_IN_CONFORMANCE)
  assert not missing, f'add {sorted(missing)} to tests/test_aggregator_conformance.REGISTRY'
  stale = set(NOT_IN_CONFORMANCE) & covered
  assert not stale, f'{sorted(stale)} are in the conformance suite now: drop the exemption'
  assert set(NOT_IN_CONFORMANCE) <= set(agg.aggregator_names())


def test_signatures_name_each_constructor_and_its_parameters():
  signatures = agg.aggregator_signatures()
  assert signatures['trimmed_mean'] == 'trimmed_mean(beta)'
  assert signatures['chain'] == 'chain(*stages)'
  assert signatures['top_k'].startswith('top_k(k=None, *, fraction=None')


def test_a_registered_constructor_is_usable_in_expressions():
  calls = []

  def halved_mean(scale=0.5, *, positions=()):
    calls.append((scale, positions))
    return agg.chain(agg.scale_attack(scale, fraction=1.0), agg.weighted_mean())

  agg.register_aggregator('halved_mean', halved_mean)
  try:
    built = agg.parse_aggregator('chain(zero_invalid_updates(), halved_mean(positions=[1, -2]))')
    assert calls == [(0.5, (1, -2))] and built.name.startswith('chain(zero_invalid_updates')
    with pytest.raises(ValueError, match=re.escape("halved_mean() has no argument 'scal'; valid: "
                                                   'scale, positions')):
      agg.parse_aggregator('halved_mean(scal=1.0)')
    with pytest.raises(ValueError, match='already registered'):
      agg.register_aggregator('halved_mean', halved_mean)
  finally:
    del registry._REGISTRY['halved_mean']
  with pytest.raises(ValueError, match='not a Python identifier'):
    agg.register_aggregator('a-b', halved_mean)
