"""A DataLoader's worker processes: stopping persistent ones now, not at garbage collection, and naming
them (benchmarks count their CPU time). torch has no public call for either, so this reaches into the
loader's private iterator (``_iterator``, its ``_workers`` and ``_shutdown_workers``)."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import DataLoader

PRIVATE_SYMBOL = (
    "torch.utils.data.DataLoader._iterator / _MultiProcessingDataLoaderIter._shutdown_workers, ._workers"
)


def shutdown_workers(loader: DataLoader) -> None:
    """Stop ``loader``'s worker processes (persistent or not) and forget its iterator."""
    it = getattr(loader, "_iterator", None)
    if it is not None:
        it._shutdown_workers()
    loader._iterator = None


def worker_pids(iterator: Iterator) -> list[int]:
    """Process ids of the workers of ``iterator`` (``iter(loader)`` of a loader with ``num_workers > 0``)."""
    return [w.pid for w in iterator._workers]
