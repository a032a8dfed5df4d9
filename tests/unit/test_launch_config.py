"""`imgtrain launch` builds torchrun's launch from torchrun's command line; its worker exits as python would."""

from __future__ import annotations

import dataclasses

import pytest
from torch.distributed.run import config_from_args, parse_args

from imgtrain.distributed import launch


def _torchrun_line(tmp_path) -> list[str]:
    # As scripts/launch_training.sh writes it; a log dir of our own, else each config makes a temp dir.
    return [
        "--nnodes=1:4",
        "--nproc-per-node=2",
        "--max-restarts=10",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=head:29400",
        "--rdzv-id=job7",
        "--rdzv-conf=last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3,read_timeout=15",
        "--local-addr=10.0.0.2",
        "--monitor-interval=0.5",
        "--redirects=3",
        "--tee=2",
        f"--log-dir={tmp_path}",
        "-m",
        "imgtrain",
        "train",
        "--config",
        "quickstart",
        "training.epochs=3",
    ]


def _differences(a, b) -> dict:
    return {
        f.name: (getattr(a, f.name), getattr(b, f.name))
        for f in dataclasses.fields(a)
        if getattr(a, f.name) != getattr(b, f.name)
    }


def test_same_launch_config_as_torchrun_from_the_same_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun would set it in this process's environment
    monkeypatch.setenv("PET_MAX_RESTARTS", "99")  # a flag on the line beats the environment, as in torchrun
    monkeypatch.setenv("PET_SHUTDOWN_TIMEOUT", "45")  # an environment-only setting reaches the config
    argv = _torchrun_line(tmp_path)
    expected, cmd, cmd_args = config_from_args(parse_args(argv))
    config, entrypoint, args = launch.resolve(argv)
    # Only the start method differs: the workers are forks of the agent, which pre-imports what they need.
    assert _differences(expected, config) == {"start_method": ("spawn", "fork")}
    assert config.max_restarts == 10 and config.shutdown_timeout == 45 and config.max_nodes == 4
    assert config.rdzv_configs["keep_alive_max_attempt"] == "3" and config.local_addr == "10.0.0.2"
    # torchrun would run `python -u -m imgtrain train ...`; the launcher runs the same arguments in-process.
    assert args == ["train", "--config", "quickstart", "training.epochs=3"]
    assert cmd_args == ["-u", "-m", "imgtrain", *args]
    # Failure summaries still say "imgtrain FAILED".
    assert entrypoint is launch.run_worker and entrypoint.__name__ == "imgtrain"
    # `train ...` is short for `-m imgtrain train ...`.
    short = [a for a in argv if a not in ("-m", "imgtrain")]
    assert launch.resolve(short)[1:] == (launch.run_worker, args)


def test_start_method_and_other_programs_stay_the_users_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = [f"--log-dir={tmp_path}", "--nproc-per-node=1"]
    assert launch.resolve([*base, "--start-method=spawn", "train"])[0].start_method == "spawn"
    monkeypatch.setenv("PET_START_METHOD", "fork")
    assert launch.resolve([*base, "train"])[0].start_method == "fork"
    # Not imgtrain: exactly torchrun's command.
    other = [*base, "-m", "mypackage.train", "--lr", "0.1"]
    assert launch.resolve(other)[1:] == config_from_args(parse_args(other))[1:]


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--nproc-per-node=2", "train"], {}, "fork"),
        (["--nproc-per-node", "2", "train"], {}, "fork"),
        (["train"], {}, "fork"),
        # torch counts the GPUs, which initializes CUDA in the agent: its forks could not use CUDA.
        (["--nproc-per-node=gpu", "train"], {}, "forkserver"),
        (["train"], {"PET_NPROC_PER_NODE": "auto"}, "forkserver"),
        (["--nproc-per-node=2", "--start_method", "spawn", "train"], {}, "spawn"),
        (["--nproc-per-node=2", "train", "--start-method=spawn"], {}, "fork"),  # the command's own option
        (["--nproc-per-node=2", "train"], {"PET_START_METHOD": "forkserver"}, "forkserver"),
    ],
)
def test_start_method_is_known_before_torch_is_imported(argv, env, expected, monkeypatch, tmp_path):
    assert launch.expected_start_method(argv, env, gpus_visible=False) == expected
    if "--nproc-per-node=gpu" in argv or "auto" in env.values():
        return  # torch cannot count GPUs on this machine
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert launch.resolve([f"--log-dir={tmp_path}", *argv])[0].start_method == expected


def test_gpu_nodes_fork_workers_from_a_fork_server(tmp_path, monkeypatch):
    # torchrun's LaunchConfig asks torch whether an accelerator is there, which initializes CUDA in the
    # agent: a fork of the agent could not use CUDA, so a node with GPUs gets the fork server.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    base = [f"--log-dir={tmp_path}", "--nproc-per-node=2"]
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert launch.resolve([*base, "train"])[0].start_method == "forkserver"
    assert launch.resolve([*base, "--start-method=fork", "train"])[0].start_method == "fork"  # asked for
    assert launch.expected_start_method([*base, "train"], {}, gpus_visible=True) == "forkserver"
    # Any other program: torchrun's own default.
    assert launch.resolve([*base, "-m", "mypackage.train"])[0].start_method == "spawn"


# torchrun's rule: OMP_NUM_THREADS=1 for more than one worker per node, unless set; the command's own
# options do not count; only torch can count GPUs.
@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--nproc-per-node=8", "-m", "imgtrain", "train"], {}, (True, "1")),
        (["--nnodes", "2", "--nproc-per-node", "1", "train"], {}, (True, None)),
        (["--nproc=4", "train", "--nproc-per-node", "1"], {}, (True, "1")),
        (["--nproc-per-node=gpu", "train"], {}, (False, None)),
        (["train"], {"PET_NPROC_PER_NODE": "2"}, (True, "1")),
        (["--nproc-per-node=8", "train"], {"OMP_NUM_THREADS": "6"}, (True, "6")),
    ],
)
def test_fork_server_threads_are_known_before_torch_is_imported(argv, env, expected):
    assert launch.expected_omp_threads(argv, env) == expected


def test_worker_exits_with_imgtrains_exit_codes(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["forkserver"])
    # Not this test process's start method (the integration test checks the DataLoader's workers).
    monkeypatch.setattr(launch.multiprocessing, "set_start_method", lambda *a, **kw: None)
    with pytest.raises(SystemExit) as e:
        launch.run_worker("train", "training.epochs=three")
    assert e.value.code == 2 and "training.epochs" in capsys.readouterr().err

    def interrupted(argv):
        raise KeyboardInterrupt

    def crashed(argv):
        raise RuntimeError("boom in the trainer")

    for fn, code in ((interrupted, 130), (crashed, 1)):
        monkeypatch.setattr("imgtrain.cli.main", fn)
        with pytest.raises(SystemExit) as e:
            launch.run_worker("train")
        assert e.value.code == code
    # The traceback, as python prints it.
    assert "RuntimeError: boom in the trainer" in capsys.readouterr().err


def _failed(tmp_path, *failures: tuple[int, int, int]):
    """torchrun's ChildFailedError for failures (rank, exit code, second of the failure)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    by_rank = {}
    for rank, code, second in failures:
        by_rank[rank] = ProcessFailure(
            local_rank=rank, pid=1000 + rank, exitcode=code, error_file=str(tmp_path / "none.json")
        )
        by_rank[rank].timestamp = second
    return ChildFailedError("imgtrain", by_rank)


def test_launcher_passes_on_an_expected_error_code_of_the_first_failure(tmp_path):
    """`imgtrain launch` exits with a failed worker's code 2-6 (README's exit codes), 1 for anything else;
    when ranks fail with different codes, the first failure's, the root cause torchrun's summary names."""
    for code in (2, 3, 4, 5, 6):
        assert launch.passed_on_exit_code(_failed(tmp_path, (0, code, 100))) == (0, code)
    for code in (1, 75, 130, 143, -9):  # a crash, the watchdog, signals: torchrun's exit 1
        assert launch.passed_on_exit_code(_failed(tmp_path, (0, code, 100))) is None
    # Rank 3's config error came first; rank 1 then crashed.
    assert launch.passed_on_exit_code(_failed(tmp_path, (1, 1, 101), (3, 2, 100))) == (3, 2)
    assert launch.passed_on_exit_code(_failed(tmp_path, (1, 2, 101), (3, 1, 100))) is None
    # In the same second (torchrun records seconds): the lowest local rank, first in its summary.
    assert launch.passed_on_exit_code(_failed(tmp_path, (0, 4, 100), (1, 2, 100))) == (0, 4)
