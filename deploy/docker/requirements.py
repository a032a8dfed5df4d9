"""Print the runtime requirements of imgtrain (pyproject.toml's dependencies plus the named extras), one per
line, leaving out the packages the base image already provides. The Dockerfiles install this list in a
layer of its own, so that it is rebuilt only when the dependencies change, not on every source edit.

    python deploy/docker/requirements.py pyproject.toml s3 gcs --exclude torch torchvision
    python deploy/docker/requirements.py pyproject.toml --only torch torchvision
    python deploy/docker/requirements.py pyproject.toml --check-installed torch torchvision

--check-installed fails (exit 1, naming the package) when an installed package is outside pyproject.toml's
range: the CUDA image takes torch from its base image, and a base image below torch 2.10 would load
checkpoints with a weights_only unpickler that has known bypasses (docs/security.md).
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata

import tomllib


def requirements(pyproject: str, extras: list[str], exclude: list[str], only: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    skip, keep = {e.lower() for e in exclude}, {o.lower() for o in only}
    names = [re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower() for r in reqs]
    return [r for r, n in zip(reqs, names, strict=True) if n not in skip and (not keep or n in keep)]


def outside_range(pyproject: str, names: list[str]) -> list[str]:
    """One line per installed package of ``names`` whose version pyproject.toml's range excludes."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # images without packaging still have pip's copy
        from pip._vendor.packaging.requirements import Requirement

    problems = []
    for line in requirements(pyproject, [], [], names):
        req = Requirement(line)
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed (pyproject.toml wants {req.specifier})")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{req.name} {installed} is outside pyproject.toml's range {req.specifier}")
    return problems


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pyproject")
    p.add_argument("extras", nargs="*")
    p.add_argument("--exclude", nargs="*", default=[], help="leave these packages out")
    p.add_argument("--only", nargs="*", default=[], help="print only these packages")
    p.add_argument(
        "--check-installed",
        nargs="*",
        default=[],
        metavar="NAME",
        help="check that these installed packages satisfy pyproject.toml, print nothing else",
    )
    a = p.parse_args()
    if a.check_installed:
        problems = outside_range(a.pyproject, a.check_installed)
        for line in problems:
            print(f"requirements.py: {line}", file=sys.stderr)
        sys.exit(1 if problems else 0)
    print("\n".join(requirements(a.pyproject, a.extras, a.exclude, a.only)))
