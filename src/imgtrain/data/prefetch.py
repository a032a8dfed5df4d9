"""Batches that arrive on the device already: on CUDA the next batch is copied (and, with GPU decode,
decoded) on a side stream while the current one computes.

The same class runs without a stream on CPU, where it only applies the batch transform one batch ahead;
that is what the unit tests exercise. On one H200 the copy was hidden: data wait 0.7% of the step (docs/decode.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


def to_device(batch, device: torch.device):
    """Tensors of a (images, labels, weights, bad paths) batch to ``device``, non-blocking (the loader
    pins them on CUDA, so the copy is asynchronous)."""
    return tuple(x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x for x in batch)


class DevicePrefetcher:
    """Iterates ``loader``'s batches moved to ``device`` (after ``batch_transform``, if any, which receives
    the batch as the loader made it). One batch is always in flight ahead of the caller."""

    def __init__(self, loader, device: torch.device, batch_transform: Callable | None = None):
        self.it: Iterator = iter(loader)
        self.device = device
        self.transform = batch_transform
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.next_batch = self._load()

    def _load(self):
        try:
            batch = next(self.it)
        except StopIteration:
            return None
        if self.stream is None:
            return to_device(self.transform(batch) if self.transform else batch, self.device)
        with torch.cuda.stream(self.stream):
            return to_device(self.transform(batch) if self.transform else batch, self.device)

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self):
        batch = self.next_batch
        if batch is None:
            raise StopIteration
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for x in batch:
                if isinstance(x, torch.Tensor) and x.device.type == "cuda":
                    # Made on the side stream, used on the current one: keep the allocator from reusing
                    # the memory before the current stream is done with it.
                    x.record_stream(current)
        self.next_batch = self._load()
        return batch


def device_batches(loader, device: torch.device, batch_transform: Callable | None = None):
    """What the trainer iterates: a :class:`DevicePrefetcher` on CUDA or with a batch transform (GPU
    decode), else the loader itself (on CPU there is nothing to overlap)."""
    if device.type == "cuda" or batch_transform is not None:
        return DevicePrefetcher(loader, device, batch_transform)
    return iter(loader)
