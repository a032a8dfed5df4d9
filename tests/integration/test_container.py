"""The container's Python layer, without building the image: the GPU Dockerfile's pip steps run in a clean
virtual environment exactly as the Dockerfile writes them, then the image's entrypoint command.

What this proves: requirements.py reads pyproject.toml, the wheel builds from a checkout holding only
what the Dockerfile COPYs (so .dockerignore and the COPY lines are enough), the dependency install
resolves, and the installed wheel (not the editable checkout) runs the image's command (`imgtrain
--help`) and checks a recipe the image copies into its WORKDIR. What it does not: the base image (its
Python, pip and CUDA torch are stood in for by those of the Python running the tests, the system's or a
venv's, reached as the image reaches the base's), the OS layer (its apt-get lines; the compiler and libjpeg headers come from
scripts/install.sh here, so the wheel's region decoder is compiled as in the build stage), USER/permissions, a training run inside the image (the
training code itself is tested everywhere else), or a GPU.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import site
import subprocess
import venv
from pathlib import Path

import pytest

from conftest import REPO, subprocess_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        buf += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            op, _, rest = buf.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
            buf = ""
    return out


def _context_allowed(rel: str) -> bool:
    """Whether .dockerignore lets ``rel`` into the build context (its `*` then `!path` form)."""
    lines = [
        ln.strip()
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "this check understands an allow-list .dockerignore only"
    allowed = [ln[1:].rstrip("/") for ln in lines if ln.startswith("!")]
    return any(rel == a or rel.startswith(a + "/") for a in allowed)


def run_dockerfile_python_steps(dockerfile: Path, root: Path, python_bin: Path) -> tuple[Path, list[str]]:
    """Interpret FROM/WORKDIR/COPY/ENV/RUN of every stage; each stage's file system is a directory under
    ``root``. RUN lines go to bash exactly as written, with ``python_bin``'s directory first on PATH.
    Returns (the last stage's WORKDIR, its ENTRYPOINT + CMD)."""
    stages: dict[str, Path] = {}
    fs = workdir = None
    env = subprocess_env()
    env.pop("PYTHONPATH", None)  # the installed wheel must be what runs, not this checkout
    env["PATH"] = f"{python_bin.parent}{os.pathsep}{env['PATH']}"
    entry: list[str] = []
    for op, args in instructions(dockerfile):
        if op == "FROM":
            words = args.split()
            parent = words[0]
            fs = root / f"stage{len(stages)}"
            if parent in stages:  # FROM <stage>: starts as a copy of that stage
                shutil.copytree(stages[parent], fs)
            else:
                fs.mkdir(parents=True)
            stages[words[2] if len(words) == 3 and words[1].upper() == "AS" else f"#{len(stages)}"] = fs
            workdir = fs
        elif op == "WORKDIR":
            workdir = fs / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif op == "COPY":
            words = shlex.split(args)
            src_root = REPO
            flags = [w for w in words if w.startswith("--")]
            paths = [w for w in words if not w.startswith("--")]
            for f in flags:
                if f.startswith("--from="):
                    src_root = stages[f.split("=", 1)[1]]
            *srcs, dest = paths
            for s in srcs:
                src = src_root / s.lstrip("/")
                if src_root == REPO:
                    assert _context_allowed(s.rstrip("/")), f"COPY {s}: excluded by .dockerignore"
                target = (fs / dest.lstrip("/")) if dest.startswith("/") else workdir / dest
                if src.is_dir():
                    shutil.copytree(
                        src,
                        target,
                        dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so"),
                    )
                else:
                    if dest.endswith("/"):
                        target = target / src.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target)
        elif op == "ENV":
            for kv in shlex.split(args):
                k, _, v = kv.partition("=")
                env[k] = v
        elif op == "RUN":
            if args.startswith(("useradd", "apt-get")):
                # The image's user and OS packages: not reproduced here (see the module docstring); the
                # compiler and libjpeg headers the build stage installs come from scripts/install.sh here.
                continue
            proc = subprocess.run(
                ["bash", "-o", "pipefail", "-c", args],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert proc.returncode == 0, f"RUN {args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        elif op in ("ENTRYPOINT", "CMD"):
            entry += json.loads(args)
    return workdir, entry


def venv_over_this_python(env_dir: Path) -> Path:
    """A new virtual environment that sees this Python's packages after its own, as a venv made with
    --system-site-packages sees the base Python's; returns its python.

    The packages must be those of the interpreter running the tests: the system Python's when the
    project was installed there (CI), but the user's venv's when it was installed into one, and
    ``system_site_packages=True`` would reach past that venv to the base Python, which has no torch."""
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # addsitedir: appended after the venv's own directory, their .pth files processed (as site does for the
    # system site-packages).
    lines = [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages()]
    (Path(purelib) / "_outer_site_packages.pth").write_text("\n".join(lines) + "\n")
    return python


def test_venv_over_this_python_sees_its_packages_after_its_own(tmp_path):
    python = venv_over_this_python(tmp_path / "venv")
    code = "import sys, torch; print(sys.prefix); print(torch.__file__)"
    env = subprocess_env()
    env.pop("PYTHONPATH", None)
    prefix, torch_file = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    assert Path(prefix) == tmp_path / "venv"
    import torch

    assert torch_file == torch.__file__  # this Python's torch, wherever it was installed


def test_dockerfile_pip_steps_and_entrypoint_in_a_clean_venv(tmp_path):
    env_dir = tmp_path / "venv"
    # Stands in for the base image's Python: torch comes from it, everything else is installed anew.
    # pip too comes from the outer site-packages (as in the image), which saves installing it anew.
    python = venv_over_this_python(env_dir)
    workspace, entry = run_dockerfile_python_steps(DOCKERFILE, tmp_path / "image", python)
    assert entry == ["imgtrain", "--help"]

    env = subprocess_env()
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{python.parent}{os.pathsep}{env['PATH']}"
    where = subprocess.run(
        [str(python), "-c", "import imgtrain; print(imgtrain.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=workspace,
    ).stdout.strip()
    assert where.startswith(str(env_dir)), f"imgtrain imported from {where}, not the installed wheel"
    # The wheel carries the region decoder (data.decode.decoder=libjpeg_roi), compiled in the build stage.
    roi = subprocess.run(
        [str(python), "-c", "import imgtrain.data.decode._jpegroi as m; print(m.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        cwd=workspace,
    )
    assert roi.returncode == 0 and roi.stdout.startswith(str(env_dir)), roi.stderr[-2000:]

    help_out = subprocess.run(entry, env=env, cwd=workspace, capture_output=True, text=True, timeout=120)
    assert help_out.returncode == 0 and "train" in help_out.stdout, help_out.stderr
    # A recipe from the image's WORKDIR, through the installed package's config schema (exit 2 names the key).
    bad = subprocess.run(
        [entry[0], "train", "--config", "configs/imagenet_resnet50.yaml", "training.batch_size=0"],
        env=env,
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "training.batch_size" in bad.stderr, bad.stderr
