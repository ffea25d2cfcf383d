"""Metric sinks (TensorBoard event files), the progress clock, plot labels, bench anchors."""

import json
import math
import os
import struct

import jax
import numpy as np
import pytest

import fedjax_sync as fs
from fedjax_sync import cli, sinks
from fedjax_sync.cli import build_parser, main


def test_crc32c_known_values_and_mask():
  # The CRC-32C check value, and RFC 3720 (iSCSI) B.4 vectors.
  assert sinks.crc32c(b'123456789') == 0xE3069283
  assert sinks.crc32c(bytes(32)) == 0x8A9136AA
  assert sinks.crc32c(bytes([0xFF] * 32)) == 0x62A8AB43
  assert sinks.crc32c(bytes(range(32))) == 0x46DD794E
  crc = sinks.crc32c(b'abc')
  assert sinks.masked_crc32c(b'abc') == ((crc >> 15 | crc << 17) + 0xA282EAD8) % 2**32


def test_event_roundtrip_and_framing_checks(tmp_path):
  times = iter([100.0, 101.5, 102.25])
  with sinks.TensorBoardWriter(str(tmp_path), clock=lambda: next(times)) as tb:
    tb.write({'round': 1, 'train_loss': 0.5, 'aggregator/clip_fraction': 0.25,
              'participation': 3, 'flag': True, 'note': 'text', 'missing': None})
    tb.write({'round': 2, 'train_loss': float('nan'), 'test_accuracy': np.float32(0.75)})
  (path,) = sinks.event_files(str(tmp_path))
  events = sinks.read_events(path)
  assert events[0]['file_version'] == 'brain.Event:2' and events[0]['wall_time'] == 100.0
  assert [e['step'] for e in events[1:]] == [1, 2]
  assert [e['wall_time'] for e in events[1:]] == [101.5, 102.25]
  assert events[1]['scalars'] == {'train_loss': 0.5, 'aggregator/clip_fraction': 0.25,
                                  'participation': 3.0}
  assert math.isnan(events[2]['scalars']['train_loss'])
  assert events[2]['scalars']['test_accuracy'] == 0.75
  # The frame of the first event, by hand: length, its masked CRC, data, its masked CRC.
  blob = open(path, 'rb').read()
  (length,) = struct.unpack('<Q', blob[:8])
  assert struct.unpack('<I', blob[8:12])[0] == sinks.masked_crc32c(blob[:8])
  assert struct.unpack('<I', blob[12 + length:16 + length])[0] == sinks.masked_crc32c(
      blob[12:12 + length])
  # Any flipped byte is caught by a checksum.
  for pos in (3, 10, 20, len(blob) - 2):
    bad = bytearray(blob)
    bad[pos] ^= 0x40
    corrupt = tmp_path / f'corrupt{pos}'
    corrupt.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match='checksum|truncated'):
      sinks.read_events(str(corrupt))


def test_simulator_tensorboard_events_match_metrics(tmp_path):
  data = fs.synthetic(1.0, 1.0, num_clients=6, seed=0)
  model = fs.models.logistic_regression((60,), 10)
  algorithm = fs.build_algorithm('fedavg', model.loss, fs.Hyperparameters(),
                                 num_clients=data.num_clients)
  config = fs.SimulationConfig(num_rounds=4, clients_per_round=2,
                               local_work=fs.LocalWork(batch_size=10, steps=1), eval_every=2,
                               per_client_eval=False)
  simulator = fs.Simulator(algorithm, model, data, config)
  # Zero parameters: no compiled random initializer (the test times one block and the evaluator).
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  state = simulator.init(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  with pytest.raises(ValueError, match='run_dir'):
    simulator.run(state, progress=False, tensorboard=True)
  run_dir = tmp_path / 'run'
  run_dir.mkdir()
  simulator.run(state, run_dir=str(run_dir), progress=False, tensorboard=True)
  rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  (path,) = sinks.event_files(str(run_dir))
  events = [e for e in sinks.read_events(path) if e['scalars']]
  assert [e['step'] for e in events] == [r['round'] for r in rows] == [1, 2, 3, 4]
  for row, event in zip(rows, events):
    expected = {k: v for k, v in row.items() if k != 'round'}
    assert set(event['scalars']) == set(expected)
    np.testing.assert_allclose([event['scalars'][k] for k in expected],
                               np.float32(list(expected.values())), rtol=1e-6)
  assert 'test_accuracy' in events[1]['scalars'] and 'test_accuracy' not in events[0]['scalars']
  assert len(events[0]['scalars']) >= 3   # loss, participation, bytes...


def test_cli_tensorboard_flag_is_not_identity():
  args = build_parser().parse_args(['run', '--tensorboard'])
  assert args.tensorboard is True
  assert 'tensorboard' in cli._NOT_IDENTITY and 'tensorboard' in cli._RESUME_MAY_CHANGE


def test_tensorboard_does_not_apply_to_a_study(capsys):
  code = main(['run', '--config', 'experiments/benchmark.py', '--tensorboard'])
  assert code == 2 and '--tensorboard does not apply to --config' in capsys.readouterr().err


def test_round_rate_excludes_the_compiling_block():
  assert sinks.round_rate(0, 5.0, 10) == (None, None)     # only the first block so far
  assert sinks.round_rate(3, 0.0, 10) == (None, None)
  rate, left = sinks.round_rate(20, 4.0, 30)
  assert rate == 5.0 and left == 6.0
  assert sinks.round_rate(20, 4.0, -3)[1] == 0.0
  assert sinks.format_rate(5.0, 6.0) == '5 rounds/s, 0:06 left'
  assert sinks.format_rate(0.25, 3725.0) == '4 s/round, 1:02:05 left'
  assert 'first (compiling) block' in sinks.format_rate(None, None)


def test_block_clock_starts_after_the_first_block_and_skips_compilation():
  now = iter([10.0, 14.0, 30.0])
  clock = sinks.BlockClock(clock=lambda: next(now))
  assert 'first (compiling) block' in clock.after_block(5, 9.0, 15)   # 10 s: compile + run
  assert clock.after_block(5, 9.0, 10) == '1.25 rounds/s, 0:08 left'  # 5 rounds in 4 s
  # 10 rounds in 20 s of which 10 s compiled a new block length: 1 round/s.
  assert clock.after_block(5, 19.0, 5) == '1 rounds/s, 0:05 left'
  assert clock.timed_rounds == 10


def test_bench_never_prints_a_recorded_fedjax_figure_as_measured():
  from fedjax_sync.cli import _load_study
  bench = _load_study(os.path.join(os.path.dirname(__file__), '..', 'experiments',
                                   'benchmark.py'))
  anchor = bench.ANCHORS['mlp_100']
  text = bench.fedjax_reference('mlp_100')
  assert text.startswith(f'FedJAX {anchor.seconds:g} s/round (recorded {anchor.date}, ')
  assert anchor.machine in text and text.endswith('not measured in this run)')
  assert anchor.date.startswith('2026-11-') and 'CPU' in anchor.machine
  # A figure measured in the run replaces the recorded one.
  assert bench.fedjax_reference('mlp_100', 0.3125) == 'FedJAX 0.3125 s/round (measured in this run)'
  assert bench.recorded_fedjax('mlp_100', measured=True) is None
  assert bench.recorded_fedjax('mlp_100', measured=False) == {
      'seconds': anchor.seconds, 'date': anchor.date, 'machine': anchor.machine,
      'measured_in_this_run': False}
  assert bench.fedjax_reference('logreg_synthetic') == ''


def _fake_run(path, algorithm, seed, lr, accuracies):
  """A run directory as `fedjax-sync run` writes it (config.json, metrics.jsonl), by hand."""
  path.mkdir()
  config = {'command': 'run', 'algorithm': algorithm, 'dataset': 'synthetic',
            'hyperparameters': {'client_learning_rate': lr},
            'simulation': {'num_rounds': len(accuracies) * 2, 'seed': seed, 'eval_every': 2},
            'cli_args': {'seed': seed, 'run_dir': str(path), 'quiet': True}}
  (path / 'config.json').write_text(json.dumps(config))
  rows = []
  for i, acc in enumerate(accuracies):
    rows.append({'round': 2 * i + 1, 'train_loss': 1.0 / (i + 1) + seed})
    rows.append({'round': 2 * i + 2, 'train_loss': 0.5 / (i + 1), 'test_accuracy': acc})
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(path)


def test_plot_groups_seeds_labels_by_algorithm_and_seed(tmp_path, capsys):
  from fedjax_sync import reporting
  accs = {0: [0.2, 0.5, 0.7], 1: [0.3, 0.4, 0.8], 2: [0.1, 0.6, 0.9]}
  seeds = [_fake_run(tmp_path / f'avg{s}', 'fedavg', s, 0.1, a) for s, a in accs.items()]
  other = _fake_run(tmp_path / 'avg_lr', 'fedavg', 0, 0.3, [0.4, 0.4, 0.4])
  prox = _fake_run(tmp_path / 'prox', 'fedprox', 5, 0.1, [0.5, 0.6, 0.7])
  groups, others = reporting.group_runs(seeds + [other, prox])
  assert others == []
  labels = {g.label: g for g in groups}
  assert set(labels) == {'fedavg client_learning_rate=0.1 seeds 0,1,2 (mean ± std)',
                         'fedavg client_learning_rate=0.3 seed 0',
                         'fedprox client_learning_rate=0.1 seed 5'}
  group = labels['fedavg client_learning_rate=0.1 seeds 0,1,2 (mean ± std)']
  x, mean, std = reporting.group_curve([reporting.read_metrics(d) for d in group.run_dirs],
                                       'test_accuracy')
  table = np.array(list(accs.values()))
  np.testing.assert_array_equal(x, [2, 4, 6])
  np.testing.assert_allclose(mean, table.mean(0))
  np.testing.assert_allclose(std, table.std(0))
  out = str(tmp_path / 'overlay.png')
  assert main(['plot', *seeds, other, prox, '--metric', 'test_accuracy', '--metric',
               'train_loss', '--out', out]) == 0
  assert os.path.getsize(out) > 10_000
  capsys.readouterr()
  assert main(['plot', *seeds, '--metric', 'test_acc', '--out', out]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "no metric 'test_acc'" in err
  assert 'available: test_accuracy, train_loss' in err
