"""Smoke tests of benchmarks/*.py: each script runs end to end with the smallest settings and writes a
result JSON with the documented keys and positive measurements. The numbers themselves are not checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, run_benchmark

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run_script(name: str, args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    proc = run_benchmark(name, [*args, "--threads", "1", "--out", str(out)], tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert "median" in proc.stdout
    result = json.loads(out.read_text())
    assert result["benchmark"] == name
    assert f"{name}.py" in result["command"]
    machine = result["machine"]
    for key in ("platform", "cpu_model", "cpu_count", "torch"):
        assert machine[key], key
    return result


def assert_stats(s: dict, n: int) -> None:
    assert s["n"] == n == len(s["samples"])
    assert 0 < s["min"] <= s["median"] <= s["max"]


def test_throughput_benchmark(tmp_path):
    r = run_script(
        "throughput",
        [
            "--model",
            "simple_cnn",
            "--width",
            "4",
            "--batch",
            "4",
            "--image-size",
            "16",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--rounds",
            "1",
            "--workers",
            "1",
            "--images",
            "8",
            "--source-size",
            "20",
        ],
        tmp_path,
    )
    for variant in ("synthetic", "real", "loader_only", "ratio_real_over_synthetic"):
        assert_stats(r[variant], 1)
    assert r["unit"] == "images/s"
    assert r["ratio_of_medians"] > 0
    assert 0 <= r["real_data_wait_fraction"]["median"] <= 1
    # --images is raised to batch * (warmup + steps), so that every round reads one fresh epoch
    assert r["settings"]["model"] == "simple_cnn" and r["settings"]["train_images"] == 4 * 3
    assert len(r["rounds"]) == 1


def test_checkpoint_benchmark(tmp_path):
    r = run_script(
        "checkpoint",
        [
            "--model",
            "simple_cnn",
            "--width",
            "4",
            "--image-size",
            "16",
            "--batch",
            "2",
            "--saves",
            "1",
            "--save-every",
            "1",
            "--window-saves",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--classes",
            "2",
        ],
        tmp_path,
    )
    for mode in ("async", "sync", "async_background_write"):
        assert_stats(r["stall_s"][mode], 1)
    assert r["state"]["model_bytes"] > 0 and r["state"]["optimizer_bytes"] > 0  # SGD momentum is saved
    assert r["state"]["state_file_bytes"] > r["state"]["model_bytes"]
    assert r["stall_ratio_async_over_sync"] > 0
    interval = r["interval"]
    for variant in ("none", "async", "sync"):
        assert_stats(interval["steps_per_s"][variant], 1)
    assert_stats(interval["async_over_none"], 1)
    assert_stats(interval["sync_over_none"], 1)
    assert set(r["throughput_lost_fraction"]) == {"async", "sync"}


def test_recovery_benchmark_cli(tmp_path, monkeypatch, capsys):
    """Only the command line (parsed by the script's own parse_args, in this process): a real run starts
    torchrun agents for minutes (see docs/BENCHMARKS.md)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import recovery

    with pytest.raises(SystemExit) as done:
        recovery.parse_args(["--help"])
    usage = capsys.readouterr().out
    assert done.value.code == 0
    for word in ("--faults", "--settings", "--cap", "partition", "sigterm"):
        assert word in usage
    with pytest.raises(SystemExit) as done:
        recovery.parse_args(["--faults", "worker,meteor", "--out", str(tmp_path / "r.json")])
    assert done.value.code == 2 and "meteor" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_ft_benchmarks_cli_schedule_and_projection(tmp_path, monkeypatch, capsys):
    """ft_recovery.py / ft_chaos.py (issue 19): their command lines, the chaos schedule both modes share,
    and the 64-GPU projection's arithmetic. A real run starts replica groups for minutes. The command lines
    are parsed in this process (each script's own parse_args: a run of the script would only add its
    imports); test_compression_benchmark and others run scripts end to end."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import ft_chaos
    import ft_recovery

    for module, words in (
        (ft_recovery, ("--faults", "--modes", "rejoin", "hang", "partition", "replicated")),
        (ft_chaos, ("--minutes", "--fault-every", "--seed", "--nodes", "--kinds")),
    ):
        with pytest.raises(SystemExit) as done:
            module.parse_args(["--help"])
        usage = capsys.readouterr().out
        assert done.value.code == 0 and all(w in usage for w in words), module.__name__
        bad = "--faults" if module is ft_recovery else "--kinds"
        with pytest.raises(SystemExit) as done:
            module.parse_args([bad, "worker,meteor", "--out", str(tmp_path / "r.json")])
        assert done.value.code == 2 and "meteor" in capsys.readouterr().err
        assert not (tmp_path / "r.json").exists()

    args = ft_chaos.parse_args(["--minutes", "10", "--fault-every", "60", "--seed", "3"])
    plan = ft_chaos.schedule(args)
    assert plan == ft_chaos.schedule(args) and len(plan) == 10  # seeded: the same faults for both modes
    assert [t for t, _, _ in plan] == [60.0 * k for k in range(1, 11)]
    assert {k for _, k, _ in plan} <= set(ft_chaos.KINDS) and len({k for _, k, _ in plan}) > 1

    ok = {"outcome": "recovered"}
    trials = {
        "node": {"restart": [{**ok, "total_s": 5.0}], "replicated": [{**ok, "total_s": 1.0}]},
        "rejoin": {
            "restart": [{**ok, "total_s": 20.0, "survivor_stall_s": 8.0, "steps_redone": 0}],
            "replicated": [{**ok, "total_s": 20.0, "survivor_stall_s": 0.5}],
        },
    }
    p = ft_recovery.project(trials, gpus=64, checkpoint_interval_s=600)
    assert p["lost_seconds_per_fault"] == {"restart": 5.0 + 300 + 8.0, "replicated": 1.5}
    per_day = 64 * 419 / (54 * 16384)  # Llama 3: 419 unexpected interruptions, 54 days, 16,384 GPUs
    (row, *_) = p["rows"]
    assert row["faults_per_day"] == round(per_day, 4)
    assert row["restart_goodput"] == round(1 - per_day * 313 / 86400, 6)
    assert row["replicated_goodput"] == round(1 - per_day * 1.5 / 86400, 6)
    # A restart at the node's return that rolled back too costs a second half interval.
    trials["rejoin"]["restart"][0]["steps_redone"] = 2
    assert ft_recovery.project(trials)["lost_seconds_per_fault"]["restart"] == 5.0 + 600 + 8.0
    # A mode without measurements is left blank, not guessed.
    del trials["rejoin"]["replicated"]
    assert ft_recovery.project(trials)["rows"][0]["replicated_goodput"] is None


def test_ft_chaos_goodput_is_against_the_modes_fault_free_speed(tmp_path, monkeypatch):
    """Two groups log the same steps every 0.25 s (0.2 s of it inside the step): a run without faults
    scores 1.0 (the per-step step_s median alone said 0.8); a 30 s stall costs its share of the wall
    time."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import types

    import ft_chaos

    t0 = 1000.0
    times = [t0 + 0.25 * k for k in range(2401)]  # 600 s
    stalled = [t if t <= t0 + 60 else t + 30 for t in times[:2281]]  # 30 s stall, same end
    for name, series in (("even", times), ("stalled", stalled)):
        runs = []
        for g in range(2):
            run = tmp_path / name / f"rg{g}"
            run.mkdir(parents=True)
            lines = [
                {"time": t, "event": "train", "step": k + 1, "step_s": 0.2} for k, t in enumerate(series)
            ]
            (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
            runs.append(run)
        chaos = types.SimpleNamespace(runs=runs, mode="replicated")
        r = ft_chaos.outcome(chaos, t0, t0 + 600)
        assert r["fault_free_s_per_step"] == 0.25 and r["steps_redone"] == 0
        if name == "even":
            assert r["goodput"] == 1.0 and r["goodput_step_s"] == round(2401 * 0.2 / 600, 4)
        else:
            assert r["steps_advanced"] == 2281 and r["goodput"] == 0.95  # 2280 steps x 0.25 s / 600 s


def test_compression_benchmark(tmp_path):
    r = run_script(
        "compression",
        ["--model", "resnet18", "--num-classes", "10", "--reps", "1", "--powersgd-ranks", "1"],
        tmp_path,
    )
    v = r["variants"]
    assert set(v) == {"fp16", "bf16", "powersgd rank 1", "onebit"}
    assert v["fp16"]["bytes_per_step"] * 2 == r["fp32_bytes"]
    assert 30 < v["onebit"]["fp32_over_bytes"] < 32
    for s in v.values():
        assert_stats(s["hook_ms"], 1)
    assert_stats(r["onebit_encode_ms"], 1)


def test_input_pipeline_benchmark(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGTRAIN_DATA_HOME", str(tmp_path / "home"))  # the generated set and shards go there
    r = run_script(
        "input_pipeline",
        [
            "--generate",
            "8",
            "--images",
            "4",
            "--batch",
            "2",
            "--rounds",
            "1",
            "--workers",
            "1",
            "--size",
            "32",
            "--decoders",
            "pil",
            "simplejpeg",
            "--max-sides",
            "64",
            "--shard-decoders",
            "simplejpeg_pillow",
        ],
        tmp_path,
    )
    table = r["workers"]["1"]
    assert set(table) == {"reference", "folder-pil", "folder-simplejpeg", "shards64-simplejpeg_pillow"}
    for row in table.values():
        assert_stats(row["images_per_s_per_worker"], 1)
    assert table["reference"]["ratio_vs_reference"] == 1.0
    # the shard rows read what `imgtrain prepare --max-side 64` wrote
    index = json.loads((tmp_path / "home" / "bench-jpegs-v1-shards64" / "index.json").read_text())
    assert index["settings"]["max_side"] == 64 and index["splits"]["train"]["samples"] == 8
    assert r["pillow"].startswith(("pillow", "pillow-simd"))


def test_gpu_training_benchmark_runs_its_variants_on_cpu(tmp_path):
    """The GPU benchmark's script (run for real only on a lent GPU) still works end to end: here on the
    CPU with a tiny model, one variant per switch it measures."""
    out = tmp_path / "gpu_training.json"
    proc = run_benchmark(
        "gpu_training",
        [
            "compute",
            "--models",
            "simple_cnn",
            "--precisions",
            "fp32",
            "--ckpt",
            "--no-channels-last",
            "simple_cnn",
            "--batch",
            "4",
            "--image-size",
            "16",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["channels_last"]) for r in rows] == [("simple_cnn", True), ("simple_cnn", False)]
    assert all(r["images_per_s"] > 0 and "error" not in r for r in rows)


def test_reference_step_benchmark(tmp_path):
    r = run_script(
        "reference_step",
        [
            "--model",
            "resnet18",
            "--batch",
            "2",
            "--sizes",
            "32",
            "48",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--rounds",
            "2",
        ],
        tmp_path,
    )
    assert r["unit"] == "seconds per step" and sorted(r["sizes"]) == ["32", "48"]
    for size in r["sizes"].values():
        for key in (
            "imgtrain",
            "reference",
            "imgtrain_cpu",
            "reference_cpu",
            "ratio_imgtrain_over_reference",
            "ratio_cpu",
        ):
            assert_stats(size[key], 2)
    assert r["load_average"] and r["date"]
    for size in ("32", "48"):
        assert_stats(r["normalize"][size]["device_normalize"], 5)
        assert_stats(r["normalize"][size]["out_of_place"], 5)
