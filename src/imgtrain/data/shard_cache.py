"""Where a shard's bytes are read from: the shard itself on a local disk, or a node-local cached copy of a
shard on an object store (downloaded whole on first read, checked against the index's sha256, evicted
least-recently-used above a size limit).

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
from pathlib import Path

import fsspec

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
        self.counts = mp.Array("q", 3)  # sample reads from the local cache, reads that downloaded, bytes
        self._touched: dict[str, float] = {}
        self._fs = None

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
            if self._fs is None:
                self._fs = fsspec.core.url_to_fs(self.root, **self.storage_options)
            fs, root = self._fs
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
        """Delete least-recently-used shards (all datasets in the cache) until the cache fits its limit."""
        files = [p for p in self.cache_root.glob("*/*.tar") if p != keep]
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
            log.warning("shard cache: %s alone exceeds data.cache_size_gb=%.3f", keep, self.cache_size / 1e9)


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
        "shard cache, epoch %d: %d sample reads, %d from the local cache, %d downloaded a shard "
        "(%.1f MB); hit rate %.1f%%",
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
