"""The names ``model.name`` accepts: imgtrain's own models, torchvision's classifiers and ``timm/<name>``.

Apart from models.py (which builds them) because the config checks the name when it loads, before torch
is imported: imgtrain's own names and torchvision's usual ones are answered without an import; any other
name asks torchvision's or timm's ``list_models`` (an import, no model built).
"""

from __future__ import annotations

import difflib

IMGTRAIN_MODELS = ("simple_cnn",)
"""imgtrain's own models (models.py registers a builder for each)."""

COMMON_TORCHVISION_MODELS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "vit_b_16",
    "wide_resnet50_2",
    "resnext50_32x4d",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
    "vit_b_32",
    "vit_l_16",
    "swin_t",
)
"""torchvision classifiers known without importing torchvision (all in torchvision >= 0.14)."""

TIMM_PREFIX = "timm/"


def torchvision_models() -> list[str]:
    """Every torchvision classifier (not detection, segmentation or video models)."""
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def import_timm():
    """timm, or None where it is not installed (an optional dependency)."""
    try:
        import timm
    except ImportError:
        return None
    return timm


def is_known(name: str) -> bool:
    if name in IMGTRAIN_MODELS or name in COMMON_TORCHVISION_MODELS:
        return True
    if name.startswith(TIMM_PREFIX):
        timm = import_timm()
        return timm is not None and timm.is_model(name[len(TIMM_PREFIX) :])  # a tag (name.tag) is accepted
    return name in torchvision_models()


def unknown_model_hint(name: str) -> str:
    """What to say about a name :func:`is_known` rejected: the close matches, or how to get timm."""
    timm = import_timm()
    if name.startswith(TIMM_PREFIX):
        if timm is None:
            return "a model of timm, which is not installed: pip install 'imgtrain[timm]'"
        close = difflib.get_close_matches(name[len(TIMM_PREFIX) :], timm.list_models(), n=5)
        return _hint("a timm model (timm.list_models())", [TIMM_PREFIX + c for c in close])
    if timm is not None and timm.is_model(name):
        return _hint("a known model name", [TIMM_PREFIX + name])
    known = list(IMGTRAIN_MODELS) + torchvision_models()
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    if timm is not None:
        close += [
            TIMM_PREFIX + c
            for c in difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.8)
            if TIMM_PREFIX + c not in close and c not in close
        ]
    return _hint(
        f"one of imgtrain's models ({', '.join(IMGTRAIN_MODELS)}), a torchvision classifier "
        "(torchvision.models.list_models()) or timm/<name>",
        close,
    )


def _hint(what: str, close: list[str]) -> str:
    return what + (f"; did you mean {', '.join(close)}?" if close else "")
