"""A worker forked from `imgtrain launch`'s agent (as the fork and forkserver start methods make it) takes
SIGTERM, SIGINT and SIGHUP as a fresh Python process does, not with the agent's handlers."""

from imgtrain.distributed import launch


def test_a_fork_of_the_agent_takes_signals_as_python_does():
    import os
    import signal

    def agent_handler(signum, frame):  # as torchrun's agent installs them
        raise RuntimeError("agent handler")

    old = {sig: signal.signal(sig, agent_handler) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        pid = os.fork()
        if pid == 0:  # the worker
            launch._drop_inherited_agent_state()
            ok = (
                signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
                and signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler
            )
            os._exit(0 if ok else 2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
