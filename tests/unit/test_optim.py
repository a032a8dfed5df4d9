"""LR schedule as a function of progress in epochs, the linear scaling rule, weight-decay groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from imgtrain.config import OptimizationConfig, TrainingConfig, load_config
from imgtrain.optim import LRSchedule, create_optimizer, create_schedule, param_groups, scaled_lr, set_lr

approx = pytest.approx


def test_linear_warmup_from_start_factor_to_one():
    s = LRSchedule(epochs=10, warmup_epochs=2, warmup_start_factor=0.1)
    assert s(0.0) == approx(0.1)
    assert s(0.5) == approx(0.1 + 0.9 * 0.25)
    assert s(1.0) == approx(0.55)  # half-way through warmup
    assert s(1.999999) == approx(1.0, abs=1e-5)
    assert s(2.0) == approx(1.0)  # end of warmup: the peak
    assert all(s(a) < s(b) for a, b in zip([0, 0.5, 1, 1.5], [0.5, 1, 1.5, 2], strict=True))


def test_warmup_from_zero_and_no_warmup():
    s = LRSchedule(epochs=10, warmup_epochs=4)
    assert s(0.0) == 0.0
    assert s(2.0) == approx(0.5)
    no_warmup = LRSchedule(epochs=10, warmup_epochs=0)
    assert no_warmup(0.0) == approx(1.0)


def test_cosine_after_warmup():
    s = LRSchedule(epochs=10, warmup_epochs=2, kind="cosine", min_factor=0.0)
    assert s(2.0) == approx(1.0)
    assert s(6.0) == approx(0.5)  # mid-point of the cosine part
    assert s(4.0) == approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert s(10.0) == approx(0.0, abs=1e-12)
    assert s(12.0) == approx(0.0, abs=1e-12)  # stays at the floor past the end
    values = [s(2 + 8 * i / 50) for i in range(51)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))


def test_cosine_floor_min_factor():
    s = LRSchedule(epochs=10, warmup_epochs=0, kind="cosine", min_factor=0.1)
    assert s(0.0) == approx(1.0)
    assert s(5.0) == approx(0.55)
    assert s(10.0) == approx(0.1)
    assert s(11.0) == approx(0.1)


def test_step_decay_at_milestones():
    s = LRSchedule(epochs=90, warmup_epochs=0, kind="step", milestones=(30, 60, 80), gamma=0.1)
    assert s(0.0) == approx(1.0)
    assert s(29.99) == approx(1.0)
    assert s(30.0) == approx(0.1)
    assert s(59.5) == approx(0.1)
    assert s(60.0) == approx(0.01)
    assert s(85.0) == approx(0.001)


def test_step_decay_with_warmup():
    s = LRSchedule(
        epochs=20, warmup_epochs=2, kind="step", milestones=(10,), gamma=0.5, warmup_start_factor=0.0
    )
    assert s(1.0) == approx(0.5)
    assert s(2.0) == approx(1.0)
    assert s(10.0) == approx(0.5)


def test_constant_after_warmup():
    s = LRSchedule(epochs=10, warmup_epochs=1, kind="constant", warmup_start_factor=0.2)
    assert s(0.5) == approx(0.6)
    assert [s(e) for e in (1.0, 3.0, 9.9, 10.0, 50.0)] == [1.0] * 5


def test_create_schedule_maps_the_training_config():
    cfg = load_config(
        None,
        [
            "training.epochs=20",
            "training.warmup_epochs=2",
            "training.warmup_start_factor=0.25",
            "training.lr_schedule=step",
            "training.lr_step_epochs=[5,15]",
            "training.lr_step_gamma=0.2",
        ],
    )
    s = create_schedule(cfg.training)
    assert s(1.0) == approx(0.625)
    assert s(4.0) == approx(1.0)
    assert s(5.0) == approx(0.2)
    assert s(15.0) == approx(0.04)
    cos = create_schedule(TrainingConfig(epochs=10, warmup_epochs=0, min_lr_factor=0.2))
    assert cos(5.0) == approx(0.6)
    assert cos(10.0) == approx(0.2)


def test_schedule_depends_on_progress_not_on_steps():
    # Progress 2.5 means half-way through the third epoch whatever the number of steps per epoch.
    s = create_schedule(TrainingConfig(epochs=10, warmup_epochs=1))
    at_8_steps_per_epoch = s(2 + 4 / 8)
    at_3_steps_per_epoch = s(2 + 1.5 / 3)
    assert at_8_steps_per_epoch == at_3_steps_per_epoch


def test_scaled_lr_is_linear_in_the_global_batch():
    t = TrainingConfig(base_lr=0.1, lr_reference_batch=256)
    assert scaled_lr(t, 256) == approx(0.1)
    assert scaled_lr(t, 512) == approx(0.2)
    assert scaled_lr(t, 2048) == approx(0.8)
    assert scaled_lr(t, 32) == approx(0.0125)
    assert scaled_lr(TrainingConfig(base_lr=0.4, lr_reference_batch=256), 32) == approx(0.05)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.conv_b = nn.Conv2d(4, 4, 1, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_no_weight_decay_on_norm_and_bias():
    m = _Net()
    decay, no_decay = param_groups(m, 0.05, True)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert _names(m, decay) == {"conv.weight", "conv_b.weight", "fc.weight"}
    assert _names(m, no_decay) == {"conv_b.bias", "bn.weight", "bn.bias", "ln.weight", "ln.bias", "fc.bias"}


def test_weight_decay_everywhere_when_switched_off():
    m = _Net()
    (group,) = param_groups(m, 0.05, False)
    assert group["weight_decay"] == 0.05
    assert _names(m, group) == {n for n, _ in m.named_parameters()}


def test_frozen_parameters_are_left_out():
    m = _Net()
    m.conv.weight.requires_grad_(False)
    for groups in (param_groups(m, 0.1, True), param_groups(m, 0.1, False)):
        assert all("conv.weight" not in _names(m, g) for g in groups)


def test_resnet_batchnorm_params_are_not_decayed():
    import torchvision

    m = torchvision.models.resnet18(num_classes=3)
    decay, no_decay = param_groups(m, 1e-4, True)
    dn, nn_ = _names(m, decay), _names(m, no_decay)
    assert dn | nn_ == {n for n, _ in m.named_parameters()} and not dn & nn_
    assert all(".bn" in n or n.startswith("bn") or "downsample.1" in n or n == "fc.bias" for n in nn_)
    assert all(n.endswith("weight") and m.get_parameter(n).ndim > 1 for n in dn)
    assert "fc.weight" in dn and "conv1.weight" in dn and "bn1.weight" in nn_


def test_create_optimizer_applies_groups_and_settings():
    m = _Net()
    sgd = create_optimizer(
        m,
        OptimizationConfig(
            optimizer="sgd", momentum=0.8, nesterov=True, weight_decay=0.01, no_weight_decay_on_norm_bias=True
        ),
        lr=0.3,
    )
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.01, 0.0]
    assert all(g["momentum"] == 0.8 and g["nesterov"] and g["lr"] == 0.3 for g in sgd.param_groups)
    adamw = create_optimizer(
        m, OptimizationConfig(optimizer="adamw", betas=[0.8, 0.95], weight_decay=0.05), lr=1e-3
    )
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["betas"] == (0.8, 0.95) and adamw.param_groups[0]["weight_decay"] == 0.05
    set_lr(sgd, 0.123)
    assert [g["lr"] for g in sgd.param_groups] == [0.123, 0.123]


def test_zero_weight_decay_group_really_is_not_decayed():
    # One SGD step with a zero gradient: decayed weights shrink, the no-decay group does not move.
    m = _Net()
    opt = create_optimizer(
        m,
        OptimizationConfig(
            optimizer="sgd", momentum=0.0, weight_decay=0.5, no_weight_decay_on_norm_bias=True
        ),
        lr=0.1,
    )
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(1.0)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.allclose(m.fc.weight, torch.full_like(m.fc.weight, 0.95))
    assert torch.equal(m.bn.weight, torch.ones_like(m.bn.weight))
    assert torch.equal(m.fc.bias, torch.ones_like(m.fc.bias))


@pytest.mark.parametrize("impl", ["foreach", "fused", "for_loop"])
def test_optimizer_implementation_is_chosen_by_config(impl):
    from imgtrain.config import OptimizationConfig
    from imgtrain.optim import create_optimizer

    for name in ("sgd", "adamw"):
        model = torch.nn.Linear(4, 2)
        opt = create_optimizer(model, OptimizationConfig(optimizer=name, optimizer_impl=impl), lr=0.1)
        assert opt.defaults["foreach"] is (impl == "foreach") or (
            impl != "foreach" and not opt.defaults["foreach"]
        )
        assert bool(opt.defaults.get("fused")) is (impl == "fused")
        model(torch.ones(3, 4)).sum().backward()
        before = model.weight.detach().clone()
        opt.step()  # fused kernels exist for CPU tensors in this torch
        assert not torch.equal(before, model.weight)
