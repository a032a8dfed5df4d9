"""A training run over a folder with one corrupt image: it trains past the image, naming it, or stops with
exit code 3 naming it when data.max_bad_fraction allows none."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgtrain.config import load_config

from conftest import TINY, corrupt_image, make_image_folder, run_cli


def _folder_with_one_corrupt_file(tmp_path: Path) -> tuple[Path, Path]:
    root = make_image_folder(tmp_path / "data")  # 36 train / 12 val images
    bad = corrupt_image(root / "train" / "class_1" / "broken.JPEG")
    return root, bad


@pytest.mark.slow
def test_cli_run_survives_one_corrupt_file(tmp_path):
    root, bad = _folder_with_one_corrupt_file(tmp_path)
    out = tmp_path / "run #1"  # also: an output dir that YAML would misread is taken literally
    args = [f"data.root={root}", *TINY, "data.max_bad_fraction=0.05"]
    proc = run_cli(["train", "--output-dir", str(out), *args])
    assert str(bad) in proc.stderr  # the warning names the file
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["epochs"] == 2
    assert summary["val_images"] == 12
    # The run's totals: the bad file was skipped once per epoch, and only images trained on are counted.
    assert (summary["bad_images"], summary["val_bad_images"]) == (2, 0)
    assert summary["images_seen"] == 2 * 36
    # The resolved config is written as config.yaml and loads back to the same config.
    written = load_config(out / "config.yaml")
    assert written == load_config("folder", [*args, f"output_dir='{out}'"])  # data.root without --config
    assert written.data.root == str(root) and written.output_dir == str(out)


@pytest.mark.slow
def test_cli_stops_when_bad_files_exceed_max_bad_fraction(tmp_path):
    root, bad = _folder_with_one_corrupt_file(tmp_path)
    out = tmp_path / "run"
    proc = run_cli(
        ["train", "--output-dir", str(out), f"data.root={root}", *TINY, "data.max_bad_fraction=0.0"],
        check=False,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "data.max_bad_fraction" in proc.stderr
    # The error itself names the file, not only the loader's warnings above it.
    (error,) = [line for line in proc.stderr.splitlines() if line.startswith("imgtrain: data error")]
    assert str(bad) in error and "1 of the training images" in error
    assert "Traceback" not in proc.stderr
    assert not (out / "summary.json").exists()
