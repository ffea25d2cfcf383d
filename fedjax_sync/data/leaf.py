"""LEAF's JSON files (Caldas et al. 2018, arXiv 1812.01097), read without LEAF.

LEAF writes each split as several JSON files, each
`{"users": [...], "num_samples": [...], "user_data": {uid: {"x": [...], "y": [...]}}}`,
in `…/train/*.json` and `…/test/*.json`. Pass the directory holding `train/` and
`test/`, the `train/` directory itself (its sibling `test/` is used when present), or
one JSON file (then the last 20% of each user is held out as its test split).

Datasets, recognized from the first user's examples:
- FEMNIST: `x` = 784 floats → `pixels` (then `[28, 28, 1]` float32), `y` of 62 classes;
- Shakespeare: `x` = 80-character strings, `y` = the next character → `x [n, 80]`
  character ids and `y [n, 80]` the next character at every position (`x` shifted by
  one, then the target), ids of `fedjax_sync.data.shakespeare`;
- Sent140: `x` = `[id, date, query, user, text]` rows, `y` = 0/1 → the text, tokenized
  by `fedjax_sync.data.examples.tokenize_words`;
- numeric `x` rows (LEAF's Synthetic) → `x [n, d]` float32, `y` int32.
CelebA (image file names) is not supported: its images are not in the JSON.

JSON has no random access, so each file is parsed whole, one file at a time (LEAF
splits its data into files of a few hundred users); each user's examples become
arrays before the next file is read.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np


def _split_files(path: str) -> dict[str, list[str]]:
  def jsons(directory):
    return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                  if f.endswith('.json'))

  if os.path.isfile(path):
    return {'train': [path]}
  if not os.path.isdir(path):
    raise FileNotFoundError(f'LEAF path {path!r} not found')
  if os.path.isdir(os.path.join(path, 'train')):
    files = {'train': jsons(os.path.join(path, 'train'))}
    if os.path.isdir(os.path.join(path, 'test')):
      files['test'] = jsons(os.path.join(path, 'test'))
  else:
    files = {'train': jsons(path)}
    sibling = os.path.join(os.path.dirname(os.path.normpath(path)), 'test')
    if os.path.basename(os.path.normpath(path)) == 'train' and os.path.isdir(sibling):
      files['test'] = jsons(sibling)
  if not files['train']:
    raise ValueError('no LEAF .json files (expected train/*.json and test/*.json, each '
                     '{users, num_samples, user_data})')
  return files


def is_leaf(path: str) -> bool:
  """Whether `path` looks like LEAF data (a .json file or a directory of them)."""
  if os.path.isfile(path):
    return path.endswith('.json')
  if os.path.isdir(path):
    base = os.path.join(path, 'train') if os.path.isdir(os.path.join(path, 'train')) else path
    return any(f.endswith('.json') for f in os.listdir(base))
  return False


def _features(x: list, y: list) -> dict[str, object]:
  """One user's LEAF `x`, `y` lists → feature arrays (see the module docstring)."""
  if len(x) != len(y):
    raise ValueError(f'{len(x)} inputs but {len(y)} targets')
  if not x:
    return {'x': np.zeros((0, 1), np.float32), 'y': np.zeros((0,), np.int32)}
  first = x[0]
  if isinstance(first, str):  # Shakespeare
    from fedjax_sync.data.shakespeare import encode_characters
    lengths = {len(s) for s in x}
    if len(lengths) != 1 or any(len(t) != 1 for t in y):
      raise ValueError('Shakespeare x must be strings of one length and y single characters')
    inputs = np.stack([encode_characters(s) for s in x])
    targets = np.concatenate([inputs[:, 1:], encode_characters(''.join(y))[:, None]], axis=1)
    return {'chars': inputs, 'next_chars': targets}
  if isinstance(first, list) and first and isinstance(first[-1], str):  # Sent140
    return {'text': np.array([row[-1] for row in x], dtype=object),
            'label': np.asarray(y, np.int64)}
  if isinstance(first, str) or (isinstance(first, list) and any(isinstance(v, str)
                                                                 for v in first)):
    raise ValueError('unsupported LEAF inputs (strings that are neither Shakespeare '
                     'nor Sent140 rows, e.g. CelebA image names)')
  inputs = np.asarray(x, np.float32)
  labels = np.asarray(y)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'LEAF targets must be integer labels, got {labels.dtype} {labels.shape}')
  if inputs.ndim == 2 and inputs.shape[1] == 784:  # FEMNIST
    return {'pixels': inputs, 'label': labels}
  return {'x': inputs, 'y': labels.astype(np.int32)}


def _read_json(path: str) -> dict:
  with open(path, 'rb') as f:
    data = json.load(f)
  if not isinstance(data, dict) or not {'users', 'user_data'} <= set(data):
    raise ValueError(f'{path}: not a LEAF file (needs keys users, num_samples, user_data)')
  return data


def client_stream(path: str):
  """`(split -> iterator of (user, {feature: array}), has_test)`."""
  files = _split_files(path)

  def stream(split: str) -> Iterator:
    if split not in files:
      raise KeyError(split)
    for name in files[split]:
      data = _read_json(name)
      sizes = dict(zip(data['users'], data.get('num_samples', [None] * len(data['users']))))
      for user in data['users']:
        if user not in data['user_data']:
          raise ValueError(f'{name}: user {user!r} is listed but has no user_data')
        record = data['user_data'][user]
        features = _features(record['x'], record['y'])
        n = len(record['x'])
        if sizes[user] is not None and sizes[user] != n:
          raise ValueError(f'{name}: user {user!r} has num_samples {sizes[user]} but {n} '
                           'examples')
        yield user, features
      del data

  return stream, 'test' in files
