"""The errors imgtrain expects, and the exit code of each: the one table behind the README's "Exit codes".

An expected error (a bad key, unusable data, a checkpoint that does not fit, divergence) is an
:class:`ImgtrainError`: the CLI prints its one-line message and exits with its ``exit_code``, no
traceback. Anything else is a bug and keeps its traceback (exit 1). Importing this module is free: no
torch, so that config loading and ``imgtrain status`` stay fast.
"""

from __future__ import annotations

import difflib
from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_DIVERGED = 5
EXIT_NO_QUORUM = 6
EXIT_HANG = 75  # distinct, non-zero: torchrun restarts the group, the logs say why
EXIT_SIGINT = 130  # 128 + the signal's number, as a shell reports it
EXIT_SIGTERM = 143
# The expected errors' codes (ImgtrainError's subclasses). `imgtrain launch` exits with a failed worker's
# code when it is one of these, so that a scheduler's policy can tell a config error from a crash.
EXPECTED_ERROR_CODES = (EXIT_CONFIG, EXIT_DATA, EXIT_CHECKPOINT, EXIT_DIVERGED, EXIT_NO_QUORUM)

# code -> meaning, as the README's table states it (tests/unit/test_errors.py holds the two equal).
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "finished",
    EXIT_FAILURE: (
        "any other error, with its traceback (a bug); `find-batch-size` when not even batch 1 fits; "
        "`profile-summary` without traces; `monitor` (without `--once`) when the run failed or diverged; "
        "`torchrun` when a worker failed, `imgtrain launch` when it failed with another code than 2-6 (a crash, "
        "75, a signal; each worker's own code is in its log)"
    ),
    EXIT_CONFIG: "bad command line or config (the message names the key)",
    EXIT_DATA: (
        "data error (missing root, no classes, a class without training or validation images, "
        "class mismatch, too many unreadable files)"
    ),
    EXIT_CHECKPOINT: (
        "checkpoint error (corrupt, missing, or not matching the configured model or data: model, classes, "
        "training split size; `checkpoint.dir` locked by another writer or holding another run's "
        "checkpoints)"
    ),
    EXIT_DIVERGED: "training diverged (loss NaN or infinite)",
    EXIT_NO_QUORUM: (
        "replicated mode: no quorum (the lighthouse unreachable through `fault_tolerance.replicated."
        "quorum_retries`); the launcher restarts the group from its newest checkpoint"
    ),
    EXIT_HANG: "hang watchdog fired (all stacks dumped; no checkpoint saved)",
    EXIT_SIGINT: "stopped by SIGINT (Ctrl-C), as for 143",
    EXIT_SIGTERM: (
        "stopped by SIGTERM (each training process, and `imgtrain launch` itself): after saving a "
        "checkpoint, or without one when the step and the save "
        "outlast `fault_tolerance.grace_period` (non-zero so schedulers requeue)"
    ),
}


class ImgtrainError(Exception):
    """An expected failure: reported as one line, the process exits with ``exit_code``."""

    exit_code = EXIT_FAILURE
    prefix = "error"


class ConfigError(ImgtrainError, ValueError):
    """A configuration value is unknown, of the wrong type or impossible."""

    exit_code = EXIT_CONFIG

    def __init__(self, key: str, value: Any, expected: str):
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"config key '{key}': got {value!r}, expected {expected}")


def expected_one_of(value: Any, choices: tuple[Any, ...]) -> str:
    """A ConfigError's ``expected`` for a value outside ``choices``: all of them, and the close matches."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=3)
    return (
        "one of "
        + ", ".join(repr(c) for c in choices)
        + (f" (did you mean {', '.join(close)}?)" if close else "")
    )


class DataError(ImgtrainError, RuntimeError):
    """The data on disk cannot be used as configured (missing root, no classes, too many bad files)."""

    exit_code = EXIT_DATA
    prefix = "data error"


class CheckpointError(ImgtrainError, RuntimeError):
    """A checkpoint is corrupt, missing, or does not fit the configured model or data."""

    exit_code = EXIT_CHECKPOINT
    prefix = "checkpoint error"


class DivergenceError(ImgtrainError, RuntimeError):
    """The training loss became NaN or infinite: going on would only waste the allocation."""

    exit_code = EXIT_DIVERGED
    prefix = ""  # the message starts with "training diverged"


class QuorumError(ImgtrainError, RuntimeError):
    """Replicated mode: the lighthouse gave no quorum within its retries (it is down, or unreachable)."""

    exit_code = EXIT_NO_QUORUM
    prefix = "replicated mode"


def exit_code_of(e: BaseException) -> int:
    """The code the process exits with when ``e`` ends it."""
    if isinstance(e, ImgtrainError):
        return e.exit_code
    if isinstance(e, KeyboardInterrupt):
        return EXIT_SIGINT
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, int) else EXIT_FAILURE
    return EXIT_FAILURE
