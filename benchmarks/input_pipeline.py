"""Decode + augment images/s per loader worker: torchvision's reference pipeline against imgtrain's decoders.

The data: a few thousand JPEGs cut and scaled from scikit-learn's two sample photographs (random crops,
flips, brightness, sizes with ImageNet's spread: long side up to 500 px, about 400x350 on average), quality
90, in ImageFolder layout, written once under ~/.cache/imgtrain/bench-jpegs-v1 (or $IMGTRAIN_DATA_HOME).

Variants, all producing the 224 px training sample (RandomResizedCrop + horizontal flip), side by side:

* ``reference``: ``torchvision.datasets.ImageFolder`` with its default (PIL) loader and the classification
  reference's train preset (RandomResizedCrop, flip, PILToTensor, float, Normalize in the worker);
* ``imgtrain-<decoder>``: imgtrain's ImageFolder dataset with each ``data.decoder`` (uint8 out);
* ``max320-<decoder>`` / ``max256-<decoder>``: the same on copies re-encoded (PIL, quality 90) to a longer
  side of at most 320 / 256 px, the effect ``imgtrain prepare --max-side`` has;
* ``shards-<decoder>`` (with ``--shards DIR``): WebDataset tar shards read with ``webdataset`` and
  decoded by imgtrain's decoder.

Each variant runs a DataLoader over ``--images`` images with 1 and with 2 worker processes (one torch/OpenCV
thread each); images/s is divided by the worker count. Variants alternate in rounds; medians are reported
with the ratio to the reference measured in the same round. ``--micro`` adds per-image timings of decode and
resize alone, in this process. ``--train-ratio`` adds the data-efficiency ratio (real-data over synthetic
training throughput, ResNet-18 at 64 px) from benchmarks/throughput.py for two decoders.

    python benchmarks/input_pipeline.py --images 1000 --rounds 3 --micro --train-ratio
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import command_line, default_out, machine_info, stats, write_result
from PIL import Image

from imgtrain.config import DataConfig
from imgtrain.data.decode import DECODERS, create_decoder, decode_train, sample_crop
from imgtrain.data.embedded import default_data_home
from imgtrain.data.folder import ImageFolderDataset, SampleRef, collate, scan_classes
from imgtrain.data.transforms import TrainTransform

BENCH_VERSION = "bench-jpegs-v1"
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


def ensure_reencoded(root: Path, max_side: int) -> Path:
    """A copy of ``root`` with every image re-encoded (PIL, quality 90) to a longer side <= max_side."""
    out = root.parent / f"{root.name}-max{max_side}"
    src_files = sorted(root.rglob("*.jpg"))
    if out.is_dir() and len(list(out.rglob("*.jpg"))) == len(src_files):
        return out
    tmp = Path(tempfile.mkdtemp(prefix=f".max{max_side}-", dir=root.parent))
    try:
        for f in src_files:
            dst = tmp / f.relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(f) as im:
                im = im.convert("RGB")
                s = max_side / max(im.size)
                if s < 1:
                    im = im.resize(
                        (round(im.width * s), round(im.height * s)), Image.BICUBIC, reducing_gap=3.0
                    )
                im.save(dst, quality=90)
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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


class _Refs(torch.utils.data.Sampler):
    def __init__(self, n: int, epoch: int):
        self.n, self.epoch = n, epoch

    def __iter__(self):
        return (SampleRef(i, 1.0, self.epoch) for i in range(self.n))

    def __len__(self) -> int:
        return self.n


def imgtrain_dataset(root: Path, size: int, decoder: str) -> ImageFolderDataset:
    cfg = DataConfig(root=str(root), image_size=size, decoder=decoder)
    classes = scan_classes(root / "train")
    return ImageFolderDataset(root / "train", classes, TrainTransform(cfg), seed=0, image_size=size)


class ShardSamples(torch.utils.data.IterableDataset):
    """WebDataset shards -> imgtrain's fused decode on the raw image bytes of each member."""

    def __init__(self, shard_dir: Path, size: int, decoder: str, limit: int):
        self.urls = [str(p) for p in sorted(Path(shard_dir).rglob("*.tar"))]
        if not self.urls:
            raise SystemExit(f"--shards {shard_dir}: no .tar shards found")
        self.size, self.decoder_name, self.limit = size, decoder, limit

    def __iter__(self):
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        dec = create_decoder(self.decoder_name)
        g = torch.Generator().manual_seed(wid)
        ds = wds.WebDataset(self.urls, shardshuffle=False, nodesplitter=None, workersplitter=None)
        for i, sample in enumerate(ds):
            if i >= self.limit:
                return
            if i % nw != wid:
                continue
            key = next(k for k in ("jpg", "jpeg", "png", "webp") if k in sample)
            yield decode_train(sample[key], dec, self.size, (0.08, 1.0), 0.5, generator=g), 0, 1.0, ""


def make_loader(variant: str, roots: dict[str, Path], args, workers: int, epoch: int):
    kind, _, decoder = variant.partition("-")
    n = args.images
    common = {"batch_size": args.batch, "num_workers": workers}
    if workers:
        common["prefetch_factor"] = 4
    if kind == "reference":
        ds = torch.utils.data.Subset(reference_dataset(roots["original"], args.size), range(n))
        g = torch.Generator().manual_seed(epoch)
        return torch.utils.data.DataLoader(ds, shuffle=True, generator=g, **common)
    if kind == "shards":
        return torch.utils.data.DataLoader(
            ShardSamples(args.shards, args.size, decoder, n), collate_fn=collate, **common
        )
    ds = imgtrain_dataset(roots["original" if kind == "imgtrain" else kind], args.size, decoder)
    return torch.utils.data.DataLoader(
        ds, sampler=_Refs(min(n, len(ds)), epoch), collate_fn=collate, **common
    )


def time_loader(loader, warmup_batches: int = 1) -> float:
    """images/s over the batches after the first ``warmup_batches`` (worker start-up excluded)."""
    it = iter(loader)
    for _ in range(warmup_batches):
        next(it)
    images, t0 = 0, time.perf_counter()
    for batch in it:
        images += len(batch[1])
    return images / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- micro


def micro(root: Path, files: int, size: int) -> dict[str, dict]:
    """Per-image microseconds of the parts, in this process (one thread)."""
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    paths = sorted((root / "train").rglob("*.jpg"))[:files]
    datas = [p.read_bytes() for p in paths]
    g = torch.Generator().manual_seed(0)
    crops = []
    for d in datas:
        with Image.open(io.BytesIO(d)) as im:
            crops.append(sample_crop(im.height, im.width, (0.08, 1.0), generator=g))
    decoders = {n: create_decoder(n) for n in DECODERS}
    arrays = [decoders["simplejpeg"].decode(d) for d in datas]
    pils = [Image.fromarray(a) for a in arrays]
    tensors = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]
    from torchvision.transforms.v2 import functional as TF

    ops = {
        **{f"decode {n}": (lambda d, dec=dec: dec.decode(d), datas) for n, dec in decoders.items()},
        "resize crop cv2 INTER_AREA/LINEAR (imgtrain)": (
            lambda ab: decoders["simplejpeg"].resize(decoders["simplejpeg"].crop(ab[0], ab[1]), size, size),
            list(zip(arrays, crops, strict=True)),
        ),
        "resize crop PIL bilinear": (
            lambda pb: pb[0].resize(
                (size, size),
                Image.BILINEAR,
                box=(pb[1].left, pb[1].top, pb[1].left + pb[1].width, pb[1].top + pb[1].height),
            ),
            list(zip(pils, crops, strict=True)),
        ),
        "resize crop torch uint8 antialias": (
            lambda tb: TF.resized_crop(
                tb[0], tb[1].top, tb[1].left, tb[1].height, tb[1].width, [size, size], antialias=True
            ),
            list(zip(tensors, crops, strict=True)),
        ),
        "float + Normalize (reference, in worker)": (
            lambda t: TF.normalize(t[:, :size, :size].float().div_(255), MEAN, STD),
            tensors,
        ),
    }
    out = {}
    for name, (fn, inputs) in ops.items():
        samples = []
        for _ in range(3):
            t0 = time.perf_counter()
            for x in inputs:
                fn(x)
            samples.append((time.perf_counter() - t0) / len(inputs) * 1e6)
        out[name] = stats(samples)
        print(f"  {name:<48} {out[name]['median']:8.0f} us/image", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--images", type=int, default=1000, help="images per measurement (and to generate)")
    p.add_argument("--generate", type=int, default=3000, help="JPEGs in the benchmark set")
    p.add_argument("--size", type=int, default=224, help="training crop size")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure")
    p.add_argument("--decoders", nargs="+", default=list(DECODERS), choices=list(DECODERS))
    p.add_argument(
        "--max-sides",
        type=int,
        nargs="*",
        default=[320, 256],
        help="re-encoded copies to measure (with --smaller-decoders)",
    )
    p.add_argument("--smaller-decoders", nargs="+", default=["simplejpeg"], choices=list(DECODERS))
    p.add_argument("--shards", type=Path, default=None, help="a folder of WebDataset .tar shards to read too")
    p.add_argument("--micro", action="store_true", help="also time decode and resize alone")
    p.add_argument("--micro-files", type=int, default=200)
    p.add_argument(
        "--train-ratio",
        action="store_true",
        help="also run benchmarks/throughput.py (ResNet-18, 64 px) on the set for two decoders",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    p.add_argument("--out", type=Path, default=default_out("input_pipeline"))
    args = p.parse_args(argv)
    args.generate = max(args.generate, args.images)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    roots = {"original": ensure_bench_jpegs(args.generate)}
    for m in args.max_sides:
        roots[f"max{m}"] = ensure_reencoded(roots["original"], m)
    sizes = [Image.open(p).size for p in sorted((roots["original"] / "train").rglob("*.jpg"))[:500]]
    mean_w, mean_h = (float(np.mean([s[i] for s in sizes])) for i in (0, 1))
    print(
        f"data: {roots['original']} ({args.generate} train JPEGs, mean {mean_w:.0f}x{mean_h:.0f} over the "
        f"first 500; ready in {time.perf_counter() - t0:.1f}s)",
        flush=True,
    )

    variants = ["reference"] + [f"imgtrain-{d}" for d in args.decoders]
    variants += [f"max{m}-{d}" for m in args.max_sides for d in args.smaller_decoders]
    if args.shards:
        variants += [f"shards-{d}" for d in args.smaller_decoders]
    result: dict = {
        "benchmark": "input_pipeline",
        "command": command_line(),
        "machine": machine_info(),
        "load_average_start": os.getloadavg(),
        "data": {k: str(v) for k, v in roots.items()},
        "mean_size_wh": [mean_w, mean_h],
        "unit": "images/s per worker",
        "settings": vars(args) | {"shards": str(args.shards) if args.shards else None, "out": str(args.out)},
    }
    if args.micro:
        print("\nper-image cost, one thread, in this process:")
        result["micro_us_per_image"] = micro(roots["original"], args.micro_files, args.size)

    per_workers: dict = {}
    for w in args.workers:
        print(f"\n{w} worker(s), {args.images} images per measurement, batch {args.batch}:", flush=True)
        rounds = []
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            row = {v: time_loader(make_loader(v, roots, args, w, r)) / w for v in order}
            rounds.append(row)
            print(f"  round {r + 1}: " + ", ".join(f"{v} {row[v]:.0f}" for v in variants), flush=True)
        table = {}
        for v in variants:
            s = stats([row[v] for row in rounds])
            ratios = [row[v] / row["reference"] for row in rounds]
            table[v] = {
                "images_per_s_per_worker": s,
                "ratio_vs_reference": statistics.median(ratios),
                "ratio_samples": ratios,
            }
        per_workers[str(w)] = table
        print(
            f"\n{'variant':<24}{'median':>9}{'min':>8}{'max':>8}  img/s/worker   vs reference (median of "
            "per-round ratios)"
        )
        for v in variants:
            s = table[v]["images_per_s_per_worker"]
            print(
                f"{v:<24}{s['median']:>9.0f}{s['min']:>8.0f}{s['max']:>8.0f}  {'':<13}"
                f"{table[v]['ratio_vs_reference']:.2f}x"
            )
    result["workers"] = per_workers

    if args.train_ratio:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import throughput

        result["train_ratio"] = {}
        for dec in ("pil", args.smaller_decoders[0]):
            print(f"\ndata-efficiency ratio, data.decoder={dec}:", flush=True)
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
                        f"data.decoder={dec}",
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
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
