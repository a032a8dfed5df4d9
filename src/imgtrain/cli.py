"""Command line: argument parsing only; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .config import default_recipe, load_config
from .errors import EXIT_CHECKPOINT, EXIT_CONFIG, EXIT_DATA, EXIT_DIVERGED, ImgtrainError, exit_code_of

__all__ = ["EXIT_CHECKPOINT", "EXIT_CONFIG", "EXIT_DATA", "EXIT_DIVERGED", "build_parser", "main"]

log = logging.getLogger("imgtrain")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe or the name of a shipped one (default: folder with data.root=DIR, else quickstart); "
                                    "precedence: defaults < recipe < overrides")
    p.add_argument("--output-dir", help="run directory (same as output_dir=DIR)")
    p.epilog = ("Any further section.key=value arguments override config values, anywhere on the line, "
                "e.g. training.epochs=3 training.base_lr=0.2 model.name=resnet18")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgtrain", description="Distributed image-classification training")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model (resumes automatically from the newest checkpoint)")
    _add_common(t)
    t.add_argument("--resume", help="checkpoint to resume from (same as checkpoint.resume=PATH)")
    e = sub.add_parser("eval", help="top-1/top-5 of a checkpoint or model.pt on the validation split")
    e.add_argument("--checkpoint", required=True,
                   help="a checkpoint directory, its checkpoints/ folder (newest good one), or model.pt")
    _add_common(e)
    pr = sub.add_parser("prepare", help="ImageFolder tree -> WebDataset tar shards + index.json, for data.format=shards")
    pr.add_argument("src", help="ImageFolder root: with train/ and/or val/, else one split (see --split)")
    pr.add_argument("dst", help="output folder or fsspec URL (s3://bucket/prefix, gs://...)")
    pr.add_argument("--max-side", type=int, default=320, help="longer image side after re-encoding (default 320)")
    pr.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    pr.add_argument("--shard-size", default="500MB", help="target shard size (default 500MB)")
    pr.add_argument("--samples-per-shard", type=int, help="fix the source files per shard instead")
    pr.add_argument("--workers", type=int, help="worker processes (default: all CPUs)")
    pr.add_argument("--split", help="write SRC as this one split (e.g. val) into DST's index")
    pr.add_argument("--storage-options", default="{}", help="fsspec options for DST as YAML/JSON, e.g. "
                                                            "'{client_kwargs: {endpoint_url: http://...}}'")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = sub.add_parser("rendezvous-store",
                       help="serve a standalone c10d rendezvous store (for torchrun agents with is_host=false)")
    s.add_argument("--host", help="address to listen on: one the agents reach (default: $POD_IP, set in the "
                                  "Kubernetes manifest; required elsewhere)")
    s.add_argument("--port", type=int, default=29400)
    s.add_argument("--allow-wildcard-bind", action="store_true",
                   help="accept 0.0.0.0 or :: (every interface): only behind a firewall that admits the job's "
                        "nodes alone (docs/security.md)")
    r = sub.add_parser("report", help="write a self-contained HTML report (plots inlined) of a run directory")
    r.add_argument("run_dir", help="the run directory (output_dir) of a finished or running run")
    r.add_argument("-o", "--output", help="HTML file to write (default: RUN_DIR/report.html)")
    m = sub.add_parser("monitor", help="live terminal dashboard of a run directory, until the run ends")
    m.add_argument("run_dir")
    m.add_argument("--once", action="store_true", help="print one snapshot and exit")
    m.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    ps = sub.add_parser("profile-summary", help="top operators per rank and cross-rank differences from the "
                                                "profiler's Chrome traces in RUN_DIR/profiler")
    ps.add_argument("run_dir")
    ps.add_argument("--top", type=int, default=15, help="operators listed per rank (default 15)")
    c = sub.add_parser("checkpoints", help="list or prune a checkpoint directory (local or s3://, gs://)")
    c.add_argument("action", choices=["list", "prune"])
    c.add_argument("directory", help="checkpoint directory (default layout: <output-dir>/checkpoints)")
    c.add_argument("--keep", type=int, default=3, help="prune: newest checkpoints that verify to keep (>= 1)")
    c.add_argument("--dry-run", action="store_true", help="prune: only say what would be removed")
    st = sub.add_parser("status", help="state, step, throughput and last checkpoint of a run (JSON)")
    st.add_argument("run_dir", nargs="?", help="the run's output directory")
    st.add_argument("--metrics-url", help="a Prometheus endpoint of the run instead, e.g. http://node:9450/metrics")
    _add_find_batch_size(sub)
    sub.add_parser("launch", add_help=False,
                   help="torchrun with pre-imported workers: `imgtrain launch [torchrun options] -m imgtrain train "
                        "...` (`imgtrain launch --help`; see docs/fault_tolerance.md)")
    return parser


def _add_find_batch_size(sub) -> None:
    f = sub.add_parser("find-batch-size", help="largest and fastest per-process batch that fits (real steps)")
    _add_common(f)
    f.add_argument("--memory-limit", help="memory budget per process, e.g. 4GiB (required on CPU: each probe "
                                          "runs capped to it; on GPU: caps the CUDA allocator)")
    f.add_argument("--nnodes", type=int, default=1, help="nodes of the run to size (for the global batch/LR)")
    f.add_argument("--nproc-per-node", type=int, default=1, help="processes per node of that run")
    f.add_argument("--start", type=int, help="first batch probed (default: training.batch_size)")
    f.add_argument("--max-batch", type=int, default=4096, help="stop growing here")
    f.add_argument("--tolerance", type=float, default=0.1,
                   help="bisect until the gap to the first failing batch is at most this fraction")
    f.add_argument("--steps", type=int, default=3, help="training steps per probe (the first is not timed)")
    f.add_argument("--headroom", type=float, default=0.1,
                   help="fraction of the budget left free for the loader, evaluation and checkpoints")
    f.add_argument("--pick", choices=("fastest", "largest"), default="fastest",
                   help="which batch goes into the written recipe")
    f.add_argument("--out", help="recipe to write (default: <output_dir>/batch_size.yaml)")
    f.add_argument("--json", action="store_true", help="also print the result as one JSON line")


def _overrides(args: argparse.Namespace) -> list[str]:
    ov = list(args.overrides)
    # Quoted (a JSON string is YAML) so that a path such as "run #2" or "2024" stays that string.
    if args.output_dir:
        ov.append(f"output_dir={json.dumps(args.output_dir)}")
    if getattr(args, "resume", None):
        ov.append(f"checkpoint.resume={json.dumps(args.resume)}")
    return ov


def _recipe(args: argparse.Namespace) -> str:
    """--config, else the shipped recipe that fits the command line, said once (by rank 0) with the reason."""
    if args.config:
        return args.config
    recipe, why = default_recipe(args.overrides)
    if os.environ.get("RANK", "0") == "0":
        print(f"imgtrain: {why}", file=sys.stderr)
    return recipe


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["launch"]:  # torchrun's own parser takes every argument after it
        from .launch import main as launch

        return launch(argv[1:])
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides look like section.key=value)")
    args.overrides = rest
    try:
        if args.command == "rendezvous-store":
            if rest:
                parser.error(f"rendezvous-store takes no overrides: {' '.join(rest)}")
            from .rendezvous import BindError, serve_store, store_address

            try:
                serve_store(store_address(args.host, args.allow_wildcard_bind), args.port)
            except BindError as e:
                print(f"imgtrain: rendezvous-store: {e}", file=sys.stderr)
                return EXIT_CONFIG
            return 0
        if args.command in ("report", "monitor", "profile-summary"):
            if rest:
                parser.error(f"{args.command} takes no overrides: {' '.join(rest)}")
            return _observe(args)
        if args.command in ("checkpoints", "status"):
            if rest:
                parser.error(f"{args.command} takes no overrides: {' '.join(rest)}")
            # status is polled by scripts/monitor.sh: it must not pay for importing torch.
            return _run_ops(args) if args.command == "status" else _run(_run_ops, args)
        if args.command == "find-batch-size":
            cfg = load_config(_recipe(args), _overrides(args))
            return _run(_find_batch_size, (cfg, args))
        if args.command == "prepare":
            if rest:
                parser.error(f"prepare takes no overrides: {' '.join(rest)}")
            return _run(_prepare, (parser, args))
        if args.command == "train":
            # Validated before torch is even imported: a typo is reported at once.
            cfg = load_config(_recipe(args), _overrides(args))
            return _run(_train, cfg)
        return _run(_eval, args)
    except ImgtrainError as e:
        return _report(e)


def _report(e: ImgtrainError) -> int:
    """One line on stderr, the code of errors.py's table: an expected error is no bug, so no traceback."""
    print(f"imgtrain: {e.prefix}: {e}" if e.prefix else f"imgtrain: {e}", file=sys.stderr)
    return e.exit_code


def _run(fn, arg) -> int:
    try:
        return fn(arg)
    except ImgtrainError as e:
        return _report(e)


def _train(cfg) -> int:
    from .trainer import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.setup()
        result = trainer.train()
    except BaseException as e:
        trainer.report_failure(e, exit_code_of(e))
        raise
    finally:
        trainer.close()
    if result.get("preempted"):
        return int(result["exit_code"])
    if trainer.info.is_main:
        print(json.dumps({k: result[k] for k in ("val_top1", "val_top5", "epochs", "steps",
                                                   "wall_seconds", "mean_train_images_per_s")}))
    return 0


def _observe(args: argparse.Namespace) -> int:
    """report / monitor / profile-summary: read a run directory; no torch import, no process group."""
    from pathlib import Path

    run_dir = Path(args.run_dir)
    if args.command == "monitor":  # may be started before the run has created its directory
        from .monitoring.dashboard import monitor

        return monitor(run_dir, once=args.once, interval=args.interval)
    if not run_dir.is_dir():
        print(f"imgtrain: error: run directory {run_dir} does not exist", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "report":
        from .monitoring.report import write_report

        out = write_report(run_dir, Path(args.output) if args.output else None)
        print(out)
        return 0
    from .monitoring.profile_summary import print_summary

    return print_summary(run_dir, top=args.top)


def _run_ops(args: argparse.Namespace) -> int:
    from . import run_ops

    if args.command == "status":
        if bool(args.run_dir) == bool(args.metrics_url):
            print("imgtrain: error: status takes a run directory or --metrics-url", file=sys.stderr)
            return EXIT_CONFIG
        print(json.dumps(run_ops.endpoint_status(args.metrics_url) if args.metrics_url
                         else run_ops.run_status(args.run_dir)))
        return 0
    if args.action == "list":
        from .checkpoint import CheckpointError, CheckpointManager, verify
        from .config import CheckpointConfig

        mgr = CheckpointManager(CheckpointConfig(), args.directory, is_writer=False)
        for step, name in mgr.list_checkpoints():
            try:
                verify(mgr.url(name))
                state = "ok"
            except CheckpointError as e:
                state = f"bad: {e}"
            print(json.dumps({"step": step, "path": mgr.url(name), "state": state}))
        mgr.close()
        return 0
    if args.keep < 1:
        print("imgtrain: error: --keep must be >= 1 (the newest good checkpoint is never removed)", file=sys.stderr)
        return EXIT_CONFIG
    report = run_ops.prune_checkpoints(args.directory, args.keep, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path in report.removed:
        print(f"{verb} {path}")
    for path in report.kept:
        print(f"keep {path}")
    if report.newest_valid is None:
        print(f"imgtrain: no checkpoint in {args.directory} verifies: nothing removed", file=sys.stderr)
    return 0


def _find_batch_size(cfg_args) -> int:
    from pathlib import Path

    from .batch_finder import find_batch_size, parse_size, report, world_size_of

    cfg, args = cfg_args
    try:
        limit = parse_size(args.memory_limit) if args.memory_limit else None
        world = world_size_of(args.nnodes, args.nproc_per_node)
        if not 0 <= args.headroom < 1 or args.tolerance <= 0 or args.steps < 1 or args.max_batch < 1:
            raise ValueError("need 0 <= --headroom < 1, --tolerance > 0, --steps >= 1, --max-batch >= 1")
        result = find_batch_size(cfg, limit, start=args.start, max_batch=args.max_batch,
                                 tolerance=args.tolerance, steps=args.steps, headroom=args.headroom,
                                 on_probe=lambda p: print(
                                     f"  batch {p.batch:>5}: " + (f"fits, {p.images_per_s:.1f} images/s"
                                                                  if p.fits else f"does not fit ({p.error})"),
                                     flush=True))
    except ValueError as e:
        print(f"imgtrain: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if result.largest == 0:
        print("imgtrain: error: not even batch 1 fits in the budget", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "batch_size.yaml"
    summary = report(cfg, result, world, args.pick, out)
    if args.json:
        print(json.dumps(summary))
    return 0


def _prepare(parser_args: tuple[argparse.ArgumentParser, argparse.Namespace]) -> int:
    import yaml

    from .data.prepare import PrepareSettings, parse_size, prepare

    parser, args = parser_args
    try:
        settings = PrepareSettings(max_side=args.max_side, quality=args.quality,
                                   shard_size=parse_size(args.shard_size), samples_per_shard=args.samples_per_shard)
        options = yaml.safe_load(args.storage_options)
    except (ValueError, yaml.YAMLError) as e:
        parser.error(str(e))
    if not isinstance(options, dict):
        parser.error(f"--storage-options: expected a mapping, got {args.storage_options!r}")
    for name, v, low in (("--max-side", args.max_side, 8), ("--quality", args.quality, 1),
                         ("--samples-per-shard", args.samples_per_shard, 1), ("--workers", args.workers, 1)):
        if v is not None and v < low:
            parser.error(f"{name} must be >= {low}, got {v}")
    if args.quality > 100:
        parser.error(f"--quality must be <= 100, got {args.quality}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    index = prepare(args.src, args.dst, settings, args.workers, args.split, options, not args.no_progress)
    print(json.dumps({name: {"samples": sp["samples"], "shards": len(sp["shards"]), "skipped": len(sp["skipped"])}
                      for name, sp in index["splits"].items()}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import run_eval

    return run_eval(args.checkpoint, args.config, _overrides(args))


if __name__ == "__main__":
    sys.exit(main())
