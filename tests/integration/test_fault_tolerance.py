"""Fault tolerance with real processes and real signals: kill -9, SIGTERM, SIGSTOP, corrupt files.

Every scenario checks what a user would see: exit codes, messages naming the offending path, the
checkpoint a restarted run resumes from, and final weights bit-identical (deterministic mode) to an
uninterrupted run of the same configuration.

No test relies on timing: they poll metrics.jsonl and the checkpoint directory and act once the
run has visibly reached the state they need (the machine running them may be slow and busy).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from imgtrain.checkpoint import MANIFEST, STATE_FILE, verify
from imgtrain.cli import EXIT_CHECKPOINT
from imgtrain.fault import WATCHDOG_EXIT_CODE

from conftest import (
    TINY,
    WAIT,
    Run,
    assert_same_weights,
    last_step,
    make_image_folder,
    manager,
    metrics,
    published,
    resumed_steps,
    run_cli,
    run_torchrun,
    summary,
    torchrun_cmd,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# 4 classes x 40 = 160 training images of 64 px: 20 steps per epoch at a global batch of 8 (2 x 4 or
# 1 x 8), about 0.1 s each on 2 busy CPU cores: time to act while the run is in the middle of an epoch.
TRAIN_PER_CLASS, CLASSES = 40, 4
N_TRAIN = TRAIN_PER_CLASS * CLASSES
STEPS_PER_EPOCH = N_TRAIN // 8
EPOCHS = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_image_folder(
        tmp_path_factory.mktemp("ft") / "data",
        classes=CLASSES,
        train_per_class=TRAIN_PER_CLASS,
        val_per_class=2,
        size=64,
    )


@pytest.fixture(scope="module")
def shard_dir(data_dir, tmp_path_factory) -> Path:
    """data_dir through `imgtrain prepare`: its small JPEGs are stored byte for byte, so a run on the shards
    must match the ImageFolder reference run bit for bit."""
    from imgtrain.data.shards.prepare import PrepareSettings, prepare

    dst = tmp_path_factory.mktemp("ft") / "shards"
    prepare(data_dir, str(dst), PrepareSettings(samples_per_shard=50), workers=2, progress=False)
    return dst


def slow_args(data: Path, out: Path, world: int, *extra: str) -> list[str]:
    """A deterministic 3-epoch run with a mid-epoch checkpoint every 6 steps."""
    return [
        "train",
        "--output-dir",
        str(out),
        f"data.root={data}",
        *TINY,
        "data.image_size=64",
        "data.val_resize=64",
        "model.width=32",
        f"training.epochs={EPOCHS}",
        f"training.batch_size={8 // world}",
        "checkpoint.save_every_steps=6",
        "checkpoint.keep_last_n=3",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """Uninterrupted runs of ``slow_args`` (one per world size, made on first use)."""
    done: dict[int, Path] = {}

    def get(world: int) -> Path:
        if world not in done:
            out = tmp_path_factory.mktemp(f"reference{world}") / "run"
            if world == 1:
                run_cli(slow_args(data_dir, out, 1), timeout=WAIT)
            else:
                run_torchrun(world, slow_args(data_dir, out, world), timeout=WAIT)
            assert summary(out)["steps"] == EPOCHS * STEPS_PER_EPOCH
            done[world] = out
        return done[world]

    return get


# ---------------------------------------------------------------------------------------------- helpers


def cli_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "imgtrain", *args]


def step_dirs(out: Path) -> list[Path]:
    d = out / "checkpoints"
    return sorted(p for p in d.glob("step_*")) if d.is_dir() else []


def assert_same_rng_streams(a: Path, b: Path, step: int) -> None:
    """Every rank's RNG streams (Python, NumPy, torch) in both runs' checkpoints of ``step``: a resumed run
    goes on with the streams an uninterrupted one has, not only with its weights."""

    def streams(out: Path) -> list[dict]:
        # Each rank saved its own streams beside the shared state: step_X/rank_R.pt.
        step_dir = out / "checkpoints" / f"step_{step:09d}"
        ranks = sorted(step_dir.glob("rank_*.pt"), key=lambda p: int(p.stem[5:]))
        assert ranks, f"no rank files in {step_dir}"
        return [torch.load(r, map_location="cpu", weights_only=True)["rng"] for r in ranks]

    def same(x, y) -> bool:
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, list | tuple):
            return isinstance(y, list | tuple) and len(x) == len(y) and all(map(same, x, y))
        return x == y

    ra, rb = streams(a), streams(b)
    assert len(ra) == len(rb)
    for rank, (x, y) in enumerate(zip(ra, rb, strict=True)):
        differ = [k for k in x if not same(x[k], y.get(k))]
        assert not differ, f"rank {rank}: the {differ} RNG streams differ from the uninterrupted run"


def no_traceback(text: str) -> None:
    assert "Traceback (most recent call last)" not in text, text[-6000:]


# ---------------------------------------------------------------------------------------------- 1. kill -9


@pytest.mark.parametrize("data_format", ["folder", "shards"])
def test_kill9_worker_under_torchrun_restarts_and_matches_uninterrupted(
    data_dir, tmp_path, runs, reference, data_format, request
):
    out = tmp_path / "killed"
    data, extra = data_dir, []
    if data_format == "shards":  # the same images as prepared shards, read by a loader worker per rank
        data, extra = request.getfixturevalue("shard_dir"), ["data.format=shards", "data.workers=1"]
    # No epoch-end saves: every checkpoint from step 24 (4 steps into epoch 2) to step 54 is mid-epoch, so
    # the kill lands after a mid-epoch checkpoint however late this (starved) poller sees step 26.
    run = runs(
        torchrun_cmd(
            2, slow_args(data, out, 2, *extra, "checkpoint.save_at_epoch_end=false"), ["--max-restarts=3"]
        ),
        out,
    )
    wait_until(lambda: last_step(out) >= 26 and published(out, 24), "step 26 and checkpoint 24", run)
    run.worker_with_rank(1).kill()
    assert run.wait() == 0, run.output[-6000:]

    starts = resumed_steps(out)
    assert len(starts) == 2 and starts[0] == 0, f"expected one restart, got starts at steps {starts}"
    resumed = starts[1]
    assert resumed >= 24 and resumed % STEPS_PER_EPOCH != 0, f"resumed at step {resumed}, not mid-epoch"
    assert f"resumed from {out / 'checkpoints' / f'step_{resumed:09d}'}" in run.output
    s = summary(out)
    assert s["restarts"] >= 1 and s["completed"]
    finished = [r for r in metrics(out) if r["event"] == "finished"]
    assert len(finished) == 1 and finished[0]["restarts"] >= 1
    # Each sample exactly once per epoch: no repeat and no gap around the restart.
    assert s["images_seen"] == EPOCHS * N_TRAIN
    assert s["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert_same_weights(reference(2), out)
    # And the RNG streams: the loaders draw their workers' seeds from their own generator, so the extra
    # iter() of the resumed epoch leaves the global streams (which MixUp/CutMix draw from) as they were.
    assert_same_rng_streams(reference(2), out, EPOCHS * STEPS_PER_EPOCH)


# ---------------------------------------------------------------------------------------------- 2. kill -9 mid-write


def test_kill9_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, runs):
    data = make_image_folder(tmp_path / "data")  # 36 images: 5 steps per epoch
    out = tmp_path / "run"
    # resnet18 with its SGD momentum: ~90 MB per checkpoint, written (and fsynced) after every step.
    args = [
        "train",
        "--output-dir",
        str(out),
        f"data.root={data}",
        *TINY,
        "model.name=resnet18",
        "training.epochs=1",
        "checkpoint.save_every_steps=1",
        "checkpoint.keep_last_n=2",
    ]
    ckpts = out / "checkpoints"

    seen: set[str] = set()

    def write_just_started():
        """A .tmp-step_* directory that was not there at the previous poll: a write of ~90 MB has just
        begun (after the first checkpoint was published)."""
        names = {p.name for p in ckpts.glob(".tmp-step_*")} if ckpts.is_dir() else set()
        new = names - seen
        seen.update(names)
        return new and any(published(out, s) for s in range(1, 5))

    run = runs(cli_cmd(args), out)
    wait_until(write_just_started, "a checkpoint write after the first published one", run, poll=0.005)
    run.proc.kill()
    run.wait()
    leftovers = sorted(ckpts.glob(".tmp-step_*"))
    assert leftovers, "the kill did not land during a write (no .tmp-step_* left behind)"
    assert not (leftovers[0] / MANIFEST).exists()
    writing_step = int(re.match(r"\.tmp-step_(\d+)-", leftovers[0].name).group(1))

    complete = [p for p in step_dirs(out) if (p / MANIFEST).exists()]
    assert complete and all(int(p.name[5:]) < writing_step for p in complete)
    newest = max(complete)
    # A writer that published in place (an object store, another tool) would leave a newer step directory
    # without a manifest: it must never be taken.
    half = ckpts / f"step_{writing_step:09d}"
    assert not half.exists()
    shutil.copytree(leftovers[0], half)
    for p in complete:
        verify(str(p))
    assert manager(out).resolve("latest") == str(newest)

    proc = run_cli(args, timeout=WAIT)
    assert f"skipping checkpoint {half}: no {MANIFEST}" in proc.stderr
    assert f"resumed from {newest}" in proc.stderr
    assert resumed_steps(out)[-1] == int(newest.name[5:])
    s = summary(out)
    assert s["completed"] and s["steps"] == 5 and s["images_seen"] == 36
    assert not list(ckpts.glob(".tmp-step_*"))  # the killed write's leftovers were cleaned up


# ---------------------------------------------------------------------------------------------- 3. corruption


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("small") / "data")  # 3 classes, 5 steps per epoch


@pytest.fixture(scope="module")
def tiny_reference(small_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_reference") / "run"
    run_cli(["train", "--output-dir", str(out), f"data.root={small_data}", *TINY, "training.epochs=3"])
    return out


@pytest.fixture(scope="module")
def ten_of_fifteen_steps(small_data, tmp_path_factory) -> Path:
    """tiny_reference's run stopped at step 10: checkpoints at steps 5 and 10 (epoch ends). Copy it to use it."""
    out = tmp_path_factory.mktemp("ten_of_fifteen_steps") / "run"
    run_cli(
        [
            "train",
            "--output-dir",
            str(out),
            f"data.root={small_data}",
            *TINY,
            "training.epochs=3",
            "training.max_steps=10",
        ]
    )
    return out


@pytest.mark.parametrize("corrupt", [_truncate, _flip_bit], ids=["truncated", "bit-flipped"])
def test_corrupt_newest_checkpoint_is_skipped_and_rejected_when_named(
    small_data, tiny_reference, ten_of_fifteen_steps, tmp_path, corrupt
):
    out = shutil.copytree(ten_of_fifteen_steps, tmp_path / "run")
    args = ["train", "--output-dir", str(out), f"data.root={small_data}", *TINY, "training.epochs=3"]
    bad, good = out / "checkpoints" / "step_000000010", out / "checkpoints" / "step_000000005"
    assert (bad / MANIFEST).exists() and (good / MANIFEST).exists()
    corrupt(bad / STATE_FILE)

    named = run_cli([*args, "--resume", str(bad)], check=False)
    assert named.returncode == EXIT_CHECKPOINT, named.stderr[-3000:]
    assert f"checkpoint error: checkpoint {bad}: {STATE_FILE} is" in named.stderr
    no_traceback(named.stderr)

    proc = run_cli(args)
    assert re.search(
        rf"skipping checkpoint {re.escape(str(bad))}: {STATE_FILE} is (truncated|corrupt)", proc.stderr
    ), proc.stderr[-3000:]
    assert f"resumed from {good}" in proc.stderr
    assert resumed_steps(out)[-1] == 5
    assert summary(out)["steps"] == 15 and summary(out)["images_seen"] == 3 * 36
    assert_same_weights(tiny_reference, out)


def test_checkpoint_of_another_model_or_class_count_is_a_clear_error(small_data, tiny_reference, tmp_path):
    ckpt = tiny_reference / "checkpoints" / "step_000000015"  # simple_cnn, 3 classes
    other_model = run_cli(
        [
            "train",
            "--output-dir",
            str(tmp_path / "a"),
            f"data.root={small_data}",
            *TINY,
            "model.name=resnet18",
            "--resume",
            str(ckpt),
        ],
        check=False,
    )
    assert other_model.returncode == EXIT_CHECKPOINT, other_model.stderr[-3000:]
    assert f"checkpoint {ckpt} holds model 'simple_cnn'" in other_model.stderr
    assert "model.name='resnet18'" in other_model.stderr

    four = make_image_folder(tmp_path / "four", classes=4, train_per_class=3, val_per_class=1)
    other_classes = run_cli(
        ["train", "--output-dir", str(tmp_path / "b"), f"data.root={four}", *TINY, "--resume", str(ckpt)],
        check=False,
    )
    assert other_classes.returncode == EXIT_CHECKPOINT, other_classes.stderr[-3000:]
    assert f"checkpoint {ckpt} was trained on 3 classes" in other_classes.stderr
    assert "has 4" in other_classes.stderr

    wider = run_cli(
        [
            "train",
            "--output-dir",
            str(tmp_path / "c"),
            f"data.root={small_data}",
            *TINY,
            "model.width=16",
            "--resume",
            str(ckpt),
        ],
        check=False,
    )
    assert wider.returncode == EXIT_CHECKPOINT, wider.stderr[-3000:]
    assert f"checkpoint {ckpt} does not fit the configured model" in wider.stderr
    assert "size mismatch" in wider.stderr
    for p in (other_model, other_classes, wider):
        no_traceback(p.stderr)


# ---------------------------------------------------------------------------------------------- 4. SIGTERM


# Longer than a step and a save take on a loaded machine; that the run beat it is read from its log (the
# grace timer says when it expires), not from the test's clock.
GRACE = WAIT - 40


def _sigterm_and_check(run: Run, out: Path, target: psutil.Process | subprocess.Popen) -> tuple[int, int]:
    """SIGTERM once training is visibly under way; returns the step the run stopped (and saved) at."""
    wait_until(lambda: last_step(out) >= 8, "step 8", run)
    target.send_signal(signal.SIGTERM)
    rc = run.wait()
    text = run.output
    assert "received SIGTERM; stopping after this step" in text
    assert "grace period" not in text, text[-4000:]
    stopped = last_step(out)
    assert 8 <= stopped < EPOCHS * STEPS_PER_EPOCH
    assert f"preemption (SIGTERM): saving a checkpoint at step {stopped} before exiting" in text
    assert step_dirs(out)[-1].name == f"step_{stopped:09d}"
    assert manager(out).resolve("latest") == str(out / "checkpoints" / f"step_{stopped:09d}")
    assert not (out / "model.pt").exists()
    # metrics.jsonl ends with the preemption (not "failed"), and each rank's own log says it exits 143.
    ends = [r for r in metrics(out) if r["event"] in ("start", "finished", "failed", "preempted")]
    assert ends[-1]["event"] == "preempted", ends
    assert (ends[-1]["step"], ends[-1]["signal"], ends[-1]["exit_code"]) == (stopped, "SIGTERM", 143)
    for rank_log in sorted((out / "logs").glob("rank*.jsonl")):
        fields = [json.loads(ln).get("fields", {}) for ln in rank_log.read_text().splitlines()]
        assert [f["exit_code"] for f in fields if f.get("event") == "preempted"] == [143], rank_log
    return rc, stopped


def test_sigterm_single_process_saves_exits_and_resumes_bit_identical(data_dir, tmp_path, runs, reference):
    out = tmp_path / "run"
    args = slow_args(data_dir, out, 1, f"fault_tolerance.grace_period={GRACE}")
    run = runs(cli_cmd(args), out)
    rc, stopped = _sigterm_and_check(run, out, run.proc)
    assert rc == 143
    no_traceback(run.output)

    proc = run_cli(args, timeout=WAIT)
    assert resumed_steps(out)[-1] == stopped
    assert summary(out)["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert summary(out)["images_seen"] == EPOCHS * N_TRAIN
    assert_same_weights(reference(1), out)
    no_traceback(proc.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "imgtrain launch"])
def test_sigterm_to_torchrun_saves_exits_and_resumes_bit_identical(
    data_dir, tmp_path, runs, reference, launcher
):
    """With a DataLoader worker per rank. Plain torchrun stops its workers with os.killpg: each rank's
    loader worker gets the SIGTERM too, and must outlive it until its rank has saved (issue 16)."""
    out = tmp_path / "run"
    args = slow_args(data_dir, out, 2, f"fault_tolerance.grace_period={GRACE}", "data.workers=1")
    cmd = torchrun_cmd(2, args)
    if launcher == "imgtrain launch":
        cmd[1:3] = ["-m", "imgtrain", "launch"]
    run = runs(cmd, out)
    agent = psutil.Process(run.proc.pid)
    # The training processes: the agent's children (a loader worker is a child of its training process).
    workers = wait_until(lambda: len(agent.children()) == 2 and agent.children(), "two workers", run)
    wait_until(lambda: all(w.children() for w in workers), "a loader worker per rank", run)
    rc, stopped = _sigterm_and_check(run, out, run.proc)
    for w in workers:
        assert not w.is_running()
    text = run.output
    for rank in (0, 1):
        assert (
            f"[rank {rank}] WARNING imgtrain.train.trainer: preemption (SIGTERM): saving a checkpoint at step "
            f"{stopped} before exiting" in text
        )
    assert "DataLoader worker" not in text, text[-6000:]
    assert not re.search(r'File "[^"]*/imgtrain/', text), text[-6000:]
    assert "forcefully exiting via" not in text  # the workers exited by themselves, none was killed
    if launcher == "torchrun":
        assert rc != 0  # torchrun reports that it was terminated, with a traceback of its own
        assert text.count("Traceback (most recent call last)") <= 1, text[-6000:]
    else:
        assert rc == 143  # as a process stopped by SIGTERM, quietly
        no_traceback(text)

    run_torchrun(2, args, timeout=WAIT)
    assert resumed_steps(out)[-1] == stopped
    assert summary(out)["steps"] == EPOCHS * STEPS_PER_EPOCH
    assert summary(out)["images_seen"] == EPOCHS * N_TRAIN
    assert_same_weights(reference(2), out)


# ---------------------------------------------------------------------------------------------- time-based saves


def test_time_based_saves_under_torchrun_are_taken_by_all_ranks_together(data_dir, tmp_path, reference):
    """save_interval runs out at slightly different moments on each rank; a save is collective."""
    out = tmp_path / "run"
    args = slow_args(
        data_dir,
        out,
        2,
        "checkpoint.save_interval=0.05",
        "fault_tolerance.hang_timeout=15",
        "distributed.timeout=60",
    )
    run_torchrun(2, args, timeout=WAIT)
    saves = [r["step"] for r in metrics(out) if r["event"] == "checkpoint"]
    assert len(saves) > EPOCHS * STEPS_PER_EPOCH // 6 + EPOCHS  # more than the step-based ones alone
    assert_same_weights(reference(2), out)  # saving does not perturb training


# ---------------------------------------------------------------------------------------------- 5. watchdog


def test_wedged_rank_trips_the_watchdog(data_dir, tmp_path, runs):
    out = tmp_path / "run"
    args = slow_args(data_dir, out, 2, "fault_tolerance.hang_timeout=5", "distributed.timeout=300")
    run = runs(torchrun_cmd(2, args, ["--max-restarts=0"]), out)
    wait_until(lambda: last_step(out) >= 3, "step 3", run)
    wedged = run.worker_with_rank(1)
    wedged.suspend()  # SIGSTOP
    try:
        wait_until(
            lambda: "imgtrain watchdog: rank 0" in run.output, "the watchdog message", run, timeout=120
        )
        seen = time.time()
        stuck_at = last_step(out)
    finally:
        wedged.resume()  # SIGCONT: let it see its peer is gone (and torchrun's SIGTERM)
    rc = run.wait()
    text = run.output
    assert rc != 0
    idle = re.search(r"imgtrain watchdog: rank 0 completed no step for (\d+)s \(limit 5s", text)
    assert idle and int(idle.group(1)) >= 5, text[-4000:]
    # Not before hang_timeout after rank 0's last step: the message was seen (late, if this poller was
    # starved: a bound that holds however busy the machine) 5 s or more after that step's record was
    # written, less the moment between the step and its record (2 s of slack for a starved rank 0).
    last = max(r["time"] for r in metrics(out) if r["event"] == "train")
    assert seen - last >= 3, f"the watchdog fired {seen - last:.1f}s after rank 0's last step (limit 5s)"
    assert last_step(out) == stuck_at  # no step completed between the message and the exit
    dump = text[text.index("imgtrain watchdog: rank 0") :]
    # Every thread's stack: the watchdog's own and the training loop's, stuck in a step.
    assert dump.count("(most recent call first)") >= 2 and "in train_step" in dump, dump[:4000]
    assert re.search(rf"\(exitcode: {WATCHDOG_EXIT_CODE}\) local_rank: 0", text), text[-4000:]


def test_suspended_and_resumed_run_is_not_taken_for_a_hang(data_dir, tmp_path, runs):
    """A scheduler's suspend/resume (SIGSTOP, SIGCONT) of the whole job stops the clock of the watchdog."""
    out = tmp_path / "run"
    hang = 8  # seconds; well above a step on a loaded machine
    args = slow_args(data_dir, out, 1, f"fault_tolerance.hang_timeout={hang}", "training.max_steps=40")
    run = runs(cli_cmd(args), out)
    wait_until(lambda: last_step(out) >= 3, "step 3", run)
    proc = psutil.Process(run.proc.pid)
    proc.suspend()
    try:
        suspended_at = last_step(out)
        assert suspended_at < 40 and run.proc.poll() is None, "the run ended before it could be suspended"
        time.sleep(2 * hang)  # the stop is what is tested, so it is a duration: twice hang_timeout
        assert last_step(out) == suspended_at  # really stopped: no step completed meanwhile
    finally:
        proc.resume()
    assert run.wait() == 0, run.output[-4000:]
    assert "imgtrain watchdog" not in run.output
    assert summary(out)["steps"] == 40


# ---------------------------------------------------------------------------------------------- 6. retention


def test_keep_last_n_leaves_only_the_newest_valid_checkpoints(small_data, tmp_path):
    out = tmp_path / "run"
    run_cli(
        [
            "train",
            "--output-dir",
            str(out),
            f"data.root={small_data}",
            *TINY,
            "checkpoint.save_every_steps=1",
            "checkpoint.keep_last_n=3",
        ]
    )  # 10 saves
    names = [p.name for p in step_dirs(out)]
    assert names == ["step_000000008", "step_000000009", "step_000000010"]
    for p in step_dirs(out):
        verify(str(p))
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert manager(out).resolve("latest") == str(out / "checkpoints" / "step_000000010")
