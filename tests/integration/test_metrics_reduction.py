"""The metrics processor's reduction over two real Gloo ranks: every rank gets the window summed over all
ranks (the record rank 0 writes speaks for the whole job), with each rank's own timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imgtrain.distributed.process_group import DistInfo
from imgtrain.monitoring.processor import MetricsProcessor

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _rank(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        info = DistInfo(rank, rank, 2, torch.device("cpu"), "gloo", "node-a", 0)
        p = MetricsProcessor(info, 1, [])
        # Rank 0 saw 4 samples (loss 8, 3 right), rank 1 saw 2 (loss 1, 1 right, 1 unreadable file).
        own = [8.0, 3, 4, 0] if rank == 0 else [1.0, 1, 2, 1]
        p.on_step(1, torch.tensor(own, dtype=torch.float64), 0.0, 1.0 + rank, 6, 0.1)
        totals = p.reduce_window()
        record = p.log_window(totals, step=1, epoch=0, lr=0.1)
        Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def test_window_is_summed_over_two_gloo_ranks(tmp_path):
    mp.spawn(_rank, args=(f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=2, join=True)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in records:
        assert r["loss"] == pytest.approx(9.0 / 6) and r["train_top1"] == pytest.approx(100 * 4 / 6)
        assert r["bad_images"] == 1
    assert [r["step_s"] for r in records] == [1.0, 2.0]  # timings stay each rank's own
