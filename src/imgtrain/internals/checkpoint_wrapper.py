"""Activation checkpointing of one block through torch's ``checkpoint_wrapper``, which lives in a private
module (``torch.distributed.algorithms._checkpoint``; torchtitan and torch's FSDP docs use it too). It is
used rather than ``torch.utils.checkpoint`` by hand because it also strips its own prefix from state_dict
keys, so checkpoints load the same with activation checkpointing on or off."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

PRIVATE_SYMBOL = (
    "torch.distributed.algorithms._checkpoint.checkpoint_wrapper (checkpoint_wrapper, CheckpointImpl)"
)


def checkpointed(block: nn.Module) -> nn.Module:
    """``block``, recomputed in backward instead of keeping its activations (non-reentrant), with the
    state_dict keys of ``block`` itself."""
    return checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
