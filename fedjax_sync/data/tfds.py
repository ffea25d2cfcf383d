"""Image datasets of TensorFlow Datasets through `tfds.data_source`, without TensorFlow.

`tfds.data_source` reads a prepared dataset (ArrayRecord files) by random access
with numpy outputs, so TensorFlow is never imported. Each split is converted once
into compact host arrays (uint8 images `[n, H, W, C]`, int32 labels; no float copy of
the set) and partitioned with `fedjax_sync.data.npz.from_arrays`.

Preparation (download and conversion) happens through TFDS's own mechanism into the
TFDS data directory (`data_dir`, else TFDS's default, `~/tensorflow_datasets` or
`$TFDS_DATA_DIR`), once, on a machine with network access, e.g.

    tfds build mnist --file_format=array_record --data_dir=DIR

or in Python `tfds.builder('mnist', data_dir=DIR, file_format='array_record')
.download_and_prepare()` (TFDS's builders may need TensorFlow for *preparing*;
loading here does not). Nothing falls back to random data: when a dataset is not
prepared the error names it, the directory searched and the command above.
"""

from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple

import numpy as np

from fedjax_sync.data.federated import FederatedData
from fedjax_sync.data.npz import from_arrays


class TfdsSpec(NamedTuple):
  """A TFDS image classification dataset: its TFDS name, classes and default model."""

  tfds_name: str
  num_classes: int
  model: str
  description: str


TFDS_DATASETS: dict[str, TfdsSpec] = {
    'mnist': TfdsSpec('mnist', 10, 'emnist_cnn', 'MNIST 28×28 digits (TFDS)'),
    'fashion_mnist': TfdsSpec('fashion_mnist', 10, 'emnist_cnn', 'Fashion-MNIST 28×28 (TFDS)'),
    'emnist_balanced': TfdsSpec('emnist/balanced', 47, 'emnist_cnn',
                                'EMNIST balanced, 47 classes (TFDS)'),
    'emnist_byclass': TfdsSpec('emnist/byclass', 62, 'emnist_cnn',
                               'EMNIST byclass, 62 classes (TFDS)'),
    'cifar10': TfdsSpec('cifar10', 10, 'emnist_cnn', 'CIFAR-10 32×32×3 (TFDS)'),
    'cifar100': TfdsSpec('cifar100', 100, 'emnist_cnn', 'CIFAR-100 32×32×3, fine labels (TFDS)'),
}

_CHUNK = 4096


def _spec(name: str) -> TfdsSpec:
  if name not in TFDS_DATASETS:
    raise ValueError(f'unknown TFDS dataset {name!r}; valid: {", ".join(TFDS_DATASETS)}')
  return TFDS_DATASETS[name]


def _tfds():
  import tensorflow_datasets as tfds  # noqa: PLC0415 - optional and slow to import
  return tfds


@contextlib.contextmanager
def _quiet_absl():
  """Hides TFDS's absl warnings about absent version folders while probing."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def prepare_command(name: str, data_dir: str | None = None) -> str:
  """The shell command that prepares `name` for `tfds.data_source`."""
  where = f' --data_dir={data_dir}' if data_dir else ''
  return f'tfds build {_spec(name).tfds_name} --file_format=array_record{where}'


def dataset_dir(name: str, data_dir: str | None = None) -> str:
  """Where TFDS looks for the prepared dataset (including its version)."""
  with _quiet_absl():
    return str(_tfds().builder(_spec(name).tfds_name, data_dir=data_dir).data_dir)


def is_prepared(name: str, data_dir: str | None = None) -> bool:
  """Whether `name` is prepared in `data_dir` (else TFDS's default directory)."""
  try:
    with _quiet_absl():
      return bool(_tfds().builder(_spec(name).tfds_name, data_dir=data_dir).is_prepared())
  except Exception:  # noqa: BLE001 - a broken or foreign directory is "not prepared"
    return False


def _read_split(source, image_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """Copies a random-access split into preallocated uint8 images and int32 labels."""
  n = len(source)
  images = np.empty((n,) + image_shape, np.uint8)
  labels = np.empty((n,), np.int32)
  batched = hasattr(source, '__getitems__')
  for start in range(0, n, _CHUNK):
    keys = list(range(start, min(start + _CHUNK, n)))
    records = None
    if batched:
      try:
        records = source.__getitems__(keys)
      except TypeError:  # some sources (e.g. TFDS's mock) only index one record at a time
        batched = False
    if records is None:
      records = [source[i] for i in keys]
    for i, record in zip(keys, records):
      images[i] = np.asarray(record['image']).reshape(image_shape)
      labels[i] = int(record['label'])
  return images, labels


def tfds_arrays(name: str, *, data_dir: str | None = None):
  """`(x_train, y_train, x_test, y_test)` of a prepared TFDS image dataset.

  Raises:
    FileNotFoundError: the dataset is not prepared in the data directory; the message
      names the dataset, the directory and the command that prepares it.
    ValueError: the dataset is prepared in a format without random access.
  """
  spec = _spec(name)
  tfds = _tfds()
  splits = []
  for split in ('train', 'test'):
    try:
      with _quiet_absl():
        source = tfds.data_source(spec.tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # noqa: BLE001 - TFDS raises several types; explain below
      where = dataset_dir(name, data_dir)
      if not is_prepared(name, data_dir):
        raise FileNotFoundError(
            f'dataset {name!r} (TFDS {spec.tfds_name!r}) is not prepared in {where}; prepare '
            f'it once with network access: {prepare_command(name, data_dir)} '
            '(or pass --data-dir pointing at a prepared TFDS directory)') from None
      raise ValueError(f'dataset {name!r} in {where} cannot be read by random access '
                       f'({error}); re-prepare it with: {prepare_command(name, data_dir)}'
                       ) from None
    first = source[0]
    splits.extend(_read_split(source, tuple(np.asarray(first['image']).shape)))
  return tuple(splits)


def tfds_dataset(name: str, num_clients: int = 10, *, data_dir: str | None = None,
                 partition: str = 'dirichlet', alpha: float = 0.5, shards_per_client: int = 2,
                 seed: int = 0, method: str = 'per_class') -> FederatedData:
  """A prepared TFDS image dataset, partitioned among `num_clients` clients.

  Example:
    >>> data = tfds_dataset('mnist', 5, partition='dirichlet', alpha=0.1)

  Args:
    name: one of `TFDS_DATASETS` (mnist, fashion_mnist, emnist_balanced,
      emnist_byclass, cifar10, cifar100).
    num_clients: number of clients.
    data_dir: TFDS data directory (default: TFDS's own).
    partition: 'iid', 'dirichlet' or 'shards'.
    alpha: Dirichlet concentration.
    shards_per_client: single-class shards per client.
    seed: partition seed.
    method: Dirichlet reading ('per_class' or 'per_client').
  """
  spec = _spec(name)
  return from_arrays(*tfds_arrays(name, data_dir=data_dir), num_clients=num_clients,
                     num_classes=spec.num_classes, partition=partition, alpha=alpha,
                     shards_per_client=shards_per_client, seed=seed, method=method, name=name)
