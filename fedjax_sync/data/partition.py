"""Partitioners: split a centralized labelled dataset among clients.

Every partitioner returns a list of `num_clients` int64 index arrays that together
assign every example exactly once (shard partitions may leave the remainder of an
uneven split unassigned; they say so). All are seeded and deterministic.
"""

from __future__ import annotations

import math

import numpy as np

DIRICHLET_METHODS = ('per_class', 'per_client')


class PartitionError(ValueError):
  """A partition parameter that cannot split this data (e.g. too many shards per client).

  Attributes:
    parameter: the parameter's name ('alpha' or 'shards_per_client'), so that a
      caller can name its own option (the CLI's `--shards-per-client`).
  """

  def __init__(self, parameter: str, message: str):
    super().__init__(message)
    self.parameter = parameter


def _is_integer(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check(num_clients: int, n: int) -> None:
  if not _is_integer(num_clients) or num_clients < 1:
    raise ValueError(f'num_clients must be a positive integer, got {num_clients!r}')
  if n < num_clients:
    raise ValueError(f'cannot split {n} examples among {num_clients} clients')


def _check_labels(labels) -> np.ndarray:
  """`labels` as a 1-D integer array, or a ValueError saying what was given."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be a 1-D array [n] of integer class labels, got shape '
                     f'{labels.shape} (one-hot labels: pass labels.argmax(axis=1))')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be integer class labels, got dtype {labels.dtype}')
  return labels


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
  """Shuffles the examples and deals them into `num_clients` near-equal parts."""
  if not _is_integer(num_examples) or num_examples < 0:
    raise ValueError(f'num_examples must be a non-negative integer, got {num_examples!r}')
  _check(num_clients, num_examples)
  perm = np.random.default_rng(seed).permutation(num_examples)
  return [np.sort(part) for part in np.array_split(perm, num_clients)]


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int, *,
                        method: str = 'per_class', min_size: int = 1,
                        max_tries: int = 1000) -> list[np.ndarray]:
  """Label-skewed split with Dirichlet proportions.

  Two standard readings:
  * `method='per_class'` (Yurochkin et al. 2019; the usual benchmark code): for
    each class c draw `p_c ~ Dir_N(alpha · 1)` over clients and give client j that
    fraction of class c; redraw everything until each client has at least
    `min_size` examples. Client sizes vary.
  * `method='per_client'` (Hsu et al. 2019, arXiv 1909.06335): each client draws
    class proportions `q_k ~ Dir_K(alpha · 1)` (concentration `alpha` per class,
    not `alpha / K`) and fills an equal share of the data by drawing labels from
    `q_k` without replacement from the class pools; an exhausted class is removed
    and `q_k` renormalized over the classes that remain.

  Small alpha (0.1) is highly skewed; alpha → ∞ tends to the IID split.

  Args:
    labels: `[n]` integer labels.
    num_clients: number of clients.
    alpha: Dirichlet concentration (> 0).
    seed: seed of the numpy generator.
    method: 'per_class' or 'per_client'.
    min_size: per_class only: minimum examples per client.
    max_tries: per_class only: redraws before giving up.
  """
  labels = _check_labels(labels)
  _check(num_clients, labels.shape[0])
  if (not isinstance(alpha, (int, float, np.integer, np.floating)) or isinstance(alpha, bool)
      or not math.isfinite(alpha) or not alpha > 0):
    raise ValueError(f'alpha must be > 0, got {alpha!r} (a finite number; for the α → ∞ '
                     "limit use the 'iid' partition)")
  if method not in DIRICHLET_METHODS:
    raise ValueError(f"method must be 'per_class' or 'per_client', got {method!r}")
  if not _is_integer(min_size) or min_size < 0:
    raise ValueError(f'min_size must be a non-negative integer, got {min_size!r}')
  if not _is_integer(max_tries) or max_tries < 1:
    raise ValueError(f'max_tries must be a positive integer, got {max_tries!r}')
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
  if method == 'per_class':
    if min_size * num_clients > labels.shape[0]:
      raise ValueError(f'min_size={min_size} × {num_clients} clients exceeds {labels.shape[0]} examples')
    for _ in range(max_tries):
      parts = [[] for _ in range(num_clients)]
      for pool in pools:
        p = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(p) * len(pool)).astype(np.int64)[:-1]
        for j, chunk in enumerate(np.split(pool, cuts)):
          parts[j].append(chunk)
      out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
      if min(len(o) for o in out) >= min_size:
        return out
    raise PartitionError('alpha', f'no per_class Dirichlet split with every client ≥ '
                         f'{min_size} examples after {max_tries} tries (alpha={alpha}); lower '
                         'min_size or raise alpha')
  else:  # method == 'per_client' (checked above)
    sizes = [len(s) for s in np.array_split(np.arange(labels.shape[0]), num_clients)]
    remaining = [list(p) for p in pools]
    out = []
    for k in range(num_clients):
      q = rng.dirichlet(np.full(len(classes), float(alpha)))
      mine = []
      for _ in range(sizes[k]):
        avail = np.array([len(r) > 0 for r in remaining])
        qa = np.where(avail, q, 0.0)
        if qa.sum() <= 0:  # every preferred class exhausted: fall back to what is left
          qa = avail.astype(np.float64)
        c = rng.choice(len(classes), p=qa / qa.sum())
        mine.append(remaining[c].pop())
      out.append(np.sort(np.asarray(mine, np.int64)))
    return out


def shard_partition(labels: np.ndarray, num_clients: int, shards_per_client: int,
                    seed: int) -> list[np.ndarray]:
  """Pathological non-IID split (McMahan et al. 2017, arXiv 1602.05629).

  The examples are cut into `num_clients · shards_per_client` single-class shards
  and each client is dealt `shards_per_client` random shards. Unlike cutting the
  label-sorted array into equal pieces (which lets a shard straddle two classes
  when class sizes differ), shards here never mix classes: each class gets a
  number of shards proportional to its size (at least one when there are enough
  shards) and is split evenly among them. With 10 clients, 10 classes and one shard
  each, every client holds exactly one class: the seed report's extreme case.
  Every example is assigned exactly once.
  """
  labels = _check_labels(labels)
  _check(num_clients, labels.shape[0])
  if not _is_integer(shards_per_client) or shards_per_client < 1:
    raise ValueError(f'shards_per_client must be a positive integer, got {shards_per_client!r}')
  rng = np.random.default_rng(seed)
  num_shards = num_clients * shards_per_client
  classes, sizes = np.unique(labels, return_counts=True)
  alloc = _shard_allocation(sizes, num_shards)
  if alloc is None:
    low, high = shards_per_client_range(sizes, num_clients)
    why = (f'{num_shards} shards cannot hold {len(classes)} classes without mixing'
           if num_shards < len(classes) else 'a class has fewer examples than its shards')
    valid = (f'valid: {low} to {high}' if low <= high else
             'no value fits: use fewer clients')
    raise PartitionError(
        'shards_per_client',
        f'shards_per_client={shards_per_client} does not fit {labels.shape[0]} examples of '
        f'{len(classes)} classes among {num_clients} clients ({why}); {valid}')
  shards = []
  for c, k in zip(classes, alloc):
    pool = rng.permutation(np.flatnonzero(labels == c))
    shards.extend(np.array_split(pool, k))
  assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
  return [np.sort(np.concatenate([shards[a] for a in row])).astype(np.int64)
          for row in assignment]


def _shard_allocation(sizes: np.ndarray, num_shards: int) -> np.ndarray | None:
  """Single-class shards per class (class sizes `[K]`), proportional to the sizes.

  Largest-remainder allocation with at least one shard per class; None when the
  shards cannot hold the classes without mixing or a class has fewer examples than
  its shards.
  """
  if num_shards < len(sizes):
    return None
  alloc = np.ones(len(sizes), np.int64)
  share = sizes / sizes.sum() * (num_shards - len(sizes))
  alloc += np.floor(share).astype(np.int64)
  rest = num_shards - alloc.sum()
  alloc[np.argsort(-(share - np.floor(share)), kind='stable')[:rest]] += 1
  return None if np.any(alloc > sizes) else alloc


def shards_per_client_range(class_sizes, num_clients: int) -> tuple[int, int]:
  """`(low, high)`: the range of `shards_per_client` that `shard_partition` accepts.

  `low` gives every class a shard; `high` is the largest value whose shards each
  hold at least one example of their class, found by bisection (the largest-
  remainder rounding can make a value just below `high` fail too; the partition
  itself checks the exact value). `low > high` when no value fits.

  Args:
    class_sizes: `[K]` number of training examples of each class.
    num_clients: number of clients.
  """
  sizes = np.asarray(class_sizes, np.int64)
  low = max(1, -(-len(sizes) // num_clients))
  lo, hi = low, int(sizes.sum()) // num_clients
  if hi < lo or _shard_allocation(sizes, num_clients * lo) is None:
    return low, low - 1
  while lo < hi:   # invariant: `lo` fits
    mid = (lo + hi + 1) // 2
    if _shard_allocation(sizes, num_clients * mid) is None:
      hi = mid - 1
    else:
      lo = mid
  return low, lo
