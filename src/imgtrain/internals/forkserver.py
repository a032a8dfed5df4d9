"""The fork server of ``multiprocessing`` (``imgtrain launch``'s pre-imported workers on a node with GPUs):
started through its public calls, but Python has none to ask whether it runs, to stop it in the middle of
its preload imports, or to let a forked worker drop its copy of the starting process's "alive" pipe. Those
three reach into the private ``multiprocessing.forkserver._forkserver`` here and only here.
"""

from __future__ import annotations

import contextlib
import multiprocessing.forkserver
import os
import signal

PRIVATE_SYMBOL = (
    "multiprocessing.forkserver._forkserver (ForkServer._forkserver_pid, ._forkserver_alive_fd, ._stop())"
)


def running() -> bool:
    """True while this process has a fork server started (and not stopped)."""
    return multiprocessing.forkserver._forkserver._forkserver_pid is not None


def kill() -> None:
    """Stop this process's fork server now. ``_stop()`` alone closes the alive pipe and waits, but the
    server reads that pipe only once its preload imports are done (seconds of torch)."""
    server = multiprocessing.forkserver._forkserver
    if server._forkserver_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server._forkserver_pid, signal.SIGKILL)
        server._stop()


def close_inherited_alive_fd() -> bool:
    """In a process the fork server started: close its copy of the starting process's "alive" pipe, so that
    the server exits when that process dies, whatever its children still hold. True if one was closed;
    False in any other process (forked otherwise, or one that started a fork server of its own)."""
    if multiprocessing.forkserver.get_inherited_fds() is None:  # public: None unless started by the server
        return False
    server = multiprocessing.forkserver._forkserver
    fd = server._forkserver_alive_fd
    if fd is None or server._forkserver_pid is not None:
        return False
    os.close(fd)
    server._forkserver_alive_fd = None
    return True
