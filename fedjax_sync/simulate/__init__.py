"""Simulations: the one driver (`drive`) and its timelines: synchronous rounds
(`Simulator`, `Sweep`), the semi-asynchronous engine (`SemiAsyncSimulator`) and
dynamic averaging (`AveragingSimulator`, FDA), with the simulated clock. Checkpoints and many hosts: `fedjax_sync.simulate.checkpoint`,
`fedjax_sync.simulate.multihost`."""

from fedjax_sync.simulate.availability import (AvailabilityTrace, diurnal_availability,
                                              diurnal_online_fraction, is_online,
                                              load_availability_csv, make_availability,
                                              next_online, save_availability_csv)
from fedjax_sync.simulate.averaging import (AveragingResult, AveragingSimulator, make_block,
                                            run_averaging, sample_worker_batches)
from fedjax_sync.simulate.clock import (ClientClock, RoundPolicy, apply_round_policy,
                                        constant_times, first_m, job_available, job_start_times,
                                        job_times,
                                        lognormal_times, make_clock, over_selection,
                                        speed_ratio_times, wait_for_all, with_clock,
                                        with_deadline)
from fedjax_sync.simulate.driver import DriveResult, Runner, drive
from fedjax_sync.simulate.evaluation import make_evaluator
from fedjax_sync.simulate.driver import block_schedule
from fedjax_sync.simulate.rounds import (SAMPLINGS, SimulationConfig, SimulationResult, Simulator,
                                         draw_participants, rounds_to_reach)
from fedjax_sync.simulate.semi_async import (AsyncAlgorithm, AsyncConfig, AsyncResult,
                                             AsyncRound, AsyncState, SemiAsyncSimulator,
                                             make_async_engine)
from fedjax_sync.simulate.sweep import Sweep, SweepResult, registered_algorithm

__all__ = [
    # The one driver every timeline runs through.
    'DriveResult', 'Runner', 'drive',
    # Synchronous rounds and sweeps.
    'SimulationConfig', 'SimulationResult', 'Simulator', 'Sweep', 'SweepResult',
    'block_schedule', 'make_evaluator', 'registered_algorithm', 'rounds_to_reach',
    'SAMPLINGS', 'draw_participants',
    # Client availability over simulated time.
    'AvailabilityTrace', 'diurnal_availability', 'diurnal_online_fraction', 'is_online',
    'load_availability_csv', 'make_availability', 'next_online', 'save_availability_csv',
    # The simulated clock.
    'ClientClock', 'RoundPolicy', 'apply_round_policy', 'constant_times', 'first_m',
    'job_available', 'job_start_times', 'job_times', 'lognormal_times', 'make_clock',
    'over_selection', 'speed_ratio_times', 'wait_for_all', 'with_clock', 'with_deadline',
    # The semi-asynchronous engine.
    'AsyncAlgorithm', 'AsyncConfig', 'AsyncResult', 'AsyncRound', 'AsyncState',
    'SemiAsyncSimulator', 'make_async_engine',
    # Dynamic averaging (FDA and fixed-period baselines).
    'AveragingResult', 'AveragingSimulator', 'make_block', 'run_averaging', 'sample_worker_batches',
]
