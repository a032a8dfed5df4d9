"""Resumable, rank-sharded batch sampling.

The epoch's order is one permutation of the whole dataset, a function of (seed, epoch) alone. It is cut
into *global* micro-batches of ``world_size * batch_size`` samples; rank r takes the r-th slice of each.
So the samples that form a global batch do not depend on the world size (2 processes x B see the same
samples per step as 1 process x 2B), and a position inside the epoch is one number, the count of samples
already consumed, which stays meaningful when the world size changes on resume: the rest of the epoch is
re-sharded over the new ranks and every sample is still seen exactly once.

The last global batch of an epoch may be short. It is spread over the ranks as evenly as possible; a rank
that would get no sample gets one padding sample of weight 0 instead, so that every rank runs the same
number of steps (DDP needs that) without any sample counting twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from imgtrain.data.folder import SampleRef
from imgtrain.errors import CheckpointError


@dataclass
class SamplerState:
    epoch: int = 0
    consumed: int = 0  # samples of this epoch already trained on, summed over all ranks


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def split_evenly(items: list[int], parts: int) -> list[list[int]]:
    """Contiguous split into ``parts`` pieces whose sizes differ by at most one (larger ones first)."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        size = q + (1 if p < r else 0)
        out.append(items[start : start + size])
        start += size
    return out


class ShardedBatchSampler:
    """Yields this rank's micro-batches (lists of :class:`SampleRef`) for the current epoch.

    Set ``state`` (epoch and consumed count) before iterating; the trainer advances ``consumed`` itself
    as it trains, so a checkpoint taken at any step boundary records the exact position.
    """

    def __init__(
        self, dataset_len: int, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool = True
    ):
        if dataset_len <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n = dataset_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.state = SamplerState()
        self.share: Callable[[list[int]], list[int]] | None = None
        """Picks this process's samples of a global micro-batch instead of the rank's slice: set by
        replicated mode, where the share depends on which replica groups are present (distributed.replicas)."""

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def global_batches(self) -> list[list[int]]:
        """The remaining global micro-batches of the current epoch (identical on every rank)."""
        perm = epoch_permutation(self.n, self.seed, self.state.epoch, self.shuffle)
        rest = perm[self.state.consumed :]
        gb = self.global_batch
        return [rest[i : i + gb] for i in range(0, len(rest), gb)]

    def plan(self) -> list[tuple[list[SampleRef], int]]:
        """This rank's micro-batches with the real (non-padding) size of each global micro-batch."""
        out = []
        for gbatch in self.global_batches():
            if self.share is not None:
                mine = self.share(gbatch)
            elif len(gbatch) == self.global_batch:
                mine = gbatch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            else:
                mine = split_evenly(gbatch, self.world_size)[self.rank]
            ep = self.state.epoch
            refs = [SampleRef(i, 1.0, ep) for i in mine] or [SampleRef(gbatch[0], 0.0, ep)]
            out.append((refs, len(gbatch)))
        return out

    def global_sizes(self) -> list[int]:
        """Real sample count of each remaining global micro-batch (what :meth:`plan` pairs them with)."""
        rest = self.n - self.state.consumed
        full, tail = divmod(rest, self.global_batch)
        return [self.global_batch] * full + ([tail] if tail else [])

    def __iter__(self):
        for refs, _ in self.plan():
            yield refs

    def __len__(self) -> int:
        rest = self.n - self.state.consumed
        return (rest + self.global_batch - 1) // self.global_batch

    def steps_per_epoch(self) -> int:
        return (self.n + self.global_batch - 1) // self.global_batch

    def state_dict(self) -> dict:
        return {
            "epoch": self.state.epoch,
            "consumed": self.state.consumed,
            "seed": self.seed,
            "dataset_len": self.n,
        }

    def load_state_dict(self, sd: dict) -> None:
        if int(sd["dataset_len"]) != self.n:
            raise CheckpointError(
                f"the checkpoint was taken on a training split of {sd['dataset_len']} samples, "
                f"the data now has {self.n}"
            )
        self.state = SamplerState(epoch=int(sd["epoch"]), consumed=int(sd["consumed"]))


def eval_shard(n: int, rank: int, world_size: int) -> list[int]:
    """Validation indices of one rank: every index on exactly one rank, no padding duplicates."""
    return list(range(rank, n, world_size))
