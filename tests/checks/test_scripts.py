"""The launch / monitor / cleanup scripts' command lines, without a cluster: --help, bad options, and what
the Slurm and Kubernetes modes would run (--dry-run). The real multi-node run is in
tests/integration/test_launch_scripts.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, render, subprocess_env

pytestmark = [pytest.mark.slow]

SCRIPTS = ["launch_training.sh", "monitor.sh", "cleanup.sh"]


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(REPO / "scripts" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env(),
        cwd=cwd,
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_have_help_strict_mode_and_reject_unknown_options(script):
    text = (REPO / "scripts" / script).read_text()
    assert "set -euo pipefail" in text
    helped = _run(script, "--help")
    assert helped.returncode == 0 and "Options:" in helped.stdout and "set -euo" not in helped.stdout
    bad = _run(script, "--no-such-option")
    assert bad.returncode == 2 and "no-such-option" in bad.stderr


def test_launch_slurm_and_k8s_modes_print_what_they_run_and_where_things_are(tmp_path):
    slurm = _run(
        "launch_training.sh",
        "--mode",
        "slurm",
        "--nodes",
        "4",
        "--gpus",
        "8",
        "--dry-run",
        "--",
        "--output-dir",
        str(tmp_path / "r50"),
        "training.epochs=1",
    )
    assert slurm.returncode == 0, slurm.stderr
    assert "sbatch --parsable --job-name=imgtrain --nodes=4" in slurm.stdout
    assert (
        f"--output={tmp_path}/r50/logs/slurm-%j.log" in slurm.stdout and "--gpus-per-node=8" in slurm.stdout
    )
    assert "deploy/slurm/imgtrain.sbatch --output-dir" in slurm.stdout
    assert f"checkpoints: {tmp_path}/r50/checkpoints" in slurm.stderr

    k8s = _run(
        "launch_training.sh", "--mode", "k8s", "--overlay", "deploy/kubernetes/overlays/gke", "--dry-run"
    )
    assert k8s.returncode == 0, k8s.stderr
    assert k8s.stdout.strip() == "kubectl apply -k deploy/kubernetes/overlays/gke"
    assert "checkpoints: gs://" in k8s.stderr and "logs:" in k8s.stderr and "9450" in k8s.stderr

    # A bad override is caught before anything is submitted.
    bad = _run("launch_training.sh", "--mode", "slurm", "--dry-run", "--", "training.epochs=0")
    assert bad.returncode == 2 and "valid config" in bad.stderr


def test_cleanup_refuses_keep_zero_and_dry_run_lists_cluster_objects_but_not_claims(tmp_path):
    assert _run("cleanup.sh", "--checkpoints", str(tmp_path), "--keep", "0").returncode == 2
    dry = _run(
        "cleanup.sh", "--dry-run", "--k8s-overlay", "deploy/kubernetes/overlays/operator", "--no-prune"
    )
    assert dry.returncode == 0, dry.stderr
    assert "PyTorchJob/imgtrain-r50" in dry.stdout and "PodMonitor/imgtrain" in dry.stdout
    assert "PersistentVolumeClaim" not in dry.stdout  # the dataset claim stays unless --delete-volumes


def test_k8s_mode_checks_the_settings_against_terraform_outputs(tmp_path):
    import json
    import shutil

    if shutil.which("terraform") is None:
        pytest.skip("terraform is not installed")

    def state(ckpt: str, image: str) -> None:
        outputs = {"checkpoint_url": ckpt, "image_repository_url": image, "kubeconfig_command": "true"}
        (tmp_path / "terraform.tfstate").write_text(
            json.dumps(
                {
                    "version": 4,
                    "terraform_version": "1.9.0",
                    "serial": 1,
                    "lineage": "t",
                    "resources": [],
                    "outputs": {k: {"value": v, "type": "string"} for k, v in outputs.items()},
                }
            )
        )

    args = (
        "launch_training.sh",
        "--mode",
        "k8s",
        "--overlay",
        "deploy/kubernetes/overlays/gke",
        "--terraform",
        str(tmp_path),
        "--dry-run",
    )
    state("gs://another-bucket", "us-docker.pkg.dev/p/imgtrain/imgtrain")
    stale = _run(*args)
    assert stale.returncode == 0, stale.stderr
    assert (
        "warning: CHECKPOINT_DIR=gs://imgtrain-checkpoints-REPLACE_ME/r50 is not under gs://another-bucket"
        in stale.stderr
    )
    assert "warning: IMAGE=" in stale.stderr
    state("gs://imgtrain-checkpoints-REPLACE_ME", "us-docker.pkg.dev/REPLACE_ME/imgtrain/imgtrain")
    assert "warning" not in _run(*args).stderr


def _fake_launcher(run_dir: Path) -> subprocess.Popen:
    """Stands in for launch_training.sh (same script name): saves on SIGTERM (writes a marker), then exits."""
    (run_dir / "logs").mkdir(parents=True)
    script = run_dir / "launch_training.sh"
    script.write_text(f"trap 'touch {run_dir}/saved; exit 143' TERM\nwhile true; do sleep 0.1; done\n")
    return subprocess.Popen(["bash", str(script)])


def test_cleanup_stops_the_recorded_launcher_before_pruning(tmp_path, monkeypatch):
    import socket

    # A terminal width in the environment (as some shells export it) and a command line longer than it:
    # the launcher is still recognised by its full command line, not the part ps would print.
    monkeypatch.setenv("COLUMNS", "80")
    run_dir = tmp_path / ("a-run-directory-with-a-rather-long-name-" * 3)
    launcher = _fake_launcher(run_dir)
    (run_dir / "logs" / "launcher.pid").write_text(f"{launcher.pid}\n{socket.gethostname()}\n")
    try:
        dry = _run("cleanup.sh", "--dry-run", "--no-prune", "--run-dir", str(run_dir))
        assert dry.returncode == 0 and f"would run: kill -TERM {launcher.pid}" in dry.stdout
        assert launcher.poll() is None
        real = _run("cleanup.sh", "--no-prune", "--run-dir", str(run_dir), "--timeout", "60")
        assert real.returncode == 0, real.stderr
        assert launcher.wait(timeout=10) == 143 and (run_dir / "saved").exists()
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_cleanup_signals_only_this_hosts_launcher(tmp_path):
    """A pid file from another host, or whose pid now belongs to another process, is not signalled."""
    import socket

    run_dir = tmp_path / "run"
    launcher = _fake_launcher(run_dir)
    other = subprocess.Popen(["sleep", "300"])  # the pid reused by an unrelated process
    pid_file = run_dir / "logs" / "launcher.pid"
    try:
        pid_file.write_text(f"{launcher.pid}\nanother-node\n")
        wrong_host = _run("cleanup.sh", "--no-prune", "--run-dir", str(run_dir), "--timeout", "5")
        assert wrong_host.returncode == 2 and "another-node" in wrong_host.stderr
        pid_file.write_text(f"{other.pid}\n{socket.gethostname()}\n")
        reused = _run("cleanup.sh", "--no-prune", "--run-dir", str(run_dir), "--timeout", "5")
        assert reused.returncode == 0, reused.stderr
        assert "no longer the launcher" in reused.stderr
        assert launcher.poll() is None and other.poll() is None and not (run_dir / "saved").exists()
    finally:
        for p in (launcher, other):
            p.kill()
            p.wait()


def test_ssh_mode_passes_host_names_as_words_and_rejects_shell_syntax(tmp_path):
    out = tmp_path / "run"
    echo_argv = "python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' {host} {cmd}"
    args = ("launch_training.sh", "--mode", "ssh", "--ssh-cmd", echo_argv, "--gpus", "1")
    for hosts in ("gpu1,$(touch PWNED)", "gpu1;touch PWNED", "../../evil", "gpu1=10.0.0.1 `id`"):
        bad = _run(*args, "--hosts", hosts, "--", "--output-dir", str(out), cwd=tmp_path)
        assert bad.returncode == 2 and "--hosts" in bad.stderr, (hosts, bad.stderr)
    assert not (tmp_path / "PWNED").exists()
    # The template's own quoting holds; the host and the remote command arrive as one word each.
    ok = _run(
        *args, "--hosts", "gpu-1.example,gpu2=10.0.0.2", "--", "--output-dir", str(out), "training.epochs=1"
    )
    assert ok.returncode == 0, ok.stderr
    first = json.loads((out / "logs" / "gpu-1.example.log").read_text())
    assert first[0] == "gpu-1.example" and len(first) == 2
    assert "--is-host true" in first[1] and "training.epochs=1" in first[1]
    assert json.loads((out / "logs" / "gpu2.log").read_text())[0] == "gpu2"


def test_optional_efa_patch_renders_a_valid_job(tmp_path):
    import shutil

    kv = pytest.importorskip("kubernetes_validate")
    tree = tmp_path / "kubernetes"
    shutil.copytree(REPO / "deploy" / "kubernetes", tree)
    shutil.copytree(
        REPO / "deploy" / "monitoring", tmp_path / "monitoring"
    )  # the dashboard ConfigMap's source
    k = tree / "overlays" / "aws" / "kustomization.yaml"
    k.write_text(
        k.read_text().replace(
            "  #   - path: efa-patch.yaml\n  #     target: {kind: PyTorchJob}",
            "  - path: efa-patch.yaml\n    target: {kind: PyTorchJob}",
        )
    )
    job = next(d for d in render(k.parent) if d["kind"] == "PyTorchJob")
    template = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    container = template["spec"]["containers"][0]
    assert container["resources"]["limits"]["vpc.amazonaws.com/efa"] == 4
    assert {"name": "FI_PROVIDER", "value": "efa"} in container["env"]
    kv.validate(
        {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "w"}, "template": template},
        "1.30.0",
        strict=True,
    )
