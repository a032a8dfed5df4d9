"""Command line: argument parsing only; the work happens in the modules it calls."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import DEFAULT_RECIPE, ConfigError, load_config

log = logging.getLogger("imgtrain")

EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe or the name of a shipped one (default for train: quickstart); "
                                    "precedence: defaults < recipe < overrides")
    p.add_argument("--output-dir", help="run directory (same as output_dir=DIR)")
    p.epilog = ("Any further section.key=value arguments override config values, anywhere on the line, "
                "e.g. training.epochs=3 optimization.base_lr=0.2 model.name=resnet18")


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
    s.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    s.add_argument("--port", type=int, default=29400)
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    ov = list(args.overrides)
    # Quoted (a JSON string is YAML) so that a path such as "run #2" or "2024" stays that string.
    if args.output_dir:
        ov.append(f"output_dir={json.dumps(args.output_dir)}")
    if getattr(args, "resume", None):
        ov.append(f"checkpoint.resume={json.dumps(args.resume)}")
    return ov


def main(argv: list[str] | None = None) -> int:
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
            from .rendezvous import serve_store

            serve_store(args.host, args.port)
            return 0
        if args.command == "prepare":
            if rest:
                parser.error(f"prepare takes no overrides: {' '.join(rest)}")
            return _run(_prepare, (parser, args))
        if args.command == "train":
            # Validated before torch is even imported: a typo is reported at once.
            cfg = load_config(args.config or DEFAULT_RECIPE, _overrides(args))
            return _run(_train, cfg)
        return _run(_eval, args)
    except ConfigError as e:
        print(f"imgtrain: error: {e}", file=sys.stderr)
        return EXIT_CONFIG


def _run(fn, arg) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError

    try:
        return fn(arg)
    except DataError as e:
        print(f"imgtrain: data error: {e}", file=sys.stderr)
        return EXIT_DATA
    except CheckpointError as e:
        print(f"imgtrain: checkpoint error: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT


def _train(cfg) -> int:
    from .trainer import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.setup()
        result = trainer.train()
    finally:
        trainer.close()
    if result.get("preempted"):
        return int(result["exit_code"])
    if trainer.info.is_main:
        print(json.dumps({k: result[k] for k in ("val_top1", "val_top5", "epochs", "steps",
                                                   "wall_seconds", "mean_train_images_per_s")}))
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
