"""``powersgd``: torch's built-in PowerSGD hook and state, wrapped so that (a) it works on Gloo with several
buckets and (b) its state can be checkpointed by parameter name."""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects (dist.GradBucket).

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

from imgtrain.distributed.comm_hooks.base import Compression
from imgtrain.internals.powersgd import should_compress
from imgtrain.registry import COMPRESSION
from imgtrain.train.state import mt19937_from_plain, mt19937_to_plain


def _matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    # PowerSGD treats every gradient as a matrix: first dimension x the rest (conv: out x in*kh*kw).
    n = shape[0] if len(shape) else 1
    return n, math.prod(shape) // max(n, 1)


@dataclass
class _BucketLayout:
    """Where each parameter's gradient, P and Q live inside one bucket as torch's PowerSGD hook lays them
    out: compressed tensors grouped by matrix shape in first-appearance order (not batched), each group in
    bucket order. Recomputed here because the hook keeps only flat per-bucket tensors."""

    names: tuple[str, ...]
    grad: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (offset, numel) in the buffer
    q: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (offset, length) in Q memory
    numel: int = 0
    p_total: int = 0
    q_total: int = 0
    uncompressed: int = 0


def _layout(
    names: list[str], grads: list[torch.Tensor], buffer: torch.Tensor, state: psgd.PowerSGDState
) -> _BucketLayout:
    lay = _BucketLayout(tuple(names), numel=buffer.numel())
    base, size = buffer.data_ptr(), buffer.element_size()
    groups: dict[tuple[int, int], list[tuple[str, int]]] = defaultdict(list)
    for name, g in zip(names, grads, strict=True):
        lay.grad[name] = ((g.data_ptr() - base) // size, g.numel())
        n, m = _matrix_shape(g.shape)
        r = min(n, m, state.matrix_approximation_rank)
        if should_compress(n, m, r, state.min_compression_rate):
            groups[(n, m)].append((name, r))
        else:
            lay.uncompressed += g.numel()
    for (n, m), members in groups.items():
        for name, r in members:
            lay.q[name] = (lay.q_total, m * r)
            lay.p_total += n * r
            lay.q_total += m * r
    return lay


@COMPRESSION.register("powersgd")
class PowerSGDCompression(Compression):
    """torch's PowerSGD hook with its state from the config.

    On Gloo the built-in hook fails with more than one bucket: the all-reduces of P and Q are issued from
    future callbacks, which Gloo runs on its own threads, so two buckets' collectives reach the wire in a
    different order on each rank ("collective mismatch"). There each bucket's chain is completed inside
    the hook before it returns, which fixes the order (at the cost of overlap with backward). On NCCL the
    callbacks run in stream order and torch's overlapping path is used unchanged.
    """

    method = "powersgd"

    def __init__(self, *args):
        super().__init__(*args)
        c = self.cfg.powersgd
        self.state = psgd.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=c.rank,
            start_powerSGD_iter=c.start_iter,
            min_compression_rate=c.min_compression_rate,
            use_error_feedback=c.error_feedback,
            warm_start=c.warm_start,
            random_seed=0,
            compression_stats_logging_frequency=10**9,
        )
        self.blocking = self.backend != "nccl"
        self.layouts: dict[int, _BucketLayout] = {}  # bucket index -> layout the state there belongs to
        self.pending: dict[str, dict[str, torch.Tensor]] = {"error": {}, "q": {}}  # by parameter name

    def register(self, ddp_model: torch.nn.Module) -> None:
        ddp_model.register_comm_hook(self, _powersgd_hook)

    def expected_bytes_per_step(self) -> int:
        c = self.cfg.powersgd
        total = 0
        for _, p in self.params:
            n, m = _matrix_shape(p.shape)
            r = min(n, m, c.rank)
            total += (n + m) * r if should_compress(n, m, r, c.min_compression_rate) else p.numel()
        return total * 4

    def describe(self) -> str:
        c = self.cfg.powersgd
        return (
            f"powersgd: rank {c.rank}, from step {c.start_iter}, error feedback {c.error_feedback}, warm "
            f"start {c.warm_start}, {'bucket collectives completed in the hook (Gloo)' if self.blocking else 'overlapped (NCCL)'}"
        )

    # Bucket-indexed state <-> state by parameter name.

    def _to_pending(self) -> None:
        st = self.state
        for idx, lay in self.layouts.items():
            if idx in st.error_dict:
                err = st.error_dict[idx]
                for name, (off, n) in lay.grad.items():
                    self.pending["error"][name] = err[off : off + n].clone()
            if idx in st.q_memory_dict:
                q = st.q_memory_dict[idx]
                for name, (off, n) in lay.q.items():
                    self.pending["q"][name] = q[off : off + n].clone()
        st.error_dict.clear()
        st.p_memory_dict.clear()
        st.q_memory_dict.clear()
        self.layouts.clear()

    def _from_pending(self, idx: int, lay: _BucketLayout, buffer: torch.Tensor) -> None:
        st = self.state
        errs, qs = self.pending["error"], self.pending["q"]
        if any(n in errs for n in lay.names):
            err = torch.zeros(lay.numel, dtype=buffer.dtype, device=buffer.device)
            for name, (off, n) in lay.grad.items():
                if name in errs:
                    err[off : off + n].copy_(errs.pop(name))
            st.error_dict[idx] = err
        if lay.q and all(n in qs for n in lay.q):
            q = torch.empty(lay.q_total, dtype=buffer.dtype, device=buffer.device)
            for name, (off, n) in lay.q.items():
                q[off : off + n].copy_(qs.pop(name))
            st.q_memory_dict[idx] = q
            # P is recomputed from Q before it is read; its presence tells the hook Q is warm.
            st.p_memory_dict[idx] = torch.zeros(lay.p_total, dtype=buffer.dtype, device=buffer.device)

    def _place_state(self, bucket: dist.GradBucket) -> _BucketLayout:
        idx = bucket.index()
        names = tuple(self.names[id(p)] for p in bucket.parameters())
        lay = self.layouts.get(idx)
        if lay is None or lay.names != names:
            if lay is not None:  # DDP rebuilt its buckets: re-key all state by parameter first
                self._to_pending()
            lay = _layout(list(names), bucket.gradients(), bucket.buffer(), self.state)
            self._from_pending(idx, lay, bucket.buffer())
            self.layouts[idx] = lay
        return lay

    def state_dict(self) -> dict[str, Any]:
        st = self.state
        error = {k: v.clone() for k, v in self.pending["error"].items()}
        q = {k: v.clone() for k, v in self.pending["q"].items()}
        for idx, lay in self.layouts.items():
            if idx in st.error_dict:
                for name, (off, n) in lay.grad.items():
                    error[name] = st.error_dict[idx][off : off + n].clone()
            if idx in st.q_memory_dict:
                for name, (off, n) in lay.q.items():
                    q[name] = st.q_memory_dict[idx][off : off + n].clone()
        # PowerSGDState's own pickling carries a NumPy RandomState: store its numbers instead.
        return {"iter": int(st.iter), "error": error, "q": q, "rng": mt19937_to_plain(st.rng.get_state())}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        st = self.state
        st.iter = int(sd["iter"])
        st.rng.set_state(mt19937_from_plain(sd["rng"]))
        st.error_dict.clear()
        st.p_memory_dict.clear()
        st.q_memory_dict.clear()
        self.layouts.clear()
        self.pending = {"error": dict(sd["error"]), "q": dict(sd["q"])}


def _powersgd_hook(self: PowerSGDCompression, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    lay = self._place_state(bucket)
    if self.state.iter < self.state.start_powerSGD_iter:
        self.counter.add("allreduce", lay.numel * 4)
    else:
        self.counter.add("allreduce", (lay.uncompressed + lay.p_total + lay.q_total) * 4)
    fut = psgd.powerSGD_hook(self.state, bucket)
    if not self.blocking:
        return fut
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(fut.wait())
    return done
