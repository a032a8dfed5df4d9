"""One real run watched by a real Prometheus and Alertmanager (Debian's packages), started by the test.

A 2-process torchrun training serves metrics on two ports; Prometheus scrapes both and evaluates the
committed alert rules; Alertmanager routes with the committed routing tree to a local Slack-format
webhook receiver and a local SMTP server. Mid-run, rank 1 is frozen (SIGSTOP): rank 0 waits for it in
the gradient all-reduce, stops making progress while its endpoint keeps answering, and the stall alert
must reach both receivers. Rank 1 is then resumed, the run finishes, and while its endpoints linger
(monitoring.prometheus.linger_s) the test checks every metric family for both ranks against
metrics.jsonl and evaluates every PromQL expression of the dashboard and the alert rules on this run's
data.

Test-only changes to the committed configuration, and why: scrape/evaluation every second (not 15 s),
every rule's ``for:`` set to 0 s (the real durations are unit-tested in
deploy/monitoring/prometheus/tests), Alertmanager's group_wait 0 s, and the receivers' endpoints and
secret files pointed at the local servers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import (
    REPO,
    TINY,
    free_port,
    free_port_pair,
    make_image_folder,
    read_jsonl,
    subprocess_env,
    torchrun_cmd,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MON = REPO / "deploy" / "monitoring"
PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
if PROMETHEUS is None or ALERTMANAGER is None:
    pytest.skip(
        "needs Prometheus and Alertmanager (Debian: prometheus prometheus-alertmanager, installed by "
        "scripts/install.sh)",
        allow_module_level=True,
    )
aiosmtpd_controller = pytest.importorskip(
    "aiosmtpd.controller", reason="aiosmtpd (dev extra) is not installed"
)

# Every family the exporter serves, on every rank. Rank 0 alone writes checkpoints; GPU families exist
# only with a GPU and nvidia-ml-py.
FAMILIES = [
    "imgtrain_run_info",
    "imgtrain_global_step",
    "imgtrain_epoch",
    "imgtrain_loss",
    "imgtrain_train_top1_percent",
    "imgtrain_learning_rate",
    "imgtrain_images_per_second",
    "imgtrain_step_seconds",
    "imgtrain_step_phase_seconds_total",
    "imgtrain_val_top1_percent",
    "imgtrain_val_top5_percent",
    "imgtrain_val_loss",
    "imgtrain_bad_files_total",
    "imgtrain_restarts",
    "imgtrain_world_size",
    "imgtrain_running",
    "imgtrain_last_progress_timestamp_seconds",
    "imgtrain_stall_threshold_seconds",
    "imgtrain_checkpoint_age_seconds",
    "imgtrain_checkpoint_interval_seconds",
    "imgtrain_checkpoint_stall_seconds",
    "imgtrain_checkpoints_total",
    "imgtrain_step_time_max_over_median",
    "imgtrain_straggler_rank",
    "imgtrain_process_cpu_seconds_total",
    "imgtrain_process_resident_memory_bytes",
    "imgtrain_host_network_receive_bytes_total",
    "imgtrain_host_network_transmit_bytes_total",
    "imgtrain_host_disk_read_bytes_total",
    "imgtrain_host_disk_written_bytes_total",
]
WRITER_ONLY = ["imgtrain_checkpoint_write_seconds", "imgtrain_checkpoint_failures"]
GPU_ONLY = re.compile(r"imgtrain_gpu_\w+")
# Exported only by fault_tolerance.mode=replicated (issue 19); this run uses the default, restart.
REPLICATED_ONLY = re.compile(
    r"imgtrain_(quorum_size|quorum_id|heals_total|heal_seconds|heal_bytes_total|steps_dropped_total"
    r"|replica_groups_expected)\b"
)


def _http_json(url: str, params: dict | None = None):
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class _Webhook(BaseHTTPRequestHandler):
    received: list  # set per server

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.received.append((self.path, json.loads(body)))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


class _Mailbox:
    def __init__(self):
        self.messages: list[str] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        self.messages.append(envelope.content.decode("utf8", errors="replace"))
        return "250 OK"


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


@pytest.fixture
def stack(tmp_path):
    """Webhook + SMTP receivers, Alertmanager (committed routing) and Prometheus (committed rules) on free
    ports; yields their addresses and the trainer's base port. Every server is stopped by its own pid."""
    servers: list[subprocess.Popen] = []
    webhook = ThreadingHTTPServer(("127.0.0.1", 0), _Webhook)
    webhook.received = []
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    mailbox = _Mailbox()
    smtp = aiosmtpd_controller.Controller(mailbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        secrets = tmp_path / "secrets"
        secrets.mkdir()
        (secrets / "slack_webhook_url").write_text(f"http://127.0.0.1:{webhook.server_address[1]}/slack")
        (secrets / "smtp_password").write_text("not-a-real-password")
        am = yaml.safe_load((MON / "alertmanager" / "alertmanager.yml").read_text())
        g = am["global"]
        g["slack_api_url_file"] = str(secrets / "slack_webhook_url")
        g["smtp_auth_password_file"] = str(secrets / "smtp_password")
        g["smtp_smarthost"] = f"127.0.0.1:{smtp.port}"
        g["smtp_require_tls"] = False  # the local receiver speaks plain SMTP
        am["route"].update(group_wait="0s", group_interval="1s")
        (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(am))
        am_port = free_port()
        servers.append(
            _start(
                [
                    ALERTMANAGER,
                    f"--config.file={tmp_path / 'alertmanager.yml'}",
                    f"--storage.path={tmp_path / 'am-data'}",
                    f"--web.listen-address=127.0.0.1:{am_port}",
                    "--cluster.listen-address=",
                ],
                tmp_path / "alertmanager.log",
            )
        )

        rules = yaml.safe_load((MON / "prometheus" / "rules" / "imgtrain.rules.yml").read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule["for"] = "0s"
        (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
        base = free_port_pair()
        prom_port = free_port()
        prom_cfg = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": [
                {
                    "job_name": "imgtrain",
                    "static_configs": [{"targets": [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]}],
                }
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom_cfg))
        servers.append(
            _start(
                [
                    PROMETHEUS,
                    f"--config.file={tmp_path / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                tmp_path / "prometheus.log",
            )
        )
        prom = f"http://127.0.0.1:{prom_port}"
        wait_for(
            lambda: _ready(f"{prom}/-/ready") and _ready(f"http://127.0.0.1:{am_port}/-/ready"),
            60,
            "Prometheus and Alertmanager to be ready",
        )
        yield {
            "prom": prom,
            "base_port": base,
            "webhook": webhook.received,
            "mail": mailbox.messages,
            "logs": tmp_path,
        }
    finally:
        for p in servers:
            _stop(p)
        smtp.stop()
        webhook.shutdown()


def _query(prom: str, expr: str, at: float | None = None) -> list[dict]:
    params = {"query": expr}
    if at is not None:
        params["time"] = f"{at:.3f}"
    out = _http_json(f"{prom}/api/v1/query", params)
    assert out["status"] == "success", out
    return out["data"]["result"]


def _query_range(prom: str, expr: str, start: float, end: float) -> list[dict]:
    out = _http_json(
        f"{prom}/api/v1/query_range",
        {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": "1"},
    )
    assert out["status"] == "success", (expr, out)
    return out["data"]["result"]


def _by_rank(result: list[dict]) -> dict[str, float]:
    return {r["metric"]["rank"]: float(r["value"][1]) for r in result}


def _dashboard_exprs() -> list[str]:
    dash = json.loads((MON / "grafana" / "dashboards" / "imgtrain.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if "expr" in t]


def _rule_exprs() -> dict[str, str]:
    rules = yaml.safe_load((MON / "prometheus" / "rules" / "imgtrain.rules.yml").read_text())
    return {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}


def _worker(torchrun: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(torchrun.pid).children(recursive=True):
        try:
            env = child.environ()
        except psutil.Error:
            continue
        if env.get("RANK") == str(rank) and "imgtrain" in " ".join(child.cmdline()):
            return child
    raise LookupError(f"rank {rank} not found")


def _fmt_failure(stack, run_dir: Path, proc_log: Path) -> str:
    tails = [
        f"--- {p.name}\n{p.read_text()[-3000:]}"
        for p in (proc_log, stack["logs"] / "prometheus.log", stack["logs"] / "alertmanager.log")
        if p.exists()
    ]
    return "\n".join(tails)


def test_run_is_scraped_and_a_stall_alerts_slack_and_email(stack, tmp_path):
    data = make_image_folder(tmp_path / "data", train_per_class=40)
    run_dir = tmp_path / "run"
    prom = stack["prom"]
    args = [
        "train",
        "--output-dir",
        str(run_dir),
        f"data.root={data}",
        *TINY,
        # Long enough to be frozen mid-run; one evaluation (at the end) and 3 checkpoints keep it quick.
        "training.epochs=100",
        "training.max_steps=300",
        "training.eval_interval=100",
        "checkpoint.save_at_epoch_end=false",
        "checkpoint.save_every_steps=100",
        "checkpoint.keep_last_n=1",
        "monitoring.prometheus.enabled=true",
        f"monitoring.prometheus.port={stack['base_port']}",
        "monitoring.prometheus.linger_s=120",
        "monitoring.prometheus.stall_after_s=2",
        "monitoring.prometheus.straggler_interval=5",
    ]
    proc_log = tmp_path / "torchrun.log"
    t_start = time.time()
    torchrun = subprocess.Popen(
        torchrun_cmd(2, args),
        stdout=open(proc_log, "w"),
        stderr=subprocess.STDOUT,
        env=subprocess_env(),
        start_new_session=True,
    )
    try:
        # 1. Both ranks scraped while training (their endpoints answer from the end of setup on, with
        # imgtrain_running 1), and the first step done: freeze as early as that, however fast the steps.
        def training_and_scraped():
            if torchrun.poll() is not None:
                return True
            jsonl = run_dir / "metrics.jsonl"
            started = jsonl.exists() and '"event": "train"' in jsonl.read_text()
            return started and len(_query(prom, "imgtrain_running == 1")) == 2

        wait_for(training_and_scraped, 120, "both ranks to be scraped while training", poll=0.05)
        assert torchrun.poll() is None, _fmt_failure(stack, run_dir, proc_log)
        steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["event"] == "train"]
        assert steps and steps[-1] < 300, "the run ended before the stall could be injected"

        # 2. Freeze rank 1: rank 0 stalls in the all-reduce; the stall alert reaches Slack and email.
        print(f"[{time.time() - t_start:.1f}s] both ranks scraped at step {steps[-1]}: freezing rank 1")
        rank1 = _worker(torchrun, 1)
        rank1.suspend()
        try:

            def delivered():
                slack = [b for _, b in stack["webhook"] if "ImgtrainTrainingStalled" in json.dumps(b)]
                mail = [m for m in stack["mail"] if "ImgtrainTrainingStalled" in m]
                return (slack, mail) if slack and mail else None

            slack, mail = wait_for(delivered, 90, "the stall alert at the Slack webhook and the SMTP server")
            firing = _query(prom, 'ALERTS{alertname="ImgtrainTrainingStalled", alertstate="firing"}')
            assert {r["metric"]["rank"] for r in firing} == {"0"}  # the waiting rank, not the frozen one
            attachment = slack[0]["attachments"][0]
            assert "made no progress" in attachment["title"] and slack[0]["channel"] == "#training-alerts"
            assert "To: ml-oncall@example.com" in mail[0]
            # The frozen rank's endpoint stopped answering while it was training: target down, routed too.
            wait_for(
                lambda: any("ImgtrainTargetDown" in json.dumps(b) for _, b in stack["webhook"]),
                60,
                "the target-down alert of the frozen rank at the Slack webhook",
            )
            print(f"[{time.time() - t_start:.1f}s] stall and target-down alerts delivered")
        finally:
            rank1.resume()

        # 3. The run finishes; its endpoints linger with the final values (imgtrain_running 0).
        wait_for(
            lambda: (run_dir / "summary.json").exists() or torchrun.poll() is not None,
            180,
            "the run to finish",
        )
        assert (run_dir / "summary.json").exists(), _fmt_failure(stack, run_dir, proc_log)
        wait_for(
            lambda: _by_rank(_query(prom, "imgtrain_running")) == {"0": 0.0, "1": 0.0},
            60,
            "Prometheus to scrape the finished run from both ranks",
        )
        t_end = time.time()
        print(f"[{t_end - t_start:.1f}s] finished run scraped from both ranks")
        records = read_jsonl(run_dir / "metrics.jsonl")
        train = [r for r in records if r["event"] == "train"][-1]
        ev = [r for r in records if r["event"] == "eval"][-1]
        checkpoints = [r for r in records if r["event"] == "checkpoint"]

        for family in FAMILIES:
            ranks = {r["metric"]["rank"] for r in _query(prom, family)}
            assert ranks == {"0", "1"}, f"{family}: ranks {ranks}"
        for family in WRITER_ONLY:
            assert {r["metric"]["rank"] for r in _query(prom, family)} == {"0"}, family
        labels = _query(prom, "imgtrain_global_step")[0]["metric"]
        assert labels["run_id"] == "run" and labels["node"] == socket.gethostname()
        assert {r["metric"]["local_rank"] for r in _query(prom, "imgtrain_global_step")} == {"0", "1"}

        # Same values as metrics.jsonl (every rank holds the all-reduced ones).
        expect = {
            "imgtrain_global_step": train["step"],
            "imgtrain_epoch": train["epoch"],
            "imgtrain_loss": train["loss"],
            "imgtrain_learning_rate": train["lr"],
            "imgtrain_train_top1_percent": train["train_top1"],
            "imgtrain_val_top1_percent": ev["val_top1"],
            "imgtrain_val_top5_percent": ev["val_top5"],
            "imgtrain_val_loss": ev["val_loss"],
            "imgtrain_world_size": 2,
            "imgtrain_restarts": 0,
            "imgtrain_bad_files_total": 0,
            "imgtrain_checkpoints_total": len(checkpoints),
            "imgtrain_stall_threshold_seconds": 2,
        }
        assert train["step"] == 300
        for family, value in expect.items():
            got = _by_rank(_query(prom, family))
            assert got.keys() == {"0", "1"}
            for rank, v in got.items():
                assert v == pytest.approx(value, rel=1e-6), f"{family} rank {rank}: {v} != {value}"
        # images/s and step time are each rank's own timing; rank 0 writes metrics.jsonl.
        assert _by_rank(_query(prom, "imgtrain_images_per_second"))["0"] == pytest.approx(
            train["images_per_s"]
        )
        assert _by_rank(_query(prom, "imgtrain_step_seconds"))["0"] == pytest.approx(train["step_s"])
        phases = {
            r["metric"]["phase"] for r in _query(prom, 'imgtrain_step_phase_seconds_total{rank="0"} > 0')
        }
        assert phases == {
            "data_wait",
            "forward_backward",
            "allreduce_exposed",
            "optimizer",
            "checkpoint_stall",
        }

        # 4. Every dashboard and alert-rule expression evaluates on this run's data.
        for expr in _dashboard_exprs():
            if GPU_ONLY.search(expr) or REPLICATED_ONLY.search(expr):
                continue  # no GPU here (checked below) / not replicated mode
            q = expr.replace("$__rate_interval", "5s").replace("$run_id", ".*").replace("$rank", ".*")
            assert _query_range(prom, q, t_start, t_end), f"dashboard expression returned nothing: {expr}"
        assert not _query(prom, '{__name__=~"imgtrain_gpu_.*"}')
        for alert, expr in _rule_exprs().items():
            _query(prom, expr)  # valid PromQL
            for name in set(re.findall(r"\b(imgtrain_\w+|up)\b", expr)):
                if GPU_ONLY.fullmatch(name) or REPLICATED_ONLY.fullmatch(name):
                    continue
                assert _query_range(prom, name, t_start, t_end), f"{alert}: no data for {name}"
    finally:
        # torchrun starts each worker in its own session: stop the workers (lingering) by pid, then torchrun.
        if torchrun.poll() is None:
            for child in psutil.Process(torchrun.pid).children(recursive=True):
                child.kill()
            os.killpg(torchrun.pid, signal.SIGKILL)
        torchrun.wait(timeout=30)
