"""Offline checks of deploy/monitoring/: Prometheus rules and their unit tests, Alertmanager routing, the
generated Grafana dashboard, and the compose stack (no container can be pulled here)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MON = REPO / "deploy" / "monitoring"
RULES = MON / "prometheus" / "rules" / "imgtrain.rules.yml"
ALERTMANAGER_YML = MON / "alertmanager" / "alertmanager.yml"
DASHBOARD = MON / "grafana" / "dashboards" / "imgtrain.json"
COMPOSE = MON / "docker-compose.yml"
# What fault_tolerance.mode=replicated exports, label replica_group (docs/monitoring.md).
REPLICATED_METRICS = {
    "imgtrain_quorum_size",
    "imgtrain_quorum_id",
    "imgtrain_heals_total",
    "imgtrain_heal_seconds",
    "imgtrain_heal_bytes_total",
    "imgtrain_steps_dropped_total",
    "imgtrain_replica_groups_expected",
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} is not installed (Debian: prometheus / prometheus-alertmanager; scripts/install.sh)"
        )
    return path


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=60)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_alert_rules_pass_promtool_check():
    out = _run([_tool("promtool"), "check", "rules", str(RULES)]).stdout
    assert f"{len(_alerts())} rules found" in out


def test_every_alert_has_a_promtool_unit_test_and_they_pass():
    tests = MON / "prometheus" / "tests" / "imgtrain.rules.test.yml"
    tested = {
        t["alertname"]
        for case in yaml.safe_load(tests.read_text())["tests"]
        for t in case.get("alert_rule_test", [])
    }
    assert tested == {a["alert"] for a in _alerts()}
    _run([_tool("promtool"), "test", "rules", str(tests)])


def test_alertmanager_config_is_valid_and_holds_no_secrets():
    _run([_tool("amtool"), "check-config", str(ALERTMANAGER_YML)])
    cfg = yaml.safe_load(ALERTMANAGER_YML.read_text())
    text = json.dumps(cfg)
    assert "hooks.slack.com" not in text and 'api_url"' not in text and 'auth_password"' not in text
    assert cfg["global"]["slack_api_url_file"] and cfg["global"]["smtp_auth_password_file"]


EXPECTED_RECEIVER = {"critical": "slack-and-email", "warning": "slack"}


@pytest.mark.parametrize("alert", _alerts(), ids=lambda a: a["alert"])
def test_each_alert_routes_to_its_receiver(alert):
    severity = alert["labels"]["severity"]
    _run(
        [
            _tool("amtool"),
            "config",
            "routes",
            "test",
            f"--config.file={ALERTMANAGER_YML}",
            f"--verify.receivers={EXPECTED_RECEIVER[severity]}",
            f"alertname={alert['alert']}",
            f"severity={severity}",
            "run_id=r50",
        ]
    )


def test_dashboard_json_is_the_generated_one():
    proc = subprocess.run(
        [sys.executable, str(MON / "build_dashboard.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_dashboard_has_the_rows_and_prometheus_targets_it_promises():
    dash = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    assert rows == [
        "Progress",
        "Throughput and step time",
        "Per-rank comparison",
        "Hardware",
        "Checkpoints",
        "Fault tolerance (replicated mode)",
        "Alerts",
    ]
    for p in dash["panels"]:
        for t in p.get("targets", []):
            assert p["datasource"]["uid"] == "prometheus" and t["expr"] and t["refId"], p["title"]
    # Every datasource uid the dashboard uses is provisioned.
    ds = yaml.safe_load((MON / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in ds["datasources"]}
    assert {p["datasource"]["uid"] for p in dash["panels"] if p.get("datasource")} <= uids
    provider = yaml.safe_load((MON / "grafana" / "provisioning" / "dashboards" / "imgtrain.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_parses_and_every_mounted_file_exists():
    services = _compose()["services"]
    assert set(services) == {"prometheus", "alertmanager", "grafana", "node-exporter"}
    mounts = [v.split(":")[0] for s in services.values() for v in s.get("volumes", [])]
    local = [m for m in mounts if m.startswith("./")]
    assert len(local) >= 6
    for m in local:
        assert (MON / m).exists(), f"docker-compose.yml mounts {m}, which does not exist"
    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("./"))
    assert grafana_mounts["./grafana/dashboards"] == "/var/lib/grafana/dashboards"
    assert "--cluster.listen-address=" in services["alertmanager"]["command"]


def test_compose_services_listen_on_loopback_and_grafana_has_no_default_password():
    """With host networking, a service listening on every interface is reachable from the network: anyone
    could silence the alerts (Alertmanager) or log in to Grafana as admin/admin."""
    services = _compose()["services"]
    for name in ("prometheus", "alertmanager", "node-exporter"):
        listen = [
            a.split("=", 1)[1] for a in services[name]["command"] if a.startswith("--web.listen-address=")
        ]
        assert listen and listen[0].startswith("127.0.0.1:"), (name, listen)
    env = services["grafana"]["environment"]
    assert env["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    secret = env["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    mounts = dict(v.split(":")[1::-1] for v in services["grafana"]["volumes"] if v.startswith("./"))
    host_dir = next(src for dst, src in mounts.items() if secret.startswith(dst + "/"))
    # The password file's folder is shipped, its content never (git-ignored).
    assert (MON / host_dir / ".gitignore").read_text().split()[0] == "*"
    # Every address the stack dials itself is reachable on loopback.
    prom = yaml.safe_load((MON / "prometheus" / "prometheus.yml").read_text())
    am = [t for a in prom["alerting"]["alertmanagers"] for sc in a["static_configs"] for t in sc["targets"]]
    assert am == ["127.0.0.1:9093"]
    ds = yaml.safe_load((MON / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert {d["url"] for d in ds["datasources"]} == {"http://127.0.0.1:9090", "http://127.0.0.1:9093"}


def test_compose_prometheus_config_passes_promtool_and_scrapes_the_trainer_ports(tmp_path):
    prom = _compose()["services"]["prometheus"]
    # Rebuild the container's /etc/prometheus from the compose mounts, then check it there.
    etc = tmp_path / "etc-prometheus"
    for v in prom["volumes"]:
        src, dst = v.split(":")[:2]
        if src.startswith("./") and dst.startswith("/etc/prometheus"):
            target = etc / Path(dst).relative_to("/etc/prometheus")
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (MON / src).is_dir() else shutil.copy)(MON / src, target)
    cfg_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    cfg = etc / Path(cfg_flag.split("=", 1)[1]).relative_to("/etc/prometheus")
    out = _run([_tool("promtool"), "check", "config", str(cfg)]).stdout
    assert "1 rule files found" in out and f"SUCCESS: {len(_alerts())} rules found" in out
    scrape = yaml.safe_load(cfg.read_text())["scrape_configs"]
    targets = [
        t for j in scrape if j["job_name"] == "imgtrain" for sc in j["static_configs"] for t in sc["targets"]
    ]
    from imgtrain.config import PrometheusConfig

    base = PrometheusConfig().port
    assert targets == [f"localhost:{base + i}" for i in range(8)]  # default port + local rank 0..7


def test_replicated_mode_metrics_have_an_alert_and_panels():
    """Issue 19's metrics (exported per replica group by fault_tolerance.mode=replicated) are on the
    dashboard, and the quorum alert compares the quorum with the full size the run exports."""
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"imgtrain_\w+", e)}
    assert REPLICATED_METRICS <= used, REPLICATED_METRICS - used
    (quorum,) = [a for a in _alerts() if a["alert"] == "ImgtrainQuorumBelowFull"]
    assert {"imgtrain_quorum_size", "imgtrain_replica_groups_expected"} <= set(
        re.findall(r"imgtrain_\w+", quorum["expr"])
    )


def test_readme_and_docs_name_the_committed_files():
    doc = (REPO / "docs" / "monitoring.md").read_text()
    for name in (
        "docker compose up -d",
        "build_dashboard.py",
        "slack_webhook_url",
        "smtp_password",
        "linger_s",
        "imgtrain_step_phase_seconds_total",
    ):
        assert name in doc, name
    for alert in _alerts():
        assert re.search(rf"\b{alert['alert']}\b", doc), alert["alert"]
