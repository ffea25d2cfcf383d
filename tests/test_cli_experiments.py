"""The experiment runner: run --config, plot, list, errors; the heterogeneity study end to end."""

import json
import os
import struct

import pytest

from fedjax_sync import cli, reporting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY = os.path.join(ROOT, 'experiments', 'heterogeneity.py')


def _assert_png(path, min_side=100):
  with open(path, 'rb') as f:
    head = f.read(24)
  assert head[:8] == b'\x89PNG\r\n\x1a\n', path
  assert head[12:16] == b'IHDR'
  width, height = struct.unpack('>II', head[16:24])
  assert width >= min_side and height >= min_side
  assert os.path.getsize(path) > 2000  # a real plot, not an empty canvas


TINY_STUDY = '''
from fedjax_sync import reporting

def run(run_dir, *, quick=False, dataset=None, seeds=None, progress=True):
  reporting.prepare_run_dir(run_dir)
  reporting.write_config(run_dir, dict(quick=quick, dataset=dataset, seeds=seeds,
                                       progress=progress))
  rows = [dict(algorithm='a', alpha=a, seed=s, round=r, test_accuracy=0.1 * r + a,
               test_loss=1.0 / r) for a in (0.1, 2.0) for s in range(2) for r in (1, 2, 3)]
  reporting.append_metrics(run_dir, rows)
  reporting.write_summary(run_dir, 'tiny', ['a'], [[1]])
  return {'ok': True}
'''


def test_run_config_passes_the_study_contract(tmp_path, capsys):
  study = tmp_path / 'tiny.py'
  study.write_text(TINY_STUDY)
  run_dir = str(tmp_path / 'out')
  code = cli.main(['run', '--config', str(study), '--run-dir', run_dir, '--quick',
                   '--dataset', 'digits', '--seeds', '4', '--quiet'])
  assert code == 0
  config = json.load(open(os.path.join(run_dir, 'config.json')))
  assert config == dict(quick=True, dataset='digits', seeds=4, progress=False)
  # plot overlays runs; two run dirs give a line per run and series.
  out = str(tmp_path / 'overlay.png')
  assert cli.main(['plot', run_dir, run_dir, '--out', out]) == 0
  _assert_png(out)
  series = reporting.curves(reporting.read_metrics(run_dir), 'test_accuracy')
  rounds, mean, std = series['a α=0.1']
  assert list(rounds) == [1, 2, 3] and mean[0] == pytest.approx(0.2) and std[0] == 0.0


@pytest.mark.parametrize('argv,needle', [
    (['run', '--config', 'missing.py'], "--config 'missing.py' is not a .py study file; valid:"),
    (['run', '--config', STUDY, '--seeds', '0'], "'0' must be a positive integer"),
    (['run', '--dataset', 'nope'], "unknown dataset 'nope'"),
    (['plot', '/nonexistent/run'], "RUN_DIR '/nonexistent/run' has no metrics.jsonl"),
    (['run', '--dataset', 'mnist', '--data-dir', '/nonexistent/tfds', '--rounds', '1'],
     "dataset 'mnist' (TFDS 'mnist') is not prepared in /nonexistent/tfds"),
])
def test_errors_are_one_line_with_exit_2(argv, needle, capsys):
  try:
    code = cli.main(argv)
  except SystemExit as e:  # argparse errors
    code = e.code
  err = capsys.readouterr().err
  assert code == 2
  assert needle in err
  assert len(err.strip().splitlines()) == 1


def test_list_names_datasets_and_preparation(tmp_path, capsys):
  assert cli.main(['list', '--data-dir', str(tmp_path)]) == 0
  out = capsys.readouterr().out
  for name in ('digits', 'synthetic_pooled', 'npz', 'mnist', 'cifar100', 'fedavg', 'emnist_cnn'):
    assert name in out
  assert f'not prepared; run: tfds build mnist --file_format=array_record --data_dir={tmp_path}' in out


def test_heterogeneity_study_end_to_end(tmp_path):
  from fedjax_sync.cli import _load_study
  study = _load_study(STUDY)
  run_dir = str(tmp_path / 'het')
  headline = study.run(run_dir, quick=True, dataset='digits', seeds=2, alphas=(0.1,),
                       rounds=2, client_lr=(0.001, 0.1))
  assert set(os.listdir(run_dir)) >= {'config.json', 'metrics.jsonl', 'summary.md',
                                      'accuracy.png', 'loss.png', 'client_accuracy_var.png'}
  for png in ('accuracy.png', 'loss.png', 'client_accuracy_var.png'):
    _assert_png(os.path.join(run_dir, png))
  rows = reporting.read_metrics(run_dir)
  # 2 settings (α=0.1, one class) × 2 seeds × 2 learning rates × 2 rounds.
  assert len(rows) == 16
  assert {r['setting'] for r in rows} == {'α=0.1', 'one class'}
  for key in ('test_accuracy', 'client_accuracy_var', 'client_accuracy_worst_decile',
              'client_drift_rms', 'update_norm', 'bytes_up', 'bytes_down'):
    assert all(key in r for r in rows)
  summary = open(os.path.join(run_dir, 'summary.md')).read()
  assert '| fedavg | one class | 0.1 |' in summary and ' ± ' in summary
  assert set(headline['final_test_accuracy']) == {
      'fedavg α=0.1 lr=0.001', 'fedavg α=0.1 lr=0.1', 'fedavg one class lr=0.001',
      'fedavg one class lr=0.1'}
  # lr 0.1 learns; the one-class clients' accuracies disagree more than under α=0.1.
  assert headline['final_test_accuracy']['fedavg α=0.1 lr=0.1'] > 0.2
  one_class = [r for r in rows if r['setting'] == 'one class' and r['round'] == 2]
  assert all(r['bytes_up'] == 2 * rows[0]['bytes_up'] for r in one_class)  # 10 vs 5 clients
  with pytest.raises(ValueError, match="unknown algorithm\\(s\\) \\['nope'\\]; valid:"):
    study.run(str(tmp_path / 'bad'), quick=True, algorithms=('nope',))


def test_personalization_study_end_to_end(tmp_path):
  from fedjax_sync.cli import _load_study
  study = _load_study(os.path.join(ROOT, 'experiments', 'personalization.py'))
  run_dir = str(tmp_path / 'personal')
  headline = study.run(run_dir, quick=True, methods=('fedavg', 'fedavg+ft'), rounds=2,
                       eval_every=2)
  assert set(os.listdir(run_dir)) >= {'config.json', 'metrics.jsonl', 'summary.md',
                                      'personalization.png', 'personalized_accuracy.png'}
  for png in ('personalization.png', 'personalized_accuracy.png'):
    _assert_png(os.path.join(run_dir, png))
  rows = reporting.read_metrics(run_dir)
  assert len(rows) == 2 * 2   # 2 methods × 2 seeds, one evaluation (round 2)
  by = {(r['method'], r['seed']): r for r in rows}
  for seed in (0, 1):
    plain, tuned = by['fedavg', seed], by['fedavg+ft', seed]
    # Two code paths agree: the mean over clients of the global model's held-out
    # accuracy (personalization evaluator) and the run's own test accuracy on the union
    # of the held-out sets (13 or 14 examples per client: nearly equal weights).
    assert plain['personalized_accuracy_mean'] == pytest.approx(plain['test_accuracy'], abs=0.02)
    assert plain['personalized_accuracy_mean'] == plain['client_accuracy_mean']
    assert tuned['test_accuracy'] == plain['test_accuracy']
    # On two-label clients, 10 local steps beat the barely trained global model.
    assert tuned['personalized_accuracy_mean'] > plain['personalized_accuracy_mean'] + 0.2
    assert tuned['personalized_accuracy_worst_decile'] <= tuned['personalized_accuracy_median']
  summary = open(os.path.join(run_dir, 'summary.md')).read()
  assert '| fedavg+ft |' in summary and ' ± ' in summary
  assert set(headline['personalized_accuracy_mean']) == {'fedavg', 'fedavg+ft'}
  with pytest.raises(ValueError, match="unknown method\\(s\\) \\['nope'\\]; valid: fedavg,"):
    study.run(str(tmp_path / 'bad'), quick=True, methods=('nope',))


@pytest.mark.slow
def test_personalization_study_personal_and_clustered_models(tmp_path):
  """The other evaluation paths: Ditto's own models and IFCA's clusters (Per-FedAvg's one
  step is the fine-tuning evaluator with steps=1)."""
  from fedjax_sync.cli import _load_study
  study = _load_study(os.path.join(ROOT, 'experiments', 'personalization.py'))
  run_dir = str(tmp_path / 'personal')
  study.run(run_dir, quick=True, methods=('fedavg', 'ditto', 'ifca'), rounds=2, eval_every=2)
  by = {(r['method'], r['seed']): r for r in reporting.read_metrics(run_dir)}
  assert len(by) == 3 * 2
  for seed in (0, 1):
    # Ditto's global model is FedAvg's (same seed, same keys); its personal models differ.
    assert by['ditto', seed]['test_accuracy'] == pytest.approx(by['fedavg', seed]['test_accuracy'],
                                                               abs=1e-6)
    assert by['ditto', seed]['personalized_accuracy_mean'] != pytest.approx(
        by['ditto', seed]['client_accuracy_mean'], abs=1e-3)
    row = by['ifca', seed]
    assert 0.0 <= row['personalized_accuracy_worst_decile'] <= row['personalized_accuracy_mean'] <= 1.0
