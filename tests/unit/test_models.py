"""Model registry contract: output shape, backward, checkpoint-compatible activation checkpointing."""

from __future__ import annotations

import pytest
import torch

from imgtrain.config import ModelConfig, load_config
from imgtrain.models import create_model, list_models

# (config, image size); kept small so that each case runs in well under a second on a CPU.
# vit_b_16 (86M parameters) takes several seconds even at 32 px: only its structure is checked, on the
# meta device, below.
CASES = {
    "simple_cnn": (ModelConfig(name="simple_cnn", width=8), 16),
    "resnet18_small_input": (ModelConfig(name="resnet18", small_input=True), 16),
}
NUM_CLASSES = 7


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(cfg: ModelConfig, size: int, checkpointing: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**vars(cfg), "activation_checkpointing": checkpointing})
    return create_model(cfg, NUM_CLASSES, size)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_and_checkpointing_contract(case):
    cfg, size = CASES[case]
    plain = _build(cfg, size)
    ckpt = _build(cfg, size, checkpointing=True)
    # Same parameter names: a checkpoint saved with activation checkpointing loads without it.
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    ckpt.load_state_dict(plain.state_dict())
    plain.load_state_dict(ckpt.state_dict())

    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size)
    labels = torch.tensor([0, NUM_CLASSES - 1])
    grads = []
    for model in (plain, ckpt):
        model.train()
        out = model(x)
        assert out.shape == (2, NUM_CLASSES)
        assert torch.isfinite(out).all()
        torch.nn.functional.cross_entropy(out, labels).backward()
        params = [p for p in model.parameters() if p.requires_grad]
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        grads.append([p.grad for p in params])
    # Recomputing activations in backward changes memory use, not the gradients.
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("name", "size", "blocks"), [("resnet18", 16, 8), ("vit_b_16", 32, 12)])
def test_activation_checkpointing_wraps_blocks_and_keeps_state_dict_keys(name, size, blocks):
    with torch.device("meta"):  # structure only: no memory, no initialization cost
        plain = create_model(ModelConfig(name=name), NUM_CLASSES, size)
        ckpt = create_model(ModelConfig(name=name, activation_checkpointing=True), NUM_CLASSES, size)
    wrapped = [m for m in ckpt.modules() if type(m).__name__ == "CheckpointWrapper"]
    assert len(wrapped) == blocks  # resnet18: 4 stages x 2 blocks; vit_b_16: 12 encoder blocks
    assert not [m for m in plain.modules() if type(m).__name__ == "CheckpointWrapper"]
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in ckpt.state_dict().items()
    }
    if name.startswith("vit"):
        assert plain.heads.head.out_features == NUM_CLASSES


def test_small_input_keeps_resolution_in_the_stem():
    with torch.device("meta"):
        big = create_model(ModelConfig(name="resnet18"), 3, 32)
        small = create_model(ModelConfig(name="resnet18", small_input=True), 3, 32)
    assert big.conv1.stride == (2, 2) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError) as ei:
        create_model(ModelConfig(name="resnet19"), 10, 32)
    msg = str(ei.value)
    assert "resnet19" in msg
    for name in ("simple_cnn", "resnet18", "resnet50", "vit_b_16"):
        assert name in msg
    assert {"simple_cnn", "resnet18", "vit_b_16"} <= set(list_models())


def test_model_name_from_config_builds():
    cfg = load_config(None, ["model.name=simple_cnn", "model.width=4"])
    model = create_model(cfg.model, 3, 8)
    assert model(torch.zeros(1, 3, 8, 8)).shape == (1, 3)


def test_any_timm_model_by_name():
    pytest.importorskip("timm")
    import torch

    from imgtrain.config import ModelConfig
    from imgtrain.models import create_model

    model = create_model(ModelConfig(name="timm/resnet10t", activation_checkpointing=True), 7, 32)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()
    with pytest.raises(Exception, match="nonexistent_model_xyz"):
        create_model(ModelConfig(name="timm/nonexistent_model_xyz"), 7, 32)


def _grads_after_backward(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.arange(x.shape[0]) % NUM_CLASSES).backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("mode", ["block", "stage"])
@pytest.mark.parametrize("arch", ["resnet", "vit"])
def test_activation_checkpointing_modes_give_the_same_gradients(arch, mode):
    import torchvision

    from imgtrain.models import apply_activation_checkpointing

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        if arch == "resnet":
            return create_model(ModelConfig(name="resnet18", small_input=True), NUM_CLASSES, 16)
        # A tiny torchvision ViT (the same classes as vit_b_16): 6 encoder blocks.
        return torchvision.models.VisionTransformer(
            image_size=16,
            patch_size=4,
            num_layers=6,
            num_heads=2,
            hidden_dim=16,
            mlp_dim=32,
            num_classes=NUM_CLASSES,
        )

    plain, ckpt = build(), build()
    segments = apply_activation_checkpointing(ckpt, mode)
    assert (
        segments
        == {("resnet", "block"): 8, ("resnet", "stage"): 4, ("vit", "block"): 6, ("vit", "stage"): 4}[
            (arch, mode)
        ]
    )
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    # BatchNorm/dropout behave the same in both: same batch, no dropout in the tiny ViT.
    for a, b in zip(_grads_after_backward(plain, x), _grads_after_backward(ckpt, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_config_accepts_modes_and_old_booleans():
    assert (
        load_config(None, ["model.activation_checkpointing=stage"]).model.activation_checkpointing == "stage"
    )
    assert (
        load_config(None, ["model.activation_checkpointing=true"]).model.activation_checkpointing == "block"
    )
    assert load_config(None, ["model.activation_checkpointing=off"]).model.activation_checkpointing == "off"
    with pytest.raises(ValueError, match="model.activation_checkpointing"):
        load_config(None, ["model.activation_checkpointing=layer"])
