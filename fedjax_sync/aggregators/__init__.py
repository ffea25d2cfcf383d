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

# The aggregator library (issue #4).
from fedjax_sync.aggregators.attacks import scale_attack, sign_flip_attack  # noqa: E402
from fedjax_sync.aggregators.clip import (adaptive_clip, clip_by_norm,  # noqa: E402
                                          zero_invalid_updates)
from fedjax_sync.aggregators.compress import random_k, stochastic_quantize, top_k  # noqa: E402
from fedjax_sync.aggregators.privacy import (dp_epsilon, dp_fedavg,  # noqa: E402
                                             dp_noise_multiplier)
from fedjax_sync.aggregators.reduce import MetricsState, norm_bounded_mean  # noqa: E402
from fedjax_sync.aggregators.robust import (coordinate_median, geometric_median,  # noqa: E402
                                            krum, multi_krum, trimmed_mean)
from fedjax_sync.aggregators.secure import secure_aggregation  # noqa: E402

__all__ += ['MetricsState', 'adaptive_clip', 'clip_by_norm', 'coordinate_median', 'dp_epsilon',
            'dp_fedavg', 'dp_noise_multiplier', 'geometric_median', 'krum', 'multi_krum',
            'norm_bounded_mean', 'random_k', 'scale_attack', 'secure_aggregation',
            'sign_flip_attack', 'stochastic_quantize', 'top_k', 'trimmed_mean',
            'zero_invalid_updates']
