"""Shared memory for DataLoader workers: each worker hands its decoded batches to the training process
through /dev/shm, and containers get 64 MiB of it unless told otherwise (Docker ``--shm-size``, a
Kubernetes ``emptyDir`` with ``medium: Memory`` at /dev/shm). Too little shows up much later as a worker
killed by SIGBUS ("DataLoader worker ... is killed by signal: Bus error"), so the need is checked at start.
"""

from __future__ import annotations

import logging
import os
import shutil

from imgtrain.config import DataConfig
from imgtrain.data.folder import DataError

log = logging.getLogger(__name__)

SHM_PATH = "/dev/shm"


def shared_memory_need(cfg: DataConfig, batch_size: int, local_processes: int) -> int:
    """Bytes of /dev/shm the training loaders of this node hold at most: every worker of every process on
    the node keeps ``prefetch_factor`` uint8 batches (3 x image_size^2 per image) in flight."""
    if cfg.workers == 0:
        return 0
    batch_bytes = batch_size * 3 * cfg.image_size * cfg.image_size
    return local_processes * cfg.workers * cfg.prefetch_factor * batch_bytes


def check_shared_memory(cfg: DataConfig, batch_size: int, path: str = SHM_PATH) -> None:
    """Raise DataError when ``path`` has less free space than the loaders need; warn under twice that."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need = shared_memory_need(cfg, batch_size, local)
    if need == 0 or not os.path.isdir(path):
        return
    free = shutil.disk_usage(path).free
    what = (
        f"{cfg.workers} workers (data.workers) x {cfg.prefetch_factor} batches (data.prefetch_factor) x "
        f"{batch_size} images of 3x{cfg.image_size}x{cfg.image_size} bytes x {local} process(es) on this "
        f"node = {need / 2**20:.0f} MiB"
    )
    if free < need:
        raise DataError(
            f"{path} has {free / 2**20:.0f} MiB free, the data loaders need about {what}. Give "
            f"the container more shared memory (docker run --shm-size=16g; Kubernetes: an emptyDir "
            f"with medium: Memory mounted at /dev/shm) or lower data.workers / "
            f"data.prefetch_factor"
        )
    if free < 2 * need:
        log.warning(
            "%s has %.0f MiB free, close to what the data loaders need (%s): raise --shm-size if "
            "workers die with a bus error",
            path,
            free / 2**20,
            what,
        )
