"""Every bad `fedjax-sync` invocation is one line naming the option, exit 2, no traceback.

Run in-process through `fedjax_sync.cli.main`; only the broken pipe needs a real
process. A failed run leaves no directory behind, so the same command can be rerun.
"""

import os
import subprocess
import sys

import pytest

from fedjax_sync import cli

SMALL = ['--rounds', '1', '--num-clients', '4', '--clients-per-round', '2', '--quiet']


def _study(tmp_path, text):
  path = tmp_path / 'study.py'
  path.write_text(text)
  return str(path)


# (argv built from tmp_path, text every error line must contain)
BAD = {
    'seed too large': (lambda t: ['run', '--seed', '99999999999999999999999'], '--seed'),
    'seed negative': (lambda t: ['run', '--seed', '-3'], '--seed'),
    'batch 1e9 notation': (lambda t: ['run', '--batch-size', '1e9'], '--batch-size'),
    'batch 10^9': (lambda t: ['run', '--batch-size', '1000000000', *SMALL], '--batch-size'),
    'local steps 10^9': (lambda t: ['run', '--local-steps', '1000000000', *SMALL],
                         '--local-steps'),
    'batch above int32': (lambda t: ['run', '--batch-size', str(2**31)], '--batch-size'),
    'clients 10^8': (lambda t: ['run', '--num-clients', '100000000', '--rounds', '1'],
                     '--num-clients'),
    'vmap batch 10^8': (lambda t: ['run', '--execution', 'vmap', '--batch-size', '100000000',
                                   *SMALL], '--batch-size'),
    'run dir under a file': (lambda t: ['run', '--run-dir', str(t / 'afile' / 'sub'), *SMALL],
                             '--run-dir'),
    'config raises': (lambda t: ['run', '--config', _study(t, 'x = 1\n1 / 0\n')],
                      "--config"),
    'config syntax error': (lambda t: ['run', '--config', _study(t, 'def run(:\n')],
                            '--config'),
    'config run raises': (lambda t: ['run', '--config', _study(
        t, 'def run(run_dir, **kw):\n  raise RuntimeError("boom")\n')], '--config'),
    'conv model on vectors': (lambda t: ['run', '--model', 'emnist_cnn', *SMALL], '--model'),
    # Builds and initializes, fails only in its loss: caught by tracing the loss too.
    'sequence model on vectors': (lambda t: ['run', '--model', 'char_lstm', *SMALL],
                                  "--model 'char_lstm' does not fit"),
    'digits without scikit-learn': (lambda t: ['run', '--dataset', 'digits', *SMALL],
                                    '--dataset'),
    'resume missing': (lambda t: ['run', '--resume', str(t / 'nothing')], '--resume'),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_bad_invocation_is_one_line_exit_2_and_leaves_nothing(case, tmp_path, capsys,
                                                               monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'afile').write_text('not a directory')
  if case == 'digits without scikit-learn':
    monkeypatch.setitem(sys.modules, 'sklearn', None)   # `import sklearn` raises ImportError
    monkeypatch.setitem(sys.modules, 'sklearn.datasets', None)
  build, needle = BAD[case]
  argv = build(tmp_path)
  if argv[1] != '--config' and '--run-dir' not in argv and '--resume' not in argv:
    argv += ['--run-dir', 'out']
  before = sorted(os.listdir(tmp_path))
  try:
    code = cli.main(argv)
  except SystemExit as e:   # argparse errors
    code = e.code
  err = capsys.readouterr().err.strip()
  assert code == 2, err
  assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
  assert needle in err, err
  assert 'valid' in err or case.startswith('config'), err
  # Nothing left behind: the same command (fixed) can run in the same place.
  assert sorted(os.listdir(tmp_path)) == before


def test_study_errors_name_the_line(tmp_path, capsys):
  study = _study(tmp_path, 'x = 1\n\n1 / 0\n')
  assert cli.main(['run', '--config', study, '--run-dir', str(tmp_path / 'r')]) == 2
  assert 'ZeroDivisionError at line 3' in capsys.readouterr().err


def test_a_failed_run_does_not_block_the_same_directory(tmp_path, capsys, monkeypatch):
  import fedjax_sync as fs

  def fail(*args, **kwargs):
    raise ValueError('the first block failed')

  monkeypatch.setattr(fs.Simulator, 'run', fail)   # fails after the directory was made
  nested = tmp_path / 'a' / 'b'
  assert cli.main(['run', *SMALL, '--run-dir', str(nested)]) == 2
  assert 'the first block failed' in capsys.readouterr().err
  assert not (tmp_path / 'a').exists()   # every directory this command made is gone
  empty = tmp_path / 'empty'
  empty.mkdir()   # a directory that existed (empty) is emptied again, not removed
  assert cli.main(['run', *SMALL, '--run-dir', str(empty)]) == 2
  assert empty.is_dir() and os.listdir(empty) == []
  monkeypatch.undo()
  assert cli.main(['run', *SMALL, '--run-dir', str(empty)]) == 0
  assert (empty / 'metrics.jsonl').read_text().count('\n') == 1


def test_closed_pipe_is_quiet():
  # `fedjax-sync list | head -1`: the reader is gone before the listing is written.
  proc = subprocess.Popen([sys.executable, '-m', 'fedjax_sync', 'list'], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  proc.stdout.close()
  err = proc.stderr.read().decode()
  proc.wait(timeout=120)
  assert 'Traceback' not in err and 'BrokenPipeError' not in err, err
  assert proc.returncode == 0


@pytest.mark.parametrize('argv,expected,not_expected', [
    (['--algorithm', 'fedbuff', '--num-clients', '8', '--sweep', 'nokey=1,2'],
     "'nokey' is not a hyperparameter of fedbuff", 'buffer_size'),
    (['--algorithm', 'fedper', '--num-clients', '8', '--clients-per-round', '4',
      '--hparam', 'head_pattern=('], "head='(' is not a valid regular expression", '--model'),
    (['--num-clients', '8'], 'valid: --clients-per-round ≤ 8 (or raise --num-clients)', None),
])
def test_errors_name_the_option_at_fault(argv, expected, not_expected, tmp_path, capsys):
  from tests.helpers import cli_error
  err = cli_error(['run', '--rounds', '1', '--run-dir', str(tmp_path / 'x'), *argv], capsys)
  assert expected in err, err
  assert not_expected is None or not_expected not in err, err
  assert not (tmp_path / 'x').exists()
