"""Each training option changes what it should inside the trainer's own step, not only "it still trains":
mixup/cutmix mix the batch the model sees and its labels, RandAugment changes the training samples,
clipping bounds the gradient the optimizer steps with, label smoothing changes the loss, and the fp16
loss scaler scales the loss and skips a step whose gradients overflow. The batch-size finder's probes and
the benchmarks' steps are that same step, and only the trainer advances the step counter."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from imgtrain.config import load_config
from imgtrain.data import SampleRef
from imgtrain.tools.find_batch_size import _Step
from imgtrain.train.trainer import Trainer

from conftest import TINY

BATCH = 8


@pytest.fixture
def trainer(tmp_path, image_folder):
    """``trainer(*overrides)``: a set-up single-process Trainer on the tiny image folder (closed at the end)."""
    made: list[Trainer] = []

    def make(*overrides: str) -> Trainer:
        cfg = load_config(
            None,
            [
                f"output_dir={tmp_path / f'run{len(made)}'}",
                f"data.root={image_folder}",
                *TINY,
                f"training.batch_size={BATCH}",
                *overrides,
            ],
        )
        t = Trainer(cfg)
        made.append(t)
        return t.setup()

    yield make
    for t in made:
        t.close()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """One training batch as the loader yields it: uint8 images, labels (neighbours differ), weights."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (BATCH, 3, 16, 16), dtype=torch.uint8, generator=g)
    return images, torch.arange(BATCH) % 3, torch.ones(BATCH), []


def step(t: Trainer, b=None) -> dict:
    """Runs ``t.train_step`` on one batch; returns what the model saw, the targets of the loss, the
    gradient norm the optimizer stepped with and the step's mean loss."""
    seen: dict = {"inputs": [], "targets": [], "grad_norm": []}
    criterion, optimizer_step = t.criterion, t.optimizer.step

    def recording_criterion(logits, targets):
        seen["targets"].append(targets)
        return criterion(logits, targets)

    def recording_step(*args, **kwargs):
        grads = [p.grad for p in t.model_without_ddp.parameters() if p.grad is not None]
        seen["grad_norm"].append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return optimizer_step(*args, **kwargs)

    t.criterion, t.optimizer.step = recording_criterion, recording_step
    hook = t.model_without_ddp.register_forward_pre_hook(
        lambda m, args: seen["inputs"].append(args[0].clone())
    )
    try:
        sums = t.train_step([b or batch()], [BATCH])
    finally:
        hook.remove()
        t.criterion, t.optimizer.step = criterion, optimizer_step
    seen["loss"] = (sums[0] / sums[2]).item()
    return seen


def test_mixup_and_cutmix_mix_the_batch_and_its_labels(trainer):
    images, labels, _, _ = b = batch()
    t = trainer()
    plain = step(t, b)
    assert torch.equal(plain["targets"][0], labels)
    assert torch.equal(plain["inputs"][0], t.normalize(images))
    for mix in ("data.augment.mixup_alpha=0.2", "data.augment.cutmix_alpha=1.0"):
        t = trainer(mix)
        seen = step(t, b)
        targets = seen["targets"][0]
        assert targets.shape == (BATCH, 3) and targets.dtype.is_floating_point, mix
        assert torch.allclose(targets.sum(1), torch.ones(BATCH))
        # Neighbouring samples have different labels: every mixed row has two classes.
        assert ((targets > 0).sum(1) == 2).all(), (mix, targets)
        assert not torch.equal(seen["inputs"][0], t.normalize(images)), mix


def test_randaugment_changes_the_training_samples(trainer):
    ref = SampleRef(1, 1.0, 3)
    plain = trainer().data.train_set[ref][0]
    assert torch.equal(plain, trainer().data.train_set[ref][0])  # same seed, epoch, index: same sample
    augmented = trainer(
        "data.augment.auto_augment=randaugment", "data.augment.randaugment_magnitude=15"
    ).data.train_set[ref][0]
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)


def test_gradient_clip_bounds_the_gradient_the_optimizer_steps_with(trainer):
    limit = 1e-3
    free = step(trainer())["grad_norm"][0]
    assert free > 10 * limit  # so that the clip below does bite
    clipped = step(trainer(f"optimization.gradient_clip={limit}"))["grad_norm"][0]
    assert clipped <= limit * (1 + 1e-4)


def test_label_smoothing_changes_the_loss_by_the_smoothed_cross_entropy(trainer):
    images, labels, _, _ = b = batch()
    t = trainer("optimization.label_smoothing=0.3")
    with torch.no_grad():
        for p in list(t.model_without_ddp.parameters())[-2:]:  # confident logits: smoothing then matters
            p.mul_(50)
        logits = t.model_without_ddp(t.normalize(images))
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.3).item()
    plain = F.cross_entropy(logits, labels).item()
    assert abs(smoothed - plain) > 0.01  # far above the tolerance below
    assert step(t, b)["loss"] == pytest.approx(smoothed, rel=1e-5)


def test_fp16_loss_scaler_skips_an_overflowing_step_and_halves_its_scale(trainer):
    fp32 = step(trainer())["grad_norm"][0]
    t = trainer("optimization.mixed_precision=fp16")
    assert t.scaler.is_enabled()
    scale = t.scaler.get_scale()
    assert scale > 1
    before = {k: v.clone() for k, v in t.model_without_ddp.state_dict().items()}
    # A normal step: the loss was scaled up and the gradients unscaled before the step (the optimizer sees
    # fp32's gradient, not one ``scale`` times smaller), the step is applied and the scale stays.
    assert step(t)["grad_norm"][0] == pytest.approx(fp32, rel=0.05)
    assert t.scaler.get_scale() == scale
    after = {k: v.clone() for k, v in t.model_without_ddp.state_dict().items()}
    assert any(not torch.equal(before[k], after[k]) for k in after if after[k].is_floating_point())
    # A gradient that overflows: the scaler must skip the step (weights unchanged) and halve its scale.
    first = next(t.model_without_ddp.parameters())
    hook = first.register_hook(lambda g: torch.full_like(g, math.inf))
    try:
        step(t)
    finally:
        hook.remove()
    assert t.scaler.get_scale() == scale / 2
    params = dict(t.model_without_ddp.named_parameters())
    assert all(torch.equal(after[k], p.detach()) for k, p in params.items())


def test_batch_finder_probes_with_the_trainers_own_step(trainer):
    """Same start, same batch: the finder's probe leaves the weights and the EMA exactly where the trainer's
    step leaves them, with gradient clipping, label smoothing and EMA on (a probe that skipped any of them
    would measure another step, and another memory footprint)."""
    t = trainer(
        "optimization.gradient_clip=0.01",
        "optimization.label_smoothing=0.2",
        "optimization.ema=true",
        "optimization.ema_interval=1",
    )
    probe = _Step(t.cfg, t.data.num_classes, torch.device("cpu"))
    probe.trainer.model_without_ddp.load_state_dict(t.model_without_ddp.state_dict())
    probe.trainer.ema.load_state_dict(t.ema.state_dict())
    start = {k: v.clone() for k, v in t.model_without_ddp.state_dict().items()}
    probe.run(BATCH, 2)
    g = torch.Generator().manual_seed(0)  # the probe's synthetic batch
    images = torch.randint(0, 256, (BATCH, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, t.data.num_classes, (BATCH,), generator=g)
    for _ in range(2):
        t.train_step([(images, labels, torch.ones(BATCH), [])], [BATCH])
    for name, module in (("model", "model_without_ddp"), ("EMA", "ema")):
        got = getattr(probe.trainer, module).state_dict()
        want = getattr(t, module).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), name
    trained = t.model_without_ddp.state_dict()
    assert any(not torch.equal(start[k], trained[k]) for k in start if start[k].is_floating_point())


def test_run_steps_advances_the_step_and_logs_but_leaves_the_epoch_position(trainer, tmp_path):
    t = trainer("training.log_interval=2")
    consumed = t.data.train_sampler.state.consumed
    t.run_steps(itertools.cycle([batch(0), batch(1)]), 5)
    assert t.progress.step == 5 and t.progress.epoch == 0
    assert t.data.train_sampler.state.consumed == consumed
    lines = (t.output_dir / "metrics.jsonl").read_text().splitlines()
    train = [r for r in map(json.loads, lines) if r["event"] == "train"]
    assert [r["step"] for r in train] == [2, 4]  # every log_interval steps; step 5's window stays open
    assert t.progress.images_seen == 4 * BATCH  # counted when a window closes
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in train)
