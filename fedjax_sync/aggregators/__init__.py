"""Composable, pure, jit-compilable aggregators over stacked client updates.

Reducers map `[C, ...] → [...]`, client transforms `[C, ...] → [C, ...]`; `chain`
composes transforms, one reducer and optax transforms, checking the order.
"""

from fedjax_sync.aggregators.attacks import scale_attack, sign_flip_attack
from fedjax_sync.aggregators.base import (REDUCER, TRANSFORM, Aggregator, ChainState, EmptyState,
                                          aggregator_metrics, chain, mean, stateless,
                                          validate_aggregator, weighted_mean, weighted_sum_via)
from fedjax_sync.aggregators.bulyan import bulyan
from fedjax_sync.aggregators.clip import adaptive_clip, clip_by_norm, zero_invalid_updates
from fedjax_sync.aggregators.compress import random_k, stochastic_quantize, terngrad, top_k
from fedjax_sync.aggregators.dp_ftrl import dp_ftrl, dp_ftrl_epsilon
from fedjax_sync.aggregators.harmonize import harmonize
from fedjax_sync.aggregators.kuramoto import kuramoto, kuramoto_code
from fedjax_sync.aggregators.privacy import (dp_epsilon, dp_fedavg, dp_noise_multiplier,
                                             participation_epsilon)
from fedjax_sync.aggregators.reduce import MetricsState, norm_bounded_mean
from fedjax_sync.aggregators.registry import (aggregator_names, aggregator_signatures,
                                              canonical_aggregator_expression, parse_aggregator,
                                              register_aggregator)
from fedjax_sync.aggregators.rotation import drive, rotated_quantize
from fedjax_sync.aggregators.robust import (coordinate_median, geometric_median, krum, multi_krum,
                                            trimmed_mean)
from fedjax_sync.aggregators.secure import secure_aggregation

__all__ = [
    # Composition.
    'REDUCER', 'TRANSFORM', 'Aggregator', 'ChainState', 'EmptyState', 'MetricsState',
    'aggregator_metrics', 'chain', 'stateless', 'validate_aggregator',
    # An algorithm's weighted sum computed by any aggregator (every timeline uses it).
    'weighted_sum_via',
    # Reducers.
    'bulyan', 'coordinate_median', 'dp_fedavg', 'dp_ftrl', 'geometric_median', 'harmonize',
    'krum', 'kuramoto', 'kuramoto_code', 'mean', 'multi_krum', 'norm_bounded_mean',
    'secure_aggregation', 'trimmed_mean', 'weighted_mean',
    # Client transforms.
    'adaptive_clip', 'clip_by_norm', 'drive', 'random_k', 'rotated_quantize', 'scale_attack',
    'sign_flip_attack', 'stochastic_quantize', 'terngrad', 'top_k', 'zero_invalid_updates',
    # Privacy accounting (host-side).
    'dp_epsilon', 'dp_ftrl_epsilon', 'dp_noise_multiplier', 'participation_epsilon',
    # By name, and expressions such as 'chain(clip_by_norm(1.0), trimmed_mean(0.1))'.
    'aggregator_names', 'aggregator_signatures', 'canonical_aggregator_expression',
    'parse_aggregator', 'register_aggregator',
]
