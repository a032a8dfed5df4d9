"""`imgtrain prepare` and the shard dataset: layout, index, resume, exactly-once sampling, bad samples, cache."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from imgtrain.config import AugmentConfig, ConfigError, DataConfig, load_config
from imgtrain.data.folder import DataError, ImageFolderDataset, SampleRef, collate, scan_classes
from imgtrain.data.sampler import ShardedBatchSampler
from imgtrain.data.shards.cache import ShardSource
from imgtrain.data.shards.dataset import ShardDataset, build_shard_sets, load_index
from imgtrain.data.shards.prepare import PrepareSettings, prepare
from imgtrain.data.transforms import eval_transform, train_transform
from imgtrain.units import parse_size

from conftest import make_image_folder

PER_SHARD = 10


def _prepare(src: Path, dst: Path, **kw) -> dict:
    settings = PrepareSettings(samples_per_shard=PER_SHARD, **kw)
    return prepare(src, str(dst), settings, workers=2, progress=False)


def _sets(dst: Path, transform=None, **cfg) -> tuple[ShardDataset, ShardDataset]:
    c = DataConfig(root=str(dst), format="shards", image_size=16, val_resize=16, **cfg)
    train, val, _ = build_shard_sets(c, transform, transform, seed=0)
    return train, val


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    """33 training images (not a multiple of any batch below) and 9 validation images, in shards of 10."""
    base = tmp_path_factory.mktemp("shards")
    src = make_image_folder(base / "data", classes=3, train_per_class=11, val_per_class=3, size=20)
    _prepare(src, base / "shards")
    return src, base / "shards"


@pytest.mark.slow
def test_prepare_writes_webdataset_shards_and_lists_unreadable_files(tmp_path):
    import webdataset as wds

    src = make_image_folder(tmp_path / "data", classes=2, train_per_class=8, val_per_class=2, size=20)
    Image.fromarray(np.full((50, 100, 3), 128, np.uint8)).save(src / "train" / "class_1" / "big.png")
    (src / "train" / "class_0" / "bad.jpg").write_bytes(b"not an image")
    png = io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(png, format="PNG")
    (src / "train" / "class_1" / "cut.png").write_bytes(png.getvalue()[:40])
    dst = tmp_path / "shards"
    index = _prepare(src, dst, max_side=64, quality=80)

    train = index["splits"]["train"]
    assert index["classes"] == ["class_0", "class_1"]
    assert [s["path"] for s in train["skipped"]] == ["train/class_0/bad.jpg", "train/class_1/cut.png"]
    assert all(s["reason"] for s in train["skipped"])
    assert train["samples"] == 17 and [s["count"] for s in train["shards"]] == [9, 8]  # 19 files, 2 bad
    assert index["settings"]["max_side"] == 64 and index["settings"]["quality"] == 80
    for s in train["shards"] + index["splits"]["val"]["shards"]:
        assert _sha(dst / s["name"]) == s["sha256"] and (dst / s["name"]).stat().st_size == s["bytes"]
    assert json.loads((dst / "index.json").read_text()) == index

    # The WebDataset layout: webdataset's own reader gets every sample with its class.
    samples = list(wds.WebDataset([str(dst / s["name"]) for s in train["shards"]], shardshuffle=False))
    assert len(samples) == 17
    by_key = {s["__key__"]: s for s in samples}
    # A small JPEG is stored byte for byte; a larger image is re-encoded to the longer side of 64.
    assert by_key["train/class_0/000"]["jpg"] == (src / "train" / "class_0" / "000.jpeg").read_bytes()
    assert by_key["train/class_0/000"]["cls"] == b"0"
    big = Image.open(io.BytesIO(by_key["train/class_1/big"]["jpg"]))
    assert big.format == "JPEG" and big.size == (64, 32) and by_key["train/class_1/big"]["cls"] == b"1"


def test_shard_samples_equal_the_folder_samples(prepared):
    """Same index, same epoch -> the same decoded and augmented tensor as the ImageFolder path."""
    src, dst = prepared
    cfg = DataConfig(image_size=12, augment=AugmentConfig(random_resized_crop_scale=[0.3, 1.0]))
    train, _ = _sets(dst, train_transform(cfg))
    folder = ImageFolderDataset(
        src / "train", scan_classes(src / "train"), train_transform(cfg), image_size=16
    )
    assert len(train) == len(folder) == 33
    for i in range(len(folder)):
        a, b = train[SampleRef(i, 1.0, 3)], folder[SampleRef(i, 1.0, 3)]
        assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_a_workers_batch_decoded_into_shared_slots_equals_the_samples(prepared):
    """In a loader worker the shard dataset decodes each image straight into its slot of the batch
    (``__getitems__``): the batches equal the samples indexed one by one, labels and weights included."""
    _, dst = prepared
    cfg = DataConfig(image_size=12, augment=AugmentConfig(random_resized_crop_scale=[0.3, 1.0]))
    train, _ = _sets(dst, train_transform(cfg))
    train.image_size = 12
    sampler = ShardedBatchSampler(len(train), 8, 0, 1, seed=5)
    batches = list(DataLoader(train, batch_sampler=sampler, num_workers=1, collate_fn=collate))
    refs = [r for batch in sampler for r in batch]
    images, labels, weights = (torch.cat([b[i] for b in batches]) for i in range(3))
    assert len(refs) == len(train) == images.shape[0]
    for k, ref in enumerate(refs):
        img, label, weight, _ = train[ref]
        assert torch.equal(images[k], img) and labels[k].item() == label and weights[k].item() == weight


@pytest.mark.slow
def test_rerun_keeps_finished_shards_and_rewrites_partial_ones(tmp_path):
    src = make_image_folder(tmp_path / "data", classes=3, train_per_class=10, val_per_class=2, size=20)
    dst = tmp_path / "shards"
    first = _prepare(src, dst)
    names = [s["name"] for s in first["splits"]["train"]["shards"]]
    assert len(names) == 3
    before = {n: (dst / n).stat().st_mtime_ns for n in names}
    # What a killed run leaves: a shard cut short, a shard without its record, a temp file, no index.
    data = (dst / names[1]).read_bytes()
    (dst / names[1]).write_bytes(data[: len(data) // 2])
    (dst / f"{names[2]}.json").unlink()
    (dst / f".{names[2]}.x.partial").write_bytes(b"half")
    (dst / "index.json").unlink()
    with pytest.raises(DataError, match="no .*index.json"):
        load_index(str(dst))

    second = _prepare(src, dst)
    assert second == first  # deterministic shards: the same bytes and checksums again
    assert (dst / names[0]).stat().st_mtime_ns == before[names[0]]  # kept, not rewritten
    assert (dst / names[1]).stat().st_mtime_ns != before[names[1]]
    assert _sha(dst / names[1]) == first["splits"]["train"]["shards"][1]["sha256"]
    assert not list(dst.glob(".*.partial"))

    # Changed settings change the plan: every shard is rewritten.
    third = _prepare(src, dst, quality=50)
    assert third["settings"]["quality"] == 50 and (dst / names[0]).stat().st_mtime_ns != before[names[0]]


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [4, 5])
def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(prepared, batch_size):
    """33 samples: global batches of 8 leave a tail of 1 (rank 1 gets a weight-0 pad), of 10 a tail of 3."""
    _, dst = prepared
    train, _ = _sets(dst)
    ident = [hashlib.sha1(train[i][0].numpy().tobytes()).hexdigest() for i in range(len(train))]
    assert len(set(ident)) == len(train)

    def epoch(epoch: int, consumed: int = 0) -> list[tuple[int, str, float]]:
        """(rank, image, weight) of every sample loaded, in step order."""
        per_rank = []
        for rank in range(2):
            sampler = ShardedBatchSampler(len(train), batch_size, rank, 2, seed=7)
            sampler.state.epoch, sampler.state.consumed = epoch, consumed
            loader = DataLoader(train, batch_sampler=sampler, num_workers=2, collate_fn=collate)
            per_rank.append(
                [
                    [
                        (rank, hashlib.sha1(img.numpy().tobytes()).hexdigest(), float(w))
                        for img, w in zip(imgs, weights, strict=True)
                    ]
                    for imgs, _, weights, _ in loader
                ]
            )
        assert len(per_rank[0]) == len(per_rank[1])  # the same number of steps on every rank
        return [s for step in zip(*per_rank, strict=True) for batch in step for s in batch]

    seen = epoch(0)
    real = [img for _, img, w in seen if w == 1.0]
    assert sorted(real) == sorted(ident)  # each sample exactly once
    assert all(w in (0.0, 1.0) for _, _, w in seen)
    assert epoch(0) == seen  # the order is a function of (seed, epoch)
    assert [img for _, img, w in epoch(1) if w == 1.0] != real
    gb = 2 * batch_size
    assert epoch(0, consumed=2 * gb) == seen[2 * gb :]  # resume mid-epoch: exactly the rest


def test_corrupt_member_is_skipped_with_weight_zero_and_named(prepared, tmp_path, caplog):
    src, clean = prepared
    dst = tmp_path / "shards"
    fs = fsspec.filesystem("file")
    fs.copy(str(clean), str(dst), recursive=True)
    shard = dst / "train-000000.tar"
    with tarfile.open(shard) as tf:
        member = [m for m in tf if m.name.endswith(".jpeg") or m.name.endswith(".jpg")][3]
    with open(shard, "r+b") as f:  # garble the image bytes in place: the tar itself stays readable
        f.seek(member.offset_data)
        f.write(b"\x00" * member.size)
    train, _ = _sets(dst, eval_transform(DataConfig(image_size=16, val_resize=16)))
    with caplog.at_level(logging.WARNING):
        img, label, weight, bad = train[SampleRef(3)]
    assert weight == 0.0 and bad == f"{dst}/train-000000.tar:{member.name}" and label == 0
    assert img.shape == (3, 16, 16)
    assert any(bad in r.getMessage() for r in caplog.records)
    assert [train[SampleRef(i)][2] for i in (2, 4, 32)] == [1.0, 1.0, 1.0]


def test_shard_errors_name_the_culprit(prepared, tmp_path):
    _, dst = prepared
    with pytest.raises(DataError, match=f"no {tmp_path}/index.json.*imgtrain prepare"):
        load_index(str(tmp_path))
    index = json.loads((dst / "index.json").read_text())
    with pytest.raises(DataError, match="has no 'test' split"):
        ShardDataset(ShardSource(str(dst)), index, "test", None)
    with pytest.raises(ConfigError, match="data.root"):
        load_config(None, ["data.format=shards"])
    with pytest.raises(ConfigError, match="data.root"):
        load_config(None, ["data.root=s3://bucket/imagenet"])  # a URL needs data.format=shards
    with pytest.raises(ConfigError, match="data.format"):
        load_config(None, ["data.format=tar"])
    assert parse_size("500MB") == 500 * 10**6 and parse_size("1GiB") == 2**30 and parse_size("4096") == 4096


def test_object_store_cache_counts_hits_and_evicts_above_its_limit(tmp_path):
    """An in-memory fsspec store stands in for S3 here (the real S3 round trip is an integration test)."""
    fs = fsspec.filesystem("memory")
    blobs = {f"s{i}.tar": bytes([i]) * 1000 for i in range(3)}
    for name, data in blobs.items():
        fs.pipe(f"/cachetest/{name}", data)
    sha = {n: hashlib.sha256(d).hexdigest() for n, d in blobs.items()}
    src = ShardSource("memory://cachetest", cache_dir=tmp_path / "cache", cache_size=2500, sha256=sha)
    assert Path(src.local_path("s0.tar")).read_bytes() == blobs["s0.tar"]
    src.local_path("s0.tar")
    src.local_path("s1.tar")
    assert src.take_counts() == (1, 2, 2000) and src.take_counts() == (0, 0, 0)
    src.local_path("s2.tar")  # 3000 bytes > 2500: the least recently used shard goes
    assert sorted(p.name for p in (tmp_path / "cache").glob("*/*.tar")) == ["s1.tar", "s2.tar"]
    fs.pipe("/cachetest/s0.tar", b"changed")
    with pytest.raises(OSError, match="does not match the sha256"):
        src.local_path("s0.tar")


def test_splits_prepared_separately_share_one_index(tmp_path):
    src = make_image_folder(tmp_path / "data", classes=2, train_per_class=3, val_per_class=2, size=20)
    dst, settings = str(tmp_path / "shards"), PrepareSettings(samples_per_shard=PER_SHARD)
    prepare(src / "train", dst, settings, workers=1, split="train", progress=False)
    index = prepare(src / "val", dst, settings, workers=1, split="val", progress=False)
    assert {k: v["samples"] for k, v in index["splits"].items()} == {"train": 6, "val": 4}
    train, val = _sets(tmp_path / "shards")
    assert (len(train), len(val)) == (6, 4) and train.classes == ["class_0", "class_1"]
    other = make_image_folder(tmp_path / "other", classes=3, train_per_class=1, val_per_class=1, size=20)
    with pytest.raises(DataError, match=r"other classes for its split\(s\) \['train'\]"):
        prepare(other / "val", dst, settings, workers=1, split="val", progress=False)


def test_cache_smaller_than_the_dataset_keeps_what_fits_and_reads_the_rest_by_range(prepared, tmp_path):
    """Cache what fits, stream the rest: with room for two of the four training shards, those two are
    cached once and never evicted; the others are read sample by sample by byte range (no whole-shard
    downloads per read), so every epoch after the first has the hit rate of the cached fraction."""
    _, dst = prepared
    index = json.loads((dst / "index.json").read_text())
    fs = fsspec.filesystem("memory")
    for p in dst.glob("*.tar"):
        fs.pipe(f"/pinned/{p.name}", p.read_bytes())
    shards = index["splits"]["train"]["shards"]
    sizes = {s["name"]: s["bytes"] for s in shards}
    sha = {s["name"]: s["sha256"] for s in shards}
    room = sizes["train-000000.tar"] + sizes["train-000001.tar"] + 100
    source = ShardSource(
        "memory://pinned", cache_dir=tmp_path / "cache", cache_size=room, sha256=sha, sizes=sizes
    )
    assert not source.streamed("train-000001.tar") and source.streamed("train-000002.tar")
    remote = ShardDataset(source, index, "train", None)
    local = ShardDataset(ShardSource(str(dst)), index, "train", None)
    order = np.random.default_rng(0).permutation(len(local))  # the sampler's global random order
    for epoch in range(2):
        assert [remote.read(int(i)) for i in order] == [local.read(int(i)) for i in order]
        hits, misses, nbytes = source.take_counts()
        if epoch == 0:  # two shard downloads, and one streaming pass over each of the other two shards
            assert misses == 2 + 13 and nbytes > sum(sizes[f"train-00000{i}.tar"] for i in range(4))
        else:
            assert (hits, misses) == (20, 13) and nbytes < sizes["train-000002.tar"]  # the 13 samples only
    cached = sorted(p.name for p in (tmp_path / "cache").glob("*/*.tar"))
    assert cached == ["train-000000.tar", "train-000001.tar"]
    assert remote.describe(32) == "memory://pinned/train-000003.tar:sample 2"
    # The streaming pass checks the shard against the index's sha256, as a download does.
    fs.pipe("/pinned/train-000003.tar", fs.cat_file("/pinned/train-000003.tar")[:-1024])
    fresh = ShardSource(
        "memory://pinned", cache_dir=tmp_path / "cache2", cache_size=room, sha256=sha, sizes=sizes
    )
    with pytest.raises(OSError, match="train-000003.tar does not match the sha256"):
        ShardDataset(fresh, index, "train", None).read(32)
