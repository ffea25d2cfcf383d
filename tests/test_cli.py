"""The command line: errors name the bad value, exit 2, one line; a small run writes its files."""

import json
import os
import subprocess
import sys

import pytest

from fedjax_sync.cli import main


@pytest.mark.parametrize('argv,needle', [
    (['run', '--algorithm', 'fedbogus'], "invalid choice: 'fedbogus'"),
    (['run', '--rounds', '0'], "'0' must be a positive integer"),
    (['run', '--client-lr', 'fast'], "'fast' is not a number"),
    (['run', '--dataset', 'nope'], "unknown dataset 'nope'"),
    (['run', '--execution', 'threads'], "invalid choice: 'threads'"),
    (['frobnicate'], "invalid choice: 'frobnicate'"),
])
def test_bad_options_exit_2_with_one_line_naming_value(argv, needle, capsys):
  with pytest.raises(SystemExit) as exit_info:
    main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err.strip()
  assert needle in err
  assert len(err.splitlines()) == 1


def test_bad_values_found_later_also_exit_2_without_traceback(tmp_path, capsys):
  code = main(['run', '--clients-per-round', '31', '--rounds', '1', '--quiet',
               '--run-dir', str(tmp_path / 'r')])
  assert code == 2
  err = capsys.readouterr().err.strip()
  assert 'clients_per_round=31' in err and '30 clients' in err
  assert len(err.splitlines()) == 1


def test_run_writes_config_and_metrics(tmp_path, capsys):
  run_dir = tmp_path / 'run'
  code = main(['run', '--algorithm', 'fedprox', '--rounds', '4', '--eval-every', '2',
               '--local-steps', '2', '--quiet', '--run-dir', str(run_dir)])
  assert code == 0
  config = json.loads((run_dir / 'config.json').read_text())
  assert config['algorithm'] == 'fedprox' and config['simulation']['num_rounds'] == 4
  rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in rows] == [1, 2, 3, 4]
  assert 'test_accuracy' in rows[1] and 'test_accuracy' not in rows[0]
  assert 'test accuracy' in capsys.readouterr().out


def test_non_empty_run_dir_is_refused(tmp_path, capsys):
  (tmp_path / 'x').write_text('keep me')
  assert main(['run', '--rounds', '1', '--quiet', '--run-dir', str(tmp_path)]) == 2
  assert 'not empty' in capsys.readouterr().err
  assert (tmp_path / 'x').read_text() == 'keep me'


def test_module_entry_point_prints_no_traceback():
  proc = subprocess.run([sys.executable, '-m', 'fedjax_sync', 'run', '--batch-size', '-3'],
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr and "'-3' must be a positive integer" in proc.stderr
