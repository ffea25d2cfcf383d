"""fedjax-sync: a JAX functional simulator for federated learning.

Clients are a batched pytree axis: many clients' local training runs as one
compiled program under `jax.vmap`, sharded over devices; aggregators are pure
functions of the stacked client updates; algorithms are pairs of pure functions
`init(params) -> ServerState` and `round(state, client_batch, key)`.
"""

from fedjax_sync import (aggregators, algorithms, clients, communication, data, models,
                         reporting, simulate, tree)
from fedjax_sync.aggregators import Aggregator, chain, mean, weighted_mean
from fedjax_sync.algorithms import (ClientOutput, Hyperparameters, build_algorithm, fed_adagrad,
                                    fed_adam, fed_avg, fed_avg_m, fed_bn, fed_buff, fed_gh, fed_prox,
                                    fed_qs_avg, fed_qs_sgd, fed_sagm, fed_sam, fed_sgd, fed_yogi,
                                    federated_algorithm, kuramoto_fedavg, run_averaging,
                                    scaffold)
from fedjax_sync.clients import ClientExecution, client_mesh, make_local_step, make_local_training
from fedjax_sync.data import FederatedData, LocalWork, synthetic
from fedjax_sync.simulate import (AveragingSimulator, SemiAsyncSimulator, SimulationConfig,
                                  Simulator, Sweep, drive)
from fedjax_sync.types import Algorithm, ClientBatch, ServerState

__version__ = '0.1.0'

__all__ = [
    # Types.
    'Aggregator', 'Algorithm', 'ClientBatch', 'ClientExecution', 'ClientOutput', 'FederatedData',
    'Hyperparameters', 'LocalWork', 'ServerState', 'SimulationConfig',
    # Subpackages.
    'aggregators', 'algorithms', 'clients', 'communication', 'data', 'models', 'reporting',
    'simulate', 'tree',
    # Engine.
    'build_algorithm', 'chain', 'client_mesh', 'federated_algorithm', 'make_local_step',
    'make_local_training', 'mean', 'synthetic', 'weighted_mean',
    # The one driver and its timelines.
    'AveragingSimulator', 'SemiAsyncSimulator', 'Simulator', 'Sweep', 'drive', 'run_averaging',
    # Algorithms.
    'fed_adagrad', 'fed_adam', 'fed_avg', 'fed_avg_m', 'fed_bn', 'fed_buff', 'fed_gh', 'fed_prox',
    'fed_qs_avg', 'fed_qs_sgd', 'fed_sagm', 'fed_sam', 'fed_sgd', 'fed_yogi', 'kuramoto_fedavg',
    'scaffold',
]
