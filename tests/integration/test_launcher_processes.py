"""`imgtrain launch` on one node: workers forked from the pre-importing agent (or its fork server), per-rank
logs, and a killed agent that leaves nothing behind (its fork server exits, its worker saves and exits)."""

from __future__ import annotations

import re
import signal
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


def _launch_sleep(tmp_path, sigint_ignored: bool = False) -> subprocess.Popen:
    """`imgtrain launch` of one worker that sleeps (not Python: only the launcher's handling is under test),
    in a session of its own so that a signal reaches the launcher alone. ``sigint_ignored``: started as a
    non-interactive shell starts a background job (``cmd &`` in a script, a CI runner started so), with
    SIGINT ignored, which python keeps."""
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
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None,
    )


def _workers_started_in(log_dir: Path) -> list[psutil.Process]:
    """The `sleep` workers torchrun started for a launch with ``--log-dir=log_dir`` (each in a session of its
    own, so not among the launcher's session; told by the error file torchrun gives each worker)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.cmdline()[:1] == ["sleep"] and p.environ().get("TORCHELASTIC_ERROR_FILE", "").startswith(
                str(log_dir)
            ):
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_launcher_stopped_by_a_signal_exits_with_its_code_quietly(tmp_path, sig, code):
    """torchrun's agent turns the signal into an exception once it has stopped its workers; `imgtrain launch`
    exits as a process stopped by that signal (README's exit codes), without a traceback."""
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


@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_while_the_launcher_starts_exits_with_its_code_quietly(tmp_path, sig, code):
    """Ctrl-C or SIGTERM while `imgtrain launch` is still importing torch (seconds, before torchrun's agent has
    handlers or a worker) ends it with README's 130/143 and one line, not a traceback, and starts nothing.
    Also when it inherited SIGINT ignored, as a background job of a script does: python keeps that, and the
    launcher ignored Ctrl-C until torchrun's agent took the signal, after it had started its workers (a full
    test run started in the background hung here); SIGTERM killed it silently, without 143."""
    agent = _launch_sleep(tmp_path, sigint_ignored=True)
    try:
        # torch's shared library is mapped at the start of its import, a second or more before the agent
        # could have a worker.
        wait_for(
            lambda: "libtorch" in Path(f"/proc/{agent.pid}/maps").read_text(), 60, "torch's import to start"
        )
        agent.send_signal(getattr(signal, sig))
        try:
            rc = agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            rc = "still running 60 s after the signal"
    finally:
        if agent.poll() is None:
            agent.kill()
        started = _workers_started_in(tmp_path)
        for p in started:
            p.kill()
    output = agent.stdout.read()
    assert rc == code, output[-3000:]
    assert output.strip() == f"imgtrain launch: stopped by {sig} while starting; no worker had started", (
        output[-3000:]
    )
    assert not started


# An agent as torchrun's (and `imgtrain launch`'s, fork start method) runs its workers: the store's server in
# this process, the workers forked by torch's start_processes (parent-death signal SIGINT), each with
# python's SIGINT handling (as launch.run_worker gives it), joining the process group through the agent's
# store as rank 1 or 2 of 3 once the file argv[1] exists. Prints "started PORT PID PID".
_AGENT = """
import os, signal, sys, time
import torch.distributed as dist
import torch.multiprocessing as mp
from imgtrain.config import DistributedConfig
from imgtrain.distributed.process_group import init_distributed

def worker(local_rank, port, go):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank + 1),
                      WORLD_SIZE="3", LOCAL_RANK=str(local_rank), TORCHELASTIC_USE_AGENT_STORE="True")
    while not os.path.exists(go):
        time.sleep(0.01)
    init_distributed(DistributedConfig(backend="gloo"))

store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
workers = mp.start_processes(worker, args=(store.port, sys.argv[1]), nprocs=2, join=False, start_method="fork")
print("started", store.port, *workers.pids(), flush=True)
time.sleep(600)
"""


def _store_connections(p: psutil.Process, port: int) -> set:
    """This process's TCP connections to the store, by local address."""
    try:
        return {c.laddr for c in p.net_connections("tcp") if c.raddr and c.raddr.port == port}
    except psutil.Error:
        return set()


def test_workers_joining_the_process_group_exit_when_their_agent_is_killed(tmp_path):
    """kill -9 of the agent while its workers wait in its store: every worker is gone within seconds, each
    saying why in one line. Before, they waited out distributed.init_timeout (30 min): the agent's death
    signal cannot interrupt a store call, and the store's listening socket, inherited by every forked
    worker, still takes connections that nobody serves. The agent is stopped before the workers connect, so
    that their connections wait in that socket's queue, as when a launcher is killed while its workers
    start (a timed-out test's `kill -9`)."""
    out, go = tmp_path / "agent.log", tmp_path / "go"
    with open(out, "w") as log:
        agent = subprocess.Popen(
            [sys.executable, "-c", _AGENT, str(go)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=subprocess_env(),
            start_new_session=True,
        )
    workers: list[psutil.Process] = []
    try:
        started = wait_for(
            lambda: (
                re.search(r"^started (\d+) (\d+) (\d+)$", out.read_text(), re.MULTILINE)
                or agent.poll() is not None
            ),
            60,
            "the agent to start its workers",
        )
        assert agent.poll() is None, out.read_text()[-3000:]
        port, *pids = (int(g) for g in started.groups())
        workers = [psutil.Process(pid) for pid in pids]
        # A fork inherits the agent's own client connection to its store: only a connection beyond it is the
        # worker's (killed earlier, a worker still waiting for `go` gets torch's parent-death SIGINT instead).
        inherited = {p.pid: _store_connections(p, port) for p in workers}
        agent.send_signal(signal.SIGSTOP)
        go.touch()
        wait_for(
            lambda: all(_store_connections(p, port) - inherited[p.pid] for p in workers),
            60,
            "the workers to connect to the store",
        )
        agent.kill()
        agent.wait(timeout=30)
        wait_for(lambda: not any(_alive(p) for p in workers), 10, "the orphaned workers to exit")
    finally:  # nothing left behind, whatever failed
        if agent.poll() is None:
            agent.kill()
        for p in workers:
            if _alive(p):
                p.kill()
    text = out.read_text()
    for rank in (1, 2):
        assert f"imgtrain: rank {rank}: its launcher (parent process {agent.pid}) died" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
