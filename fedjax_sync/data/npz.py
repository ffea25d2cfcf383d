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
import zipfile
import zlib
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
    y_train: `[n]` integer training labels, or `[n, T]` next-token targets of token
      sequences `x_train [n, T]` (then only partition='iid' applies).
    x_test: `[m, ...]` global test inputs.
    y_test: `[m]` integer test labels (`[m, T]` with sequences).
    num_clients: number of clients N.
    num_classes: number of classes (default: `max(label) + 1` over both splits).
    partition: 'iid', 'dirichlet' or 'shards' (see `partition_labels`).
    alpha: Dirichlet concentration.
    shards_per_client: shards per client.
    seed: partition seed.
    method: Dirichlet reading.
    name: description stored in the data.
  """
  x_train, x_test = _inputs(x_train, 'x_train'), _inputs(x_test, 'x_test')
  y_train, y_test = _labels(y_train, 'y_train'), _labels(y_test, 'y_test')
  if x_train.shape[0] != y_train.shape[0] or x_test.shape[0] != y_test.shape[0]:
    raise ValueError(f'inputs and labels disagree on rows: x_train {x_train.shape}, y_train '
                     f'{y_train.shape}, x_test {x_test.shape}, y_test {y_test.shape}')
  if x_train.shape[1:] != x_test.shape[1:]:
    raise ValueError(f'train and test inputs differ in shape: {x_train.shape[1:]} vs '
                     f'{x_test.shape[1:]}')
  if y_test.shape[0] == 0:
    raise ValueError('the test set is empty (x_test/y_test have 0 rows); evaluation needs at '
                     'least one test example')
  if num_classes is None:
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
  if (not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool)
      or not 1 <= num_classes <= _MAX_CLASSES):
    raise ValueError(f'num_classes must be an integer in [1, {_MAX_CLASSES}], got '
                     f'{num_classes!r}')
  for what, y in (('y_train', y_train), ('y_test', y_test)):
    if y.size and (y.min() < 0 or y.max() >= num_classes):
      raise ValueError(f'{what} labels must lie in [0, {num_classes}) (num_classes='
                       f'{num_classes}), got [{y.min()}, {y.max()}]')
  y_train, y_test = y_train.astype(np.int32), y_test.astype(np.int32)
  if partition not in PARTITIONS:
    raise ValueError(f'unknown partition {partition!r}; valid: {", ".join(PARTITIONS)}')
  if y_train.ndim == 2 and partition != 'iid':
    raise ValueError(f'token-sequence labels y [n, T] {y_train.shape} have no class per example '
                     f"to skew by; partition {partition!r} needs [n] labels, use partition='iid'")
  if y_train.ndim == 2 and (y_train.shape != x_train.shape or y_test.shape != x_test.shape):
    raise ValueError(f'token sequences need x and y of the same shape [n, T], got x_train '
                     f'{x_train.shape}, y_train {y_train.shape}, x_test {x_test.shape}, y_test '
                     f'{y_test.shape}')
  parts = partition_labels(y_train, num_clients, partition=partition, alpha=alpha,
                           shards_per_client=shards_per_client, seed=seed, method=method)
  detail = {'iid': 'iid', 'dirichlet': f'dirichlet α={alpha:g}',
            'shards': f'{shards_per_client} shard(s)/client'}[partition]
  return from_client_indices({'x': x_train, 'y': y_train}, parts, {'x': x_test, 'y': y_test},
                             num_classes=num_classes,
                             name=f'{name} ({num_clients} clients, {detail})')


# Labels are stored as int32 (one-hot and gathers on the device); more classes than
# that cannot be represented, and a label such as 2**32 must not wrap around to 0.
_MAX_CLASSES = 2**31 - 1


def _labels(y, what: str) -> np.ndarray:
  """Integer labels `[n]`, or token targets `[n, T]`, in their own dtype (range-checked
  before any cast)."""
  y = np.asarray(y)
  if y.ndim not in (1, 2) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'{what} must be integer labels [n] or token sequences [n, T], got '
                     f'{y.dtype} {y.shape}')
  if y.size and (y.min() < 0 or y.max() >= _MAX_CLASSES):
    raise ValueError(f'{what} labels must be class indices in [0, {_MAX_CLASSES}), got '
                     f'[{y.min()}, {y.max()}] (they are stored as int32)')
  return y


def _inputs(x, what: str) -> np.ndarray:
  """A numeric `[n, ...]` input array with finite values."""
  x = np.asarray(x)
  if x.ndim == 0:
    raise ValueError(f'{what} must be an array [n, ...] with one row per example, got a '
                     f'0-d array (a scalar)')
  if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
    raise ValueError(f'{what} must be a numeric array, got dtype {x.dtype}')
  if np.issubdtype(x.dtype, np.complexfloating):
    raise ValueError(f'{what} must be real-valued, got dtype {x.dtype}')
  if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    raise ValueError(f'{what} holds {bad} non-finite value(s) (NaN or Inf); clean or drop '
                     'those examples first')
  return x


def load_npz(path: str, *, num_clients: int = 10, **options) -> FederatedData:
  """Loads `x_train, y_train, x_test, y_test` from a local `.npz` file (no pickle).

  Args:
    path: the file.
    num_clients: number of clients.
    **options: partition options of `from_arrays` (partition, alpha,
      shards_per_client, seed, method, num_classes).
  """
  if not path:
    raise ValueError("the 'npz' dataset needs its file; valid: --data-path FILE.npz (Python: "
                     f'path=), an .npz archive holding {", ".join(NPZ_KEYS)}')
  unknown = sorted(set(options) - set(NPZ_OPTIONS))
  if unknown:
    raise ValueError(f'unknown option(s) {", ".join(unknown)} for an npz dataset; valid: '
                     f'{", ".join(NPZ_OPTIONS)}')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'npz file {path!r} not found (expected a .npz with '
                            f'{", ".join(NPZ_KEYS)})')
  arrays = _read_npz(path)
  try:
    return from_arrays(*(arrays[k] for k in NPZ_KEYS), num_clients=num_clients,
                       name=os.path.basename(path), **options)
  except ValueError as e:
    raise ValueError(f'npz file {path!r}: {e}') from e


# Options of `from_arrays` that `load_npz` forwards.
NPZ_OPTIONS = ('partition', 'alpha', 'shards_per_client', 'seed', 'method', 'num_classes')


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """The four arrays of an `.npz` archive; any unreadable content is a ValueError naming it."""
  needs = f'needs an .npz archive holding {", ".join(NPZ_KEYS)} (np.savez(path, x_train=...))'
  if os.path.getsize(path) == 0:
    raise ValueError(f'npz file {path!r} is empty; it {needs}')
  try:
    loaded = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f'npz file {path!r} cannot be read ({type(e).__name__}: {e}); it '
                     f'{needs}') from e
  if not isinstance(loaded, np.lib.npyio.NpzFile):
    raise ValueError(f'npz file {path!r} holds a single array (an .npy file), not an .npz '
                     f'archive; it {needs}')
  arrays = {}
  with loaded as f:
    missing = [k for k in NPZ_KEYS if k not in f.files]
    if missing:
      raise ValueError(f'npz file {path!r} lacks {", ".join(missing)}; it has '
                       f'{", ".join(f.files) or "nothing"} (needs {", ".join(NPZ_KEYS)})')
    for k in NPZ_KEYS:
      try:
        arrays[k] = f[k]
      except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f'npz file {path!r}: array {k!r} cannot be read ({type(e).__name__}: '
                         f'{e}); the file may be truncated or hold pickled objects') from e
  for k in NPZ_KEYS:
    if arrays[k].ndim == 0:
      raise ValueError(f'npz file {path!r}: {k} is a 0-d array (a scalar); it must have one '
                       'row per example')
  return arrays



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
