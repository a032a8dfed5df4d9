"""torch's PowerSGD hook decides per gradient whether low-rank compression pays off with the private
``_should_compress``. imgtrain must make the same decision to lay out a bucket's P and Q exactly as the
hook does (checkpointing and byte accounting depend on it), so it calls that function here and only here.
"""

from __future__ import annotations

from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as _psgd

PRIVATE_SYMBOL = "torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook._should_compress"


def should_compress(rows: int, cols: int, rank: int, min_compression_rate: float) -> bool:
    """True when torch's PowerSGD hook compresses an ``rows`` x ``cols`` gradient at ``rank``."""
    return bool(_psgd._should_compress(rows, cols, rank, min_compression_rate)[0])
