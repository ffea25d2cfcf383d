"""Per-client feature dictionaries → the flat `FederatedData` layout, streamed.

The readers of researchers' files (`leaf`, `tff_h5`, `tff_sqlite`, `fedjax_sqlite`)
each yield one client at a time as `(client_id, {feature: array})`. This module turns
those features into model inputs `x` and targets `y` and appends them to growing,
preallocated arrays (capacity doubling), so a file is never held whole as Python
objects. The conversion is chosen from the feature names:

| features | meaning | `x` | `y` |
|---|---|---|---|
| `x`, `y` (numeric) | already model-ready | as stored | as stored |
| `pixels`, `label` | EMNIST (TFF / FedJAX / LEAF FEMNIST) | float32 `[n, 28, 28, 1]` | int32 `[n]`, 62 classes (10 if all labels < 10) |
| `snippets` | Shakespeare (TFF / FedJAX) | int32 `[M, 80]` character ids | next characters `[M, 80]` |
| `chars`, `next_chars` | Shakespeare (LEAF, encoded by `leaf`) | int32 `[n, 80]` | int32 `[n, 80]` |
| `tokens` | StackOverflow (TFF / FedJAX) | int32 `[M, 20]` word ids | next words `[M, 20]` |
| `text`, `label` | Sent140 (LEAF) | int32 `[n, 25]` word ids | int32 `[n]`, 2 classes |

Character ids follow `fedjax_sync.data.shakespeare` (vocabulary 90). Words use a
vocabulary built from the training split: `PAD 0, BOS 1, EOS 2`, then the most
frequent `vocabulary_size` words (ties broken alphabetically), then `oov_buckets` ids
for every other word (hashed by CRC-32). The word tokenizer is documented in
`tokenize_words`.
"""

from __future__ import annotations

import collections
import os
import re
import zlib
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from fedjax_sync.data.federated import FederatedData

ClientStream = Callable[[str], Iterator[tuple[str, Mapping[str, object]]]]
"""`split -> iterator of (client_id, features)`; raises KeyError for an absent split."""

WORD_PAD, WORD_BOS, WORD_EOS = 0, 1, 2
WORD_RESERVED = 3
STACKOVERFLOW_VOCABULARY_SIZE = 10_000
STACKOVERFLOW_SEQUENCE_LENGTH = 20
SENT140_VOCABULARY_SIZE = 10_000
SENT140_SEQUENCE_LENGTH = 25
HELD_OUT_FRACTION = 0.2
_WORD = re.compile(r"[a-z0-9']+")


def tokenize_words(text: str | bytes, *, split_on_spaces: bool = False) -> list[str]:
  """Words of `text`.

  `split_on_spaces=True` (StackOverflow, whose `tokens` are already tokenized):
  split on whitespace. Otherwise (Sent140 tweets): lower-case, then the maximal runs
  of `[a-z0-9']` (punctuation, `@`, `#` and URLs' separators split words).
  """
  if isinstance(text, (bytes, bytearray)):
    text = bytes(text).decode('utf-8', errors='replace')
  return text.split() if split_on_spaces else _WORD.findall(text.lower())


class WordVocabulary:
  """Word → id: reserved ids, the most frequent words, then CRC-32 OOV buckets."""

  def __init__(self, counts: Mapping[str, int], size: int, oov_buckets: int = 1):
    if size < 1 or oov_buckets < 1:
      raise ValueError(f'vocabulary size and oov_buckets must be >= 1, got {size}, {oov_buckets}')
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]
    self.words = tuple(w for w, _ in ranked)
    self._ids = {w: WORD_RESERVED + i for i, w in enumerate(self.words)}
    self.oov_buckets = oov_buckets
    self.size = WORD_RESERVED + len(self.words) + oov_buckets

  def encode(self, words: Iterable[str]) -> np.ndarray:
    first_oov = WORD_RESERVED + len(self.words)
    return np.array([self._ids.get(w, first_oov + zlib.crc32(w.encode()) % self.oov_buckets)
                     for w in words], np.int32)


class _Rows:
  """A growing array with amortized doubling (one copy at the end)."""

  def __init__(self):
    self.buffer, self.size = None, 0

  def append(self, values: np.ndarray) -> None:
    if self.buffer is None:
      self.buffer = np.empty((max(2 * len(values), 64),) + values.shape[1:], values.dtype)
    if values.shape[1:] != self.buffer.shape[1:]:
      raise ValueError(f'rows of shape {values.shape[1:]} after rows of shape '
                       f'{self.buffer.shape[1:]}')
    need = self.size + len(values)
    if need > len(self.buffer):
      grown = np.empty((max(need, 2 * len(self.buffer)),) + self.buffer.shape[1:],
                       self.buffer.dtype)
      grown[:self.size] = self.buffer[:self.size]
      self.buffer = grown
    self.buffer[self.size:need] = values
    self.size = need

  def finish(self, empty_like: np.ndarray | None = None) -> np.ndarray:
    if self.buffer is None:
      return np.zeros((0,) + (empty_like.shape[1:] if empty_like is not None else ()),
                      empty_like.dtype if empty_like is not None else np.float32)
    return self.buffer[:self.size].copy()


def _training_part(rows: list, held_out_fraction: float) -> list:
  return rows[:len(rows) - int(np.floor(held_out_fraction * len(rows)))]


def _as_bytes_list(values) -> list:
  return [v if isinstance(v, (bytes, str)) else bytes(v) for v in np.asarray(
      values, dtype=object).reshape(-1)]


class Converter:
  """Turns one client's features into `{'x', 'y'}` rows; chosen by `converter_for`."""

  kind = 'arrays'
  needs_words = False

  def __init__(self):
    self.max_label = -1

  def count_words(self, features, held_out_fraction: float = 0.0) -> Iterable[str]:
    """Words of the training examples (for `needs_words` converters), without the last
    `floor(held_out_fraction · n)` examples, which a hold-out will make test examples."""
    return ()

  def set_vocabulary(self, vocabulary: WordVocabulary) -> None:
    self.vocabulary = vocabulary

  def convert(self, features) -> dict[str, np.ndarray]:
    x, y = np.asarray(features['x']), np.asarray(features['y'])
    if x.dtype == object or y.dtype == object:
      raise ValueError('features x and y must be numeric arrays')
    if np.issubdtype(y.dtype, np.integer) and y.size:
      self.max_label = max(self.max_label, int(y.max()))
    return {'x': x, 'y': y}

  def num_classes(self) -> int:
    return self.max_label + 1


class ImageConverter(Converter):
  """EMNIST: `pixels` (784 values or 28×28) and `label`."""

  kind = 'emnist'

  def convert(self, features):
    pixels = np.asarray(features['pixels'], np.float32)
    label = np.asarray(features['label']).reshape(-1)
    if pixels.shape[0] != label.shape[0]:
      raise ValueError(f'{pixels.shape[0]} pixel rows but {label.shape[0]} labels')
    side = int(round(np.sqrt(pixels[0].size))) if pixels.shape[0] else 28
    if side * side != (pixels[0].size if pixels.shape[0] else 784):
      raise ValueError(f'pixels of {pixels[0].size} values are not a square image')
    if label.size:
      self.max_label = max(self.max_label, int(label.max()))
      if label.min() < 0:
        raise ValueError(f'negative label {int(label.min())}')
    return {'x': pixels.reshape(-1, side, side, 1), 'y': label.astype(np.int32)}

  def num_classes(self) -> int:
    return 10 if self.max_label < 10 else max(62, self.max_label + 1)


class ShakespeareConverter(Converter):
  """Shakespeare `snippets` → next-character sequences (`shakespeare.snippets_to_sequences`)."""

  kind = 'shakespeare'

  def __init__(self, sequence_length: int | None = None):
    super().__init__()
    from fedjax_sync.data import shakespeare
    self._module = shakespeare
    self.sequence_length = sequence_length or shakespeare.SEQUENCE_LENGTH

  def convert(self, features):
    x, y = self._module.snippets_to_sequences(_as_bytes_list(features['snippets']),
                                              self.sequence_length)
    return {'x': x, 'y': y}

  def num_classes(self) -> int:
    return self._module.SHAKESPEARE_VOCAB_SIZE


class CharacterPairsConverter(ShakespeareConverter):
  """LEAF Shakespeare, already encoded by `leaf`: `chars [n, T]`, `next_chars [n, T]`."""

  def convert(self, features):
    return {'x': np.asarray(features['chars'], np.int32),
            'y': np.asarray(features['next_chars'], np.int32)}


class StackOverflowConverter(Converter):
  """StackOverflow `tokens` (space-separated sentences) → next-word sequences.

  Each sentence becomes `BOS w1 … wk EOS`, cut to `sequence_length + 1` ids; `x` is
  that without its last id, `y` without its first, both PAD-padded to
  `sequence_length` (one row per sentence, as FedJAX and TFF do).
  """

  kind = 'stackoverflow'
  needs_words = True

  def __init__(self, vocabulary_size=STACKOVERFLOW_VOCABULARY_SIZE,
               sequence_length=STACKOVERFLOW_SEQUENCE_LENGTH, oov_buckets=1):
    super().__init__()
    self.vocabulary_size, self.sequence_length = vocabulary_size, sequence_length
    self.oov_buckets = oov_buckets

  def count_words(self, features, held_out_fraction=0.0):
    for sentence in _training_part(_as_bytes_list(features['tokens']), held_out_fraction):
      yield from tokenize_words(sentence, split_on_spaces=True)

  def convert(self, features):
    sentences = _as_bytes_list(features['tokens'])
    t = self.sequence_length
    x = np.full((len(sentences), t), WORD_PAD, np.int32)
    y = np.full((len(sentences), t), WORD_PAD, np.int32)
    for i, sentence in enumerate(sentences):
      ids = np.concatenate([[WORD_BOS], self.vocabulary.encode(
          tokenize_words(sentence, split_on_spaces=True)), [WORD_EOS]])[:t + 1]
      x[i, :len(ids) - 1], y[i, :len(ids) - 1] = ids[:-1], ids[1:]
    return {'x': x, 'y': y}

  def num_classes(self) -> int:
    return self.vocabulary.size


class Sent140Converter(Converter):
  """LEAF Sent140 tweets (`text`, `label`) → PAD-padded word ids and 0/1 sentiment."""

  kind = 'sent140'
  needs_words = True

  def __init__(self, vocabulary_size=SENT140_VOCABULARY_SIZE,
               sequence_length=SENT140_SEQUENCE_LENGTH, oov_buckets=1):
    super().__init__()
    self.vocabulary_size, self.sequence_length = vocabulary_size, sequence_length
    self.oov_buckets = oov_buckets

  def count_words(self, features, held_out_fraction=0.0):
    for text in _training_part(_as_bytes_list(features['text']), held_out_fraction):
      yield from tokenize_words(text)

  def convert(self, features):
    texts = _as_bytes_list(features['text'])
    x = np.full((len(texts), self.sequence_length), WORD_PAD, np.int32)
    for i, text in enumerate(texts):
      ids = self.vocabulary.encode(tokenize_words(text))[:self.sequence_length]
      x[i, :len(ids)] = ids
    label = np.asarray(features['label']).reshape(-1).astype(np.int32)
    if label.size and (label.min() < 0 or label.max() > 1):
      raise ValueError(f'Sent140 labels must be 0 or 1, got [{label.min()}, {label.max()}]')
    return {'x': x, 'y': label}

  def num_classes(self) -> int:
    return 2


def converter_for(feature_names: Iterable[str]) -> Converter:
  """The conversion for a client's feature names (see the module table)."""
  names = set(feature_names)
  if {'x', 'y'} <= names:
    return Converter()
  if {'pixels', 'label'} <= names:
    return ImageConverter()
  if {'chars', 'next_chars'} <= names:
    return CharacterPairsConverter()
  if 'snippets' in names:
    return ShakespeareConverter()
  if 'tokens' in names:
    return StackOverflowConverter()
  if {'text', 'label'} <= names:
    return Sent140Converter()
  raise ValueError(f'unrecognized features {sorted(names)}; known: x+y, pixels+label (EMNIST), '
                   'snippets (Shakespeare), tokens (StackOverflow), text+label (Sent140)')


def build_federated(stream: ClientStream, *, name: str, has_test: bool,
                    max_clients: int | None = None) -> FederatedData:
  """Streams `stream('train')` (and `stream('test')`) into a `FederatedData`.

  Clients keep the order of the file; empty clients are dropped. Test examples of
  clients absent from the training split are dropped. Without a test split, the
  last `HELD_OUT_FRACTION` of each client's examples (rounded down) is held out as
  its test split (at least one example overall).

  Args:
    stream: `split -> iterator of (client_id, features)`.
    name: description.
    has_test: whether `stream('test')` exists.
    max_clients: read only the first `max_clients` training clients.
  """
  converter = None
  for _, features in stream('train'):  # the first client's feature names pick the conversion
    converter = converter_for(features.keys())
    break
  if converter is None:
    raise ValueError('the training split has no clients')
  if converter.needs_words:
    counts = collections.Counter()
    for k, (_, features) in enumerate(stream('train')):
      if max_clients is not None and k >= max_clients:
        break
      counts.update(converter.count_words(features, 0.0 if has_test else HELD_OUT_FRACTION))
    converter.set_vocabulary(WordVocabulary(counts, converter.vocabulary_size,
                                            converter.oov_buckets))
  train = {'x': _Rows(), 'y': _Rows()}
  ids, sizes = {}, []
  for client_id, features in stream('train'):
    if max_clients is not None and len(sizes) >= max_clients:
      break
    rows = converter.convert(features)
    n = len(rows['x'])
    if n == 0:
      continue
    if len(rows['y']) != n:
      raise ValueError(f'client {client_id!r}: {n} inputs but {len(rows["y"])} targets')
    if client_id in ids:
      raise ValueError(f'client {client_id!r} appears twice in the training split')
    ids[client_id] = len(sizes)
    sizes.append(n)
    for key in ('x', 'y'):
      train[key].append(rows[key])
  if not sizes:
    raise ValueError('the training split has no examples')
  counts = np.asarray(sizes, np.int64)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  flat = {k: v.finish() for k, v in train.items()}
  if has_test:
    test, owners = {'x': _Rows(), 'y': _Rows()}, _Rows()
    for client_id, features in stream('test'):
      if client_id not in ids:
        continue
      rows = converter.convert(features)
      if len(rows['x']):
        for key in ('x', 'y'):
          test[key].append(rows[key])
        owners.append(np.full((len(rows['x']),), ids[client_id], np.int32))
    test_arrays = {k: v.finish(flat[k]) for k, v in test.items()}
    test_client = owners.finish(np.zeros((0,), np.int32))
  else:
    flat, counts, test_arrays, test_client = hold_out(flat, counts, HELD_OUT_FRACTION)
    name += f' (no test split: last {HELD_OUT_FRACTION:.0%} of each client held out)'
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  num_classes = converter.num_classes()
  for split, arrays in (('train', flat), ('test', test_arrays)):
    y = arrays['y']
    if np.issubdtype(y.dtype, np.integer) and y.size and (y.min() < 0 or y.max() >= num_classes):
      raise ValueError(f'{split} targets in [{y.min()}, {y.max()}] outside [0, {num_classes})')
  return FederatedData(train=flat, offsets=offsets, counts=counts, test=test_arrays,
                       test_client=test_client, num_classes=num_classes,
                       name=f'{name} ({len(counts)} clients, {converter.kind})')


def hold_out(flat: Mapping[str, np.ndarray], counts: np.ndarray, fraction: float):
  """Splits the last `floor(fraction · n_k)` examples of each client off as its test set.

  Returns `(train, counts, test, test_client)`.
  """
  counts = np.asarray(counts, np.int64)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  held = np.floor(fraction * counts).astype(np.int64)
  if held.sum() == 0:  # tiny clients: hold out one example of the largest one
    largest = int(np.argmax(counts))
    if counts[largest] < 2:
      raise ValueError('no test split, and no client has 2 examples to hold one out')
    held[largest] = 1
  position = np.arange(int(counts.sum())) - np.repeat(offsets, counts)
  is_test = position >= np.repeat(counts - held, counts)
  train = {k: v[~is_test] for k, v in flat.items()}
  test = {k: v[is_test] for k, v in flat.items()}
  owner = np.repeat(np.arange(len(counts), dtype=np.int32), counts)[is_test]
  return train, counts - held, test, owner


def sibling_test_file(path: str) -> str | None:
  """The test file next to a `…train…` file (last `train` → `test`), if it exists."""
  directory, base = os.path.split(path)
  i = base.rfind('train')
  if i < 0:
    return None
  candidate = os.path.join(directory, base[:i] + 'test' + base[i + 5:])
  return candidate if os.path.isfile(candidate) else None
