"""``imgtrain launch``: torchrun whose workers start with torch, torchvision and the trainer already imported.

Every worker torchrun starts is a fresh ``python -m imgtrain`` that imports torch and torchvision before it
can join the process group: about 4.6 s on an idle CPU core, paid again by every restart after a fault
(docs/BENCHMARKS.md). This launcher takes exactly torchrun's arguments and environment (``PET_*``) and runs
torchrun's own elastic agent, but hands it a Python function instead of a command line, with the
``forkserver`` start method: a fork server, started before the agent has even imported torch, imports
everything once while the agent imports and joins the rendezvous, and each worker, first start or
restart, is a fork of it.

The fork server imports modules only: no CUDA context, no torch operation, no thread pool (with
``OMP_NUM_THREADS`` set, as torchrun sets it for several workers per node), so a fork of it is as clean as a
fresh process. Libraries read their thread settings when they are imported, so it must run with the
environment the workers get: torchrun changes only ``OMP_NUM_THREADS``, and a server started with another
value is replaced. If the agent dies, even by ``kill -9``, the fork server exits, and each worker gets
SIGINT (torch's parent-death signal), which imgtrain treats as a preemption: it saves and exits.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import traceback

# What a worker imports before its first step; what it imports later is small (python -X importtime).
PRELOAD = ("torch", "torchvision", "psutil", "cv2", "imgtrain.cli", "imgtrain.trainer")
# `imgtrain launch [torchrun options] train ...` is short for `... -m imgtrain train ...`.
WORKER_COMMANDS = ("train", "eval", "find-batch-size")

_server_omp: str | None = None  # OMP_NUM_THREADS the running fork server was started with


def build_parser():
    """torchrun's parser; only the default start method differs (``--start-method`` or PET_START_METHOD win)."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "imgtrain launch"
    parser.description = (
        "torchrun with pre-imported workers (forkserver). Takes torchrun's options; the "
        "command is `-m imgtrain train ...` (or just `train ...`); any other command runs "
        "exactly as torchrun runs it."
    )
    if "PET_START_METHOD" not in os.environ:
        parser.set_defaults(start_method="forkserver")
    return parser


def imgtrain_argv(args) -> list[str] | None:
    """The arguments of `imgtrain` if the command is imgtrain's (``-m imgtrain ...``, ``--no-python imgtrain
    ...`` or ``train ...``), else None (another program: run as torchrun would)."""
    if args.run_path:
        return None
    if args.module and not args.no_python and args.training_script == "imgtrain":
        return list(args.training_script_args)
    if args.no_python and not args.module and os.path.basename(args.training_script) == "imgtrain":
        return list(args.training_script_args)
    if not args.module and not args.no_python and args.training_script in WORKER_COMMANDS:
        return [args.training_script, *args.training_script_args]
    return None


def resolve(argv: list[str]):
    """(LaunchConfig, entrypoint, entrypoint args) for a torchrun command line, built by torchrun's own code,
    with imgtrain's command replaced by :func:`run_worker`."""
    from torch.distributed.run import config_from_args

    args = build_parser().parse_args(argv)
    _as_torchrun_run(args)
    config, cmd, cmd_args = config_from_args(args)
    worker_argv = imgtrain_argv(args)
    if worker_argv is None:
        return config, cmd, cmd_args
    return config, run_worker, worker_argv


def _as_torchrun_run(args) -> None:
    """What torch.distributed.run.run() does to the parsed arguments before config_from_args."""
    import uuid

    from torch.distributed.run import parse_min_max_nnodes

    if args.standalone:
        args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    elif args.rdzv_backend == "static" and not args.rdzv_endpoint and args.master_port is None:
        if parse_min_max_nnodes(args.nnodes)[1] == 1:
            args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
    if args.master_port is None:
        args.master_port = 29500


def expected_omp_threads(argv: list[str], environ=os.environ) -> tuple[bool, str | None]:
    """(known, value): OMP_NUM_THREADS that torchrun will give the workers (None: unset), told from the
    command line without importing torch: the environment's, else "1" for more than one worker per node
    (torchrun's rule). Not known for a count torch must work out (``--nproc-per-node=gpu``)."""
    if "OMP_NUM_THREADS" in environ:
        return True, environ["OMP_NUM_THREADS"]
    nproc = environ.get("PET_NPROC_PER_NODE", "1")
    for i, a in enumerate(argv):
        if a in ("-m", "--module", "imgtrain", *WORKER_COMMANDS):
            break  # the command: torchrun's options come before it (a wrong guess costs time, not results)
        name, eq, value = a.partition("=")
        if name.startswith("--nproc"):  # argparse also takes unambiguous prefixes
            nproc = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    if not nproc.isdigit():
        return False, None
    return True, ("1" if int(nproc) > 1 else None)


def start_forkserver(omp_threads: str | None, modules=PRELOAD) -> None:
    """Have a fork server importing ``modules`` under ``OMP_NUM_THREADS=omp_threads``; replace one started
    with another value. Returns at once: the imports run in the server while the agent goes on."""
    global _server_omp
    server = multiprocessing.forkserver._forkserver
    if server._forkserver_pid is not None and _server_omp == omp_threads:
        return
    stop_forkserver()
    multiprocessing.set_forkserver_preload(list(modules))
    with _environ("OMP_NUM_THREADS", omp_threads):
        multiprocessing.forkserver.ensure_running()
    _server_omp = omp_threads


def stop_forkserver() -> None:
    """Stop the fork server now, even in the middle of its imports (it checks for its agent only after)."""
    server = multiprocessing.forkserver._forkserver
    if server._forkserver_pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server._forkserver_pid, signal.SIGKILL)
        server._stop()


@contextlib.contextmanager
def _environ(name: str, value: str | None):
    old = os.environ.get(name)
    _set_env(name, value)
    try:
        yield
    finally:
        _set_env(name, old)


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def run_worker(*argv: str) -> None:
    """A worker: `imgtrain ARGV` in this (forked) process, ending with the exit code python would give it."""
    _drop_inherited_forkserver_fd()
    # multiprocessing makes "forkserver" the default start method of a process it started that way; a
    # fresh interpreter has the platform's default (fork on Linux before Python 3.14), which the
    # DataLoader's workers must keep: forked from this worker, not from a new server importing torch again.
    multiprocessing.set_start_method(None, force=True)
    sys.argv = ["imgtrain", *argv]
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # torchrun starts workers with python -u
    try:
        from .cli import main

        code = main(list(argv))
    except KeyboardInterrupt:  # SIGINT before the trainer's handler; torch's process wrapper would exit 0
        code = 130
    except Exception:  # as python would: the traceback on stderr (the rank's log), exit code 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    if code:
        sys.exit(code)


# torchrun's failure summary names a function entrypoint by __name__ ("imgtrain FAILED", as for
# `-m imgtrain`); pickling goes by __qualname__, which stays.
run_worker.__name__ = "imgtrain"


def _drop_inherited_forkserver_fd() -> None:
    # Each fork of the fork server inherits a copy of the agent's "alive" pipe. The server exits when that
    # pipe closes, i.e. when the agent dies, but not while a worker holds a copy: closed here, a killed
    # agent takes the fork server with it, and the fork server's death signals the workers. (A worker
    # that starts processes by forkserver itself starts a server of its own; it never uses this one.)
    server = multiprocessing.forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None and server._forkserver_pid is None:
        os.close(fd)
        server._forkserver_alive_fd = None


class _TracebackAsText(logging.Filter):
    """torch's log formatter imports torch._dynamo (2-3 s) to format a record's exception, and the agent logs
    a worker's failure with one (a function's failure, not a command's), right before it restarts the
    workers. The same text, formatted here without that import."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.exc_text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return True


def _format_agent_tracebacks_lightly() -> None:
    for name in ("torch", "torch.distributed"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_TracebackAsText())


def main(argv: list[str] | None = None) -> int:
    """`imgtrain launch ...`: exits as torchrun does (1, with torchrun's failure summary, if a worker failed)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # Before torch is imported here: the server's imports overlap this process's own.
    known, omp_threads = expected_omp_threads(argv)
    if known:
        start_forkserver(omp_threads)

    from torch.distributed.elastic.multiprocessing.errors import record
    from torch.distributed.launcher.api import elastic_launch

    _format_agent_tracebacks_lightly()

    @record
    def launch() -> None:
        config, entrypoint, args = resolve(argv)
        if callable(entrypoint) and config.start_method == "forkserver":
            start_forkserver(os.environ.get("OMP_NUM_THREADS"))  # no-op unless torchrun changed it
        else:
            stop_forkserver()
        elastic_launch(config=config, entrypoint=entrypoint)(*args)

    try:
        launch()
    finally:
        stop_forkserver()
    return 0


if __name__ == "__main__":
    sys.exit(main())
