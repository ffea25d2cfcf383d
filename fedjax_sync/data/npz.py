"""Centralized arrays → a partitioned `FederatedData`; the local `.npz` file source.

Every centralized source (TFDS, scikit-learn's digits, a user's `.npz` file, the
pooled synthetic data) goes through `from_arrays`, so all of them offer the same
partitions: `iid`, `dirichlet` (label skew with concentration α, Yurochkin et al.
2019 / Hsu et al. 2019 arXiv 1909.06335) and `shards` (McMahan et al. 2017, arXiv
1602.05629: `shards_per_client` single-class shards per client; 10 clients × 1 shard
on a 10-class dataset is the "one class per client" extreme).
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from fedjax_sync.data.federated import FederatedData, from_client_indices
from fedjax_sync.data.partition import dirichlet_partition, iid_partition, shard_partition

PARTITIONS = ('iid', 'dirichlet', 'shards')
NPZ_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')


def partition_labels(labels: np.ndarray, num_clients: int, *, partition: str = 'dirichlet',
                     alpha: float = 0.5, shards_per_client: int = 2, seed: int = 0,
                     method: str = 'per_class') -> list[np.ndarray]:
  """Index arrays `[n_k]` of each client for a named partition of `labels [n]`.

  Args:
    labels: `[n]` integer labels of the centralized training set.
    num_clients: number of clients N.
    partition: one of `PARTITIONS`.
    alpha: Dirichlet concentration (dirichlet only).
    shards_per_client: single-class shards per client (shards only).
    seed: seed of the partition.
    method: Dirichlet reading, 'per_class' or 'per_client' (see `dirichlet_partition`).
  """
  if partition == 'iid':
    return iid_partition(int(labels.shape[0]), num_clients, seed)
  if partition == 'dirichlet':
    return dirichlet_partition(labels, num_clients, alpha, seed, method=method)
  if partition == 'shards':
    return shard_partition(labels, num_clients, shards_per_client, seed)
  raise ValueError(f'unknown partition {partition!r}; valid: {", ".join(PARTITIONS)}')


def from_arrays(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                y_test: np.ndarray, *, num_clients: int, num_classes: int | None = None,
                partition: str = 'dirichlet', alpha: float = 0.5, shards_per_client: int = 2,
                seed: int = 0, method: str = 'per_class', name: str = 'arrays') -> FederatedData:
  """Partitions a centralized labelled dataset among `num_clients` clients.

  Arrays are kept in their dtype (uint8 images stay uint8: the models scale integer
  inputs to [0, 1] on the device), labels become int32.

  Args:
    x_train: `[n, ...]` training inputs.
    y_train: `[n]` integer training labels.
    x_test: `[m, ...]` global test inputs.
    y_test: `[m]` integer test labels.
    num_clients: number of clients N.
    num_classes: number of classes (default: `max(label) + 1` over both splits).
    partition: 'iid', 'dirichlet' or 'shards' (see `partition_labels`).
    alpha: Dirichlet concentration.
    shards_per_client: shards per client.
    seed: partition seed.
    method: Dirichlet reading.
    name: description stored in the data.
  """
  x_train, x_test = np.asarray(x_train), np.asarray(x_test)
  y_train, y_test = _labels(y_train, 'y_train'), _labels(y_test, 'y_test')
  if x_train.shape[0] != y_train.shape[0] or x_test.shape[0] != y_test.shape[0]:
    raise ValueError(f'inputs and labels disagree on rows: x_train {x_train.shape}, y_train '
                     f'{y_train.shape}, x_test {x_test.shape}, y_test {y_test.shape}')
  if x_train.shape[1:] != x_test.shape[1:]:
    raise ValueError(f'train and test inputs differ in shape: {x_train.shape[1:]} vs '
                     f'{x_test.shape[1:]}')
  if x_train.dtype == object or x_test.dtype == object:
    raise ValueError('inputs must be numeric arrays, got dtype object')
  if num_classes is None:
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
  if y_train.size and (y_train.min() < 0 or y_train.max() >= num_classes):
    raise ValueError(f'labels must lie in [0, {num_classes}), got [{y_train.min()}, '
                     f'{y_train.max()}]')
  parts = partition_labels(y_train, num_clients, partition=partition, alpha=alpha,
                           shards_per_client=shards_per_client, seed=seed, method=method)
  detail = {'iid': 'iid', 'dirichlet': f'dirichlet α={alpha:g}',
            'shards': f'{shards_per_client} shard(s)/client'}[partition]
  return from_client_indices({'x': x_train, 'y': y_train}, parts, {'x': x_test, 'y': y_test},
                             num_classes=num_classes,
                             name=f'{name} ({num_clients} clients, {detail})')


def _labels(y, what: str) -> np.ndarray:
  y = np.asarray(y)
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'{what} must be a 1-D integer label array, got {y.dtype} {y.shape}')
  return y.astype(np.int32)


def load_npz(path: str, *, num_clients: int = 10, **options) -> FederatedData:
  """Loads `x_train, y_train, x_test, y_test` from a local `.npz` file (no pickle).

  Args:
    path: the file.
    num_clients: number of clients.
    **options: partition options of `from_arrays` (partition, alpha,
      shards_per_client, seed, method, num_classes).
  """
  if not path:
    raise ValueError("the 'npz' dataset needs path=<file.npz> holding "
                     f'{", ".join(NPZ_KEYS)}')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'npz file {path!r} not found (expected a .npz with '
                            f'{", ".join(NPZ_KEYS)})')
  with np.load(path, allow_pickle=False) as f:
    missing = [k for k in NPZ_KEYS if k not in f.files]
    if missing:
      raise ValueError(f'npz file {path!r} lacks {", ".join(missing)}; it has '
                       f'{", ".join(f.files) or "nothing"} (needs {", ".join(NPZ_KEYS)})')
    arrays = {k: f[k] for k in NPZ_KEYS}
  return from_arrays(*(arrays[k] for k in NPZ_KEYS), num_clients=num_clients,
                     name=os.path.basename(path), **options)



def repartition(data: FederatedData, num_clients: int, *, partition: str = 'dirichlet',
                alpha: float = 0.5, shards_per_client: int = 2, seed: int = 0,
                method: str = 'per_class', name: str | None = None) -> FederatedData:
  """Pools a federated dataset's training examples and partitions them anew.

  E.g. the label-skew studies on the embedded default pool FedProx's Synthetic(1, 1)
  examples and split them with Dirichlet(α). The global test set is kept; per-client
  test splits are dropped (per-client accuracy is then measured on training data).
  """
  return from_arrays(data.train['x'], data.train['y'], data.test['x'], data.test['y'],
                     num_clients=num_clients, num_classes=data.num_classes, partition=partition,
                     alpha=alpha, shards_per_client=shards_per_client, seed=seed, method=method,
                     name=name or f'pooled {data.name}')
