"""Build the train/val datasets and DataLoaders for one rank."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from imgtrain.config import DataConfig
from imgtrain.data.decode.gpu import GpuBatchDecoder, GpuTrainPlan, check_gpu_decode, gpu_collate
from imgtrain.data.embedded import ensure_digits
from imgtrain.data.folder import DataError, ImageFolderDataset, SampleRef, collate, scan_classes
from imgtrain.data.sampler import ShardedBatchSampler, eval_shard
from imgtrain.data.shm import check_shared_memory
from imgtrain.data.transforms import eval_transform, train_transform
from imgtrain.fault import ignore_stop_signals, stop_signals_blocked

if TYPE_CHECKING:
    from imgtrain.data.shards.cache import ShardSource

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    classes: list[str]
    train_set: ImageFolderDataset  # or shards.ShardDataset (same interface)
    val_set: ImageFolderDataset
    train_sampler: ShardedBatchSampler
    train_loader: DataLoader
    val_loader: DataLoader
    train_batch_transform: Callable | None = None
    """Applied to each training batch in the main process before it is used (GPU decode), or None."""
    cache: ShardSource | None = None  # shards on an object store: the node-local cache, for its hit counts

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def resolve_data_root(cfg: DataConfig) -> Path:
    if cfg.root is None:
        return ensure_digits()
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root does not exist or is not a directory: {root}")
    return root


class WorkerLoader(DataLoader):
    """A DataLoader that leaves the training process's RNG streams and stop signals to it.

    * Its own generator: without one, every ``iter()`` draws the workers' base seed from the global torch
      generator, so a run resumed mid-epoch (one ``iter()`` more than an uninterrupted run) would go on
      with another global stream than the uninterrupted run (MixUp/CutMix draw from it). The base seed
      does not decide any sample: each one is decoded under its own seed (folder.sample_rng_scope).
    * Its worker processes leave SIGTERM/SIGINT to the training process (``worker_init_fn``), and the
      signals are held pending while they are forked, so that none reaches a worker before that. The
      training process saves at preemption, then shuts them down as usual (fault.ignore_stop_signals)."""

    def __init__(self, dataset, **kw) -> None:
        kw.setdefault("generator", torch.Generator())
        if kw.get("num_workers", 0) > 0:
            kw["worker_init_fn"] = ignore_stop_signals
        super().__init__(dataset, **kw)

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        with stop_signals_blocked():  # the workers are forked here (each epoch without persistent workers)
            return super().__iter__()


def _loader_kwargs(cfg: DataConfig, device: torch.device) -> dict:
    kw: dict = {
        "num_workers": cfg.workers,
        "collate_fn": collate,
        "pin_memory": cfg.pin_memory and device.type == "cuda",
    }
    if cfg.workers > 0:
        kw["prefetch_factor"] = cfg.prefetch_factor
        kw["persistent_workers"] = cfg.persistent_workers
    return kw


class _RefList(torch.utils.data.Sampler):
    def __init__(self, indices: list[int]):
        self.indices = indices

    def __iter__(self):
        return (SampleRef(i) for i in self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_data(
    cfg: DataConfig,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device,
    eval_batch_size: int | None = None,
) -> DataBundle:
    check_gpu_decode(cfg, device)
    gpu = cfg.decode.device != "cpu"  # gpu or dali
    # GPU decode: the workers only read the bytes and draw the crops; the batch is decoded on the device.
    train_tf = GpuTrainPlan(cfg) if gpu else train_transform(cfg)
    if cfg.format == "shards":
        from imgtrain.data.shards.dataset import build_shard_sets

        train_set, val_set, cache = build_shard_sets(cfg, train_tf, eval_transform(cfg), seed)
        return _bundle(
            cfg,
            train_set,
            val_set,
            batch_size,
            rank,
            world_size,
            seed,
            device,
            eval_batch_size,
            cache if cache.remote else None,
        )
    root = resolve_data_root(cfg)
    train_classes = scan_classes(root / "train")
    val_classes = scan_classes(root / "val")
    classes = train_classes
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        msg = (
            f"class folders differ between {root / 'train'} and {root / 'val'}: "
            f"only in train: {only_train[:10]}, only in val: {only_val[:10]}"
        )
        if not cfg.allow_empty_classes:
            raise DataError(f"{msg} (data.allow_empty_classes=true takes the union)")
        log.warning("%s: data.allow_empty_classes=true, training on the union of both", msg)
        classes = sorted(set(train_classes) | set(val_classes))
    train_set = ImageFolderDataset(root / "train", classes, train_tf, seed=seed, image_size=cfg.image_size)
    val_set = ImageFolderDataset(
        root / "val", classes, eval_transform(cfg), seed=seed, image_size=cfg.image_size
    )
    check_class_counts(classes, [train_set, val_set], cfg.allow_empty_classes)
    return _bundle(cfg, train_set, val_set, batch_size, rank, world_size, seed, device, eval_batch_size)


def check_class_counts(classes: list[str], splits: list[ImageFolderDataset], allow_empty: bool) -> None:
    """A class without images in a split is a data error (an empty folder trains silently otherwise: a
    class the model never sees, or one evaluation never measures), unless data.allow_empty_classes."""
    for ds in splits:
        counts = Counter(label for _, label in ds.samples)
        empty = [c for i, c in enumerate(classes) if counts[i] == 0]
        if not empty:
            continue
        msg = (
            f"{len(empty)} of {len(classes)} classes have no images in {ds.split_dir}: "
            f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}"
        )
        if not allow_empty:
            raise DataError(f"{msg} (data.allow_empty_classes=true goes on without them)")
        log.warning("%s (data.allow_empty_classes=true)", msg)


def _bundle(
    cfg: DataConfig,
    train_set,
    val_set,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device,
    eval_batch_size: int | None,
    cache=None,
) -> DataBundle:
    gpu = cfg.decode.device != "cpu"  # gpu or dali
    sampler = ShardedBatchSampler(len(train_set), batch_size, rank, world_size, seed)
    check_shared_memory(cfg, batch_size)
    kw = _loader_kwargs(cfg, device)
    train_kw = kw | {"collate_fn": gpu_collate} if gpu else kw
    train_loader = WorkerLoader(train_set, batch_sampler=sampler, **train_kw)
    val_loader = WorkerLoader(
        val_set,
        batch_size=eval_batch_size or batch_size,
        sampler=_RefList(eval_shard(len(val_set), rank, world_size)),
        **kw,
    )
    log.info(
        "data: %s, %d classes, %d train / %d val images",
        train_set.split_dir,
        len(train_set.classes),
        len(train_set),
        len(val_set),
    )
    return DataBundle(
        train_set.classes,
        train_set,
        val_set,
        sampler,
        train_loader,
        val_loader,
        _batch_decoder(cfg, device, batch_size) if gpu else None,
        cache,
    )


def _batch_decoder(cfg: DataConfig, device: torch.device, batch_size: int) -> GpuBatchDecoder:
    if cfg.decode.device == "dali":
        from imgtrain.data.decode.dali import DaliBatchDecoder

        return DaliBatchDecoder(cfg.image_size, device, batch_size)
    return GpuBatchDecoder(cfg.image_size, device)
