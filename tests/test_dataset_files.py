"""Readers of researchers' files: LEAF JSON, TFF HDF5/SQLite, FedJAX SQLite, IDX.

Every file is written here by the test itself, with its own minimal writer (protobuf
wire format, msgpack + zlib, IDX headers), and read back through the package.
"""

import gzip
import json
import os
import sqlite3
import struct
import zlib

import msgpack
import numpy as np
import pytest

from fedjax_sync.cli import main
from fedjax_sync.data import examples as ex
from fedjax_sync.data import files, idx, shakespeare, tff_sqlite
from fedjax_sync.data.registry import default_model, load_dataset

# ---------------------------------------------------------------- writers (test-side)


def _write_idx(path, array, type_code):
  dtype = {0x08: '>u1', 0x0C: '>i4', 0x0D: '>f4'}[type_code]
  payload = bytes([0, 0, type_code, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  payload += np.asarray(array).astype(dtype).tobytes()
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(payload)


def _varint(v):
  out = bytearray()
  while True:
    b = v & 0x7F
    v >>= 7
    out.append(b | (0x80 if v else 0))
    if not v:
      return bytes(out)


def _field(number, payload):  # length-delimited field
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _example(features):
  """A serialized tf.train.Example: {name: bytes | list of floats | list of ints}."""
  entries = b''
  for name, value in features.items():
    if isinstance(value, bytes):
      feature = _field(1, _field(1, value))
    elif isinstance(value[0], float):
      feature = _field(2, _field(1, struct.pack(f'<{len(value)}f', *value)))
    else:
      feature = _field(3, _field(1, b''.join(_varint(v % (1 << 64)) for v in value)))
    entries += _field(1, _field(1, name.encode()) + _field(2, feature))
  return _field(1, entries)


def _msgpack_array(a):
  if a.dtype == object:
    inner = msgpack.packb((list(a.shape), list(a.reshape(-1))), use_bin_type=True)
    return msgpack.ExtType(4, inner)
  inner = msgpack.packb((list(a.shape), a.dtype.name, a.tobytes('C')), use_bin_type=True)
  return msgpack.ExtType(1, inner)


def _fedjax_sqlite(path, clients):
  connection = sqlite3.connect(path)
  connection.execute('CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, '
                     'data BLOB NOT NULL, num_examples INTEGER NOT NULL)')
  for cid, features in clients.items():
    blob = zlib.compress(msgpack.packb(features, default=_msgpack_array, use_bin_type=True))
    n = len(next(iter(features.values())))
    connection.execute('INSERT INTO federated_data VALUES (?, ?, ?)', (cid.encode(), blob, n))
  connection.commit()
  connection.close()


def _emnist_clients(rng, sizes, first_label=0):
  return {f'f{i:04d}': {'pixels': rng.random((n, 28, 28)).astype(np.float32),
                        'label': rng.integers(first_label, 62, n).astype(np.int32)}
          for i, n in enumerate(sizes)}


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize('suffix', ['', '.gz'])
def test_idx_round_trip_and_directory(tmp_path, suffix):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (30, 5, 4), dtype=np.uint8)
  labels = rng.integers(0, 10, 30).astype(np.uint8)
  wide = rng.integers(-2**31, 2**31 - 1, (3, 2), dtype=np.int64).astype(np.int32)
  _write_idx(tmp_path / f'train-images-idx3-ubyte{suffix}', images[:24], 0x08)
  _write_idx(tmp_path / f'train-labels-idx1-ubyte{suffix}', labels[:24], 0x08)
  _write_idx(tmp_path / f't10k-images-idx3-ubyte{suffix}', images[24:], 0x08)
  _write_idx(tmp_path / f't10k-labels-idx1-ubyte{suffix}', labels[24:], 0x08)
  _write_idx(tmp_path / 'wide.idx2-ubyte', wide, 0x0C)
  np.testing.assert_array_equal(idx.read_idx(str(tmp_path / f'train-images-idx3-ubyte{suffix}')),
                                images[:24])
  np.testing.assert_array_equal(idx.read_idx(str(tmp_path / 'wide.idx2-ubyte')), wide)
  data = load_dataset('idx', data_path=str(tmp_path), num_clients=3, partition='iid')
  assert data.train['x'].shape == (24, 5, 4, 1) and data.train['x'].dtype == np.uint8
  # the partition only reorders the rows: the same multiset of images
  assert sorted(map(bytes, data.train['x'].reshape(24, -1))) == sorted(
      map(bytes, images[:24].reshape(24, -1)))
  np.testing.assert_array_equal(data.test['x'][..., 0], images[24:])
  np.testing.assert_array_equal(data.test['y'], labels[24:])
  assert files.detect_format(str(tmp_path)) == 'idx'


def test_fashion_mnist_sources(tmp_path, monkeypatch):
  from fedjax_sync.data import tfds
  rng = np.random.default_rng(7)
  for split, n in (('train', 20), ('t10k', 5)):
    _write_idx(tmp_path / f'{split}-images-idx3-ubyte.gz',
               rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), 0x08)
    _write_idx(tmp_path / f'{split}-labels-idx1-ubyte.gz', rng.integers(0, 10, n), 0x08)
  monkeypatch.setattr(tfds, 'is_prepared', lambda name, data_dir=None: False)
  data = load_dataset('fashion_mnist', data_path=str(tmp_path), num_clients=2)
  assert data.num_examples == 20 and data.num_classes == 10
  monkeypatch.setattr(idx, 'FASHION_MNIST_DEBIAN_DIR', str(tmp_path))  # "installed"
  assert load_dataset('fashion_mnist', num_clients=4).num_clients == 4
  monkeypatch.setattr(idx, 'FASHION_MNIST_DEBIAN_DIR', str(tmp_path / 'absent'))
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    load_dataset('fashion_mnist')


def test_idx_malformed_and_missing(tmp_path):
  bad = tmp_path / 'train-images-idx3-ubyte'
  _write_idx(bad, np.zeros((4, 3, 3), np.uint8), 0x08)
  bad.write_bytes(bad.read_bytes()[:-5])  # truncated
  with pytest.raises(ValueError, match='truncated') as info:
    idx.read_idx(str(bad))
  assert str(bad) in str(info.value) and '\n' not in str(info.value)
  (tmp_path / 'x-idx1-ubyte').write_bytes(b'PK\x03\x04junk')
  with pytest.raises(ValueError, match='magic'):
    idx.read_idx(str(tmp_path / 'x-idx1-ubyte'))
  with pytest.raises(FileNotFoundError, match='lacks'):
    idx.find_idx_files(str(tmp_path))
  with pytest.raises(ValueError, match='--data-path'):
    load_dataset('idx')


# ---------------------------------------------------------------- LEAF


def _leaf_file(path, users):
  with open(path, 'w') as f:
    json.dump({'users': list(users), 'num_samples': [len(u['y']) for u in users.values()],
               'user_data': users}, f)


def test_leaf_femnist_directory(tmp_path):
  rng = np.random.default_rng(1)
  train = {f'u{i}': {'x': rng.random((n, 784)).round(3).tolist(),
                     'y': rng.integers(0, 62, n).tolist()} for i, n in enumerate((3, 5, 2))}
  test = {'u1': {'x': rng.random((2, 784)).round(3).tolist(), 'y': [4, 61]},
          'u2': {'x': rng.random((1, 784)).round(3).tolist(), 'y': [7]},
          'stranger': {'x': rng.random((1, 784)).tolist(), 'y': [0]}}
  (tmp_path / 'train').mkdir()
  (tmp_path / 'test').mkdir()
  _leaf_file(tmp_path / 'train' / 'a.json', {'u0': train['u0'], 'u1': train['u1']})
  _leaf_file(tmp_path / 'train' / 'b.json', {'u2': train['u2']})
  _leaf_file(tmp_path / 'test' / 'a.json', test)
  data = load_dataset(str(tmp_path))
  assert files.detect_format(str(tmp_path)) == 'leaf'
  assert data.num_clients == 3 and list(data.counts) == [3, 5, 2] and data.num_classes == 62
  for k, user in enumerate(train.values()):
    np.testing.assert_allclose(data.client(k)['x'].reshape(-1, 784), np.float32(user['x']))
    np.testing.assert_array_equal(data.client(k)['y'], user['y'])
  assert data.train['x'].shape[1:] == (28, 28, 1)
  np.testing.assert_array_equal(data.test['y'], [4, 61, 7])  # 'stranger' is not a client
  np.testing.assert_array_equal(data.test_client, [1, 1, 2])
  assert default_model(str(tmp_path)) == 'emnist_cnn'
  # the train/ directory alone finds its sibling test/
  assert np.array_equal(load_dataset(str(tmp_path / 'train')).test_client, [1, 1, 2])


def test_leaf_shakespeare_and_sent140(tmp_path):
  text = 'To be, or not to be: that is the question. Whether tis nobler in the mind'
  xs = [text[i:i + 10] for i in range(8)]
  ys = [text[i + 10] for i in range(8)]
  _leaf_file(tmp_path / 'shakespeare.json', {'HAMLET': {'x': xs, 'y': ys}})
  data = load_dataset(str(tmp_path / 'shakespeare.json'))
  # one JSON file: the last 20% (floor) of each user is held out
  assert data.num_examples == 7 and data.test['x'].shape == (1, 10)
  x_all = np.concatenate([data.train['x'], data.test['x']])
  y_all = np.concatenate([data.train['y'], data.test['y']])
  for row, (x, y) in enumerate(zip(xs, ys)):
    assert shakespeare.decode_ids(x_all[row]) == x
    assert shakespeare.decode_ids(y_all[row]) == x[1:] + y
  assert data.num_classes == shakespeare.SHAKESPEARE_VOCAB_SIZE

  rows = [['1', 'Mon', 'NO_QUERY', 'ann', 'I LOVE the rain!'],
          ['2', 'Mon', 'NO_QUERY', 'ann', 'rain, rain... go away'],
          ['3', 'Tue', 'NO_QUERY', 'ann', "can't stand it"],
          ['4', 'Tue', 'NO_QUERY', 'ann', 'love love love'],
          ['5', 'Tue', 'NO_QUERY', 'ann', 'zebra']]
  _leaf_file(tmp_path / 'sent140.json', {'ann': {'x': rows, 'y': [1, 0, 0, 1, 1]}})
  data = load_dataset(str(tmp_path / 'sent140.json'))
  assert ex.tokenize_words('rain, rain... go away') == ['rain', 'rain', 'go', 'away']
  # vocabulary from the 4 training rows, by frequency then alphabetically
  vocab = ['love', 'rain', 'away', "can't", 'go', 'i', 'it', 'stand', 'the']
  ids = {w: ex.WORD_RESERVED + i for i, w in enumerate(vocab)}
  np.testing.assert_array_equal(data.train['x'][0, :4], [ids['i'], ids['love'], ids['the'],
                                                          ids['rain']])
  assert data.train['x'][0, 4] == ex.WORD_PAD and data.train['x'].shape == (4, 25)
  assert data.test['x'][0, 0] == ex.WORD_RESERVED + len(vocab)  # 'zebra': OOV bucket
  np.testing.assert_array_equal(data.train['y'], [1, 0, 0, 1])


# ---------------------------------------------------------------- TFF HDF5


def test_tff_h5_emnist_and_shakespeare(tmp_path):
  h5py = pytest.importorskip('h5py')
  rng = np.random.default_rng(2)
  train, test = _emnist_clients(rng, (4, 2, 3)), _emnist_clients(rng, (1, 2, 1))
  for name, clients in (('fed_emnist_train.h5', train), ('fed_emnist_test.h5', test)):
    with h5py.File(tmp_path / name, 'w') as f:
      for cid, features in clients.items():
        for key, value in features.items():
          f.create_dataset(f'examples/{cid}/{key}', data=value)
  path = str(tmp_path / 'fed_emnist_train.h5')
  assert files.detect_format(path) == 'tff_h5'
  data = load_dataset(path)
  assert list(data.counts) == [4, 2, 3]
  for k, client in enumerate(train.values()):
    np.testing.assert_array_equal(data.client(k)['x'][..., 0], client['pixels'])
    np.testing.assert_array_equal(data.client(k)['y'], client['label'])
  np.testing.assert_array_equal(data.test_client, [0, 1, 1, 2])
  np.testing.assert_array_equal(data.test['y'], np.concatenate(
      [c['label'] for c in test.values()]))

  snippets = [b'Good morrow, cousin.', b'Is the day so young? But new struck nine.',
              b'Ay me! sad hours seem long. Was that my father that went hence so fast?']
  with h5py.File(tmp_path / 'shakespeare.h5', 'w') as f:
    f.create_dataset('examples/ROMEO/snippets', data=np.array(snippets, dtype=object),
                     dtype=h5py.string_dtype())
  data = load_dataset(str(tmp_path / 'shakespeare.h5'))
  x, y = shakespeare.snippets_to_sequences(snippets)
  assert len(x) == 2 and data.test['x'].shape == (1, 80)  # one row held out (no test file)
  np.testing.assert_array_equal(np.concatenate([data.train['x'], data.test['x']]), x)
  np.testing.assert_array_equal(np.concatenate([data.train['y'], data.test['y']]), y)


# ---------------------------------------------------------------- TFF SQLite


def test_tff_sqlite_hand_encoded_protos(tmp_path):
  rng = np.random.default_rng(3)
  path = tmp_path / 'emnist.sqlite'
  connection = sqlite3.connect(path)
  connection.execute('CREATE TABLE examples (split_name TEXT, client_id TEXT, '
                     'serialized_example_proto BLOB)')
  expected = {}
  for split, sizes in (('train', (3, 2)), ('test', (1, 1))):
    for c, n in enumerate(sizes):
      for _ in range(n):
        pixels = rng.random(784).astype(np.float32)
        label = int(rng.integers(0, 62))
        expected.setdefault((split, c), []).append((pixels, label))
        connection.execute('INSERT INTO examples VALUES (?, ?, ?)', (
            split, f'c{c}', _example({'pixels': [float(p) for p in pixels], 'label': [label]})))
  connection.commit()
  connection.close()
  assert files.detect_format(str(path)) == 'tff_sqlite'
  data = load_dataset(str(path))
  assert list(data.counts) == [3, 2]
  for c in range(2):
    np.testing.assert_array_equal(data.client(c)['x'].reshape(-1, 784),
                                  [p for p, _ in expected['train', c]])
    np.testing.assert_array_equal(data.client(c)['y'], [lab for _, lab in expected['train', c]])
  np.testing.assert_array_equal(data.test_client, [0, 1])
  # bytes and negative int64 features decode exactly
  decoded = tff_sqlite.decode_example(_example({'snippets': b'Hark!', 'score': [-5, 2**40]}))
  assert decoded['snippets'] == [b'Hark!'] and list(decoded['score']) == [-5, 2**40]


# ---------------------------------------------------------------- FedJAX SQLite


def test_fedjax_sqlite_msgpack_zlib(tmp_path):
  rng = np.random.default_rng(4)
  train, test = _emnist_clients(rng, (2, 5)), _emnist_clients(rng, (3, 1))
  _fedjax_sqlite(tmp_path / 'emnist_train.sqlite', train)
  _fedjax_sqlite(tmp_path / 'emnist_test.sqlite', test)
  path = str(tmp_path / 'emnist_train.sqlite')
  assert files.detect_format(path) == 'fedjax_sqlite'
  data = load_dataset(path)
  assert list(data.counts) == [2, 5] and data.num_classes == 62
  for k, client in enumerate(train.values()):
    np.testing.assert_array_equal(data.client(k)['x'][..., 0], client['pixels'])
    np.testing.assert_array_equal(data.client(k)['y'], client['label'])
  np.testing.assert_array_equal(data.test_client, [0, 0, 0, 1])

  tokens = np.array([b'how do i sort a list', b'sort a dict', b'a b', b'sort c', b'why'],
                    dtype=object)
  _fedjax_sqlite(tmp_path / 'so.sqlite', {'user1': {'tokens': tokens,
                                                    'tags': np.array([b'py'] * 5, dtype=object)}})
  data = load_dataset(str(tmp_path / 'so.sqlite'))
  # vocabulary from the 4 training sentences (the 5th is held out): a, sort (×3), then
  # alphabetical
  vocab = ['a', 'sort', 'b', 'c', 'dict', 'do', 'how', 'i', 'list']
  ids = {w: ex.WORD_RESERVED + i for i, w in enumerate(vocab)}
  first = [ex.WORD_BOS] + [ids[w] for w in 'how do i sort a list'.split()] + [ex.WORD_EOS]
  np.testing.assert_array_equal(data.train['x'][0, :7], first[:-1])
  np.testing.assert_array_equal(data.train['y'][0, :7], first[1:])
  assert data.train['x'].shape == (4, 20) and (data.train['x'][0, 7:] == ex.WORD_PAD).all()
  assert data.test['y'][0, 0] == ex.WORD_RESERVED + len(vocab)  # 'why' → OOV
  assert data.num_classes == ex.WORD_RESERVED + len(vocab) + 1


# ---------------------------------------------------------------- CLI and errors


def test_inspect_a_file_and_a_name(tmp_path, capsys):
  rng = np.random.default_rng(5)
  _fedjax_sqlite(tmp_path / 'train.sqlite', {
      f'c{i}': {'x': rng.random((n, 6)).astype(np.float32),
                'y': rng.integers(0, 3, n).astype(np.int32)} for i, n in enumerate((5, 10, 20))})
  path = str(tmp_path / 'train.sqlite')
  assert main(['inspect', path]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[:2] == ['clients: 3', 'examples: 28']  # 4 + 8 + 16 after the 20% hold-out
  assert 'feature x: shape [n, 6] dtype float32' in lines
  assert 'examples per client: min 4, p10 4.8, p25 6, median 8, p75 12, p90 14.4, max 16' in lines
  assert main(['inspect', 'synthetic']) == 0
  assert capsys.readouterr().out.startswith('clients: 30\nexamples: ')
  with pytest.raises(SystemExit) as info:  # argparse: a usage error, exit code 2
    main(['inspect', str(tmp_path / 'nothing.sqlite')])
  assert info.value.code == 2 and 'nothing.sqlite' in capsys.readouterr().err


@pytest.mark.slow  # one compiled round: ~5 s alone, far more on a loaded CPU
def test_run_on_a_file(tmp_path, capsys):
  rng = np.random.default_rng(6)
  _fedjax_sqlite(tmp_path / 'train.sqlite', {
      f'c{i}': {'x': rng.random((n, 6)).astype(np.float32),
                'y': rng.integers(0, 3, n).astype(np.int32)} for i, n in enumerate((5, 10, 20))})
  run_dir = tmp_path / 'run'
  assert main(['run', '--dataset', str(tmp_path / 'train.sqlite'), '--model',
               'logistic_regression', '--rounds', '1', '--clients-per-round', '2',
               '--local-steps', '1', '--eval-every', '1', '--quiet', '--run-dir',
               str(run_dir)]) == 0
  assert 'train.sqlite [fedjax_sqlite]' in capsys.readouterr().out
  config = json.loads((run_dir / 'config.json').read_text())
  assert config['num_clients'] == 3 and config['dataset'].endswith('train.sqlite')


@pytest.mark.parametrize('kind', ['json', 'sqlite_blob', 'h5_layout', 'not_a_format'])
def test_malformed_files_are_one_line_errors_naming_the_file(tmp_path, capsys, kind):
  if kind == 'json':
    path = tmp_path / 'train.json'
    path.write_text('{"users": ["a"], "user_data": {"a": {"x": [[0.1]], "y": ')
  elif kind == 'sqlite_blob':
    path = tmp_path / 'bad.sqlite'
    connection = sqlite3.connect(path)
    connection.execute('CREATE TABLE federated_data (client_id BLOB, data BLOB, '
                       'num_examples INTEGER)')
    connection.execute('INSERT INTO federated_data VALUES (?, ?, ?)', (b'a', b'not zlib', 1))
    connection.commit()
    connection.close()
  elif kind == 'h5_layout':
    h5py = pytest.importorskip('h5py')
    path = tmp_path / 'bad.h5'
    with h5py.File(path, 'w') as f:
      f.create_dataset('pixels', data=np.zeros(3))
  else:
    path = tmp_path / 'data.bin'
    path.write_bytes(b'\x00' * 32)
  with pytest.raises(ValueError) as info:
    load_dataset(str(path))
  assert str(path) in str(info.value) and '\n' not in str(info.value)
  assert main(['inspect', str(path)]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and str(path) in err
