"""Exact distributed evaluation: 3 Gloo processes over 11 validation files count each good one once."""

from __future__ import annotations

import datetime
import json
import math
import multiprocessing
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from imgtrain.config import DataConfig, ModelConfig
from imgtrain.data import build_data
from imgtrain.data.sampler import eval_shard
from imgtrain.data.transforms import DeviceNormalize
from imgtrain.distributed.process_group import DistInfo
from imgtrain.models import create_model
from imgtrain.train.evaluate import evaluate_model

from conftest import make_image_folder

CPU = torch.device("cpu")
WORLD = 3
CONST_LOGITS = [2.0, 1.0, 0.0]  # always predicts class_0, then class_1, then class_2
VAL_COUNTS = (7, 2, 1)  # good val images per class: 10, not divisible by 3 (plus one corrupt file)


class ConstantModel(nn.Module):
    """Logits that ignore the image: top-1 is right exactly on class_0 images."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(CONST_LOGITS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def _make_val_set(root: Path) -> Path:
    make_image_folder(root, classes=3, train_per_class=1, val_per_class=max(VAL_COUNTS))
    for c, keep in enumerate(VAL_COUNTS):
        for f in sorted((root / "val" / f"class_{c}").iterdir())[keep:]:
            f.unlink()
    (root / "val" / "class_1" / "corrupt.JPEG").write_bytes(b"\xff\xd8 not really a jpeg" * 20)
    return root


def _evaluate(root: str, info: DistInfo) -> dict:
    cfg = DataConfig(root=root, image_size=16, val_resize=16, workers=0)
    data = build_data(cfg, batch_size=2, rank=info.rank, world_size=info.world_size, seed=0, device=CPU)
    normalize = DeviceNormalize(cfg.mean, cfg.std, CPU)
    torch.manual_seed(0)
    cnn = create_model(ModelConfig(name="simple_cnn", width=4), data.num_classes, cfg.image_size)
    out = {"val_files": len(data.val_set)}
    for name, model in (("const", ConstantModel()), ("cnn", cnn)):
        res = evaluate_model(model, data.val_loader, normalize, info)
        out[name] = {"top1": res.top1, "top5": res.top5, "loss": res.loss, "count": res.count, "bad": res.bad}
    return out


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
            device=CPU,
            backend="gloo",
            node="test",
            restart_count=0,
        )
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps(_evaluate(root, info)))
    finally:
        dist.destroy_process_group()


def _expected_const_loss() -> float:
    lse = math.log(sum(math.exp(v) for v in CONST_LOGITS))
    return sum(n * (lse - CONST_LOGITS[c]) for c, n in enumerate(VAL_COUNTS)) / sum(VAL_COUNTS)


@pytest.fixture(scope="module")
def val_root(tmp_path_factory) -> Path:
    return _make_val_set(tmp_path_factory.mktemp("evaldata") / "data")


@pytest.fixture(scope="module")
def single(val_root) -> dict:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = DistInfo(
            rank=0, local_rank=0, world_size=1, device=CPU, backend=None, node="test", restart_count=0
        )
        return _evaluate(str(val_root), info)
    finally:
        torch.set_num_threads(n)


def test_single_process_eval_is_exact(single):
    assert single["val_files"] == 11
    const = single["const"]
    assert const["count"] == 10 and const["bad"] == 1  # the corrupt file is counted as bad, not scored
    assert const["top1"] == pytest.approx(70.0)
    assert const["top5"] == pytest.approx(100.0)
    assert const["loss"] == pytest.approx(_expected_const_loss())
    assert single["cnn"]["count"] == 10


def test_eval_restores_train_mode(val_root):
    model = ConstantModel().train()
    info = DistInfo(0, 0, 1, CPU, None, "test", 0)
    data = build_data(
        DataConfig(root=str(val_root), image_size=16, val_resize=16, workers=0), 4, 0, 1, 0, CPU
    )
    evaluate_model(model, data.val_loader, DeviceNormalize([0.5] * 3, [0.5] * 3, CPU), info)
    assert model.training


def test_val_shards_do_not_pad():
    # 11 files over 3 ranks: 4 + 4 + 3, no index twice (a padded DistributedSampler would score 12).
    shards = [eval_shard(11, r, WORLD) for r in range(WORLD)]
    assert sorted(len(s) for s in shards) == [3, 4, 4]
    assert sorted(i for s in shards for i in s) == list(range(11))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_three_process_eval_matches_single_process(val_root, single, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # A fork server that has imported torch once starts the 3 ranks faster than 3 fresh interpreters.
    multiprocessing.set_forkserver_preload(
        ["torch", "torchvision", "imgtrain.data", "imgtrain.train.evaluate"]
    )
    mp.start_processes(
        _worker,
        args=(WORLD, str(tmp_path / "pg_init"), str(val_root), str(out_dir)),
        nprocs=WORLD,
        join=True,
        start_method="forkserver",
    )
    results = [json.loads((out_dir / f"{r}.json").read_text()) for r in range(WORLD)]
    for res in results:
        for name in ("const", "cnn"):
            assert res[name]["count"] == 10  # every good image exactly once across the ranks
            assert res[name]["bad"] == 1
            assert res[name]["top1"] == pytest.approx(single[name]["top1"], abs=1e-9)
            assert res[name]["top5"] == pytest.approx(single[name]["top5"], abs=1e-9)
            assert res[name]["loss"] == pytest.approx(single[name]["loss"], rel=1e-6)
        assert res["const"]["top1"] == pytest.approx(70.0)
