"""Command line: argument parsing and a table of commands; the handlers are in :mod:`imgtrain.commands`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from imgtrain import commands
from imgtrain.errors import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED, ImgtrainError
from imgtrain.monitoring.logs import configure_logging

__all__ = ["COMMANDS", "EXIT_CHECKPOINT", "EXIT_CONFIG", "EXIT_DATA", "EXIT_DIVERGED", "build_parser", "main"]

# command -> (handler in commands.py, whether it takes section.key=value overrides). `launch` is not here:
# torchrun's own parser takes every argument after it.
COMMANDS = {
    "train": (commands.train, True),
    "eval": (commands.evaluate, True),
    "find-batch-size": (commands.find_batch_size, True),
    "prepare": (commands.prepare, False),
    "rendezvous-store": (commands.rendezvous_store, False),
    "lighthouse": (commands.lighthouse, False),
    "report": (commands.observe, False),
    "monitor": (commands.observe, False),
    "profile-summary": (commands.observe, False),
    "checkpoints": (commands.checkpoints, False),
    "status": (commands.status, False),
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="YAML recipe or the name of a shipped one (default: folder with data.root=DIR, else quickstart); "
        "precedence: defaults < recipe < overrides",
    )
    p.add_argument("--output-dir", help="run directory (same as output_dir=DIR)")
    p.epilog = (
        "Any further section.key=value arguments override config values, anywhere on the line, "
        "e.g. training.epochs=3 training.base_lr=0.2 model.name=resnet18"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgtrain", description="Distributed image-classification training")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model (resumes automatically from the newest checkpoint)")
    _add_common(t)
    t.add_argument("--resume", help="checkpoint to resume from (same as checkpoint.resume=PATH)")
    e = sub.add_parser("eval", help="top-1/top-5 of a checkpoint or model.pt on the validation split")
    e.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory, its checkpoints/ folder (newest good one), or model.pt",
    )
    _add_common(e)
    pr = sub.add_parser(
        "prepare", help="ImageFolder tree -> WebDataset tar shards + index.json, for data.format=shards"
    )
    pr.add_argument("src", help="ImageFolder root: with train/ and/or val/, else one split (see --split)")
    pr.add_argument("dst", help="output folder or fsspec URL (s3://bucket/prefix, gs://...)")
    pr.add_argument(
        "--max-side", type=int, default=320, help="longer image side after re-encoding (default 320)"
    )
    pr.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    pr.add_argument("--shard-size", default="500MB", help="target shard size (default 500MB)")
    pr.add_argument("--samples-per-shard", type=int, help="fix the source files per shard instead")
    pr.add_argument("--workers", type=int, help="worker processes (default: all CPUs)")
    pr.add_argument("--split", help="write SRC as this one split (e.g. val) into DST's index")
    pr.add_argument(
        "--storage-options",
        default="{}",
        help="fsspec options for DST as YAML/JSON, e.g. '{client_kwargs: {endpoint_url: http://...}}'",
    )
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = sub.add_parser(
        "rendezvous-store",
        help="serve a standalone c10d rendezvous store (for torchrun agents with is_host=false)",
    )
    s.add_argument(
        "--host",
        help="address to listen on: one the agents reach (default: $POD_IP, set in the "
        "Kubernetes manifest; required elsewhere)",
    )
    s.add_argument("--port", type=int, default=29400)
    s.add_argument(
        "--allow-wildcard-bind",
        action="store_true",
        help="accept 0.0.0.0 or :: (every interface): only behind a firewall that admits the job's "
        "nodes alone (docs/security.md)",
    )
    lh = sub.add_parser(
        "lighthouse",
        help="serve torchft's lighthouse, the quorum service of fault_tolerance.mode=replicated",
    )
    lh.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    lh.add_argument("--port", type=int, default=29510)
    lh.add_argument("--min-replicas", type=int, default=1, help="fewest replica groups a quorum may have")
    lh.add_argument(
        "--heartbeat-timeout-ms",
        type=int,
        default=5000,
        help="a replica group silent this long is dead: the survivors' next step waits about this long",
    )
    lh.add_argument(
        "--join-timeout-ms",
        type=int,
        default=60000,
        help="how long a quorum waits for heartbeating stragglers",
    )
    lh.add_argument(
        "--allow-wildcard-bind",
        action="store_true",
        help="accept 0.0.0.0 or :: (every interface): only behind a firewall that admits the job's nodes alone",
    )
    r = sub.add_parser("report", help="write a self-contained HTML report (plots inlined) of a run directory")
    r.add_argument("run_dir", help="the run directory (output_dir) of a finished or running run")
    r.add_argument("-o", "--output", help="HTML file to write (default: RUN_DIR/report.html)")
    m = sub.add_parser("monitor", help="live terminal dashboard of a run directory, until the run ends")
    m.add_argument("run_dir")
    m.add_argument("--once", action="store_true", help="print one snapshot and exit")
    m.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    ps = sub.add_parser(
        "profile-summary",
        help="top operators per rank and cross-rank differences from the "
        "profiler's Chrome traces in RUN_DIR/profiler",
    )
    ps.add_argument("run_dir")
    ps.add_argument("--top", type=int, default=15, help="operators listed per rank (default 15)")
    c = sub.add_parser("checkpoints", help="list or prune a checkpoint directory (local or s3://, gs://)")
    c.add_argument("action", choices=["list", "prune"])
    c.add_argument("directory", help="checkpoint directory (default layout: <output-dir>/checkpoints)")
    c.add_argument("--keep", type=int, default=3, help="prune: newest checkpoints that verify to keep (>= 1)")
    c.add_argument("--dry-run", action="store_true", help="prune: only say what would be removed")
    st = sub.add_parser("status", help="state, step, throughput and last checkpoint of a run (JSON)")
    st.add_argument("run_dir", nargs="?", help="the run's output directory")
    st.add_argument(
        "--metrics-url", help="a Prometheus endpoint of the run instead, e.g. http://node:9450/metrics"
    )
    _add_find_batch_size(sub)
    sub.add_parser(
        "launch",
        add_help=False,
        help="torchrun with pre-imported workers: `imgtrain launch [torchrun options] -m imgtrain train "
        "...` (`imgtrain launch --help`; see docs/fault_tolerance.md)",
    )
    return parser


def _checked(
    kind: type, low: float, high: float | None = None, low_open: bool = False
) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind`` (int or float) from ``low`` (excluded if ``low_open``) to ``high``
    (excluded), so that a bad value is refused with the option's name before any work starts."""
    expected = f"{'an integer' if kind is int else 'a number'} {'>' if low_open else '>='} {low}"
    if high is not None:
        expected += f" and < {high}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}") from None
        # Written as what passes, so that nan (which compares false to everything) does not.
        if not ((value > low if low_open else value >= low) and (high is None or value < high)):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
        return value

    return parse


def _add_find_batch_size(sub) -> None:
    f = sub.add_parser("find-batch-size", help="largest and fastest per-process batch that fits (real steps)")
    _add_common(f)
    f.add_argument(
        "--memory-limit",
        help="memory budget per process, e.g. 4GiB (required on CPU: each probe "
        "runs capped to it; on GPU: caps the CUDA allocator)",
    )
    f.add_argument("--nnodes", type=int, default=1, help="nodes of the run to size (for the global batch/LR)")
    f.add_argument("--nproc-per-node", type=int, default=1, help="processes per node of that run")
    f.add_argument("--start", type=int, help="first batch probed (default: training.batch_size)")
    f.add_argument("--max-batch", type=_checked(int, 1), default=4096, help="stop growing here")
    f.add_argument(
        "--tolerance",
        type=_checked(float, 0, low_open=True),
        default=0.1,
        help="bisect until the gap to the first failing batch is at most this fraction",
    )
    f.add_argument(
        "--steps", type=_checked(int, 1), default=3, help="training steps per probe (the first is not timed)"
    )
    f.add_argument(
        "--headroom",
        type=_checked(float, 0, 1),
        default=0.1,
        help="fraction of the budget left free for the loader, evaluation and checkpoints",
    )
    f.add_argument(
        "--pick",
        choices=("fastest", "largest"),
        default="fastest",
        help="which batch goes into the written recipe",
    )
    f.add_argument("--out", help="recipe to write (default: <output_dir>/batch_size.yaml)")
    f.add_argument("--json", action="store_true", help="also print the result as one JSON line")


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        # Ctrl-C where the command has no handling of its own (training saves and exits 130 by itself; the
        # launcher stops its workers first): during torch's imports (seconds), or in eval or find-batch-size,
        # which save nothing. README's exit code, no traceback.
        print("imgtrain: interrupted (SIGINT)", file=sys.stderr)
        return 130


def _run(argv: list[str]) -> int:
    if argv[:1] == ["launch"]:
        return commands.launch(argv[1:])
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides look like section.key=value)")
    args.overrides = rest
    handler, takes_overrides = COMMANDS[args.command]
    if rest and not takes_overrides:
        parser.error(f"{args.command} takes no overrides: {' '.join(rest)}")
    # The console of every command; train and eval add the rank once the process group is up.
    configure_logging()
    try:
        return handler(args, parser)
    except ImgtrainError as e:
        return _report(e)


def _report(e: ImgtrainError) -> int:
    """One line on stderr, the code of errors.py's table: an expected error is no bug, so no traceback."""
    print(f"imgtrain: {e.prefix}: {e}" if e.prefix else f"imgtrain: {e}", file=sys.stderr)
    return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
