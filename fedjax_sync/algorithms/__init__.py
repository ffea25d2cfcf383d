"""Federated algorithms.

Synchronous algorithms are `Algorithm(init, round)` built on `federated_algorithm`;
importing their modules registers them by name (`algorithm_names()`). Step-level
dynamic averaging (FDA) and the semi-asynchronous algorithms run on their own
drivers (`run_averaging`, `fedjax_sync.simulate.SemiAsyncSimulator`).
"""

from fedjax_sync.algorithms.fda import (AveragingAlgorithm, AveragingResult, AveragingState,
                                        dynamic_averaging, fda, local_sgd, periodic_fed_adam,
                                        periodic_fed_avg_m, run_averaging, sample_worker_batches)
from fedjax_sync.algorithms.fda_estimators import VarianceEstimator
from fedjax_sync.algorithms.fed_avg import fed_avg, fed_avg_m, fed_prox, local_training_update
from fedjax_sync.algorithms.fed_bn import fed_bn, local_part, personalized_params
# Personalization (issue 16): Ditto, FedPer, FedRep.
from fedjax_sync.algorithms.ditto import ditto, personal_model
from fedjax_sync.algorithms.fed_per import fed_per, head_part, head_paths, output_layer
from fedjax_sync.algorithms.fed_rep import fed_rep, partial_training
# Personalized and clustered (issue 16): APFL, pFedMe, Per-FedAvg, IFCA, HypCluster.
from fedjax_sync.algorithms.apfl import APFLClientState, apfl
from fedjax_sync.algorithms.hypcluster import hyp_cluster
from fedjax_sync.algorithms.ifca import (ClusterState, client_models, clustered_algorithm, ifca,
                                         initial_clusters)
from fedjax_sync.algorithms.per_fed_avg import per_fed_avg
from fedjax_sync.algorithms.pfedme import pfedme
from fedjax_sync.algorithms.fed_buff import (async_local_update, fed_async, fed_buff,
                                             polynomial_staleness)
from fedjax_sync.algorithms.fed_gh import fed_gh
from fedjax_sync.algorithms.fed_opt import fed_adagrad, fed_adam, fed_yogi, server_adaptive
from fedjax_sync.algorithms.fed_qs import (FedQSClientState, FedQSHyperparameters, fed_qs,
                                           fed_qs_avg, fed_qs_sgd)
from fedjax_sync.algorithms.fed_sam import fed_sagm, fed_sam, sharpness
from fedjax_sync.algorithms.fed_sgd import fed_sgd, full_batch_gradient_update
from fedjax_sync.algorithms.federated import (ClientOutput, Combination, federated_algorithm,
                                               round_metrics)
from fedjax_sync.algorithms.kuramoto import kuramoto_fedavg
from fedjax_sync.algorithms.registry import (Hyperparameter, Hyperparameters,
                                             algorithm_descriptions, algorithm_hyperparameters,
                                             algorithm_names, build_algorithm,
                                             hyperparameter_values, register_algorithm,
                                             resolve_hyperparameters)
from fedjax_sync.algorithms.scaffold import ScaffoldExtra, scaffold, scaffold_modified
# Fairness and client drift: q-FFL, AFL, FedNova, FedDyn, Mime/MimeLite.
from fedjax_sync.algorithms.afl import AFLExtra, afl, project_to_simplex
from fedjax_sync.algorithms.fed_dyn import FedDynExtra, fed_dyn
from fedjax_sync.algorithms.fed_nova import fed_nova
from fedjax_sync.algorithms.mime import MimeExtra, mime, mime_lite
from fedjax_sync.algorithms.q_ffl import q_ffl
# Registers fedbuff, fedasync, fedqs_sgd/avg, fda, local_sgd, periodic_fedavgm/fedadam.
from fedjax_sync.algorithms import timeline_registry  # noqa: E402,F401
from fedjax_sync.algorithms.registry import TIMELINES, algorithm_timeline  # noqa: E402

__all__ = [
    # The synchronous engine and the registry.
    'ClientOutput', 'Combination', 'Hyperparameters', 'algorithm_descriptions', 'algorithm_names',
    'build_algorithm', 'federated_algorithm', 'register_algorithm', 'round_metrics',
    'Hyperparameter', 'algorithm_hyperparameters', 'hyperparameter_values',
    'resolve_hyperparameters', 'TIMELINES', 'algorithm_timeline',
    # The FedAvg family.
    'fed_adagrad', 'fed_adam', 'fed_avg', 'fed_avg_m', 'fed_prox', 'fed_sgd', 'fed_yogi',
    'full_batch_gradient_update', 'local_training_update', 'server_adaptive',
    # Client drift.
    'ScaffoldExtra', 'fed_gh', 'fed_sagm', 'fed_sam', 'kuramoto_fedavg', 'scaffold',
    'scaffold_modified', 'sharpness',
    # Fairness and client drift (issue 16).
    'AFLExtra', 'FedDynExtra', 'MimeExtra', 'afl', 'fed_dyn', 'fed_nova', 'mime', 'mime_lite',
    'project_to_simplex', 'q_ffl',
    # Feature shift: local batch normalization (FedBN).
    'fed_bn', 'local_part', 'personalized_params',
    # Personal models and heads: Ditto, FedPer, FedRep.
    'ditto', 'fed_per', 'fed_rep', 'head_part', 'head_paths', 'output_layer',
    'partial_training', 'personal_model',
    # Personalized and clustered.
    'APFLClientState', 'ClusterState', 'apfl', 'client_models', 'clustered_algorithm',
    'hyp_cluster', 'ifca', 'initial_clusters', 'per_fed_avg', 'pfedme',
    # Federated Dynamic Averaging and periodic step-level baselines.
    'AveragingAlgorithm', 'AveragingResult', 'AveragingState', 'VarianceEstimator',
    'dynamic_averaging', 'fda', 'local_sgd', 'periodic_fed_adam', 'periodic_fed_avg_m',
    'run_averaging', 'sample_worker_batches',
    # Semi-asynchronous.
    'FedQSClientState', 'FedQSHyperparameters', 'async_local_update', 'fed_async', 'fed_buff',
    'fed_qs', 'fed_qs_avg', 'fed_qs_sgd', 'polynomial_staleness',
]
