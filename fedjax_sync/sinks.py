"""Where a run's per-round metrics go besides `metrics.jsonl`, and how progress is timed.

`TensorBoardWriter` writes TensorBoard event files (`events.out.tfevents.*`) that
TensorBoard reads directly, without TensorFlow or any other dependency: an event
file is a sequence of TFRecord frames, each holding one serialized `Event` protocol
buffer, and the few fields a scalar needs are encoded here by hand:

    frame:  uint64 length | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)
    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5 }
    Summary { repeated Value value = 1 }
    Value   { string tag = 1; float simple_value = 2 }

(`tensorflow/core/util/event.proto`, `summary.proto`; the TFRecord framing with the
CRC-32C of Castagnoli, masked, as in `tensorflow/core/lib/hash/crc32c.h`.)
`read_events` reads such a file back, checking every CRC.

`round_rate` is the progress bar's clock: rounds per second and the time left,
from the rounds run after the first (compiling) block, less any later compilation.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from typing import Any, Iterator, Mapping

from fedjax_sync.protobuf_wire import encode_varint, length_delimited, message_fields

# -- CRC-32C (Castagnoli), reflected polynomial 0x82F63B78 --------------------------

def _crc32c_table() -> tuple[int, ...]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return tuple(table)


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """The CRC-32C (Castagnoli) of `data`; `crc32c(b'123456789') == 0xE3069283`."""
  crc = 0xFFFFFFFF
  table = _CRC_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: the CRC-32C rotated right by 15 bits plus 0xA282EAD8."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
  """`data` framed as one TFRecord: length, its checksum, the data, its checksum."""
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', masked_crc32c(length)) + data
          + struct.pack('<I', masked_crc32c(data)))


def read_tfrecords(path: str) -> Iterator[bytes]:
  """The records of a TFRecord file; ValueError on a truncated frame or a wrong checksum."""
  with open(path, 'rb') as f:
    blob = f.read()
  pos = 0
  while pos < len(blob):
    if pos + 12 > len(blob):
      raise ValueError(f'{path}: truncated record header at byte {pos}')
    length_bytes = blob[pos:pos + 8]
    (length,) = struct.unpack('<Q', length_bytes)
    (length_crc,) = struct.unpack('<I', blob[pos + 8:pos + 12])
    if masked_crc32c(length_bytes) != length_crc:
      raise ValueError(f'{path}: length checksum mismatch at byte {pos}')
    data = blob[pos + 12:pos + 12 + length]
    if len(data) != length or pos + 16 + length > len(blob):
      raise ValueError(f'{path}: truncated record at byte {pos}')
    (data_crc,) = struct.unpack('<I', blob[pos + 12 + length:pos + 16 + length])
    if masked_crc32c(data) != data_crc:
      raise ValueError(f'{path}: data checksum mismatch in the record at byte {pos}')
    yield data
    pos += 16 + length


# -- protocol buffer encoding of the few fields used ---------------------------------

def encode_event(wall_time: float, step: int, *, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
  """A serialized `Event` with `wall_time`, `step` and either scalars or a file version."""
  if step < 0:
    raise ValueError(f'step must be >= 0, got {step}')
  out = bytearray(encode_varint(1 << 3 | 1) + struct.pack('<d', wall_time))
  out += encode_varint(2 << 3 | 0) + encode_varint(int(step))
  if file_version is not None:
    out += length_delimited(3, file_version.encode())
  if scalars:
    summary = b''.join(
        length_delimited(1, length_delimited(1, tag.encode())
                          + encode_varint(2 << 3 | 5) + struct.pack('<f', float(value)))
        for tag, value in scalars.items())
    out += length_delimited(5, summary)
  return bytes(out)


def decode_event(data: bytes) -> dict[str, Any]:
  """`{'wall_time', 'step', 'file_version'?, 'scalars': {tag: value}}` of a serialized Event."""
  event: dict[str, Any] = {'wall_time': 0.0, 'step': 0, 'scalars': {}}
  for field, _, value in message_fields(data):
    if field == 1:
      event['wall_time'] = struct.unpack('<d', value)[0]
    elif field == 2:
      event['step'] = value
    elif field == 3:
      event['file_version'] = value.decode()
    elif field == 5:
      for f, _, summary_value in message_fields(value):
        if f != 1:
          continue
        tag, simple = None, None
        for vf, _, v in message_fields(summary_value):
          if vf == 1:
            tag = v.decode()
          elif vf == 2:
            simple = struct.unpack('<f', v)[0]
        if tag is not None and simple is not None:
          event['scalars'][tag] = simple
  return event


def read_events(path: str) -> list[dict[str, Any]]:
  """The events of one event file (see `decode_event`), every checksum checked."""
  return [decode_event(record) for record in read_tfrecords(path)]


def event_files(run_dir: str) -> list[str]:
  """The TensorBoard event files in `run_dir`, in the order TensorBoard reads them."""
  return sorted(os.path.join(run_dir, name) for name in os.listdir(run_dir)
                if 'tfevents' in name)


def scalar_values(row: Mapping[str, Any], skip: tuple[str, ...] = ('round',)) -> dict[str, float]:
  """The scalar numbers of a metrics row (booleans and None left out; NaN/Inf kept)."""
  out = {}
  for key, value in row.items():
    if key in skip or isinstance(value, bool) or value is None:
      continue
    if hasattr(value, 'item') and getattr(value, 'ndim', 1) == 0:
      value = value.item()
    if isinstance(value, (int, float)):
      out[str(key)] = float(value)
  return out


class TensorBoardWriter:
  """Appends per-round scalars to a new TensorBoard event file in `log_dir`.

  Each `write(row)` is one Event at step `row['round']` holding every scalar of
  the row (loss, accuracy, participation, bytes, `aggregator/...`; NaN/Inf kept,
  TensorBoard shows them as such). A resumed run writes a new file in the same
  directory; TensorBoard reads them in name order and, when a step goes back
  (a run resumed from an earlier checkpoint), drops the orphaned later steps.

  Example:
    >>> with TensorBoardWriter(run_dir) as tb:
    ...   tb.write({'round': 1, 'train_loss': 0.7})
  """

  def __init__(self, log_dir: str, *, clock=time.time):
    os.makedirs(log_dir, exist_ok=True)
    self._clock = clock
    now = clock()
    name = f'events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}'
    path = os.path.join(log_dir, name)
    suffix = 0
    while os.path.exists(path):   # two writers opened within one second
      suffix += 1
      path = os.path.join(log_dir, f'{name}.{suffix}')
    self.path = path
    self._file = open(path, 'wb')
    self._file.write(tfrecord_frame(encode_event(now, 0, file_version='brain.Event:2')))
    self._file.flush()

  def write(self, row: Mapping[str, Any], step: int | None = None) -> None:
    """One event at `step` (default `row['round']`) with the row's scalars."""
    step = int(row['round']) if step is None else int(step)
    scalars = scalar_values(row)
    if scalars:
      self._file.write(tfrecord_frame(encode_event(self._clock(), step, scalars=scalars)))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def round_rate(timed_rounds: int, timed_seconds: float,
               remaining_rounds: int) -> tuple[float | None, float | None]:
  """`(rounds per second, seconds left)` from rounds timed without compilation.

  `timed_rounds` rounds took `timed_seconds` (the drivers count from the end of
  the first block, which compiles, and subtract any later compilation). Both are
  None until a round has been timed.
  """
  if timed_rounds <= 0 or not timed_seconds > 0 or not math.isfinite(timed_seconds):
    return None, None
  rate = timed_rounds / timed_seconds
  return rate, max(remaining_rounds, 0) / rate


def format_rate(rate: float | None, seconds_left: float | None) -> str:
  """'12.3 rounds/s, 0:41 left' (or '… rounds/s' until a round has been timed)."""
  if rate is None:
    return 'rate after the first (compiling) block'
  left = int(round(seconds_left or 0))
  h, rest = divmod(left, 3600)
  m, s = divmod(rest, 60)
  eta = f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'
  speed = f'{rate:.3g} rounds/s' if rate >= 1 else f'{1 / rate:.3g} s/round'
  return f'{speed}, {eta} left'


class BlockClock:
  """The progress bar's clock over compiled blocks (see `round_rate`).

  `after_block(rounds, compile_seconds, remaining)` is called when a block of
  `rounds` rounds finished, with the driver's total compilation time so far; it
  returns the bar's rate text. The first block (which compiles) starts the clock.
  A ticking bar (`simulate.driver.tick_unit`) calls it at every tick with the units
  since the last one: its first tick, after compilation, starts the clock.
  """

  def __init__(self, clock=time.perf_counter):
    self._clock = clock
    self._start = None
    self._compile_at_start = 0.0
    self.timed_rounds = 0

  def after_block(self, rounds: int, compile_seconds: float, remaining: int) -> str:
    now = self._clock()
    if self._start is None:
      self._start, self._compile_at_start = now, compile_seconds
    else:
      self.timed_rounds += rounds
    seconds = now - self._start - (compile_seconds - self._compile_at_start)
    return format_rate(*round_rate(self.timed_rounds, seconds, remaining))
