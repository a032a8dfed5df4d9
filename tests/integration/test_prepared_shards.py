"""`imgtrain prepare` then `imgtrain train data.format=shards`, as a user runs them: on the quickstart
data (accuracy, a corrupt member counted), and through the S3-compatible test server (local cache)."""

from __future__ import annotations

import json
import tarfile

import pytest

from imgtrain.data.embedded import ensure_digits
from imgtrain.data.shards.cache import ShardSource
from imgtrain.data.shards.dataset import ShardDataset, load_index

from conftest import TINY, read_jsonl, run_cli, s3_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The quickstart recipe as it is (5 epochs, 99.2% on the folder). Measured on shards with 3 epochs: 98.1%
# and 96.1% in two runs, not a reliable margin over 97%.
QUICKSTART_EPOCHS = 5


def test_quickstart_on_prepared_shards_reaches_97_percent_and_counts_a_corrupt_member(tmp_path):
    shards = tmp_path / "shards"
    run_cli(
        [
            "prepare",
            str(ensure_digits()),
            str(shards),
            "--samples-per-shard",
            "500",
            "--workers",
            "2",
            "--no-progress",
        ]
    )
    index = json.loads((shards / "index.json").read_text())
    assert index["splits"]["train"]["samples"] == 1437 and index["splits"]["val"]["samples"] == 360
    assert len(index["splits"]["train"]["shards"]) == 3 and index["classes"] == [str(i) for i in range(10)]

    shard = shards / "train-000001.tar"
    with tarfile.open(shard) as tf:
        member = [m for m in tf if m.name.endswith(".png")][7]
    with open(shard, "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\xff" * member.size)

    out = tmp_path / "run"
    proc = run_cli(
        [
            "train",
            "--config",
            "quickstart",
            "--output-dir",
            str(out),
            f"data.root={shards}",
            "data.format=shards",
            "training.progress_bar=false",
        ],
        timeout=600,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_top1"] >= 97.0, summary
    assert summary["val_images"] == 360 and summary["epochs"] == QUICKSTART_EPOCHS
    # The garbled member: named, weight 0, counted once per epoch (1 of 1437 is within max_bad_fraction).
    assert f"skipping unreadable sample {shard}:{member.name}" in proc.stderr
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "train"]
    per_epoch = [
        sum(r["bad_images"] for r in records if r["epoch"] == e) for e in range(1, QUICKSTART_EPOCHS + 1)
    ]
    assert per_epoch == [1] * QUICKSTART_EPOCHS


def test_shards_round_trip_through_s3_with_a_local_cache(image_folder, tmp_path, s3_server, monkeypatch):
    endpoint, s3 = s3_server
    s3.create_bucket(Bucket="data", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    opts = "{client_kwargs: {endpoint_url: '" + endpoint + "', region_name: eu-west-1}}"
    prep = [
        "prepare",
        str(image_folder),
        "s3://data/tiny",
        "--samples-per-shard",
        "10",
        "--workers",
        "2",
        "--storage-options",
        opts,
        "--no-progress",
    ]
    run_cli(prep, env=s3_env(endpoint))
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="data", Prefix="tiny/")["Contents"])
    shards = [k for k in keys if k.endswith(".tar")]
    assert "tiny/index.json" in keys and len(shards) == 6  # 36 train / 12 val images in shards of 10

    # A rerun verifies what is there (checksums read back from the bucket) and rewrites only what is missing.
    s3.delete_object(Bucket="data", Key="tiny/train-000002.tar")
    rerun = run_cli(prep, env=s3_env(endpoint))
    assert "5 shards kept from an earlier run, 1 written" in rerun.stderr

    out, cache = tmp_path / "run", tmp_path / "cache"
    proc = run_cli(
        [
            "train",
            "--output-dir",
            str(out),
            *TINY,
            "data.workers=1",
            "data.root=s3://data/tiny",
            "data.format=shards",
            f"data.storage_options={opts}",
            f"data.cache.dir={cache}",
        ],
        env=s3_env(endpoint),
    )
    assert json.loads((out / "summary.json").read_text())["val_images"] == 12
    reports = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "shard_cache"]
    assert [r["epoch"] for r in reports] == [1, 2]
    # Epoch 1 downloads each shard once (train and val); epoch 2 reads everything from the local disk.
    assert reports[0]["cache_misses"] == 6 and reports[0]["cache_hits"] == 48 - 6
    assert reports[0]["downloaded_bytes"] > 0
    assert (
        reports[1]["cache_misses"] == 0
        and reports[1]["cache_hits"] == 48
        and reports[1]["cache_hit_rate"] == 1.0
    )
    assert (
        "shard cache, epoch 2: 48 sample reads, 48 from the local cache, 0 from the object store"
        in proc.stderr
    )
    assert len(list(cache.glob("*/*.tar"))) == 6

    # A cache with room for one shard: that one is cached, the others are read by byte range from the
    # bucket (tar members located by one streaming pass), and every sample still reads back the same.
    for k, v in s3_env(endpoint).items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    storage = {"client_kwargs": {"endpoint_url": endpoint, "region_name": "eu-west-1"}}
    index = load_index("s3://data/tiny", storage)
    full = ShardSource("s3://data/tiny", storage, cache, 10**9)
    room = index["splits"]["train"]["shards"][0]["bytes"]
    sizes = {sh["name"]: sh["bytes"] for sp in index["splits"].values() for sh in sp["shards"]}
    small = ShardSource("s3://data/tiny", storage, tmp_path / "small-cache", room, None, sizes)
    a, b = (ShardDataset(src, index, "train", None) for src in (full, small))
    assert [b.read(i) for i in range(len(b))] == [a.read(i) for i in range(len(a))]
    assert small.take_counts()[:2] == (9, 1 + 26)  # 10 from the cached shard (1 download), 26 by range
    assert [p.name for p in (tmp_path / "small-cache").glob("*/*.tar")] == ["train-000000.tar"]
