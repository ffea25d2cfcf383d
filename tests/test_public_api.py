"""The public API resolves, and every study in experiments/ follows the study contract."""

import importlib
import importlib.util
import inspect
import sys
import pathlib

import pytest

import fedjax_sync

PACKAGES = ['fedjax_sync', 'fedjax_sync.aggregators', 'fedjax_sync.algorithms',
            'fedjax_sync.clients', 'fedjax_sync.data', 'fedjax_sync.models',
            'fedjax_sync.simulate']
EXPERIMENTS = sorted(pathlib.Path(__file__).resolve().parent.parent.glob('experiments/*.py'))


@pytest.mark.parametrize('package', PACKAGES)
def test_every_exported_name_resolves(package):
  module = importlib.import_module(package)
  missing = [name for name in module.__all__ if not hasattr(module, name)]
  assert not missing
  assert len(set(module.__all__)) == len(module.__all__)


def test_registered_algorithms_have_descriptions_with_references():
  descriptions = fedjax_sync.algorithms.algorithm_descriptions()
  assert {'fedavg', 'fedsgd', 'fedprox', 'fedadam', 'scaffold', 'fedgh', 'fedsam',
          'kuramoto_fedavg'} <= set(descriptions)
  for name, text in descriptions.items():
    assert text.strip(), name


@pytest.mark.parametrize('path', [p for p in EXPERIMENTS if 'def run(' in p.read_text()],
                         ids=lambda p: p.name)
def test_studies_follow_the_contract(path, monkeypatch):
  spec = importlib.util.spec_from_file_location(f'study_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  # As `fedjax-sync run --config` loads it: dataclasses and flax modules defined in a
  # study look their module up in sys.modules.
  monkeypatch.setitem(sys.modules, spec.name, module)
  spec.loader.exec_module(module)
  parameters = inspect.signature(module.run).parameters
  assert list(parameters)[0] == 'run_dir'
  assert parameters['quick'].default is False
  assert "__name__ == '__main__'" in path.read_text()
