"""What a run must carry to continue exactly: the progress counters and every RNG stream, as plain data
(a checkpoint holds only tensors and numbers, so that weights_only=True loads it)."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
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


@dataclass
class Progress:
    """Counters that only the trainer advances; saved in every checkpoint."""

    epoch: int = 0
    step: int = 0  # optimizer steps since the start of the run
    images_seen: int = 0  # training samples trained on (no padding, no unreadable file), all ranks
    bad_images: int = 0  # unreadable training files skipped, all ranks, every epoch and restart
    train_seconds: float = 0.0  # wall time spent in training epochs, summed over restarts
    restarts: int = 0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        vars(self).update(asdict(Progress(**sd)))  # in place: the checkpoint manager holds this object


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG streams as plain data (loadable with weights_only=True)."""
    state = {
        "python": random.getstate(),
        "numpy": mt19937_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(mt19937_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
