"""Datasets, transforms and resumable sharded loading."""

from .folder import DataError, ImageFolderDataset, SampleRef
from .loader import DataBundle, build_data, resolve_data_root
from .sampler import ShardedBatchSampler

__all__ = [
    "DataBundle",
    "DataError",
    "ImageFolderDataset",
    "SampleRef",
    "ShardedBatchSampler",
    "build_data",
    "resolve_data_root",
]
