"""What a start decides and says about the world size: the elastic batch policy (keep_global's reference
world size, both directions of a change) and, on one process without a process group, no claim about
collectives that do not exist."""

import json
import logging

import pytest

from imgtrain.config import load_config
from imgtrain.distributed.launch import MAX_WORLD_SIZE_ENV
from imgtrain.optim import scaled_lr
from imgtrain.train.trainer import Trainer

from conftest import TINY


def _setup(tmp_path, image_folder, monkeypatch, overrides=(), max_world: int | None = None):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", MAX_WORLD_SIZE_ENV):
        monkeypatch.delenv(k, raising=False)
    if max_world is not None:
        monkeypatch.setenv(MAX_WORLD_SIZE_ENV, str(max_world))
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.root={image_folder}",
            *TINY,
            "training.batch_size=4",
            *overrides,
        ],
    )
    trainer = Trainer(cfg).setup()
    trainer.close()
    lines = (tmp_path / "run" / "logs" / "rank0.jsonl").read_text().splitlines()
    return trainer, [json.loads(line)["message"] for line in lines]


def test_one_process_claims_no_bytes_handed_to_collectives(tmp_path, image_folder, monkeypatch):
    trainer, messages = _setup(tmp_path, image_folder, monkeypatch)
    assert trainer.info.backend is None
    assert not [m for m in messages if "collectives" in m], messages


def test_one_process_says_a_requested_compression_is_unused(tmp_path, image_folder, monkeypatch):
    _, messages = _setup(tmp_path, image_folder, monkeypatch, ["distributed.compression=fp16"])
    assert "gradient compression fp16: unused, one process has no collectives" in messages
    assert not [m for m in messages if "handed to collectives" in m]


def test_first_start_below_the_launchers_world_size_keeps_the_full_jobs_global_batch(
    tmp_path, image_folder, monkeypatch
):
    """`imgtrain launch --nnodes=1:2` on a node that starts alone: the global batch is that of 2 processes,
    by accumulation, as if the second node were there."""
    trainer, messages = _setup(tmp_path, image_folder, monkeypatch, max_world=2)
    assert (trainer.info.world_size, trainer.reference_world_size) == (1, 2)
    assert (trainer.accumulation, trainer.global_batch) == (2, 8)
    assert trainer.peak_lr == pytest.approx(scaled_lr(trainer.cfg.training, 8))
    assert any(
        m.startswith("elastic: world size 1 at the first start, 2 for the whole job")
        and "policy keep_global: accumulation 2, global batch 8" in m
        for m in messages
    ), messages


@pytest.mark.parametrize(("previous", "world", "accumulation"), [(1, 2, 1), (2, 1, 2)])
def test_every_change_of_world_size_is_logged_with_the_decision(previous, world, accumulation, caplog):
    """Resumed from a checkpoint of another world size, whichever way: keep_global keeps the job's global
    batch (reference 2 x 4) and says so."""
    from types import SimpleNamespace

    trainer = Trainer(load_config(None, ["training.batch_size=4"]))
    trainer.info = SimpleNamespace(world_size=world)
    trainer.reference_world_size, trainer.previous_world_size = 2, previous
    with caplog.at_level(logging.WARNING, logger="imgtrain.train.elastic"):
        trainer._apply_elastic_policy()
    assert (trainer.accumulation, trainer.global_batch) == (accumulation, 8)
    assert (
        f"elastic: world size changed {previous} -> {world}; policy keep_global: accumulation "
        f"{accumulation}, global batch 8"
    ) in caplog.text


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--nnodes=1:2", "--nproc-per-node=1", "-m", "imgtrain", "train"], {}, 2),
        (
            ["--nnodes", "2:4", "--nproc-per-node", "8", "train", "--nnodes=9"],
            {},
            32,
        ),  # after the command: not ours
        (["--standalone", "--nproc-per-node=2", "train"], {}, 2),
        (["-m", "imgtrain", "train"], {"PET_NNODES": "1:3", "PET_NPROC_PER_NODE": "2"}, 6),
        (["--nnodes=1:2", "--nproc-per-node=gpu", "train"], {}, None),  # torch counts the GPUs later
    ],
)
def test_launcher_tells_workers_the_jobs_largest_world_size(argv, env, expected):
    from imgtrain.distributed.launch import expected_max_world_size, max_world_size_from_launcher

    assert expected_max_world_size(argv, env) == expected
    told = {} if expected is None else {MAX_WORLD_SIZE_ENV: str(expected)}
    assert max_world_size_from_launcher(told) == expected
