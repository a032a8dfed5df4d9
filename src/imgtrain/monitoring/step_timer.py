"""Where a training step's time goes: forward+backward, exposed all-reduce, optimizer.

Exposed all-reduce is the part of gradient communication that backward did not hide: DDP all-reduces
gradient buckets while backward still computes earlier layers, and ``backward()`` returns only once every
bucket is reduced. A post-accumulate-grad hook on each parameter marks when the last gradient was
computed; from that mark to the return of ``backward()`` the process did nothing but wait for (or run)
the all-reduce. Everything before the mark (data to the device, forward, loss, backward compute, the
earlier micro-batches of gradient accumulation) is forward+backward; after ``backward()``, unscaling,
clipping, the optimizer step, ``zero_grad`` and the EMA update are the optimizer phase. Without a
process group the exposed part is only the tail of backward after the last gradient (close to 0).

On CPU the marks are ``time.perf_counter`` readings. On CUDA the host runs ahead of the GPU, so the
marks are CUDA events recorded on the current stream and read when the trainer asks for the totals
(``resolve``), which waits for the last recorded step to finish on the GPU: it is called at each metrics
record and straggler check, never per step. Nothing here exists when metrics are off.
"""

from __future__ import annotations

import time

import torch
from torch import nn

PHASES = ("data_wait", "forward_backward", "allreduce_exposed", "optimizer", "checkpoint_stall")


class StepPhaseTimer:
    def __init__(self, model: nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._pending: list[tuple] = []  # (start, last grad, backward done, end) marks of unresolved steps
        self._marks: list = []
        self._last_grad = None
        self._handles = [
            p.register_post_accumulate_grad_hook(self._grad_ready)
            for p in model.parameters()
            if p.requires_grad
        ]

    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _grad_ready(self, _param: torch.Tensor) -> None:
        if self.cuda:  # one event per step, re-recorded by every gradient hook: the last record wins
            if self._last_grad is None:
                self._last_grad = torch.cuda.Event(enable_timing=True)
            self._last_grad.record()
        else:
            self._last_grad = time.perf_counter()

    def begin(self) -> None:
        self._last_grad = None
        self._marks = [self._mark()]

    def backward_done(self) -> None:
        self._marks.append(self._last_grad)
        self._marks.append(self._mark())

    def end(self) -> None:
        self._marks.append(self._mark())
        self._pending.append(tuple(self._marks))
        self._marks = []

    def add(self, phase: str, seconds: float) -> None:
        """Host-side phases (data wait, checkpoint stall) measured by the caller."""
        self.totals[phase] += seconds

    def resolve(self) -> dict[str, float]:
        """Phase totals (seconds) of every step so far. On CUDA, waits for the last step's GPU work."""
        if self._pending and self.cuda:
            self._pending[-1][-1].synchronize()
        for start, grad, bwd, end in self._pending:
            if grad is None:  # no parameter received a gradient (frozen model): all compute
                grad = bwd
            fb, ar, opt = (self._elapsed(start, grad), self._elapsed(grad, bwd), self._elapsed(bwd, end))
            self.totals["forward_backward"] += fb
            self.totals["allreduce_exposed"] += max(ar, 0.0)
            self.totals["optimizer"] += opt
        self._pending.clear()
        return dict(self.totals)

    def _elapsed(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b) / 1000.0
        return b - a

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
