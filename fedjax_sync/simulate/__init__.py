"""Drivers of simulations: synchronous rounds, sweeps, the simulated clock, the
semi-asynchronous engine and dynamic averaging (FDA). Checkpoints and many hosts: `fedjax_sync.simulate.checkpoint`,
`fedjax_sync.simulate.multihost`."""

from fedjax_sync.simulate.averaging import (AveragingResult, make_block, run_averaging,
                                            sample_worker_batches)
from fedjax_sync.simulate.clock import (ClientClock, RoundPolicy, apply_round_policy,
                                        constant_times, first_m, job_available, job_times,
                                        lognormal_times, make_clock, over_selection,
                                        speed_ratio_times, wait_for_all, with_clock,
                                        with_deadline)
from fedjax_sync.simulate.evaluation import make_evaluator
from fedjax_sync.simulate.rounds import (SimulationConfig, SimulationResult, Simulator,
                                         block_schedule, rounds_to_reach)
from fedjax_sync.simulate.semi_async import (AsyncAlgorithm, AsyncConfig, AsyncResult,
                                             AsyncRound, AsyncState, SemiAsyncSimulator,
                                             make_async_engine)
from fedjax_sync.simulate.sweep import Sweep, SweepResult, registered_algorithm

__all__ = [
    # Synchronous rounds and sweeps.
    'SimulationConfig', 'SimulationResult', 'Simulator', 'Sweep', 'SweepResult',
    'block_schedule', 'make_evaluator', 'registered_algorithm', 'rounds_to_reach',
    # The simulated clock.
    'ClientClock', 'RoundPolicy', 'apply_round_policy', 'constant_times', 'first_m',
    'job_available', 'job_times', 'lognormal_times', 'make_clock', 'over_selection',
    'speed_ratio_times', 'wait_for_all', 'with_clock', 'with_deadline',
    # The semi-asynchronous engine.
    'AsyncAlgorithm', 'AsyncConfig', 'AsyncResult', 'AsyncRound', 'AsyncState',
    'SemiAsyncSimulator', 'make_async_engine',
    # Dynamic averaging (FDA and fixed-period baselines).
    'AveragingResult', 'make_block', 'run_averaging', 'sample_worker_batches',
]
