"""One rank of benchmarks/scaling.py's job (started by torchrun inside an emulated host's namespace).

For each link rate and each compression method it sets up an imgtrain ``Trainer`` as ``imgtrain train``
does (DDP over Gloo, the method's communication hook from the config) and times ``Trainer.train_step``
on synthetic in-memory batches:

* ``step_s``: a normal step (forward, backward with DDP's bucketed all-reduce or the hook, optimizer);
* ``compute_s``: the same step inside ``model.no_sync()`` (no gradient communication at all), measured in
  the same job, so it carries the same CPU time-sharing as the normal step;
* exposed communication = ``step_s - compute_s``: the communication (plus the hook's encoding work) that
  backward did not hide;
* ``wire_bytes_per_step``: what this rank's network interface really sent per step (kernel counters);
* once per link: ``dist.all_reduce`` of one flat fp32 (and fp16) tensor of the gradient's size, next to
  the ring bound 2(N-1)/N x bytes / link rate.

Rank 0 changes the link rate between phases (all ranks wait at a barrier) and writes the result JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from bench_common import synthetic_batches
from netem import tbf_args

from imgtrain.config import DistributedConfig, load_config
from imgtrain.train.trainer import Trainer

# Per method: the config that turns it on, with compression active from the third step (PowerSGD needs
# two uncompressed steps while DDP rebuilds its buckets) so that the timed steps are compressed.
METHODS = {
    "none": [],
    "fp16": ["distributed.compression=fp16"],
    "bf16": ["distributed.compression=bf16"],
    "powersgd": [
        "distributed.compression=powersgd",
        "distributed.powersgd.rank=1",
        "distributed.powersgd.start_iter=2",
    ],
    "onebit": ["distributed.compression=onebit", "distributed.onebit.warmup_steps=2"],
}
COMPRESSION_WARMUP = 2


def available_methods() -> list[str]:
    """``none`` always; the others once DistributedConfig has a ``compression`` key (issue 6a)."""
    if "compression" not in DistributedConfig.__dataclass_fields__:
        return ["none"]
    return list(METHODS)


def tx_bytes(ifname: str) -> int:
    return int(Path(f"/sys/class/net/{ifname}/statistics/tx_bytes").read_text())


def set_link_rate(net: dict, rate_mbit: float) -> None:
    """Reshape both ends of every link (netem.StarNetwork.set_rate, from the network's description)."""
    for i, h in enumerate(net["hosts"]):
        for ns, dev in ((h["netns"], h["ifname"]), (net["switch"], f"p{i}")):
            cmd = ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *tbf_args(rate_mbit)]
            subprocess.run(cmd, check=True, capture_output=True)


def timed_steps(trainer: Trainer, batches: list, n: int, sync: bool) -> list[float]:
    out = []
    for i in range(n):
        batch = batches[i % len(batches)]
        dist.barrier()
        t0 = time.perf_counter()
        if sync:
            trainer.train_step([batch], [len(batch[1]) * trainer.info.world_size])
        else:
            with trainer.model.no_sync():
                trainer.train_step([batch], [len(batch[1]) * trainer.info.world_size])
        out.append(time.perf_counter() - t0)
    return out


def time_allreduce(numel: int, dtype: torch.dtype, repeats: int) -> list[float]:
    t = torch.ones(numel, dtype=dtype)
    dist.all_reduce(t)  # connections up, buffers allocated
    out = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        out.append(time.perf_counter() - t0)
    return out


def gather_max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def gather_sum(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--spec", required=True, help="JSON written by scaling.py")
    args = p.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    ifname = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    net = spec["net"]
    base = [
        f"model.name={spec['model']}",
        f"data.image_size={spec['image_size']}",
        f"data.val_resize={spec['image_size']}",
        f"training.batch_size={spec['batch']}",
        "data.workers=0",
        "checkpoint.resume=never",
        "training.progress_bar=false",
        "training.epochs=1000",
        "training.warmup_epochs=0",
        "training.base_lr=0.01",
        "distributed.timeout=600",
        "fault_tolerance.hang_timeout=null",
        *spec.get("overrides", []),
    ]
    results = []
    rank = 0
    for rate in spec["links"]:
        per_link: dict = {"link_mbit": rate, "methods": {}}
        for method in spec["methods"]:
            cfg = load_config(None, [*base, *METHODS[method], f"output_dir={spec['out_dir']}/{method}"])
            trainer = Trainer(cfg).setup()
            logging.getLogger().setLevel(logging.WARNING)
            info = trainer.info
            rank = info.rank
            if rank == 0 and rate and net.get("emulated") and net.get("switch"):
                set_link_rate(net, rate)
            dist.barrier()
            batches = synthetic_batches(2, spec["batch"], spec["image_size"], trainer.data.num_classes)
            warm = spec["warmup"] + COMPRESSION_WARMUP
            timed_steps(trainer, batches, warm, sync=True)
            comp = getattr(trainer, "compression", None)  # the hook's own byte count (issue 6a)
            if comp is not None:
                comp.take_bytes(warm)  # drop the warm-up's counts
            b0 = tx_bytes(ifname)
            step = timed_steps(trainer, batches, spec["steps"], sync=True)
            sent = tx_bytes(ifname) - b0
            counted = None
            if comp is not None:
                payload, wire = comp.take_bytes(spec["steps"])
                counted = {"payload": payload, "wire": wire}
            compute = timed_steps(trainer, batches, spec["compute_steps"], sync=False)
            step_s = gather_max(statistics.median(step))
            compute_s = gather_max(statistics.median(compute))
            per_link["methods"][method] = {
                "step_s": step_s,
                "compute_s": compute_s,
                "exposed_comm_s": max(0.0, step_s - compute_s),
                "images_per_s": spec["batch"] * info.world_size / step_s,
                "wire_bytes_per_step_per_rank": gather_sum(sent / spec["steps"]) / info.world_size,
                "hook_counted_bytes_per_step": counted,
                "step_samples_rank0": step,
                "compute_samples_rank0": compute,
            }
            if method == spec["methods"][0]:
                numel = sum(p.numel() for p in trainer.model_without_ddp.parameters() if p.requires_grad)
                per_link["grad_numel"] = numel
                if info.world_size > 1:
                    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
                        ar = time_allreduce(numel, dtype, spec["allreduce_repeats"])
                        per_link[f"allreduce_{name}_s"] = gather_max(statistics.median(ar))
            if rank == 0:
                m = per_link["methods"][method]
                print(
                    f"[{spec['model']} N={info.world_size} link={rate} Mbit/s] {method}: step "
                    f"{m['step_s']:.3f}s compute {m['compute_s']:.3f}s exposed {m['exposed_comm_s']:.3f}s "
                    f"wire {m['wire_bytes_per_step_per_rank'] / 1e6:.1f} MB/step/rank",
                    flush=True,
                )
            trainer.preemption.uninstall()
            trainer.checkpointer.close()
            trainer.metrics_processor.close()
            del trainer
        results.append(per_link)
    if rank == 0:
        Path(spec["result"]).write_text(
            json.dumps({"world_size": dist.get_world_size(), "links": results}, indent=1)
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
