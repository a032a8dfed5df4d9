"""A checkpoint write slower than the collective timeout must not kill a healthy run.

The slow storage is real fsspec plumbing: a file system registered under `slowfile://` through the
`fsspec.specs` entry point (as any third-party fsspec backend is), whose state.pt uploads take longer
than `distributed.timeout`. While rank 0 writes synchronously, rank 1 already waits in its next
collective; without widening the timeout around the write, Gloo would abort it.
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest

from conftest import TINY, make_image_folder, run_torchrun

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The collective timeout holds for the whole run, so it must be generous for a loaded machine's ordinary
# step skew; only the first state.pt write outlasts it (by 10 s), so the test pays the delay once.
TIMEOUT_S = 15
DELAY_S = TIMEOUT_S + 10


def _install_slowfs(root):
    (root / "slowfs.py").write_text(
        textwrap.dedent(f"""
        import os
        import time
        from fsspec.implementations.local import LocalFileSystem

        class SlowFileSystem(LocalFileSystem):
            protocol = ("slowfile",)

            @classmethod
            def _strip_protocol(cls, path):
                if isinstance(path, str) and path.startswith("slowfile://"):
                    path = path[len("slowfile://"):]
                return super()._strip_protocol(path)

            def _open(self, path, mode="rb", **kwargs):
                first = os.path.join({str(root)!r}, "first-write-done")
                if "w" in mode and str(path).endswith("state.pt") and not os.path.exists(first):
                    time.sleep({DELAY_S})
                    open(first, "w").close()
                return super()._open(path, mode, **kwargs)
    """)
    )
    info = root / "slowfs-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: slowfs\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fsspec.specs]\nslowfile = slowfs:SlowFileSystem\n")


def test_synchronous_save_slower_than_collective_timeout(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "data", classes=2, train_per_class=12, val_per_class=2, size=16)
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    _install_slowfs(plugin)
    # In front of the tree under test (an editable install elsewhere must not take its place).
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(plugin), os.environ.get("PYTHONPATH")]))
    )
    out = tmp_path / "run"
    run_torchrun(
        2,
        [
            "train",
            "--output-dir",
            str(out),
            f"data.root={data}",
            *TINY,
            f"checkpoint.dir=slowfile://{tmp_path / 'ckpt'}",
            "checkpoint.async_save=false",
            "checkpoint.save_every_steps=2",
            "checkpoint.save_at_epoch_end=false",
            "training.max_steps=3",
            f"distributed.timeout={TIMEOUT_S}",
        ],
        timeout=240,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    manifests = sorted(p.parent.name for p in (tmp_path / "ckpt").glob("step_*/manifest.json"))
    assert manifests == ["step_000000002", "step_000000003"]
    assert (plugin / "first-write-done").exists()  # the slow write did happen (the plugin was used)
