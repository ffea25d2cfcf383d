"""Composable, pure, jit-compilable aggregators over stacked client updates."""

from fedjax_sync.aggregators.base import (REDUCER, TRANSFORM, Aggregator, ChainState, EmptyState,
                                          aggregator_metrics, chain, mean, stateless,
                                          validate_aggregator, weighted_mean)

__all__ = ['REDUCER', 'TRANSFORM', 'Aggregator', 'ChainState', 'EmptyState',
           'aggregator_metrics', 'chain', 'mean', 'stateless', 'validate_aggregator',
           'weighted_mean']
