"""Researchers' dataset files by path: format detection, loading and `inspect`.

`load_path(path)` recognizes, from the file's first bytes, its name and its tables:

| format | how it is recognized | module |
|---|---|---|
| `leaf` | a `.json` file, or a directory of them (or with `train/`, `test/`) | `leaf` |
| `tff_h5` | the HDF5 signature (`.h5` files of TFF) | `tff_h5` |
| `tff_sqlite` | SQLite with a table `examples(split_name, client_id, …)` | `tff_sqlite` |
| `fedjax_sqlite` | SQLite with a table `federated_data(client_id, data, …)` | `fedjax_sqlite` |
| `idx` | a directory of `*-idx3-ubyte[.gz]` / `*-idx1-ubyte[.gz]` files (or one of them) | `idx` |

Natural partitions (LEAF, TFF, FedJAX) keep the file's clients and their test
splits; IDX data is centralized and is partitioned like every centralized source.
Any error while reading becomes one line naming the file.
"""

from __future__ import annotations

import os
import sqlite3

import numpy as np

from fedjax_sync.data.examples import build_federated
from fedjax_sync.data.federated import FederatedData

FORMATS = ('leaf', 'tff_h5', 'tff_sqlite', 'fedjax_sqlite', 'idx')
_SQLITE_SIGNATURE = b'SQLite format 3\x00'
_HDF5_SIGNATURE = b'\x89HDF\r\n\x1a\n'


def looks_like_path(name: str) -> bool:
  """Whether a `--dataset` value is meant as a path rather than a registered name."""
  return os.sep in name or os.path.exists(name) or name.endswith(
      ('.json', '.h5', '.hdf5', '.sqlite', '.sqlite3', '.db', '.gz', '-ubyte'))


def detect_format(path: str) -> str:
  """The format of `path`, one of `FORMATS`.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: `path` is none of the formats (the message lists them).
  """
  from fedjax_sync.data import idx, leaf

  if not os.path.exists(path):
    raise FileNotFoundError(f'dataset path {path!r} not found (valid: a registered dataset '
                            f'name or a file/directory in one of the formats {", ".join(FORMATS)})')
  if os.path.isdir(path):
    if any(idx.is_idx_file(f) for f in os.listdir(path)):
      return 'idx'
    if leaf.is_leaf(path):
      return 'leaf'
    raise ValueError(f'{path}: directory holds neither IDX files nor LEAF .json files '
                     f'(formats: {", ".join(FORMATS)})')
  if idx.is_idx_file(path):
    return 'idx'
  with open(path, 'rb') as f:
    head = f.read(16)
  if head.startswith(_HDF5_SIGNATURE):
    return 'tff_h5'
  if head == _SQLITE_SIGNATURE:
    try:
      connection = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
      try:
        tables = {r[0] for r in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
      finally:
        connection.close()
    except sqlite3.DatabaseError as error:
      raise ValueError(f'{path}: malformed SQLite file ({error})') from None
    if 'examples' in tables:
      return 'tff_sqlite'
    if 'federated_data' in tables:
      return 'fedjax_sqlite'
    raise ValueError(f'{path}: SQLite file with tables {sorted(tables)}, expected examples '
                     '(TensorFlow Federated) or federated_data (FedJAX)')
  if path.endswith('.json'):
    return 'leaf'
  raise ValueError(f'{path}: unrecognized dataset file (formats: {", ".join(FORMATS)}: LEAF '
                   '.json, HDF5, SQLite, IDX)')


def _one_line(error: BaseException) -> str:
  return ' '.join(str(error).split()) or type(error).__name__


def _stream(path: str, fmt: str):
  """`(split -> iterator of (client_id, features), has_test)` of a naturally split file."""
  if fmt == 'leaf':
    from fedjax_sync.data import leaf
    return leaf.client_stream(path)
  if fmt == 'tff_h5':
    from fedjax_sync.data import tff_h5
    return tff_h5.client_stream(path)
  if fmt == 'tff_sqlite':
    from fedjax_sync.data import tff_sqlite
    return tff_sqlite.client_stream(path), 'test' in tff_sqlite.splits(path)
  from fedjax_sync.data import fedjax_sqlite
  return fedjax_sqlite.client_stream(path)


def load_path(path: str, *, max_clients: int | None = None, data_path: str | None = None,
              **partition) -> FederatedData:
  """Loads a dataset file or directory in any of `FORMATS` (detected from `path`).

  Example:
    >>> data = load_path('fed_emnist_train.h5')     # + fed_emnist_test.h5 beside it

  Args:
    path: the file or directory (for paired files, the `…train…` one).
    max_clients: read only the first `max_clients` training clients.
    data_path: unused (accepted so the CLI can pass its options through).
    **partition: for IDX directories, the partition options of `from_arrays`
      (num_clients, partition, alpha, shards_per_client, seed, method).

  Raises:
    FileNotFoundError: no such path.
    ValueError: a malformed file, as one line naming it.
  """
  del data_path
  fmt = detect_format(path)
  if fmt == 'idx':
    from fedjax_sync.data.idx import idx_dataset
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return idx_dataset(directory, **{k: v for k, v in partition.items() if k in (
        'num_clients', 'partition', 'alpha', 'shards_per_client', 'seed', 'method')})
  name = os.path.basename(os.path.normpath(path))
  try:
    stream, has_test = _stream(path, fmt)
    return build_federated(stream, name=f'{name} [{fmt}]', has_test=has_test,
                           max_clients=max_clients)
  except ImportError:
    raise
  except Exception as error:  # noqa: BLE001 - parsers raise many types (json, sqlite3,
    # zlib, msgpack, h5py's OSError …); all mean a malformed file, reported as one line
    raise ValueError(f'{path}: malformed {fmt} file: {_one_line(error)}') from None


def describe(data: FederatedData) -> list[str]:
  """The lines `fedjax-sync inspect` prints for a dataset."""
  counts = data.counts
  lines = [f'clients: {data.num_clients}', f'examples: {data.num_examples}',
           f'test examples: {int(next(iter(data.test.values())).shape[0])}'
           + (' (per-client test splits)' if data.test_client is not None else ' (global)'),
           f'classes: {data.num_classes}']
  for key, value in data.train.items():
    lines.append(f'feature {key}: shape [n, {", ".join(str(d) for d in value.shape[1:])}] '
                 f'dtype {value.dtype}'.replace('[n, ]', '[n]'))
  q = np.quantile(counts, (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)) if counts.size else [0] * 7
  lines.append('examples per client: ' + ', '.join(
      f'{label} {v:g}' for label, v in zip(('min', 'p10', 'p25', 'median', 'p75', 'p90', 'max'),
                                            q)))
  return lines


# Usual model of each kind of converted data (`fedjax_sync.data.examples`).
KIND_MODELS = {'emnist': 'emnist_cnn', 'shakespeare': 'char_lstm',
               'stackoverflow': 'word_lstm', 'sent140': None, 'arrays': 'mlp'}


def default_model_for_path(path: str) -> str:
  """The usual model for a dataset file, from its format and its first client's features."""
  from fedjax_sync.data.examples import converter_for
  fmt = detect_format(path)
  if fmt == 'idx':
    return 'emnist_cnn'
  try:
    stream, _ = _stream(path, fmt)
    for _, features in stream('train'):
      kind = converter_for(features.keys()).kind
      break
    else:
      kind = None
  except Exception as error:  # noqa: BLE001 - see load_path
    raise ValueError(f'{path}: malformed {fmt} file: {_one_line(error)}') from None
  if kind is None:
    raise ValueError(f'{path}: the training split has no clients')
  if KIND_MODELS[kind] is None:
    raise ValueError(f'{path}: no registered model classifies {kind} token sequences yet; '
                     'pass --model explicitly')
  return KIND_MODELS[kind]


def inspect(name_or_path: str, **options) -> list[str]:
  """`fedjax-sync inspect`: loads a registered dataset or a file, returns `describe`'s lines."""
  from fedjax_sync.data.registry import load_dataset
  return describe(load_dataset(name_or_path, **options))


def dataset_argument(value: str) -> str:
  """Validates a `--dataset` value: a registered name or an existing path."""
  from fedjax_sync.data.registry import dataset_names
  if value in dataset_names() or (looks_like_path(value) and os.path.exists(value)):
    return value
  raise ValueError(f'unknown dataset {value!r}; valid: {", ".join(dataset_names())}, or the '
                   f'path of a dataset file or directory ({", ".join(FORMATS)})')
