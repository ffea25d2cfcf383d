"""Federated data: the container, partitioners, synthetic data and batching."""

from fedjax_sync.data.batching import (DeviceData, LocalWork, client_batch_from_arrays,
                                       make_client_batch, pad_clients, poisson_max_clients,
                                       poisson_sample_clients, sample_clients, to_device)
from fedjax_sync.data.digits import digits
from fedjax_sync.data.federated import FederatedData, from_client_indices
from fedjax_sync.data.files import FORMATS, describe, detect_format, load_path
from fedjax_sync.data.idx import fashion_mnist, idx_dataset, read_idx
from fedjax_sync.data.npz import PARTITIONS, from_arrays, load_npz, partition_labels, repartition
from fedjax_sync.data.partition import dirichlet_partition, iid_partition, shard_partition
from fedjax_sync.data.stackoverflow import generated_stackoverflow
from fedjax_sync.data.synthetic import synthetic
from fedjax_sync.data.tfds import TFDS_DATASETS, tfds_dataset

__all__ = [
    'FORMATS', 'PARTITIONS', 'TFDS_DATASETS', 'describe', 'detect_format', 'digits',
    'fashion_mnist', 'idx_dataset', 'load_path', 'read_idx', 'from_arrays', 'load_npz',
    'partition_labels', 'repartition', 'tfds_dataset', 'generated_stackoverflow',
    'DeviceData', 'FederatedData', 'LocalWork', 'client_batch_from_arrays', 'dirichlet_partition',
    'from_client_indices', 'iid_partition', 'make_client_batch', 'pad_clients',
    'poisson_max_clients', 'poisson_sample_clients', 'sample_clients',
    'shard_partition', 'synthetic', 'to_device',
]
