"""Data: bad files are skipped and named, unusable folders are clear errors, the embedded digits set."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgtrain.config import DataConfig
from imgtrain.data import DataError, ImageFolderDataset, SampleRef, build_data
from imgtrain.data.embedded import ensure_digits
from imgtrain.data.folder import scan_classes
from imgtrain.data.transforms import eval_transform

from conftest import corrupt_image, make_image_folder

CPU = torch.device("cpu")


def _truncated(path: Path) -> Path:
    buf = io.BytesIO()
    img = np.random.default_rng(2).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(img).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(root=str(root), image_size=16, val_resize=16, workers=0, **kw)


@pytest.mark.parametrize("make_bad", [corrupt_image, _truncated], ids=["random_bytes", "truncated"])
def test_unreadable_image_is_skipped_with_weight_zero_and_named(make_bad, tmp_path, caplog):
    root = make_image_folder(tmp_path / "data", classes=2, train_per_class=2, val_per_class=1)
    bad = make_bad(root / "train" / "class_1" / "zz_bad.JPEG")
    classes = scan_classes(root / "train")
    ds = ImageFolderDataset(root / "train", classes, eval_transform(_cfg(root)), image_size=16)
    idx = [p for p, _ in ds.samples].index(str(bad))
    with caplog.at_level(logging.WARNING):
        img, label, weight, path = ds[SampleRef(idx)]
    assert weight == 0.0 and path == str(bad) and label == 1
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8
    assert any(str(bad) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    good_img, _, good_weight, good_path = ds[SampleRef(0)]
    assert good_weight == 1.0 and good_path == "" and good_img.shape == (3, 16, 16)


def test_bad_files_reach_the_batch_with_their_path(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, train_per_class=3, val_per_class=3)
    bad = corrupt_image(root / "val" / "class_0" / "bad.JPEG")
    data = build_data(_cfg(root), batch_size=4, rank=0, world_size=1, seed=0, device=CPU)
    seen_bad, weights = [], []
    for images, labels, w, bad_paths in data.val_loader:
        assert images.shape[1:] == (3, 16, 16) and len(labels) == len(w)
        seen_bad += bad_paths
        weights += w.tolist()
    assert seen_bad == [str(bad)]
    assert sorted(weights) == [0.0] + [1.0] * 6


def test_missing_root_is_a_data_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="data.root") as ei:
        build_data(_cfg(missing), 4, 0, 1, 0, CPU)
    assert str(missing) in str(ei.value)


def test_missing_split_is_a_data_error_naming_it(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, train_per_class=1, val_per_class=1)
    shutil.rmtree(root / "val")
    with pytest.raises(DataError) as ei:
        build_data(_cfg(root), 4, 0, 1, 0, CPU)
    assert str(root / "val") in str(ei.value)


def test_split_without_class_folders_is_a_data_error_naming_it(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, train_per_class=1, val_per_class=1)
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "loose.png")  # a file, not a class folder
    with pytest.raises(DataError, match="no class folders") as ei:
        build_data(_cfg(root), 4, 0, 1, 0, CPU)
    assert str(root / "val") in str(ei.value)


def test_class_folder_without_images_is_a_data_error(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=2, train_per_class=1, val_per_class=1)
    for f in (root / "train").rglob("*.jpeg"):
        f.rename(f.with_suffix(".txt"))
    with pytest.raises(DataError) as ei:
        build_data(_cfg(root), 4, 0, 1, 0, CPU)
    assert str(root / "train") in str(ei.value)


def test_val_classes_differing_from_train_is_a_data_error(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=3, train_per_class=1, val_per_class=1)
    (root / "val" / "class_2").rename(root / "val" / "class_9")
    with pytest.raises(DataError) as ei:
        build_data(_cfg(root), 4, 0, 1, 0, CPU)
    msg = str(ei.value)
    assert str(root / "train") in msg and str(root / "val") in msg
    assert "class_2" in msg and "class_9" in msg


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_class_without_images_in_a_split_is_a_data_error_unless_allowed(split, tmp_path, caplog):
    root = make_image_folder(tmp_path / "data", classes=3, train_per_class=2, val_per_class=1)
    for f in (root / split / "class_1").iterdir():
        f.unlink()  # the folder stays: an empty class
    with pytest.raises(DataError) as ei:
        build_data(_cfg(root), 4, 0, 1, 0, CPU)
    msg = str(ei.value)
    assert "class_1" in msg and str(root / split) in msg and "data.allow_empty_classes" in msg
    with caplog.at_level(logging.WARNING):
        data = build_data(_cfg(root, allow_empty_classes=True), 4, 0, 1, 0, CPU)
    assert data.classes == ["class_0", "class_1", "class_2"]
    assert any("class_1" in r.getMessage() for r in caplog.records)


def test_class_folders_differing_between_splits_are_allowed_as_empty_classes(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=3, train_per_class=2, val_per_class=1)
    shutil.rmtree(root / "val" / "class_2")  # class_2 has training images only
    with pytest.raises(DataError, match="class_2"):
        build_data(_cfg(root), 4, 0, 1, 0, CPU)
    data = build_data(_cfg(root, allow_empty_classes=True), 4, 0, 1, 0, CPU)
    assert data.classes == ["class_0", "class_1", "class_2"]
    assert (len(data.train_set), len(data.val_set)) == (6, 2)


def test_build_data_shapes_and_classes(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=3, train_per_class=5, val_per_class=2)
    data = build_data(_cfg(root), batch_size=4, rank=0, world_size=1, seed=0, device=CPU)
    assert data.classes == ["class_0", "class_1", "class_2"] and data.num_classes == 3
    assert (len(data.train_set), len(data.val_set)) == (15, 6)
    batches = list(data.train_loader)
    assert [len(b[1]) for b in batches] == [4, 4, 4, 3]
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    assert all(b[0].shape[1:] == (3, 16, 16) and b[0].dtype == torch.uint8 for b in batches)


@pytest.mark.slow
def test_ensure_digits_writes_the_tree_once(tmp_path, monkeypatch):
    root = ensure_digits(tmp_path)
    assert root.parent == tmp_path
    for split, total in (("train", 1437), ("val", 360)):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert classes == [str(d) for d in range(10)]
        files = list((root / split).rglob("*.png"))
        assert len(files) == total
    with Image.open(next((root / "val" / "3").iterdir())) as im:
        assert im.size == (8, 8)
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temporary folder left behind
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    import sklearn.datasets

    def must_not_run(*a, **k):
        raise AssertionError("ensure_digits rewrote an existing tree")

    monkeypatch.setattr(sklearn.datasets, "load_digits", must_not_run)
    assert ensure_digits(tmp_path) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamp


def test_metrics_log_drops_a_record_torn_by_a_kill(tmp_path):
    import json

    from imgtrain.monitoring import JsonlSink

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "train", "step": 1}\n{"event": "tra')  # killed mid-write
    sink = JsonlSink(path)
    sink.log({"event": "start", "step": 1})
    sink.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in records] == ["train", "start"]


def test_a_loader_workers_batch_equals_the_in_process_batch(tmp_path):
    """A worker hands the batch over in one shared-memory buffer (images, labels and weights are views of
    it): the main process must get the same tensors, dtypes and bad paths as without workers."""
    root = make_image_folder(tmp_path / "data", classes=3, train_per_class=2, val_per_class=1, size=20)
    batches = {}
    for workers in (0, 1):
        cfg = DataConfig(root=str(root), image_size=16, val_resize=16, workers=workers)
        bundle = build_data(cfg, 5, 0, 1, seed=3, device=CPU)
        _truncated(next((root / "train" / "class_1").iterdir()))  # after the scan: one bad file
        batches[workers] = [b for b in bundle.train_loader]
    for (i0, l0, w0, bad0), (i1, l1, w1, bad1) in zip(batches[0], batches[1], strict=True):
        assert torch.equal(i0, i1) and torch.equal(l0, l1) and torch.equal(w0, w1) and bad0 == bad1
        assert (i1.dtype, l1.dtype, w1.dtype) == (torch.uint8, torch.long, torch.float32)
    assert sorted(torch.cat([b[1] for b in batches[1]]).tolist()) == [0, 0, 1, 1, 2, 2]
    assert sum(len(b[3]) for b in batches[1]) == 1 and 0.0 in torch.cat([b[2] for b in batches[1]])


@pytest.mark.parametrize("channels_last", [False, True])
def test_device_normalize_makes_one_float_batch_with_the_normalized_values(channels_last):
    """(x - mean) / std in the model's memory format, allocating the float batch once: three batch-sized
    temporaries per step were page-faulted in again every step on CPU (docs/BENCHMARKS.md)."""
    from torch.profiler import ProfilerActivity, profile

    from imgtrain.data.transforms import DeviceNormalize

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    norm = DeviceNormalize(mean, std, CPU, channels_last)
    x = torch.randint(0, 256, (4, 3, 32, 24), dtype=torch.uint8)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = norm(x)
    expected = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, 3, 1, 1)
    assert y.dtype == torch.float32 and torch.allclose(y.double(), expected, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    allocated = sum(
        e.self_cpu_memory_usage
        for e in prof.key_averages()
        if e.key != "[memory]" and e.self_cpu_memory_usage > 0
    )
    assert allocated == y.numel() * 4, f"{allocated} bytes allocated for a {y.numel() * 4}-byte batch"
    floats = x.float()
    before = floats.clone()
    norm(floats)
    assert torch.equal(floats, before), "a float input must not be normalized in place"
