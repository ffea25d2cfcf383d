"""fedjax-sync: a JAX functional simulator for federated learning.

Clients are a batched pytree axis: many clients' local training runs as one
compiled program under `jax.vmap`, sharded over devices; aggregators are pure
functions of the stacked client updates; algorithms are pairs of pure functions
`init(params) -> ServerState` and `round(state, client_batch, key)`.
"""

from fedjax_sync import aggregators, algorithms, clients, data, models, simulate, tree
from fedjax_sync.aggregators import Aggregator, chain, mean, weighted_mean
from fedjax_sync.algorithms import (ClientOutput, Hyperparameters, build_algorithm, fed_adagrad,
                                    fed_adam, fed_avg, fed_avg_m, fed_prox, fed_sgd, fed_yogi,
                                    federated_algorithm)
from fedjax_sync.clients import ClientExecution, client_mesh, make_local_step, make_local_training
from fedjax_sync.data import FederatedData, LocalWork, synthetic
from fedjax_sync.simulate import SimulationConfig, Simulator
from fedjax_sync.types import Algorithm, ClientBatch, ServerState

__version__ = '0.1.0'

__all__ = [
    'Aggregator', 'Algorithm', 'ClientBatch', 'ClientExecution', 'ClientOutput', 'FederatedData',
    'Hyperparameters', 'LocalWork', 'ServerState', 'SimulationConfig', 'Simulator',
    'aggregators', 'algorithms', 'build_algorithm', 'chain', 'client_mesh', 'clients', 'data',
    'fed_adagrad', 'fed_adam', 'fed_avg', 'fed_avg_m', 'fed_prox', 'fed_sgd', 'fed_yogi',
    'federated_algorithm', 'make_local_step', 'make_local_training', 'mean', 'models',
    'simulate', 'synthetic', 'tree', 'weighted_mean',
]
