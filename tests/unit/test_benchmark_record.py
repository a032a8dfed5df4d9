"""The benchmark record: one envelope per run through bench_common.record, results/<name>/latest.json plus
history.jsonl, and a docs/BENCHMARKS.md that names only result files that exist."""

from __future__ import annotations

import json
import re
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_common  # noqa: E402

ENVELOPE_KEYS = {"benchmark", "date", "commit", "dirty", "machine", "command", "settings", "headline"}
RESULTS = REPO / "benchmarks" / "results"


def test_record_writes_latest_and_appends_one_history_line_per_run(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_common, "RESULTS_DIR", tmp_path)
    run = {
        "settings": {"batch": 4},
        "fast": bench_common.stats([1.0, 2.0, 3.0]),
        "slow": bench_common.stats([4.0, 6.0]),
        "ratio_fast_over_slow": 0.4,
    }
    bench_common.record("demo", run)
    bench_common.record("demo", {**run, "ratio_fast_over_slow": 0.5})
    latest = json.loads((tmp_path / "demo" / "latest.json").read_text())
    assert ENVELOPE_KEYS <= set(latest)
    assert latest["benchmark"] == "demo" and latest["settings"] == {"batch": 4}
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", latest["commit"])
    assert latest["headline"] == {"fast": 2.0, "slow": 5.0, "ratio_fast_over_slow": 0.5}
    history = [json.loads(line) for line in (tmp_path / "demo" / "history.jsonl").read_text().splitlines()]
    assert [h["headline"]["ratio_fast_over_slow"] for h in history] == [0.4, 0.5]


def test_record_with_out_or_partial_leaves_the_history_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_common, "RESULTS_DIR", tmp_path / "results")
    bench_common.record("demo", {"x": bench_common.stats([1.0])}, out=tmp_path / "adhoc.json")
    assert json.loads((tmp_path / "adhoc.json").read_text())["benchmark"] == "demo"
    assert not (tmp_path / "results").exists()
    bench_common.record("demo", {"x": bench_common.stats([1.0])}, final=False)
    assert (tmp_path / "results" / "demo" / "latest.json").exists()
    assert not (tmp_path / "results" / "demo" / "history.jsonl").exists()


def test_every_recorded_benchmark_has_an_envelope_and_a_history():
    loose = [p.name for p in RESULTS.iterdir() if p.is_file()]
    assert not loose, f"result files outside results/<name>/: {loose}"
    names = sorted(p.name for p in RESULTS.iterdir() if p.is_dir())
    assert {"throughput", "checkpoint", "recovery", "input_pipeline", "scaling", "gpu"} <= set(names)
    for name in names:
        latest = json.loads((RESULTS / name / "latest.json").read_text())
        assert ENVELOPE_KEYS <= set(latest), (name, ENVELOPE_KEYS - set(latest))
        assert latest["benchmark"] == name and latest["headline"], name
        lines = (RESULTS / name / "history.jsonl").read_text().splitlines()
        assert lines, name
        for line in lines:
            h = json.loads(line)
            assert h["benchmark"] == name and h["date"] and h["commit"], (name, h)


def test_benchmarks_doc_is_the_current_record_and_names_only_existing_results():
    text = (REPO / "docs" / "BENCHMARKS.md").read_text()
    assert len(text.splitlines()) <= 400
    sections = re.findall(r"^## (.+)$", text, re.M)
    assert sections[0] == "Headline"
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for doc in docs:
        if doc.name == "benchmarks_history.md":  # names the files as they were, before the record moved
            continue
        for ref in re.findall(r"results/[\w./-]+", doc.read_text()):
            ref = ref.rstrip(".")
            path = REPO / "benchmarks" / ref
            assert path.exists() or (REPO / "benchmarks" / "results" / ref.split("/", 1)[-1]).exists(), (
                f"{doc.name} names {ref}, which does not exist"
            )
