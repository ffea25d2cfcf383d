"""Run directories: `config.json`, `metrics.jsonl`, `summary.md` and PNG plots.

Every study writes the same files, so `fedjax-sync plot` and a reader find them.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


def _jsonable(value):
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.floating, np.integer, np.bool_)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if hasattr(value, 'tolist') and hasattr(value, 'dtype'):  # jax arrays
    return np.asarray(value).tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


def prepare_run_dir(path: str, *, allow_existing: bool = False) -> str:
  """Creates `path`; refuses a non-empty directory unless `allow_existing`."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'run directory {path!r} exists and is not a directory')
  if os.path.isdir(path) and os.listdir(path) and not allow_existing:
    raise ValueError(f'run directory {path!r} is not empty; choose a new one')
  os.makedirs(path, exist_ok=True)
  return path


def write_config(run_dir: str, config: Mapping[str, Any]) -> None:
  with open(os.path.join(run_dir, 'config.json'), 'w') as f:
    json.dump(_jsonable(config), f, indent=2, sort_keys=True)


def append_metrics(run_dir: str, rows: Iterable[Mapping[str, Any]]) -> None:
  """Appends one JSON object per row to `metrics.jsonl`."""
  with open(os.path.join(run_dir, 'metrics.jsonl'), 'a') as f:
    for row in rows:
      f.write(json.dumps(_jsonable(row)) + '\n')


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: is {run_dir!r} a fedjax-sync run directory?')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  def fmt(x):
    if isinstance(x, float):
      return f'{x:.4g}'
    return str(x)
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(fmt(x) for x in row) + ' |' for row in rows]
  return '\n'.join(lines)


def mean_std(values: Sequence[float]) -> str:
  """'mean ± std' (population std over seeds) as a string."""
  a = np.asarray(values, np.float64)
  return f'{a.mean():.4f} ± {a.std():.4f}'


def write_summary(run_dir: str, title: str, header: Sequence[str], rows: Sequence[Sequence[Any]],
                  notes: str = '') -> str:
  """Writes `summary.md` (a title, a table, optional notes) and returns its text."""
  text = f'# {title}\n\n{markdown_table(header, rows)}\n'
  if notes:
    text += f'\n{notes}\n'
  with open(os.path.join(run_dir, 'summary.md'), 'w') as f:
    f.write(text)
  return text


def plot_lines(path: str, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
               xlabel: str, ylabel: str, title: str = '', bands: Mapping[str, Sequence[float]] | None = None,
               logx: bool = False) -> str:
  """Saves a PNG with one line per series label; `bands[label]` is an optional ± std."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
  for label, (x, y) in series.items():
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ax.plot(x, y, label=label, marker='o' if len(x) <= 12 else None, markersize=3)
    if bands and label in bands:
      s = np.asarray(bands[label], np.float64)
      ax.fill_between(x, y - s, y + s, alpha=0.2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if logx:
    ax.set_xscale('log')
  if title:
    ax.set_title(title)
  ax.grid(alpha=0.3)
  if series:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
