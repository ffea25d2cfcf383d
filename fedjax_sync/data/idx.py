"""IDX files (the MNIST format) and Fashion-MNIST offline.

An IDX file is a 4-byte magic number `0 0 TYPE NDIM`, then `NDIM` big-endian uint32
dimensions, then the data in big-endian row-major order (LeCun et al., "The MNIST
database", http://yann.lecun.com/exdb/mnist/). MNIST, Fashion-MNIST (Xiao et al.
2017, arXiv 1708.07747) and EMNIST (Cohen et al. 2017, arXiv 1702.05373) are
distributed as `*-images-idx3-ubyte[.gz]` and `*-labels-idx1-ubyte[.gz]` files.

A directory is read as `train` files (names containing `train`) and `test` files
(names containing `t10k` or `test`). Images `[n, H, W]` become uint8 `[n, H, W, 1]`,
labels int32; the training part is partitioned among clients with
`fedjax_sync.data.npz.from_arrays`. Files are read into preallocated arrays, chunk
by chunk, never via Python lists. (EMNIST's IDX images are stored transposed; pass
`transpose=True` to turn them upright.)

Fashion-MNIST without network: Debian's package `dataset-fashion-mnist` installs the
original IDX files in `/usr/share/datasets/fashion-mnist`.
"""

from __future__ import annotations

import gzip
import os
import re

import numpy as np

from fedjax_sync.data.federated import FederatedData
from fedjax_sync.data.npz import from_arrays

# IDX type byte -> big-endian numpy dtype.
IDX_DTYPES = {0x08: np.dtype('u1'), 0x09: np.dtype('i1'), 0x0B: np.dtype('>i2'),
              0x0C: np.dtype('>i4'), 0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}
FASHION_MNIST_DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_INSTALL = 'sudo apt-get install dataset-fashion-mnist'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                         'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
_IDX_NAME = re.compile(r'.*-idx[0-9]-ubyte(\.gz)?$')
_CHUNK_BYTES = 1 << 22


def is_idx_file(path: str) -> bool:
  """Whether `path` is named like an IDX file (`*-idxN-ubyte[.gz]`)."""
  return bool(_IDX_NAME.match(os.path.basename(path)))


def _open(path: str):
  return gzip.open(path, 'rb') if path.endswith('.gz') else open(path, 'rb')


def read_idx(path: str) -> np.ndarray:
  """The array stored in one IDX file (`.gz` or not), in native byte order.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a well-formed IDX file (the message names it).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'IDX file {path!r} not found')
  try:
    with _open(path) as f:
      header = f.read(4)
      if len(header) != 4 or header[0] != 0 or header[1] != 0 or header[2] not in IDX_DTYPES:
        raise ValueError(f'IDX file {path!r} has no IDX magic number (0 0 TYPE NDIM with TYPE '
                         f'in {sorted(hex(t) for t in IDX_DTYPES)}), got {header.hex() or "nothing"}')
      dtype, ndim = IDX_DTYPES[header[2]], header[3]
      dims_bytes = f.read(4 * ndim)
      if len(dims_bytes) != 4 * ndim:
        raise ValueError(f'IDX file {path!r} ends inside its header ({ndim} dimensions)')
      shape = tuple(int(d) for d in np.frombuffer(dims_bytes, '>u4'))
      out = np.empty(shape, dtype.newbyteorder('='))
      raw = out.reshape(-1).view(np.uint8)
      filled = 0
      while filled < raw.size:
        got = f.readinto(memoryview(raw)[filled:filled + _CHUNK_BYTES])
        if not got:
          raise ValueError(f'IDX file {path!r} is truncated: {filled} of {raw.size} data bytes '
                           f'for shape {shape}')
        filled += got
      if f.read(1):
        raise ValueError(f'IDX file {path!r} has bytes after its {shape} {dtype.name} data')
  except (OSError, EOFError) as error:  # a corrupt gzip stream
    raise ValueError(f'IDX file {path!r} cannot be read: {error}') from None
  if dtype.byteorder == '>' and dtype.itemsize > 1:
    out = out.view(dtype).astype(dtype.newbyteorder('='))
  return out


def find_idx_files(directory: str) -> dict[str, str]:
  """The `{train,test}_{images,labels}` IDX files of an MNIST-format directory."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'IDX directory {directory!r} not found')
  found: dict[str, list[str]] = {}
  for name in sorted(os.listdir(directory)):
    if not is_idx_file(name):
      continue
    lower = name.lower()
    kind = 'images' if '-idx3-' in lower else 'labels' if '-idx1-' in lower else None
    split = 'train' if 'train' in lower else 'test' if ('t10k' in lower or 'test' in lower) else None
    if kind and split:
      found.setdefault(f'{split}_{kind}', []).append(os.path.join(directory, name))
  keys = ('train_images', 'train_labels', 'test_images', 'test_labels')
  missing = [k for k in keys if k not in found]
  if missing:
    raise FileNotFoundError(
        f'IDX directory {directory!r} lacks {", ".join(missing)}; expected files named like '
        'train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], '
        't10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]')
  ambiguous = {k: v for k, v in found.items() if len(v) > 1}
  if ambiguous:
    raise ValueError(f'IDX directory {directory!r} has several candidates: {ambiguous}')
  return {k: found[k][0] for k in keys}


def idx_arrays(directory: str, *, transpose: bool = False):
  """`(x_train, y_train, x_test, y_test)` of an MNIST-format directory.

  Images become `[n, H, W, 1]` (kept in their IDX dtype, uint8 for the usual files),
  labels int32.
  """
  files = find_idx_files(directory)
  out = []
  for split in ('train', 'test'):
    images, labels = read_idx(files[f'{split}_images']), read_idx(files[f'{split}_labels'])
    if images.ndim != 3:
      raise ValueError(f'IDX file {files[split + "_images"]!r} holds {images.shape}, '
                       'expected images [n, H, W]')
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f'IDX file {files[split + "_labels"]!r} holds {labels.dtype} '
                       f'{labels.shape}, expected integer labels [n]')
    if labels.shape[0] != images.shape[0]:
      raise ValueError(f'{files[split + "_images"]!r} has {images.shape[0]} images but '
                       f'{files[split + "_labels"]!r} has {labels.shape[0]} labels')
    if transpose:
      images = np.ascontiguousarray(images.transpose(0, 2, 1))
    out += [images[..., None], labels.astype(np.int32)]
  return tuple(out)


def idx_dataset(directory: str | None, num_clients: int = 10, *, transpose: bool = False,
                num_classes: int | None = None, name: str | None = None,
                **partition) -> FederatedData:
  """An MNIST-format directory, partitioned among `num_clients` clients.

  Example:
    >>> data = idx_dataset('/usr/share/datasets/fashion-mnist', 5, alpha=0.1)

  Args:
    directory: the directory of the four IDX files.
    num_clients: number of clients.
    transpose: swap H and W (EMNIST's files store images transposed).
    num_classes: number of classes (default: largest label + 1).
    name: description (default: the directory's name).
    **partition: partition options of `from_arrays` (partition, alpha,
      shards_per_client, seed, method).
  """
  if not directory:
    raise ValueError("the 'idx' dataset needs --data-path DIR, a directory of MNIST-format "
                     'files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], '
                     't10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])')
  arrays = idx_arrays(directory, transpose=transpose)
  return from_arrays(*arrays, num_clients=num_clients, num_classes=num_classes,
                     name=name or os.path.basename(os.path.normpath(directory)), **partition)


def fashion_mnist(num_clients: int = 10, *, data_path: str | None = None,
                  data_dir: str | None = None, **partition) -> FederatedData:
  """Fashion-MNIST (Xiao et al. 2017, arXiv 1708.07747), 10 classes of 28×28 images.

  Sources, in order: `data_path` (a directory of its IDX files) when given; else a
  TFDS copy prepared in `data_dir` (or TFDS's default directory); else Debian's
  `dataset-fashion-mnist` files in `/usr/share/datasets/fashion-mnist`.

  Raises:
    FileNotFoundError: no source found; the message names the install command.
  """
  if data_path:
    return idx_dataset(data_path, num_clients, num_classes=10, name='fashion_mnist', **partition)
  from fedjax_sync.data import tfds  # noqa: PLC0415 - TFDS is slow to import
  try:
    prepared = tfds.is_prepared('fashion_mnist', data_dir)
  except ImportError:
    prepared = False
  if prepared:
    return tfds.tfds_dataset('fashion_mnist', num_clients, data_dir=data_dir, **partition)
  if os.path.isdir(FASHION_MNIST_DEBIAN_DIR):
    return idx_dataset(FASHION_MNIST_DEBIAN_DIR, num_clients, num_classes=10,
                       name='fashion_mnist', **partition)
  raise FileNotFoundError(
      'dataset fashion_mnist not found: no --data-path, no TFDS copy prepared, and no '
      f'{FASHION_MNIST_DEBIAN_DIR}; install it offline-ready with: {FASHION_MNIST_INSTALL} '
      f"(or {tfds.prepare_command('fashion_mnist', data_dir)}, or pass --data-path DIR "
      'holding its IDX files)')
