"""Exact evaluation over 11 validation files, one corrupt: each good one counted once, the shards of 3 ranks
without padding (tests/integration/test_distributed_eval.py runs the 3 ranks)."""

from __future__ import annotations

import math

import pytest
import torch

from imgtrain.config import DataConfig
from imgtrain.data import build_data
from imgtrain.data.sampler import eval_shard
from imgtrain.data.transforms import DeviceNormalize
from imgtrain.distributed.process_group import DistInfo
from imgtrain.train.evaluate import evaluate_model

from conftest import EVAL_LOGITS, EVAL_VAL_COUNTS, constant_model

CPU = torch.device("cpu")
WORLD = 3


def _expected_const_loss() -> float:
    lse = math.log(sum(math.exp(v) for v in EVAL_LOGITS))
    return sum(n * (lse - EVAL_LOGITS[c]) for c, n in enumerate(EVAL_VAL_COUNTS)) / sum(EVAL_VAL_COUNTS)


def test_single_process_eval_is_exact(single_process_eval):
    single = single_process_eval
    assert single["val_files"] == 11
    const = single["const"]
    assert const["count"] == 10 and const["bad"] == 1  # the corrupt file is counted as bad, not scored
    assert const["top1"] == pytest.approx(70.0)
    assert const["top5"] == pytest.approx(100.0)
    assert const["loss"] == pytest.approx(_expected_const_loss())
    assert single["cnn"]["count"] == 10


def test_eval_restores_train_mode(eval_root):
    model = constant_model().train()
    info = DistInfo(0, 0, 1, CPU, None, "test", 0)
    data = build_data(
        DataConfig(root=str(eval_root), image_size=16, val_resize=16, workers=0), 4, 0, 1, 0, CPU
    )
    evaluate_model(model, data.val_loader, DeviceNormalize([0.5] * 3, [0.5] * 3, CPU), info)
    assert model.training


def test_val_shards_do_not_pad():
    # 11 files over 3 ranks: 4 + 4 + 3, no index twice (a padded DistributedSampler would score 12).
    shards = [eval_shard(11, r, WORLD) for r in range(WORLD)]
    assert sorted(len(s) for s in shards) == [3, 4, 4]
    assert sorted(i for s in shards for i in s) == list(range(11))
