"""Weak scaling over an emulated cluster network: 1, 2 and 4 "nodes" (network namespaces on a shaped
bridge, benchmarks/netem.py), one torchrun agent per node forming one job by c10d rendezvous over those
links, one training process per node with one thread, a fixed per-process batch.

For each model, node count, link rate (1 and 2.5 Gbit/s by default) and gradient compression method it
reports (see benchmarks/scaling_worker.py for how each is measured): step time, images/s, scaling
efficiency against one process, the step's compute alone (``no_sync``) and the exposed communication,
the bytes each rank's interface sent per step, and the measured all-reduce of the gradient volume next
to the ring bound 2(N-1)/N x bytes / rate. One process has no traffic, so it runs once per model.

This machine has 2 cores: with 4 nodes, 4 single-threaded processes time-share them, so their compute
is about twice as slow and their scaling efficiency against one process says more about the CPU than the
network; the compute-alone split (measured in the same job) still isolates the communication. Latency
is not emulated (no sch_netem in this kernel). Needs root for the namespaces; without it every node is
on loopback (unshaped) and the results say so.

    python benchmarks/scaling.py --quick            # ResNet-18, 1 and 2 nodes, 1 Gbit/s (a few minutes)
    python benchmarks/scaling.py                    # ResNet-18 and -50, 1/2/4 nodes, 1 and 2.5 Gbit/s
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

from bench_common import command_line, machine_info, record  # noqa: E402
from netem import StarNetwork  # noqa: E402 (puts tests/integration on sys.path)
from scaling_worker import available_methods  # noqa: E402

from conftest import free_port  # noqa: E402
from elastic_nodes import Node, cleanup_pids, wait_for  # noqa: E402

WORKER = _HERE / "scaling_worker.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--models", default="resnet18,resnet50", help="comma-separated imgtrain model names")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=64, help="per-process batch (fixed: weak scaling)")
    p.add_argument("--nodes", default="1,2,4", help="comma-separated node counts (one process each)")
    p.add_argument("--links", default="1000,2500", help="comma-separated link rates in Mbit/s")
    p.add_argument("--methods", default=None, help="compression methods (default: all the config knows)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per method and link")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (after the compression warm-up)")
    p.add_argument("--compute-steps", type=int, default=2, help="no_sync steps per method and link")
    p.add_argument("--allreduce-repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="resnet18, 1 and 2 nodes, 1 Gbit/s, 3 steps")
    p.add_argument("--loopback", action="store_true", help="do not emulate a network (no root needed)")
    p.add_argument("--job-timeout", type=float, default=1800.0, help="seconds per torchrun job")
    p.add_argument("--extra", nargs="*", default=[], help="further imgtrain overrides for every job")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the result here instead of the record (results/scaling[_quick]/latest.json)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.nodes, args.links, args.steps = "resnet18", "1,2", "1000", 3
    args.models = args.models.split(",")
    args.nodes = [int(n) for n in args.nodes.split(",")]
    args.links = [float(x) for x in args.links.split(",")]
    known = available_methods()
    args.methods = args.methods.split(",") if args.methods else known
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        p.error(f"--methods {unknown}: this imgtrain knows {known}")
    args.name = "scaling_quick" if args.quick else "scaling"
    return args


def run_job(model: str, n: int, links: list[float], methods: list[str], args, tmp: Path) -> dict:
    """One torchrun job of ``n`` nodes on a fresh emulated network; returns rank 0's result."""
    with StarNetwork(n, rate_mbit=links[0] if n > 1 else None, loopback=args.loopback) as net:
        host0 = net.hosts[0]
        port = 29400 if net.emulated else free_port()
        job = tmp / f"{model}-n{n}"
        job.mkdir(parents=True, exist_ok=True)
        spec = {
            "model": model,
            "image_size": args.image_size,
            "batch": args.batch,
            "links": links,
            "methods": methods,
            "steps": args.steps,
            "warmup": args.warmup,
            "compute_steps": args.compute_steps,
            "allreduce_repeats": args.allreduce_repeats,
            "net": net.describe(),
            "out_dir": str(job / "runs"),
            "result": str(job / "result.json"),
            "overrides": args.extra,
        }
        (job / "spec.json").write_text(json.dumps(spec))
        nodes: list[Node] = []
        t0 = time.perf_counter()
        try:
            for i, h in enumerate(net.hosts):
                if i == 1:  # the others dial in once the first agent's rendezvous store listens
                    wait_for(lambda: net.listening(0, port), 300, "the rendezvous store", nodes)
                nodes.append(
                    Node(
                        f"node{i}",
                        f"{host0.addr}:{port}",
                        ["--spec", str(job / "spec.json")],
                        job,
                        nnodes=f"{n}:{n}",
                        netns=h.netns,
                        ifname=h.ifname,
                        max_restarts=0,
                        local_addr=h.addr,
                        is_host=i == 0,
                        entry=[str(WORKER)],
                    )
                )
            deadline = time.monotonic() + args.job_timeout
            for node in nodes:
                rc = node.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                if rc != 0:
                    raise RuntimeError(
                        f"{model} on {n} nodes: {node.name} exited {rc}\n{node.output()[-4000:]}"
                    )
        finally:
            cleanup_pids(nodes)
        result = json.loads((job / "result.json").read_text())
        result.update(model=model, nodes=n, network=net.describe(), job_seconds=time.perf_counter() - t0)
        return result


def ring_bound_s(nbytes: float, n: int, rate_mbit: float) -> float:
    return 2 * (n - 1) / n * nbytes * 8 / (rate_mbit * 1e6)


def summarize(jobs: list[dict], batch: int) -> list[dict]:
    """One row per (model, nodes, link, method), with efficiency against the model's 1-process step."""
    rows = []
    base = {j["model"]: j["links"][0]["methods"]["none"]["step_s"] for j in jobs if j["nodes"] == 1}
    for j in jobs:
        n = j["nodes"]
        for link in j["links"]:
            none = link["methods"].get("none")
            for method, m in link["methods"].items():
                t1 = base.get(j["model"])
                row = {
                    "model": j["model"],
                    "nodes": n,
                    "link_mbit": link["link_mbit"] if n > 1 else None,
                    "method": method,
                    "step_s": m["step_s"],
                    "compute_s": m["compute_s"],
                    "exposed_comm_s": m["exposed_comm_s"],
                    "images_per_s": m["images_per_s"],
                    "wire_MB_per_step_per_rank": m["wire_bytes_per_step_per_rank"] / 1e6,
                    "hook_counted_bytes_per_step": m.get("hook_counted_bytes_per_step"),
                }
                if t1:
                    row["scaling_efficiency"] = t1 / m["step_s"]  # = (N x b / t_N) / (N x b / t_1)
                    row["exposed_vs_1proc_s"] = m["step_s"] - t1
                if none and method != "none":
                    row["speedup_vs_none"] = none["step_s"] / m["step_s"]
                if n > 1 and "allreduce_fp32_s" in link:
                    fp32 = 4 * link["grad_numel"]
                    row.update(
                        allreduce_fp32_s=link["allreduce_fp32_s"],
                        allreduce_fp16_s=link["allreduce_fp16_s"],
                        ring_bound_fp32_s=ring_bound_s(fp32, n, link["link_mbit"]),
                        ring_bound_fp16_s=ring_bound_s(fp32 / 2, n, link["link_mbit"]),
                        grad_MB_fp32=fp32 / 1e6,
                    )
                rows.append(row)
    return rows


def print_rows(rows: list[dict]) -> None:
    hdr = (
        "| model | nodes | link Gbit/s | method | s/step | img/s | eff. vs 1 proc | compute s | exposed comm s "
        "| x vs none | wire MB/step/rank | all-reduce fp32 s (ring bound) |"
    )
    print("\n" + hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        ar = f"{r['allreduce_fp32_s']:.3f} ({r['ring_bound_fp32_s']:.3f})" if "allreduce_fp32_s" in r else "-"
        print(
            f"| {r['model']} | {r['nodes']} | {r['link_mbit'] / 1000 if r['link_mbit'] else '-'} | {r['method']} "
            f"| {r['step_s']:.3f} | {r['images_per_s']:.1f} | "
            f"{r.get('scaling_efficiency', float('nan')):.2f} | {r['compute_s']:.3f} | {r['exposed_comm_s']:.3f} "
            f"| {r.get('speedup_vs_none', 1.0):.2f} | {r['wire_MB_per_step_per_rank']:.1f} | {ar} |"
        )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    print(
        f"scaling: models {args.models}, nodes {args.nodes}, links {args.links} Mbit/s, methods "
        f"{args.methods}, batch {args.batch}/process at {args.image_size} px; load average "
        f"{os.getloadavg()}",
        flush=True,
    )
    load_before = os.getloadavg()
    jobs = []
    with tempfile.TemporaryDirectory(prefix="imgtrain-scaling-") as tmp:
        for model in args.models:
            for n in args.nodes:
                links = args.links if n > 1 else [0.0]
                methods = args.methods if n > 1 else ["none"]
                print(f"\n== {model}, {n} node(s) ==", flush=True)
                jobs.append(run_job(model, n, links, methods, args, Path(tmp)))
                # Written after every job, so that an interrupted run keeps what it measured.
                record(args.name, _result(args, jobs, load_before, partial=True), args.out, final=False)
    result = _result(args, jobs, load_before, partial=False)
    print_rows(result["rows"])
    record(args.name, result, args.out)
    return result


def _result(args, jobs: list[dict], load_before, partial: bool) -> dict:
    return {
        "benchmark": "scaling",
        "command": command_line(),
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "settings": {
            "models": args.models,
            "image_size": args.image_size,
            "batch_per_process": args.batch,
            "nodes": args.nodes,
            "links_mbit": args.links,
            "methods": args.methods,
            "steps": args.steps,
            "warmup": args.warmup,
            "compute_steps": args.compute_steps,
            "threads_per_process": 1,
            "extra_overrides": args.extra,
        },
        "notes": [
            "4 processes on a 2-core machine time-share the cores",
            "latency not emulated (no sch_netem); links are tbf-shaped veth pairs on one bridge",
        ],
        "partial": partial,
        "rows": summarize(jobs, args.batch),
        "jobs": jobs,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
