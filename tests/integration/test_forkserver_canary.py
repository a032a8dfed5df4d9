"""The fork-server adapter's canary (imgtrain.internals.forkserver): it starts a real fork server, so it
lives with the process tests; a Python upgrade that changes multiprocessing.forkserver's private state
fails here naming the symbol."""

import multiprocessing
import multiprocessing.forkserver
import os

import pytest

from imgtrain.internals import forkserver

from conftest import canary, private_symbol_changed

# Run in a process the fork server starts. The target is a builtin (pickled by name), so the child imports
# only imgtrain.internals.forkserver, not this module (and torch).
_CLOSE_IN_CHILD = (
    "import sys\n"
    "from imgtrain.internals import forkserver\n"
    "sys.exit(0 if forkserver.close_inherited_alive_fd() else 3)\n"
)


def test_fork_server_is_seen_stopped_and_its_children_let_go_of_it():
    # An earlier test of this pytest process may have started one (a loader, the launcher): stop it first,
    # so that running() is seen to go from False to True to False here.
    canary(forkserver, forkserver.kill)
    assert not canary(forkserver, forkserver.running)
    multiprocessing.set_forkserver_preload([])
    multiprocessing.forkserver.ensure_running()
    try:
        assert canary(forkserver, forkserver.running), private_symbol_changed(
            forkserver, "running() misses a started server"
        )
        pid = multiprocessing.forkserver._forkserver._forkserver_pid
        child = multiprocessing.get_context("forkserver").Process(target=exec, args=(_CLOSE_IN_CHILD, {}))
        child.start()
        child.join(timeout=120)
        # 1: an exception (a renamed attribute); 3: a child of the server found no alive pipe to close.
        assert child.exitcode == 0, private_symbol_changed(
            forkserver, f"close_inherited_alive_fd() in a child: exit {child.exitcode}"
        )
        assert not forkserver.close_inherited_alive_fd()  # the process that started the server keeps its end
    finally:
        canary(forkserver, forkserver.kill)
    assert not forkserver.running()
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left behind
        os.kill(pid, 0)
