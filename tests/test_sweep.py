"""Sweeps: S simulations vmapped as one program equal the S runs one after another."""

import dataclasses

import chex
import jax
import numpy as np
import pytest

import fedjax_sync as fs
from fedjax_sync.data.registry import load_dataset
from fedjax_sync.simulate.sweep import Sweep, registered_algorithm


@pytest.fixture(scope='module')
def setup():
  data = load_dataset('synthetic_pooled', num_clients=6, alpha=0.5, seed=0)
  model = fs.models.logistic_regression((60,), 10)
  config = fs.SimulationConfig(num_rounds=2, clients_per_round=4,
                               local_work=fs.LocalWork(batch_size=16, steps=3), eval_every=2,
                               per_client_eval=False)
  return data, model, config


@pytest.mark.parametrize('algorithm,swept', [
    ('fedavg', 'client_learning_rate'),
    pytest.param('fedadam', 'server_learning_rate', marks=pytest.mark.slow),
    pytest.param('fedprox', 'mu', marks=pytest.mark.slow),   # μ traced: the term stays
])
def test_sweep_equals_sequential_simulations(setup, algorithm, swept):
  data, model, config = setup
  base = fs.Hyperparameters()
  sweep = Sweep(registered_algorithm(algorithm, model.loss, base), model, data, config,
                seeds=[0, 3], hyperparameters={swept: [0.01, 0.1]})
  assert sweep.num_simulations == 4
  result = sweep.run(sweep.init())
  # Compare the two simulations that differ in both seed and value (compiling a
  # Simulator per setting is the slow part of this test).
  for s in ((0, 3) if algorithm == 'fedavg' else (3,)):
    setting = result.settings[s]
    hparams = dataclasses.replace(base, **{swept: setting[swept]})
    sim = fs.Simulator(fs.build_algorithm(algorithm, model.loss, hparams), model, data,
                       dataclasses.replace(config, seed=setting['seed']))
    single = sim.run(sim.init(), progress=False)
    chex.assert_trees_all_close(jax.tree.map(lambda x, s=s: x[s], result.states.params),
                                single.state.params, rtol=1e-5, atol=1e-6)
    assert len(result.histories[s]) == len(single.history) == 2
    for mine, theirs in zip(result.histories[s], single.history):
      for key in ('train_loss', 'update_norm', 'client_drift_rms', 'test_accuracy', 'test_loss'):
        if key in theirs:
          np.testing.assert_allclose(mine[key], theirs[key], rtol=1e-5, atol=1e-6)
  # Different seeds and learning rates really give different simulations.
  finals = [h[-1]['test_loss'] for h in result.histories]
  assert len(set(np.round(finals, 6))) == 4


def test_sweep_compiles_each_block_length_once(setup):
  data, model, config = setup
  traces = []
  inner = registered_algorithm('fedavg', model.loss)

  def build(hyperparameters):
    traces.append(1)
    return inner(hyperparameters)

  sweep = Sweep(build, model, data, config, seeds=[0, 1],
                hyperparameters={'client_learning_rate': [0.05]})
  states = sweep.init()
  after_init = len(traces)
  sweep.init()  # the compiled init is reused
  assert len(traces) == after_init
  states, _ = sweep.run_rounds(states, 0, 2)
  states, _ = sweep.run_rounds(states, 2, 2)
  states, metrics = sweep.run_rounds(states, 4, 2)
  assert len(traces) == after_init + 1  # one trace of the length-2 block, reused
  assert metrics['train_loss'].shape == (2, 2)


def test_sweep_validation(setup):
  data, model, config = setup
  build = registered_algorithm('fedavg', model.loss)
  with pytest.raises(ValueError, match='at least one seed'):
    Sweep(build, model, data, config, seeds=[])
  with pytest.raises(ValueError, match='distinct'):
    Sweep(build, model, data, config, seeds=[1, 1])
  with pytest.raises(ValueError, match='mesh=None'):
    Sweep(build, model, data, config, seeds=[0],
          execution=fs.ClientExecution('vmap', None, fs.client_mesh()))
  sweep = Sweep(build, model, data, config, seeds=[0], hyperparameters={'learning_rate': [0.1]})
  with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['learning_rate'\] for "
                                       r"algorithm 'fedavg'; valid: client_learning_rate, "
                                       r"client_momentum, server_learning_rate"):
    sweep.init()
  # A field of Hyperparameters that FedAvg does not read is refused too (it would be ignored).
  sweep = Sweep(build, model, data, config, seeds=[0], hyperparameters={'tau': [0.1]})
  with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['tau'\] for algorithm"):
    sweep.init()
  with pytest.raises(ValueError, match="unknown algorithm 'fedavgg'"):
    registered_algorithm('fedavgg', model.loss)
