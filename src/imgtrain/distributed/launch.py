"""``imgtrain launch``: torchrun whose workers start with torch, torchvision and the trainer already imported.

Every worker torchrun starts is a fresh ``python -m imgtrain`` that imports torch and torchvision before it
can join the process group: about 4.6 s on an idle CPU core, paid again by every restart after a fault
(docs/BENCHMARKS.md). This launcher takes exactly torchrun's arguments and environment (``PET_*``) and runs
torchrun's own elastic agent, but hands it a Python function instead of a command line, and each worker,
first start or restart, is a fork of a process that has imported everything once:

* ``fork`` (the default on a node without GPUs, ``--nproc-per-node`` a number): a fork of the agent itself.
  The agent imports torch (it needs it anyway) and then, on a thread, what a worker needs while it joins
  the rendezvous; every fork waits for that thread. A relaunched node imports torch once, not twice (agent
  and server), which is what a rejoin on a node with few free cores waits for. A worker first puts back
  python's signal handling (torchrun's agent turns signals into exceptions).
* ``forkserver`` (the default on a node with GPUs): torchrun asks torch about the accelerator in the agent
  (LaunchConfig's NUMA default, the GPU count for ``gpu``/``auto``), which initializes CUDA there, and a fork
  of such a process cannot use CUDA. A fork server, started before the agent has even imported torch,
  imports everything while the agent imports and joins the rendezvous; the two imports run on separate
  cores of such a node.

Neither process runs a torch operation or creates a thread pool before the workers fork (with
``OMP_NUM_THREADS`` set, as torchrun sets it for several workers per node), and the process they fork from
has no CUDA state, so a fork is as clean as a fresh process. Libraries read their thread settings when they are imported, so the
importing process runs with the environment the workers get: torchrun changes only ``OMP_NUM_THREADS``; the
agent sets it before importing torch, a fork server started with another value is replaced, and each worker
applies it to torch once more. If the agent dies, even by ``kill -9``, each worker gets SIGINT (torch's
parent-death signal; a fork server exits first), which imgtrain treats as a preemption: it saves and exits.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import threading
import traceback

from imgtrain.errors import EXIT_CODES, EXPECTED_ERROR_CODES
from imgtrain.fault import STOP_SIGNALS, stop_signals_blocked
from imgtrain.internals import forkserver

# What a worker imports before its first step; what it imports later is small (python -X importtime).
# The module `python -m imgtrain` runs (its main() is what a worker runs). Named, as torchrun names the
# program it starts, rather than imported: the command line dispatches `imgtrain launch` to this module, so
# an import of it here would close a cycle (tests/unit/test_import_cycles.py).
COMMAND_LINE = "imgtrain.cli"
PRELOAD = ("torch", "torchvision", "psutil", "cv2", COMMAND_LINE, "imgtrain.train.trainer")
# `imgtrain launch [torchrun options] train ...` is short for `... -m imgtrain train ...`.
WORKER_COMMANDS = ("train", "eval", "find-batch-size")

# The job's largest world size (--nnodes maximum x --nproc-per-node), told to the workers: under
# distributed.elastic_batch=keep_global it fixes the global batch whatever the world size at the first start.
MAX_WORLD_SIZE_ENV = "IMGTRAIN_MAX_WORLD_SIZE"

log = logging.getLogger(__name__)
_server_omp: tuple[str | None, str | None] | None = (
    None  # (OMP_NUM_THREADS, MAX_WORLD_SIZE_ENV) of the running fork server
)


def build_parser():
    """torchrun's parser; only the default start method differs (``--start-method`` or PET_START_METHOD win)."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "imgtrain launch"
    parser.description = (
        "torchrun with pre-imported workers (forked from this process on a node without GPUs, from a fork "
        "server on a node with GPUs). Takes torchrun's options; the command is `-m imgtrain train ...` (or "
        "just `train ...`); any other command runs exactly as torchrun runs it."
    )
    if "PET_START_METHOD" not in os.environ:
        parser.set_defaults(start_method=None)  # resolve() picks it (default_start_method)
    return parser


def default_start_method(nproc_per_node: str, gpus_visible: bool) -> str:
    """``fork`` (from this process, once it has imported what a worker needs) on a node without GPUs when
    the number of workers is given; ``forkserver`` otherwise. torchrun queries CUDA in the agent (the GPU
    count for ``gpu``/``auto``, and LaunchConfig's NUMA default on every launch), which initializes it there,
    and a fork of a process with CUDA initialized cannot use CUDA."""
    return "fork" if nproc_per_node.isdigit() and not gpus_visible else "forkserver"


def _nvidia_device_present() -> bool:
    """A guess at GPUs without importing torch (the NVIDIA driver's control device); resolve() asks torch."""
    return os.path.exists("/dev/nvidiactl")


def _option(argv: list[str], flag: str, default: str) -> str:
    """The value of torchrun option ``flag`` on the command line (before the command), else ``default``;
    told without importing torch (a wrong guess costs start-up time, not results)."""
    value = default
    for i, a in enumerate(argv):
        if a in ("-m", "--module", "imgtrain", *WORKER_COMMANDS):
            break
        name, eq, rest = a.partition("=")
        name = name.replace("_", "-")
        # argparse takes unambiguous prefixes of an option (--nproc for --nproc-per-node).
        if name.startswith("--") and len(name) > 3 and flag.startswith(name):
            value = rest if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return value


def expected_start_method(argv: list[str], environ=os.environ, gpus_visible: bool | None = None) -> str:
    """The start method resolve() will choose for an imgtrain command, told without importing torch."""
    if gpus_visible is None:
        gpus_visible = _nvidia_device_present()
    nproc = _option(argv, "--nproc-per-node", environ.get("PET_NPROC_PER_NODE", "1"))
    return _option(
        argv, "--start-method", environ.get("PET_START_METHOD", default_start_method(nproc, gpus_visible))
    )


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
    from imgtrain.internals import torchrun  # imports torch: not before main() has started a fork server

    args = build_parser().parse_args(argv)
    worker_argv = imgtrain_argv(args)
    chosen_here = args.start_method is None
    if chosen_here:  # torchrun's default for any other program
        args.start_method = (
            "spawn" if worker_argv is None else default_start_method(str(args.nproc_per_node), False)
        )
    config, cmd, cmd_args = torchrun.launch_config(args)
    if worker_argv is None:
        return config, cmd, cmd_args
    if chosen_here and config.start_method == "fork" and _gpus_visible():
        config.start_method = "forkserver"
    return config, run_worker, worker_argv


def _gpus_visible() -> bool:
    # Safe to ask now: torchrun's own queries (config_from_args) have already initialized CUDA in this
    # process if there is any, and without a GPU a fork of it needs no CUDA.
    import torch

    return torch.cuda.is_available()


def expected_omp_threads(argv: list[str], environ=os.environ) -> tuple[bool, str | None]:
    """(known, value): OMP_NUM_THREADS that torchrun will give the workers (None: unset), told from the
    command line without importing torch: the environment's, else "1" for more than one worker per node
    (torchrun's rule). Not known for a count torch must work out (``--nproc-per-node=gpu``)."""
    if "OMP_NUM_THREADS" in environ:
        return True, environ["OMP_NUM_THREADS"]
    nproc = _option(argv, "--nproc-per-node", environ.get("PET_NPROC_PER_NODE", "1"))
    if not nproc.isdigit():
        return False, None
    return True, ("1" if int(nproc) > 1 else None)


def expected_max_world_size(argv: list[str], environ=os.environ) -> int | None:
    """``--nnodes`` maximum x ``--nproc-per-node`` of a torchrun command line, told without importing torch;
    None for a process count torch must work out (``gpu``, ``auto``)."""
    nproc = _option(argv, "--nproc-per-node", environ.get("PET_NPROC_PER_NODE", "1"))
    nnodes = _option(argv, "--nnodes", environ.get("PET_NNODES", "1"))
    if "--standalone" in argv:
        nnodes = "1"
    max_nodes = nnodes.rpartition(":")[2]
    if not (nproc.isdigit() and max_nodes.isdigit()):
        return None
    return int(max_nodes) * int(nproc)


def max_world_size_from_launcher(environ=os.environ) -> int | None:
    """What :data:`MAX_WORLD_SIZE_ENV` says (set by `imgtrain launch`), else None (plain torchrun, no launcher)."""
    value = environ.get(MAX_WORLD_SIZE_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def start_forkserver(omp_threads: str | None, modules=PRELOAD) -> None:
    """Have a fork server importing ``modules`` under ``OMP_NUM_THREADS=omp_threads``; replace one started
    with another value, or with another MAX_WORLD_SIZE_ENV (its workers inherit the server's environment,
    not the agent's). Returns at once: the imports run in the server while the agent goes on."""
    global _server_omp
    wanted = (omp_threads, os.environ.get(MAX_WORLD_SIZE_ENV))
    if forkserver.running() and _server_omp == wanted:
        return
    forkserver.kill()
    multiprocessing.set_forkserver_preload(list(modules))
    with _environ("OMP_NUM_THREADS", omp_threads):
        multiprocessing.forkserver.ensure_running()
    _server_omp = wanted


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


def preload_in_background(modules=PRELOAD) -> threading.Thread:
    """Import ``modules`` in this process on a thread, for workers forked from it (``--start-method fork``).

    The agent joins the rendezvous meanwhile. Every fork in this process first waits for the thread: a fork
    taken while another thread holds an import lock would leave the child a half-imported module."""

    def _import() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # the worker imports it again and reports the error in its own log
                log.debug("preloading %s failed", name, exc_info=True)

    thread = threading.Thread(target=_import, name="imgtrain-preload", daemon=True)
    thread.start()
    os.register_at_fork(before=lambda: None if threading.current_thread() is thread else thread.join())
    return thread


def run_worker(*argv: str) -> None:
    """A worker: `imgtrain ARGV` in this (forked) process, ending with the exit code python would give it."""
    # Each fork of the fork server inherits a copy of the agent's "alive" pipe. The server exits when that
    # pipe closes, i.e. when the agent dies, but not while a worker holds a copy: closed here, a killed
    # agent takes the fork server with it, and the fork server's death signals the workers. (A worker
    # that starts processes by forkserver itself starts a server of its own; it never uses this one.)
    forkserver.close_inherited_alive_fd()
    _drop_inherited_agent_state()
    # multiprocessing makes "forkserver" the default start method of a process it started that way; a
    # fresh interpreter has the platform's default (fork on Linux before Python 3.14), which the
    # DataLoader's workers must keep: forked from this worker, not from a new server importing torch again.
    multiprocessing.set_start_method(None, force=True)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        # Read by the OpenMP runtime when torch was imported, in the process this one is a fork of; torchrun
        # may have set it only afterwards (it counts GPUs with torch first).
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.argv = ["imgtrain", *argv]
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # torchrun starts workers with python -u
    try:
        code = importlib.import_module(COMMAND_LINE).main(list(argv))
    except KeyboardInterrupt:  # SIGINT before the trainer's handler; torch's process wrapper would exit 0
        code = 130
    except Exception:  # as python would: the traceback on stderr (the rank's log), exit code 1
        traceback.print_exc()
        code = 1
    # Done, saved or not. A killed agent's death signal (SIGINT) reaches a fork of it once for each of the
    # agent's threads the orphan is handed to as they exit; a late one must not turn the exit (which joins
    # the DataLoader's workers) into a KeyboardInterrupt traceback and exit code 1.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.flush()
    if code:
        sys.exit(code)


# torchrun's failure summary names a function entrypoint by __name__ ("imgtrain FAILED", as for
# `-m imgtrain`); pickling goes by __qualname__, which stays.
run_worker.__name__ = "imgtrain"


def _drop_inherited_agent_state() -> None:
    """A fork of the agent starts with python's signal handling, not with the agent's."""
    # torchrun's agent turns SIGTERM/SIGINT/SIGHUP/SIGQUIT into exceptions (to stop its workers); a worker
    # must take them as python does until the trainer installs its own handlers (exit codes 143/130).
    # (The agent's sockets stay open in its forks: closing or replacing them made a worker's save at
    # preemption fail now and then in tests/integration/test_launcher_processes.py; docs/fault_tolerance.md.)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def passed_on_exit_code(failed) -> tuple[int, int] | None:
    """(rank, code) that `imgtrain launch` exits with for failed workers (a ChildFailedError): the first
    failure's, the one torchrun's summary names as its root cause (the earliest; among failures recorded in
    the same second, the lowest local rank), when that code is an expected error's (2-6). None for any other
    code (a crash's traceback, the watchdog's 75, a signal): the launcher then exits 1 as torchrun does.
    Only the first failure counts, whatever the other ranks' codes: it is what ended the group (the agent
    stops the others), and a later rank's code is often a consequence of it."""
    rank, first = failed.get_first_failure()
    return (rank, first.exitcode) if first.exitcode in EXPECTED_ERROR_CODES else None


class _TracebackAsText(logging.Filter):
    """torch's log formatter imports torch._dynamo (2-3 s) to format a record's exception, and the agent logs
    a worker's failure with one (a function's failure, not a command's), right before it restarts the
    workers. The same text, formatted here without that import. A worker that exited with a code (its own
    message, or its traceback, is in its output) comes with the traceback of the agent's wait loop, which
    says nothing about the worker: that one is dropped, the record's line names the code."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            from torch.multiprocessing import ProcessExitedException  # imported by the agent already

            if not isinstance(record.exc_info[1], ProcessExitedException):
                record.exc_text = record.exc_text or logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return True


def _format_agent_tracebacks_lightly() -> None:
    for name in ("torch", "torch.distributed"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_TracebackAsText())


class StoppedWhileStarting(BaseException):
    """SIGTERM/SIGINT before torchrun's agent has taken the signals (it does when it starts the workers).

    Not an Exception: the start-up code's ``except Exception`` (torchrun's rendezvous has several) must not
    swallow it, and the agent's ``finally`` blocks still close the rendezvous and its store."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stopped_while_starting(signum: int, frame) -> None:
    raise StoppedWhileStarting(signum)


@contextlib.contextmanager
def _stop_signals_taken():
    """SIGTERM/SIGINT stop the start, whatever this process inherited.

    A process started in the background by a non-interactive shell (a script's ``cmd &``, a CI runner started
    so) inherits SIGINT ignored, and python then leaves it ignored: Ctrl-C or ``kill -INT`` during the
    start did nothing, and the launcher went on to start its workers (while torchrun's agent, once started,
    takes SIGINT whatever it inherited). SIGTERM would kill it silently, without the exit code 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _stopped_while_starting) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    """`imgtrain launch ...`: exits as torchrun does (1, with torchrun's failure summary, if a worker failed),
    except when a worker failed with an expected error's code (2-6: that code and one line, see
    :func:`passed_on_exit_code`) and when stopped by a signal, at any moment from its start: 128 + the signal
    (143 for SIGTERM, 130 for SIGINT). Neither prints a traceback."""
    try:
        with _stop_signals_taken():
            return _main(sys.argv[1:] if argv is None else list(argv))
    except StoppedWhileStarting as e:
        name = signal.Signals(e.signum).name
        print(f"imgtrain launch: stopped by {name} while starting; no worker had started", file=sys.stderr)
        return 128 + e.signum


def _main(argv: list[str]) -> int:
    # Before torch is imported here: the server's imports overlap this process's own.
    known, omp_threads = expected_omp_threads(argv)
    method = expected_start_method(argv)
    max_world = expected_max_world_size(argv)
    # Before any worker or fork server exists: each inherits it. resolve() sets the exact value below.
    _set_env(MAX_WORLD_SIZE_ENV, None if max_world is None else str(max_world))
    if known and method == "forkserver":
        start_forkserver(omp_threads)
    elif known and method == "fork":
        _set_env("OMP_NUM_THREADS", omp_threads)  # what torchrun sets, here before torch reads it

    try:  # the fork server started above goes with this process, whatever stops it
        # Ctrl-C (or SIGTERM) during torch's import would land in a C extension's initialisation (numpy's,
        # torch's), which may swallow the exception (the launcher then starts its workers as if nothing
        # happened) or turn it into an ImportError. Held until the imports are done, then taken as usual.
        with stop_signals_blocked():
            from torch.distributed.elastic.multiprocessing.api import SignalException
            from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
            from torch.distributed.launcher.api import elastic_launch

        _format_agent_tracebacks_lightly()

        @record
        def launch() -> int:
            config, entrypoint, args = resolve(argv)
            # Workers forked from the agent get the exact value; a fork server started above has the guess.
            _set_env(MAX_WORLD_SIZE_ENV, str(config.max_nodes * config.nproc_per_node))
            if callable(entrypoint) and config.start_method == "forkserver":
                # A no-op unless torchrun changed OMP_NUM_THREADS or the world size was not known before resolve().
                start_forkserver(os.environ.get("OMP_NUM_THREADS"))
            else:
                forkserver.kill()
            if callable(entrypoint) and config.start_method == "fork":
                preload_in_background()
            try:
                elastic_launch(config=config, entrypoint=entrypoint)(*args)
            except SignalException as e:
                # The agent turns SIGTERM/SIGINT/... into this exception once it has stopped its workers (which
                # saved and exited 143/130; its log said "Received ... death signal"). Not an error of the
                # launcher: it exits as a process stopped by that signal is reported, without a traceback.
                return 128 + int(e.sigval)
            except ChildFailedError as e:
                # imgtrain's workers only (another program's codes do not follow imgtrain's table): a config
                # error (2) must reach the scheduler as 2, not as torchrun's 1, so that a policy such as
                # Kubernetes' FailIndex on exit 2 can tell it from a crash.
                passed = passed_on_exit_code(e) if callable(entrypoint) else None
                if passed is None:
                    raise  # torchrun's failure summary and exit 1
                rank, code = passed
                print(
                    f"imgtrain launch: worker rank {rank} exited {code} ({EXIT_CODES[code].split(' (')[0]}; "
                    "its own error line says more); exiting with its code",
                    file=sys.stderr,
                )
                return code
            return 0

        return launch()
    finally:
        forkserver.kill()


if __name__ == "__main__":
    sys.exit(main())
