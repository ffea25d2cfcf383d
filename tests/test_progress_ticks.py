"""The progress bar advances unit by unit while a compiled block runs (issue 13).

A ticking block reports each unit through `driver.tick_unit` (a host callback in
the scan body); the program without a bar stays the one without a callback. Every
timeline's runner is checked on a tiny model: every unit is reported once, in
order; blocks of one length compile once; ticking changes no number.
"""

import functools
import re

import jax
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync.algorithms.fda import fda
from fedjax_sync.algorithms.fed_buff import fed_buff
from fedjax_sync.simulate import driver
from fedjax_sync.simulate.clock import lognormal_times, make_clock
from fedjax_sync.simulate.sweep import Sweep, registered_algorithm

DATA = fs.synthetic(1.0, 1.0, num_clients=6, seed=5)
MODEL = fs.models.logistic_regression((60,), 10)
WORK = fs.LocalWork(batch_size=5, steps=2)


@functools.lru_cache(maxsize=None)
def _runner(timeline):
  config = fs.SimulationConfig(num_rounds=6, clients_per_round=2, eval_every=3,
                               local_work=WORK, per_client_eval=False)
  if timeline == 'rounds':
    return fs.Simulator(fs.fed_avg(MODEL.loss, optax.sgd(0.1)), MODEL, DATA, config)
  if timeline == 'sweep':
    return Sweep(registered_algorithm('fedavg', MODEL.loss), MODEL, DATA, config, seeds=[0, 1])
  if timeline == 'semi_async':
    clock = make_clock(lognormal_times(DATA.num_clients, sigma=1.0, seed=1))
    async_config = fs.simulate.AsyncConfig(num_aggregations=6, buffer_size=2, local_work=WORK,
                                           eval_every=3, seed=3)
    return fs.SemiAsyncSimulator(fed_buff(MODEL.loss, optax.sgd(0.1)), MODEL, DATA, clock,
                                 async_config)
  return fs.AveragingSimulator(fda(MODEL.loss, optax.sgd(0.1), num_workers=2, threshold=0.01,
                                   estimator='naive'), MODEL, DATA, num_steps=6, batch_size=5,
                               eval_every=3, seed=3)


def _leaves(tree):
  return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                     else x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize('timeline', [
    'rounds',
    # One more compile each (20-30 s on the loaded 2-core host): slow.
    pytest.param('sweep', marks=pytest.mark.slow),
    pytest.param('semi_async', marks=pytest.mark.slow),
    pytest.param('averaging', marks=pytest.mark.slow)])
def test_every_unit_is_reported_once_in_order_and_blocks_compile_once(timeline, capsys):
  runner = _runner(timeline)
  compiled = []
  original = runner.compile
  runner.compile = lambda state, length, **kw: (compiled.append((length, kw)),
                                                original(state, length, **kw))
  seen = []
  state = runner.init()
  try:
    with driver.listen_to_units(seen.append):
      ticking = driver.drive(runner, driver.fresh_buffers(state), progress='unit',
                             evaluate=False)
  finally:
    del runner.compile
  # Two blocks of 3 units; a sweep reports once per unit, not once per member.
  assert ticking.units_done == 6 and seen == [1, 2, 3, 1, 2, 3]
  assert compiled == [(3, {'ticks': True})]       # the second block reuses the program
  assert '6/6' in capsys.readouterr().err


@pytest.mark.slow   # compiles the plain program too (~20 s on the loaded 2-core host)
def test_ticking_changes_no_number_and_the_program_without_a_bar_has_no_callback():
  runner = _runner('rounds')
  state = runner.init()
  seen = []
  with driver.listen_to_units(seen.append):
    ticking = driver.drive(runner, driver.fresh_buffers(state), progress='unit', evaluate=False)
    plain = driver.drive(runner, driver.fresh_buffers(state), progress=False, evaluate=False)
  assert seen == [1, 2, 3, 1, 2, 3]                # the plain run reported nothing
  for a, b in zip(_leaves(ticking.state), _leaves(plain.state)):
    np.testing.assert_array_equal(a, b)
  assert ticking.histories == plain.histories
  host_call = re.compile(r'custom_call_target="[^"]*callback')   # not the source metadata
  assert not host_call.search(runner._blocks[3].as_text())
  assert host_call.search(runner._blocks[(3, 'ticks')].as_text())


class _FakeBar:
  def __init__(self, n=0):
    self.n, self.postfix = n, ''

  def update(self, k):
    self.n += k

  def set_postfix_str(self, text, refresh=True):
    del refresh
    self.postfix = text


def test_unit_bar_ignores_foreign_and_repeated_ticks_and_adapts_its_stride():
  bar = driver._UnitBar(_FakeBar(4), total=20, start=4, every_unit=False)
  assert bar.stride(1000) == 1000 // driver.FIRST_BLOCK_TICKS    # nothing timed yet
  bar.begin_block(4, 5, compile_seconds=2.0)
  for position in (1, 2, 2, 9, 0, 3):                # a repeat and two out of the block
    bar.on_tick(position)
  assert bar.bar.n == 7
  bar.end_block(9, 2.0, 'acc=0.5000, ', ticked=True)
  assert bar.bar.n == 9 and bar.bar.postfix.startswith('acc=0.5000, ')
  bar.unit_seconds = 0.01                              # 100 units/s: report every 25th
  assert bar.stride(1000) == int(1 / (driver.TICKS_PER_SECOND * 0.01))
  assert bar.stride(10) == 10
  bar.unit_seconds = 2.0                               # slow units: every one
  assert bar.stride(1000) == 1
  assert driver._UnitBar(_FakeBar(), 5, 0, every_unit=True).stride(1000) == 1


def test_progress_must_be_one_of_its_modes():
  with pytest.raises(ValueError, match="progress must be True, False, 'unit' or 'block', got"):
    driver.drive(_runner('rounds'), None, progress='units')
