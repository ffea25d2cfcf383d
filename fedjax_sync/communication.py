"""Communication accounting shared by every algorithm: bytes up and down.

Every count here is a static Python integer computed from shapes and dtypes, so a
compiled program only multiplies it by traced counters (participants, steps,
synchronizations) and the host can keep exact cumulative totals in Python ints:

    bytes of a run = steps · (per-step bytes) + syncs · (per-sync bytes)

Conventions (documented so that algorithms compare on the same footing):
* a model or a pseudo-gradient travels as its leaves' raw bytes (`model_bytes`);
* a float of monitoring state is a float32 (4 bytes, `FLOAT_BYTES`);
* an AMS sketch of depth × width travels as depth·width float32s;
* a compressed update is `num_values` values of `value_bits` plus, when sparse,
  `index_bits` per value (top-k), rounded up to whole bytes per client;
* control messages (a one-bit "synchronize now" flag) are not counted.

Example:
  >>> up, down = full_exchange_bytes(params, participants=10)
  >>> per_step = monitoring_bytes(num_workers=5, state_floats=2)   # FDA-linear
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np

from fedjax_sync.types import PyTree

FLOAT_BYTES = 4


def _check_count(name: str, value) -> int:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
    raise ValueError(f'{name} must be a non-negative integer, got {value!r}')
  return int(value)


def model_bytes(params: PyTree) -> int:
  """Bytes of one full model (or pseudo-gradient) with the leaves' own dtypes.

  Args:
    params: a pytree of arrays or `jax.ShapeDtypeStruct`s.
  """
  return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(params))


def state_bytes(num_floats: int, *, float_bytes: int = FLOAT_BYTES) -> int:
  """Bytes of `num_floats` floats of monitoring state (one worker, one message)."""
  return _check_count('num_floats', num_floats) * _check_count('float_bytes', float_bytes)


def sketch_bytes(depth: int, width: int, *, float_bytes: int = FLOAT_BYTES) -> int:
  """Bytes of one AMS sketch of `depth` rows × `width` counters."""
  return _check_count('depth', depth) * _check_count('width', width) * float_bytes


def compressed_bytes(num_values: int, *, value_bits: int = 32, index_bits: int = 0) -> int:
  """Bytes of one compressed update: `num_values` entries of `value_bits` (+ `index_bits`).

  Dense quantization to b bits: `compressed_bytes(d, value_bits=b)`. Top-k with
  32-bit indices: `compressed_bytes(k, value_bits=32, index_bits=32)`.
  """
  bits = _check_count('num_values', num_values) * (
      _check_count('value_bits', value_bits) + _check_count('index_bits', index_bits))
  return math.ceil(bits / 8)


def full_exchange_bytes(params: PyTree, participants: int) -> tuple[int, int]:
  """(bytes up, bytes down) of one synchronous round where every participant
  downloads the model and uploads a full-size update."""
  per_model = model_bytes(params)
  n = _check_count('participants', participants)
  return n * per_model, n * per_model


def monitoring_bytes(num_workers: int, state_floats: int, *,
                     float_bytes: int = FLOAT_BYTES) -> int:
  """Bytes up of one monitoring step: every worker sends its local state (FDA)."""
  return _check_count('num_workers', num_workers) * state_bytes(state_floats,
                                                                float_bytes=float_bytes)


class CommunicationCost(NamedTuple):
  """Static per-event byte counts of an algorithm; cumulative totals are
  `steps · per_step + syncs · per_sync` (exact Python integers).

  Attributes:
    up_per_step: bytes up sent after every local step (monitoring state).
    down_per_step: bytes down after every local step.
    up_per_sync: bytes up of one synchronization (K full models).
    down_per_sync: bytes down of one synchronization (K broadcasts).
  """

  up_per_step: int
  down_per_step: int
  up_per_sync: int
  down_per_sync: int

  def totals(self, steps: int, syncs: int) -> tuple[int, int]:
    """(cumulative bytes up, cumulative bytes down) after `steps` steps and `syncs` syncs."""
    steps, syncs = _check_count('steps', int(steps)), _check_count('syncs', int(syncs))
    return (steps * self.up_per_step + syncs * self.up_per_sync,
            steps * self.down_per_step + syncs * self.down_per_sync)

  def total(self, steps: int, syncs: int) -> int:
    """Cumulative bytes up plus down."""
    return sum(self.totals(steps, syncs))


def averaging_cost(params: PyTree, num_workers: int, state_floats: int = 0) -> CommunicationCost:
  """The cost model of (dynamic) model averaging among `num_workers` workers.

  Per step every worker uploads `state_floats` floats (0 for fixed-period
  averaging); per synchronization every worker uploads its model and receives the
  new one (K·d up, K·d down; ALGORITHMS.md, FDA).
  """
  k = _check_count('num_workers', num_workers)
  model = model_bytes(params)
  return CommunicationCost(up_per_step=monitoring_bytes(k, state_floats), down_per_step=0,
                           up_per_sync=k * model, down_per_sync=k * model)
