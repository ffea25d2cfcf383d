"""`--personalize-steps K` on every timeline, and its one-line errors."""

import pytest

from fedjax_sync import cli
from tests.helpers import cli_error, run_rows


def test_personalization_is_reported_at_every_evaluation_of_a_synchronous_run(tmp_path):
  run_dir = str(tmp_path / 'ditto')
  assert cli.main(['run', '--algorithm', 'ditto', '--rounds', '2', '--eval-every', '1',
                   '--num-clients', '6', '--clients-per-round', '3', '--local-steps', '2',
                   '--personalize-steps', '3', '--run-dir', run_dir, '--quiet']) == 0
  rows = run_rows(run_dir)
  for row in rows:
    assert 0.0 <= row['personalized_accuracy_worst_decile'] <= row[
        'personalized_accuracy_median'] <= 1.0
    assert 0.0 <= row['personalized_accuracy_mean'] <= 1.0
    # Issue 16's naming: client_* is Ditto's global model, personalized_* its personal
    # models fine-tuned for K steps, each with every statistic.
    for prefix in ('client_accuracy', 'personalized_accuracy'):
      assert {f'{prefix}_{s}' for s in ('mean', 'var', 'median', 'worst_decile')} <= set(row)


def test_zero_steps_on_an_async_run_evaluate_the_global_model_per_client(tmp_path):
  # K = 0 and no personal models: the "personalized" model is the global one.
  run_dir = str(tmp_path / 'fedbuff')
  assert cli.main(['run', '--algorithm', 'fedbuff', '--rounds', '2', '--eval-every', '2',
                   '--num-clients', '6', '--hparam', 'buffer_size=3', '--local-steps', '2',
                   '--personalize-steps', '0', '--run-dir', run_dir, '--quiet']) == 0
  (row,) = [r for r in run_rows(run_dir) if 'personalized_accuracy_mean' in r]
  assert row['personalized_accuracy_mean'] == pytest.approx(row['client_accuracy_mean'])


@pytest.mark.parametrize('argv,expected', [
    (['--personalize-learning-rate', '0.1'],
     '--personalize-learning-rate applies to --personalize-steps K, which was not given'),
    (['--personalize-holdout', '0.2'],
     '--personalize-holdout applies to --personalize-steps K'),
    (['--personalize-steps', '2', '--seeds', '2'],
     '--personalize-steps does not apply to --seeds/--sweep'),
    (['--personalize-steps', '2', '--personalize-holdout', '0.2'],
     "--personalize-holdout 0.2: --dataset 'synthetic' already has per-client held-out"),
    (['--personalize-steps', '-1'], "'-1' is out of range; valid: 0, 1, 2, ..."),
    (['--personalize-holdout', '1.5', '--personalize-steps', '1'],
     "'1.5' is out of range; valid: a number F with 0 < F < 1"),
])
def test_personalization_flags_that_cannot_apply_are_one_line_errors(argv, expected, capsys,
                                                                      tmp_path):
  err = cli_error(['run', '--num-clients', '4', '--run-dir', str(tmp_path / 'x'), *argv], capsys)
  assert expected in err, err
  assert not (tmp_path / 'x').exists()
