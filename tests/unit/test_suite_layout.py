"""The split of the suite stays honest: tests/unit starts no process and runs no tool (those tests belong in
tests/integration or tests/checks), no test module imports another (shared helpers live in
tests/conftest.py), and test file names are unique across the folders (pytest imports them by base name)."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

from conftest import TESTS

# What starts another process: the modules, os's process calls, and conftest's helpers that run imgtrain.
PROCESS_MODULES = {
    "subprocess",
    "multiprocessing",
    "pty",
    "torch.multiprocessing",
    "concurrent.futures.process",
}
OS_PROCESS_CALLS = ("system", "popen", "fork", "forkpty", "exec", "spawn", "posix_spawn")
CONFTEST_PROCESS_HELPERS = {"run_cli", "run_benchmark", "run_torchrun", "torchrun_cmd", "Run", "runs"}


def _starts_processes(module: str) -> bool:
    return module in PROCESS_MODULES or module.split(".")[0] in {"subprocess", "multiprocessing", "pty"}


def _process_use(path: Path) -> list[str]:
    """Where the module at ``path`` starts a process: 'line N: what'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        what = None
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if _starts_processes(a.name)]
            what = f"import {', '.join(names)}" if names else None
        elif isinstance(node, ast.ImportFrom) and node.module:
            if _starts_processes(node.module):
                what = f"from {node.module} import ..."
            elif node.module == "torch" and any(a.name == "multiprocessing" for a in node.names):
                what = "from torch import multiprocessing"
            elif node.module == "conftest":
                helpers = sorted({a.name for a in node.names} & CONFTEST_PROCESS_HELPERS)
                what = f"conftest's {', '.join(helpers)}" if helpers else None
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os":
            what = f"os.{node.attr}" if node.attr.startswith(OS_PROCESS_CALLS) else None
        elif isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            fixtures = sorted({a.arg for a in node.args.args} & CONFTEST_PROCESS_HELPERS)
            what = f"the {', '.join(fixtures)} fixture" if fixtures else None
        if what:
            found.append(f"line {node.lineno}: {what}")
    return found


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def test_unit_tests_start_no_process():
    offenders = {str(p.relative_to(TESTS)): use for p in _modules(TESTS / "unit") if (use := _process_use(p))}
    assert not offenders, (
        f"tests/unit is one process without external tools; move these to tests/integration or tests/checks: "
        f"{offenders}"
    )


def test_process_use_is_found(tmp_path):
    """The check above can fail: each way of starting a process is seen."""
    cases = {
        "import subprocess": "import subprocess",
        "import torch.multiprocessing as mp": "import torch.multiprocessing",
        "from multiprocessing import Process": "from multiprocessing import",
        "import os\nos.system('true')": "os.system",
        "import os\nos.execv('/bin/true', [])": "os.execv",
        "from conftest import TINY, run_cli": "conftest's run_cli",
        "def test_x(runs):\n    pass": "the runs fixture",
    }
    for code, expected in cases.items():
        path = tmp_path / "test_case.py"
        path.write_text(code + "\n")
        assert any(expected in use for use in _process_use(path)), (code, _process_use(path))
    (tmp_path / "test_case.py").write_text(
        "import os\nimport shutil\nos.environ.get('X')\nshutil.which('gcc')\n"
    )
    assert _process_use(tmp_path / "test_case.py") == []


def test_no_test_module_imports_another():
    test_names = {p.stem for p in _modules(TESTS) if p.name.startswith("test_")}
    imports = {}
    for path in _modules(TESTS):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            bad = [n for n in names if n.split(".")[0] in test_names or n.startswith("tests")]
            if bad:
                imports.setdefault(str(path.relative_to(TESTS)), []).extend(bad)
    assert not imports, f"shared helpers belong in tests/conftest.py, not in a test module: {imports}"


def test_test_module_names_are_unique_across_folders():
    counts = Counter(p.name for p in _modules(TESTS) if p.name.startswith("test_"))
    assert not [n for n, c in counts.items() if c > 1], "pytest imports test modules by base name"


def test_the_default_run_collects_every_test_folder():
    """`python -m pytest` (CI's command) runs pyproject's testpaths: a new folder of tests outside them would
    never run."""
    import tomllib

    testpaths = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"][
        "testpaths"
    ]
    folders = {str(p.parent.relative_to(TESTS.parent)) for p in TESTS.rglob("test_*.py")}
    assert folders <= set(testpaths), (
        f"test folders outside pyproject's testpaths: {folders - set(testpaths)}"
    )


def test_every_test_path_the_docs_name_exists():
    """README, docs/, deploy/, scripts/, benchmarks/ and src/ name tests as proof: `tests/x/test_y.py` and
    `tests/x/test_y.py::test_z` must still be there after tests move."""
    import re

    repo = TESTS.parent
    named = re.compile(r"tests/(?:unit|checks|integration)/[\w/]+\.py(?:::\w+)?")
    sources = [repo / "README.md", *(repo / "docs").rglob("*.md")]
    for folder in ("deploy", "scripts", "benchmarks", "src"):
        sources += [
            p for p in (repo / folder).rglob("*") if p.suffix in {".py", ".sh", ".yaml", ".yml", ".md"}
        ]
    missing = []
    for source in sources:
        for ref in set(named.findall(source.read_text(errors="replace"))):
            path, _, test = ref.partition("::")
            if not (repo / path).is_file() or (
                test and not re.search(rf"^\s*def {test}\(", (repo / path).read_text(), re.M)
            ):
                missing.append(f"{source.relative_to(repo)}: {ref}")
    assert not missing, f"named tests that do not exist: {missing}"
