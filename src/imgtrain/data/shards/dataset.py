"""Map-style dataset over prepared shards (`imgtrain prepare`): random access into WebDataset tar files.

Sample ``i`` of a split is found from the index's per-shard counts; inside the shard, its members are
located once per process by reading the tar headers (no per-sample table in the index, which would cost
hundreds of MB per loader worker at ImageNet scale). Because the dataset is indexable, the same
ShardedBatchSampler as the ImageFolder path drives it: exactly once per epoch across ranks and workers,
an order that is a function of (seed, epoch), and a mid-epoch position that is one number, so resume is
exact. Decoding, augmentation seeding and the bad-sample contract are the ImageFolder dataset's.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import fsspec
import numpy as np
import torch

from imgtrain.config import DataConfig, resolve_storage_options
from imgtrain.data.decode.cpu import create_decoder, decode_full
from imgtrain.data.embedded import default_data_home
from imgtrain.data.folder import DataError, SampleRef, blank, load_batch, sample_rng_scope
from imgtrain.data.shards.cache import ShardSource
from imgtrain.data.shards.prepare import INDEX_FORMAT, INDEX_NAME

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_MAX_OPEN_SHARDS = 256  # per process; all are closed when a process would open more


def _decode_sample(
    data, transform: Callable | None, decoder, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Encoded image bytes -> the uint8 CHW training tensor (into ``out`` when given), through the
    ImageFolder path's decoding transform (so a shard sample equals the folder sample it was made from,
    bit for bit)."""
    data = bytes(data)
    if transform is None:
        return decode_full(decoder, data)
    return transform(data) if out is None else transform(data, out)


def load_index(root: str, storage_options: dict | None = None) -> dict:
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    url = f"{root.rstrip('/')}/{INDEX_NAME}"
    try:
        with fs.open(f"{path.rstrip('/')}/{INDEX_NAME}", "rb") as f:
            index = json.loads(f.read())
    except FileNotFoundError:
        raise DataError(
            f"data.format=shards but there is no {url}: data.root must be the output of "
            "`imgtrain prepare` (an unfinished prepare publishes no index; rerun it)"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {url}: {e}") from None
    if index.get("format") != INDEX_FORMAT:
        raise DataError(
            f"{url} is not an imgtrain shard index (format {index.get('format')!r}, "
            f"expected {INDEX_FORMAT!r})"
        )
    for split in index.get("splits", {}).values():
        for shard in split.get("shards", []):
            name = shard.get("name")
            if not _plain_name(name):
                raise DataError(
                    f"{url} names a shard {name!r}: a shard name must be a plain file name (no '/' or '\\', "
                    "not starting with '.'), it is joined to data.root and to the cache folder"
                )
    return index


def _plain_name(name) -> bool:
    """A file name that stays in the folder it is joined to: not absolute, no ``..``, no separator, and not
    hidden (the cache keeps its lock, table and partial files under hidden names beside the shards)."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and not name.startswith(".")
        and not any(c in name for c in "/\\\0")
    )


@dataclass
class _ShardTable:
    """Where each sample of one shard lies in its tar file: bytes [start, end) hold its .cls member's
    data, the image member's header and data; the image data starts at ``img`` and is ``img_size`` long."""

    start: np.ndarray
    end: np.ndarray
    img: np.ndarray
    img_size: np.ndarray
    cls: np.ndarray  # offset of the .cls data
    cls_size: np.ndarray

    def array(self) -> np.ndarray:
        return np.stack([self.start, self.end, self.img, self.img_size, self.cls, self.cls_size], axis=1)

    @classmethod
    def from_array(cls, a: np.ndarray) -> _ShardTable:
        return cls(*(a[:, i].copy() for i in range(6)))


def scan_shard(path: str | IO[bytes]) -> _ShardTable:
    """Group the members of a WebDataset tar by key (the name up to the first dot of its base name). A file
    object is read once from start to end (a stream from an object store)."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    kw = {"name": path, "mode": "r:"} if isinstance(path, str) else {"fileobj": path, "mode": "r|"}
    with tarfile.open(**kw) as tf:
        for m in tf:
            if not m.isfile():
                continue
            d, _, base = m.name.rpartition("/")
            stem, _, ext = base.partition(".")
            groups.setdefault(f"{d}/{stem}" if d else stem, {})[ext.lower()] = m
    rows = []
    for key, members in groups.items():
        img = next((members[e] for e in IMAGE_EXTS if e in members), None)
        cls = members.get("cls")
        if img is None or cls is None:
            where = path if isinstance(path, str) else getattr(path, "path", "a shard stream")
            raise DataError(f"{where}: sample {key!r} lacks an image or a .cls member ({sorted(members)})")
        first = min(img.offset, cls.offset)
        rows.append(
            (
                first,
                max(img.offset_data + img.size, cls.offset_data + cls.size),
                img.offset_data,
                img.size,
                cls.offset_data,
                cls.size,
            )
        )
    return _ShardTable.from_array(np.array(rows, dtype=np.int64).reshape(-1, 6))


class ShardDataset(torch.utils.data.Dataset):
    """One split of a prepared dataset -> (uint8 CHW tensor, label, weight, bad sample or ""), exactly
    as :class:`~imgtrain.data.folder.ImageFolderDataset` (same seeding, same bad-sample handling)."""

    def __init__(
        self,
        source: ShardSource,
        index: dict,
        split: str,
        transform: Callable | None,
        seed: int = 0,
        image_size: int = 224,
    ):
        splits = index.get("splits", {})
        if split not in splits:
            raise DataError(
                f"{source.root}/{INDEX_NAME} has no '{split}' split (it has: "
                f"{', '.join(sorted(splits)) or 'none'}); prepare it with "
                f"`imgtrain prepare SRC {source.root} --split {split}`"
            )
        shards = [s for s in splits[split]["shards"] if s["count"] > 0]
        if not shards:
            raise DataError(f"the '{split}' split of {source.root} holds no samples")
        self.source = source
        self.classes: list[str] = list(index["classes"])
        self.split_dir = f"{source.root} ({split} split)"  # named in error messages
        self.names = [s["name"] for s in shards]
        self.counts = [int(s["count"]) for s in shards]
        self.starts = np.cumsum([0, *self.counts[:-1]]).tolist()
        self.transform = transform
        self.decoder = create_decoder("pil")  # only without a transform (full-size decode)
        self.seed = seed
        self.image_size = image_size
        self._tables: dict[int, _ShardTable] = {}  # per process: built on first access to a shard
        self._fds: dict[str, int] = {}  # open shard files of this process (pread: no shared file offset)
        self._fds_pid = os.getpid()

    def __len__(self) -> int:
        return self.starts[-1] + self.counts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, position in the shard) of a sample."""
        s = bisect.bisect_right(self.starts, index) - 1
        return s, index - self.starts[s]

    def _table(self, s: int, path: str | None = None) -> _ShardTable:
        """Where the samples of shard ``s`` lie: scanned from ``path`` (a local copy), or for a shard read
        by byte range, from the table the source keeps for it."""
        t = self._tables.get(s)
        if t is None:
            if path is None:
                t = _ShardTable.from_array(
                    self.source.stream_table(self.names[s], lambda f: scan_shard(f).array())
                )
                path = f"{self.source.root}/{self.names[s]}"
            else:
                t = scan_shard(path)
            if len(t.start) != self.counts[s]:
                raise DataError(f"{path} holds {len(t.start)} samples, the index says {self.counts[s]}")
            self._tables[s] = t
        return t

    def _fd(self, path: str) -> int:
        """A read-only descriptor of ``path`` kept open in this process (an open and a close per sample cost
        as much as the read). Loader workers inherit the parent's dict on fork: they open their own."""
        if self._fds_pid != os.getpid():
            self._fds, self._fds_pid = {}, os.getpid()
        fd = self._fds.get(path)
        if fd is None:
            if len(self._fds) >= _MAX_OPEN_SHARDS:
                for old in self._fds.values():
                    os.close(old)
                self._fds.clear()
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read(self, index: int) -> tuple[bytes, int]:
        """The stored image bytes and the label of a sample."""
        s, k = self.locate(index)
        if self.source.streamed(self.names[s]):  # not cached (larger than the cache): one range read
            t = self._table(s)
            start = int(t.start[k])
            buf = self.source.read_range(self.names[s], start, int(t.end[k]))
            i, c = int(t.img[k]) - start, int(t.cls[k]) - start
            return buf[i : i + int(t.img_size[k])], self._label(buf[c : c + int(t.cls_size[k])])
        for attempt in range(2):
            path = self.source.local_path(self.names[s])
            try:
                t = self._table(s, path)
                start = int(t.start[k])
                buf = os.pread(self._fd(path), int(t.end[k]) - start, start)
                break
            except FileNotFoundError:
                if attempt:  # evicted from the cache between the lookup and the open: fetch it again
                    raise
        i, c = int(t.img[k]) - start, int(t.cls[k]) - start
        return buf[i : i + int(t.img_size[k])], self._label(buf[c : c + int(t.cls_size[k])])

    def _label(self, raw: bytes) -> int:
        """A sample's .cls member as a class index; anything else makes the sample a bad one (an index out
        of range would fail the whole step, and an exact resume would repeat it until restarts run out)."""
        try:
            label = int(raw)
        except ValueError:
            raise ValueError(f"label {bytes(raw[:20])!r} is not a class index") from None
        if not 0 <= label < len(self.classes):
            raise ValueError(
                f"label {label} is not a class index (the index lists {len(self.classes)} classes)"
            )
        return label

    def __getitem__(self, ref: SampleRef | int):
        return self.load(ref if isinstance(ref, SampleRef) else SampleRef(int(ref)))

    def __getitems__(self, refs: list[SampleRef]):
        return load_batch(self, refs)

    def load(self, ref: SampleRef, out: torch.Tensor | None = None):
        """One sample; its image written into ``out`` (a batch slot) when given."""
        label = 0
        with sample_rng_scope():
            # The ImageFolder dataset's seed: a sample's crop depends on (seed, epoch, index) only. Only the
            # CPU generator (the one the transforms draw from): torch.manual_seed also queues lazy seeds
            # for CUDA/XPU/MTIA, formatting a stack trace for each, ~4 ms per sample on a busy core.
            torch.default_generator.manual_seed((self.seed * 1_000_003 + ref.epoch) * 10_000_019 + ref.index)
            try:
                data, label = self.read(ref.index)
                img = _decode_sample(data, self.transform, self.decoder, out)
            except Exception as e:  # noqa: BLE001 - any unreadable sample is a bad one, by design
                where = self.describe(ref.index)
                log.warning("skipping unreadable sample %s: %s", where, e)
                return blank(self.image_size, out), label, 0.0, where
        return img, label, ref.weight, ""

    def describe(self, index: int) -> str:
        """``<shard URL>:<member name>`` of a sample, for messages (reads the tar headers again)."""
        s, k = self.locate(index)
        url = f"{self.source.root}/{self.names[s]}"
        if self.source.streamed(self.names[s]):  # listing the member names would read the whole shard
            return f"{url}:sample {k}"
        try:
            with tarfile.open(self.source.local_path(self.names[s]), "r:") as tf:
                names = [m.name for m in tf if m.isfile() and not m.name.endswith(".cls")]
            return f"{url}:{names[k]}"
        except Exception:  # noqa: BLE001 - a shard too damaged to list: name the sample by position
            return f"{url}:sample {k}"


def build_shard_sets(
    cfg: DataConfig, train_transform: Callable, eval_transform: Callable, seed: int
) -> tuple[ShardDataset, ShardDataset, ShardSource]:
    assert cfg.root is not None
    root = cfg.root if "://" in cfg.root else str(Path(cfg.root).expanduser())
    options = resolve_storage_options(cfg.storage_options, "data.storage_options")
    index = load_index(root, options)
    shards = [s for sp in index["splits"].values() for s in sp["shards"]]
    sha = {s["name"]: s["sha256"] for s in shards}
    sizes = {s["name"]: int(s["bytes"]) for s in shards}
    cache_dir = cfg.cache.dir or default_data_home() / "shard-cache"
    source = ShardSource(root, options, cache_dir, int(cfg.cache.size_gb * 1e9), sha, sizes)
    train = ShardDataset(source, index, "train", train_transform, seed, cfg.image_size)
    val = ShardDataset(source, index, "val", eval_transform, seed, cfg.image_size)
    return train, val, source
