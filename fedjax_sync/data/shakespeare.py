"""Shakespeare's plays as a naturally federated character-level dataset.

Vocabulary and tokenization (this part is shared with the readers of LEAF JSON and
TFF/FedJAX files): the 86 characters of TensorFlow Federated's text-generation
tutorial, plus four reserved ids, laid out like FedJAX's `datasets.shakespeare` so
that ids read from its files mean the same thing:

    0 PAD, 1 BOS, 2 EOS, 3..88 the 86 characters, 89 OOV  (vocabulary size 90)

A client's snippets are joined as `BOS snippet EOS BOS snippet EOS ...` and cut into
pairs of `sequence_length` (80, McMahan et al. 2017, arXiv 1602.05629) inputs and
next-character targets; the last pair is padded with PAD. Nothing is dropped, unlike
TFF's tutorial pipeline, which loses the tail of every batch of characters.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

# The 86 characters, in the order of TFF's text-generation tutorial (and FedJAX), so ids
# agree with datasets prepared by those libraries.
SHAKESPEARE_CHARACTERS = ('dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#\'/37;?bfjnrvzBFJNRVZ"&*.26:\n'
                          'aeimquyAEIMQUY]!%)-159\r')
PAD, BOS, EOS = 0, 1, 2
NUM_RESERVED = 3
OOV = NUM_RESERVED + len(SHAKESPEARE_CHARACTERS)
SHAKESPEARE_VOCAB_SIZE = OOV + 1
SEQUENCE_LENGTH = 80

# id -> printable token (reserved ids as <pad>, <bos>, <eos>, <oov>).
SHAKESPEARE_VOCAB: tuple[str, ...] = (('<pad>', '<bos>', '<eos>') + tuple(SHAKESPEARE_CHARACTERS)
                                      + ('<oov>',))


def _code_table() -> np.ndarray:
  """`[256]` int32: byte value -> id; bytes outside the vocabulary -> OOV."""
  table = np.full((256,), OOV, np.int32)
  for i, ch in enumerate(SHAKESPEARE_CHARACTERS):
    table[ord(ch)] = NUM_RESERVED + i
  return table


_TABLE = _code_table()
assert len(SHAKESPEARE_CHARACTERS) == 86 and len(set(SHAKESPEARE_CHARACTERS)) == 86


def encode_characters(text: str | bytes) -> np.ndarray:
  """`[len]` int32 ids of the characters of `text` (no BOS/EOS); others map to OOV.

  A `str` is encoded character by character: any character beyond ASCII is one OOV
  id. `bytes` are read one byte per id (as FedJAX reads its snippets).
  """
  if isinstance(text, str):
    codes = np.frombuffer(text.encode('utf-32-le'), np.uint32) if text else np.zeros(0, np.uint32)
    return np.where(codes < 256, _TABLE[np.minimum(codes, 255)], OOV).astype(np.int32)
  if isinstance(text, (bytes, bytearray, memoryview)):
    return _TABLE[np.frombuffer(bytes(text), np.uint8)]
  raise TypeError(f'expected str or bytes, got {type(text).__name__}')


def decode_ids(ids: Iterable[int]) -> str:
  """The text of `ids`: characters as themselves, reserved ids as `<pad>` etc."""
  out = []
  for i in ids:
    i = int(i)
    if not 0 <= i < SHAKESPEARE_VOCAB_SIZE:
      raise ValueError(f'id {i} outside the Shakespeare vocabulary [0, {SHAKESPEARE_VOCAB_SIZE})')
    out.append(SHAKESPEARE_VOCAB[i])
  return ''.join(out)


def snippets_to_sequences(snippets: Sequence[str | bytes],
                          sequence_length: int = SEQUENCE_LENGTH) -> tuple[np.ndarray, np.ndarray]:
  """One client's snippets -> `(x [M, T], y [M, T])` int32 next-character pairs.

  The snippets are joined as `BOS s1 EOS BOS s2 EOS ...`; `x` is that stream without
  its last id and `y` without its first, both cut into rows of `T = sequence_length`
  with the last row padded by PAD (so `y` is PAD exactly where `x` is). E.g. with
  T = 3, `['ABCD', 'E']` gives x = [[BOS A B] [C D EOS] [BOS E PAD]] and
  y = [[A B C] [D EOS BOS] [E EOS PAD]]. No snippets give `M = 0` rows.
  """
  if sequence_length < 1:
    raise ValueError(f'sequence_length must be >= 1, got {sequence_length}')
  pieces = []
  for s in snippets:
    pieces += [np.array([BOS], np.int32), encode_characters(s), np.array([EOS], np.int32)]
  if not pieces:
    empty = np.zeros((0, sequence_length), np.int32)
    return empty, empty.copy()
  stream = np.concatenate(pieces)
  pairs = stream.shape[0] - 1
  rows = -(-pairs // sequence_length)
  x = np.full((rows * sequence_length,), PAD, np.int32)
  y = np.full((rows * sequence_length,), PAD, np.int32)
  x[:pairs], y[:pairs] = stream[:-1], stream[1:]
  return x.reshape(rows, sequence_length), y.reshape(rows, sequence_length)
