"""Preemption signals and the hang watchdog."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

WATCHDOG_EXIT_CODE = 75  # distinct, non-zero: torchrun restarts the group, the logs say why
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_signals_blocked():
    """Hold SIGTERM/SIGINT pending in this thread while it starts DataLoader workers.

    A fork inherits the blocked mask, so a signal that reaches a new loader worker before its
    :func:`ignore_stop_signals` has run waits for it there instead of hitting torch's worker handler. In
    this process the signal is only deferred to the end of the block (or taken by another thread)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """``worker_init_fn`` of every DataLoader: its worker ignores SIGTERM and SIGINT unless its parent (the
    training process) sends them.

    Plain torchrun stops a worker with ``os.killpg`` (Slurm signals every process of a step, a terminal's
    Ctrl-C the whole foreground group): the loader workers get the signal too, and torch's worker handler
    dies of any SIGTERM its parent did not send, which takes the training process down in its next step,
    before its preemption checkpoint. Plain ``SIG_IGN`` is not enough either: at exit ``multiprocessing``
    terminates its daemonic children (SIGTERM from the parent) and joins them without a timeout, which
    would then wait forever. So the signals stay blocked in every thread and one thread takes them: from
    the parent it exits as torch's handler does, from anyone else it drops them."""
    if not hasattr(signal, "sigwaitinfo"):  # not on macOS: torch's handling stays
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # already so when forked by stop_signals_blocked
    parent = os.getppid()

    def take() -> None:
        while True:
            if signal.sigwaitinfo(STOP_SIGNALS).si_pid == parent:
                os._exit(0)  # what torch's worker handler does for its parent's SIGTERM

    threading.Thread(target=take, name="imgtrain-loader-signals", daemon=True).start()


class PreemptionHandler:
    """Turns SIGTERM/SIGINT into a request to stop at the next step boundary.

    The handler only sets a flag (nothing else is safe inside a signal handler); the trainer checks it
    after each optimizer step, agrees with the other ranks (one small all-reduce) so that all stop at
    the same step, saves a checkpoint and exits cleanly. A second signal while stopping exits at once
    (the same signal again within REPEAT_WINDOW is taken as the first one delivered twice).
    """

    SIGNALS = STOP_SIGNALS
    REPEAT_WINDOW = 2.0  # seconds in which the same signal again is the same request, not an insistence

    def __init__(self, grace_period: float | None = None) -> None:
        self.grace_period = grace_period
        self.requested_at: float | None = None
        self.signal_name: str | None = None
        self.exit_code = 0
        self._previous: dict[int, object] = {}

    def install(self) -> PreemptionHandler:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.requested_at is not None:
            if 128 + signum == self.exit_code and now - self.requested_at < self.REPEAT_WINDOW:
                # The same event, delivered again: a killed parent's death signal (SIGINT, set by torch for
                # the workers of `imgtrain launch`) comes once for each of the parent's threads that the
                # orphan is handed to as they exit, all within microseconds.
                return
            # Second signal: the user (or the orchestrator) insists.
            os.write(
                2,
                f"imgtrain: {signal.Signals(signum).name} again while stopping; exiting at once, "
                "without a final checkpoint\n".encode(),
            )
            os._exit(128 + signum)
        self.requested_at = now
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum
        if self.grace_period is not None:
            # The orchestrator kills us after its own grace anyway; exiting first keeps the logs clear.
            t = threading.Timer(self.grace_period, self._grace_expired)
            t.daemon = True
            t.start()
        # Logging from a signal handler can deadlock on the handler's lock; write directly.
        os.write(2, f"imgtrain: received {self.signal_name}; stopping after this step\n".encode())

    def _grace_expired(self) -> None:
        os.write(
            2,
            f"imgtrain: grace period of {self.grace_period}s after {self.signal_name} expired; "
            "exiting without a final checkpoint\n".encode(),
        )
        os._exit(self.exit_code)

    @property
    def requested(self) -> bool:
        return self.requested_at is not None


class Watchdog:
    """Exits the process if no step completes for too long: dumps every thread's stack, then exits
    non-zero so that the elastic agent restarts the group from the last checkpoint.

    A rank stuck in a collective whose peer died, or wedged in I/O, never returns by itself (Gloo's
    default collective timeout is 30 minutes); this bounds the time lost.
    """

    SUSPEND_GAP = 2.0  # seconds this thread may wake up late before the process counts as suspended

    def __init__(
        self, timeout: float | None, first_timeout: float | None = None, rank: int = 0, poll: float = 1.0
    ):
        self.timeout = timeout
        self.first_timeout = first_timeout if first_timeout is not None else timeout
        self.rank = rank
        self.poll = poll
        self._last = time.monotonic()
        self._steps = 0
        self._paused = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        if self.timeout is None:
            return self
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="imgtrain-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self) -> None:
        self._steps += 1
        self._last = time.monotonic()

    def pause(self):
        """Context manager: long but legitimate work (final evaluation, blocking save) is not a hang."""
        return _Paused(self)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _limit(self) -> float:
        return self.first_timeout if self._steps == 0 else self.timeout

    def _run(self) -> None:
        woke = time.monotonic()
        while not self._stop.wait(self.poll):
            now = time.monotonic()
            gap, woke = now - woke, now
            if gap > self.poll + self.SUSPEND_GAP:
                # This thread did not run for a while: the whole process was stopped (SIGSTOP, a scheduler
                # suspending the job, a paused VM). The training loop was not hung then, so that time does
                # not count; otherwise every rank would exit the moment the job is resumed.
                self._last = min(now, self._last + gap - self.poll)
            if self._paused:
                continue
            idle = now - self._last
            if idle > self._limit():
                sys.stderr.write(
                    f"\nimgtrain watchdog: rank {self.rank} completed no step for {idle:.0f}s "
                    f"(limit {self._limit():.0f}s, fault_tolerance.hang_timeout); stacks of all threads:\n"
                )
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.flush()
                os._exit(WATCHDOG_EXIT_CODE)


class _Paused:
    def __init__(self, wd: Watchdog):
        self.wd = wd

    def __enter__(self):
        self.wd._paused += 1

    def __exit__(self, *exc):
        self.wd._paused -= 1
        self.wd._last = time.monotonic()
