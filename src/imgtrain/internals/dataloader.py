"""Stopping a DataLoader's persistent workers now, not at garbage collection: torch has no public call
for it, so this reaches into the loader's private iterator (``_iterator._shutdown_workers``)."""

from __future__ import annotations

from torch.utils.data import DataLoader

PRIVATE_SYMBOL = "torch.utils.data.DataLoader._iterator / _MultiProcessingDataLoaderIter._shutdown_workers"


def shutdown_workers(loader: DataLoader) -> None:
    """Stop ``loader``'s worker processes (persistent or not) and forget its iterator."""
    it = getattr(loader, "_iterator", None)
    if it is not None:
        it._shutdown_workers()
    loader._iterator = None
