"""``fp16`` / ``bf16``: torch's built-in hooks (cast, all-reduce, cast back); half the bytes, no state."""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects (dist.GradBucket).

import functools

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from imgtrain.distributed.comm_hooks.base import Compression
from imgtrain.precision import amp_dtype
from imgtrain.registry import COMPRESSION


class _CastCompression(Compression):
    """fp16 / bf16: torch's built-in hooks; half the bytes, no state."""

    def __init__(self, *args, method: str):
        super().__init__(*args)
        self.method = method
        self.dtype = amp_dtype(method)
        self._inner = (
            default_hooks.fp16_compress_hook if method == "fp16" else default_hooks.bf16_compress_hook
        )

    def register(self, ddp_model: torch.nn.Module) -> None:
        ddp_model.register_comm_hook(self, _cast_hook)

    def expected_bytes_per_step(self) -> int:
        return sum(p.numel() for _, p in self.params) * torch.finfo(self.dtype).bits // 8

    def describe(self) -> str:
        return f"{self.method}: torch's built-in {self.method} hook"


def _cast_hook(state: _CastCompression, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    state.counter.add("allreduce", bucket.buffer().numel() * torch.finfo(state.dtype).bits // 8)
    return state._inner(None, bucket)


COMPRESSION.register("fp16")(functools.partial(_CastCompression, method="fp16"))
COMPRESSION.register("bf16")(functools.partial(_CastCompression, method="bf16"))
