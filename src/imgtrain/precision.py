"""The names of reduced precisions in the config (``optimization.mixed_precision``,
``distributed.compression``) and the torch dtypes they stand for."""

from __future__ import annotations

import torch

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(name: str | None) -> torch.dtype | None:
    """``bf16`` / ``fp16`` -> torch's dtype; any other name (``none``, ``fp32``) -> None: full precision."""
    return _AMP_DTYPES.get(name) if name else None
