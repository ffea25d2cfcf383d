"""Bad input is a clear error at the boundary: data, losses, populations, API misuse.

Each test feeds one kind of bad input and checks that a `ValueError` names the bad
value and what is expected, instead of a run that silently learns the wrong thing.
"""

import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync.data import (dirichlet_partition, from_arrays, from_client_indices, load_npz,
                              shard_partition)
from fedjax_sync.data import registry
from fedjax_sync.simulate import AsyncConfig, constant_times, make_clock, registered_algorithm
from fedjax_sync.simulate.multihost import MultiHostSimulator


def _arrays(n=40, m=10, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, 2)).astype(np.float32), rng.integers(0, classes, n),
          rng.normal(size=(m, 2)).astype(np.float32), rng.integers(0, classes, m))


# ---------------------------------------------------------------------------- from_arrays


def test_from_arrays_checks_test_labels_like_train_labels():
  x, y, xt, yt = _arrays()
  with pytest.raises(ValueError, match=r'y_test labels must lie in \[0, 3\).*got \[0, 7\]'):
    from_arrays(x, y, xt, np.r_[yt[:-1], 7], num_clients=2, num_classes=3)
  with pytest.raises(ValueError, match=r'y_test labels must .*got \[-1'):
    from_arrays(x, y, xt, np.r_[yt[:-1], -1], num_clients=2, num_classes=3)


@pytest.mark.parametrize('split', ['y_train', 'y_test'])
def test_from_arrays_rejects_labels_that_would_wrap_in_int32(split):
  x, y, xt, yt = _arrays()
  labels = {'y_train': y.astype(np.int64), 'y_test': yt.astype(np.int64)}
  labels[split][0] = 2**32  # int32 would read 0: a silent relabelling
  with pytest.raises(ValueError, match=rf'{split} labels must be class indices.*4294967296'):
    from_arrays(x, labels['y_train'], xt, labels['y_test'], num_clients=2)


def test_from_arrays_rejects_empty_test_set_and_bad_inputs():
  x, y, xt, yt = _arrays()
  with pytest.raises(ValueError, match='test set is empty'):
    from_arrays(x, y, xt[:0], yt[:0], num_clients=2)
  with pytest.raises(ValueError, match='x_train holds 1 non-finite'):
    from_arrays(np.r_[x[:-1], [[np.nan, 0.0]]].astype(np.float32), y, xt, yt, num_clients=2)
  with pytest.raises(ValueError, match='x_test must be a numeric array, got dtype <U'):
    from_arrays(x, y, xt.astype(str), yt, num_clients=2)
  with pytest.raises(ValueError, match='x_train must be an array .* 0-d'):
    from_arrays(np.float32(1.0), y, xt, yt, num_clients=2)
  with pytest.raises(ValueError, match=r"unknown partition 'idd'; valid: iid, dirichlet, shards"):
    from_arrays(x, y, xt, yt, num_clients=2, partition='idd')


# ------------------------------------------------------------------ from_client_indices


def _examples(n=6):
  return {'x': np.arange(n, dtype=np.float32)[:, None], 'y': np.zeros(n, np.int32)}


TEST = {'x': np.zeros((2, 1), np.float32), 'y': np.zeros(2, np.int32)}


@pytest.mark.parametrize('indices,message', [
    ([[0, 1], [-1, 2]], r'client 1: indices must lie in \[0, 6\).*got \[-1, 2\]'),
    ([[0, 1], [2, 6]], r'client 1: indices must lie in \[0, 6\).*got \[2, 6\]'),
    ([[0.0, 1.0], [2]], r'client 0: indices must be integers, got dtype float64'),
    ([[0, 1], [1, 2]], r'1 example\(s\) are assigned more than once \(e.g. row 1, 2 times\)'),
    ([[0, 0]], r'more than once \(e.g. row 0, 2 times\)'),
    ([np.zeros((1, 2), np.int64)], r'client 0: indices must be a 1-D array'),
    ([], 'client_indices is empty'),
])
def test_from_client_indices_rejects_bad_indices(indices, message):
  with pytest.raises(ValueError, match=message):
    from_client_indices(_examples(), indices, TEST, num_classes=2, name='t')


def test_from_client_indices_accepts_a_subset_and_empty_clients():
  data = from_client_indices(_examples(), [[4, 0], [], np.array([5])], TEST, num_classes=2,
                             name='t')
  np.testing.assert_array_equal(data.counts, [2, 0, 1])
  np.testing.assert_array_equal(data.train['x'][:, 0], [4, 0, 5])


@pytest.mark.parametrize('owners,message', [
    (np.array([0, 2]), r'test_client ids must lie in \[0, 2\).*got \[0, 2\]'),
    (np.array([0, -1]), r'test_client ids must lie in \[0, 2\)'),
    (np.array([0]), r'test_client must be \[2\]'),
    (np.array([0.0, 1.0]), 'test_client must hold integer client ids'),
])
def test_from_client_indices_rejects_bad_test_client(owners, message):
  with pytest.raises(ValueError, match=message):
    from_client_indices(_examples(), [[0, 1], [2]], TEST, num_classes=2, name='t',
                        test_client=owners)


def test_from_client_indices_rejects_labels_outside_num_classes_and_empty_test():
  examples = _examples()
  examples['y'][3] = 5
  with pytest.raises(ValueError, match=r'train labels must lie in \[0, 2\).*got \[0, 5\]'):
    from_client_indices(examples, [[0, 1], [2, 3]], TEST, num_classes=2, name='t')
  with pytest.raises(ValueError, match='test set is empty'):
    from_client_indices(_examples(), [[0, 1]], {k: v[:0] for k, v in TEST.items()},
                        num_classes=2, name='t')


# ------------------------------------------------------------------------------ load_npz


def _npz(tmp_path, **arrays):
  path = tmp_path / 'data.npz'
  np.savez(path, **arrays)
  return str(path)


def test_load_npz_errors_name_the_file(tmp_path):
  x, y, xt, yt = _arrays()
  good = _npz(tmp_path, x_train=x, y_train=y, x_test=xt, y_test=yt)
  assert load_npz(good, num_clients=2, partition='iid').num_clients == 2

  renamed = tmp_path / 'array.npz'          # an .npy saved under a .npz name
  with open(renamed, 'wb') as f:
    np.save(f, x)
  with pytest.raises(ValueError, match=r"array\.npz' holds a single array \(an \.npy file\)"):
    load_npz(str(renamed))

  empty = tmp_path / 'empty.npz'
  empty.write_bytes(b'')
  with pytest.raises(ValueError, match=r"empty\.npz' is empty"):
    load_npz(str(empty))

  truncated = tmp_path / 'truncated.npz'
  data = open(good, 'rb').read()
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"truncated\.npz'.*(cannot be read|truncated)"):
    load_npz(str(truncated))

  scalars = _npz(tmp_path, x_train=np.float32(1), y_train=np.int64(0), x_test=xt, y_test=yt)
  with pytest.raises(ValueError, match=r"data\.npz': x_train is a 0-d array"):
    load_npz(scalars)

  labels = _npz(tmp_path, x_train=x, y_train=y, x_test=xt, y_test=np.r_[yt[:-1], 2**32])
  with pytest.raises(ValueError, match=r"data\.npz': y_test labels must be class indices"):
    load_npz(labels)


def test_load_npz_names_a_corrupt_member(tmp_path):
  x, y, xt, yt = _arrays()
  path = tmp_path / 'corrupt.npz'
  with zipfile.ZipFile(path, 'w') as z:
    for name, array in (('x_train', x), ('y_train', y), ('x_test', xt)):
      with z.open(f'{name}.npy', 'w') as f:
        np.save(f, array)
    z.writestr('y_test.npy', b'\x93NUMPY garbage')
  with pytest.raises(ValueError, match=r"corrupt\.npz': array 'y_test' cannot be read"):
    load_npz(str(path))


def test_unknown_options_are_rejected(tmp_path):
  x, y, xt, yt = _arrays()
  path = _npz(tmp_path, x_train=x, y_train=y, x_test=xt, y_test=yt)
  with pytest.raises(ValueError, match=r"unknown option\(s\) partiton .*valid: partition"):
    load_npz(path, partiton='iid')
  with pytest.raises(ValueError, match=r"unknown option\(s\) 'partiton' for dataset "
                                       r"'synthetic_pooled'; valid: .*partition"):
    registry.load_dataset('synthetic_pooled', partiton='iid')
  # The original Synthetic(α, β) is not a partition of anything: partition= is foreign.
  with pytest.raises(ValueError, match=r"'partition' for dataset 'synthetic'; valid: alpha, "
                                       r'beta, data_dir, num_clients, seed'):
    registry.load_dataset('synthetic', partition='iid')
  assert 'path' in registry.dataset_options('npz')


# ---------------------------------------------------------------------------- partitioners


def test_dirichlet_rejects_2d_labels_and_infinite_alpha_up_front():
  labels = np.random.default_rng(0).integers(0, 3, 30)
  with pytest.raises(ValueError, match=r'labels must be a 1-D array.*\(30, 3\).*argmax'):
    dirichlet_partition(np.eye(3, dtype=np.int64)[labels], 3, 0.5, seed=0)
  for alpha in (np.inf, float('nan'), -1.0, '0.5', True):
    with pytest.raises(ValueError, match='alpha must be > 0'):
      dirichlet_partition(labels, 3, alpha, seed=0)
  with pytest.raises(ValueError, match='labels must be integer class labels, got dtype float'):
    dirichlet_partition(labels.astype(float), 3, 0.5, seed=0)
  with pytest.raises(ValueError, match='labels must be a 1-D array'):
    shard_partition(labels[:, None], 3, 1, seed=0)
  with pytest.raises(ValueError, match='num_clients must be a positive integer, got True'):
    dirichlet_partition(labels, True, 0.5, seed=0)



# ------------------------------------------------------------------ populations and API


NUM_CLIENTS = 20
DATA = from_arrays(*_arrays(n=200, m=20, classes=3, seed=1), num_clients=NUM_CLIENTS,
                   partition='iid')
MODEL = fs.models.logistic_regression((2,), 3)
WORK = fs.LocalWork(batch_size=4, steps=2)
CONFIG = fs.SimulationConfig(num_rounds=2, clients_per_round=4, local_work=WORK, eval_every=2)
POPULATION = r'{} clients, but the data has 20 clients; build the algorithm with ' \
             r'num_clients=data.num_clients \(20\)'


@pytest.mark.parametrize('driver', ['Simulator', 'MultiHostSimulator'])
def test_scaffold_built_for_another_population_is_refused(driver):
  algorithm = fs.scaffold(MODEL.loss, 0.1, num_clients=5)
  if driver == 'Simulator':
    make = lambda a: fs.Simulator(a, MODEL, DATA, CONFIG)
  else:
    execution = fs.ClientExecution(mesh=fs.client_mesh())
    make = lambda a: MultiHostSimulator(a, MODEL, DATA, CONFIG, execution=execution)
  with pytest.raises(ValueError, match="'scaffold' was built with num_clients = " +
                     POPULATION.format(5)):
    make(algorithm)
  # Without the declared size, the per-client state's leading axis gives it away.
  undeclared = algorithm._replace(num_clients=None)
  simulator = make(undeclared)
  with pytest.raises(ValueError, match=r"keeps per-client state \(client_states\[.*"
                     r'of shape \(5, [0-9, ]+\)\) for ' + POPULATION.format(5)):
    simulator.init()


def test_fed_qs_built_for_another_population_is_refused():
  clock = make_clock(constant_times(NUM_CLIENTS))
  config = AsyncConfig(num_aggregations=2, buffer_size=4, local_work=WORK)
  with pytest.raises(ValueError, match="'fedqs-sgd' was built with num_clients = " +
                     POPULATION.format(100)):
    fs.SemiAsyncSimulator(fs.fed_qs_sgd(MODEL.loss, num_clients=100), MODEL, DATA, clock,
                          config)


def test_aggregator_state_population_is_checked_through_the_declared_size():
  aggregator = fs.chain(fs.aggregators.top_k(fraction=0.5), fs.weighted_mean())
  algorithm = fs.fed_avg(MODEL.loss, optax.sgd(0.1), aggregator=aggregator, num_clients=5)
  with pytest.raises(ValueError, match=POPULATION.format(5)):
    fs.Simulator(algorithm, MODEL, DATA, CONFIG)


def test_sweep_checks_the_population():
  build = registered_algorithm('scaffold', MODEL.loss, num_clients=5)
  sweep = fs.Sweep(build, MODEL, DATA, CONFIG, seeds=[0])
  with pytest.raises(ValueError, match=POPULATION.format(5)):
    sweep.init()


def test_async_algorithm_given_to_simulator_names_the_right_driver():
  with pytest.raises(ValueError, match=r"'fedbuff' is a semi-asynchronous algorithm.*"
                                       r'SemiAsyncSimulator\(algorithm, model, data, clock'):
    fs.Simulator(fs.fed_buff(MODEL.loss, optax.sgd(0.1)), MODEL, DATA, CONFIG)
  clock = make_clock(constant_times(NUM_CLIENTS))
  config = AsyncConfig(num_aggregations=2, buffer_size=4, local_work=WORK)
  with pytest.raises(ValueError, match=r'SemiAsyncSimulator needs an AsyncAlgorithm.*'
                                       r'run it with Simulator'):
    fs.SemiAsyncSimulator(fs.fed_avg(MODEL.loss, optax.sgd(0.1)), MODEL, DATA, clock, config)


def test_scaffold_without_num_clients_names_the_fix():
  with pytest.raises(ValueError, match=r'needs num_clients.*num_clients=data.num_clients'):
    fs.scaffold(MODEL.loss, 0.1)
  with pytest.raises(ValueError, match=r'needs num_clients.*num_clients=data.num_clients'):
    fs.build_algorithm('scaffold', MODEL.loss, fs.Hyperparameters())


@pytest.mark.parametrize('algorithm,name', [('fedavg', 'client_momentum')])
def test_sweep_over_an_untraceable_hyperparameter_names_it(algorithm, name):
  build = registered_algorithm(algorithm, MODEL.loss)
  sweep = fs.Sweep(build, MODEL, DATA, CONFIG, seeds=[0],
                   hyperparameters={name: [0.1, 0.5], 'client_learning_rate': [0.1]})
  with pytest.raises(ValueError, match=rf"cannot sweep '{name}' in one compiled program.*"
                                       rf"one Sweep \(or Simulator\) per value of '{name}'"):
    sweep.run(sweep.init())


def test_fedprox_mu_traces_so_it_can_be_swept():
  # μ used to select a code path in Python (`if mu:`); a traced μ keeps the term.
  sweep = fs.Sweep(registered_algorithm('fedprox', MODEL.loss), MODEL, DATA, CONFIG, seeds=[0],
                   hyperparameters={'mu': [0.0, 0.5]})
  assert sweep.untraceable_hyperparameters(['mu', 'client_learning_rate']) == []


def test_sweep_rejects_non_numeric_values():
  build = registered_algorithm('scaffold', MODEL.loss, num_clients=NUM_CLIENTS)
  with pytest.raises(ValueError, match=r"hyperparameter 'scaffold_option': swept values must be "
                                       r"numbers, got 'I'"):
    fs.Sweep(build, MODEL, DATA, CONFIG, seeds=[0], hyperparameters={'scaffold_option': ['I']})


# --------------------------------------------------------------------- per-example losses


def _mean_loss(params, batch, key):
  return jnp.mean(MODEL.loss(params, batch, key))


@pytest.mark.parametrize('build', [
    lambda loss: fs.fed_avg(loss, optax.sgd(0.1)),
    lambda loss: fs.fed_sgd(loss),
    lambda loss: fs.scaffold(loss, 0.1, num_clients=NUM_CLIENTS),
], ids=['fedavg', 'fedsgd', 'scaffold'])
def test_a_loss_returning_a_scalar_is_an_error_when_traced(build):
  simulator = fs.Simulator(build(_mean_loss), MODEL, DATA, CONFIG)
  with pytest.raises(ValueError, match=r'must return per-example losses of shape \[B\] = '
                                       r'\(4,\).*got shape \(\) \(a scalar.*without \.mean'):
    simulator.run(simulator.init(), progress=False)


def test_local_step_checks_the_loss_shape():
  step = fs.make_local_step(lambda p, b, k: b['x'] @ p, optax.sgd(0.1))
  batch = {'x': jnp.ones((3, 2))}
  params = jnp.zeros((2,))
  args = (params, optax.sgd(0.1).init(params), batch, jnp.ones((3,), bool), jax.random.key(0))
  jax.eval_shape(step, *args)  # the check runs while tracing: no need to execute
  bad = fs.make_local_step(lambda p, b, k: b['x'] * p[None], optax.sgd(0.1))  # [B, 2]
  with pytest.raises(ValueError, match=r'got shape \(3, 2\)'):
    jax.eval_shape(bad, *args)


# --------------------------------------------------------------------------- device count

# The README's stated tolerance: sharding the client axis over devices changes only
# the order of float sums and how XLA vectorizes each shard's clients, so float32
# results agree to this fraction of the state's largest value, not bitwise
# (measured 3.4e-7 on this test's run).
DEVICE_COUNT_RTOL = 2e-6


def test_sharded_run_agrees_with_one_device_within_the_readme_tolerance():
  assert len(jax.devices()) == 4, 'conftest sets 4 simulated CPU devices'
  config = fs.SimulationConfig(num_rounds=10, clients_per_round=8, local_work=WORK,
                               eval_every=10, per_client_eval=False)
  finals = []
  for mesh in (None, fs.client_mesh()):
    execution = fs.ClientExecution('vmap', None, mesh)
    algorithm = fs.scaffold(MODEL.loss, 0.1, num_clients=NUM_CLIENTS, execution=execution)
    simulator = fs.Simulator(algorithm, MODEL, DATA, config, execution=execution)
    state = simulator.run(simulator.init(), progress=False).state
    finals.append(np.concatenate([np.ravel(x) for x in jax.tree.leaves(
        (state.params, state.client_states, state.extra))]))
  one, four = finals
  scale = np.abs(one).max()
  assert scale > 0.1  # the run moved the model: the comparison is not trivially 0 = 0
  assert np.abs(one - four).max() <= DEVICE_COUNT_RTOL * scale
