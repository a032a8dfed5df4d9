"""Training options a user combines in recipes, end to end through the CLI on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TINY, load_weights, read_jsonl, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize(
    "extra",
    [
        # torchvision's ViT recipe in miniature: AdamW, warmup, label smoothing, mixup/cutmix, RandAugment,
        # random erasing, clipping, EMA, bf16 autocast (also on CPU).
        [
            "optimization.optimizer=adamw",
            "training.base_lr=0.01",
            "training.warmup_epochs=1",
            "optimization.label_smoothing=0.11",
            "data.augment.mixup_alpha=0.2",
            "data.augment.cutmix_alpha=1.0",
            "data.augment.auto_augment=randaugment",
            "data.augment.random_erase=0.25",
            "optimization.gradient_clip=1.0",
            "optimization.ema=true",
            "optimization.ema_decay=0.9",
            "optimization.mixed_precision=bf16",
            "optimization.weight_decay=0.05",
            "optimization.no_weight_decay_on_norm_bias=true",
        ],
        # SGD with Nesterov, step decay, TrivialAugment, fp16 with dynamic loss scaling, accumulation.
        [
            "optimization.nesterov=true",
            "training.lr_schedule=step",
            "training.lr_step_epochs=[1]",
            "data.augment.auto_augment=trivialaugment",
            "optimization.mixed_precision=fp16",
            "optimization.accumulation_steps=2",
        ],
    ],
    ids=["vit-like", "sgd-step-fp16"],
)
def test_recipe_features_train_and_evaluate(image_folder, tmp_path, extra):
    out = tmp_path / "run"
    run_cli(["train", "--output-dir", str(out), f"data.root={image_folder}", *TINY, *extra])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["val_images"] == 12
    records = read_jsonl(out / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert losses and all(math.isfinite(x) for x in losses)
    if "optimization.ema=true" in extra:
        assert summary["val_ema_top1"] is not None
        assert torch.load(out / "model.pt", weights_only=True)["ema"] is not None
    if "training.lr_schedule=step" in extra:
        lrs = {r["epoch"]: r["lr"] for r in records if r["event"] == "train"}
        assert lrs[2] == pytest.approx(lrs[1] * 0.1)


def test_same_seed_gives_bit_identical_weights_and_other_seed_does_not(image_folder, tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_cli(
            [
                "train",
                "--output-dir",
                str(tmp_path / name),
                f"data.root={image_folder}",
                *TINY,
                f"training.seed={seed}",
                "data.workers=2",
            ]
        )
        runs[name] = load_weights(tmp_path / name)
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_max_steps_stops_early_and_still_evaluates(two_step_run):
    _, out = two_step_run  # TINY with training.max_steps=2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and not summary["completed"] and summary["val_images"] == 12
