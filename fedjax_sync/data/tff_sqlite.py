"""TensorFlow Federated's SQLite files, read without TensorFlow.

TFF's `tff.simulation.datasets` (EMNIST, Shakespeare, StackOverflow, CIFAR-100 …)
download SQLite databases with a table

    examples(split_name TEXT, client_id TEXT, serialized_example_proto BLOB)

where each row is one `tf.train.Example` protocol buffer. This module decodes the
protobuf wire format itself (https://protobuf.dev/programming-guides/encoding/):

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }      # entries: key = 1, value = 2
    Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2;
                       Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }  FloatList { repeated float value = 1; }
    Int64List { repeated int64 value = 1; }

Rows are read client by client (`ORDER BY client_id`), so memory holds one client's
examples at a time.
"""

from __future__ import annotations

import sqlite3
import numpy as np

from fedjax_sync.protobuf_wire import message_fields as _fields, read_varint as _varint

TABLE = 'examples'
COLUMNS = ('split_name', 'client_id', 'serialized_example_proto')


def _signed64(v: int) -> int:
  return v - (1 << 64) if v >= 1 << 63 else v


def _decode_feature(buf: bytes):
  """A `Feature` → list of bytes, float32 array or int64 array."""
  for field, wire, value in _fields(buf):
    if wire != 2:
      raise ValueError(f'Feature field {field} has wire type {wire}, expected a list message')
    if field == 1:
      return [v for f, w, v in _fields(value) if f == 1 and w == 2]
    if field == 2:
      parts = []
      for f, w, v in _fields(value):
        if f == 1 and w == 2:  # packed
          if len(v) % 4:
            raise ValueError('packed FloatList length is not a multiple of 4')
          parts.append(np.frombuffer(v, '<f4'))
        elif f == 1 and w == 5:
          parts.append(np.frombuffer(v, '<f4'))
      return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
    if field == 3:
      values = []
      for f, w, v in _fields(value):
        if f == 1 and w == 2:  # packed varints
          pos = 0
          while pos < len(v):
            item, pos = _varint(v, pos)
            values.append(_signed64(item))
        elif f == 1 and w == 0:
          values.append(_signed64(v))
      return np.array(values, np.int64)
  return []  # an empty Feature


def decode_example(serialized: bytes) -> dict[str, object]:
  """A serialized `tf.train.Example` → `{name: list of bytes | float32 [k] | int64 [k]}`."""
  out = {}
  for field, wire, features in _fields(bytes(serialized)):
    if field != 1 or wire != 2:
      continue
    for f, w, entry in _fields(features):
      if f != 1 or w != 2:
        continue
      key, value = None, b''
      for ef, ew, ev in _fields(entry):
        if ef == 1 and ew == 2:
          key = ev.decode('utf-8')
        elif ef == 2 and ew == 2:
          value = ev
      if key is None:
        raise ValueError('a Features map entry has no key')
      out[key] = _decode_feature(value)
  return out


def _stack(name: str, values: list) -> object:
  """One feature over a client's examples: bytes → object array, numbers → `[n, k]` or `[n]`."""
  first = values[0]
  if isinstance(first, list):
    if all(len(v) == 1 for v in values):
      return np.array([v[0] for v in values], dtype=object)
    raise ValueError(f'feature {name!r} holds several byte strings per example')
  lengths = {len(v) for v in values}
  if len(lengths) != 1:
    raise ValueError(f'feature {name!r} has examples of different lengths {sorted(lengths)[:5]}')
  stacked = np.stack(values)
  return stacked[:, 0] if stacked.shape[1] == 1 else stacked


def _connect(path: str) -> sqlite3.Connection:
  connection = sqlite3.connect(f'file:{path}?mode=ro', uri=True)
  columns = [row[1] for row in connection.execute(f'PRAGMA table_info({TABLE})')]
  if not set(COLUMNS) <= set(columns):
    connection.close()
    raise ValueError(f'no table {TABLE}({", ".join(COLUMNS)}); it has columns {columns}')
  return connection


def splits(path: str) -> list[str]:
  """The split names in the file (e.g. `['test', 'train']`)."""
  connection = _connect(path)
  try:
    return sorted(r[0] for r in connection.execute(f'SELECT DISTINCT split_name FROM {TABLE}'))
  finally:
    connection.close()


def client_stream(path: str):
  """`split -> iterator of (client_id, {feature: array})`, one client at a time."""

  def stream(split: str):
    connection = _connect(path)
    try:
      cursor = connection.execute(
          f'SELECT client_id, serialized_example_proto FROM {TABLE} WHERE split_name = ? '
          'ORDER BY client_id, rowid', (split,))
      current, rows = None, []
      for client_id, blob in cursor:
        if client_id != current and rows:
          yield current, _client_features(rows)
          rows = []
        current = client_id
        rows.append(decode_example(blob))
      if rows:
        yield current, _client_features(rows)
    finally:
      connection.close()

  return stream


def _client_features(examples: list[dict]) -> dict[str, object]:
  names = set(examples[0])
  for e in examples:
    if set(e) != names:
      raise ValueError(f'examples of one client have different features: {sorted(names)} vs '
                       f'{sorted(e)}')
  return {name: _stack(name, [e[name] for e in examples]) for name in sorted(names)}

