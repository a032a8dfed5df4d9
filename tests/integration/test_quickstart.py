"""The README's first command: `imgtrain train` with no arguments on the embedded digits dataset."""

from __future__ import annotations

import json

import pytest

from conftest import read_jsonl, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_quickstart_reaches_97_percent(tmp_path):
    # Exactly the README's command (no config, no overrides), run from a fresh working directory.
    proc = run_cli(["train"], cwd=tmp_path, timeout=600)
    out = tmp_path / "runs" / "quickstart"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_top1"] >= 97.0, summary
    assert summary["val_images"] == 360 and summary["world_size"] == 1
    assert json.loads(proc.stdout.strip().splitlines()[-1])["val_top1"] == summary["val_top1"]
    # The progress bar shows epoch, loss, LR and images/s (ETA comes from tqdm).
    assert "epoch 5/5" in proc.stderr and "loss=" in proc.stderr and "img_s=" in proc.stderr
    train_records = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "train"]
    assert train_records and {"loss", "lr", "images_per_s", "epoch", "step"} <= train_records[0].keys()
    assert (out / "config.yaml").is_file() and (out / "model.pt").is_file()
