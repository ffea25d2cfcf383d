"""Run directories: `config.json`, `metrics.jsonl`, `summary.md` and PNG plots.

Every study writes the same files, so `fedjax-sync plot` and a reader find them.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np


def _jsonable(value, nonfinite: list | None = None):
  """`value` as plain JSON types; a NaN or ±Inf becomes None (JSON null), counted in `nonfinite`."""
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v, nonfinite) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v, nonfinite) for v in value]
  if isinstance(value, (np.floating, np.integer, np.bool_)):
    value = value.item()
  elif isinstance(value, np.ndarray) or (hasattr(value, 'tolist') and hasattr(value, 'dtype')):
    return _jsonable(np.asarray(value).tolist(), nonfinite)   # jax and numpy arrays
  if isinstance(value, float) and not math.isfinite(value):
    if nonfinite is not None:
      nonfinite.append(value)
    return None
  return value


METRICS_FILE = 'metrics.jsonl'


def metrics_line(row: Mapping[str, Any]) -> str:
  """One `metrics.jsonl` line: strict JSON, each NaN/Inf written as null and counted.

  A row with non-finite values gets `nonfinite_metrics`, their number, so a reader
  can tell a diverged metric (null) from one that was not computed (absent).
  """
  nonfinite: list = []
  clean = _jsonable(row, nonfinite)
  if nonfinite:
    clean['nonfinite_metrics'] = len(nonfinite)
  return json.dumps(clean, allow_nan=False) + '\n'


def last_metrics_round(run_dir: str) -> int:
  """The largest `round` in `run_dir/metrics.jsonl`; 0 when there is no such row or file."""
  path = os.path.join(run_dir, METRICS_FILE)
  if not os.path.isfile(path):
    return 0
  last = 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue   # a line cut by an interruption
      if isinstance(row, dict) and isinstance(row.get('round'), int):
        last = max(last, row['round'])
  return last


def open_metrics(run_dir: str, start_round: int = 0):
  """Opens `run_dir/metrics.jsonl` to append the rounds after `start_round`.

  Refuses (ValueError) when the file already holds a round after `start_round`:
  appending would write those rounds twice.
  """
  last = last_metrics_round(run_dir)
  if last > start_round:
    path = os.path.join(run_dir, METRICS_FILE)
    raise ValueError(
        f'{path} already holds rounds up to {last}; running from round {start_round} would '
        'write them twice: choose a new run directory, or continue a checkpointed run with '
        'run_with_checkpoints(..., resume=True) (fedjax-sync run --resume)')
  return open(os.path.join(run_dir, METRICS_FILE), 'a')


def write_metrics(run_dir: str, rows: Iterable[Mapping[str, Any]]) -> None:
  """Replaces `metrics.jsonl` with `rows`, atomically (a crash leaves the old file)."""
  path = os.path.join(run_dir, METRICS_FILE)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(metrics_line(row) for row in rows)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


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
  """Appends one JSON object per row to `metrics.jsonl` (non-finite values as null)."""
  with open(os.path.join(run_dir, METRICS_FILE), 'a') as f:
    f.writelines(metrics_line(row) for row in rows)


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


SERIES_KEYS = ('algorithm', 'dataset', 'partition', 'alpha', 'client_learning_rate',
               'server_learning_rate')


def series_key(row: Mapping[str, Any], keys: Sequence[str] = SERIES_KEYS) -> str:
  """A label from the identifying fields of a metrics row (seed excluded), e.g. 'fedavg α=0.1'."""
  short = {'alpha': 'α', 'client_learning_rate': 'lr', 'server_learning_rate': 'server lr'}
  parts = []
  for k in keys:
    if k in row and row[k] is not None:
      v = f'{row[k]:g}' if isinstance(row[k], float) else row[k]
      parts.append(str(v) if k in ('algorithm', 'dataset') else f'{short.get(k, k)}={v}')
  return ' '.join(parts) or 'run'


def curves(rows: Iterable[Mapping[str, Any]], metric: str,
           keys: Sequence[str] = SERIES_KEYS) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Per series: `(rounds, mean over seeds, std over seeds)` of `metric` at the rounds it exists.

  Rows are grouped by `series_key`; rows of different seeds at the same round are
  averaged (population std). Rows without `metric` (e.g. between evaluations) are skipped.
  """
  grouped: dict[str, dict[int, list[float]]] = {}
  for row in rows:
    if metric not in row or 'round' not in row:
      continue
    value = row[metric]
    if not isinstance(value, (int, float)):
      continue
    grouped.setdefault(series_key(row, keys), {}).setdefault(int(row['round']), []).append(
        float(value))
  out = {}
  for label, by_round in grouped.items():
    rounds = np.array(sorted(by_round))
    values = [np.asarray(by_round[r]) for r in rounds]
    out[label] = (rounds, np.array([v.mean() for v in values]), np.array([v.std() for v in values]))
  return out


def plot_runs(path: str, run_dirs: Sequence[str],
              metrics: Sequence[str] = ('test_accuracy', 'test_loss')) -> str:
  """Overlays runs: one panel per metric against rounds, one line per run and series.

  Each run directory's `metrics.jsonl` is grouped into series (`series_key`) and
  averaged over seeds, with a ± std band. Lines are labelled `<run dir>: <series>`
  when several run directories are given.
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  loaded = [(os.path.basename(os.path.normpath(d)) or d, read_metrics(d)) for d in run_dirs]
  fig, axes = plt.subplots(1, len(metrics), figsize=(6.0 * len(metrics), 4.2), dpi=110,
                           squeeze=False)
  found = False
  for ax, metric in zip(axes[0], metrics):
    for name, rows in loaded:
      for label, (x, mean, std) in curves(rows, metric).items():
        found = True
        full = f'{name}: {label}' if len(loaded) > 1 else label
        ax.plot(x, mean, label=full, marker='o' if len(x) <= 12 else None, markersize=3)
        if np.any(std > 0):
          ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel('round')
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  if not found:
    plt.close(fig)
    raise ValueError(f'no {" or ".join(metrics)} rows in {", ".join(run_dirs)}; '
                     'nothing to plot')
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
