"""`imgtrain launch` on one node: workers forked from the pre-importing agent (or its fork server), per-rank
logs, and a killed agent that leaves nothing behind (its fork server exits, its worker saves and exits)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from imgtrain.checkpoint import verify

from conftest import TINY, free_port, make_image_folder, subprocess_env
from elastic_nodes import events, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# fork: the default (workers are forks of the agent); forkserver: what a GPU count (--nproc-per-node=gpu) gets.
@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_killed_launcher_leaves_no_process_and_its_worker_saves(tmp_path, start_method):
    data = make_image_folder(tmp_path / "data", classes=3, train_per_class=16, val_per_class=2, size=16)
    out, logs = tmp_path / "run", tmp_path / "logs"
    cmd = [
        sys.executable,
        "-m",
        "imgtrain",
        "launch",
        "--nproc-per-node=1",
        *([] if start_method == "fork" else [f"--start-method={start_method}"]),
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--redirects=3",
        f"--log-dir={logs}",
        "-m",
        "imgtrain",
        "train",
        "--output-dir",
        str(out),
        f"data.root={data}",
        *TINY,
        "data.workers=1",
        "training.epochs=500",
    ]
    agent = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(),
        start_new_session=True,
    )
    procs: list[psutil.Process] = []
    try:
        wait_for(
            lambda: any(e["step"] >= 2 for e in events(out, "train")) or agent.poll() is not None,
            240,
            "two training steps",
        )
        assert agent.poll() is None, agent.stdout.read()[-4000:]
        procs = psutil.Process(agent.pid).children(recursive=True)
        children = [p for p in procs if p.ppid() == agent.pid]
        servers = [p for p in children if "multiprocessing.forkserver" in " ".join(_cmdline(p))]
        if start_method == "fork":
            assert not servers, [_cmdline(p) for p in servers]
            # A fork of the agent, with its command line.
            (worker,) = [p for p in children if _cmdline(p) == _cmdline(psutil.Process(agent.pid))]
        else:
            assert len(servers) == 1, [_cmdline(p) for p in procs]
            (worker,) = servers[0].children()
        # The DataLoader's worker is a fork of the training worker (the default start method of a fresh
        # process), not the child of a second fork server that would import torch again.
        loaders = worker.children()
        assert loaders and all(_cmdline(p) == _cmdline(worker) for p in loaders), [
            _cmdline(p) for p in loaders
        ]

        agent.kill()  # kill -9 the agent alone
        agent.wait(timeout=30)
        wait_for(lambda: not any(_alive(p) for p in procs), 120, "the agent's processes to exit")
    finally:
        if agent.poll() is None:
            agent.kill()
        for p in procs:
            if _alive(p):
                p.kill()
    # The fork server exited with its agent; the worker took that as SIGINT and saved where it stopped. The
    # step it stops at is the one its own log names when the signal is taken (a step or more after the kill).
    (stderr_log,) = logs.glob("*/attempt_0/0/stderr.log")
    text = stderr_log.read_text()
    assert "received SIGINT; stopping after this step" in text, text[-3000:]
    said = re.search(r"preemption \(SIGINT\): saving a checkpoint at step (\d+) before exiting", text)
    assert said, text[-3000:]
    stopped = int(said.group(1))
    # That step's checkpoint is published and intact, it is the run's newest, and nothing was trained after it.
    verify(str(out / "checkpoints" / f"step_{stopped:09d}"))
    assert wait_for(
        lambda: [e["step"] for e in events(out, "checkpoint")][-1:] == [stopped],
        60,
        f"the checkpoint record of step {stopped} in metrics.jsonl",
    )
    assert max(e["step"] for e in events(out, "train")) == stopped


def _launch_sleep(tmp_path) -> subprocess.Popen:
    """`imgtrain launch` of one worker that sleeps (not Python: only the launcher's handling is under test),
    in a session of its own so that a signal reaches the launcher alone."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "imgtrain",
            "launch",
            "--standalone",
            "--nproc-per-node=1",
            f"--log-dir={tmp_path}",
            "--no-python",
            "sleep",
            "600",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=subprocess_env(),
        start_new_session=True,
    )


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_launcher_stopped_by_a_signal_exits_with_its_code_quietly(tmp_path, sig, code):
    """torchrun's agent turns the signal into an exception once it has stopped its workers; `imgtrain launch`
    exits as a process stopped by that signal (README's exit codes), without a traceback."""
    import signal

    agent = _launch_sleep(tmp_path)
    try:
        # Signal once the agent runs its worker (its handlers are installed by then). Not any child: starting,
        # the agent runs others (ldconfig, for the CUDA libraries' lookup) before it has handlers.
        (worker,) = wait_for(
            lambda: (
                agent.poll() is None
                and [c for c in psutil.Process(agent.pid).children() if _cmdline(c)[:1] == ["sleep"]]
            ),
            120,
            "the agent's worker",
        )
        agent.send_signal(getattr(signal, sig))
        try:
            rc = agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rc = "still running 60 s after the signal"
    finally:
        if agent.poll() is None:
            agent.kill()
    output = agent.stdout.read()
    assert rc == code, output[-3000:]
    assert f"Received {int(getattr(signal, sig))} death signal, shutting down workers" in output, output[
        -3000:
    ]
    assert "Traceback" not in output, output[-3000:]
    assert not _alive(worker)


def test_ctrl_c_while_the_launcher_starts_exits_130_quietly(tmp_path):
    """Ctrl-C while `imgtrain launch` is still importing torch (seconds, before any handler or worker exists)
    ends it with README's 130 and one line, not a KeyboardInterrupt traceback."""
    import signal

    agent = _launch_sleep(tmp_path)
    try:
        # torch's shared library is mapped at the start of its import, a second or more before the agent
        # could have a worker.
        wait_for(
            lambda: "libtorch" in Path(f"/proc/{agent.pid}/maps").read_text(), 60, "torch's import to start"
        )
        agent.send_signal(signal.SIGINT)
        rc = agent.wait(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
    output = agent.stdout.read()
    assert rc == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "imgtrain: interrupted" in output or "death signal" in output, output[-3000:]
