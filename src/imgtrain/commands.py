"""What each ``imgtrain`` command does with its parsed arguments: one handler per command, each a thin call
into the module that owns the work. ``cli.py`` parses and looks the handler up in its table.

A handler takes ``(args, parser)`` and returns the exit code; an expected error is raised as an
:class:`~imgtrain.errors.ImgtrainError` and reported by the command line. Heavy modules (torch) are imported
inside the handler that needs them: ``status`` and ``monitor`` start in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from imgtrain.config import Config, default_recipe, load_config
from imgtrain.errors import EXIT_CONFIG, exit_code_of


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


def _config(args: argparse.Namespace) -> Config:
    return load_config(_recipe(args), _overrides(args))


def train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    # Validated before torch is even imported: a typo is reported at once.
    return run_training(_config(args))


def run_training(cfg: Config) -> int:
    """Train to the end (or to a preemption: its exit code); rank 0 prints the result as one JSON line."""
    from imgtrain.train.trainer import Trainer

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
        print(
            json.dumps(
                {
                    k: result[k]
                    for k in (
                        "val_top1",
                        "val_top5",
                        "epochs",
                        "steps",
                        "wall_seconds",
                        "mean_train_images_per_s",
                    )
                }
            )
        )
    return 0


def evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from imgtrain.train.evaluate import run_eval

    return run_eval(args.checkpoint, args.config, _overrides(args))


def find_batch_size(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    cfg = _config(args)
    from imgtrain.tools import find_batch_size as batch_finder
    from imgtrain.units import parse_size

    try:
        limit = parse_size(args.memory_limit, "memory size") if args.memory_limit else None
        world = batch_finder.world_size_of(args.nnodes, args.nproc_per_node)
        result = batch_finder.find_batch_size(
            cfg,
            limit,
            start=args.start,
            max_batch=args.max_batch,
            tolerance=args.tolerance,
            steps=args.steps,
            headroom=args.headroom,
            on_probe=lambda p: print(
                f"  batch {p.batch:>5}: "
                + (f"fits, {p.images_per_s:.1f} images/s" if p.fits else f"does not fit ({p.error})"),
                flush=True,
            ),
        )
    except ValueError as e:
        print(f"imgtrain: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if result.largest == 0:
        print("imgtrain: error: not even batch 1 fits in the budget", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "batch_size.yaml"
    summary = batch_finder.report(cfg, result, world, args.pick, out)
    if args.json:
        print(json.dumps(summary))
    return 0


def prepare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import yaml

    from imgtrain.data.shards import prepare as shards
    from imgtrain.units import parse_size

    try:
        settings = shards.PrepareSettings(
            max_side=args.max_side,
            quality=args.quality,
            shard_size=parse_size(args.shard_size),
            samples_per_shard=args.samples_per_shard,
        )
        options = yaml.safe_load(args.storage_options)
    except (ValueError, yaml.YAMLError) as e:
        parser.error(str(e))
    if not isinstance(options, dict):
        parser.error(f"--storage-options: expected a mapping, got {args.storage_options!r}")
    for name, v, low in (
        ("--max-side", args.max_side, 8),
        ("--quality", args.quality, 1),
        ("--samples-per-shard", args.samples_per_shard, 1),
        ("--workers", args.workers, 1),
    ):
        if v is not None and v < low:
            parser.error(f"{name} must be >= {low}, got {v}")
    if args.quality > 100:
        parser.error(f"--quality must be <= 100, got {args.quality}")
    index = shards.prepare(
        args.src, args.dst, settings, args.workers, args.split, options, not args.no_progress
    )
    print(
        json.dumps(
            {
                name: {"samples": sp["samples"], "shards": len(sp["shards"]), "skipped": len(sp["skipped"])}
                for name, sp in index["splits"].items()
            }
        )
    )
    return 0


def rendezvous_store(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from imgtrain.distributed.rendezvous import BindError, serve_store, store_address

    try:
        serve_store(store_address(args.host, args.allow_wildcard_bind), args.port)
    except BindError as e:
        print(f"imgtrain: rendezvous-store: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def lighthouse(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from imgtrain.distributed.rendezvous import BindError, is_wildcard, lighthouse_command

    if is_wildcard(args.host) and not args.allow_wildcard_bind:
        print(
            f"imgtrain: lighthouse: --host {args.host!r} listens on every interface, and whoever reaches the "
            "lighthouse can join or stall the quorum: give one address, or --allow-wildcard-bind behind a "
            "firewall (docs/security.md)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        cmd = lighthouse_command(
            args.host,
            args.port,
            args.min_replicas,
            args.heartbeat_timeout_ms,
            args.join_timeout_ms,
        )
    except BindError as e:
        print(f"imgtrain: lighthouse: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"imgtrain: lighthouse on {cmd[2]}: replicas set TORCHFT_LIGHTHOUSE=http://{cmd[2]}", flush=True)
    os.execv(cmd[0], cmd)  # the lighthouse is this process from here: signals reach it directly


def observe(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """report / monitor / profile-summary: read a run directory; no torch import, no process group."""
    run_dir = Path(args.run_dir)
    if args.command == "monitor":  # may be started before the run has created its directory
        from imgtrain.tools.monitor import monitor

        return monitor(run_dir, once=args.once, interval=args.interval)
    if not run_dir.is_dir():
        print(f"imgtrain: error: run directory {run_dir} does not exist", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "report":
        from imgtrain.tools.report import write_report

        out = write_report(run_dir, Path(args.output) if args.output else None)
        print(out)
        return 0
    from imgtrain.tools.profile_summary import print_summary

    return print_summary(run_dir, top=args.top)


def status(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    # Polled by scripts/monitor.sh: it must not pay for importing torch.
    from imgtrain.tools import run_ops

    if bool(args.run_dir) == bool(args.metrics_url):
        print("imgtrain: error: status takes a run directory or --metrics-url", file=sys.stderr)
        return EXIT_CONFIG
    print(
        json.dumps(
            run_ops.endpoint_status(args.metrics_url)
            if args.metrics_url
            else run_ops.run_status(args.run_dir)
        )
    )
    return 0


def checkpoints(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from imgtrain.tools import run_ops

    if args.action == "list":
        from imgtrain.checkpoint import CheckpointManager
        from imgtrain.config import CheckpointConfig

        mgr = CheckpointManager(CheckpointConfig(), args.directory, is_writer=False)
        for c in mgr.list(verify=True):
            state = "ok" if c.problem is None else f"bad: {c.problem}"
            print(json.dumps({"step": c.step, "path": c.path, "state": state}))
        mgr.close()
        return 0
    if args.keep < 1:
        print(
            "imgtrain: error: --keep must be >= 1 (the newest good checkpoint is never removed)",
            file=sys.stderr,
        )
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


def launch(argv: list[str]) -> int:
    """`imgtrain launch ...`: torchrun's own parser takes every argument after ``launch``."""
    from imgtrain.distributed.launch import main

    return main(argv)
