"""The trainer's DataLoader leaves the global RNG streams alone (its workers and a job-wide stop signal:
tests/integration/test_loader_signals.py)."""

from __future__ import annotations

import torch

from imgtrain.data.loader import WorkerLoader


def test_starting_an_epoch_leaves_the_global_rng_streams_alone():
    # A plain DataLoader draws its workers' base seed from the global torch generator at every iter(): a run
    # resumed mid-epoch (one iter() more than an uninterrupted run) would go on one draw ahead of it.
    loader = WorkerLoader(list(range(8)), batch_size=2)
    before = torch.get_rng_state()
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    iter(loader)
    assert torch.equal(torch.get_rng_state(), before)
