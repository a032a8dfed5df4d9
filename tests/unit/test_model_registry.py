"""Contract tests over the model registry (timm's tests/test_models.py habit): every family that
``list_models()`` offers builds at its smallest input, trains a step, round-trips its state_dict and has
``num_classes`` outputs, with and without published weights (their download mocked: nothing is fetched)."""

from __future__ import annotations

import pytest
import torch
import torchvision

from imgtrain.config import ConfigError, ModelConfig
from imgtrain.model_names import COMMON_TORCHVISION_MODELS, IMGTRAIN_MODELS, TIMM_PREFIX
from imgtrain.models import create_model, list_models, model_entrypoint, replace_head

NUM_CLASSES = 7

# One or two models per family, each at the smallest input it accepts (inception_v3: 75 px).
FAST = {
    "simple_cnn": 8,
    "resnet18": 32,
    "mobilenet_v3_small": 32,
    "efficientnet_b0": 32,
    "regnet_x_400mf": 32,
    "shufflenet_v2_x0_5": 32,
    "mnasnet0_5": 32,
    "squeezenet1_1": 32,
    "timm/resnet10t": 32,
    "timm/test_vit": 32,
}
SLOW = {
    "densenet121": 32,
    "googlenet": 32,
    "convnext_tiny": 32,
    "swin_t": 32,
    "vit_b_32": 32,
    "inception_v3": 75,
    "timm/test_efficientnet": 32,
}
# Heads only (built on the meta device: no memory, no initialization), one per torchvision family that
# is too big to train a step of here.
FAMILIES = (
    "alexnet",
    "vgg11",
    "maxvit_t",
    "wide_resnet50_2",
    "resnext50_32x4d",
    "mobilenet_v2",
    "swin_v2_t",
    "efficientnet_v2_s",
    "convnext_tiny",
    "swin_t",
    "vit_b_16",
    "densenet121",
    "googlenet",
    "inception_v3",
    "shufflenet_v2_x0_5",
    "mnasnet0_5",
    "squeezenet1_0",
    "resnet18",
    "efficientnet_b0",
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _contract(name: str, size: int) -> None:
    if name.startswith(TIMM_PREFIX):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    model = create_model(ModelConfig(name=name, width=8), NUM_CLASSES, size)
    model.train()
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, NUM_CLASSES - 1])).backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
    )

    # A fresh model of the same name loads the state_dict and then computes the same outputs.
    torch.manual_seed(1)
    other = create_model(ModelConfig(name=name, width=8), NUM_CLASSES, size)
    other.load_state_dict(model.state_dict())
    model.eval()
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))


@pytest.mark.parametrize("name", list(FAST))
def test_model_contract(name):
    _contract(name, FAST[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW))
def test_model_contract_larger_models(name):
    _contract(name, SLOW[name])


def test_every_listed_name_resolves_to_a_builder():
    names = list_models()
    assert set(IMGTRAIN_MODELS) | set(COMMON_TORCHVISION_MODELS) <= set(names)
    assert set(torchvision.models.list_models(module=torchvision.models)) <= set(names)
    for name in names:
        assert callable(model_entrypoint(name)), name
    with pytest.raises(ConfigError, match="resnet19"):
        model_entrypoint("resnet19")


@pytest.mark.parametrize("family", FAMILIES)
def test_head_is_replaced_for_every_torchvision_family(family):
    kwargs = {"aux_logits": False} if family in ("googlenet", "inception_v3") else {}
    size = 299 if family == "inception_v3" else 224
    with torch.device("meta"):
        model = torchvision.models.get_model(family, weights=None, **kwargs)  # 1000 classes, as published
        replace_head(model, NUM_CLASSES)
        assert model.eval()(torch.empty(2, 3, size, size)).shape == (2, NUM_CLASSES)


def test_head_of_a_timm_model_is_replaced_by_timm():
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_vit", num_classes=1000)
    replace_head(model, NUM_CLASSES)
    assert model(torch.randn(1, 3, 160, 160)).shape == (1, NUM_CLASSES)


PRETRAINED = (
    "resnet18",
    "efficientnet_b0",
    "convnext_tiny",
    "swin_t",
    "vit_b_16",
    "mobilenet_v3_small",
    "densenet121",
    "squeezenet1_1",
    "googlenet",
    "maxvit_t",
)


@pytest.fixture
def published_weights(monkeypatch):
    """Stands in for the download of torchvision's weights, which records the weights asked for and
    returns the state_dict of a 1000-class model of the same architecture (built on the meta device)."""
    asked: list = []

    def get_state_dict(weights, *args, **kwargs):
        asked.append(weights)
        (name,) = [n for n in PRETRAINED if torchvision.models.get_model_weights(n) is type(weights)]
        # Published googlenet weights include its auxiliary heads.
        aux = {"aux_logits": True, "init_weights": False} if name == "googlenet" else {}
        with torch.device("meta"):
            return torchvision.models.get_model(name, weights=None, **aux).state_dict()

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", get_state_dict)
    return asked


@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_loads_published_weights_and_replaces_the_head(name, published_weights):
    with torch.device("meta"):
        model = create_model(ModelConfig(name=name, pretrained=True), NUM_CLASSES, 224)
        assert model.eval()(torch.empty(2, 3, 224, 224)).shape == (2, NUM_CLASSES)
    assert published_weights == [torchvision.models.get_model_weights(name).DEFAULT]


def test_pretrained_vit_at_another_image_size_is_a_config_error(published_weights):
    with pytest.raises(ConfigError, match="data.image_size"):
        create_model(ModelConfig(name="vit_b_16", pretrained=True), NUM_CLASSES, 32)
    assert published_weights == []


def test_pretrained_timm_model_asks_timm_for_its_weights(monkeypatch):
    pytest.importorskip("timm")
    import timm.models._builder as builder

    asked = []
    monkeypatch.setattr(builder, "load_pretrained", lambda model, *a, **k: asked.append(type(model).__name__))
    model = create_model(ModelConfig(name="timm/test_vit", pretrained=True), NUM_CLASSES, 160)
    assert asked == ["VisionTransformer"]
    assert model(torch.randn(1, 3, 160, 160)).shape == (1, NUM_CLASSES)


def test_pretrained_weights_are_kept_and_only_the_head_is_new(monkeypatch):
    torch.manual_seed(3)
    published = torchvision.models.mobilenet_v3_small(weights=None).state_dict()
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", lambda *a, **k: published)
    model = create_model(ModelConfig(name="mobilenet_v3_small", pretrained=True), NUM_CLASSES, 32)
    ours = model.state_dict()
    head = {"classifier.3.weight", "classifier.3.bias"}
    assert ours.keys() == published.keys()
    for key in published.keys() - head:
        torch.testing.assert_close(ours[key], published[key], rtol=0, atol=0, msg=key)
    assert ours["classifier.3.weight"].shape == (NUM_CLASSES, published["classifier.3.weight"].shape[1])
