"""Synthetic(α, β) federated data of FedProx (Li et al. 2020, arXiv 1812.06127, §5.1).

Follows the authors' generator: α and β are used as standard deviations.
"""

from __future__ import annotations

import numpy as np

from fedjax_sync.data.federated import FederatedData

DIMENSION = 60
NUM_CLASSES = 10


def synthetic(alpha: float = 1.0, beta: float = 1.0, *, iid: bool = False,
              num_clients: int = 30, seed: int = 0, test_fraction: float = 0.1) -> FederatedData:
  """Synthetic(α, β) of FedProx, or its IID variant.

  Client k: `n_k = ⌊LogNormal(4, 2)⌋ + 50` examples; `u_k ~ N(0, α)`,
  `B_k ~ N(0, β)`; `W_k ∈ R^{60×10} ~ N(u_k, 1)`, `b_k ~ N(u_k, 1)`;
  `v_k ~ N(B_k, 1)` elementwise; `x ~ N(v_k, Σ)` with `Σ_jj = (j + 1)^(-1.2)`;
  `y = argmax softmax(x W_k + b_k)`. IID: one shared `W, b ~ N(0, 1)` and
  `v_k = 0`. Each client's examples are split 90/10 into train and a per-client
  test split; the global test set is the union of the test splits.

  Args:
    alpha: model heterogeneity (standard deviation of u_k).
    beta: data heterogeneity (standard deviation of B_k).
    iid: the IID variant (alpha and beta are then unused).
    num_clients: number of users (30 in FedProx).
    seed: numpy seed; the same seed gives the same data.
    test_fraction: fraction of each client's examples held out.
  """
  if num_clients < 1:
    raise ValueError(f'num_clients must be ≥ 1, got {num_clients}')
  if alpha < 0 or beta < 0:
    raise ValueError(f'alpha and beta must be ≥ 0, got alpha={alpha}, beta={beta}')
  if not 0 <= test_fraction < 1:
    raise ValueError(f'test_fraction must be in [0, 1), got {test_fraction}')
  rng = np.random.default_rng(seed)
  sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
  mean_w = rng.normal(0, alpha, num_clients)
  mean_x_shift = rng.normal(0, beta, num_clients)
  cov_diag = np.power(np.arange(1, DIMENSION + 1, dtype=np.float64), -1.2)
  if iid:
    w_global = rng.normal(0, 1, (DIMENSION, NUM_CLASSES))
    b_global = rng.normal(0, 1, NUM_CLASSES)
  xs_train, ys_train, xs_test, ys_test, owners = [], [], [], [], []
  for k in range(num_clients):
    if iid:
      w, b, v = w_global, b_global, np.zeros(DIMENSION)
    else:
      w = rng.normal(mean_w[k], 1, (DIMENSION, NUM_CLASSES))
      b = rng.normal(mean_w[k], 1, NUM_CLASSES)
      v = rng.normal(mean_x_shift[k], 1, DIMENSION)
    x = v + rng.normal(size=(sizes[k], DIMENSION)) * np.sqrt(cov_diag)
    y = np.argmax(x @ w + b, axis=1)  # argmax of softmax = argmax of logits
    n_test = int(round(test_fraction * sizes[k]))
    xs_train.append(x[n_test:]); ys_train.append(y[n_test:])
    xs_test.append(x[:n_test]); ys_test.append(y[:n_test])
    owners.append(np.full(n_test, k, np.int32))
  counts = np.array([len(y) for y in ys_train], np.int64)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  name = 'synthetic_iid' if iid else f'synthetic({alpha:g},{beta:g})'
  return FederatedData(
      train={'x': np.concatenate(xs_train).astype(np.float32),
             'y': np.concatenate(ys_train).astype(np.int32)},
      offsets=offsets, counts=counts,
      test={'x': np.concatenate(xs_test).astype(np.float32),
            'y': np.concatenate(ys_test).astype(np.int32)},
      test_client=np.concatenate(owners), num_classes=NUM_CLASSES, name=name)
