"""The federated data container: every client's examples on the host.

Layout: the examples of all clients are stored as flat arrays sorted by client,
with per-client `offsets` and `counts` (client k owns rows
`offsets[k] : offsets[k] + counts[k]`). This is compact for heavy-tailed client
sizes and for millions of clients, where a padded `[N, max_n, ...]` layout wastes
memory. Batches `[C, S, B, ...]` are gathered from these arrays inside the compiled
round (see `fedjax_sync.data.batching`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class FederatedData:
  """Every client's training examples plus a global test set, on the host.

  Attributes:
    train: flat training examples, `{'x': [n, ...], 'y': [n]}`, sorted by client; for
      token sequences `{'x': [n, T], 'y': [n, T]}` (next-token targets, PAD = 0; see
      `fedjax_sync.models.sequence`).
    offsets: `[N]` int64 start row of each client in `train`.
    counts: `[N]` int64 number of training examples of each client.
    test: global test set `{'x': [m, ...], 'y': [m]}`.
    test_client: `[m]` int32 owner of each test example when the dataset has
      per-client test splits (e.g. FedProx's Synthetic), else None; per-client
      accuracy is then measured on each client's own training data.
    num_classes: number of label classes (the vocabulary size for token sequences).
    name: a short description used in run directories.
  """

  train: Mapping[str, np.ndarray]
  offsets: np.ndarray
  counts: np.ndarray
  test: Mapping[str, np.ndarray]
  test_client: np.ndarray | None
  num_classes: int
  name: str = 'federated'

  def __post_init__(self):
    n = _num_rows(self.train, 'train')
    m = _num_rows(self.test, 'test')
    if self.offsets.shape != self.counts.shape or self.offsets.ndim != 1:
      raise ValueError(f'offsets {self.offsets.shape} and counts {self.counts.shape} '
                       'must both be [num_clients]')
    if np.any(self.counts < 0):
      raise ValueError('client counts must be non-negative')
    expected = np.concatenate([[0], np.cumsum(self.counts)[:-1]]) if len(self.counts) else self.counts
    if not np.array_equal(self.offsets, expected) or int(self.counts.sum()) != n:
      raise ValueError('offsets/counts must describe contiguous client blocks covering '
                       f'all {n} training rows')
    if m == 0:
      raise ValueError('the test set is empty (0 rows); evaluation needs at least one test '
                       'example')
    if (not isinstance(self.num_classes, (int, np.integer)) or isinstance(self.num_classes, bool)
        or self.num_classes < 1):
      raise ValueError(f'num_classes must be a positive integer, got {self.num_classes!r}')
    for split, arrays in (('train', self.train), ('test', self.test)):
      labels = arrays.get('y')
      if (labels is not None and np.issubdtype(np.asarray(labels).dtype, np.integer)
          and labels.size and (labels.min() < 0 or labels.max() >= self.num_classes)):
        raise ValueError(f'{split} labels must lie in [0, {self.num_classes}) (num_classes='
                         f'{self.num_classes}), got [{labels.min()}, {labels.max()}]')
    if self.test_client is not None:
      owners = np.asarray(self.test_client)
      if owners.shape != (m,):
        raise ValueError(f'test_client must be [{m}] (one owner per test example), got '
                         f'{owners.shape}')
      if not np.issubdtype(owners.dtype, np.integer):
        raise ValueError(f'test_client must hold integer client ids, got dtype {owners.dtype}')
      if owners.min() < 0 or owners.max() >= self.num_clients:
        raise ValueError(f'test_client ids must lie in [0, {self.num_clients}) (the clients), '
                         f'got [{owners.min()}, {owners.max()}]')

  @property
  def num_clients(self) -> int:
    return int(self.counts.shape[0])

  @property
  def num_examples(self) -> int:
    return int(self.counts.sum())

  def client(self, k: int) -> dict[str, np.ndarray]:
    """The training examples of client `k` (a view, for inspection and tests)."""
    if not 0 <= k < self.num_clients:
      raise IndexError(f'client {k} out of range [0, {self.num_clients})')
    start, n = int(self.offsets[k]), int(self.counts[k])
    return {name: arr[start:start + n] for name, arr in self.train.items()}

  def host_bytes_per_client(self) -> float:
    """Host memory per client: examples plus offsets and counts."""
    total = sum(a.nbytes for a in self.train.values()) + self.offsets.nbytes + self.counts.nbytes
    return total / max(self.num_clients, 1)


def data_fingerprint(data: FederatedData) -> dict:
  """What identifies a federated dataset: its client sizes and a SHA-256 of its contents.

  The hash covers the number of classes, the per-client counts (int64) and every
  train and test array (name, dtype, shape and bytes) in client order, plus the
  test owners when there are any. The same data partitioned the same way gives the
  same fingerprint; another partition, another data seed or an edited file gives
  another. Computed once on the host arrays (about 1 s per GB).

  Returns:
    `{'sha256': hex, 'num_clients', 'num_examples', 'counts': {'min', 'median',
    'max', 'mean'}}` (JSON-serializable).
  """
  import hashlib

  h = hashlib.sha256()
  h.update(f'classes={int(data.num_classes)};'.encode())
  h.update(np.ascontiguousarray(data.counts, dtype='<i8').tobytes())
  for split, arrays in (('train', data.train), ('test', data.test)):
    for name in sorted(arrays):
      array = np.ascontiguousarray(arrays[name])
      h.update(f'{split}/{name}:{array.dtype.str}:{array.shape};'.encode())
      h.update(array.reshape(-1).view(np.uint8))
  if data.test_client is not None:
    h.update(np.ascontiguousarray(data.test_client, dtype='<i8').tobytes())
  counts = np.asarray(data.counts)
  summary = ({'min': int(counts.min()), 'median': float(np.median(counts)),
              'max': int(counts.max()), 'mean': round(float(counts.mean()), 3)}
             if counts.size else {})
  return {'sha256': h.hexdigest(), 'num_clients': data.num_clients,
          'num_examples': data.num_examples, 'counts': summary}


def _num_rows(arrays: Mapping[str, np.ndarray], what: str) -> int:
  if not arrays:
    raise ValueError(f'{what} must hold at least one array')
  rows = {k: v.shape[0] for k, v in arrays.items()}
  if len(set(rows.values())) != 1:
    raise ValueError(f'{what} arrays disagree on the number of rows: {rows}')
  return next(iter(rows.values()))


def from_client_indices(examples: Mapping[str, np.ndarray],
                        client_indices: Sequence[np.ndarray],
                        test: Mapping[str, np.ndarray], *,
                        num_classes: int, name: str,
                        test_client: np.ndarray | None = None) -> FederatedData:
  """Builds a `FederatedData` from a centralized dataset and a partition.

  Args:
    examples: centralized training arrays, e.g. `{'x': [n, ...], 'y': [n]}`.
    client_indices: one index array per client (e.g. from a partitioner).
    test: global test arrays.
    num_classes: number of label classes.
    name: description.
    test_client: optional `[m]` owner of each test example.

  Raises:
    ValueError: an index that is negative, not an integer, out of range or given
      twice (to one client or two); a `test_client` of the wrong shape or with ids
      outside `[0, num_clients)`; an empty test set.
  """
  n = _num_rows(examples, 'examples')
  indices = [_client_index_array(ix, k, n) for k, ix in enumerate(client_indices)]
  if not indices:
    raise ValueError('client_indices is empty; give one index array per client')
  counts = np.array([len(ix) for ix in indices], dtype=np.int64)
  order = np.concatenate(indices)
  uses = np.bincount(order, minlength=n)
  if uses.size and uses.max() > 1:
    repeated = np.flatnonzero(uses > 1)
    raise ValueError(f'{repeated.size} example(s) are assigned more than once (e.g. row '
                     f'{int(repeated[0])}, {int(uses[repeated[0]])} times); each example '
                     'may belong to at most one client')
  if test_client is not None:
    test_client = np.asarray(test_client)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  train = {k: np.ascontiguousarray(v[order]) for k, v in examples.items()}
  return FederatedData(train=train, offsets=offsets, counts=counts, test=dict(test),
                       test_client=test_client, num_classes=num_classes, name=name)


def _client_index_array(indices, client: int, num_examples: int) -> np.ndarray:
  """Client `client`'s row indices as int64, checked against `num_examples` rows."""
  ix = np.asarray(indices)
  if ix.ndim != 1:
    raise ValueError(f'client {client}: indices must be a 1-D array, got shape {ix.shape}')
  if ix.size == 0:
    return np.zeros((0,), np.int64)
  if not np.issubdtype(ix.dtype, np.integer):
    raise ValueError(f'client {client}: indices must be integers, got dtype {ix.dtype}')
  if ix.min() < 0 or ix.max() >= num_examples:
    raise ValueError(f'client {client}: indices must lie in [0, {num_examples}) (the rows of '
                     f'examples), got [{ix.min()}, {ix.max()}]')
  return ix.astype(np.int64)
