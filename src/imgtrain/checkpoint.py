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

One writer per directory: a writer takes ``<dir>/writer.lock`` (a POSIX lock on a local or network file
system, a renewed lease object on object stores) for its lifetime, so a second writer (a replacement pod
starting while the evicted one still saves, or another run pointed at the same place) waits for it or
gives up with a CheckpointError naming the holder; it never deletes the holder's save in progress. Every
manifest records the run id of its writer, and a writer refuses a directory that holds another run's
checkpoints (it would resume from them, and overwrite or prune them).
"""

from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import torch

from imgtrain.config import CheckpointConfig, resolve_storage_options
from imgtrain.errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_FILE = "state.pt"
LOCK_FILE = "writer.lock"
FORMAT_VERSION = 1
LEASE_TTL_S = 60.0  # an object-store lease not renewed for this long is taken over (a killed writer's)
_CHUNK = 1 << 20  # bytes per read while hashing: memory stays flat whatever the checkpoint's size
_STEP_DIR = re.compile(r"^step_(\d{9,})$")
_OLD_DIR = re.compile(r"^(step_\d{9,})\.old-[0-9a-f]+$")


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
    def __init__(
        self, cfg: CheckpointConfig, directory: str, is_writer: bool = True, run_id: str | None = None
    ):
        self.cfg = cfg
        self.directory = directory.rstrip("/")
        self.is_writer = is_writer
        self.run_id = run_id  # recorded in every manifest; None: checkpoints of any run are taken as ours
        self.storage_options = resolve_storage_options(cfg.storage_options, "checkpoint.storage_options")
        self.fs, self.root = fsspec.core.url_to_fs(self.directory, **self.storage_options)
        self.local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt")
        self._pending: concurrent.futures.Future | None = None
        self.last_save_time = time.monotonic()
        self.last_published_step: int | None = None
        self.failures = 0
        self.last_write_seconds = 0.0  # of the last attempted write (monitoring)
        self._lock: _FileLock | _Lease | None = None
        if is_writer:
            self.fs.makedirs(self.root, exist_ok=True)
            self._lock = self._take_writer_lock()
            try:
                self._restore_interrupted_replacements()
                self._remove_stale_temporaries()
                self._refuse_other_runs()
            except BaseException:
                self._lock.release()
                raise

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
        if self._lock is not None:
            self._lock.release()
            self._lock = None

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
                verify(path, self.storage_options)
                return path
            except CheckpointError as e:
                log.warning("skipping checkpoint %s: %s", path, e)
        return None

    def load_latest(self) -> tuple[str, dict[str, Any]] | None:
        """(location, state) of the newest checkpoint that verifies, each file read once: its sha256 is
        computed while it is read (object stores) or streamed before a memory-mapped load (local files)."""
        for _, name in self.list_checkpoints():
            path = self.url(name)
            try:
                source = _fetch_verified(path, self.storage_options)
            except CheckpointError as e:
                log.warning("skipping checkpoint %s: %s", path, e)
                continue
            return path, load_plain(source, f"checkpoint {path}")
        return None

    # ---------------------------------------------------------------- internals

    def _write_and_publish(self, step: int, state: dict[str, Any]) -> None:
        name = step_dir_name(step)
        t0 = time.perf_counter()
        try:
            if self._lock is not None:
                self._lock.check()
            buf = io.BytesIO()
            torch.save(state, buf)
            data = buf.getbuffer()
            manifest = {
                "format": FORMAT_VERSION,
                "step": step,
                "created_unix": time.time(),
                "files": {STATE_FILE: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}},
            }
            if self.run_id is not None:
                manifest["run_id"] = self.run_id
            if self.local:
                self._publish_local(name, data, manifest)
            else:
                self._publish_remote(name, data, manifest)
            self.last_published_step = step
            log.info("checkpoint saved: %s (%.1f MB)", self.url(name), len(data) / 1e6)
            self._apply_retention()
        except Exception as e:  # noqa: BLE001 - a failed save must not kill a healthy run
            self.failures += 1
            log.error(
                "checkpoint save of step %d failed (%s: %s); the previous checkpoints are intact",
                step,
                type(e).__name__,
                e,
            )
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
                # Same step saved twice (epoch end, then preemption): the older copy gives way. A crash
                # between the two renames leaves only `old`: the next writer renames it back.
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
            manifest = _read_manifest(self.fs, self._fs_path(name))
            if manifest is not None and not self._owns(manifest):
                continue  # another run's: never ours to count or to delete
            path = self.url(name)
            if valid_seen < keep:
                if manifest is not None:
                    valid_seen += 1
                continue
            log.info("retention: removing %s (keep_last_n=%d)", path, keep)
            try:
                self.fs.rm(self._fs_path(name), recursive=True)
            except FileNotFoundError:
                pass  # already gone (`imgtrain checkpoints prune` run beside us)

    def _fs_path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _owns(self, manifest: dict) -> bool:
        owner = manifest.get("run_id")
        # Checkpoints written before run ids were recorded belong to whoever resumes them.
        return self.run_id is None or owner is None or owner == self.run_id

    def _take_writer_lock(self) -> _FileLock | _Lease:
        holder = {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since_unix": round(time.time(), 3),
        }
        if self.local:
            lock: _FileLock | _Lease = _FileLock(os.path.join(self.root, LOCK_FILE), holder)
        else:
            lock = _Lease(self.fs, self._fs_path(LOCK_FILE), holder, LEASE_TTL_S)
        timeout = self.cfg.lock_timeout
        deadline = time.monotonic() + timeout
        other = lock.try_acquire()
        if other is not None:
            log.warning(
                "checkpoint.dir %s is locked by another writer (%s); waiting up to %.0fs "
                "(checkpoint.lock_timeout) for it to finish",
                self.directory,
                _describe(other),
                timeout,
            )
        while other is not None:
            if time.monotonic() >= deadline:
                lock.release()
                raise CheckpointError(
                    f"checkpoint.dir {self.directory} is locked by another writer ({_describe(other)}); waited "
                    f"{timeout:.0f}s (checkpoint.lock_timeout): stop that run, or give this run its own "
                    f"checkpoint.dir"
                )
            time.sleep(min(lock.poll_s, max(deadline - time.monotonic(), 0.0)))
            other = lock.try_acquire()
        return lock

    def _restore_interrupted_replacements(self) -> None:
        """A crash between the two renames of a same-step re-save leaves ``step_X.old-*`` (the published
        copy) and ``.tmp-step_X-*`` but no ``step_X``: put the published copy back before the temporaries
        are cleaned up."""
        if not self.local:
            return
        for e in os.scandir(self.root):
            m = _OLD_DIR.match(e.name)
            final = os.path.join(self.root, m.group(1)) if m else None
            if final and not os.path.exists(final) and os.path.exists(os.path.join(e.path, MANIFEST)):
                os.rename(e.path, final)
                _fsync_dir(self.root)
                log.warning(
                    "restored %s from %s: a save of the same step was interrupted between its two renames",
                    final,
                    e.name,
                )

    def _remove_stale_temporaries(self) -> None:
        if not self.local:
            return
        for e in os.scandir(self.root):
            if e.name.startswith(".tmp-step_") or ".old-" in e.name:
                _rmtree(e.path)

    def _refuse_other_runs(self) -> None:
        """One directory, one run: another run's checkpoints here would be resumed from, and overwritten
        (same step names) or pruned by this one."""
        for _, name in self.list_checkpoints():
            manifest = _read_manifest(self.fs, self._fs_path(name))
            if manifest is not None and not self._owns(manifest):
                raise CheckpointError(
                    f"checkpoint.dir {self.directory} holds checkpoints of run '{manifest['run_id']}' "
                    f"({self.url(name)}), this is run '{self.run_id}': give this run its own checkpoint.dir "
                    f"(--resume PATH still starts from one of them), or set monitoring.run_id="
                    f"{manifest['run_id']} if it is that run"
                )


# ---------------------------------------------------------------------------------------------------
# The writer lock


def _describe(holder: dict) -> str:
    since = holder.get("since_unix")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if since else ""
    return f"run '{holder.get('run_id')}', host {holder.get('host')}, pid {holder.get('pid')}{when}"


class _FileLock:
    """``fcntl.lockf`` on the lock file, held for the writer's lifetime. A POSIX record lock belongs to the
    process: it goes away however the writer dies (kill -9 included), and the DataLoader workers forked
    from the writer do not inherit it (with flock they would hold it until they noticed their parent's
    death). NFS supports it. The file holds the holder's run id, host and pid for the message of the
    writer that has to wait."""

    poll_s = 0.2

    def __init__(self, path: str, holder: dict):
        self.path, self.holder = path, holder
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)

    def try_acquire(self) -> dict | None:
        """None once the lock is ours; else what the holder wrote (possibly nothing yet)."""
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EAGAIN):
                try:
                    return json.loads(os.pread(self.fd, 4096, 0) or b"{}")
                except ValueError:
                    return {}
            # A file system without locks (some FUSE mounts): going on unlocked beats refusing to train.
            log.warning(
                "checkpoint lock %s: %s; a second writer on this directory would not be detected",
                self.path,
                e,
            )
            return None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(self.holder).encode(), 0)
        return None

    def check(self) -> None:
        pass  # held until the process ends or releases it

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock; the stale holder text is only read while locked
            self.fd = None


class _Lease:
    """Object stores have no locks: a lease object ``{run id, host, pid, token, expires_unix}`` that its
    holder renews every ttl/3 from a thread. Another writer waits until it expires (a killed holder's
    lease lapses after ``ttl``), or takes it at once when the holder is a dead process on this very host.
    Without compare-and-swap, two writers taking an expired lease together both write it: each reads it
    back after a pause and the one whose write did not stick backs off. A holder that finds its lease
    taken (it was stopped for longer than ttl) stops saving."""

    def __init__(self, fs, path: str, holder: dict, ttl: float):
        self.fs, self.path, self.ttl = fs, path, ttl
        self.holder = {**holder, "token": uuid.uuid4().hex}
        self.poll_s = min(1.0, ttl / 10)
        self.lost: dict | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            with self.fs.open(self.path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # torn or foreign content: treated as an expired lease

    def _write(self) -> None:
        with self.fs.open(self.path, "wb") as f:
            f.write(json.dumps({**self.holder, "expires_unix": time.time() + self.ttl}).encode())

    def _ours(self, lease: dict | None) -> bool:
        return lease is not None and lease.get("token") == self.holder["token"]

    def try_acquire(self) -> dict | None:
        cur = self._read()
        if cur and not self._ours(cur) and cur.get("expires_unix", 0) > time.time() and not _dead_here(cur):
            return cur
        self._write()
        time.sleep(self.poll_s)
        cur = self._read()
        if not self._ours(cur):
            return cur or {}
        self._renewer = threading.Thread(target=self._renew, name="ckpt-lease", daemon=True)
        self._renewer.start()
        return None

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                cur = self._read()
                if not self._ours(cur):
                    self.lost = cur or {}
                    log.error(
                        "checkpoint lease %s was taken over by %s: this writer saves no more",
                        self.path,
                        _describe(self.lost),
                    )
                    return
                self._write()
            except Exception as e:  # noqa: BLE001 - a store hiccup: the next renewal may succeed
                log.warning("checkpoint lease %s: renewal failed (%s: %s)", self.path, type(e).__name__, e)

    def check(self) -> None:
        if self.lost is not None:
            raise CheckpointError(
                f"the writer lease on this checkpoint.dir was taken over by {_describe(self.lost)}"
            )

    def release(self) -> None:
        self._stop.set()
        if self._renewer is None:
            return
        self._renewer.join()
        self._renewer = None
        try:
            if self._ours(self._read()):
                self.fs.rm(self.path)
        except Exception as e:  # noqa: BLE001 - it lapses by itself after ttl
            log.warning("checkpoint lease %s: not removed (%s: %s)", self.path, type(e).__name__, e)


def _dead_here(lease: dict) -> bool:
    """Whether the lease names a process of this host that no longer exists (a killed predecessor)."""
    if lease.get("host") != socket.gethostname() or not isinstance(lease.get("pid"), int):
        return False
    try:
        os.kill(lease["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# ---------------------------------------------------------------------------------------------------
# Files


def _read_manifest(fs, path: str) -> dict | None:
    """The manifest of checkpoint directory ``path``; None if it has none or it is unreadable."""
    try:
        with fs.open(f"{path}/{MANIFEST}", "rb") as f:
            manifest = json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


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
    shutil.rmtree(path, ignore_errors=True)


def _fetch_verified(path: str, storage_options: dict | None = None, keep: bool = True) -> str | io.BytesIO:
    """Check ``path`` against its manifest; returns what torch.load should read: a local state.pt by name
    (loaded memory-mapped), or the bytes of a remote one, hashed while they were downloaded (``keep``).
    The hash is streamed in chunks: nothing else holds the whole file."""
    fs, root = fsspec.core.url_to_fs(path.rstrip("/"), **(storage_options or {}))
    mpath = f"{root}/{MANIFEST}"
    if not fs.exists(mpath):
        raise CheckpointError(f"no {MANIFEST} (incomplete or not a checkpoint)")
    try:
        with fs.open(mpath, "rb") as f:
            manifest = json.loads(f.read())
        entry = manifest["files"][STATE_FILE]
        expected_bytes, expected_sha = int(entry["bytes"]), str(entry["sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"unreadable {MANIFEST}: {e}") from None
    spath = f"{root}/{STATE_FILE}"
    if not fs.exists(spath):
        raise CheckpointError(f"{STATE_FILE} is missing")
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    sink = io.BytesIO() if keep and not local else None
    digest, size = hashlib.sha256(), 0
    with fs.open(spath, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if sink is not None:
                sink.write(chunk)
    if size != expected_bytes:
        raise CheckpointError(
            f"{STATE_FILE} is truncated or padded: {size} bytes, manifest says {expected_bytes}"
        )
    if digest.hexdigest() != expected_sha:
        raise CheckpointError(
            f"{STATE_FILE} is corrupt: sha256 {digest.hexdigest()[:12]}... does not match the "
            f"manifest's {expected_sha[:12]}..."
        )
    if sink is None:
        return spath
    sink.seek(0)
    return sink


def load_plain(source: str | io.IOBase, what: str) -> dict[str, Any]:
    """torch.load as plain data (weights_only) of a local file by name (memory-mapped) or a file object."""
    try:
        # mmap: a local state.pt is paged in as the tensors are used, and ranks on one node share the
        # page cache instead of each holding its own copy of the file's bytes.
        return torch.load(source, map_location="cpu", weights_only=True, mmap=isinstance(source, str))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{what}: cannot be loaded as plain data: {e}") from None


def verify(path: str, storage_options: dict | None = None) -> None:
    """Raise CheckpointError unless the checkpoint at ``path`` is complete and matches its manifest."""
    _fetch_verified(path, storage_options, keep=False)


def load_checkpoint(path: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Verify and load a checkpoint directory (or its state.pt) as plain data, never running code."""
    path = path.rstrip("/")
    if path.endswith("/" + STATE_FILE):
        path = path[: -len(STATE_FILE) - 1]
    try:
        source = _fetch_verified(path, storage_options)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path}: not found ({e})") from None
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    return load_plain(source, f"checkpoint {path}")
