"""Gradient compression as DDP communication hooks (``distributed.compression``), one module per method:

- ``none`` (base.py): DDP's own fp32 all-reduce (no hook); the base class and the byte counter.
- ``fp16`` / ``bf16`` (fp16.py): torch's built-in hooks (cast, all-reduce, cast back).
- ``powersgd`` (powersgd.py): torch's built-in PowerSGD hook and state, wrapped so that (a) it works on
  Gloo with several buckets and (b) its state can be checkpointed by parameter name.
- ``onebit`` (onebit.py): 1-bit SGD with error feedback (Seide et al. 2014), our own hook: signs packed 8
  per byte plus one fp32 scale (mean |g|) per chunk of each gradient tensor, exchanged by all-gather.

Every method counts the bytes it hands to collectives (``CommCounter``) so the trainer can report the
volume per step. Compression state is rank-local; ``state_dict()`` returns it keyed by parameter name
(tensors and numbers only, loadable with ``weights_only=True``), because DDP's bucket layout in a
fresh process differs from the one it rebuilds after the first step, so bucket indices do not line up
across a restart. See docs/compression.md.
"""

from __future__ import annotations

from torch import nn

from imgtrain.config import DistributedConfig
from imgtrain.distributed.comm_hooks import fp16  # noqa: F401  (registers fp16 and bf16)
from imgtrain.distributed.comm_hooks.base import CommCounter, Compression
from imgtrain.distributed.comm_hooks.onebit import (
    OneBitCompression,
    onebit_decode,
    onebit_encode,
    pack_signs,
    signed_scales,
    unpack_signs,
)
from imgtrain.distributed.comm_hooks.powersgd import PowerSGDCompression
from imgtrain.registry import COMPRESSION

__all__ = [
    "CommCounter",
    "Compression",
    "OneBitCompression",
    "PowerSGDCompression",
    "create_compression",
    "onebit_decode",
    "onebit_encode",
    "pack_signs",
    "signed_scales",
    "unpack_signs",
]


def create_compression(
    ddp_model: nn.Module, cfg: DistributedConfig, world_size: int, backend: str | None
) -> Compression:
    """The configured method, its hook registered on ``ddp_model`` (a DDP module; with no process group
    nothing is registered and nothing is sent)."""
    comp: Compression = COMPRESSION[cfg.compression](ddp_model, cfg, world_size, backend)
    if backend is not None:
        comp.register(ddp_model)
    return comp
