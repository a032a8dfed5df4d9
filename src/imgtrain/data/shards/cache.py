"""Where a shard's bytes are read from: the shard itself on a local disk, or a node-local cached copy of a
shard on an object store (downloaded whole on first read, checked against the index's sha256, evicted
least-recently-used above a size limit).

Cache what fits, stream the rest: when the index gives the shard sizes and the dataset is larger than the
cache, only the longest run of shards (in index order) that fits is cached ("pinned": never evicted by this
dataset's own downloads). Every other shard is read sample by sample with a byte-range request to the
store, located by a table of its tar members that is built once per node by one streaming pass over the
shard and kept in the cache folder (a few bytes per sample). The sampler reads in a global random order,
so an LRU over whole shards smaller than the dataset would download a whole shard for almost every read;
pinning makes the hit rate the cached fraction of the data and keeps the rest at one read per sample.

Why not fsspec's ``filecache``/``simplecache`` or webdataset's ``FileCache``: the fsspec caches have no
size limit and keep one metadata file that concurrent processes (loader workers of several ranks on one
node) overwrite; webdataset's downloads through shell pipes without fsspec's storage options and names
files by basename only. The download itself is fsspec's ``get_file``; this module adds the per-node
lock, the checksum, the size limit and the hit/miss counts.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import fsspec
import numpy as np

log = logging.getLogger(__name__)

_TOUCH_EVERY_S = 60.0  # refresh a cached shard's mtime (its LRU age) at most this often per process


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


class ShardSource:
    """Local path of each shard of one prepared dataset; counts cache hits and misses per sample read.

    The counters live in shared memory created before the DataLoader forks its workers, so the main
    process sees the reads of all its workers.
    """

    def __init__(
        self,
        root: str,
        storage_options: dict | None = None,
        cache_dir: str | Path | None = None,
        cache_size: int = 0,
        sha256: dict[str, str] | None = None,
        sizes: dict[str, int] | None = None,
    ):
        self.root = root.rstrip("/")
        self.remote = is_remote(root)
        self.storage_options = dict(storage_options or {})
        self.sha256 = dict(sha256 or {})
        self.cache_size = cache_size
        self.cache_root = Path(cache_dir) if cache_dir is not None else None
        if self.remote:
            assert self.cache_root is not None
            # One folder per dataset URL: two datasets with equally named shards never collide.
            self.cache_dir = self.cache_root / hashlib.sha256(self.root.encode()).hexdigest()[:16]
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            _mark(self.cache_dir, self.root)
        # Shards that are cached (all of them when the sizes are not known or the dataset fits): the longest
        # prefix, in the order given, whose total size fits the cache; the rest are read by byte range.
        self.pinned: set[str] | None = None
        if self.remote and sizes is not None and sum(sizes.values()) > cache_size:
            self.pinned, total = set(), 0
            for name, size in sizes.items():
                if total + size > cache_size:
                    break
                self.pinned.add(name)
                total += size
            log.warning(
                "shard cache: the dataset (%.2f GB) is larger than data.cache.size_gb=%.2f: caching its first "
                "%d of %d shards, reading the others from %s sample by sample",
                sum(sizes.values()) / 1e9,
                cache_size / 1e9,
                len(self.pinned),
                len(sizes),
                self.root,
            )
        # sample reads from the local cache; reads that went to the store (a shard download or a byte-range
        # read); bytes downloaded
        self.counts = mp.Array("q", 3)
        self._touched: dict[str, float] = {}
        self._fs = None

    def streamed(self, name: str) -> bool:
        """Whether the shard is read by byte range from the store instead of from a cached copy."""
        return self.pinned is not None and name not in self.pinned

    def _remote(self):
        if self._fs is None:
            self._fs = fsspec.core.url_to_fs(self.root, **self.storage_options)
        return self._fs

    def read_range(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a streamed shard, straight from the store."""
        fs, root = self._remote()
        data = fs.cat_file(f"{root}/{name}", start=start, end=end)  # keywords: s3fs takes version_id second
        self._count(1, 1)
        self._count(2, len(data))
        return data

    def stream_table(self, name: str, scan: Callable[[IO[bytes]], np.ndarray]) -> np.ndarray:
        """``scan`` of a streamed shard (an array locating its samples), computed once per node by one
        sequential read of the shard and kept in the cache folder beside the cached shards."""
        path = self.cache_dir / f".{name}.table.npy"
        if not path.exists():
            with open(self.cache_dir / f".{name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not path.exists():
                    fs, root = self._remote()
                    with fs.open(f"{root}/{name}", "rb") as raw:
                        f = _Hashing(raw)
                        table = scan(f)
                        while f.read(1 << 22):  # the tar's end blocks: the checksum covers the whole file
                            pass
                    self._count(2, f.nbytes)
                    expected = self.sha256.get(name)
                    if expected is not None and f.sha.hexdigest() != expected:
                        raise OSError(
                            f"{self.root}/{name} does not match the sha256 in the index (changed or "
                            "damaged since it was prepared)"
                        )
                    tmp = path.with_name(f".{name}.{os.getpid()}.table.partial.npy")
                    np.save(tmp, table)
                    os.replace(tmp, path)
        return np.load(path)

    def local_path(self, name: str) -> str:
        if not self.remote:
            return f"{self.root}/{name}"
        path = self.cache_dir / name
        if path.exists():
            self._count(0, 1)
            now = time.monotonic()
            if now - self._touched.get(name, -_TOUCH_EVERY_S) >= _TOUCH_EVERY_S:
                self._touched[name] = now
                os.utime(path)
            return str(path)
        self._download(name, path)
        return str(path)

    def _count(self, i: int, n: int) -> None:
        with self.counts.get_lock():
            self.counts[i] += n

    def take_counts(self) -> tuple[int, int, int]:
        """(hits, misses, downloaded bytes) since the last call, and reset them."""
        with self.counts.get_lock():
            out = (self.counts[0], self.counts[1], self.counts[2])
            self.counts[0] = self.counts[1] = self.counts[2] = 0
        return out

    def _download(self, name: str, path: Path) -> None:
        # One download per node: the other workers and ranks wait on the lock, then find the file.
        with open(self.cache_dir / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path.exists():
                self._count(0, 1)
                return
            fs, root = self._remote()
            tmp = path.with_name(f".{name}.{os.getpid()}.partial")
            t0 = time.perf_counter()
            fs.get_file(f"{root}/{name}", str(tmp))
            expected = self.sha256.get(name)
            if expected is not None and _sha256(tmp) != expected:
                tmp.unlink()
                raise OSError(
                    f"{self.root}/{name} does not match the sha256 in the index (changed or "
                    "damaged since it was prepared)"
                )
            size = tmp.stat().st_size
            os.replace(tmp, path)
            self._count(1, 1)
            self._count(2, size)
            log.info(
                "shard cache: downloaded %s/%s (%.1f MB in %.1fs)",
                self.root,
                name,
                size / 1e6,
                time.perf_counter() - t0,
            )
            self._evict(keep=path)

    def _evict(self, keep: Path) -> None:
        """Delete least-recently-used shards (of all datasets cached in ``data.cache.dir``, and nothing else
        there: :func:`cached_shards`) until the cache fits its limit."""
        # This dataset's pinned shards stay: evicting one would only download it again.
        pinned = {self.cache_dir / n for n in self.pinned or ()}
        files = [p for p in cached_shards(self.cache_root) if p != keep and p not in pinned]
        sizes = {p: _size(p) for p in files}
        total = sum(sizes.values()) + keep.stat().st_size
        if total <= self.cache_size:
            return
        for p in sorted(files, key=_mtime):
            if total <= self.cache_size:
                break
            try:
                p.unlink()  # a reader holding it open keeps reading the unlinked file
            except FileNotFoundError:
                pass
            total -= sizes[p]
            log.info("shard cache: evicted %s (cache above its %.1f GB limit)", p, self.cache_size / 1e9)
        if total > self.cache_size:
            log.warning("shard cache: %s alone exceeds data.cache.size_gb=%.3f", keep, self.cache_size / 1e9)


# In each dataset folder of the cache, written when imgtrain creates (or first uses) it: eviction deletes
# files only in folders that carry it, so whatever else lives in data.cache.dir is never touched.
CACHE_MARKER = ".imgtrain-shard-cache"


def _mark(folder: Path, root: str) -> None:
    """Mark ``folder`` as the cache of dataset ``root``. A folder made by an older imgtrain gets the marker
    on first use: its name is the hash of this dataset's URL, so it is this cache's own."""
    marker = folder / CACHE_MARKER
    if marker.exists():
        return
    tmp = folder / f"{CACHE_MARKER}.{os.getpid()}.partial"
    tmp.write_text(f"imgtrain shard cache of {root}\n")
    os.replace(tmp, marker)


def cached_shards(cache_root: Path) -> list[Path]:
    """The cached shards under ``cache_root``: the files of its marked dataset folders, but not the cache's
    own hidden files (locks, sample tables, partial downloads, the marker)."""
    return [
        p
        for d in cache_root.iterdir()
        if (d / CACHE_MARKER).is_file()
        for p in d.iterdir()
        if not p.name.startswith(".") and p.is_file()
    ]


class _Hashing:
    """A read-only file wrapper that hashes what is read through it (one pass: scan and checksum)."""

    def __init__(self, f):
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        self.nbytes += len(data)
        return data


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def cache_record(epoch: int, step: int, hits: int, misses: int, nbytes: int) -> dict:
    """The per-epoch cache report (summed over ranks): logged, and returned for metrics.jsonl."""
    reads = hits + misses
    rate = hits / reads if reads else 0.0
    log.info(
        "shard cache, epoch %d: %d sample reads, %d from the local cache, %d from the object store "
        "(a shard download or a byte-range read; %.1f MB); hit rate %.1f%%",
        epoch,
        reads,
        hits,
        misses,
        nbytes / 1e6,
        100 * rate,
    )
    return {
        "event": "shard_cache",
        "epoch": epoch,
        "step": step,
        "cache_hits": hits,
        "cache_misses": misses,
        "cache_hit_rate": rate,
        "downloaded_bytes": nbytes,
    }
