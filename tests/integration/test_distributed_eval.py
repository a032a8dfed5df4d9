"""Exact distributed evaluation: 3 Gloo processes over 11 validation files count each good one once and
agree with one process (tests/unit/test_evaluate.py checks the single-process answer itself)."""

from __future__ import annotations

import datetime
import json
import multiprocessing
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imgtrain.distributed.process_group import DistInfo

from conftest import evaluate_known_models

WORLD = 3


def _worker(rank: int, world: int, init_file: str, root: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        info = DistInfo(
            rank=rank,
            local_rank=rank,
            world_size=world,
            device=torch.device("cpu"),
            backend="gloo",
            node="test",
            restart_count=0,
        )
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps(evaluate_known_models(root, info)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_three_process_eval_matches_single_process(eval_root, single_process_eval, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # A fork server that has imported torch once starts the 3 ranks faster than 3 fresh interpreters.
    multiprocessing.set_forkserver_preload(
        ["torch", "torchvision", "imgtrain.data", "imgtrain.train.evaluate"]
    )
    mp.start_processes(
        _worker,
        args=(WORLD, str(tmp_path / "pg_init"), str(eval_root), str(out_dir)),
        nprocs=WORLD,
        join=True,
        start_method="forkserver",
    )
    results = [json.loads((out_dir / f"{r}.json").read_text()) for r in range(WORLD)]
    for res in results:
        for name in ("const", "cnn"):
            assert res[name]["count"] == 10  # every good image exactly once across the ranks
            assert res[name]["bad"] == 1
            assert res[name]["top1"] == pytest.approx(single_process_eval[name]["top1"], abs=1e-9)
            assert res[name]["top5"] == pytest.approx(single_process_eval[name]["top5"], abs=1e-9)
            assert res[name]["loss"] == pytest.approx(single_process_eval[name]["loss"], rel=1e-6)
        assert res["const"]["top1"] == pytest.approx(70.0)
