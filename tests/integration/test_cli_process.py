"""The command line as a fresh process sees it: `python -m imgtrain` and the console script exit with the
code of the README's table, and a config or registry-name error is reported before torch is imported."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_image_folder, old_saved_config, run_cli, subprocess_env


@pytest.mark.slow
def test_cli_reports_a_config_error_before_importing_torch():
    code = (
        "import sys; from imgtrain.cli import main; rc = main(['train', 'training.epochz=3']); "
        "print(rc, 'torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=subprocess_env()
    )
    assert proc.stdout.split() == ["2", "False"], proc.stderr
    assert "training.epochz" in proc.stderr


@pytest.mark.slow
def test_cli_missing_config_file_exits_2(tmp_path):
    proc = run_cli(
        ["train", "--config", str(tmp_path / "nope.yaml"), "--output-dir", str(tmp_path / "o")], check=False
    )
    assert proc.returncode == 2
    assert "--config" in proc.stderr and "nope.yaml" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_python_m_help_and_console_script():
    proc = run_cli(["--help"])
    assert "train" in proc.stdout and "eval" in proc.stdout
    assert "section.key=value" in run_cli(["train", "--help"]).stdout
    script = Path(sys.executable).parent / "imgtrain"
    exe = str(script) if script.exists() else shutil.which("imgtrain")
    assert exe, "the imgtrain console script is not installed"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert "usage: imgtrain" in proc.stdout
    proc = subprocess.run(
        [exe, "train", "training.epochz=3"], capture_output=True, text=True, timeout=60, env=subprocess_env()
    )
    assert proc.returncode == 2 and "training.epochz" in proc.stderr


def test_registry_names_are_checked_without_importing_torch():
    code = (
        "import sys; from imgtrain.config import load_config; from imgtrain.cli import main; "
        "load_config(None, ['data.decode.decoder=pil', 'distributed.compression=onebit', "
        "'optimization.optimizer=adamw', 'training.lr_schedule=step']); "
        "rc = main(['train', 'data.decode.decoder=pillow']); "
        "print(rc, 'torch' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=subprocess_env()
    )
    assert proc.stdout.split() == ["2", "False"], proc.stderr
    assert "data.decode.decoder" in proc.stderr and "did you mean pil" in proc.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_imgtrain_eval_reads_a_checkpoint_saved_before_the_data_split(tmp_path):
    import torch

    from imgtrain.config import ModelConfig
    from imgtrain.models import create_model

    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=1, val_per_class=3, size=16)
    saved = old_saved_config()
    saved["model"] = {**saved["model"], "name": "simple_cnn", "width": 4}
    saved["data"].update(image_size=16, val_resize=16, workers=0)
    model = create_model(ModelConfig(name="simple_cnn", width=4), 2, 16)
    ckpt = tmp_path / "model.pt"
    torch.save(
        {"model": model.state_dict(), "config": saved, "meta": {"classes": ["class_0", "class_1"]}}, ckpt
    )
    proc = run_cli(["eval", "--checkpoint", str(ckpt), f"data.root={data}"], timeout=240)
    assert '"val_images": 6' in proc.stdout, proc.stderr
