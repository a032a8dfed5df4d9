"""NumPy RNG states as plain data: a checkpoint holds only tensors and numbers (weights_only=True loads it)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def mt19937_to_plain(state: tuple) -> dict[str, Any]:
    """A legacy ``RandomState.get_state()`` tuple (MT19937) -> key tensor and numbers."""
    _, key, pos, has_gauss, gauss = state
    return {
        "key": torch.from_numpy(key.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def mt19937_from_plain(plain: dict[str, Any]) -> tuple:
    """Inverse of :func:`mt19937_to_plain`: the tuple ``RandomState.set_state`` takes."""
    return (
        "MT19937",
        plain["key"].numpy().astype(np.uint32),
        plain["pos"],
        plain["has_gauss"],
        plain["gauss"],
    )
