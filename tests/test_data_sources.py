"""Data sources: TFDS through mock_data without TensorFlow, digits, .npz files."""

import os
import sys

import numpy as np
import pytest

from fedjax_sync.data import registry
from fedjax_sync.data.npz import from_arrays, load_npz
from fedjax_sync.data.tfds import TFDS_DATASETS, is_prepared, tfds_dataset

tfds = pytest.importorskip('tensorflow_datasets')


def _check_complete(data, num_clients):
  assert data.num_clients == num_clients
  assert int(data.counts.sum()) == data.train['y'].shape[0]


@pytest.mark.parametrize('name', sorted(TFDS_DATASETS))
def test_tfds_mock_loads_compact_arrays_without_tensorflow(name, tmp_path):
  spec = TFDS_DATASETS[name]
  # The TFDS reader itself: the registry's fashion_mnist prefers IDX files (Debian's)
  # when no TFDS copy is prepared, and mock_data prepares none on disk.
  with tfds.testing.mock_data(num_examples=24):
    data = tfds_dataset(name, 3, partition='iid', seed=1, data_dir=str(tmp_path))
  assert 'tensorflow' not in sys.modules
  _check_complete(data, 3)
  assert data.train['x'].dtype == np.uint8 and data.test['x'].dtype == np.uint8
  assert data.train['y'].dtype == np.int32
  assert data.train['x'].shape[0] == 24 and data.test['x'].shape[0] == 24
  assert data.train['x'].ndim == 4 and data.train['x'].shape[-1] in (1, 3)
  assert data.num_classes == spec.num_classes
  assert data.train['y'].min() >= 0 and data.train['y'].max() < spec.num_classes


def test_tfds_mock_values_are_those_of_the_source(tmp_path):
  with tfds.testing.mock_data(num_examples=10):
    source = tfds.data_source('mnist', split='test')
    expected = np.stack([np.asarray(source[i]['image']) for i in range(len(source))])
    labels = np.array([int(source[i]['label']) for i in range(len(source))])
    data = tfds_dataset('mnist', 2, partition='iid')
  np.testing.assert_array_equal(data.test['x'], expected)
  np.testing.assert_array_equal(data.test['y'], labels)


def test_tfds_unprepared_error_names_dataset_dir_and_command(tmp_path):
  where = str(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError) as info:
    tfds_dataset('fashion_mnist', 2, data_dir=where)
  message = str(info.value)
  assert "'fashion_mnist'" in message and where in message and 'tfds build fashion_mnist' in message
  assert not is_prepared('fashion_mnist', where)
  with pytest.raises(ValueError, match='valid: mnist'):
    tfds_dataset('svhn', 2)


def test_digits_is_real_and_offline():
  pytest.importorskip('sklearn')
  data = registry.load_dataset('digits', num_clients=5, partition='dirichlet', alpha=0.5, seed=0)
  _check_complete(data, 5)
  assert data.num_examples + data.test['y'].shape[0] == 1797
  assert data.train['x'].shape[1:] == (8, 8, 1) and data.train['x'].dtype == np.uint8
  assert data.train['x'].max() == 255
  # A stratified split: every class appears in the test set about 20% of the time.
  assert np.all(np.bincount(data.test['y'], minlength=10) >= 30)


def test_npz_round_trip_and_validation(tmp_path):
  rng = np.random.default_rng(0)
  arrays = dict(x_train=rng.integers(0, 255, (40, 4, 4, 1), dtype=np.uint8),
                y_train=np.repeat(np.arange(4), 10), x_test=np.zeros((8, 4, 4, 1), np.uint8),
                y_test=np.arange(8) % 4)
  path = str(tmp_path / 'mine.npz')
  np.savez(path, **arrays)
  data = load_npz(path, num_clients=4, partition='shards', shards_per_client=1, seed=0)
  _check_complete(data, 4)
  assert data.num_classes == 4
  assert sorted(len(set(data.client(k)['y'].tolist())) for k in range(4)) == [1, 1, 1, 1]
  # Every training row appears exactly once, unchanged.
  got = {tuple(r.ravel()) for r in data.train['x']}
  assert got == {tuple(r.ravel()) for r in arrays['x_train']}
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    load_npz(str(tmp_path / 'nope.npz'))
  bad = str(tmp_path / 'bad.npz')
  np.savez(bad, x_train=arrays['x_train'])
  with pytest.raises(ValueError, match='lacks y_train, x_test, y_test'):
    load_npz(bad)
  obj = str(tmp_path / 'obj.npz')
  np.savez(obj, **{**arrays, 'y_train': np.array([object()] * 40)})
  with pytest.raises(ValueError):  # object arrays need pickle, which is refused
    load_npz(obj)


def test_from_arrays_validation():
  x = np.zeros((10, 3), np.float32)
  y = np.arange(10) % 2
  with pytest.raises(ValueError, match="unknown partition 'zipf'; valid: iid, dirichlet, shards"):
    from_arrays(x, y, x, y, num_clients=2, partition='zipf')
  with pytest.raises(ValueError, match='disagree on rows'):
    from_arrays(x, y[:5], x, y, num_clients=2)
  with pytest.raises(ValueError, match='integer label'):
    from_arrays(x, y.astype(np.float32), x, y, num_clients=2)


def test_registry_keeps_synthetic_and_offers_pooled_label_skew():
  base = registry.load_dataset('synthetic', num_clients=30, seed=0)
  assert base.num_clients == 30 and base.test_client is not None
  pooled = registry.load_dataset('synthetic_pooled', num_clients=5, alpha=0.1, seed=0)
  _check_complete(pooled, 5)
  assert pooled.num_examples == base.num_examples
  np.testing.assert_array_equal(np.sort(pooled.train['y']), np.sort(base.train['y']))
  with pytest.raises(ValueError, match="unknown dataset 'nope'; valid: cifar10"):
    registry.load_dataset('nope')
