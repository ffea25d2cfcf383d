"""Client-side computation: local steps, local runs and their execution."""

from fedjax_sync.clients.execution import (STRATEGIES, ClientExecution, client_mesh,
                                           map_clients, replicate, shard_client_axis)
from fedjax_sync.clients.local import (StepMetrics, make_local_step, make_local_training,
                                       masked_mean)

__all__ = ['STRATEGIES', 'ClientExecution', 'StepMetrics', 'client_mesh', 'make_local_step',
           'make_local_training', 'map_clients', 'masked_mean', 'replicate', 'shard_client_axis']
