"""The Prometheus exporter in one process: port scheme, labels, records to metrics, step-time phases,
straggler naming, and nothing at all when metrics are off."""

from __future__ import annotations

import logging
import socket
import urllib.request

import pytest
import torch
from torch import nn

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from imgtrain.config import ConfigError, load_config  # noqa: E402
from imgtrain.distributed.process_group import DistInfo  # noqa: E402
from imgtrain.monitoring.metrics import PrometheusMetrics  # noqa: E402
from imgtrain.monitoring.step_timer import StepPhaseTimer  # noqa: E402
from imgtrain.monitoring.stragglers import StragglerDetector  # noqa: E402

from conftest import free_port_pair  # noqa: E402


def _info(local_rank: int = 1) -> DistInfo:
    return DistInfo(
        rank=5,
        local_rank=local_rank,
        world_size=1,
        device=torch.device("cpu"),
        backend=None,
        node="node-a",
        restart_count=0,
    )


def _scrape(port: int) -> dict[str, list]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


@pytest.fixture
def exporter(tmp_path):
    base = free_port_pair()
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'r50-run'}",
            "monitoring.prometheus.enabled=true",
            f"monitoring.prometheus.port={base}",
            "monitoring.prometheus.linger_s=0",
            "monitoring.prometheus.straggler_interval=2",
            "checkpoint.save_every_steps=100",
        ],
    )
    m = PrometheusMetrics(cfg, _info(), nn.Linear(4, 2), steps_per_epoch=10)
    yield m, base
    m.close()


def test_serves_on_base_port_plus_local_rank_with_run_labels(exporter):
    m, base = exporter
    assert m.port == base + 1  # local rank 1
    samples = _scrape(base + 1)["imgtrain_world_size"]
    assert samples[0].labels == {"run_id": "r50-run", "rank": "5", "local_rank": "1", "node": "node-a"}


def test_records_become_metrics(exporter):
    m, base = exporter
    m.log({"event": "start", "step": 0, "epoch": 1, "world_size": 1, "restarts": 2})
    m.on_step(1, 0.25)
    m.log(
        {
            "event": "train",
            "step": 1,
            "epoch": 1,
            "loss": 1.5,
            "train_top1": 40.0,
            "lr": 0.1,
            "images_per_s": 99.0,
            "step_s": 0.5,
            "data_wait_s": 0.25,
            "bad_images": 3,
        }
    )
    m.log({"event": "eval", "step": 1, "epoch": 1, "val_top1": 55.0, "val_top5": 90.0, "val_loss": 1.2})
    m.log({"event": "checkpoint", "step": 1, "stall_s": 0.125})
    got = {name: s[0].value for name, s in _scrape(base + 1).items() if s}
    assert got["imgtrain_loss"] == 1.5 and got["imgtrain_learning_rate"] == 0.1
    assert got["imgtrain_images_per_second"] == 99.0 and got["imgtrain_global_step"] == 1
    assert got["imgtrain_val_top1_percent"] == 55.0 and got["imgtrain_val_top5_percent"] == 90.0
    assert got["imgtrain_bad_files"] == 3 and got["imgtrain_restarts"] == 2
    assert got["imgtrain_checkpoint_stall_seconds"] == 0.125 and got["imgtrain_checkpoints"] == 1
    assert got["imgtrain_checkpoint_age_seconds"] < 5
    # The shortest of: every 100 steps at 0.5 s per step (50 s), every epoch of 10 steps (5 s).
    assert got["imgtrain_checkpoint_interval_seconds"] == pytest.approx(5.0)
    assert got["imgtrain_running"] == 1
    phases = {
        s.labels["phase"]: s.value
        for s in _scrape(base + 1)["imgtrain_step_phase_seconds"]
        if s.name.endswith("_total")
    }
    assert phases["data_wait"] == 0.25 and phases["checkpoint_stall"] == 0.125
    m.mark_finished()
    assert _scrape(base + 1)["imgtrain_running"][0].value == 0


def test_port_in_use_names_the_config_key(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = load_config(
            None,
            [
                f"output_dir={tmp_path}",
                "monitoring.prometheus.enabled=true",
                f"monitoring.prometheus.port={port}",
            ],
        )
        with pytest.raises(ConfigError, match=r"monitoring\.prometheus\.port.*local rank 0"):
            PrometheusMetrics(cfg, _info(local_rank=0), nn.Linear(2, 2), steps_per_epoch=1)


def test_step_timer_splits_a_step_into_phases():
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    timer = StepPhaseTimer(model, torch.device("cpu"))
    for _ in range(3):
        timer.begin()
        model(torch.randn(256, 64)).sum().backward()
        timer.backward_done()
        opt.step()
        opt.zero_grad()
        timer.end()
    t = timer.resolve()
    assert t["forward_backward"] > 0 and t["optimizer"] > 0
    # No process group: nothing to wait for after the last gradient, a tiny fraction of the step.
    assert 0 <= t["allreduce_exposed"] < t["forward_backward"]
    timer.close()
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())


def test_straggler_is_named_after_patience_and_cleared(caplog):
    d = StragglerDetector(threshold=0.2, patience=3)
    fast, slow = [1.0, 1.0, 1.3, 1.0], [1.0, 1.0, 1.0, 1.0]
    caplog.set_level(logging.WARNING)
    assert [d.update(fast).straggler for _ in range(3)] == [None, None, 2]
    assert "rank 2 has been more than 20% slower" in caplog.text
    v = d.update(fast)
    assert v.straggler == 2 and v.max_over_median == pytest.approx(1.3)
    assert d.update(slow).straggler is None and "rank 2 is back" in caplog.text
    # Within the threshold: never named.
    d2 = StragglerDetector(threshold=0.5, patience=1)
    assert d2.update(fast).straggler is None


def test_metrics_off_builds_nothing(tmp_path, image_folder):
    from imgtrain.train.trainer import Trainer

    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.root={image_folder}",
            "model.name=simple_cnn",
            "model.width=8",
            "data.image_size=16",
            "data.val_resize=16",
            "data.workers=0",
            "training.progress_bar=false",
            "training.max_steps=1",
            "training.epochs=1",
            "training.warmup_epochs=0",
        ],
    )
    trainer = Trainer(cfg).setup()
    try:
        assert trainer.metrics is None
        assert not any(p._post_accumulate_grad_hooks for p in trainer.model_without_ddp.parameters())
    finally:
        trainer.close()


def test_replicated_mode_exports_quorum_heals_and_dropped_work_per_replica_group(tmp_path):
    base = free_port_pair()
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            "monitoring.prometheus.enabled=true",
            f"monitoring.prometheus.port={base}",
            "monitoring.prometheus.linger_s=0",
            "fault_tolerance.mode=replicated",
            "fault_tolerance.replicated.lighthouse=http://127.0.0.1:29510",
            "fault_tolerance.replicated.group_id=1",
        ],
    )
    m = PrometheusMetrics(cfg, _info(), nn.Linear(4, 2), steps_per_epoch=10)
    try:
        # the records distributed/replicas.py writes to metrics.jsonl
        m.log({"event": "quorum", "step": 3, "quorum_id": 7, "quorum_size": 2, "members": [0, 1]})
        m.log({"event": "heal", "step": 3, "heal_seconds": 0.25, "heal_bytes": 1000})
        m.log({"event": "heal", "step": 9, "heal_seconds": 0.5, "heal_bytes": 24})
        m.log({"event": "step_dropped", "step": 12})
        m.log({"event": "samples_dropped", "step": 13, "samples": 8})
        m.log({"event": "samples_dropped", "step": 14, "samples": 8})
        got = _scrape(m.port)

        def value(family: str, sample: str | None = None) -> float:
            (s,) = [s for s in got[family] if s.name == (sample or family)]
            assert s.labels["replica_group"] == "1" and s.labels["rank"] == "5"
            return s.value

        assert value("imgtrain_quorum_size") == 2
        assert value("imgtrain_quorum_id") == 7
        assert value("imgtrain_heals", "imgtrain_heals_total") == 2
        assert value("imgtrain_heal_seconds") == 0.5
        assert value("imgtrain_heal_bytes", "imgtrain_heal_bytes_total") == 1024
        assert value("imgtrain_steps_dropped", "imgtrain_steps_dropped_total") == 1
        assert value("imgtrain_samples_dropped", "imgtrain_samples_dropped_total") == 16
    finally:
        m.close()


def test_restart_mode_exports_no_replica_metrics(exporter):
    m, _ = exporter
    assert not any(name.startswith("imgtrain_quorum") for name in _scrape(m.port))
