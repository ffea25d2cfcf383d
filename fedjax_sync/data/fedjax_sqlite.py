"""FedJAX's SQLite files, read without FedJAX and without pickle.

FedJAX (`fedjax.core.sqlite_federated_data`) stores one split per file, in a table

    federated_data(client_id BLOB PRIMARY KEY, data BLOB, num_examples INTEGER)

where `data` is a zlib-compressed msgpack map `{feature name: array}`. Arrays are
msgpack extension types (FedJAX's `serialization.py`):

- type 1, a numeric `ndarray`: a nested msgpack array `[shape, dtype name, raw bytes]`
  (C order, native little-endian);
- type 3, a numpy scalar: the same encoding as type 1, 0-dimensional;
- type 4, an `ndarray` of byte strings: a nested msgpack array `[shape, [bytes, …]]`.

(Type 2, a complex number, is never used for data.) FedJAX's datasets come as
`<name>_train.sqlite` / `<name>_test.sqlite` pairs; the test file is found next to
the training file by replacing `train` with `test` in its name.
"""

from __future__ import annotations

import sqlite3
import zlib

import msgpack
import numpy as np

from fedjax_sync.data.examples import sibling_test_file

TABLE = 'federated_data'
EXT_NDARRAY, EXT_COMPLEX, EXT_SCALAR, EXT_BYTES_NDARRAY = 1, 2, 3, 4


def _numeric_array(payload: bytes) -> np.ndarray:
  shape, dtype_name, buffer = msgpack.unpackb(payload, raw=True)
  dtype = np.dtype(dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name)
  if dtype.hasobject:
    raise ValueError(f'object dtype {dtype} in a numeric array')
  return np.frombuffer(buffer, dtype).reshape(shape).copy()


def _ext_hook(code: int, payload: bytes):
  if code == EXT_NDARRAY:
    return _numeric_array(payload)
  if code == EXT_SCALAR:
    return _numeric_array(payload)[()]
  if code == EXT_BYTES_NDARRAY:
    shape, flat = msgpack.unpackb(payload, raw=True)
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(shape)
  raise ValueError(f'unsupported msgpack extension type {code} (FedJAX uses 1, 3 and 4)')


def decode_client(blob: bytes) -> dict[str, np.ndarray]:
  """One `data` blob → `{feature: array}`."""
  examples = msgpack.unpackb(zlib.decompress(blob), ext_hook=_ext_hook, raw=False,
                             strict_map_key=False)
  if not isinstance(examples, dict):
    raise ValueError(f'client data is a {type(examples).__name__}, expected a map of arrays')
  out = {}
  for key, value in examples.items():
    name = key.decode() if isinstance(key, bytes) else str(key)
    if not isinstance(value, np.ndarray):
      raise ValueError(f'feature {name!r} is a {type(value).__name__}, expected an array')
    out[name] = value
  return out


def _connect(path: str) -> sqlite3.Connection:
  connection = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
  columns = [row[1] for row in connection.execute(f'PRAGMA table_info({TABLE})')]
  if not {'client_id', 'data', 'num_examples'} <= set(columns):
    connection.close()
    raise ValueError(f'no table {TABLE}(client_id, data, num_examples); it has columns '
                     f'{columns}')
  return connection


def client_stream(path: str):
  """`split -> iterator of (client_id, {feature: array})` over the file and its test file."""
  files = {'train': path, 'test': sibling_test_file(path)}

  def stream(split: str):
    if files.get(split) is None:
      raise KeyError(split)
    connection = _connect(files[split])
    try:
      for client_id, blob, num_examples in connection.execute(
          f'SELECT client_id, data, num_examples FROM {TABLE} ORDER BY rowid'):
        features = decode_client(blob)
        cid = client_id.decode('utf-8', 'replace') if isinstance(client_id, bytes) else str(
            client_id)
        sizes = {k: len(v) for k, v in features.items()}
        if any(n != num_examples for n in sizes.values()):
          raise ValueError(f'client {cid!r} declares num_examples={num_examples} but holds '
                           f'{sizes}')
        yield cid, features
    finally:
      connection.close()

  return stream, files['test'] is not None
