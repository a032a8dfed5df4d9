"""What every compression method shares: the byte counter and the base class, which is also the ``none``
method (DDP's own fp32 all-reduce, no hook)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from imgtrain.config import DistributedConfig
from imgtrain.registry import COMPRESSION


@dataclass
class CommCounter:
    """Bytes this rank handed to gradient collectives since the last ``take()``, by collective kind.

    ``wire_bytes`` turns them into what this rank sends under ring algorithms: an all-reduce of B bytes
    sends 2(N-1)/N x B, an all-gather of B bytes per rank sends (N-1) x B."""

    world_size: int
    allreduce: int = 0
    allgather: int = 0

    def add(self, kind: str, nbytes: int) -> None:
        setattr(self, kind, getattr(self, kind) + int(nbytes))

    def payload(self) -> int:
        return self.allreduce + self.allgather

    def wire_bytes(self) -> float:
        n = self.world_size
        return 2 * (n - 1) / n * self.allreduce + (n - 1) * self.allgather

    def take(self) -> tuple[int, float]:
        """(payload bytes, wire bytes) since the last call; resets the counts."""
        out = (self.payload(), self.wire_bytes())
        self.allreduce = self.allgather = 0
        return out


def _grad_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@COMPRESSION.register("none")
class Compression:
    """Base: no hook, DDP's fp32 all-reduce. Subclasses register a hook in ``register``."""

    method = "none"

    def __init__(self, ddp_model: nn.Module, cfg: DistributedConfig, world_size: int, backend: str | None):
        # Not ddp_model itself: DDP's reducer holds this object as its hook state, and a reference back
        # would be a cycle through C++ that the garbage collector cannot see, keeping the DDP module and
        # its process group alive until interpreter exit.
        self.cfg = cfg
        self.world_size = world_size
        self.backend = backend
        self.module = getattr(ddp_model, "module", ddp_model)
        self.params = _grad_params(self.module)
        self.names = {id(p): n for n, p in self.params}
        self.counter = CommCounter(world_size)
        self._fp32_bytes = sum(p.numel() * p.element_size() for _, p in self.params)

    def register(self, ddp_model: nn.Module) -> None:
        pass

    def expected_bytes_per_step(self) -> int:
        """Payload per step once compression runs (after any warm-up)."""
        return self._fp32_bytes

    def describe(self) -> str:
        return "off: DDP's fp32 all-reduce"

    def take_bytes(self, steps: int) -> tuple[float, float]:
        """(payload, wire) bytes per step over the last ``steps`` optimizer steps."""
        if self.method == "none":  # no hook sees the buckets: DDP all-reduces every gradient byte
            self.counter.add("allreduce", self._fp32_bytes * steps)
        payload, wire = self.counter.take()
        return payload / max(steps, 1), wire / max(steps, 1)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass
