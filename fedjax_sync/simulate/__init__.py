"""Drivers of simulations."""

from fedjax_sync.simulate.evaluation import make_evaluator
from fedjax_sync.simulate.rounds import (SimulationConfig, SimulationResult, Simulator,
                                         rounds_to_reach)
from fedjax_sync.simulate.sweep import Sweep, SweepResult, registered_algorithm

__all__ = ['SimulationConfig', 'SimulationResult', 'Simulator', 'Sweep', 'SweepResult',
           'make_evaluator', 'registered_algorithm', 'rounds_to_reach']
