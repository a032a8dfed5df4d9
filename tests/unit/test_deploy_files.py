"""Offline checks of the shipped deployment files: Kubernetes schemas, shell scripts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_FILES = sorted(p for p in (REPO / "deploy").rglob("*kubernetes*.yaml"))
SCRIPTS = sorted([*(REPO / "scripts").glob("*.sh"), *(REPO / "deploy").rglob("*.sbatch"), REPO / ".ci" / "run"])


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_kubernetes_manifests_validate_against_schemas(path):
    kv = pytest.importorskip("kubernetes_validate")
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kv.validate(doc, "1.30.0", strict=True)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_pass_shellcheck(path):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: shellcheck)")
    proc = subprocess.run(["shellcheck", "-x", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_launch_script_sets_the_documented_rendezvous_settings():
    text = (REPO / "scripts" / "launch_training.sh").read_text()
    doc = (REPO / "docs" / "fault_tolerance.md").read_text()
    for setting in ("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", "last_call_timeout=1", "keep_alive_interval=1",
                    "keep_alive_max_attempt=3", "heartbeat_timeout=5"):
        assert setting in text and setting in doc
