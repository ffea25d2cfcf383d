"""Checks the drivers run before compiling: the right kind of algorithm, the right population.

An algorithm with per-client state (SCAFFOLD's control variates, FedQS's per-client
learning rates, an error-feedback residual) is built for a population of N clients;
its `[N, ...]` arrays are gathered and scattered by client id. Run on a dataset with
another number of clients, out-of-range ids are silently clamped by XLA (N too small:
clients share state and the run learns nothing) or part of the state is never used
(N too large). The drivers (`Simulator`, `Sweep`, `SemiAsyncSimulator`,
`MultiHostSimulator`) therefore compare the algorithm's population — its declared
`num_clients` and the leading size of its per-client state — with the data's.
"""

from __future__ import annotations

from typing import Any

import jax


def _name(algorithm) -> str:
  return getattr(algorithm, 'name', None) or type(algorithm).__name__


def _is_async(algorithm) -> bool:
  return hasattr(algorithm, 'server_update') and hasattr(algorithm, 'client_inputs')


def check_synchronous(algorithm, driver: str) -> None:
  """Raises unless `algorithm` is a synchronous `Algorithm(init, round)`."""
  if _is_async(algorithm):
    raise ValueError(
        f'{_name(algorithm)!r} is a semi-asynchronous algorithm (AsyncAlgorithm); {driver} runs '
        'synchronous rounds. Run it with SemiAsyncSimulator(algorithm, model, data, clock, '
        'AsyncConfig(...)) (fedjax_sync.simulate.semi_async)')
  if not (callable(getattr(algorithm, 'init', None)) and callable(getattr(algorithm, 'round', None))):
    raise ValueError(f'{driver} needs an Algorithm(init, round), e.g. fedjax_sync.fed_avg(...); '
                     f'got {type(algorithm).__name__}')


def check_asynchronous(algorithm, driver: str = 'SemiAsyncSimulator') -> None:
  """Raises unless `algorithm` is an `AsyncAlgorithm` (e.g. fed_buff, fed_qs_sgd)."""
  if not _is_async(algorithm):
    hint = (' It is a synchronous Algorithm: run it with Simulator(algorithm, model, data, '
            'config), or pick a semi-asynchronous one (fed_buff, fed_async, fed_qs_sgd, '
            'fed_qs_avg)' if callable(getattr(algorithm, 'round', None)) else '')
    raise ValueError(f'{driver} needs an AsyncAlgorithm(init, client_inputs, client_update, '
                     f'server_update); got {type(algorithm).__name__} '
                     f'{_name(algorithm)!r}.{hint}')


def _mismatch(algorithm, built_for: int, num_clients: int, what: str) -> ValueError:
  return ValueError(
      f'{_name(algorithm)!r} {what} {built_for} clients, but the data has {num_clients} '
      f'clients; build the algorithm with num_clients=data.num_clients ({num_clients})')


def check_population(algorithm, num_clients: int, client_states: Any = None, *,
                     leading_axes: int = 0) -> None:
  """Raises a `ValueError` when the algorithm's population differs from the data's.

  Args:
    algorithm: an `Algorithm` or `AsyncAlgorithm`; its `num_clients` attribute, when
      present and not None, is the population it was built for.
    num_clients: the data's number of clients N.
    client_states: optional per-client state (`ServerState.client_states`), arrays
      or shapes; every leaf must be `[..., N, ...]` with N after `leading_axes`
      axes (1 for a sweep's stacked `[S, N, ...]` states).
    leading_axes: axes before the client axis.
  """
  declared = getattr(algorithm, 'num_clients', None)
  if declared is not None and declared != num_clients:
    raise _mismatch(algorithm, declared, num_clients, 'was built with num_clients =')
  for path, leaf in jax.tree_util.tree_leaves_with_path(client_states):
    shape = getattr(leaf, 'shape', ())
    if len(shape) <= leading_axes or shape[leading_axes] != num_clients:
      size = shape[leading_axes] if len(shape) > leading_axes else 'no'
      raise _mismatch(algorithm, size, num_clients,
                      f'keeps per-client state (client_states{jax.tree_util.keystr(path)} '
                      f'of shape {tuple(shape)}) for')
