"""docs/your_model.md runs: its Python blocks, in order, exactly as written."""

import pathlib
import re
import runpy

import pytest

DOC = pathlib.Path(__file__).resolve().parent.parent / 'docs' / 'your_model.md'


@pytest.mark.slow  # one Simulator compilation (~13 s of CPU) beside the guide's small checks
def test_the_guide_runs(tmp_path, capsys):
  blocks = re.findall(r'```python\n(.*?)```', DOC.read_text(), flags=re.S)
  assert len(blocks) >= 6
  script = tmp_path / 'your_model.py'
  script.write_text('\n'.join(blocks))
  runpy.run_path(str(script), run_name='your_model_guide')
  printed = capsys.readouterr().out
  assert "['batch_stats', 'params']" in printed
  assert 'fedbn: mean per-client accuracy' in printed
  assert "{'BatchNorm_0': {'mean': (8, 32), 'var': (8, 32)}}" in printed
  assert "(10,) ['batch_stats']" in printed
