"""Real torchrun (Gloo) runs of tiny models: the same results whatever the process layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, load_weights, make_image_folder, read_jsonl, run_cli, run_torchrun

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Two-epoch runs with a model without batch norm, so that how a batch is split cannot change results.
EQUIV = [*TINY, "training.max_steps=6", "checkpoint.save_at_epoch_end=false"]


def _assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def equiv_data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("equiv") / "data")


@pytest.fixture(scope="module")
def one_process_batch_8(equiv_data, tmp_path_factory) -> dict:
    """The weights every layout below must reproduce: one process, batch 8 (trained once for the module)."""
    out = tmp_path_factory.mktemp("one_process_batch_8") / "run"
    run_cli(["train", "--output-dir", str(out), f"data.root={equiv_data}", *EQUIV, "training.batch_size=8"])
    return load_weights(out)


def test_torchrun_two_processes_trains_and_writes_summary(image_folder, tmp_path):
    out = tmp_path / "run"
    run_torchrun(2, ["train", "--output-dir", str(out), f"data.root={image_folder}", *TINY])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["global_batch"] == 16
    assert summary["epochs"] == 2
    assert summary["val_images"] == 12  # every val image counted once, none twice
    assert (out / "config.yaml").is_file() and (out / "model.pt").is_file()
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2]


def test_two_processes_batch_b_match_one_process_batch_2b(equiv_data, one_process_batch_8, tmp_path):
    two = tmp_path / "two"
    run_torchrun(
        2, ["train", "--output-dir", str(two), f"data.root={equiv_data}", *EQUIV, "training.batch_size=4"]
    )
    _assert_close(one_process_batch_8, load_weights(two))


def test_gradient_accumulation_matches_larger_batch(equiv_data, one_process_batch_8, tmp_path):
    acc = tmp_path / "acc"
    run_cli(
        [
            "train",
            "--output-dir",
            str(acc),
            f"data.root={equiv_data}",
            *EQUIV,
            "training.batch_size=4",
            "optimization.accumulation_steps=2",
        ]
    )
    _assert_close(one_process_batch_8, load_weights(acc))


def test_accumulation_under_torchrun_matches_single_process(equiv_data, one_process_batch_8, tmp_path):
    two = tmp_path / "two"
    run_torchrun(
        2,
        [
            "train",
            "--output-dir",
            str(two),
            f"data.root={equiv_data}",
            *EQUIV,
            "training.batch_size=2",
            "optimization.accumulation_steps=2",
        ],
    )
    _assert_close(one_process_batch_8, load_weights(two))


def test_eval_command_under_torchrun_counts_every_image_once(image_folder, tmp_path):
    out = tmp_path / "run"
    run_cli(["train", "--output-dir", str(out), f"data.root={image_folder}", *TINY])
    # The data location comes from the user, never from the checkpoint's embedded config.
    root = f"data.root={image_folder}"
    single = json.loads(
        run_cli(["eval", "--checkpoint", str(out / "model.pt"), root]).stdout.strip().splitlines()[-1]
    )
    multi = run_torchrun(2, ["eval", "--checkpoint", str(out / "checkpoints"), root])
    line = [ln for ln in multi.stdout.splitlines() if ln.startswith("{")][-1]
    multi = json.loads(line)
    assert single["val_images"] == multi["val_images"] == 12
    assert single["val_top1"] == pytest.approx(multi["val_top1"])
    summary = json.loads((out / "summary.json").read_text())
    assert single["val_top1"] == pytest.approx(summary["val_top1"])
    # GPU decode is a training-time option: a run configured with it still evaluates on a CPU machine.
    cpu_eval = run_cli(["eval", "--checkpoint", str(out / "model.pt"), root, "data.decode.device=gpu"])
    assert json.loads(cpu_eval.stdout.strip().splitlines()[-1])["val_top1"] == pytest.approx(
        single["val_top1"]
    )
