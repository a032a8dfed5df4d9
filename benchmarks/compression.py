"""Gradient compression cost: the compute each method's DDP hook adds per step, and the bytes it sends.

The hooks are imgtrain's (``imgtrain.distributed.comm_hooks``), called as DDP calls them on a model's gradients
split into DDP-sized buckets (default 25 MB), in a one-process Gloo group: the collectives then move
nothing, so the time measured is the hook's own work (casts, residuals, sign packing, PowerSGD's
matrix products and orthogonalization, decoding) on one thread. For 1-bit, encoding (residual, scales,
packing) and decoding (unpacking and averaging ``--decode-ranks`` ranks' messages) are also timed
separately. Bytes are what each rank hands to the collectives per step.

    python benchmarks/compression.py --model resnet18 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist
import torchvision
from bench_common import command_line, machine_info, print_table, record, stats

from imgtrain.config import DistributedConfig, OneBitConfig, PowerSGDConfig
from imgtrain.distributed.comm_hooks import create_compression
from imgtrain.distributed.comm_hooks.fp16 import _cast_hook
from imgtrain.distributed.comm_hooks.onebit import _onebit_hook
from imgtrain.distributed.comm_hooks.powersgd import _powersgd_hook


class FakeBucket:
    """The part of DDP's GradBucket the hooks use, over a flat buffer holding ``params``' gradients."""

    def __init__(self, index: int, params: list[torch.nn.Parameter], last: bool):
        self._index, self._params, self._last = index, params, last
        self._buffer = torch.empty(sum(p.numel() for p in params))
        self._grads, off = [], 0
        for p in params:
            self._grads.append(self._buffer[off : off + p.numel()].view_as(p))
            off += p.numel()

    def buffer(self):
        return self._buffer

    def gradients(self):
        return self._grads

    def parameters(self):
        return self._params

    def index(self):
        return self._index

    def is_last(self):
        return self._last


def make_buckets(model: torch.nn.Module, cap_mb: float) -> list[FakeBucket]:
    # DDP fills buckets in reverse parameter order (the order gradients become ready in backward).
    params = [p for p in model.parameters() if p.requires_grad][::-1]
    groups, cur, size = [], [], 0
    for p in params:
        if cur and size + p.numel() * 4 > cap_mb * 2**20:
            groups.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += p.numel() * 4
    groups.append(cur)
    # Bucket 0 is the last one reduced in a step (DDP's convention, which the hooks rely on).
    return [FakeBucket(i, g, last=(i == 0)) for i, g in enumerate(groups)][::-1]


class _DDPStub(torch.nn.Module):
    """Stands in for the DDP module: the hooks are called directly, so registering is a no-op."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def register_comm_hook(self, state, hook):
        pass


HOOKS = {"fp16": _cast_hook, "bf16": _cast_hook, "powersgd": _powersgd_hook, "onebit": _onebit_hook}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18", help="torchvision model whose gradients are compressed")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--bucket-cap-mb", type=float, default=25.0)
    p.add_argument("--powersgd-ranks", type=int, nargs="+", default=[1, 4])
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--decode-ranks", type=int, default=2, help="ranks whose 1-bit messages are decoded")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--out",
        default=None,
        help="write the result here instead of the record (results/compression/latest.json)",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "0")
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    model = torchvision.models.get_model(args.model, weights=None, num_classes=args.num_classes)
    numel = sum(p.numel() for p in model.parameters())
    buckets = make_buckets(model, args.bucket_cap_mb)
    grads = [torch.randn(b.buffer().numel()) * 1e-3 for b in buckets]

    variants: list[tuple[str, DistributedConfig]] = [
        ("fp16", DistributedConfig(compression="fp16")),
        ("bf16", DistributedConfig(compression="bf16")),
    ]
    for r in args.powersgd_ranks:
        variants.append(
            (
                f"powersgd rank {r}",
                DistributedConfig(compression="powersgd", powersgd=PowerSGDConfig(rank=r, start_iter=2)),
            )
        )
    variants.append(
        (
            "onebit",
            DistributedConfig(
                compression="onebit", onebit=OneBitConfig(warmup_steps=0, chunk_size=args.chunk_size)
            ),
        )
    )

    comps = {}
    for label, cfg in variants:
        comp = create_compression(_DDPStub(model), cfg, world_size=1, backend="gloo")
        comps[label] = (comp, HOOKS[cfg.compression])

    def step(label: str) -> float:
        comp, hook = comps[label]
        for b, g in zip(buckets, grads, strict=True):
            b.buffer().copy_(g)
        t0 = time.perf_counter()
        for b in buckets:
            hook(comp, b).wait()
        return time.perf_counter() - t0

    for label in comps:  # warm-up (PowerSGD: past its 2 uncompressed steps, Q matrices allocated)
        for _ in range(3):
            step(label)
    samples: dict[str, list[float]] = {label: [] for label in comps}
    for _ in range(args.reps):
        for label in comps:  # alternate variants in rounds: drift of a shared machine hits all alike
            samples[label].append(step(label) * 1e3)

    # 1-bit encode and decode separately, as a rank of a job of --decode-ranks ranks would (every rank's
    # message is this one: the decoder's work does not depend on the bits).
    onebit = create_compression(
        _DDPStub(model),
        DistributedConfig(
            compression="onebit", onebit=OneBitConfig(warmup_steps=0, chunk_size=args.chunk_size)
        ),
        world_size=args.decode_ranks,
        backend="gloo",
    )
    flat = [b.gradients() for b in buckets]
    names = [[onebit.names[id(p)] for p in b.parameters()] for b in buckets]
    enc, dec = [], []
    for rep in range(args.reps + 1):  # the first round allocates the layouts: not timed
        for b, g in zip(buckets, grads, strict=True):
            b.buffer().copy_(g)
        t0 = time.perf_counter()
        msgs = [onebit.compress_bucket(g, n) for g, n in zip(flat, names, strict=True)]
        t1 = time.perf_counter()
        for m, lay in msgs:
            lay.gathered.copy_(m.expand(args.decode_ranks, -1))
        t2 = time.perf_counter()
        for (_, lay), g in zip(msgs, flat, strict=True):
            onebit.decompress_into(g, lay)
        t3 = time.perf_counter()
        if rep:
            enc.append((t1 - t0) * 1e3)
            dec.append((t3 - t2) * 1e3)
    dist.destroy_process_group()

    fp32 = numel * 4
    rows = []
    results = {}
    for label in comps:
        comp = comps[label][0]
        sent = comp.expected_bytes_per_step()
        s = stats(samples[label])
        results[label] = {"hook_ms": s, "bytes_per_step": sent, "fp32_over_bytes": fp32 / sent}
        rows.append((label, s, f"{sent / 1e6:8.3f} MB sent (1/{fp32 / sent:.1f} of fp32)"))
    print(
        f"{args.model}: {numel / 1e6:.2f} M gradients, {len(buckets)} buckets of <= {args.bucket_cap_mb} MB, "
        f"fp32 all-reduce payload {fp32 / 1e6:.2f} MB, {args.threads} thread(s)"
    )
    print_table("hook compute per step (world size 1: no bytes move)", "ms", rows)
    e, d = stats(enc), stats(dec)
    print_table(
        "1-bit parts",
        "ms",
        [("encode (residual, scales, pack)", e, ""), (f"decode {args.decode_ranks} ranks' messages", d, "")],
    )
    record(
        "compression",
        {
            "benchmark": "compression",
            "command": command_line(),
            "machine": machine_info(),
            "load_average": os.getloadavg(),
            "settings": vars(args),
            "numel": numel,
            "fp32_bytes": fp32,
            "buckets": len(buckets),
            "variants": results,
            "onebit_encode_ms": e,
            "onebit_decode_ms": d,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
