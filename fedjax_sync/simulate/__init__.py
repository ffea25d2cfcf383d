"""Drivers of simulations."""

from fedjax_sync.simulate.evaluation import make_evaluator
from fedjax_sync.simulate.rounds import (SimulationConfig, SimulationResult, Simulator,
                                         rounds_to_reach)
from fedjax_sync.simulate.sweep import Sweep, SweepResult, registered_algorithm

__all__ = ['SimulationConfig', 'SimulationResult', 'Simulator', 'Sweep', 'SweepResult',
           'make_evaluator', 'registered_algorithm', 'rounds_to_reach']

# Simulated clock, stragglers and the semi-asynchronous engine (issue #7).
from fedjax_sync.simulate.clock import (ClientClock, RoundPolicy, apply_round_policy,  # noqa: E402
                                        constant_times, first_m, job_available, job_times,
                                        lognormal_times, make_clock, over_selection,
                                        speed_ratio_times, wait_for_all, with_clock,
                                        with_deadline)
from fedjax_sync.simulate.semi_async import (AsyncAlgorithm, AsyncConfig,  # noqa: E402
                                             AsyncResult, AsyncRound, AsyncState,
                                             SemiAsyncSimulator, make_async_engine)

__all__ += ['AsyncAlgorithm', 'AsyncConfig', 'AsyncResult', 'AsyncRound', 'AsyncState',
            'ClientClock', 'RoundPolicy', 'SemiAsyncSimulator', 'apply_round_policy',
            'constant_times', 'first_m', 'job_available', 'job_times', 'lognormal_times',
            'make_async_engine', 'make_clock', 'over_selection', 'speed_ratio_times',
            'wait_for_all', 'with_clock', 'with_deadline']
