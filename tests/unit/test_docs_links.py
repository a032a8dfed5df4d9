"""The README and docs/ point only at what a clone of the repository has."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # [text](target) or [text](target#anchor)
PARENT = re.compile(r"(?<![\w/.-])(?:\.\./)+[\w./-]*[\w-]")  # ../deploy from docs/, ../shared/DESIGN.md
SHARED = re.compile(r"(?<![\w/.-])shared/(?:notes|tools|DESIGN|STYLE)[\w./-]*")  # the workspace's own notes


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve_inside_the_repository(doc):
    text = doc.read_text()
    for target in LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        path = (doc.parent / target).resolve()
        assert path.is_relative_to(REPO), f"{doc.name} links outside the repository: {target}"
        assert path.exists(), f"{doc.name} links to a missing file: {target}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_reference_to_files_outside_the_repository(doc):
    text = doc.read_text()
    outside = [t for t in PARENT.findall(text) if not (doc.parent / t).resolve().is_relative_to(REPO)]
    outside += SHARED.findall(text)
    assert not outside, f"{doc.name} refers to files a clone does not have: {outside}"


def test_readme_run_directory_table_lists_each_file_once():
    text = (REPO / "README.md").read_text()
    table = text.split("## The run directory", 1)[1].split("\n\n", 2)[1]
    files = [line.split("|")[1].strip() for line in table.splitlines()[2:] if line.startswith("|")]
    assert files and len(files) == len(set(files)), files
