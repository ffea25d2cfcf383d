"""`fedjax-sync run` flags for client availability and Poisson client sampling.

* `--availability diurnal` (with `--day-length`, `--online-fraction`,
  `--diurnal-amplitude`, `--diurnal-peak`) or `--availability-file PATH.csv` (a
  `client_id,start,end` trace, `--availability-period P` to repeat it): clients are
  sampled (synchronous rounds, at time round · `--round-duration`) or start jobs
  (asynchronous timelines) only while online. `simulate.availability`.
* `--sampling poisson --sampling-rate q`: each client takes part independently with
  probability q; the round's arrays hold C_max = `poisson_max_clients(N, q)`
  clients (overflow probability ≤ 1e-9 a round), or `--clients-per-round` when
  given; config.json records C_max and its per-round overflow probability. The
  matching privacy accountant is `aggregators.participation_epsilon`.

Everything is recorded in config.json under `availability` and `sampling`, and is
part of a checkpoint's identity only when not at its default (older checkpoints
resume).
"""

from __future__ import annotations

import argparse
import math
import os

from fedjax_sync.cli import number_type

AVAILABILITIES = ('always', 'diurnal')
SAMPLINGS = ('uniform', 'poisson')
# Flag dest -> default; a flag at its default is left out of a checkpoint's identity.
DEFAULTS = {'availability': 'always', 'availability_file': None, 'availability_period': None,
            'day_length': 24.0, 'online_fraction': 0.5, 'diurnal_amplitude': 0.5,
            'diurnal_peak': 0.0, 'round_duration': 1.0, 'sampling': 'uniform',
            'sampling_rate': None}
_DIURNAL_FLAGS = ('day_length', 'online_fraction', 'diurnal_amplitude', 'diurnal_peak')
AVAILABILITY_FLAGS = ('availability', 'availability_file', 'availability_period',
                      *_DIURNAL_FLAGS, 'round_duration')
SAMPLING_FLAGS = ('sampling', 'sampling_rate')


def _flag(dest: str) -> str:
  return '--' + dest.replace('_', '-')


_positive = number_type(float, lambda v: 0 < v < math.inf, 'a finite number > 0')
_unit_fraction = number_type(float, lambda v: 0 < v <= 1, 'a number in (0, 1]')
_amplitude = number_type(float, lambda v: 0 <= v <= 1, 'a number in [0, 1]')
_finite = number_type(float, math.isfinite, 'a finite number')


def add_flags(run: argparse.ArgumentParser) -> None:
  run.add_argument('--availability', default='always', choices=AVAILABILITIES,
                   help='when clients can take part: always (default), or diurnal (each client '
                        'online --online-fraction of each --day-length, from its own phase; '
                        'Bonawitz et al. 2019)')
  run.add_argument('--availability-file', default=None, metavar='PATH.csv',
                   help='an availability trace: header client_id,start,end, then one online '
                        'interval [start, end) per line in simulated time units')
  run.add_argument('--availability-period', type=_positive, default=None, metavar='P',
                   help='repeat the --availability-file intervals every P time units')
  run.add_argument('--day-length', type=_positive, default=24.0,
                   help='--availability diurnal: time units per day (default 24)')
  run.add_argument('--online-fraction', type=_unit_fraction, default=0.5,
                   help='--availability diurnal: share of the day each client is online '
                        '(default 0.5)')
  run.add_argument('--diurnal-amplitude', type=_amplitude, default=0.5,
                   help='--availability diurnal: daily swing of the population online, 0 (flat) '
                        'to 1 (default 0.5)')
  run.add_argument('--diurnal-peak', type=_finite, default=0.0,
                   help='--availability diurnal: time of day with the most clients online '
                        '(default 0)')
  run.add_argument('--round-duration', type=_positive, default=1.0,
                   help='synchronous rounds with an availability trace: round r happens at '
                        'simulated time r × this (default 1)')
  run.add_argument('--sampling', default='uniform', choices=SAMPLINGS,
                   help='synchronous rounds: uniform (--clients-per-round clients, default) or '
                        'poisson (each client independently with --sampling-rate; for '
                        'user-level DP accounting)')
  run.add_argument('--sampling-rate', type=_unit_fraction, default=None, metavar='Q',
                   help='--sampling poisson: the probability q that a client takes part')


def check(args, given: set[str], timeline: str) -> None:
  """One-line ValueErrors for combinations that cannot apply."""
  from fedjax_sync.algorithms.registry import SEMI_ASYNC, SYNCHRONOUS

  file = getattr(args, 'availability_file', None)
  if file is not None:   # absolute, so that config.json resumes from any directory
    file = args.availability_file = os.path.abspath(file)
  if file is not None and args.availability != 'always':
    raise ValueError(f'--availability {args.availability} and --availability-file {file!r} are '
                     'two availability sources; valid: one of them')
  if args.availability_period is not None and file is None:
    raise ValueError(f'--availability-period {args.availability_period} applies to '
                     '--availability-file; valid: --availability-file PATH --availability-period P')
  for dest in _DIURNAL_FLAGS:
    if dest in given and args.availability != 'diurnal':
      raise ValueError(f'{_flag(dest)} applies to --availability diurnal, not '
                       f'{args.availability if file is None else "--availability-file"}')
  traced = args.availability != 'always' or file is not None
  if args.sampling == 'poisson' and args.sampling_rate is None:
    raise ValueError('--sampling poisson needs --sampling-rate Q; valid: a probability in (0, 1]')
  if args.sampling_rate is not None and args.sampling != 'poisson':
    raise ValueError(f'--sampling-rate {args.sampling_rate} applies to --sampling poisson, not '
                     f'{args.sampling}')
  if timeline == SYNCHRONOUS:
    if args.sampling == 'poisson' and getattr(args, 'over_selection', None) is not None:
      raise ValueError(f'--over-selection {args.over_selection} does not apply to --sampling '
                       'poisson (the number of clients drawn is random); valid: --first-m or '
                       '--deadline')
    if 'round_duration' in given and not traced:
      raise ValueError('--round-duration places rounds on the availability trace\'s time; '
                       'valid: with --availability diurnal or --availability-file')
    if traced and (getattr(args, 'seeds', None) or getattr(args, 'sweep', None)):
      raise ValueError('--availability does not apply to --seeds/--sweep (the vmapped sweep '
                       'samples every client); valid: one run per seed')
    return
  used = [d for d in SAMPLING_FLAGS if d in given and getattr(args, d) != DEFAULTS[d]]
  if timeline == SEMI_ASYNC:
    used += [d for d in ('round_duration',) if d in given]
    if used:
      raise ValueError(f'{_flag(used[0])} does not apply to --algorithm {args.algorithm} (the '
                       f'{timeline} timeline): clients are not sampled by rounds; every client '
                       'trains whenever it is online')
    return
  used += [d for d in AVAILABILITY_FLAGS if d in given and getattr(args, d) != DEFAULTS[d]]
  if used:
    raise ValueError(f'{_flag(used[0])} does not apply to --algorithm {args.algorithm} (the '
                     f'{timeline} timeline): its workers train every step')


def trace(args, num_clients: int):
  """The `AvailabilityTrace` of the flags, or None (every client always available)."""
  from fedjax_sync.simulate import availability

  if getattr(args, 'availability_file', None) is not None:
    return availability.load_availability_csv(args.availability_file, num_clients,
                                              period=args.availability_period)
  if getattr(args, 'availability', 'always') == 'diurnal':
    return availability.diurnal_availability(
        num_clients, day_length=args.day_length, online_fraction=args.online_fraction,
        amplitude=args.diurnal_amplitude, peak=args.diurnal_peak, seed=args.seed)
  return None


def clients_per_round(args, given: set[str], num_clients: int) -> int:
  """C for uniform sampling; C_max for Poisson sampling (`--clients-per-round` when given)."""
  if getattr(args, 'sampling', 'uniform') != 'poisson':
    return args.clients_per_round
  if 'clients_per_round' in given:
    if args.clients_per_round > num_clients:
      raise ValueError(f'--clients-per-round {args.clients_per_round} (C_max of --sampling '
                       f'poisson) exceeds the {num_clients} clients; valid: ≤ {num_clients}')
    return args.clients_per_round
  from fedjax_sync.data.batching import poisson_max_clients
  return poisson_max_clients(num_clients, args.sampling_rate)


def simulation_fields(args) -> dict:
  """`SimulationConfig` fields of the flags (empty at their defaults)."""
  fields = {}
  if getattr(args, 'sampling', 'uniform') == 'poisson':
    fields.update(sampling='poisson', sampling_rate=args.sampling_rate)
  if getattr(args, 'round_duration', 1.0) != 1.0:
    fields['round_duration'] = args.round_duration
  return fields


def record(args, clients: int | None = None, num_clients: int | None = None, *,
           synchronous: bool = True) -> dict:
  """config.json's `availability` and `sampling` entries (empty at the defaults);
  `round_duration` only for synchronous rounds."""
  out = {}
  if getattr(args, 'availability_file', None) is not None:
    out['availability'] = {'source': 'file', 'path': args.availability_file,
                           'period': args.availability_period,
                           'round_duration': args.round_duration}
  elif getattr(args, 'availability', 'always') == 'diurnal':
    out['availability'] = {'source': 'diurnal', 'day_length': args.day_length,
                           'online_fraction': args.online_fraction,
                           'amplitude': args.diurnal_amplitude, 'peak': args.diurnal_peak,
                           'seed': args.seed, 'round_duration': args.round_duration,
                           'reference': 'Bonawitz et al. 2019, arXiv 1902.01046'}
  if not synchronous and 'availability' in out:
    out['availability'].pop('round_duration')
  if getattr(args, 'sampling', 'uniform') == 'poisson':
    from scipy import stats
    overflow = (None if clients is None or num_clients is None else
                float(stats.binom.sf(clients, num_clients, args.sampling_rate)))
    out['sampling'] = {'kind': 'poisson', 'rate': args.sampling_rate, 'max_clients': clients,
                       'overflow_probability_per_round': overflow}
  return out
