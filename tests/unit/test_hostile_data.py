"""Hostile or unlucky datasets (issue 18): out-of-range labels, decompression bombs and scan floods, shard
names that climb out of the cache, eviction outside imgtrain's own cache folders, links and FIFOs in an
ImageFolder tree, file modes of a published dataset. Each is a bad sample or a clear error, never a crash."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import stat
import tarfile
import threading
import tracemalloc
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from imgtrain.config import DataConfig, DecodeConfig
from imgtrain.data import folder as F
from imgtrain.data.decode import cpu as D
from imgtrain.data.folder import DataError, ImageFolderDataset, SampleRef, scan_classes, scan_samples
from imgtrain.data.shards import cache as shard_cache
from imgtrain.data.shards.cache import ShardSource
from imgtrain.data.shards.dataset import build_shard_sets, load_index
from imgtrain.data.shards.prepare import PrepareSettings, prepare
from imgtrain.data.transforms import eval_transform, train_transform

from conftest import make_image_folder

AVAILABLE = [n for n in D.DECODERS if type(D.create_decoder(n)).__name__ == D.DECODERS[n].__name__]


def _jpeg(w: int = 32, h: int = 24, progressive: bool = False, mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85, progressive=progressive)
    return out.getvalue()


def _png(w: int = 32, h: int = 24) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(out, format="PNG")
    return out.getvalue()


def _sof(data: bytes) -> int:
    """Offset of the SOF segment's marker (baseline or progressive)."""
    for m in (b"\xff\xc0", b"\xff\xc2"):
        i = data.find(m)
        if i >= 0:
            return i
    raise AssertionError("no SOF")


def _declare_size(data: bytes, w: int, h: int) -> bytes:
    """The same file with another size in its header (the scans still hold the small image)."""
    i = _sof(data) + 5  # marker(2) length(2) precision(1), then height, width
    return data[:i] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + data[i + 4 :]


def _many_scans(data: bytes, n: int) -> bytes:
    """A progressive JPEG whose scans (from its first SOS to EOI) are repeated ``n`` times."""
    first, end = data.find(b"\xff\xda"), data.rfind(b"\xff\xd9")
    return data[:first] + data[first:end] * n + data[end:]


# ------------------------------------------------------------------------------------------------
# Decode limits (item 4)


@pytest.mark.parametrize("decoder", AVAILABLE)
def test_a_declared_65500x65500_jpeg_is_refused_from_its_header_by_every_decoder(decoder):
    bomb = _declare_size(_jpeg(progressive=True), 65500, 65500)
    dec = D.create_decoder(decoder)
    # (Pillow's own check, above ~179 MP, answers first where Pillow reads the header: same error class)
    with pytest.raises(
        D.ImageLimitError, match="65500x65500.*data.decode.max_image_pixels=100000000|4290250000 pix"
    ):
        D.decode_train(bomb, dec, 16, (0.08, 1.0))
    with pytest.raises(D.ImageLimitError):
        D.decode_eval(bomb, dec, 18, 16)
    with pytest.raises(D.ImageLimitError):
        D.decode_full(dec, bomb)


@pytest.mark.parametrize("decoder", AVAILABLE)
def test_the_pixel_limit_is_configurable_and_applies_to_png_too(decoder):
    limits = D.DecodeLimits(max_pixels=32 * 24)
    dec = D.create_decoder(decoder, limits)
    for data in (_jpeg(), _png()):
        assert D.decode_train(data, dec, 16, (0.08, 1.0)).shape == (3, 16, 16)  # exactly at the limit
    small = D.create_decoder(decoder, D.DecodeLimits(max_pixels=32 * 24 - 1))
    for data in (_jpeg(), _png()):
        with pytest.raises(D.ImageLimitError, match="32x24"):
            D.decode_train(data, small, 16, (0.08, 1.0))
    assert D.decode_limits(DataConfig(decode=DecodeConfig(max_image_pixels=123))).max_pixels == 123


@pytest.mark.parametrize("decoder", AVAILABLE)
def test_a_jpeg_with_thousands_of_scans_is_refused_before_decoding(decoder):
    flood = _many_scans(_jpeg(progressive=True), 300)
    assert D.jpeg_scan_count(flood) > 1000
    with pytest.raises(D.ImageLimitError, match="scans"):
        D.decode_train(flood, D.create_decoder(decoder), 16, (0.08, 1.0))
    normal = _jpeg(progressive=True)
    assert 1 < D.jpeg_scan_count(normal) <= 20 and D.jpeg_scan_count(_jpeg()) == 1


def test_scan_count_skips_app_segments_that_hold_sos_bytes():
    app = b"\xff\xe1" + (2 + 400).to_bytes(2, "big") + b"\xff\xda" * 200  # an EXIF-like payload
    prog = _jpeg(progressive=True)
    assert D.jpeg_scan_count(prog[:2] + app + prog[2:]) == D.jpeg_scan_count(prog) < 20


def test_a_bomb_in_the_training_data_is_a_bad_sample_refused_by_the_limit(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=2, val_per_class=1)
    victim = root / "train" / "class_1" / "000.jpeg"
    victim.write_bytes(_declare_size(victim.read_bytes(), 65500, 65500))
    cfg = DataConfig(image_size=16, val_resize=16)
    ds = ImageFolderDataset(root / "train", scan_classes(root / "train"), train_transform(cfg), image_size=16)
    with caplog.at_level(logging.WARNING):
        results = [ds[SampleRef(i)] for i in range(len(ds))]
    assert [r[3] for r in results if r[2] == 0.0] == [str(victim)]
    assert f"skipping unreadable image {victim}: 65500x65500 image" in caplog.text  # not a failed decode


def _roi():
    try:
        return D._jpegroi()
    except ImportError as e:
        pytest.skip(f"no region decoder: {e}")


def test_region_decoder_checks_pixels_scans_and_memory_in_c():
    roi = _roi()
    prog = _jpeg(64, 48, progressive=True)
    buf, x0, w = roi.decode_crop(prog, 0, 0, 8, 8, True, 10**8, 100, 1 << 30)
    assert len(buf) == 8 * w * 3
    with pytest.raises(roi.LimitError, match="above 3071 pixels"):
        roi.decode_crop(prog, 0, 0, 8, 8, True, 64 * 48 - 1, 100, 1 << 30)
    # The scan limit is the progress monitor's (the Python-side count is not consulted here).
    with pytest.raises(roi.LimitError, match="more than 2 scans"):
        roi.decode_crop(prog, 0, 0, 8, 8, True, 10**8, 2, 1 << 30)
    # A progressive file's coefficient buffer above max_memory_to_use is refused, not allocated.
    with pytest.raises(roi.LimitError, match="Backing store"):
        roi.decode_crop(_jpeg(640, 480, progressive=True), 0, 0, 8, 8, True, 10**8, 100, 100_000)
    with pytest.raises(ValueError, match="libjpeg"):  # corrupt data stays a ValueError (fallback)
        roi.decode_crop(prog[:200], 0, 0, 8, 8, True, 10**8, 100, 1 << 30)


def test_region_decoder_refuses_an_older_libjpeg_found_at_run_time(monkeypatch, tmp_path, caplog):
    roi = _roi()
    assert D.libjpeg_turbo_version(roi.LIBJPEG_PATH) >= D.LIBJPEG_TURBO_MIN
    fake = tmp_path / "libjpeg.so.62"
    fake.write_bytes(b"\0junk\0libjpeg-turbo version 2.1.4 (build 20220808)\0")
    assert D.libjpeg_turbo_version(str(fake)) == 2001004
    assert D.libjpeg_turbo_version(str(tmp_path / "missing")) is None
    monkeypatch.setattr(roi, "LIBJPEG_PATH", str(fake))
    D._jpegroi.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            dec = D.create_decoder("libjpeg_roi")
        assert dec.name != "libjpeg_roi"
        assert "libjpeg-turbo 2001004, older than 2001005" in caplog.text
    finally:
        D._jpegroi.cache_clear()


def test_an_extension_older_than_its_source_falls_back_instead_of_failing(monkeypatch, caplog):
    # An editable install does not rebuild _jpegroi when _jpegroi.c changes: a stale build lacks the new
    # attributes, and the run must fall back with a warning, not end in an AttributeError traceback.
    roi = _roi()
    monkeypatch.delattr(roi, "LimitError")
    D._jpegroi.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            dec = D.create_decoder("libjpeg_roi")
        assert dec.name != "libjpeg_roi"
        assert "older than its source" in caplog.text
    finally:
        D._jpegroi.cache_clear()


# ------------------------------------------------------------------------------------------------
# Labels (item 3), shard names (item 10), published modes (item 12)


def _prepare(tmp_path: Path) -> Path:
    src = make_image_folder(tmp_path / "src", classes=3, train_per_class=4, val_per_class=2, size=20)
    prepare(src, str(tmp_path / "shards"), PrepareSettings(samples_per_shard=6), workers=1, progress=False)
    return tmp_path / "shards"


def test_an_out_of_range_shard_label_is_a_bad_sample_with_a_valid_label(tmp_path, caplog):
    dst = _prepare(tmp_path)
    shard = dst / "train-000000.tar"
    with tarfile.open(shard) as tf:
        cls = [m for m in tf if m.name.endswith(".cls")]
    with open(shard, "r+b") as f:  # 3 classes: label 9 (same length, the tar stays readable)
        f.seek(cls[2].offset_data)
        f.write(b"9")
        f.seek(cls[4].offset_data)
        f.write(b"x")
    cfg = DataConfig(root=str(dst), format="shards", image_size=16, val_resize=16)
    train, _, _ = build_shard_sets(cfg, eval_transform(cfg), eval_transform(cfg), seed=0)
    with caplog.at_level(logging.WARNING):
        out = [train[SampleRef(i)] for i in range(6)]
    assert [(o[1], o[2]) for o in out if o[3]] == [(0, 0.0), (0, 0.0)]
    assert [o[3] for o in out if o[3]] == [f"{dst}/train-000000.tar:{cls[k].name[:-4]}.jpg" for k in (2, 4)]
    assert "label 9 is not a class index (the index lists 3 classes)" in caplog.text
    # every label that reaches the loss is a class index
    assert all(0 <= o[1] < 3 for o in out)


@pytest.mark.parametrize("name", ["../escaped.tar", "/tmp/abs.tar", "sub/x.tar", ".hidden.tar", ""])
def test_a_shard_name_that_is_not_a_plain_file_name_rejects_the_index(tmp_path, name):
    dst = _prepare(tmp_path)
    index = json.loads((dst / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["name"] = name
    (dst / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=f"names a shard {name!r}: a shard name must be a plain file name"):
        load_index(str(dst))


def test_published_shards_and_index_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        dst = _prepare(tmp_path)
    finally:
        os.umask(old)
    published = sorted(p for p in dst.iterdir() if not p.name.startswith("."))
    assert {p.name for p in published} >= {"index.json", "train-000000.tar", "train-000000.tar.json"}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in published} == {p.name: 0o644 for p in published}


# ------------------------------------------------------------------------------------------------
# Cache eviction (item 6)


def test_eviction_deletes_only_shards_in_imgtrains_own_cache_folders(tmp_path):
    cache = tmp_path / "cache"
    other = cache / "someone-elses-dataset"  # e.g. data.cache.dir set to a shared scratch folder
    other.mkdir(parents=True)
    (other / "shard-0.tar").write_bytes(b"x" * 5000)
    os.utime(other / "shard-0.tar", (1, 1))  # the least recently used file there
    fs = fsspec.filesystem("memory")
    blobs = {f"s{i}.tar": bytes([i]) * 1000 for i in range(3)}
    for name, data in blobs.items():
        fs.pipe(f"/evicttest/{name}", data)
    sha = {n: hashlib.sha256(d).hexdigest() for n, d in blobs.items()}
    src = ShardSource("memory://evicttest", cache_dir=cache, cache_size=2500, sha256=sha)
    for name in blobs:
        src.local_path(name)
    assert (other / "shard-0.tar").read_bytes() == b"x" * 5000
    assert sorted(p.name for p in src.cache_dir.glob("*.tar")) == ["s1.tar", "s2.tar"]
    assert (
        src.cache_dir / shard_cache.CACHE_MARKER
    ).read_text() == "imgtrain shard cache of memory://evicttest\n"


# ------------------------------------------------------------------------------------------------
# The ImageFolder scan and read (item 11)


def test_scan_skips_links_outside_the_root_fifos_and_loops_and_follows_links_inside(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=2, val_per_class=1)
    train = root / "train"
    secret = tmp_path / "secret.jpg"
    secret.write_bytes((train / "class_0" / "000.jpeg").read_bytes())
    (train / "class_0" / "leak.jpg").symlink_to(secret)
    (train / "class_0" / "outdir").symlink_to(tmp_path, target_is_directory=True)
    (train / "class_1" / "alias.jpg").symlink_to(train / "class_0" / "001.jpeg")  # inside: followed
    (train / "class_1" / "loop").symlink_to(train / "class_1", target_is_directory=True)
    os.mkfifo(train / "class_1" / "pipe.jpg")
    with caplog.at_level(logging.WARNING):
        samples = scan_samples(train, scan_classes(train))
    names = sorted(os.path.relpath(p, train) for p, _ in samples)
    assert names == [
        "class_0/000.jpeg",
        "class_0/001.jpeg",
        "class_1/000.jpeg",
        "class_1/001.jpeg",
        "class_1/alias.jpg",
    ]
    assert "skipping 2 entries" in caplog.text and "link outside it" in caplog.text
    assert "skipping 1 entries" in caplog.text and "not regular files" in caplog.text


def test_a_fifo_or_an_oversized_file_is_a_bad_sample_not_a_hang(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2, train_per_class=2, val_per_class=1)
    train = root / "train"
    cfg = DataConfig(image_size=16, val_resize=16)
    ds = ImageFolderDataset(train, scan_classes(train), eval_transform(cfg), image_size=16)
    victim = Path(ds.samples[1][0])
    victim.unlink()
    os.mkfifo(victim)  # replaced after the scan: the read itself must refuse it
    result: list = []
    t = threading.Thread(target=lambda: result.append(ds[SampleRef(1)]), daemon=True)
    t.start()
    t.join(timeout=60)
    assert result and result[0][2] == 0.0 and result[0][3] == str(victim)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8" + b"\0" * 2000)
    assert len(F.read_regular_file(str(big), 2002)) == 2002
    with pytest.raises(OSError, match="larger than 2001 bytes"):
        F.read_regular_file(str(big), 2001)


def test_reading_an_image_allocates_its_size_not_the_limit(tmp_path):
    # read(limit + 1) would allocate the 1 GiB limit for every image: slow, and a MemoryError (every image
    # "unreadable") under the batch finder's memory cap.
    small = tmp_path / "small.png"
    small.write_bytes(b"\x89PNG" + b"\0" * 5000)
    tracemalloc.start()
    try:
        data = F.read_regular_file(str(small))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(data) == 5004
    assert peak < 1 << 20, f"reading a 5 kB file peaked at {peak} bytes"


def test_prepare_does_not_publish_a_file_linked_from_outside_the_source(tmp_path):
    src = make_image_folder(tmp_path / "src", classes=2, train_per_class=2, val_per_class=1, size=20)
    outside = tmp_path / "private.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(outside)
    (src / "train" / "class_0" / "zz.png").symlink_to(outside)
    index = prepare(
        src, str(tmp_path / "out"), PrepareSettings(samples_per_shard=10), workers=1, progress=False
    )
    assert index["splits"]["train"]["shards"][0]["count"] == 4
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tf:
        assert not any("zz" in m.name for m in tf)


# ------------------------------------------------------------------------------------------------
# Fuzz: mutated JPEGs through every decoder (item 4)


def _mutants(n: int, seed: int = 0) -> list[bytes]:
    """``n`` mutated files from a few tiny seeds: truncated, bit-flipped, huge declared sizes, scan floods,
    and combinations, with a fixed seed (the same files on every run)."""
    rng = np.random.default_rng(seed)
    seeds = [
        _jpeg(40, 30),
        _jpeg(40, 30, progressive=True),
        _jpeg(24, 40, mode="L", seed=1),
        _jpeg(17, 9, progressive=True, mode="L", seed=2),
        _png(20, 12),
    ]
    out = []
    for i in range(n):
        data = bytearray(seeds[i % len(seeds)])
        kind = rng.integers(0, 5)
        if kind == 0:  # truncated
            data = data[: int(rng.integers(2, len(data)))]
        elif kind == 1:  # bit flips
            for _ in range(int(rng.integers(1, 9))):
                data[int(rng.integers(2, len(data)))] ^= 1 << int(rng.integers(0, 8))
        elif kind == 2 and data[:2] == D.JPEG_MAGIC:  # huge or odd declared size
            w, h = (int(v) for v in rng.choice([0, 1, 7, 40, 1000, 20000, 65500, 65535], 2))
            data = bytearray(_declare_size(bytes(data), w, h))
        elif kind == 3 and data[:2] == D.JPEG_MAGIC:  # scan flood, then maybe a flip
            data = bytearray(_many_scans(bytes(data), int(rng.integers(2, 400))))
            if rng.random() < 0.5:
                data[int(rng.integers(2, len(data)))] ^= 0xFF
        else:  # random bytes spliced in
            at = int(rng.integers(2, len(data)))
            data[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
        out.append(bytes(data))
    return out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")  # Pillow's warnings about the mutants
def test_fuzzed_images_decode_or_are_bad_samples_in_bounded_memory():
    import psutil

    files = _mutants(1000)
    proc = psutil.Process()
    limits = D.DecodeLimits(max_pixels=4_000_000)  # the largest legal mutant: 12 MB of RGB
    rss0 = proc.memory_info().rss
    peak = 0
    for name in AVAILABLE:
        dec = D.create_decoder(name, limits)
        gen = torch.Generator().manual_seed(0)
        decoded = bad = 0
        for data in files:
            for train in (True, False):
                try:
                    if train:
                        img = D.decode_train(data, dec, 16, (0.08, 1.0), generator=gen)
                    else:
                        img = D.decode_eval(data, dec, 18, 16)
                except Exception:  # noqa: BLE001 - what a dataset counts as a bad sample
                    bad += 1
                else:
                    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8
                    decoded += 1
        peak = max(peak, proc.memory_info().rss - rss0)
        assert decoded > 200 and bad > 200, (name, decoded, bad)
    assert peak < 400 * 2**20, f"RSS grew by {peak / 2**20:.0f} MB over the fuzz run"
