"""A flat uint8 tensor allocated directly in shared memory, where a DataLoader worker's batch must be for
the hand-over to the main process. torch's own collate allocates it so, with the private
``UntypedStorage._new_shared``; the public ``share_memory_()`` allocates private memory first and then
copies it into a new segment."""

from __future__ import annotations

import torch

PRIVATE_SYMBOL = "torch.UntypedStorage._new_shared"


def shared_bytes(nbytes: int) -> torch.Tensor:
    """``nbytes`` uninitialized bytes of shared memory, as a 1-D uint8 tensor."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(nbytes))
