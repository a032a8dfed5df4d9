"""Observability end to end: a 2-process torchrun training with JSON logs, TensorBoard, the profiler on both
ranks and run-event notifications to a local webhook receiver and a local SMTP server (both started here);
then the report, the terminal dashboard and the profile summary of that run directory; then a resumed run
that diverges and a run that fails, whose events reach both receivers too."""

from __future__ import annotations

import fnmatch
import json
import math
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from conftest import (
    REPO,
    TINY,
    free_port,
    make_image_folder,
    read_jsonl,
    run_cli,
    subprocess_env,
    torchrun_cmd,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Receivers:
    """A webhook (apprise json://) receiver and an SMTP receiver; messages as (title, body) per kind."""

    def __init__(self) -> None:
        self.http: list[dict] = []
        self.mail: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def titles(self, kind: str) -> list[str]:
        with self.lock:
            return [m["title"] for m in self.http] if kind == "http" else [s for s, _ in self.mail]

    def wait_for(self, word: str, timeout: float = 30.0) -> None:
        """Until a message whose title names ``word`` arrived at both receivers."""
        wait_for(
            lambda: all(any(t.endswith(f" {word}") for t in self.titles(k)) for k in ("http", "mail")),
            timeout,
            f"'{word}' at both receivers",
            poll=0.1,
            context=lambda: f"webhook {self.titles('http')}, mail {self.titles('mail')}",
        )


@pytest.fixture
def receivers():
    from aiosmtpd.controller import Controller

    rec = Receivers()

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with rec.lock:
                rec.http.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    class Smtp:
        async def handle_DATA(self, server, session, envelope):
            import email

            msg = email.message_from_bytes(envelope.content)
            text = "".join(
                p.get_payload(decode=True).decode()
                for p in msg.walk()
                if p.get_content_type() == "text/plain"
            )
            with rec.lock:
                rec.mail.append((str(msg["Subject"]), text))
            return "250 OK"

    http = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    smtp = Controller(Smtp(), hostname="127.0.0.1", port=free_port())
    smtp.start()
    rec.http_url = f"json://127.0.0.1:{http.server_port}/hook"
    rec.mail_url = (
        f"mailto://127.0.0.1:{smtp.port}?from=imgtrain@example.com&to=ops@example.com&mode=insecure"
    )
    try:
        yield rec
    finally:
        smtp.stop()
        http.shutdown()
        http.server_close()


def _cli(args: list[str], capsys) -> tuple[int, str]:
    from imgtrain.cli import main

    code = main(args)
    return code, capsys.readouterr().out


def test_observability_end_to_end(tmp_path, receivers, capsys):
    data = make_image_folder(tmp_path / "data")
    run = tmp_path / "run"
    # Secrets stay out of the config: the webhook URL through ${ENV}, the SMTP URL through an apprise file.
    urls_file = tmp_path / "notify-urls.txt"
    urls_file.write_text(receivers.mail_url + "\n")
    env = {**subprocess_env(), "IMGTRAIN_TEST_HOOK": receivers.http_url}
    notify = [
        "monitoring.notify.urls=['${IMGTRAIN_TEST_HOOK}']",
        f"monitoring.notify.urls_file={urls_file}",
        "monitoring.run_id=obs-test",
    ]
    args = [
        "train",
        "--output-dir",
        str(run),
        f"data.root={data}",
        *TINY,
        *notify,
        "monitoring.log_format=json",
        "monitoring.tensorboard=true",
        "profiler.enabled=true",
        "profiler.wait=0",
        "profiler.warmup=1",
        "profiler.active=2",
        "profiler.ranks=[0,1]",
        "checkpoint.async_save=false",
    ]

    proc = subprocess.run(torchrun_cmd(2, args), capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6

    # Structured logs: every rank's file is JSON lines with the run id, its rank and the step.
    for rank in (0, 1):
        lines = read_jsonl(run / "logs" / f"rank{rank}.jsonl")
        assert lines and all(x["rank"] == rank and x["run_id"] == "obs-test" for x in lines)
        train = [x for x in lines if x.get("fields", {}).get("event") == "train"]
        assert [x["step"] for x in train] == list(range(1, 7))
        assert all({"loss", "lr", "step_s", "data_wait_s"} <= x["fields"].keys() for x in train)
        # The trainer's own log calls carry structured fields too (on every rank, not only rank 0's console).
        assert any(
            x["logger"] == "imgtrain.train.trainer" and x.get("fields", {}).get("world_size") == 2
            for x in lines
        )
    # monitoring.log_format=json: rank 0's console lines are the same JSON objects.
    console = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith('{"time"')]
    assert any(x["logger"] == "imgtrain.train.trainer" and x["rank"] == 0 for x in console)
    # The shipper configuration's path pattern matches the files the trainer wrote.
    filebeat = yaml.safe_load((REPO / "deploy/monitoring/filebeat.yml").read_text())
    pattern = filebeat["filebeat.inputs"][0]["paths"][0]  # the runs directory mounted at /runs
    assert fnmatch.fnmatch(f"/runs/{run.name}/logs/rank1.jsonl", pattern), pattern
    fluent = (REPO / "deploy/monitoring/fluent-bit.conf").read_text()
    assert re.search(r"Path\s+\S*/logs/rank\*\.jsonl", fluent)

    # TensorBoard: rank 0's event file holds loss, LR, accuracy and images/s against the step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/train_top1", "train/images_per_s", "val/top1"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))

    # Profiler: one Chrome trace per profiled rank, plain JSON with the profiled steps' operators.
    for rank in (0, 1):
        (trace,) = (run / "profiler").glob(f"rank{rank}.*.json")
        events = json.loads(trace.read_text())["traceEvents"]
        assert sum(e.get("name", "").startswith("ProfilerStep#") for e in events) == 2
        assert any(e.get("cat") == "cpu_op" for e in events)
    code, out = _cli(["profile-summary", str(run), "--top", "5"], capsys)
    assert code == 0
    assert "rank 0: 1 trace(s), 2 profiled steps" in out and "rank 1: 1 trace(s), 2 profiled steps" in out
    assert re.search(r"^\s+aten::\S+\s+\d+\s+[\d.]+", out, re.M), out
    assert "across ranks" in out and "slowest rank" in out

    # Report: one self-contained page, plots inlined as SVG, per-rank throughput, no external resources.
    code, out = _cli(["report", str(run)], capsys)
    page = (run / "report.html").read_text()
    assert code == 0 and out.strip() == str(run / "report.html")
    assert page.count("<svg") >= 6
    for title in ("Loss", "Accuracy", "Learning rate", "Images/s", "Step-time breakdown", "Checkpoint stall"):
        assert title in page
    assert "rank 1" in page and "2 rank(s)" in page
    assert "Profiler (imgtrain profile-summary)" in page and "across ranks" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)

    # Monitor: one snapshot with the final state and both ranks.
    code, out = _cli(["monitor", str(run), "--once"], capsys)
    assert code == 0
    assert "FINISHED" in out and "world size 2" in out and "last checkpoint: step 6" in out
    rank_rows = re.findall(r"│\s+([01])\s+│\s+6\s+│", out)
    assert sorted(rank_rows) == ["0", "1"], out

    receivers.wait_for("started")
    receivers.wait_for("finished")
    assert receivers.titles("http")[0] == "imgtrain run obs-test started"

    # The same run resumed with an absurd LR: 'resumed', then the loss diverges: exit 5, 'diverged'.
    proc = run_cli(
        [
            "train",
            "--output-dir",
            str(run),
            f"data.root={data}",
            *TINY,
            *notify,
            "training.epochs=3",
            "training.base_lr=1e12",
            # Saves between log lines: the loss must still be checked before each save.
            "training.log_interval=100",
            "checkpoint.save_every_steps=1",
        ],
        check=False,
        env=env,
    )
    assert proc.returncode == 5, proc.stderr[-4000:]
    assert "training diverged: loss is" in proc.stderr
    receivers.wait_for("resumed")
    receivers.wait_for("diverged")
    records = read_jsonl(run / "metrics.jsonl")
    last = records[-1]
    assert last["event"] == "diverged" and last["exit_code"] == 5
    # No diverged state was published: the newest checkpoint is a step whose loss was logged as finite.
    newest = max(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))
    logged = {r["step"]: r["loss"] for r in records if r.get("event") == "train"}
    assert newest in logged and math.isfinite(logged[newest]), (newest, logged)
    rank0 = read_jsonl(run / "logs" / "rank0.jsonl")
    assert any(x["message"].startswith("resumed from") and x["fields"]["restarts"] == 1 for x in rank0)
    # A non-finite loss still makes a valid JSON log line.
    assert any(
        x.get("fields", {}).get("loss") in ("nan", "inf") for x in read_jsonl(run / "logs" / "rank0.jsonl")
    )
    code, out = _cli(["monitor", str(run), "--once"], capsys)
    assert "DIVERGED" in out and "training diverged" in out

    # A run that fails (a checkpoint that does not exist): 'failed' with the exit code and the error.
    proc = run_cli(
        [
            "train",
            "--output-dir",
            str(tmp_path / "run2"),
            f"data.root={data}",
            *TINY,
            *notify,
            "monitoring.notify.events=[failed]",
            f"checkpoint.resume={tmp_path / 'missing'}",
        ],
        check=False,
        env=env,
    )
    assert proc.returncode == 4, proc.stderr[-4000:]
    receivers.wait_for("failed")
    body = [b for s, b in receivers.mail if s.endswith(" failed")][0]
    assert "exit code 4" in body and "CheckpointError" in body


def test_undeliverable_notifications_are_warnings(caplog, monkeypatch):
    """An unreachable target and an unset secret give warnings naming the key, never an exception."""
    from imgtrain.config import NotifyConfig
    from imgtrain.monitoring.notify import Notifier

    monkeypatch.delenv("IMGTRAIN_UNSET_SECRET", raising=False)
    cfg = NotifyConfig(urls=[f"json://127.0.0.1:{free_port()}/nobody?cto=1", "${IMGTRAIN_UNSET_SECRET}"])
    n = Notifier(cfg, "x", enabled=True)
    assert n.active and n.notify("started", "hello") is False
    text = caplog.text
    assert "monitoring.notify.urls[1]: environment variable(s) IMGTRAIN_UNSET_SECRET not set" in text
    assert "notification 'started' was not delivered" in text
    assert not Notifier(cfg, "x", enabled=False).active  # only rank 0 sends
