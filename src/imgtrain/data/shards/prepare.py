"""`imgtrain prepare`: an ImageFolder tree -> WebDataset tar shards plus an index, locally or on an object store.

Layout written to DST (a folder or an fsspec URL such as s3://bucket/imagenet):

    train-000000.tar ...     WebDataset layout: <key>.cls (the class index as text) and <key>.jpg/.png
    train-000000.tar.json    per-shard record (sample count, sha256, skipped files, the plan it was made from)
    val-000000.tar ...
    index.json               published last: classes, settings, per split its shards (count, sha256, bytes)
                             and every skipped source file with the reason

Shard membership is fixed before any image is read: the split's files in the ImageFolder scan order
(classes sorted, files sorted) are cut into runs of ``samples_per_shard`` source files. A rerun therefore
plans the same shards, keeps each one whose record and checksum still match, and rewrites only the missing,
partial or corrupt ones. Sample ``i`` of a split is the ImageFolder dataset's sample ``i`` (when no file
was skipped), so training on shards sees the same images in the same order as training on the folder.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import secrets
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import fsspec

from imgtrain.data.folder import DataError, read_regular_file, scan_classes, scan_samples

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "imgtrain-shards/1"
# Estimated bytes per re-encoded pixel at JPEG quality ~90 (ImageNet-like photos), times a 4:3 aspect.
_EST_BYTES_PER_MAX_SIDE_SQ = 0.5 * 0.75


@dataclass(frozen=True)
class PrepareSettings:
    max_side: int = 320
    quality: int = 90
    shard_size: int = 500 * 10**6
    samples_per_shard: int | None = None  # overrides the estimate from shard_size


@dataclass
class ShardTask:
    split: str
    name: str
    files: list[tuple[str, str, int]]  # (absolute path, path relative to SRC, label)
    settings: PrepareSettings
    dst: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def plan_digest(self) -> str:
        """What the shard is made from: a rerun keeps a shard only if this is unchanged."""
        h = hashlib.sha256()
        h.update(json.dumps(asdict(self.settings), sort_keys=True).encode())
        for _, rel, label in self.files:
            h.update(f"{rel}\0{label}\0".encode())
        return h.hexdigest()


def encode_image(path: str, max_side: int, quality: int) -> tuple[bytes, str]:
    """The bytes to store for one source image and their extension.

    JPEG and PNG files (8-bit grey or RGB) already within ``max_side`` are stored byte for byte: no
    generation loss, and training on them decodes exactly what the ImageFolder path decodes. Anything
    else is decoded (fully: a truncated file raises here, not in training), its longer side reduced to
    ``max_side`` and re-encoded as JPEG.
    """
    from PIL import Image

    data = read_regular_file(path)
    with Image.open(io.BytesIO(data)) as im:
        fmt, size = im.format, im.size
        if fmt in ("JPEG", "PNG") and im.mode in ("L", "RGB") and max(size) <= max_side:
            im.load()
            return data, "jpg" if fmt == "JPEG" else "png"
        scale = min(1.0, max_side / max(size))
        target = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        if fmt == "JPEG":
            im.draft("RGB", target)  # DCT-domain downscale while decoding: a large JPEG decodes faster
        rgb = im.convert("RGB")
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue(), "jpg"


def sample_key(rel: str) -> str:
    """WebDataset key for a source file: its path without extension, dots replaced (a key ends at the
    first dot of the member name)."""
    stem = rel.rsplit(".", 1)[0]
    return stem.replace(".", "_")


def sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in fs.protocol or "local" in fs.protocol


def _publish(fs: fsspec.AbstractFileSystem, local_tmp: str, dst: str) -> None:
    """Move a finished local file to its final place: an atomic rename locally, an upload otherwise (an
    object appears whole or not at all)."""
    if _is_local(fs):
        os.replace(local_tmp, dst)
    else:
        fs.put_file(local_tmp, dst)
        os.unlink(local_tmp)


def _temp_file(fs: fsspec.AbstractFileSystem, root: str, prefix: str, suffix: str = "") -> tuple[int, str]:
    """A new file to write and then publish: beside its final place on a local destination, created with
    mode 0666 less the umask, as any file the user writes (mkstemp's 0600 would keep other users' pods
    from reading a published dataset); in the temporary folder, private, before an upload."""
    if not _is_local(fs):
        return tempfile.mkstemp(prefix=prefix, suffix=suffix)
    while True:
        path = os.path.join(root, f"{prefix}{os.getpid()}.{secrets.token_hex(4)}{suffix}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def _write_json(fs: fsspec.AbstractFileSystem, root: str, name: str, obj: dict) -> None:
    data = (json.dumps(obj, indent=1) + "\n").encode()
    fd, tmp = _temp_file(fs, root, f".{name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    _publish(fs, tmp, f"{root}/{name}")


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return None


_progress: Any = None  # per worker process: the shared sample counter the main process shows


def _init_worker(counter) -> None:
    global _progress
    _progress = counter


def _tick(n: int = 1) -> None:
    if _progress is not None:
        with _progress.get_lock():
            _progress.value += n


def build_shard(task: ShardTask) -> dict:
    """Write (or verify and keep) one shard; returns its record. Runs in a worker process."""
    import webdataset as wds

    fs, root = fsspec.core.url_to_fs(task.dst, **task.storage_options)
    shard_path, record_name = f"{root}/{task.name}", f"{task.name}.json"
    plan = task.plan_digest()
    old = _read_json(fs, f"{root}/{record_name}")
    if old is not None and old.get("plan") == plan and fs.exists(shard_path):
        if sha256_file(fs, shard_path) == old.get("sha256"):
            _tick(len(task.files))
            return {**old, "kept": True}
        log.warning("shard %s does not match its recorded checksum: writing it again", shard_path)

    if _is_local(fs):  # leftovers of a killed run of this shard
        for stale in Path(root).glob(f".{task.name}.*.partial"):
            stale.unlink(missing_ok=True)
    skipped: list[dict] = []
    count = 0
    fd, tmp = _temp_file(fs, root, f".{task.name}.", ".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            # Fixed mtime, owner and format: the same sources give the same bytes (and checksum).
            writer = wds.TarWriter(f, encoder=False, mtime=0, user="", group="", format="PAX_FORMAT")
            for path, rel, label in task.files:
                try:
                    data, ext = encode_image(path, task.settings.max_side, task.settings.quality)
                except Exception as e:  # noqa: BLE001 - any unreadable source is skipped and listed
                    skipped.append({"path": rel, "reason": f"{type(e).__name__}: {e}"})
                else:
                    writer.write({"__key__": sample_key(rel), "cls": str(label).encode(), ext: data})
                    count += 1
                _tick()
            writer.close()
        digest = sha256_file(fsspec.filesystem("file"), tmp)
        nbytes = os.path.getsize(tmp)
        _publish(fs, tmp, shard_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    record = {
        "name": task.name,
        "count": count,
        "sha256": digest,
        "bytes": nbytes,
        "plan": plan,
        "skipped": skipped,
    }
    _write_json(fs, root, record_name, record)  # after the shard: a record always describes a whole shard
    return {**record, "kept": False}


def find_splits(src: Path, split: str | None) -> dict[str, Path]:
    """train/ and val/ under SRC when present; otherwise SRC itself is one split (named by --split)."""
    if split is not None:
        return {split: src}
    found = {s: src / s for s in ("train", "val") if (src / s).is_dir()}
    return found or {"train": src}


def _samples_per_shard(files: list[tuple[str, str, int]], s: PrepareSettings) -> int:
    if s.samples_per_shard is not None:
        return s.samples_per_shard
    cap = _EST_BYTES_PER_MAX_SIDE_SQ * s.max_side**2
    est = sum(min(os.path.getsize(p), cap) for p, _, _ in files) / max(len(files), 1)
    return max(1, int(s.shard_size // max(est + 1024, 1)))  # + tar headers of the two members


def plan_shards(
    src: Path,
    dst: str,
    settings: PrepareSettings,
    split: str | None = None,
    storage_options: dict | None = None,
) -> tuple[list[str], dict[str, list[ShardTask]]]:
    splits = find_splits(src, split)
    classes: list[str] | None = None
    plans: dict[str, list[ShardTask]] = {}
    for name, d in splits.items():
        cls = scan_classes(d)
        if classes is not None and cls != classes:
            raise DataError(
                f"class folders differ between the splits of {src}: {sorted(set(cls) ^ set(classes))[:10]}"
            )
        classes = cls
        files = [(p, os.path.relpath(p, src), label) for p, label in scan_samples(d, cls)]
        per = _samples_per_shard(files, settings)
        plans[name] = [
            ShardTask(
                name,
                f"{name}-{i // per:06d}.tar",
                files[i : i + per],
                settings,
                dst,
                dict(storage_options or {}),
            )
            for i in range(0, len(files), per)
        ]
    assert classes is not None
    return classes, plans


def prepare(
    src: str | Path,
    dst: str,
    settings: PrepareSettings | None = None,
    workers: int | None = None,
    split: str | None = None,
    storage_options: dict | None = None,
    progress: bool = True,
) -> dict:
    """Write the shards and the index; returns the index. Safe to rerun: finished shards are kept."""
    from tqdm import tqdm

    settings = settings or PrepareSettings()
    src = Path(src).expanduser()
    if not src.is_dir():
        raise DataError(f"prepare: source folder not found: {src}")
    storage_options = dict(storage_options or {})
    fs, root = fsspec.core.url_to_fs(dst, **storage_options)
    fs.makedirs(root, exist_ok=True)
    classes, plans = plan_shards(src, dst, settings, split, storage_options)
    tasks = [t for ts in plans.values() for t in ts]
    total = sum(len(t.files) for t in tasks)
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    log.info(
        "prepare: %d images in %d shards (%s) -> %s with %d worker processes",
        total,
        len(tasks),
        ", ".join(f"{k}: {len(v)}" for k, v in plans.items()),
        dst,
        workers,
    )

    # fork where there is one: workers start at once instead of importing torch again (fsspec resets its
    # event loop and instance cache in a forked child).
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    counter = ctx.Value("q", 0)
    records: dict[str, dict] = {}
    bar = tqdm(total=total, unit="img", desc="prepare", disable=not progress, dynamic_ncols=True)
    with cf.ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_init_worker, initargs=(counter,)
    ) as pool:
        pending = {pool.submit(build_shard, t): t for t in tasks}
        while pending:
            done, _ = cf.wait(pending, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            bar.update(counter.value - bar.n)
            for fut in done:
                task = pending.pop(fut)
                records[task.name] = fut.result()
    bar.update(counter.value - bar.n)
    bar.close()

    index = _merge_index(_read_json(fs, f"{root}/{INDEX_NAME}"), classes, plans, records, settings, dst)
    _write_json(fs, root, INDEX_NAME, index)
    kept = sum(r["kept"] for r in records.values())
    skipped = sum(len(s["skipped"]) for s in index["splits"].values())
    log.info(
        "prepare: %d shards kept from an earlier run, %d written; %d unreadable source files skipped "
        "(listed in %s)",
        kept,
        len(records) - kept,
        skipped,
        f"{dst.rstrip('/')}/{INDEX_NAME}",
    )
    return index


def _merge_index(
    old: dict | None,
    classes: list[str],
    plans: dict[str, list[ShardTask]],
    records: dict[str, dict],
    settings: PrepareSettings,
    dst: str,
) -> dict:
    splits: dict[str, dict] = {}
    if old is not None and old.get("format") == INDEX_FORMAT:
        # Splits prepared by an earlier call (e.g. `--split val` from another folder) stay listed.
        splits = {k: v for k, v in old.get("splits", {}).items() if k not in plans}
        if splits and old.get("classes") != classes:
            raise DataError(
                f"{dst}/{INDEX_NAME} lists other classes for its split(s) {sorted(splits)} than the "
                f"{len(classes)} found now: prepare every split of one dataset with the same class folders"
            )
    for name, tasks in plans.items():
        shards = [{k: records[t.name][k] for k in ("name", "count", "sha256", "bytes")} for t in tasks]
        splits[name] = {
            "samples": sum(s["count"] for s in shards),
            "samples_per_shard": len(tasks[0].files),
            "shards": shards,
            "skipped": [s for t in tasks for s in records[t.name]["skipped"]],
        }
    return {"format": INDEX_FORMAT, "classes": classes, "settings": asdict(settings), "splits": splits}
