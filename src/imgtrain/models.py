"""Model registry: name -> nn.Module (torchvision, timm, and imgtrain's small models), plus
activation checkpointing."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

from imgtrain.config import ModelConfig
from imgtrain.errors import ConfigError
from imgtrain.internals.checkpoint_wrapper import checkpointed
from imgtrain.model_names import IMGTRAIN_MODELS, TIMM_PREFIX, import_timm, torchvision_models

log = logging.getLogger(__name__)

_SMALL_MODELS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {}


def register_model(name: str):
    # The config checks model.name without importing this module: the name must be listed there too.
    assert name in IMGTRAIN_MODELS, f"add {name!r} to model_names.IMGTRAIN_MODELS"

    def deco(fn: Callable[[ModelConfig, int], nn.Module]):
        _SMALL_MODELS[name] = fn
        return fn

    return deco


@register_model("simple_cnn")
def simple_cnn(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Two conv layers and a linear head, no normalization layers: a model whose output does not depend
    on how a batch is split across ranks, used by the equivalence tests and tiny smoke runs."""
    w = cfg.width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * w, num_classes),
    )


def list_models() -> list[str]:
    """Every name ``model.name`` accepts: imgtrain's own models, torchvision's classifiers and, where timm
    is installed, ``timm/<name>`` for each of timm's architectures (a pretrained tag, ``.a1_in1k``, may be
    appended to those)."""
    timm = import_timm()
    timm_names = [TIMM_PREFIX + n for n in timm.list_models()] if timm is not None else []
    return sorted(_SMALL_MODELS) + torchvision_models() + timm_names


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The function that builds ``name`` (imgtrain's, torchvision's or timm's), found without building it."""
    if name in _SMALL_MODELS:
        return _SMALL_MODELS[name]
    if name.startswith(TIMM_PREFIX):
        timm = import_timm()
        if timm is None:
            raise ConfigError(
                "model.name", name, "a model of an installed library: pip install 'imgtrain[timm]'"
            )
        arch = name[len(TIMM_PREFIX) :].split(".", 1)[0]  # timm/<arch>.<pretrained tag>
        if not timm.is_model(arch):
            raise ConfigError("model.name", name, "a timm model (timm.list_models())")
        return timm.models.model_entrypoint(arch)
    if name in torchvision_models():
        return torchvision.models.get_model_builder(name)
    raise ConfigError(
        "model.name",
        name,
        "a known model; known: "
        + ", ".join(
            sorted(_SMALL_MODELS) + torchvision_models() + [f"{TIMM_PREFIX}<name> (timm.list_models())"]
        ),
    )


def _small_input_resnet(model: torchvision.models.ResNet) -> None:
    # CIFAR-style stem: at 32 px a 7x7/2 conv plus max-pool would leave 8x8 maps before layer1.
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


class _SegmentCheckpointedSequential(nn.Sequential):
    """A Sequential run as ``segments`` checkpointed segments (torch's checkpoint_sequential); its
    children and so its state_dict keys are those of the Sequential it replaces."""

    def __init__(self, seq: nn.Sequential, segments: int):
        super().__init__(OrderedDict(seq.named_children()))
        self.segments = segments

    def forward(self, x):
        if not torch.is_grad_enabled():
            return super().forward(x)
        return checkpoint_sequential(self, self.segments, x, use_reentrant=False)


def apply_activation_checkpointing(model: nn.Module, mode: str = "block") -> int:
    """Checkpoint per residual block / transformer block (``block``) or per ResNet stage / group of
    transformer blocks (``stage``: 4 segments, like a ResNet's 4 stages). timm models use timm's own
    switch, which picks its granularity itself. Returns how many segments are recomputed (0: the model
    has no known structure to checkpoint)."""
    count = 0
    if isinstance(model, torchvision.models.ResNet):
        for name in ("layer1", "layer2", "layer3", "layer4"):
            stage = getattr(model, name)
            if mode == "stage":
                setattr(model, name, checkpointed(stage))
                count += 1
                continue
            for i in range(len(stage)):
                stage[i] = checkpointed(stage[i])
                count += 1
    elif isinstance(model, torchvision.models.VisionTransformer):
        layers = model.encoder.layers
        if mode == "stage":
            count = min(4, len(layers))
            model.encoder.layers = _SegmentCheckpointedSequential(layers, count)
        else:
            for i in range(len(layers)):
                layers[i] = checkpointed(layers[i])
                count += 1
    elif hasattr(model, "set_grad_checkpointing"):  # timm models
        model.set_grad_checkpointing(True)
        count = 1
    return count


def create_model(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    name = cfg.name
    build = model_entrypoint(name)
    if name in _SMALL_MODELS:
        model = build(cfg, num_classes)
    elif name.startswith(TIMM_PREFIX):
        # timm loads published weights and replaces their head itself (its reset_classifier).
        model = import_timm().create_model(
            name[len(TIMM_PREFIX) :], pretrained=cfg.pretrained, num_classes=num_classes
        )
    else:
        model = _torchvision_model(name, build, cfg.pretrained, num_classes, image_size)
        if cfg.small_input and isinstance(model, torchvision.models.ResNet):
            _small_input_resnet(model)
    if cfg.activation_checkpointing != "off" and not apply_activation_checkpointing(
        model, cfg.activation_checkpointing
    ):
        log.warning(
            "model.activation_checkpointing=%s: not supported for '%s' (torchvision ResNets and ViTs, "
            "and timm models with set_grad_checkpointing, are); training without it",
            cfg.activation_checkpointing,
            name,
        )
    return model


def _torchvision_model(
    name: str, build: Callable[..., nn.Module], pretrained: bool, num_classes: int, image_size: int
) -> nn.Module:
    kwargs: dict = {}
    if name.startswith("vit_"):
        kwargs["image_size"] = image_size
    if not pretrained:
        if name in ("googlenet", "inception_v3"):
            # Their auxiliary classifiers make forward return a tuple in training; the loop trains the main
            # one. (With published weights torchvision loads and then drops them itself.)
            kwargs["aux_logits"] = False
        return build(weights=None, num_classes=num_classes, **kwargs)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    if "image_size" in kwargs and kwargs["image_size"] != weights.meta["min_size"][0]:
        # A ViT's position embeddings are published for one image size.
        raise ConfigError(
            "data.image_size",
            image_size,
            f"{weights.meta['min_size'][0]} for a pretrained {name} "
            "(the size its published position embeddings were trained at)",
        )
    # Published weights come with 1000 classes: load them as published, then replace the head.
    model = build(weights=weights, **kwargs)
    replace_head(model, num_classes)
    return model


# Where torchvision's classifiers keep their last layer: ResNet, RegNet, GoogLeNet, Inception and
# ShuffleNet `fc`; ViT `heads.head`; Swin `head`; the others `classifier` (a layer or a Sequential ending
# in one; SqueezeNet's is a 1x1 convolution followed by pooling).
_HEAD_PATHS = ("fc", "heads.head", "head", "classifier")


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Give ``model`` a new, freshly initialized last layer with ``num_classes`` outputs: timm's
    ``reset_classifier`` for timm models, else the last Linear (or 1x1 Conv2d) at torchvision's places."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return
    for path in _HEAD_PATHS:
        try:
            head = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(head, nn.Sequential):
            index = next(
                (i for i in reversed(range(len(head))) if isinstance(head[i], nn.Linear | nn.Conv2d)), None
            )
            if index is None:
                continue
            path, head = f"{path}.{index}", head[index]
        if isinstance(head, nn.Linear):
            new: nn.Module = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
        elif isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1):
            new = nn.Conv2d(head.in_channels, num_classes, 1, bias=head.bias is not None)
        else:
            continue
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent), attr, new.to(head.weight.device))
        return
    raise ConfigError(
        "model.pretrained",
        True,
        f"false for {type(model).__name__} (no classifier layer at "
        f"{', '.join(_HEAD_PATHS)} to replace for a new class count)",
    )
