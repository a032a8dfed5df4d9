"""Batches that arrive on the device already: on CUDA the next batch is copied (and, with GPU decode,
decoded) on a side stream while the current one computes.

The same class runs without a stream on CPU, where it only applies the batch transform one batch ahead;
that is what the unit tests exercise. On one H200 the copy was hidden: data wait 0.7% of the step (docs/decode.md).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger(__name__)


def _use_on_current_stream(batch, device: torch.device) -> None:
    """The batch's CUDA tensors were made on a side stream and are used on the current one: keep the
    allocator from reusing their memory before the current stream is done with them."""
    current = torch.cuda.current_stream(device)
    for x in batch:
        if isinstance(x, torch.Tensor) and x.device.type == "cuda":
            x.record_stream(current)


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
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            _use_on_current_stream(batch, self.device)
        self.next_batch = self._load()
        return batch

    def close(self) -> None:
        """Nothing runs in the background here (the same interface as :class:`BackgroundPrefetcher`)."""


class _End:
    pass


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class BackgroundPrefetcher:
    """GPU decode: a thread takes the loader's next batches and runs ``batch_transform`` (nvJPEG decode,
    crop, resize) and the copy on a side CUDA stream, up to ``depth`` batches ahead, while the main thread
    launches the training step. Torch ops release the GIL while they run, so the decode's host-side work
    overlaps the step's instead of sitting in front of it (measured on one H200: docs/decode.md).

    Batches come out in the loader's order. An exception in the loader or the transform is raised from
    ``next()`` in the caller's thread. :meth:`close` must be called when the caller stops early (the
    trainer does, in a ``finally``): it stops the thread, which otherwise would go on pulling batches from
    a loader the next epoch reuses."""

    def __init__(self, loader, device: torch.device, batch_transform: Callable, depth: int = 2):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        # iter() here, in the caller's thread: the DataLoader installs its SIGCHLD handler there.
        self._thread = threading.Thread(
            target=self._run, args=(iter(loader), batch_transform), name="imgtrain-prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterator, transform: Callable) -> None:
        try:
            if self.stream is not None:
                # The current device is per thread: without this, leaving the stream context would switch
                # this thread to GPU 0 and open a context there from every rank of the node.
                torch.cuda.set_device(self.device)
            for batch in it:
                if self._stop.is_set():
                    return
                if self.stream is None:
                    item = (to_device(transform(batch), self.device), None)
                else:
                    with torch.cuda.stream(self.stream):
                        out = to_device(transform(batch), self.device)
                        ready = torch.cuda.Event()
                        ready.record(self.stream)
                    item = (out, ready)
                if not self._put(item):
                    return
            self._put(_End())
        except StopIteration as e:  # from the transform: must not read as the end of the epoch
            self._put(_Failure(RuntimeError(f"GPU-decode batch transform raised StopIteration: {e!r}")))
        except BaseException as e:  # handed to the caller's thread
            self._put(_Failure(e))

    def __iter__(self) -> BackgroundPrefetcher:
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _End):
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.error
        batch, ready = item
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
            _use_on_current_stream(batch, self.device)
        return batch

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        self._done = True
        if self._thread.is_alive():
            log.warning("the GPU-decode prefetch thread did not stop within 60 s (stuck reading the loader)")


def device_batches(loader, device: torch.device, batch_transform: Callable | None = None):
    """What the trainer iterates (and closes when it stops): with a batch transform (GPU decode) a
    :class:`BackgroundPrefetcher`, on CUDA a :class:`DevicePrefetcher`, else the loader itself (on CPU
    there is nothing to overlap)."""
    if batch_transform is not None:
        return BackgroundPrefetcher(loader, device, batch_transform)
    if device.type == "cuda":
        return DevicePrefetcher(loader, device)
    return iter(loader)
