"""The protocol buffer wire format, the little of it the project reads and writes.

Used to decode TensorFlow Federated's serialized `tf.train.Example` protos
(`fedjax_sync.data.tff_sqlite`) and to write and read TensorBoard `Event`s
(`fedjax_sync.sinks`) without TensorFlow or the `protobuf` package. Field numbers
and meanings belong to those modules; this one knows varints and the four wire
types (0 varint, 1 fixed 64-bit, 2 length-delimited, 5 fixed 32-bit).
"""

from __future__ import annotations

from typing import Iterator


def encode_varint(n: int) -> bytes:
  """A non-negative integer as a base-128 varint."""
  if n < 0:
    raise ValueError(f'varints here are non-negative, got {n}')
  out = bytearray()
  while True:
    byte = n & 0x7F
    n >>= 7
    if not n:
      out.append(byte)
      return bytes(out)
    out.append(byte | 0x80)


def length_delimited(field: int, payload: bytes) -> bytes:
  """Field `field` holding `payload` (wire type 2)."""
  return encode_varint(field << 3 | 2) + encode_varint(len(payload)) + payload


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  """`(value, position after it)` of the varint starting at `pos`."""
  result = shift = 0
  while True:
    if pos >= len(buf):
      raise ValueError('protobuf ends inside a varint')
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7
    if shift > 63:
      raise ValueError('protobuf varint longer than 10 bytes')


def message_fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
  """`(field number, wire type, value)` of one serialized message; value: int or bytes."""
  pos = 0
  while pos < len(buf):
    key, pos = read_varint(buf, pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = read_varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 2:
      size, pos = read_varint(buf, pos)
      value, pos = buf[pos:pos + size], pos + size
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise ValueError(f'unsupported protobuf wire type {wire} (field {field})')
    if pos > len(buf):
      raise ValueError(f'protobuf field {field} runs past the end of the message')
    yield field, wire, value
