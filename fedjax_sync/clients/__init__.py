"""Client-side computation: local steps, local runs, SAM-type local optimizers, execution."""

from fedjax_sync.clients.conv_rewrite import keep_convolutions, loop_friendly_convolutions
from fedjax_sync.clients.execution import (STRATEGIES, ClientExecution, client_mesh,
                                           map_clients, map_reduce_clients, replicate,
                                           resolve_strategy, shard_client_axis)
from fedjax_sync.clients.local import (StepMetrics, make_local_step, make_local_training,
                                       masked_mean)
from fedjax_sync.clients.sam import SharpnessAwareState, sagm, sam

__all__ = ['STRATEGIES', 'ClientExecution', 'SharpnessAwareState', 'StepMetrics', 'client_mesh',
           'keep_convolutions', 'loop_friendly_convolutions', 'make_local_step',
           'make_local_training', 'map_clients', 'map_reduce_clients',
           'masked_mean', 'replicate', 'resolve_strategy', 'sagm', 'sam', 'shard_client_axis']
