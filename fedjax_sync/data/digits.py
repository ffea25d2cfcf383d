"""Real 8×8 handwritten digits from scikit-learn, offline (the `digits` extra).

`sklearn.datasets.load_digits` ships 1,797 real digits (UCI optical recognition of
handwritten digits, 16 grey levels) inside the package, so real-image studies run
with no network. Pixels (0..16) are rescaled to uint8 0..255 and shaped
`[n, 8, 8, 1]`, like the TFDS image datasets; a seeded stratified 80/20 split gives
the global test set; the training part is partitioned with `from_arrays`.
"""

from __future__ import annotations

import numpy as np

from fedjax_sync.data.federated import FederatedData
from fedjax_sync.data.npz import from_arrays


def digits_arrays(test_fraction: float = 0.2, split_seed: int = 0):
  """`(x_train, y_train, x_test, y_test)`: uint8 `[n, 8, 8, 1]` images, int32 labels.

  The split is stratified per class and fixed by `split_seed`.
  """
  if not 0 < test_fraction < 1:
    raise ValueError(f'test_fraction must be in (0, 1), got {test_fraction!r}')
  try:
    from sklearn.datasets import load_digits
  except ImportError:
    raise ImportError("the 'digits' dataset needs scikit-learn: "
                      "pip install 'fedjax-sync[digits]'") from None
  raw = load_digits()
  images = np.round(raw.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = raw.target.astype(np.int32)
  rng = np.random.default_rng(split_seed)
  test = np.zeros(labels.shape[0], bool)
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test[idx[:int(round(test_fraction * idx.size))]] = True
  return images[~test], labels[~test], images[test], labels[test]


def digits(num_clients: int = 10, *, partition: str = 'dirichlet', alpha: float = 0.5,
           shards_per_client: int = 2, seed: int = 0, method: str = 'per_class',
           test_fraction: float = 0.2) -> FederatedData:
  """scikit-learn's 1,797 real 8×8 digits (10 classes), partitioned among clients.

  Example:
    >>> data = digits(5, partition='dirichlet', alpha=0.1, seed=0)
    >>> data.train['x'].shape, data.train['x'].dtype   # ((1438, 8, 8, 1), uint8)

  Args:
    num_clients: number of clients.
    partition: 'iid', 'dirichlet' or 'shards'.
    alpha: Dirichlet concentration.
    shards_per_client: single-class shards per client.
    seed: partition seed.
    method: Dirichlet reading ('per_class' or 'per_client').
    test_fraction: fraction held out as the global test set (stratified).
  """
  return from_arrays(*digits_arrays(test_fraction), num_clients=num_clients, num_classes=10,
                     partition=partition, alpha=alpha, shards_per_client=shards_per_client,
                     seed=seed, method=method, name='digits 8×8')
