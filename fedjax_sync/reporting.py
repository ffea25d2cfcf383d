"""Run directories: `config.json`, `metrics.jsonl`, `summary.md` and PNG plots.

Every study writes the same files, so `fedjax-sync plot` and a reader find them.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

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


def read_config(run_dir: str) -> dict[str, Any] | None:
  """`run_dir/config.json` as a dict; None when it is missing or not a JSON object."""
  path = os.path.join(run_dir, 'config.json')
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None
  return config if isinstance(config, dict) else None


def _without_seed(value):
  """`value` with every key named 'seed' removed, at any depth."""
  if isinstance(value, Mapping):
    return {k: _without_seed(v) for k, v in value.items() if k != 'seed'}
  if isinstance(value, list):
    return [_without_seed(v) for v in value]
  return value


def run_seed(config: Mapping[str, Any]) -> Any:
  """The seed of a `fedjax-sync run` directory's config (model init and client sampling)."""
  simulation = config.get('simulation')
  if isinstance(simulation, Mapping) and 'seed' in simulation:
    return simulation['seed']
  cli_args = config.get('cli_args')
  return cli_args.get('seed') if isinstance(cli_args, Mapping) else config.get('seed')


def configuration(config: Mapping[str, Any]) -> dict[str, Any]:
  """What a run computes, less its seed: runs with equal configurations are seeds of one.

  `cli_args` is left out (it repeats the recorded fields, plus the run directory,
  --quiet and other options that change no result), and so is every 'seed' key.
  """
  return _without_seed({k: v for k, v in config.items() if k != 'cli_args'})


def _flatten(value, prefix: str = '') -> dict[str, Any]:
  if isinstance(value, Mapping):
    out = {}
    for k, v in value.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: json.dumps(value, sort_keys=True) if isinstance(value, list) else value}


def _is_single_run(config: Mapping[str, Any] | None) -> bool:
  return bool(config) and isinstance(config.get('algorithm'), str) and 'simulation' in config


class RunGroup(NamedTuple):
  """Run directories that are seeds of one configuration, and their legend label."""
  label: str
  run_dirs: tuple[str, ...]
  seeds: tuple[Any, ...]


def group_runs(run_dirs: Sequence[str]) -> tuple[list[RunGroup], list[str]]:
  """`(groups of seeds of one configuration, directories without a run config.json)`.

  Directories written by `fedjax-sync run` are grouped when their `config.json`
  differ only in seed. A group is labelled by its algorithm, the recorded fields
  in which the groups differ (e.g. `client_learning_rate=0.1`), and its seed(s).
  Other directories (studies, whose rows name their own series) come back apart.
  """
  keyed: dict[str, list[tuple[str, dict]]] = {}
  others = []
  for d in run_dirs:
    config = read_config(d)
    if not _is_single_run(config):
      others.append(d)
      continue
    key = json.dumps(configuration(config), sort_keys=True, default=str)
    keyed.setdefault(key, []).append((d, config))
  flat = {key: _flatten(json.loads(key)) for key in keyed}
  varying = sorted({name for a in flat.values() for b in flat.values()
                    for name in set(a) | set(b) if a.get(name) != b.get(name)})
  groups = []
  for key, members in keyed.items():
    config = members[0][1]
    seeds = tuple(run_seed(c) for _, c in members)
    parts = [config['algorithm']]
    for name in varying:
      if name == 'algorithm' or name not in flat[key]:
        continue
      value = flat[key][name]
      if 'data_fingerprint' in name:
        continue   # implied by the data fields
      value = f'{value:g}' if isinstance(value, float) else value
      parts.append(f'{name.rsplit(".", 1)[-1]}={value}')
    if len(members) == 1:
      parts.append(f'seed {seeds[0]}')
    else:
      parts.append(f'seeds {",".join(str(x) for x in seeds)} (mean ± std)')
    groups.append(RunGroup(' '.join(str(p) for p in parts), tuple(d for d, _ in members), seeds))
  return groups, others


def group_curve(runs_rows: Sequence[Sequence[Mapping[str, Any]]],
                metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`(rounds, mean, std)` of `metric` over runs (population std), at the rounds all runs have."""
  per_run = []
  for rows in runs_rows:
    values = {}
    for row in rows:
      value = row.get(metric)
      if 'round' in row and isinstance(value, (int, float)) and not isinstance(value, bool):
        values[int(row['round'])] = float(value)
    per_run.append(values)
  rounds = sorted(set.intersection(*(set(v) for v in per_run))) if per_run else []
  table = np.array([[v[r] for r in rounds] for v in per_run], np.float64).reshape(
      len(per_run), len(rounds))
  return np.array(rounds), table.mean(0), table.std(0)


def available_metrics(rows: Iterable[Mapping[str, Any]]) -> set[str]:
  """The numeric fields of metrics rows (besides 'round')."""
  return {k for row in rows for k, v in row.items()
          if k != 'round' and isinstance(v, (int, float)) and not isinstance(v, bool)}


def plot_runs(path: str, run_dirs: Sequence[str],
              metrics: Sequence[str] | None = None) -> str:
  """Overlays runs: one panel per metric against rounds.

  Run directories written by `fedjax-sync run` are labelled by algorithm and seed
  from their `config.json`; those differing only in seed are drawn as one line,
  their mean, with a ± std band (`group_runs`). Other directories (studies) are
  grouped into series by their rows (`series_key`), averaged over seeds, and
  labelled `<run dir>: <series>` when several directories are given.
  `metrics` (default test accuracy and loss) may name any numeric field of the
  rows; an unknown one is a ValueError naming those available.
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  rows_of = {d: read_metrics(d) for d in run_dirs}
  available = set().union(*(available_metrics(rows) for rows in rows_of.values()))
  metrics = list(metrics or ('test_accuracy', 'test_loss'))
  unknown = [m for m in metrics if m not in available]
  if unknown:
    raise ValueError(f'no metric {unknown[0]!r} in {", ".join(run_dirs)}; available: '
                     f'{", ".join(sorted(available)) or "none"}')
  groups, others = group_runs(run_dirs)
  names = {d: os.path.basename(os.path.normpath(d)) or d for d in run_dirs}
  fig, axes = plt.subplots(1, len(metrics), figsize=(6.0 * len(metrics), 4.2), dpi=110,
                           squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    for group in groups:
      x, mean, std = group_curve([rows_of[d] for d in group.run_dirs], metric)
      if not len(x):
        continue
      (line,) = ax.plot(x, mean, label=group.label, marker='o' if len(x) <= 12 else None,
                        markersize=3)
      if len(group.run_dirs) > 1:
        ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())
    for d in others:
      for label, (x, mean, std) in curves(rows_of[d], metric).items():
        full = f'{names[d]}: {label}' if len(run_dirs) > 1 else label
        (line,) = ax.plot(x, mean, label=full, marker='o' if len(x) <= 12 else None,
                          markersize=3)
        if np.any(std > 0):
          ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())
    ax.set_xlabel('round')
    ax.set_ylabel(metric)
    ax.set_title(metric, fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
