"""Print the runtime requirements of imgtrain (pyproject.toml's dependencies plus the named extras), one per
line, leaving out the packages the base image already provides. The Dockerfiles install this list in a
layer of its own, so that it is rebuilt only when the dependencies change, not on every source edit.

    python deploy/docker/requirements.py pyproject.toml s3 gcs --exclude torch torchvision
    python deploy/docker/requirements.py pyproject.toml --only torch torchvision
"""

from __future__ import annotations

import argparse
import re

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


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pyproject")
    p.add_argument("extras", nargs="*")
    p.add_argument("--exclude", nargs="*", default=[], help="leave these packages out")
    p.add_argument("--only", nargs="*", default=[], help="print only these packages")
    a = p.parse_args()
    print("\n".join(requirements(a.pyproject, a.extras, a.exclude, a.only)))
