"""Datasets, transforms and resumable sharded loading."""

from imgtrain.data.folder import DataError, ImageFolderDataset, SampleRef
from imgtrain.data.loader import DataBundle, build_data, resolve_data_root
from imgtrain.data.sampler import ShardedBatchSampler

__all__ = [
    "DataBundle",
    "DataError",
    "ImageFolderDataset",
    "SampleRef",
    "ShardedBatchSampler",
    "build_data",
    "resolve_data_root",
]
