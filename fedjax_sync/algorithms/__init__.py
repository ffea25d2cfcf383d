"""Federated algorithms: each is `Algorithm(init, round)` built on `federated_algorithm`."""

from fedjax_sync.algorithms.fed_avg import fed_avg, fed_avg_m, fed_prox, local_training_update
from fedjax_sync.algorithms.fed_opt import fed_adagrad, fed_adam, fed_yogi, server_adaptive
from fedjax_sync.algorithms.fed_sgd import fed_sgd, full_batch_gradient_update
from fedjax_sync.algorithms.federated import ClientOutput, federated_algorithm, round_metrics
from fedjax_sync.algorithms.registry import (Hyperparameters, algorithm_descriptions,
                                             algorithm_names, build_algorithm, register_algorithm)

__all__ = [
    'ClientOutput', 'Hyperparameters', 'algorithm_descriptions', 'algorithm_names',
    'build_algorithm', 'fed_adagrad', 'fed_adam', 'fed_avg', 'fed_avg_m', 'fed_prox', 'fed_sgd',
    'fed_yogi', 'federated_algorithm', 'full_batch_gradient_update', 'local_training_update',
    'register_algorithm', 'round_metrics', 'server_adaptive',
]

# Client-drift algorithms (issue #5); importing them registers them.
from fedjax_sync.algorithms.fed_gh import fed_gh  # noqa: E402
from fedjax_sync.algorithms.fed_sam import fed_sagm, fed_sam, sharpness  # noqa: E402
from fedjax_sync.algorithms.kuramoto import kuramoto_fedavg  # noqa: E402
from fedjax_sync.algorithms.scaffold import ScaffoldExtra, scaffold, scaffold_modified  # noqa: E402

__all__ += ['ScaffoldExtra', 'fed_gh', 'fed_sagm', 'fed_sam', 'kuramoto_fedavg', 'scaffold',
            'scaffold_modified', 'sharpness']

# Federated Dynamic Averaging and step-level periodic averaging (issue #6).
from fedjax_sync.algorithms.fda import (AveragingAlgorithm, AveragingResult,  # noqa: E402
                                        AveragingState, dynamic_averaging, fda, local_sgd,
                                        periodic_fed_adam, periodic_fed_avg_m, run_averaging,
                                        sample_worker_batches)
from fedjax_sync.algorithms.fda_estimators import VarianceEstimator  # noqa: E402

__all__ += ['AveragingAlgorithm', 'AveragingResult', 'AveragingState', 'VarianceEstimator',
            'dynamic_averaging', 'fda', 'local_sgd', 'periodic_fed_adam', 'periodic_fed_avg_m',
            'run_averaging', 'sample_worker_batches']

# Semi-asynchronous algorithms on the simulated clock (issue #7).
from fedjax_sync.algorithms.fed_buff import (async_local_update, fed_async,  # noqa: E402
                                             fed_buff, polynomial_staleness)
from fedjax_sync.algorithms.fed_qs import (FedQSClientState, FedQSHyperparameters,  # noqa: E402
                                           fed_qs, fed_qs_avg, fed_qs_sgd)

__all__ += ['FedQSClientState', 'FedQSHyperparameters', 'async_local_update', 'fed_async',
            'fed_buff', 'fed_qs', 'fed_qs_avg', 'fed_qs_sgd', 'polynomial_staleness']
