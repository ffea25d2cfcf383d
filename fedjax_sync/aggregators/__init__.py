"""Composable, pure, jit-compilable aggregators over stacked client updates."""

from fedjax_sync.aggregators.base import (REDUCER, TRANSFORM, Aggregator, ChainState, EmptyState,
                                          aggregator_metrics, chain, mean, stateless,
                                          validate_aggregator, weighted_mean)

__all__ = ['REDUCER', 'TRANSFORM', 'Aggregator', 'ChainState', 'EmptyState',
           'aggregator_metrics', 'chain', 'mean', 'stateless', 'validate_aggregator',
           'weighted_mean']

# Client-drift aggregators (issue #5).
from fedjax_sync.aggregators.harmonize import harmonize  # noqa: E402
from fedjax_sync.aggregators.kuramoto import kuramoto, kuramoto_code  # noqa: E402

__all__ += ['harmonize', 'kuramoto', 'kuramoto_code']
