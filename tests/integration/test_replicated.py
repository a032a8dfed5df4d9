"""Replicated mode (torchft) with real processes on loopback: two replica groups and a lighthouse.

Each group is one `imgtrain train` process (fault_tolerance.mode=replicated, its own group id), or a
torchrun of two; the lighthouse runs with a 1 s heartbeat timeout. Faults are real signals. What a user sees is checked: the
survivor's process never restarts and its step never goes back; the returning group heals from the
survivor (a "heal" record) and from then on holds the same weights bit for bit; a step that a fault broke
is dropped (a "step_dropped" record) and redone, never half-applied.

Across hosts (network namespaces): a group killed and restarted heals from its peer on the other host bit
for bit; a network partition that cuts a group off for longer than the collective timeout leaves the group
that still reaches the lighthouse training (no restart, its step never goes back), and once the link is
back the cut-off group rejoins without a restart and heals.

The tests wait on events (records in each group's metrics.jsonl); timeouts are generous bounds only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from imgtrain.checkpoint import MANIFEST, STATE_FILE

from conftest import (
    TINY,
    Run,
    free_port,
    make_image_folder,
    read_jsonl,
    subprocess_env,
    torchrun_cmd,
    wait_for,
)
from elastic_nodes import hosts_for_test

pytest.importorskip("torchft", reason="replicated mode needs torchft (the ft extra)")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WAIT = 240  # generous upper bound for anything to happen on a loaded 2-core machine
HEARTBEAT_MS = 1000
COLLECTIVE_TIMEOUT = 5  # fault_tolerance.replicated.collective_timeout of every group


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    # 4 classes x 40 images: 10 steps per epoch at a global batch of 16 (2 groups x 8)
    return make_image_folder(tmp_path_factory.mktemp("replicated") / "data", classes=4, train_per_class=40)


class Lighthouse:
    """``imgtrain lighthouse`` on ``host``:``port``; ``prefix`` runs it elsewhere (a network namespace:
    elastic_nodes.Hosts.command), where the connection probe runs too."""

    def __init__(self, port: int, log: Path, host: str = "127.0.0.1", prefix=lambda cmd: cmd):
        self.port, self.log, self.host, self.prefix = port, log, host, prefix
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self._out = open(self.log, "a")
        self.proc = subprocess.Popen(
            self.prefix(
                [
                    sys.executable,
                    "-m",
                    "imgtrain",
                    "lighthouse",
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                    "--heartbeat-timeout-ms",
                    str(HEARTBEAT_MS),
                    "--join-timeout-ms",
                    "2000",
                ]
            ),
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        wait_for(self._accepts, WAIT, "the lighthouse to listen", poll=0.05)

    def _accepts(self) -> bool:
        if self.prefix([]):  # elsewhere: bash's /dev/tcp connects from there
            probe = self.prefix(["bash", "-c", f"exec 3<>/dev/tcp/{self.host}/{self.port}"])
            return subprocess.run(probe, capture_output=True).returncode == 0
        try:
            socket.create_connection((self.host, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._out.close()


@pytest.fixture
def lighthouse(tmp_path):
    lh = Lighthouse(free_port(), tmp_path / "lighthouse.log")
    lh.start()
    yield lh
    lh.kill()


def group_command(tmp_path: Path, data_dir: Path, lighthouse: str, group: int, *extra: str) -> list[str]:
    """Replica group ``group`` as one `imgtrain train` process of the tests' run (``tmp_path/run``)."""
    return [
        sys.executable,
        "-m",
        "imgtrain",
        "train",
        *TINY,
        f"data.root={data_dir}",
        f"output_dir={tmp_path / 'run'}",
        "training.epochs=100000",  # the tests stop them once they have seen what they need
        "fault_tolerance.mode=replicated",
        f"fault_tolerance.replicated.lighthouse={lighthouse}",
        f"fault_tolerance.replicated.group_id={group}",
        f"fault_tolerance.replicated.collective_timeout={COLLECTIVE_TIMEOUT}",
        "fault_tolerance.replicated.timeout=20",
        "checkpoint.save_at_epoch_end=false",
        "checkpoint.save_every_steps=10",
        "checkpoint.keep_last_n=6",
        *extra,
    ]


@pytest.fixture
def groups(tmp_path, data_dir, lighthouse):
    """``groups(g, *extra)`` starts replica group g: an `imgtrain train` process, or with ``processes`` > 1
    a torchrun of that many (restarted up to ``max_restarts`` times); all are killed at the end."""
    started: list[Run] = []

    def start(
        group: int, *extra: str, name: str | None = None, processes: int = 1, max_restarts: int = 0
    ) -> Run:
        cmd = group_command(tmp_path, data_dir, lighthouse.address, group, *extra)
        if processes > 1:  # the same `train` arguments under torchrun
            cmd = torchrun_cmd(processes, cmd[cmd.index("train") :], [f"--max-restarts={max_restarts}"])
        run = Run(cmd, tmp_path / "run", name or f"group{group}")
        started.append(run)
        return run

    yield start
    for r in started:
        r.cleanup()


def records(tmp_path: Path, group: int, event: str | None = None) -> list[dict]:
    path = tmp_path / "run" / f"group-{group}" / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.endswith("}")]
    out = [json.loads(ln) for ln in lines]
    return [r for r in out if event is None or r.get("event") == event]


def last_step(tmp_path: Path, group: int) -> int:
    return max((r["step"] for r in records(tmp_path, group, "train")), default=0)


def wait_both_in_quorum(tmp_path: Path, runs: list[Run]) -> None:
    """Group 0's newest quorum holds both groups, and it has trained a few steps in it."""

    def together():
        q = records(tmp_path, 0, "quorum")
        return q and q[-1]["quorum_size"] == 2 and last_step(tmp_path, 0) > q[-1]["step"] + 2

    wait_for(
        together,
        WAIT,
        "both replica groups to train in one quorum",
        poll=0.05,
        ended=lambda: any(r.proc.poll() is not None for r in runs),
        context=lambda: "\n".join(r.output[-3000:] for r in runs),
    )


def restart_group1_and_check_it_heals(tmp_path: Path, start, g0: Run, pid0: int, before: int) -> None:
    """Group 1 (killed) started again by ``start()``: it heals from group 0 past ``before`` (its first
    process's heal at its start does not count), group 0 never restarts and never goes back, and from the
    heal on both hold the same weights bit for bit."""
    heals = len(records(tmp_path, 1, "heal"))
    g1b = start()
    heal = wait_for_heal(tmp_path, g1b, heals)
    assert heal["heal_bytes"] > 0 and heal["step"] > before
    assert "state_digest" not in heal  # fault_tolerance.replicated.state_digest is off by default
    assert_no_restart(g0, pid0)
    assert_same_weights_after(tmp_path, [g0, g1b], heal["step"])
    assert_steps_never_go_back(tmp_path, 0)


def wait_for_heal(tmp_path: Path, run: Run, heals_before: int) -> dict:
    """Group 1's next heal record (``run`` is its process): it fetched the live state from group 0."""
    wait_for(
        lambda: len(records(tmp_path, 1, "heal")) > heals_before,
        WAIT,
        "group 1 to heal from its peer",
        ended=lambda: run.proc.poll() is not None,
        context=lambda: run.output[-4000:],
    )
    return records(tmp_path, 1, "heal")[-1]


def assert_steps_never_go_back(tmp_path: Path, group: int) -> None:
    steps = [r["step"] for r in records(tmp_path, group, "train")]
    assert steps == sorted(steps) and len(steps) == len(set(steps)), steps


def assert_no_restart(run: Run, pid: int) -> None:
    assert run.proc.pid == pid and run.proc.poll() is None, run.output[-3000:]
    assert run.output.count("imgtrain: world size") == 1  # set up once: the process never started over


def rank_records(tmp_path: Path, group: int, rank: int, event: str) -> list[dict]:
    """The records of one process of a group (each process logs every record to its own rank log)."""
    path = tmp_path / "run" / f"group-{group}" / "logs" / f"rank{rank}.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    fields = [json.loads(ln).get("fields", {}) for ln in lines if ln.endswith("}")]
    return [f for f in fields if f.get("event") == event]


def published_steps(tmp_path: Path, group: int) -> set[int]:
    d = tmp_path / "run" / f"group-{group}" / "checkpoints"
    return {int(p.name[5:]) for p in d.glob("step_*") if (p / MANIFEST).exists()} if d.exists() else set()


def checkpoint_weights(tmp_path: Path, group: int, step: int) -> dict:
    path = tmp_path / "run" / f"group-{group}" / "checkpoints" / f"step_{step:09d}"
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)["model"]


def assert_same_weights_after(tmp_path: Path, runs: list[Run], step: int) -> None:
    """Both groups publish a checkpoint of the same step after ``step``; stop them; the weights of every
    such step are equal, bit for bit (the groups are stopped first: retention prunes as they save)."""

    def common():
        return {s for s in published_steps(tmp_path, 0) & published_steps(tmp_path, 1) if s > step}

    wait_for(common, WAIT, f"both groups to save a checkpoint after step {step}", poll=0.05)
    for r in runs:
        for worker in r.workers():  # a torchrun's workers too: killing the launcher alone orphans them
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        r.proc.kill()
        r.proc.wait(timeout=30)
    steps = sorted(common())
    assert steps
    for s in steps:
        a, b = checkpoint_weights(tmp_path, 0, s), checkpoint_weights(tmp_path, 1, s)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"step {s}: {k} differs between the groups"


def test_a_group_listens_only_on_its_bind_address_and_its_peer_heals_there(tmp_path, groups):
    """Every TCP socket a replica group's processes listen on (its store, torchft's manager, the checkpoint
    server a peer heals from, Gloo) is on the group's one address, none on every interface. Group 0 gets
    it by default (its host name's address); group 1 listens on 127.0.0.2 (fault_tolerance.replicated.bind),
    which it advertises (advertise_address: the peers must be told where it listens) and where its Gloo
    device is built. The groups still find each other there: they train in one quorum and one heals from
    the other."""
    address = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)[0][4][0]
    assert address != "127.0.0.2"
    g0 = groups(0)
    g1 = groups(
        1,
        "fault_tolerance.replicated.bind=127.0.0.2",
        "fault_tolerance.replicated.advertise_address=127.0.0.2",
    )
    wait_both_in_quorum(tmp_path, [g0, g1])
    wait_for(
        lambda: records(tmp_path, 0, "heal") or records(tmp_path, 1, "heal"),
        WAIT,
        "a group to heal from its peer's checkpoint server",
        poll=0.05,
    )
    for run, expected in ((g0, address), (g1, "127.0.0.2")):
        tree = [psutil.Process(run.proc.pid), *psutil.Process(run.proc.pid).children(recursive=True)]
        listening = [
            c.laddr for p in tree for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN
        ]
        assert len(listening) >= 4, listening  # the store, the manager, the checkpoint server, Gloo
        assert {a.ip for a in listening} == {expected}, (run.log_path.name, listening)
        # torchft's Rust half logs at warn (a line per step at info) unless the user sets RUST_LOG.
        if "RUST_LOG" not in os.environ:
            assert not re.search(r"\[INFO\] \[torchft::", run.output), run.output[-3000:]


def test_kill9_outside_the_allreduce_survivor_goes_on_and_restarted_group_heals_bit_exact(tmp_path, groups):
    g0, g1 = groups(0), groups(1)
    pid0 = g0.proc.pid
    wait_both_in_quorum(tmp_path, [g0, g1])
    # Freeze group 1, and kill it only once group 0 has formed a quorum without it: group 1 is then
    # certainly not inside an all-reduce with group 0 (that case is the next test).
    g1.proc.send_signal(signal.SIGSTOP)
    wait_for(
        lambda: any(r["quorum_size"] == 1 for r in records(tmp_path, 0, "quorum")),
        WAIT,
        "group 0 to go on without group 1",
        poll=0.05,
    )
    g1.proc.kill()
    g1.proc.wait(timeout=30)
    before = last_step(tmp_path, 0)
    wait_for(lambda: last_step(tmp_path, 0) >= before + 20, WAIT, "group 0 to train on alone", poll=0.05)
    assert_no_restart(g0, pid0)
    # Restart group 1: it resumes from its own checkpoint, is behind, heals from group 0 and trains with it.
    restart_group1_and_check_it_heals(tmp_path, lambda: groups(1, name="group1-restarted"), g0, pid0, before)
    assert records(tmp_path, 0, "samples_dropped") == []  # redistribute: group 1's share was trained


def test_drop_policy_skips_and_counts_the_missing_groups_share(tmp_path, groups):
    drop = "fault_tolerance.replicated.missing_group_policy=drop"
    g0, g1 = groups(0, drop), groups(1, drop)
    wait_both_in_quorum(tmp_path, [g0, g1])
    together_from = records(tmp_path, 0, "quorum")[-1]["step"]
    g1.proc.kill()
    killed_at = last_step(tmp_path, 0)

    def dropped_after_kill():
        return [r for r in records(tmp_path, 0, "samples_dropped") if r["step"] > killed_at]

    wait_for(
        lambda: len(dropped_after_kill()) >= 10,
        WAIT,
        "group 0 to count group 1's dropped shares",
        poll=0.05,
        ended=lambda: g0.proc.poll() is not None,
        context=lambda: g0.output[-4000:],
    )
    everything = records(tmp_path, 0, "samples_dropped")
    # nothing dropped while both groups trained together
    assert not [r for r in everything if together_from < r["step"] <= killed_at - 1]
    assert {r["samples"] for r in dropped_after_kill()} == {8}  # group 1's slice of each global batch of 16
    assert everything[-1]["samples_dropped"] == 8 * len(everything)  # the running count
    steps = [r["step"] for r in everything]
    assert steps == sorted(set(steps))  # counted once per committed step
    assert "their shares of each step are dropped" in g0.output


def _stalled_in_allreduce(tmp_path: Path, quorums_before: int, seconds: float = 2.5) -> bool:
    """Group 0, with group 1 frozen, makes no step for ``seconds`` (more than the 1 s heartbeat timeout,
    less than the 5 s collective timeout) and forms no quorum without group 1: it waits inside the
    gradient all-reduce (a wait in the quorum would end after the heartbeat timeout with a new quorum)."""
    step = last_step(tmp_path, 0)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if last_step(tmp_path, 0) != step or len(records(tmp_path, 0, "quorum")) != quorums_before:
            return False
        time.sleep(0.05)
    return True


def test_kill9_inside_the_allreduce_survivor_drops_the_step_and_goes_on(tmp_path, groups):
    g0, g1 = groups(0), groups(1)
    pid0 = g0.proc.pid
    for _attempt in range(10):
        wait_both_in_quorum(tmp_path, [g0, g1])
        quorums = len(records(tmp_path, 0, "quorum"))
        g1.proc.send_signal(signal.SIGSTOP)
        if _stalled_in_allreduce(tmp_path, quorums):
            break
        g1.proc.send_signal(signal.SIGCONT)  # frozen outside the all-reduce: let it heal and try again
    else:
        pytest.fail("group 0 was never caught waiting inside the all-reduce")
    stalled_at = last_step(tmp_path, 0)
    dropped = len(records(tmp_path, 0, "step_dropped"))
    g1.proc.kill()  # its sockets close under group 0's pending all-reduce
    g1.proc.wait(timeout=30)
    wait_for(
        lambda: last_step(tmp_path, 0) >= stalled_at + 10,
        WAIT,
        "group 0 to train on after its peer died inside the all-reduce",
        poll=0.05,
        ended=lambda: g0.proc.poll() is not None,
        context=lambda: g0.output[-4000:],
    )
    assert_no_restart(g0, pid0)
    assert "Traceback" not in g0.output
    # The broken step was voted down and redone: its number was committed once, after the failure.
    assert len(records(tmp_path, 0, "step_dropped")) > dropped
    assert_steps_never_go_back(tmp_path, 0)
    assert stalled_at + 1 in [r["step"] for r in records(tmp_path, 0, "train")]


def test_sigstop_the_other_goes_on_after_the_timeout_and_sigcont_heals(tmp_path, groups):
    g0, g1 = groups(0), groups(1)
    pid0, pid1 = g0.proc.pid, g1.proc.pid
    wait_both_in_quorum(tmp_path, [g0, g1])
    g1.proc.send_signal(signal.SIGSTOP)
    frozen_at = last_step(tmp_path, 0)
    wait_for(
        lambda: (
            last_step(tmp_path, 0) >= frozen_at + 20
            and any(r["quorum_size"] == 1 for r in records(tmp_path, 0, "quorum"))
        ),
        WAIT,
        "group 0 to go on without the frozen group",
        poll=0.05,
        context=lambda: g0.output[-4000:],
    )
    heals = len(records(tmp_path, 1, "heal"))
    g1.proc.send_signal(signal.SIGCONT)
    heal = wait_for_heal(tmp_path, g1, heals)
    assert heal["step"] > frozen_at + 20  # it caught up with the survivor instead of rolling it back
    assert_no_restart(g0, pid0)
    assert_no_restart(g1, pid1)
    assert_same_weights_after(tmp_path, [g0, g1], heal["step"])
    assert_steps_never_go_back(tmp_path, 0)


def test_every_group_down_a_returning_group_resumes_from_the_newest_checkpoint_of_any_group(tmp_path, groups):
    """Both groups die; group 0 had saved later steps than group 1. Group 1, restarted alone (no live
    peer to heal from), resumes from group 0's newest checkpoint, not its own older one: nothing is redone."""
    g0, g1 = groups(0), groups(1)
    wait_both_in_quorum(tmp_path, [g0, g1])
    wait_for(lambda: published_steps(tmp_path, 1), WAIT, "group 1 to save a checkpoint", poll=0.05)
    g1.proc.send_signal(signal.SIGSTOP)  # group 1 saves no more; group 0 trains on and saves later steps
    own = max(published_steps(tmp_path, 1))
    wait_for(
        lambda: max(published_steps(tmp_path, 0), default=0) >= own + 20,
        WAIT,
        "group 0 to save checkpoints beyond group 1's",
        poll=0.05,
        ended=lambda: g0.proc.poll() is not None,
        context=lambda: g0.output[-4000:],
    )
    for r in (g0, g1):
        r.proc.kill()
        r.proc.wait(timeout=30)
    newest = max(published_steps(tmp_path, 0))
    assert max(published_steps(tmp_path, 1)) == own < newest
    trained_before = last_step(tmp_path, 1)
    g1b = groups(1, name="group1-alone")
    wait_for(
        lambda: last_step(tmp_path, 1) > newest,
        WAIT,
        "the restarted group 1 to train past group 0's newest checkpoint",
        poll=0.05,
        ended=lambda: g1b.proc.poll() is not None,
        context=lambda: g1b.output[-4000:],
    )
    resumed = tmp_path / "run" / "group-0" / "checkpoints" / f"step_{newest:09d}"
    assert f"resumed from {resumed}: " in g1b.output, g1b.output[-4000:]
    after = [r["step"] for r in records(tmp_path, 1, "train") if r["step"] > trained_before]
    assert min(after) == newest + 1  # the steps between the two groups' checkpoints are not redone


def test_lighthouse_killed_and_restarted_replicas_reconnect_and_go_on(tmp_path, groups, lighthouse):
    g0, g1 = groups(0), groups(1)
    pid0, pid1 = g0.proc.pid, g1.proc.pid
    wait_both_in_quorum(tmp_path, [g0, g1])
    quorums = len(records(tmp_path, 0, "quorum"))
    lighthouse.kill()
    lost_at = last_step(tmp_path, 0)
    lighthouse.start()  # same address
    wait_for(
        lambda: len(records(tmp_path, 0, "quorum")) > quorums and last_step(tmp_path, 0) >= lost_at + 20,
        WAIT,
        "both groups to form a quorum with the restarted lighthouse and train on",
        poll=0.05,
        ended=lambda: g0.proc.poll() is not None or g1.proc.poll() is not None,
        context=lambda: g0.output[-3000:] + g1.output[-3000:],
    )
    assert records(tmp_path, 0, "quorum")[-1]["quorum_size"] == 2
    assert_no_restart(g0, pid0)
    assert_no_restart(g1, pid1)
    assert_steps_never_go_back(tmp_path, 0)
    assert_same_weights_after(tmp_path, [g0, g1], lost_at)


def test_lighthouse_gone_for_good_exits_with_code_6_naming_it(tmp_path, groups, lighthouse):
    g0 = groups(
        0, "fault_tolerance.replicated.quorum_retries=1", "fault_tolerance.replicated.quorum_timeout=3"
    )
    wait_for(lambda: last_step(tmp_path, 0) >= 5, WAIT, "group 0 to train", poll=0.05)
    saved = published_steps(tmp_path, 0)
    lighthouse.kill()
    assert g0.wait(WAIT) == 6, g0.output[-4000:]
    out = g0.output
    assert f"no quorum from the lighthouse {lighthouse.address}" in out
    assert "Traceback" not in out
    assert saved <= published_steps(tmp_path, 0)  # nothing already saved is lost


def test_quickstart_replicated_with_kills_still_reaches_97_percent(tmp_path, lighthouse, runs):
    """The README's quickstart as two replica groups (global batch 32 as in the recipe); group 1 is killed
    after epoch 2 and restarted, group 0 after epoch 4 and restarted. Both end at >= 97% val top-1."""
    out = tmp_path / "qs"

    def start(group: int, name: str) -> Run:
        cmd = [
            sys.executable,
            "-m",
            "imgtrain",
            "train",
            f"output_dir={out}",
            "training.batch_size=16",
            "training.progress_bar=false",
            "fault_tolerance.mode=replicated",
            f"fault_tolerance.replicated.lighthouse={lighthouse.address}",
            f"fault_tolerance.replicated.group_id={group}",
        ]
        return runs(cmd, out, name)

    def evals(group: int) -> list[int]:
        path = out / f"group-{group}" / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(ln)["epoch"] for ln in lines if ln.endswith("}") and '"event": "eval"' in ln]

    g = {0: start(0, "group0"), 1: start(1, "group1")}
    for victim, after_epoch in ((1, 2), (0, 4)):
        wait_for(
            lambda v=victim, e=after_epoch: max(evals(v), default=0) >= e or g[v].proc.poll() is not None,
            600,
            f"group {victim} to finish epoch {after_epoch}",
            poll=0.1,
        )
        if g[victim].proc.poll() is None:
            g[victim].proc.kill()
            g[victim].proc.wait(timeout=30)
            g[victim] = start(victim, f"group{victim}-restarted")
    for group, run in g.items():
        assert run.wait(900) == 0, run.output[-4000:]
        summary = json.loads((out / f"group-{group}" / "summary.json").read_text())
        assert summary["val_top1"] >= 97.0, (group, summary)


# ---------------------------------------------------------------------------------------- across hosts
# Each replica group in a network namespace of its own (its own address, and in the first test its own
# host name), the lighthouse bound to host 0's address: the groups find each other only through what they
# advertise. Needs root and iproute2 (skipped otherwise).


@pytest.fixture
def network(tmp_path, data_dir):
    """``(hosts, lighthouse, start)``: two hosts, the lighthouse on host 0's address, and
    ``start(group, *extra, own_name=True)`` running replica group g on host g."""
    with hosts_for_test("rn", "10.231.11", ("imgtrain-g0", "imgtrain-g1")) as hosts:
        lighthouse = Lighthouse(
            free_port(),
            tmp_path / "lighthouse.log",
            host=hosts.addrs[0],
            prefix=lambda cmd: hosts.command(0, cmd, own_name=False),
        )
        started: list[Run] = []
        try:
            lighthouse.start()

            def start(group: int, *extra: str, own_name: bool = True, name: str | None = None) -> Run:
                cmd = group_command(tmp_path, data_dir, lighthouse.address, group, *extra)
                run = Run(hosts.command(group, cmd, own_name), tmp_path / "run", name or f"group{group}")
                started.append(run)
                return run

            yield hosts, lighthouse, start
        finally:
            for r in started:
                r.cleanup()
            lighthouse.kill()


def test_groups_on_two_hosts_heal_across_them_bit_exact(tmp_path, network):
    """Each group on its own host under its own host name, nothing configured but the lighthouse's address:
    torchft and imgtrain advertise the host name, which resolves on the other host. Group 1 killed,
    relaunched: it heals over the link from group 0, which never restarts."""
    hosts, _, start = network
    g0, g1 = start(0), start(1)
    pid0 = g0.proc.pid
    wait_both_in_quorum(tmp_path, [g0, g1])
    g1.proc.kill()
    g1.proc.wait(timeout=30)
    wait_for(
        lambda: any(r["quorum_size"] == 1 for r in records(tmp_path, 0, "quorum")),
        WAIT,
        "group 0 to go on without group 1",
        poll=0.05,
    )
    before = last_step(tmp_path, 0)
    restart_group1_and_check_it_heals(tmp_path, lambda: start(1, name="group1-restarted"), g0, pid0, before)


def test_partition_the_group_with_the_lighthouse_goes_on_and_the_cut_off_group_rejoins_and_heals(
    tmp_path, network
):
    """Both hosts keep the host's name (which resolves to nothing reachable): each group advertises its
    address instead (fault_tolerance.replicated.advertise_address). Group 1's link goes down for longer
    than the collective timeout, then comes back."""
    hosts, _, start = network

    def group(g: int) -> Run:
        return start(g, f"fault_tolerance.replicated.advertise_address={hosts.addrs[g]}", own_name=False)

    g0, g1 = group(0), group(1)
    pid0, pid1 = g0.proc.pid, g1.proc.pid
    wait_both_in_quorum(tmp_path, [g0, g1])
    hosts.link(1, up=False)
    cut, cut_at = time.monotonic(), last_step(tmp_path, 0)
    wait_for(
        lambda: (
            any(r["quorum_size"] == 1 and r["step"] >= cut_at for r in records(tmp_path, 0, "quorum"))
            and last_step(tmp_path, 0) >= cut_at + 10
            and time.monotonic() - cut > COLLECTIVE_TIMEOUT + 1
        ),
        WAIT,
        "group 0 to train on without the cut-off group",
        poll=0.05,
        ended=lambda: g0.proc.poll() is not None,
        context=lambda: g0.output[-4000:],
    )
    alone_until = last_step(tmp_path, 0)
    heals = len(records(tmp_path, 1, "heal"))
    hosts.link(1, up=True)
    heal = wait_for_heal(tmp_path, g1, heals)
    assert heal["step"] >= alone_until  # it caught up with group 0 instead of rolling it back
    assert_no_restart(g0, pid0)
    assert_no_restart(g1, pid1)
    assert "Traceback" not in g0.output
    assert_same_weights_after(tmp_path, [g0, g1], heal["step"])
    assert_steps_never_go_back(tmp_path, 0)


def test_two_groups_of_two_processes_train_what_one_job_of_four_processes_trains(
    tmp_path, groups, data_dir, runs
):
    """2 replica groups x 2 processes against restart mode's plain DDP over 4 processes, the same global
    batch of 32: every process trains the same samples in every step, and the gradient is the mean over all
    32, so the weights agree to float rounding (the sums run in another order). min_replicas=2: a step
    commits only with both groups in it, as all four processes are in every step of the reference."""
    steps = 8  # past the end of the first epoch (5 steps of 32 samples)
    same = [f"data.root={data_dir}", "training.epochs=100000", f"training.max_steps={steps}"]
    ref = tmp_path / "ref"
    launch = [sys.executable, "-m", "imgtrain", "launch", "--standalone", "--nproc-per-node=4"]
    # A Run: if it fails or times out, the fixture kills its workers too, not only the launcher.
    reference = runs(
        [*launch, "-m", "imgtrain", "train", *TINY, *same, f"output_dir={ref}"], ref, "reference"
    )
    assert reference.wait(WAIT) == 0, reference.output[-4000:]
    both = [f"training.max_steps={steps}", "fault_tolerance.replicated.min_replicas=2"]
    g0, g1 = groups(0, *both, processes=2), groups(1, *both, processes=2)
    for g in (g0, g1):
        assert g.wait(WAIT) == 0, g.output[-4000:]
    assert "global batch 32 = 8 per process x 2 processes x 2 replica groups x 1 accumulation" in g0.output
    weights = [torch.load(p / "model.pt", weights_only=True)["model"] for p in (ref, *_group_dirs(tmp_path))]
    expected, group0, group1 = weights
    assert group0.keys() == group1.keys() == expected.keys()
    for k in expected:
        assert torch.equal(group0[k], group1[k]), f"{k} differs between the groups"
        assert torch.allclose(group0[k].float(), expected[k].float(), rtol=1e-4, atol=1e-6), (
            k,
            (group0[k].float() - expected[k].float()).abs().max(),
        )
    # Each group logs the mean loss over its half of a step's samples: their mean is the reference's loss.
    ref_loss = {r["step"]: r["loss"] for r in read_jsonl(ref / "metrics.jsonl") if r.get("event") == "train"}
    losses = [{r["step"]: r["loss"] for r in records(tmp_path, g, "train")} for g in (0, 1)]
    assert sorted(ref_loss) == sorted(losses[0]) == sorted(losses[1]) == list(range(1, steps + 1))
    for step, loss in ref_loss.items():
        assert (losses[0][step] + losses[1][step]) / 2 == pytest.approx(loss, rel=1e-5), step


def _group_dirs(tmp_path: Path) -> list[Path]:
    return [tmp_path / "run" / f"group-{g}" for g in (0, 1)]


def test_kill9_one_process_of_a_group_its_launcher_restarts_the_group_which_heals_rank_by_rank(
    tmp_path, groups
):
    digest = "fault_tolerance.replicated.state_digest=true"  # off by default: it costs the serving group
    g0 = groups(0, digest, processes=2)
    # One restart: the restarted processes must form the group at their first try (a stale manager address
    # left in torchrun's store by the killed ones would cost another).
    g1 = groups(1, digest, processes=2, max_restarts=1)
    wait_both_in_quorum(tmp_path, [g0, g1])
    workers0 = sorted(p.pid for p in g0.workers())
    assert len(workers0) == 2
    heals = len(records(tmp_path, 1, "heal"))  # group 1 may have healed at its start
    killed_at = last_step(tmp_path, 0)
    g1.worker_with_rank(1).kill()
    heal = wait_for_heal(tmp_path, g1, heals)
    assert heal["step"] > killed_at  # from group 0's live state, not group 1's older checkpoint
    assert g1.output.count("imgtrain: world size") == 2  # torchrun restarted group 1's two processes
    # Group 0 went on with the same processes, never set up again, and never went back a step.
    assert sorted(p.pid for p in g0.workers()) == workers0
    assert g0.output.count("imgtrain: world size") == 1
    # Each process of group 1 got the state of the same rank of group 0 at the heal's step, bit for bit.
    for rank in (0, 1):
        healed = rank_records(tmp_path, 1, rank, "heal")[-1]
        assert healed["step"] == heal["step"]
        served = [r for r in rank_records(tmp_path, 0, rank, "heal_served") if r["step"] == heal["step"]]
        assert served and served[-1]["state_digest"] == healed["state_digest"], (rank, healed, served)
    assert_same_weights_after(tmp_path, [g0, g1], heal["step"])
    assert_steps_never_go_back(tmp_path, 0)


def test_a_group_of_another_size_is_refused_naming_the_process_count_and_the_others_go_on(tmp_path, groups):
    g0 = groups(0)  # one process
    pid0 = g0.proc.pid
    wait_for(lambda: last_step(tmp_path, 0) >= 5, WAIT, "group 0 to train", poll=0.05)
    g1 = groups(1, processes=2)  # behind group 0: it heals from it, and sees the other size
    assert g1.wait(WAIT) != 0
    assert (
        "config key '--nproc-per-node': got 2, expected 1 (replica group 1 heals from a live group of 1"
        in (g1.output)
    ), g1.output[-4000:]
    at = last_step(tmp_path, 0)
    wait_for(lambda: last_step(tmp_path, 0) >= at + 10, WAIT, "group 0 to train on", poll=0.05)
    assert_no_restart(g0, pid0)
    assert_steps_never_go_back(tmp_path, 0)


# One replica group driven through imgtrain's Replicas on a one-layer model: argv is the lighthouse, the
# group id and "fail" (this group's step breaks before its all-reduce: it sends nothing) or "wait" (its
# peer's step: it waits inside the all-reduce for the failed group). One JSON line per outcome.
_ONE_GROUP = """
import json, sys, time, torch
from imgtrain.config import load_config
from imgtrain.distributed.process_group import DistInfo
from imgtrain.distributed.replicas import Replicas

lighthouse, group, role = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = load_config(overrides=[
    "fault_tolerance.mode=replicated", f"fault_tolerance.replicated.lighthouse={lighthouse}",
    f"fault_tolerance.replicated.group_id={group}", "fault_tolerance.replicated.collective_timeout=60",
    "fault_tolerance.replicated.timeout=60",
])
info = DistInfo(0, 0, 1, torch.device("cpu"), None, "local", 0)
model = torch.nn.Linear(64, 1)
replicas = Replicas(cfg, info, lambda: {"model": model.state_dict()},
                    lambda s: model.load_state_dict(s["model"]), lambda r: None)
ddp = replicas.wrap(model)
broken = None
for _ in range(2000):
    replicas.plan_holds()
    t0 = time.monotonic()
    if broken is None and replicas.members == (0, 1) and role == "fail":
        replicas.manager.report_error(RuntimeError("this group's step broke"))
    ddp(torch.ones(2, 64)).sum().backward()
    committed = replicas.should_commit()
    model.zero_grad()
    if broken is None and replicas.members == (0, 1):
        broken = {"committed": committed, "seconds": time.monotonic() - t0}
        print(json.dumps(broken), flush=True)
    elif broken is not None and committed:
        print(json.dumps({"next_commit": list(replicas.members)}), flush=True)
        break
replicas.close()
"""


def test_a_group_whose_step_failed_releases_a_peer_waiting_on_it_at_once(tmp_path, lighthouse):
    """Group 1's step fails before its all-reduce (as when the peer it exchanges with died) while group 0
    waits in that all-reduce for group 1's data. Group 1 closes its gradient group when its vote fails,
    so group 0's step fails in seconds, not after the 60 s collective timeout; then both commit again."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ONE_GROUP, lighthouse.address, str(g), role],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=subprocess_env(),
        )
        for g, role in ((0, "wait"), (1, "fail"))
    ]
    try:
        outs = [p.communicate(timeout=WAIT)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    results = [[json.loads(ln) for ln in out.splitlines() if ln.startswith("{")] for out in outs]
    for out, res in zip(outs, results, strict=True):
        assert len(res) == 2, out[-3000:]
    (waited, next0), (failed, next1) = results
    assert not failed["committed"] and not waited["committed"]
    assert waited["seconds"] < 20, waited  # without the release: the collective timeout, 60 s
    assert next0 == next1 == {"next_commit": [0, 1]}
