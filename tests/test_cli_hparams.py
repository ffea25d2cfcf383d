"""Per-algorithm hyperparameters: the registry's lists, `--hparam KEY=VALUE`, `--aggregator`
and `list`.

One tiny run (4 clients, 2 rounds of 2 local steps on Synthetic) and its resume carry
the CLI checks: the settings are checked in config.json, in what reaches
`build_algorithm`, and in the round metrics (the clipped fraction, the update norms).
"""

import dataclasses

import pytest

import fedjax_sync as fs
from fedjax_sync import cli
from fedjax_sync.algorithms import registry
from fedjax_sync.algorithms.registry import build_algorithm
from tests.helpers import cli_error as _error, run_config as _config, run_rows as _rows

TINY = ['--rounds', '2', '--num-clients', '4', '--clients-per-round', '2', '--local-steps', '2',
        '--batch-size', '5', '--eval-every', '2', '--quiet']


# --- The registry's lists ---------------------------------------------------------------------


def test_every_algorithm_lists_fields_of_the_shared_dataclass_with_valid_defaults():
  fields = {f.name for f in dataclasses.fields(fs.Hyperparameters)}
  for name in registry.algorithm_names():
    listed = registry.algorithm_hyperparameters(name)
    assert listed, name
    for h in listed:
      assert h.name in fields and h.help and h.check(h.default) == h.default, (name, h)
    assert 'arXiv' in registry.algorithm_descriptions()[name], name
  # FedSGD trains no client optimizer, Adagrad has no β2, FedProx has μ.
  assert [h.name for h in registry.algorithm_hyperparameters('fedsgd')] == [
      'server_learning_rate']
  assert 'b2' not in {h.name for h in registry.algorithm_hyperparameters('fedadagrad')}
  assert 'mu' in {h.name for h in registry.algorithm_hyperparameters('fedprox')}


@pytest.mark.parametrize('name,server_lr', [('fedavg', 1.0), ('fedsgd', 0.1), ('fedadam', 0.01),
                                            ('scaffold', 1.0)])
def test_resolution_fills_the_algorithm_default_and_types_the_overrides(name, server_lr):
  h = registry.resolve_hyperparameters(name)
  assert h.server_learning_rate == server_lr
  values = registry.hyperparameter_values(name, fs.Hyperparameters())
  assert values['server_learning_rate'] == server_lr
  h = registry.resolve_hyperparameters(name, overrides={'server_learning_rate': '0.25'})
  assert h.server_learning_rate == 0.25 and isinstance(h.server_learning_rate, float)


@pytest.mark.parametrize('name,overrides,needle', [
    ('fedavg', {'mu': '0.1'}, "unknown hyperparameter 'mu' for algorithm 'fedavg'; valid: "
                              'client_learning_rate, client_momentum, server_learning_rate'),
    ('fedsgd', {'client_learning_rate': '0.1'}, 'valid: server_learning_rate'),
    ('fedprox', {'mu': 'abc'}, "mu = 'abc' is not valid; expected float ≥ 0"),
    ('fedprox', {'mu': '-1'}, 'mu = -1.0 is not valid; expected float ≥ 0'),
    ('fedavg', {'client_learning_rate': '0'}, 'expected float > 0'),
    ('fedavg', {'client_learning_rate': 'nan'}, 'expected float > 0'),
    ('fedadam', {'b1': '1.5'}, 'b1 = 1.5 is not valid; expected float in [0, 1]'),
    ('scaffold', {'scaffold_option': 'III'}, 'expected one of I, II'),
    ('fedprox', {'mu': True}, 'expected float'),
])
def test_bad_overrides_name_the_key_and_the_expected_type(name, overrides, needle):
  with pytest.raises(ValueError) as error:
    registry.resolve_hyperparameters(name, overrides=overrides)
  assert needle in str(error.value)


def test_bool_and_int_hyperparameters_parse_strictly():
  flag = registry.Hyperparameter('client_momentum', bool, False, 'a switch')
  assert flag.parse('true') is True and flag.parse('False') is False and flag.parse('1') is True
  with pytest.raises(ValueError, match='expected bool'):
    flag.parse('maybe')
  count = registry.Hyperparameter('client_momentum', int, 1, 'a count', minimum=1)
  assert count.parse('3') == 3 and count.expected() == 'int ≥ 1'
  for text in ('1.5', '0', 'x'):
    with pytest.raises(ValueError, match='expected int ≥ 1'):
      count.parse(text)


def test_registration_refuses_a_key_outside_the_shared_dataclass():
  with pytest.raises(ValueError, match="'num_leaders' is not a field of Hyperparameters"):
    registry.register_algorithm(
        'x_test_algorithm', lambda loss, h, **kw: None, 'test (arXiv 0000.00000)',
        (registry.Hyperparameter('num_leaders', int, 10, 'K'),))
  assert 'x_test_algorithm' not in registry.algorithm_names()


# --- --hparam and the dedicated flags ---------------------------------------------------------


def _cli_hyperparameters(argv):
  args = cli.build_parser().parse_args(['run', *argv])
  return cli._hyperparameters(args, cli._given_options(['run', *argv]))


def test_hparam_and_dedicated_flags_combine_and_agreeing_values_are_accepted():
  h = _cli_hyperparameters(['--algorithm', 'fedprox', '--hparam', 'mu=0.5', '--client-lr', '0.2'])
  assert (h.mu, h.client_learning_rate, h.server_learning_rate) == (0.5, 0.2, 1.0)
  h = _cli_hyperparameters(['--client-lr', '0.2', '--hparam', 'client_learning_rate=0.20'])
  assert h.client_learning_rate == 0.2
  # A dedicated flag left at its default does not contradict --hparam.
  assert _cli_hyperparameters(['--hparam', 'client_learning_rate=0.3']).client_learning_rate == 0.3


@pytest.mark.parametrize('argv,needle', [
    (['--hparam', 'foo=1'], "--hparam foo=1: unknown hyperparameter 'foo' for algorithm "
                            "'fedavg'; valid: client_learning_rate, client_momentum, "
                            'server_learning_rate'),
    (['--algorithm', 'fedprox', '--hparam', 'mu=lots'], "--hparam mu=lots: hyperparameter mu = "
                                                        "'lots' is not valid; expected float"),
    (['--client-lr', '0.1', '--hparam', 'client_learning_rate=0.2'],
     '--hparam client_learning_rate=0.2 contradicts --client-lr 0.1'),
    (['--hparam', 'client_learning_rate=0.1', '--hparam', 'client_learning_rate=0.2'],
     'given twice'),
    (['--hparam', 'client_learning_rate'], 'is not KEY=VALUE'),
    (['--aggregator', 'chain(clip_by_norm(1.0), trimed_mean(0.1))'],
     "unknown aggregator 'trimed_mean'; valid: adaptive_clip"),
    (['--aggregator', "__import__('os').system('true')"], 'attribute access'),
    (['--algorithm', 'fedgh', '--aggregator', 'mean()', '--rounds', '1', '--num-clients', '4',
      '--clients-per-round', '2'], "--aggregator 'mean()' with --algorithm fedgh: fed_gh fixes"),
    (['--config', 'experiments/benchmark.py', '--hparam', 'mu=1'],
     '--hparam does not apply to --config'),
])
def test_bad_hparam_or_aggregator_is_one_line_exit_2(argv, needle, capsys, tmp_path):
  err = _error(['run', *argv, '--quiet', '--run-dir', str(tmp_path / 'r')], capsys)
  assert needle in err
  assert not (tmp_path / 'r').exists()


# --- Runs -----------------------------------------------------------------------------------
# One tiny run with both options (and its resume): CLI runs cost a compilation each.

AGGREGATOR = 'chain(clip_by_norm(0.05), trimmed_mean(0.1))'


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """`run --hparam client_learning_rate=0.5 --aggregator ...`; what reached build_algorithm."""
  run_dir = str(tmp_path_factory.mktemp('hparam_runs') / 'run')
  built = []

  def recording_build(name, loss, hparams, **engine):
    built.append((name, hparams, engine))
    return build_algorithm(name, loss, hparams, **engine)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(fs, 'build_algorithm', recording_build)
    assert cli.main(['run', *TINY, '--hparam', 'client_learning_rate=0.5', '--aggregator',
                     'chain( clip_by_norm(0.05), trimmed_mean(.1) )', '--checkpoint-every', '2',
                     '--run-dir', run_dir]) == 0
  return run_dir, built


def test_hparam_is_recorded_and_reaches_the_algorithm(run):
  run_dir, built = run
  config = _config(run_dir)
  assert config['hyperparameters'] == {'client_learning_rate': 0.5, 'client_momentum': 0.0,
                                       'server_learning_rate': 1.0}
  assert config['cli_args']['hparam'] == ['client_learning_rate=0.5']
  [(name, hparams, engine)] = built
  assert name == 'fedavg' and hparams.client_learning_rate == 0.5
  assert hparams.server_learning_rate == 1.0   # the algorithm's default, filled in
  # Trained with it: client updates of lr 0.5 are far above the 0.05 clip (see below).
  assert min(row['aggregator/0/mean_norm'] for row in _rows(run_dir)) > 0.5


def test_aggregator_is_recorded_canonically_and_used(run):
  run_dir, built = run
  config = _config(run_dir)
  assert config['aggregator'] == AGGREGATOR == config['cli_args']['aggregator']
  assert built[0][2]['aggregator'].name == 'chain(clip_by_norm(0.05), trimmed_mean(0.1))'
  for row in _rows(run_dir):
    # The clip acted on every update and bounds the server step (trimmed mean of ≤ 0.05).
    assert row['aggregator/0/clipped_fraction'] == 1.0
    assert row['update_norm'] <= 0.05 + 1e-6


def test_resume_rebuilds_the_aggregator_and_refuses_another(run, capsys):
  run_dir, _ = run
  err = _error(['run', '--resume', run_dir, '--aggregator', 'mean()'], capsys)
  assert "--aggregator 'mean()' contradicts the run being resumed" in err
  err = _error(['run', '--resume', run_dir, '--hparam', 'client_learning_rate=0.3'], capsys)
  assert '--hparam' in err and 'contradicts' in err
  # The options of the resumed run rebuild the same aggregator and hyperparameters.
  argv = ['run', '--resume', run_dir, '--aggregator', 'chain(clip_by_norm(0.05),trimmed_mean(.1))']
  resumed = cli._resumed_args(cli.build_parser().parse_args(argv), cli._given_options(argv))
  assert cli._aggregator(resumed).name == 'chain(clip_by_norm(0.05), trimmed_mean(0.1))'
  assert cli._hyperparameters(resumed, set()).client_learning_rate == 0.5


@pytest.mark.slow
def test_resume_extends_the_run_with_its_aggregator(run):
  run_dir, _ = run
  # Another spelling of the same expression is the same aggregator: the run extends.
  assert cli.main(['run', '--resume', run_dir, '--rounds', '3',
                   '--aggregator', 'chain(clip_by_norm(0.05),trimmed_mean(0.10))']) == 0
  rows = _rows(run_dir)
  assert [r['round'] for r in rows] == [1, 2, 3]
  assert rows[-1]['aggregator/0/clipped_fraction'] == 1.0
  assert _config(run_dir)['hyperparameters']['client_learning_rate'] == 0.5


def test_saved_hparam_list_is_checked_on_resume(run):
  record = _config(run[0])
  action = cli._run_options(cli.build_parser())['hparam']
  cli._check_saved_option(action, record['cli_args']['hparam'], 'config.json')
  for bad in ('client_learning_rate=0.5', ['no_equals_sign'], [1]):
    with pytest.raises(ValueError, match="cli_args 'hparam'"):
      cli._check_saved_option(action, bad, 'config.json')


# --- list -----------------------------------------------------------------------------------


def test_list_names_every_algorithm_dataset_model_partition_and_aggregator(capsys):
  from fedjax_sync.data.registry import dataset_names
  from fedjax_sync.models import MODELS

  capsys.readouterr()
  assert cli.main(['list']) == 0
  out = capsys.readouterr().out
  names = {line.split()[0].split('(')[0] for line in out.splitlines() if line.startswith('  ')}
  expected = (set(registry.algorithm_names()) | set(dataset_names()) | set(MODELS)
              | {'iid', 'dirichlet', 'shards'} | set(fs.aggregators.aggregator_names()))
  assert expected <= names, expected - names
  assert '  trimmed_mean(beta)' in out.splitlines()


def test_list_algorithm_prints_its_hyperparameters_defaults_and_paper(capsys):
  capsys.readouterr()
  assert cli.main(['list', '--algorithm', 'fedprox']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith('fedprox: FedProx, Li et al. 2020 (arXiv 1812.06127)')
  by_key = {line.split()[0]: line for line in lines[2:]}
  assert list(by_key) == ['client_learning_rate', 'client_momentum', 'server_learning_rate', 'mu']
  assert 'float ≥ 0' in by_key['mu'] and 'default 0.01' in by_key['mu'] and '--mu' in by_key['mu']
  assert 'default 1.0' in by_key['server_learning_rate']
  err = _error(['list', '--algorithm', 'fedbogus'], capsys)
  assert "invalid choice: 'fedbogus'" in err and 'fedavg' in err


def test_runs_without_hparam_or_aggregator_keep_their_checkpoint_identity():
  # Checkpoints written before --hparam and --aggregator existed still resume.
  options = cli._identity_options(cli.build_parser().parse_args(['run', '--client-lr', '0.3']))
  assert 'hparam' not in options and 'aggregator' not in options and options['client_lr'] == 0.3
  options = cli._identity_options(cli.build_parser().parse_args(
      ['run', '--hparam', 'client_momentum=0.5', '--aggregator', 'mean( )']))
  assert options['hparam'] == ['client_momentum=0.5'] and options['aggregator'] == 'mean()'
