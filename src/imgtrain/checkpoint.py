"""CheckpointManager: save (async, atomic, verified), find the newest good one, load, keep the last N.

Layout, on a local disk or any fsspec store (``s3://``, ``gs://``)::

    <dir>/step_000001234/state.pt        everything needed to continue (torch.save of plain data)
    <dir>/step_000001234/manifest.json   written last: sha256 and size of every file

A checkpoint exists only once its manifest does and every file matches it. On a local disk the
directory is also written aside (``.tmp-*``), fsynced and published by one rename. On object stores,
which have no rename, the manifest written last is the publication. So a crash, ``kill -9`` or a full
disk at any moment leaves either the complete new checkpoint or nothing that resume would take.

Only the main rank writes: the trainer gathers rank-local state (RNG streams) into the one state dict
before saving. Loading uses ``torch.load(weights_only=True)``: a checkpoint is data, never code.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import torch

from .config import CheckpointConfig
from .errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_FILE = "state.pt"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{9,})$")


@dataclass
class SaveReport:
    step: int
    stall_s: float  # time the training loop was held: waiting for the previous save + copying state
    path: str


def snapshot(obj: Any) -> Any:
    """Deep copy with every tensor detached and copied to CPU memory, so training may go on mutating
    the originals while the copy is serialized in the background."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, snapshot(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(snapshot(v) for v in obj)
    return obj


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig, directory: str, is_writer: bool = True):
        self.cfg = cfg
        self.directory = directory.rstrip("/")
        self.is_writer = is_writer
        self.fs, self.root = fsspec.core.url_to_fs(self.directory, **cfg.storage_options)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt")
        self._pending: concurrent.futures.Future | None = None
        self.last_save_time = time.monotonic()
        self.last_published_step: int | None = None
        self.failures = 0
        self.last_write_seconds = 0.0  # of the last attempted write (monitoring)
        if is_writer:
            self.fs.makedirs(self.root, exist_ok=True)
            self._remove_stale_temporaries()

    # ---------------------------------------------------------------- public API

    def url(self, name: str) -> str:
        """A checkpoint's full location as the user would pass it to --resume."""
        if self.local:
            return os.path.join(self.root, name)
        return f"{self.directory}/{name}"

    def due(self, step: int, now: float | None = None) -> bool:
        """Whether the step- or time-based policy asks for a save after ``step``."""
        if self.cfg.save_every_steps and step % self.cfg.save_every_steps == 0:
            return True
        if self.cfg.save_interval is not None:
            now = time.monotonic() if now is None else now
            return now - self.last_save_time >= self.cfg.save_interval
        return False

    def save(self, step: int, state: dict[str, Any], blocking: bool | None = None) -> SaveReport:
        """Publish ``state`` as the checkpoint of ``step``. Returns how long the loop was held.

        Non-writer ranks return at once. With async saves, only the previous save's completion (if it
        is still running) and the copy off the device are paid here.
        """
        t0 = time.perf_counter()
        self.last_save_time = time.monotonic()
        if not self.is_writer:
            return SaveReport(step, 0.0, self.url(step_dir_name(step)))
        self.wait()
        state = snapshot(state)
        stall = time.perf_counter() - t0
        blocking = (not self.cfg.async_save) if blocking is None else blocking
        if blocking:
            self._write_and_publish(step, state)
            stall = time.perf_counter() - t0
        else:
            self._pending = self._pool.submit(self._write_and_publish, step, state)
        return SaveReport(step, stall, self.url(step_dir_name(step)))

    def wait(self) -> None:
        """Block until the background save (if any) has finished."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # errors are logged in the worker; result() only re-raises bugs

    def close(self) -> None:
        self.wait()
        self._pool.shutdown(wait=True)

    def list_checkpoints(self) -> list[tuple[int, str]]:
        """(step, name) of every published-looking checkpoint directory, newest first."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        found = []
        for e in entries:
            name = e.rstrip("/").rsplit("/", 1)[-1]
            m = _STEP_DIR.match(name)
            if m:
                found.append((int(m.group(1)), name))
        return sorted(found, reverse=True)

    def find_latest_valid(self) -> str | None:
        """Location of the newest checkpoint that verifies; corrupt ones are reported and skipped."""
        for _, name in self.list_checkpoints():
            path = self.url(name)
            try:
                verify(path, self.cfg.storage_options)
                return path
            except CheckpointError as e:
                log.warning("skipping checkpoint %s: %s", path, e)
        return None

    # ---------------------------------------------------------------- internals

    def _write_and_publish(self, step: int, state: dict[str, Any]) -> None:
        name = step_dir_name(step)
        t0 = time.perf_counter()
        try:
            buf = io.BytesIO()
            torch.save(state, buf)
            data = buf.getbuffer()
            manifest = {
                "format": FORMAT_VERSION,
                "step": step,
                "created_unix": time.time(),
                "files": {STATE_FILE: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
            }
            if self.local:
                self._publish_local(name, data, manifest)
            else:
                self._publish_remote(name, data, manifest)
            self.last_published_step = step
            log.info("checkpoint saved: %s (%.1f MB)", self.url(name), len(data) / 1e6)
            self._apply_retention()
        except Exception as e:  # noqa: BLE001 - a failed save must not kill a healthy run
            self.failures += 1
            log.error("checkpoint save of step %d failed (%s: %s); the previous checkpoints are intact",
                      step, type(e).__name__, e)
        finally:
            self.last_write_seconds = time.perf_counter() - t0

    def _publish_local(self, name: str, data: memoryview, manifest: dict) -> None:
        final = os.path.join(self.root, name)
        tmp = os.path.join(self.root, f".tmp-{name}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            _write_fsync(os.path.join(tmp, STATE_FILE), data)
            _write_fsync(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1).encode())
            _fsync_dir(tmp)
            if os.path.exists(final):
                # Same step saved twice (epoch end, then preemption): the older copy gives way.
                old = f"{final}.old-{uuid.uuid4().hex[:8]}"
                os.rename(final, old)
                os.rename(tmp, final)
                _rmtree(old)
            else:
                os.rename(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            _rmtree(tmp)
            raise

    def _publish_remote(self, name: str, data: memoryview, manifest: dict) -> None:
        final = f"{self.root}/{name}"
        self.fs.makedirs(final, exist_ok=True)  # a no-op on object stores; needed by file-like backends
        if self.fs.exists(f"{final}/{MANIFEST}"):
            self.fs.rm(f"{final}/{MANIFEST}")  # unpublish before overwriting the state
        with self.fs.open(f"{final}/{STATE_FILE}", "wb") as f:
            f.write(bytes(data))
        with self.fs.open(f"{final}/{MANIFEST}", "wb") as f:
            f.write(json.dumps(manifest, indent=1).encode())

    def _apply_retention(self) -> None:
        keep = self.cfg.keep_last_n
        valid_seen = 0
        for _, name in self.list_checkpoints():
            path = self.url(name)
            if valid_seen < keep:
                if _has_manifest(self.fs, self._fs_path(name)):
                    valid_seen += 1
                continue
            log.info("retention: removing %s (keep_last_n=%d)", path, keep)
            self.fs.rm(self._fs_path(name), recursive=True)

    def _fs_path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _remove_stale_temporaries(self) -> None:
        if not self.local:
            return
        for e in os.scandir(self.root):
            if e.name.startswith(".tmp-step_") or ".old-" in e.name:
                _rmtree(e.path)


def _has_manifest(fs, path: str) -> bool:
    return fs.exists(f"{path}/{MANIFEST}")


def _write_fsync(path: str, data) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _read_verified(path: str, storage_options: dict | None = None) -> bytes:
    fs, root = fsspec.core.url_to_fs(path.rstrip("/"), **(storage_options or {}))
    mpath = f"{root}/{MANIFEST}"
    if not fs.exists(mpath):
        raise CheckpointError(f"no {MANIFEST} (incomplete or not a checkpoint)")
    try:
        with fs.open(mpath, "rb") as f:
            manifest = json.loads(f.read())
        entry = manifest["files"][STATE_FILE]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"unreadable {MANIFEST}: {e}") from None
    spath = f"{root}/{STATE_FILE}"
    if not fs.exists(spath):
        raise CheckpointError(f"{STATE_FILE} is missing")
    with fs.open(spath, "rb") as f:
        data = f.read()
    if len(data) != entry["bytes"]:
        raise CheckpointError(f"{STATE_FILE} is truncated or padded: {len(data)} bytes, manifest says "
                              f"{entry['bytes']}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise CheckpointError(f"{STATE_FILE} is corrupt: sha256 {digest[:12]}... does not match the "
                              f"manifest's {entry['sha256'][:12]}...")
    return data


def verify(path: str, storage_options: dict | None = None) -> None:
    """Raise CheckpointError unless the checkpoint at ``path`` is complete and matches its manifest."""
    _read_verified(path, storage_options)


def load_checkpoint(path: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Verify and load a checkpoint directory (or its state.pt) as plain data, never running code."""
    path = path.rstrip("/")
    if path.endswith("/" + STATE_FILE):
        path = path[: -len(STATE_FILE) - 1]
    try:
        data = _read_verified(path, storage_options)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path}: not found ({e})") from None
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path}: cannot be loaded as plain data: {e}") from None
