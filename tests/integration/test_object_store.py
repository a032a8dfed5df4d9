"""Checkpoints on an S3-compatible object store (moto's server, started by the test on loopback)."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, read_jsonl, run_cli, s3_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_checkpoints_round_trip_through_s3(image_folder, tmp_path, s3_server):
    endpoint, s3 = s3_server
    opts = "{client_kwargs: {endpoint_url: '" + endpoint + "', region_name: eu-west-1}}"
    args = [
        "train",
        f"data.root={image_folder}",
        *TINY,
        "checkpoint.dir=s3://ckpts/run1",
        f"checkpoint.storage_options={opts}",
        "checkpoint.keep_last_n=2",
    ]
    out = tmp_path / "run"
    run_cli([*args, "--output-dir", str(out), "training.max_steps=5"], env=s3_env(endpoint))
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="ckpts", Prefix="run1/")["Contents"])
    assert "run1/step_000000005/manifest.json" in keys and "run1/step_000000005/state.pt" in keys

    # A second invocation finds the newest checkpoint in the bucket and continues from it.
    proc = run_cli([*args, "--output-dir", str(out)], env=s3_env(endpoint))
    assert "resumed from s3://ckpts/run1/step_000000005" in proc.stderr
    start = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "start"]
    assert start[-1]["resumed_from"] == "s3://ckpts/run1/step_000000005"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_seen"] == 2 * 36 and summary["restarts"] == 1
    steps = {o["Key"].split("/")[1] for o in s3.list_objects_v2(Bucket="ckpts", Prefix="run1/")["Contents"]}
    assert len(steps) == 2  # keep_last_n applies to the bucket too

    # A corrupted object is detected by its checksum and the older checkpoint is used instead.
    newest = max(steps)
    s3.put_object(Bucket="ckpts", Key=f"run1/{newest}/state.pt", Body=b"not a checkpoint")
    ev = run_cli(
        ["eval", "--checkpoint", "s3://ckpts/run1", f"data.root={image_folder}"], env=s3_env(endpoint)
    )
    assert f"skipping checkpoint s3://ckpts/run1/{newest}" in ev.stderr
    assert json.loads(ev.stdout.strip().splitlines()[-1])["val_images"] == 12
