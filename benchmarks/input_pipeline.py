"""Decode + augment images/s per loader worker: torchvision's reference pipeline against imgtrain's loader
on the same files and on shards made by ``imgtrain prepare``.

The data: a few thousand JPEGs cut and scaled from scikit-learn's two sample photographs (random crops,
flips, brightness, sizes with ImageNet's spread: long side up to 500 px, about 440x380 on average), quality
90, in ImageFolder layout, written once under ~/.cache/imgtrain/bench-jpegs-v1 (or $IMGTRAIN_DATA_HOME);
then prepared once with ``imgtrain prepare --max-side M`` (M = 320 and 256 by default) into
``bench-jpegs-v1-shardsM`` beside it.

Variants, all producing the 224 px training sample (RandomResizedCrop + horizontal flip), side by side:

* ``reference``: ``torchvision.datasets.ImageFolder`` with its default (PIL) loader and the classification
  reference's train preset (RandomResizedCrop, flip, PILToTensor, float, Normalize in the worker), on the
  original files;
* ``folder-<decoder>``: imgtrain's ``data.format: folder`` loader (``build_data``: its dataset, sampler,
  collate) on the same files, with each ``data.decode.decoder`` (uint8 out);
* ``shardsM-<decoder>``: imgtrain's ``data.format: shards`` loader (``build_data``) on the prepared shards.

Each variant is a DataLoader over ``--images`` images drawn at random from the whole set, run with 1 and
with 2 worker processes (one torch/OpenCV thread each); images/s is divided by the worker count. Variants
alternate in rounds; medians are reported with the median ratio to the reference measured in the same
round. ``--micro`` adds per-image timings of each step of a sample (decode, crop + resize, flip, tensor
conversion, collate), in this process. ``--train-ratio`` adds the data-efficiency ratio (real-data over
synthetic training throughput, ResNet-18 at 64 px) from benchmarks/throughput.py for two decoders.

The ``simplejpeg_pillow`` decoder resizes with Pillow: its numbers depend on whether Pillow is pillow-simd
(``scripts/install_pillow_simd.sh``; the result records which Pillow ran).

    python benchmarks/input_pipeline.py --images 1000 --rounds 3 --micro --train-ratio
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import command_line, machine_info, record, stats
from PIL import Image

from imgtrain.config import DataConfig, DecodeConfig
from imgtrain.data import build_data
from imgtrain.data.decode.cpu import DECODERS, create_decoder, reduced_size, sample_crop
from imgtrain.data.embedded import default_data_home
from imgtrain.data.folder import collate
from imgtrain.data.shards.prepare import PrepareSettings, prepare
from imgtrain.internals.dataloader import worker_pids

BENCH_VERSION = "bench-jpegs-v1"
SIMD = "+simd"  # variant suffix: run with --pillow-simd's Pillow
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ---------------------------------------------------------------------------------------------- data


def _random_photo(rng: np.random.Generator, photos: list[np.ndarray]) -> Image.Image:
    src = photos[rng.integers(len(photos))]
    h, w = src.shape[:2]
    # A random window of 35-100% of the photo's area with an aspect ratio of 3:4 .. 5:3 ...
    area = h * w * rng.uniform(0.35, 1.0)
    aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(5 / 3))))
    cw, ch = min(w, int(round(np.sqrt(area * aspect)))), min(h, int(round(np.sqrt(area / aspect))))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    img = Image.fromarray(src[top : top + ch, left : left + cw])
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    # ... scaled so that the longer side follows ImageNet's spread: most ImageNet photos are 500 px on
    # their longer side, the rest smaller (mean about 400x350).
    long_side = 500 if rng.random() < 0.6 else int(rng.integers(250, 500))
    s = long_side / max(img.size)
    img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BICUBIC)
    arr = np.asarray(img).astype(np.float32) * rng.uniform(0.8, 1.2)  # brightness, so files differ
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def ensure_bench_jpegs(images: int, classes: int = 8, seed: int = 0) -> Path:
    """The benchmark's JPEG tree (written once, atomically); regenerated when it holds fewer images. The
    val split (up to 8 per class) is there for the training benchmark (throughput.py needs one)."""
    val_per_class = min(8, max(1, images // classes // 10))
    root = default_data_home() / BENCH_VERSION
    n_train = len(list((root / "train").rglob("*.jpg"))) if (root / "train").is_dir() else 0
    if n_train >= images:
        return root
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)
    rng = np.random.default_rng(seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bench-jpegs-", dir=root.parent))
    try:
        for split, per_class in (("train", -(-images // classes)), ("val", val_per_class)):
            for c in range(classes):
                d = tmp / split / f"class_{c}"
                d.mkdir(parents=True)
                for i in range(per_class):
                    _random_photo(rng, photos).save(d / f"{i:05d}.jpg", quality=90)
        shutil.rmtree(root, ignore_errors=True)
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_shards(root: Path, max_side: int) -> Path:
    """``imgtrain prepare root <root>-shards<max_side> --max-side max_side`` (quality 90; resumable, so a
    rerun only verifies the shards)."""
    out = root.parent / f"{root.name}-shards{max_side}"
    settings = PrepareSettings(max_side=max_side, quality=90, samples_per_shard=500)
    prepare(root, str(out), settings, workers=min(2, os.cpu_count() or 1), progress=False)
    return out


# ---------------------------------------------------------------------------------------------- variants


def reference_dataset(root: Path, size: int):
    import torchvision
    from torchvision import transforms as T

    # torchvision/references/classification/presets.py, ClassificationPresetTrain with its defaults.
    preset = T.Compose(
        [
            T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.RandomHorizontalFlip(0.5),
            T.PILToTensor(),
            T.ConvertImageDtype(torch.float),
            T.Normalize(mean=MEAN, std=STD),
        ]
    )
    return torchvision.datasets.ImageFolder(str(root / "train"), transform=preset)


def make_loader(variant: str, roots: dict[str, Path], args, workers: int, epoch: int):
    """A DataLoader for the variant; every variant draws its images at random from the whole set."""
    kind, _, decoder = variant.removesuffix(SIMD).partition("-")
    if kind == "reference":
        ds = reference_dataset(roots["original"], args.size)
        g = torch.Generator().manual_seed(epoch)
        sampler = torch.utils.data.RandomSampler(ds, num_samples=args.images, generator=g)
        kw = {"prefetch_factor": 4} if workers else {}
        return torch.utils.data.DataLoader(
            ds, batch_size=args.batch, sampler=sampler, num_workers=workers, **kw
        )
    # imgtrain's own loader path, exactly as the trainer builds it (dataset, batch sampler, collate).
    cfg = DataConfig(
        root=str(roots["original" if kind == "folder" else kind]),
        format="folder" if kind == "folder" else "shards",
        image_size=args.size,
        decode=DecodeConfig(decoder=decoder),
        workers=workers,
        prefetch_factor=4,
        pin_memory=False,
        persistent_workers=False,
    )
    bundle = build_data(cfg, args.batch, 0, 1, seed=0, device=torch.device("cpu"))
    bundle.train_sampler.state.epoch = epoch
    return bundle.train_loader


def measure(variant: str, roots: dict[str, Path], args, workers: int, epoch: int) -> tuple[float, float]:
    """(images/s per worker, images per CPU-second of the workers). A ``+simd`` variant runs in a fresh
    process with pillow-simd first on its path (the other variants, the reference included, keep the
    environment's Pillow)."""
    if not variant.endswith(SIMD):
        wall, cpu = time_loader(make_loader(variant, roots, args, workers, epoch), args.images)
        return wall / workers, cpu
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(args.pillow_simd), os.environ.get("PYTHONPATH")])),
    )
    cmd = [sys.executable, __file__, *args.argv, "--one", variant, str(workers), str(epoch)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-3000:]}")
    wall, cpu = out.stdout.strip().splitlines()[-1].split()
    return float(wall), float(cpu)


def _workers_cpu_s(it) -> float:
    """CPU seconds used so far by the iterator's worker processes (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in worker_pids(it):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def time_loader(loader, images: int, warmup_batches: int = 1) -> tuple[float, float]:
    """(images/s, images per CPU-second of the loader workers), over the batches after the first
    ``warmup_batches`` (worker start-up and the first reads of each shard's tar headers excluded), until
    ``images`` images (warm-up included) were loaded. The CPU rate is what a worker costs per image, much
    less sensitive to other load on the machine than the wall clock (not to cache and core sharing)."""
    it = iter(loader)
    seen = 0
    for _ in range(warmup_batches):
        seen += len(next(it)[1])
    n, t0, cpu0 = 0, time.perf_counter(), _workers_cpu_s(it)
    for batch in it:
        n += len(batch[1])
        if seen + n >= images:
            break
    rate, cpu = n / (time.perf_counter() - t0), _workers_cpu_s(it) - cpu0
    del it  # shuts the workers down before the next variant starts
    return rate, n / max(cpu, 1e-9)


# ---------------------------------------------------------------------------------------------- micro


def micro(root: Path, files: int, size: int, batch: int) -> dict[str, dict]:
    """Per-image CPU microseconds of each step of a training sample, in this process (one thread): the
    reference's parts, each decoder's decode, and for each decoder the steps of imgtrain's fused path
    (crop draw, decode, crop + resize, flip, tensor conversion) and the collate."""
    import cv2
    from torchvision.transforms.v2 import functional as TF

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    paths = sorted((root / "train").rglob("*.jpg"))
    paths = paths[:: max(1, len(paths) // files)][:files]
    datas = [p.read_bytes() for p in paths]
    g = torch.Generator().manual_seed(0)
    decoders = {n: create_decoder(n) for n in DECODERS}
    sizes = [decoders["pil"].size(d) for d in datas]
    crops = [sample_crop(h, w, (0.08, 1.0), generator=g) for h, w in sizes]
    full = [reduced_size(h, w, c, size, size) is None for (h, w), c in zip(sizes, crops, strict=True)]
    pils = [decoders["pil"].decode(d) for d in datas]
    ops: dict[str, tuple] = {
        "reference: PIL decode": (lambda d: decoders["pil"].decode(d), datas),
        "reference: PIL crop + bilinear resize": (
            lambda pb: TF.resized_crop(pb[0], pb[1].top, pb[1].left, pb[1].height, pb[1].width, [size, size]),
            list(zip(pils, crops, strict=True)),
        ),
        "reference: PILToTensor + float + Normalize": (
            lambda im: TF.normalize(TF.pil_to_tensor(im).float().div_(255), MEAN, STD),
            [TF.resize(im, [size, size]) for im in pils],
        ),
        "crop window draw (sample_crop + flip draw)": (
            lambda hw: (sample_crop(hw[0], hw[1], (0.08, 1.0)), torch.rand(1).item()),
            sizes,
        ),
    }
    for n, dec in decoders.items():
        imgs = [dec.decode(d) for d in datas]
        sized = [dec.crop_resize(i, c, size, size) for i, c in zip(imgs, crops, strict=True)]
        # what a full-size crop needs decoded: the whole image, or only the window (libjpeg_roi)
        ops[f"{n}: decode"] = (
            lambda dc, dec=dec: dec.decode_region(dc[0], dc[1]),
            [(d, c) for d, c, f in zip(datas, crops, full, strict=True) if f],
        )
        # only the crops a full-size decode serves (others take the DCT-scaled path)
        ops[f"{n}: crop + resize"] = (
            lambda ic, dec=dec: dec.crop_resize(ic[0], ic[1], size, size),
            [(i, c) for i, c, f in zip(imgs, crops, full, strict=True) if f],
        )
        ops[f"{n}: flip"] = (lambda i, dec=dec: dec.hflip(i), sized)
        ops[f"{n}: to uint8 CHW tensor"] = (lambda i, dec=dec: dec.to_tensor(i), sized)
    samples = [(torch.zeros(3, size, size, dtype=torch.uint8), 0, 1.0, "")] * batch
    ops["collate (per image)"] = (lambda _: collate(samples), [None] * max(1, files // batch))
    out = {}
    for name, (fn, inputs) in ops.items():
        scale = batch if name.startswith("collate") else 1
        times = []
        for _ in range(3):
            t0 = time.process_time()
            for x in inputs:
                fn(x)
            times.append((time.process_time() - t0) / len(inputs) / scale * 1e6)
        out[name] = stats(times)
        print(f"  {name:<48} {out[name]['median']:8.0f} us/image", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--images", type=int, default=1000, help="images per measurement")
    p.add_argument("--generate", type=int, default=3000, help="JPEGs in the benchmark set")
    p.add_argument("--size", type=int, default=224, help="training crop size")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    p.add_argument(
        "--decoders",
        nargs="+",
        default=["libjpeg_roi", "simplejpeg_fast", "simplejpeg_pillow"],
        choices=list(DECODERS),
        help="data.decode.decoder values for the folder rows",
    )
    p.add_argument(
        "--max-sides", type=int, nargs="*", default=[320, 256], help="imgtrain prepare --max-side values"
    )
    p.add_argument(
        "--shard-decoders",
        nargs="+",
        default=["libjpeg_roi", "simplejpeg_fast", "simplejpeg_pillow"],
        choices=list(DECODERS),
        help="data.decode.decoder values for the shard rows",
    )
    p.add_argument(
        "--pillow-simd",
        type=Path,
        default=None,
        help="a folder with pillow-simd (scripts/install_pillow_simd.sh): adds +simd rows (the reference and "
        "the simplejpeg_pillow rows), each run in a process that imports Pillow from there",
    )
    p.add_argument("--one", nargs=3, default=None, help=argparse.SUPPRESS)  # VARIANT WORKERS EPOCH (internal)
    p.add_argument("--micro", action="store_true", help="also time each step of a sample alone")
    p.add_argument("--micro-files", type=int, default=200)
    p.add_argument(
        "--train-ratio",
        action="store_true",
        help="also run benchmarks/throughput.py (ResNet-18, 64 px) on the set for two decoders",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the result here instead of the record (results/input_pipeline/latest.json)",
    )
    args = p.parse_args(argv)
    args.generate = max(args.generate, args.images)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    return args


def pillow_version() -> str:
    from PIL import __version__

    try:
        return f"pillow-simd {importlib.metadata.version('pillow-simd')} (imported: {__version__})"
    except importlib.metadata.PackageNotFoundError:
        return f"pillow {__version__}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    roots = {"original": ensure_bench_jpegs(args.generate)}
    for m in args.max_sides:
        roots[f"shards{m}"] = ensure_shards(roots["original"], m)
    if args.one:  # one measurement, for measure() in the parent process
        variant, workers, epoch = args.one[0], int(args.one[1]), int(args.one[2])
        wall, cpu = time_loader(make_loader(variant, roots, args, workers, epoch), args.images)
        print(wall / workers, cpu)
        return {}
    sizes = [Image.open(p).size for p in sorted((roots["original"] / "train").rglob("*.jpg"))[:500]]
    mean_w, mean_h = (float(np.mean([s[i] for s in sizes])) for i in (0, 1))
    print(
        f"data: {roots['original']} ({args.generate} train JPEGs, mean {mean_w:.0f}x{mean_h:.0f} over the "
        f"first 500; shards ready in {time.perf_counter() - t0:.1f}s); {pillow_version()}",
        flush=True,
    )

    variants = ["reference"] + [f"folder-{d}" for d in args.decoders]
    variants += [f"shards{m}-{d}" for m in args.max_sides for d in args.shard_decoders]
    if args.pillow_simd:
        simd = ["reference", "folder-simplejpeg_pillow"] + [
            f"shards{m}-simplejpeg_pillow" for m in args.max_sides
        ]
        variants += [v + SIMD for v in simd]
    result: dict = {
        "benchmark": "input_pipeline",
        "command": command_line(),
        "machine": machine_info(),
        "pillow": pillow_version(),
        "pillow_simd": str(args.pillow_simd) if args.pillow_simd else None,
        "load_average_start": os.getloadavg(),
        "data": {k: str(v) for k, v in roots.items()},
        "mean_size_wh": [mean_w, mean_h],
        "unit": "images/s per worker",
        "settings": vars(args) | {"out": str(args.out), "pillow_simd": str(args.pillow_simd or "")},
    }
    if args.micro:
        print("\nper-image cost, one thread, in this process:")
        result["micro_us_per_image"] = micro(roots["original"], args.micro_files, args.size, args.batch)

    per_workers: dict = {}
    for w in args.workers:
        print(f"\n{w} worker(s), {args.images} images per measurement, batch {args.batch}:", flush=True)
        rounds = []
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            row = {v: measure(v, roots, args, w, r) for v in order}
            rounds.append(row)
            print(
                f"  round {r + 1} (img/s per worker | img per worker CPU-second): "
                + ", ".join(f"{v} {row[v][0]:.0f} | {row[v][1]:.0f}" for v in variants),
                flush=True,
            )
        table = {}
        for v in variants:
            ratios = [row[v][0] / row["reference"][0] for row in rounds]
            cpu_ratios = [row[v][1] / row["reference"][1] for row in rounds]
            table[v] = {
                "images_per_s_per_worker": stats([row[v][0] for row in rounds]),
                "ratio_vs_reference": statistics.median(ratios),
                "ratio_samples": ratios,
                "images_per_worker_cpu_s": stats([row[v][1] for row in rounds]),
                "cpu_ratio_vs_reference": statistics.median(cpu_ratios),
                "cpu_ratio_samples": cpu_ratios,
            }
        per_workers[str(w)] = table
        print(
            f"\n{'variant':<34}{'img/s/worker':>13}{'min':>6}{'max':>6}{'ratio':>7}  {'img/CPU-s':>10}"
            f"{'min':>6}{'max':>6}{'ratio':>7}   (ratio: median of per-round ratios to the reference)"
        )
        for v in variants:
            s, c = table[v]["images_per_s_per_worker"], table[v]["images_per_worker_cpu_s"]
            print(
                f"{v:<34}{s['median']:>13.0f}{s['min']:>6.0f}{s['max']:>6.0f}"
                f"{table[v]['ratio_vs_reference']:>6.2f}x  {c['median']:>10.0f}{c['min']:>6.0f}{c['max']:>6.0f}"
                f"{table[v]['cpu_ratio_vs_reference']:>6.2f}x"
            )
    result["workers"] = per_workers

    if args.train_ratio:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import throughput

        result["train_ratio"] = {}
        for dec in ("pil", args.decoders[0]):
            print(f"\ndata-efficiency ratio, data.decode.decoder={dec}:", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                r = throughput.main(
                    [
                        "--model",
                        "resnet18",
                        "--batch",
                        "32",
                        "--image-size",
                        "64",
                        "--steps",
                        "4",
                        "--warmup",
                        "1",
                        "--rounds",
                        "3",
                        "--workers",
                        "2",
                        "--threads",
                        "1",
                        "--data-root",
                        str(roots["original"]),
                        "--no-loader-only",
                        "--override",
                        f"data.decode.decoder={dec}",
                        "--out",
                        f"{tmp}/t.json",
                    ]
                )
            result["train_ratio"][dec] = {
                "ratio_real_over_synthetic": r["ratio_real_over_synthetic"],
                "real": r["real"],
                "synthetic": r["synthetic"],
            }
    result["load_average_end"] = os.getloadavg()
    record("input_pipeline", result, args.out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
