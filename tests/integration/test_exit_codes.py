"""Expected errors end the CLI with one line and the code of the README's table, never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import TINY, make_image_folder, run_cli

pytestmark = pytest.mark.slow


def _one_error_line(stderr: str, prefix: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def _copy(run: tuple[Path, Path], to: Path) -> tuple[Path, Path]:
    """The shared two-step run's data and run directory, copied: a test changes its own."""
    return tuple(shutil.copytree(p, to / p.name) for p in run)


def test_resuming_on_another_training_split_exits_4_in_one_line_and_keeps_the_checkpoint(
    two_step_run, tmp_path
):
    root, out = _copy(two_step_run, tmp_path)  # 36 training images
    args = ["train", "--output-dir", str(out), f"data.root={root}", *TINY]
    saved = sorted((out / "checkpoints").iterdir())
    assert saved
    shutil.copy(root / "train" / "class_0" / "000.jpeg", root / "train" / "class_0" / "new.jpeg")
    proc = run_cli(args, check=False)
    assert proc.returncode == 4, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr, "imgtrain: checkpoint error")
    assert (
        "training split of 36 samples" in line and "now has 37" in line and "checkpoint.resume=never" in line
    )
    assert sorted((out / "checkpoints").iterdir()) == saved


def test_resuming_with_other_parameter_groups_exits_4_in_one_line(two_step_run, tmp_path):
    root, out = _copy(two_step_run, tmp_path)
    args = ["train", "--output-dir", str(out), f"data.root={root}", *TINY]
    # Biases without weight decay: two parameter groups where the checkpoint's optimizer has one.
    proc = run_cli([*args, "optimization.no_weight_decay_on_norm_bias=true"], check=False)
    assert proc.returncode == 4, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr, "imgtrain: checkpoint error")
    assert "optimizer state does not fit" in line


def test_an_empty_class_folder_exits_3_naming_it_before_creating_the_run(tmp_path):
    root = make_image_folder(tmp_path / "data")
    (root / "train" / "class_9").mkdir()
    (root / "val" / "class_9").mkdir()
    out = tmp_path / "run"
    proc = run_cli(["train", "--output-dir", str(out), f"data.root={root}", *TINY], check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr, "imgtrain: data error")
    assert "class_9" in line and "data.allow_empty_classes" in line
    assert not out.exists()


def test_a_config_error_under_imgtrain_launch_ends_the_launcher_with_2_in_one_line(tmp_path):
    """The worker's table code reaches the scheduler (a Kubernetes FailIndex on exit 2), not torchrun's 1:
    the worker's one line, one line of the launcher naming the rank, no traceback (not even the agent's)."""
    launch = ["launch", "--standalone", "--nproc-per-node=1", f"--log-dir={tmp_path}", "-m", "imgtrain"]
    proc = run_cli([*launch, "train", "training.epochs=three"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "training.epochs" in _one_error_line(proc.stderr, "imgtrain: error: config key")
    assert "worker rank 0 exited 2" in _one_error_line(proc.stderr, "imgtrain launch:")
