"""DDP's static_graph: with a compression hook it trains to the same weights as without; with gradient
accumulation (no_sync), which torch's DDP cannot combine with it, the config is rejected. One process in a
real Gloo process group (the trainer wraps the model in DDP exactly as under torchrun)."""

import pytest
import torch

from imgtrain.config import ConfigError, load_config
from imgtrain.train.trainer import Trainer

from conftest import TINY, free_port


def _train(tmp_path, image_folder, monkeypatch, name: str, overrides: list[str]) -> tuple[dict, dict]:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / name}",
            f"data.root={image_folder}",
            *TINY,
            "training.batch_size=4",
            "training.epochs=1",
            "training.max_steps=4",
            "distributed.backend=gloo",
            *overrides,
        ],
    )
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        assert trainer.info.backend == "gloo"  # really wrapped in DDP
        before = {k: v.clone() for k, v in trainer.model_without_ddp.state_dict().items()}
        result = trainer.train()
        weights = {k: v.clone() for k, v in trainer.model_without_ddp.state_dict().items()}
        assert any(not torch.equal(before[k], weights[k]) for k in weights)  # it did train
    finally:
        trainer.close()
    return result, weights


def test_static_graph_with_gradient_accumulation_is_rejected_naming_the_key():
    # torch's DDP asserts on the first no_sync backward with static_graph (pytorch#143580).
    with pytest.raises(ConfigError, match="distributed.static_graph.*accumulation_steps"):
        load_config(None, ["distributed.static_graph=true", "optimization.accumulation_steps=2"])
    load_config(None, ["distributed.static_graph=true"])
    load_config(None, ["optimization.accumulation_steps=2"])


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["none", "onebit"])
def test_static_graph_gives_the_same_weights(tmp_path, image_folder, monkeypatch, compression):
    runs = {}
    for static in ("false", "true"):
        runs[static] = _train(
            tmp_path,
            image_folder,
            monkeypatch,
            f"{compression}_{static}",
            [
                f"distributed.static_graph={static}",
                f"distributed.compression={compression}",
                "distributed.onebit.warmup_steps=1",
            ],
        )
    (r0, w0), (r1, w1) = runs["false"], runs["true"]
    assert r0["steps"] == r1["steps"] == 4
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def test_elastic_shrink_needing_accumulation_with_static_graph_stops_naming_the_key():
    """A restart on fewer ranks that keeps the global batch needs accumulation: with static_graph it
    stops with a config error instead of torch's reducer assert."""
    from types import SimpleNamespace

    cfg = load_config(None, ["distributed.static_graph=true", "training.batch_size=8"])
    state = SimpleNamespace(
        cfg=cfg, reference_world_size=4, info=SimpleNamespace(world_size=2), accumulation=1
    )
    with pytest.raises(
        ConfigError, match="distributed.static_graph.*global batch 32 at world size 2 needs 2"
    ):
        Trainer._apply_elastic_policy(state)
