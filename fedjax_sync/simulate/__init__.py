"""Drivers of simulations."""

from fedjax_sync.simulate.evaluation import make_evaluator
from fedjax_sync.simulate.rounds import (SimulationConfig, SimulationResult, Simulator,
                                         rounds_to_reach)

__all__ = ['SimulationConfig', 'SimulationResult', 'Simulator', 'make_evaluator',
           'rounds_to_reach']
