"""The start-up check of /dev/shm against what the DataLoader workers need."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from imgtrain.cli import main
from imgtrain.config import DataConfig
from imgtrain.data import DataError
from imgtrain.data.shm import check_shared_memory, shared_memory_need

from conftest import TINY, make_image_folder

_Usage = namedtuple("_Usage", "total used free")


def _free(monkeypatch, free_bytes: int) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: _Usage(free_bytes, 0, free_bytes) if str(p) == "/dev/shm" else real(p)
    )


def test_need_counts_workers_prefetch_batch_and_local_processes(monkeypatch):
    cfg = DataConfig(workers=8, prefetch_factor=4, image_size=224)
    assert shared_memory_need(cfg, 64, 8) == 8 * 8 * 4 * 64 * 3 * 224 * 224  # ~7.4 GiB: ImageNet on 8 GPUs
    assert shared_memory_need(DataConfig(workers=0), 64, 8) == 0


def test_too_little_shared_memory_fails_at_start_naming_the_fix(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    _free(monkeypatch, 64 * 2**20)  # Docker's default
    with pytest.raises(DataError, match=r"data\.workers.*--shm-size"):
        check_shared_memory(DataConfig(workers=8, prefetch_factor=4, image_size=224), 64)
    check_shared_memory(DataConfig(workers=0, image_size=224), 64)  # no workers: no shared memory needed

    # As the user sees it: `imgtrain train` exits with the data-error code before any training.
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=2, val_per_class=1)
    code = main(
        [
            "train",
            "--output-dir",
            str(tmp_path / "run"),
            f"data.root={data}",
            *TINY,
            "data.workers=4",
            "data.image_size=128",
            "data.val_resize=128",
            "training.batch_size=64",
        ]
    )
    assert code == 3
    err = capsys.readouterr().err
    assert "/dev/shm has 64 MiB free" in err and "data.workers" in err and "--shm-size" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_enough_shared_memory_passes_and_close_calls_warn(monkeypatch, caplog):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cfg = DataConfig(workers=2, prefetch_factor=2, image_size=16)
    need = shared_memory_need(cfg, 8, 1)
    _free(monkeypatch, 10 * need)
    check_shared_memory(cfg, 8)
    assert "close to what" not in caplog.text
    _free(monkeypatch, need + 1)
    check_shared_memory(cfg, 8)
    assert "close to what the data loaders need" in caplog.text
