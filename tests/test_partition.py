"""Partition invariants: exact cover, seeded determinism, α → ∞ tends to IID, one class per shard."""

import numpy as np
import pytest

from fedjax_sync.data import dirichlet_partition, iid_partition, shard_partition
from fedjax_sync.data.npz import partition_labels


def _labels(n=600, classes=10, seed=0):
  return np.random.default_rng(seed).integers(0, classes, n)


def _assert_exact_cover(parts, n):
  flat = np.concatenate(parts)
  assert flat.shape[0] == n
  np.testing.assert_array_equal(np.sort(flat), np.arange(n))


PARTITIONS = [
    ('iid', {}),
    ('dirichlet', dict(alpha=0.1)),
    ('dirichlet', dict(alpha=0.1, method='per_client')),
    ('dirichlet', dict(alpha=2.0)),
    ('shards', dict(shards_per_client=2)),
    ('shards', dict(shards_per_client=1)),
]


@pytest.mark.parametrize('partition,options', PARTITIONS)
def test_every_example_assigned_exactly_once(partition, options):
  labels = _labels()
  parts = partition_labels(labels, 10, partition=partition, seed=3, **options)
  assert len(parts) == 10
  _assert_exact_cover(parts, labels.shape[0])


@pytest.mark.parametrize('partition,options', PARTITIONS)
def test_seeded_determinism(partition, options):
  labels = _labels()
  a = partition_labels(labels, 10, partition=partition, seed=7, **options)
  b = partition_labels(labels, 10, partition=partition, seed=7, **options)
  c = partition_labels(labels, 10, partition=partition, seed=8, **options)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(x.shape != y.shape or np.any(x != y) for x, y in zip(a, c))


def _label_skew(labels, parts, classes):
  """Mean total-variation distance between client label histograms and the global one."""
  glob = np.bincount(labels, minlength=classes) / labels.shape[0]
  tv = [0.5 * np.abs(np.bincount(labels[p], minlength=classes) / max(len(p), 1) - glob).sum()
        for p in parts]
  return float(np.mean(tv))


@pytest.mark.parametrize('method', ['per_class', 'per_client'])
def test_large_alpha_tends_to_iid(method):
  labels = _labels(n=5000)
  skews = [_label_skew(labels, dirichlet_partition(labels, 5, a, seed=0, method=method), 10)
           for a in (0.1, 1.0, 100.0, 1e4)]
  assert skews[0] > skews[1] > skews[2] > skews[3] - 1e-9  # monotone in alpha
  iid = _label_skew(labels, iid_partition(5000, 5, seed=0), 10)
  # At alpha = 1e4 the skew is within sampling noise of the IID split.
  assert skews[3] < 2 * iid + 0.01
  assert skews[0] > 5 * iid


def test_one_class_shards_hold_one_class():
  labels = np.repeat(np.arange(10), np.arange(30, 130, 10))  # unequal class sizes
  parts = shard_partition(labels, 10, 1, seed=0)
  classes = [set(labels[p].tolist()) for p in parts]
  assert all(len(c) == 1 for c in classes)
  assert set().union(*classes) == set(range(10))
  _assert_exact_cover(parts, labels.shape[0])
  # Two shards per client: at most two classes each, and the shards never mix classes.
  parts2 = shard_partition(labels, 10, 2, seed=0)
  assert all(len(set(labels[p].tolist())) <= 2 for p in parts2)


def test_partition_errors_name_bad_values():
  labels = _labels(n=50)
  with pytest.raises(ValueError, match='alpha must be > 0, got 0'):
    dirichlet_partition(labels, 5, 0.0, seed=0)
  with pytest.raises(ValueError, match="method must be 'per_class' or 'per_client', got 'x'"):
    dirichlet_partition(labels, 5, 1.0, seed=0, method='x')
  with pytest.raises(ValueError, match='cannot split 50 examples among 60'):
    iid_partition(50, 60, seed=0)
  with pytest.raises(ValueError, match='shards cannot hold 10 classes'):
    shard_partition(labels, 5, 1, seed=0)
