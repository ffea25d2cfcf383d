"""Bad input is a clear error at the boundary: data, losses, populations, API misuse.

Each test feeds one kind of bad input and checks that a `ValueError` names the bad
value and what is expected, instead of a run that silently learns the wrong thing.
"""

import zipfile

import numpy as np
import pytest

from fedjax_sync.data import (dirichlet_partition, from_arrays, from_client_indices, load_npz,
                              shard_partition)
from fedjax_sync.data import registry


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
