"""Stack Overflow-format word sequences: a tokenizer, and a generated population at full scale.

Token layout (`fedjax_sync.models.TokenLayout`): PAD = 0, BOS = 1, EOS = 2, the
`vocab_size` most frequent words as 3 .. vocab_size + 2, then `num_oov_buckets`
out-of-vocabulary ids (a word's bucket is a stable CRC-32 hash, so the same word always
lands in the same bucket). A sentence becomes `BOS w1 .. wk EOS`, truncated or padded
to `sequence_length + 1` ids; `x` is all but the last, `y` all but the first (Reddi
et al. 2021, arXiv 2003.00295, §C.3: vocabulary 10,000, sequences of 20 words).

`generated_stackoverflow` builds a population of TFF's Stack Overflow size (342,477
training clients) from GENERATED token data (Zipf-distributed words, heavy-tailed
client sizes), for scale and timing only: its sentences mean nothing. The real
dataset is read from its files by `fedjax_sync.data.files` when a user has them.
"""

from __future__ import annotations

import collections
import zlib
from typing import Iterable, Sequence

import numpy as np

from fedjax_sync.data.federated import FederatedData

PAD, BOS, EOS = 0, 1, 2
NUM_RESERVED = 3
STACKOVERFLOW_CLIENTS = 342_477
SEQUENCE_LENGTH = 20


def tokenize(sentence: str) -> list[str]:
  """Lower-cased whitespace tokens (TFF's Stack Overflow text is already tokenized)."""
  return sentence.lower().split()


def build_vocabulary(sentences: Iterable[str], vocab_size: int = 10_000) -> dict[str, int]:
  """The `vocab_size` most frequent words → ids 3, 4, ... (ties broken alphabetically)."""
  if vocab_size < 1:
    raise ValueError(f'vocab_size must be >= 1, got {vocab_size}')
  counts = collections.Counter(w for s in sentences for w in tokenize(s))
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab_size]
  return {word: NUM_RESERVED + i for i, (word, _) in enumerate(ranked)}


def total_vocab_size(vocab_size: int, num_oov_buckets: int = 1) -> int:
  """Number of ids: PAD, BOS, EOS, the words and the OOV buckets."""
  return NUM_RESERVED + vocab_size + num_oov_buckets


def encode_sentences(sentences: Sequence[str], vocabulary: dict[str, int], *,
                     vocab_size: int | None = None, num_oov_buckets: int = 1,
                     sequence_length: int = SEQUENCE_LENGTH) -> tuple[np.ndarray, np.ndarray]:
  """`(x, y)` `[len(sentences), sequence_length]` int32 next-word pairs, one row per sentence.

  Args:
    sentences: the client's sentences.
    vocabulary: word → id from `build_vocabulary`.
    vocab_size: the vocabulary's nominal size (default `len(vocabulary)`); OOV ids follow it.
    num_oov_buckets: OOV ids; a word's bucket is `crc32(word) % num_oov_buckets`.
    sequence_length: T.
  """
  if num_oov_buckets < 1:
    raise ValueError(f'num_oov_buckets must be >= 1, got {num_oov_buckets}')
  first_oov = NUM_RESERVED + (len(vocabulary) if vocab_size is None else vocab_size)
  rows = np.full((len(sentences), sequence_length + 1), PAD, np.int32)
  for i, sentence in enumerate(sentences):
    ids = [BOS] + [vocabulary.get(w, first_oov + zlib.crc32(w.encode()) % num_oov_buckets)
                   for w in tokenize(sentence)] + [EOS]
    ids = ids[:sequence_length + 1]
    rows[i, :len(ids)] = ids
  return rows[:, :-1], rows[:, 1:]


def generated_stackoverflow(num_clients: int = STACKOVERFLOW_CLIENTS, *, seed: int = 0,
                            vocab_size: int = 10_000, sequence_length: int = SEQUENCE_LENGTH,
                            log_mean: float = 1.5, log_sigma: float = 1.2,
                            max_sentences: int = 1024, test_sentences: int = 1024,
                            zipf_exponent: float = 1.2) -> FederatedData:
  """A GENERATED Stack Overflow-shaped population (scale and timing only).

  Client k has `clip(⌈LogNormal(log_mean, log_sigma)⌉, 1, max_sentences)` sentences
  (median e^1.5 ≈ 4.5, mean ≈ 9.2 by default: heavy-tailed; the real data average
  about 400 per client, which would need tens of GB here). Sentences are BOS, 4 to 30
  Zipf(`zipf_exponent`) word ids folded into the vocabulary (rank ≥ vocab_size becomes
  the OOV id), EOS, cut to `sequence_length`. Tokens are stored as uint16 (vocabulary
  ≤ 65,532), `[n, T]` inputs and targets.
  """
  if num_clients < 1:
    raise ValueError(f'num_clients must be >= 1, got {num_clients}')
  vocab_total = total_vocab_size(vocab_size)
  if vocab_total > np.iinfo(np.uint16).max:
    raise ValueError(f'vocab_size {vocab_size} does not fit uint16 token ids')
  rng = np.random.default_rng(seed)
  counts = np.clip(np.ceil(rng.lognormal(log_mean, log_sigma, num_clients)), 1,
                   max_sentences).astype(np.int64)
  x, y = _generated_sentences(rng, int(counts.sum()), vocab_size, sequence_length,
                              zipf_exponent)
  tx, ty = _generated_sentences(rng, test_sentences, vocab_size, sequence_length, zipf_exponent)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  return FederatedData(train={'x': x, 'y': y}, offsets=offsets, counts=counts,
                       test={'x': tx, 'y': ty}, test_client=None, num_classes=vocab_total,
                       name=f'GENERATED Stack Overflow-shaped tokens ({num_clients} clients)')


def _generated_sentences(rng, n: int, vocab_size: int, length: int, exponent: float):
  oov = NUM_RESERVED + vocab_size
  words = rng.zipf(exponent, (n, length + 1)) - 1 + NUM_RESERVED   # rank 1 → id 3
  words = np.where(words >= oov, oov, words).astype(np.uint16)
  sentence_length = rng.integers(4, 31, n)               # words; BOS at 0, words at 1..k
  position = np.arange(length + 1)[None, :]
  rows = np.where(position <= sentence_length[:, None], words, PAD).astype(np.uint16)
  rows[:, 0] = BOS
  fits = np.flatnonzero(sentence_length + 1 <= length)   # EOS after the words, if it fits
  rows[fits, sentence_length[fits] + 1] = EOS
  return rows[:, :-1], rows[:, 1:]
