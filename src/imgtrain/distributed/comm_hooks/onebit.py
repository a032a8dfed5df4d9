"""``onebit``: 1-bit SGD with error feedback (Seide et al. 2014), imgtrain's own hook: signs packed 8 per
byte plus one fp32 scale (mean |g|) per chunk of each gradient tensor, exchanged by all-gather."""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects (dist.GradBucket).

from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from imgtrain.distributed.comm_hooks.base import Compression
from imgtrain.registry import COMPRESSION

# Speed (the hook must cost less than it saves on the wire; docs/BENCHMARKS.md): on CPU a bucket is
# processed in blocks of 128 K elements, every pass of the encoder and decoder over one block before the
# next, so that only the first read and the last write of each element reach main memory; buffers and
# their views are kept from step to step (a fresh 47 MB tensor per op costs more in page faults than the
# arithmetic, and a view per op and block costs more in Python than the op). Signs are packed and
# unpacked by NumPy's packbits/unpackbits on the CPU tensors' memory (torch has no such op; on other
# devices the torch paths below do it). sign x scale is made on the fp32 bits: an int32 add of -2^31
# sets the sign bit of a non-negative scale, one exact op instead of a broadcast copysign or where.

_SIGN_BIT = torch.iinfo(torch.int32).min  # -2^31: 0x80000000, the fp32 sign bit, as an int32
_POW2 = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
_PACK = 0x0102040810204080  # x 8 bytes of 0/1 (little-endian int64): byte j's bit lands at bit 56 + j
_CPU_BLOCK = 1 << 17  # elements per block on CPU: measured best of 2^15..2^19 (1 MB L2; 2^15: +60% time)
# torch >= 2.14 renamed all_gather_into_tensor (the old name warns); same arguments.
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def pack_signs(
    bits: torch.Tensor, out: torch.Tensor | None = None, numpy_ops: bool | None = None
) -> torch.Tensor:
    """Bool tensor (length a multiple of 8) -> uint8, 8 per byte; element 8i+j is bit j of byte i.
    The 1-bit hook packs sign bits: 1 = negative (``torch.signbit``, so -0.0 counts as negative).
    ``numpy_ops``: NumPy's packbits (CPU only; the default there) or the torch path (any device)."""
    use_numpy = bits.device.type == "cpu" if numpy_ops is None else numpy_ops
    if use_numpy:
        packed = torch.from_numpy(np.packbits(bits.numpy(), bitorder="little"))
    else:
        packed = torch.mul(bits.view(torch.uint8).view(torch.int64), _PACK).bitwise_right_shift_(56)
    return packed.to(torch.uint8) if out is None else out.copy_(packed)


def unpack_signs(
    packed: torch.Tensor, out: torch.Tensor | None = None, numpy_ops: bool | None = None
) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: uint8 -> 0/1 as uint8 (viewable as bool), 8 elements per byte."""
    use_numpy = packed.device.type == "cpu" if numpy_ops is None else numpy_ops
    if use_numpy:
        bits = torch.from_numpy(np.unpackbits(packed.numpy(), bitorder="little"))
        return bits if out is None else out.copy_(bits)
    out = torch.bitwise_and(
        packed.unsqueeze(1), _POW2.to(packed.device), out=None if out is None else out.view(-1, 8)
    )
    return out.view(-1).clamp_(max=1)


def signed_scales(
    negative: torch.Tensor, scales: torch.Tensor, chunk: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Sign bit per element (0/1 as uint8 or bool, 1 = negative), scale >= 0 per chunk -> +scale / -scale
    per element (fp32), exactly: the scale's bits plus -2^31 x the sign bit, in int32."""
    if out is None:
        out = torch.empty(negative.numel(), dtype=torch.float32, device=negative.device)
    torch.add(
        scales.view(torch.int32).unsqueeze(1),
        negative.view(torch.uint8).view(-1, chunk),
        alpha=_SIGN_BIT,
        out=out.view(torch.int32).view(-1, chunk),
    )
    return out


def onebit_encode(x: torch.Tensor, counts: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded flat fp32 gradient (zeros in the padding) -> (packed signs, fp32 scale per chunk).
    The scale is the chunk's mean |g| over its real elements: sign x scale keeps the chunk's L1 norm."""
    scales = torch.sum(x.abs().view(-1, chunk), 1).div_(counts)
    return pack_signs(torch.signbit(x)), scales


def onebit_decode(packed: torch.Tensor, scales: torch.Tensor, chunk: int) -> torch.Tensor:
    return signed_scales(unpack_signs(packed), scales.contiguous(), chunk)


class _Block:
    """Views, made once, of one block of a layout: its part of x, of this rank's scales and signs in the
    message, of every rank's part of the gathered messages, of the scratch buffers, and its padding."""

    def __init__(self, lay: "_OneBitLayout", a: int, b: int, pads: list[tuple[int, int]]):
        c, n = lay.chunk, b - a
        self.a = a
        self.x = lay.x[a:b]
        self.x2 = self.x.view(-1, c)
        self.scales = lay.message[lay.nsign :].view(torch.float32)[a // c : b // c]
        self.scale_bits = self.scales.view(torch.int32).unsqueeze(1)
        self.counts = lay.counts[a // c : b // c]
        self.packed = lay.message[a // 8 : b // 8]
        self.work = lay.work[:n]
        self.work_bits2 = self.work.view(torch.int32).view(-1, c)
        self.total = lay.total[:n]
        self.total_bits2 = self.total.view(torch.int32).view(-1, c)
        self.bits = lay.bits[:n]
        self.bits2 = self.bits.view(torch.uint8).view(-1, c)
        self.int64 = lay.int64[: n // 8]
        self.pads = [lay.x[max(s, a) : min(e, b)] for s, e in pads if max(s, a) < min(e, b)]
        self.rank_packed = [lay.gathered[r, a // 8 : b // 8] for r in range(lay.world)]
        self.rank_scale_bits = [
            lay.rank_scales[r, a // c : b // c].view(torch.int32).unsqueeze(1) for r in range(lay.world)
        ]
        if lay.numpy_ops:  # NumPy views of the same memory
            self.x_np, self.bits_np, self.packed_np = self.x.numpy(), self.bits.numpy(), self.packed.numpy()
            self.rank_packed_np = [p.numpy() for p in self.rank_packed]


class _OneBitLayout:
    """One bucket's tensors, each padded to whole chunks so that a chunk (and its scale) never spans two
    tensors: the result per element is then independent of how DDP groups tensors into buckets. Holds
    the buffers reused every step; ``x`` keeps the residuals between steps."""

    def __init__(self, grads: list[torch.Tensor], chunk: int, world: int, numpy_ops: bool | None = None):
        self.slots, counts, off = [], [], 0  # slots: (index in the bucket, offset in x, numel)
        padding: list[tuple[int, int]] = []
        for i, g in enumerate(grads):
            n = g.numel()
            k = -(-n // chunk)
            self.slots.append((i, off, n))
            if k * chunk > n:
                padding.append((off + n, off + k * chunk))
            counts.extend([chunk] * (k - 1) + [n - chunk * (k - 1)])
            off += k * chunk
        dev = grads[0].device
        self.chunk, self.world, self.cpu = chunk, world, dev.type == "cpu"
        self.numpy_ops = self.cpu if numpy_ops is None else numpy_ops  # False: the torch path (tests)
        self.length, self.nsign, self.nchunks = off, off // 8, len(counts)
        step = max(1, _CPU_BLOCK // chunk) * chunk if self.cpu else off  # one block on GPUs
        bounds = [(a, min(a + step, off)) for a in range(0, off, step)]
        block = bounds[0][1]
        self.counts = torch.tensor(counts, dtype=torch.float32, device=dev)
        self.x = torch.zeros(off, dtype=torch.float32, device=dev)  # residual, then corrected gradient
        self.message = torch.empty(self.nsign + 4 * self.nchunks, dtype=torch.uint8, device=dev)
        self.gathered = torch.empty(world, self.message.numel(), dtype=torch.uint8, device=dev)
        self.rank_scales = torch.empty(world, self.nchunks, dtype=torch.float32, device=dev)  # scale / world
        self.work = torch.empty(block, dtype=torch.float32, device=dev)  # scratch, one block
        self.total = torch.empty(block, dtype=torch.float32, device=dev)
        self.bits = torch.empty(block, dtype=torch.bool, device=dev)
        self.int64 = torch.empty(block // 8, dtype=torch.int64, device=dev)
        self.blocks = [_Block(self, a, b, padding) for a, b in bounds]
        self._pieces_key: tuple[int, ...] | None = None
        self._pieces: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = []

    def pieces(
        self, grads: list[torch.Tensor]
    ) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Per block, the pieces of the bucket's gradients in it: (flat view of the piece, the same
        elements in x, in the block's decode buffer). Rebuilt only if the gradients moved (DDP keeps
        its buckets' storage from step to step)."""
        key = tuple(g.data_ptr() for g in grads)
        if key != self._pieces_key:
            self._pieces = []
            for blk in self.blocks:
                a, b = blk.a, blk.a + blk.x.numel()
                out = []
                for i, off, n in self.slots:
                    lo, hi = max(a, off), min(b, off + n)
                    if lo < hi:
                        out.append(
                            (
                                grads[i].view(-1)[lo - off : hi - off],
                                self.x[lo:hi],
                                blk.total[lo - a : hi - a],
                            )
                        )
                self._pieces.append(out)
            self._pieces_key = key
        return self._pieces


@COMPRESSION.register("onebit")
class OneBitCompression(Compression):
    """1-bit SGD with error feedback. Per bucket and step: add this rank's residual to the gradient,
    send its signs (1 bit each) and a scale per chunk, keep what was not sent as the next residual, and
    average the decoded gradients of all ranks. Aggregation is an all-gather of the packed messages
    (every rank decodes all of them), so the bytes per rank grow with the world size: (N-1) x 1/32 of
    fp32, against a ring all-reduce's 2(N-1)/N; it pays off up to a few dozen ranks."""

    method = "onebit"

    def __init__(self, *args):
        super().__init__(*args)
        self.chunk = self.cfg.onebit.chunk_size
        self.warmup = self.cfg.onebit.warmup_steps
        self.step = 0  # optimizer steps seen by the hook (counted on the last bucket)
        self.residual: dict[str, torch.Tensor] = {}  # by parameter name; views into a layout's x
        self._layouts: dict[tuple[str, ...], _OneBitLayout] = {}
        self.numpy_ops: bool | None = None  # None: NumPy's bit packing on CPU tensors; False: torch's

    def register(self, ddp_model: torch.nn.Module) -> None:
        ddp_model.register_comm_hook(self, _onebit_hook)

    def _message_bytes(self, numels: list[int]) -> int:
        padded = sum(-(-n // self.chunk) * self.chunk for n in numels)
        return padded // 8 + padded // self.chunk * 4

    def expected_bytes_per_step(self) -> int:
        return self._message_bytes([p.numel() for _, p in self.params])

    def describe(self) -> str:
        return (
            f"onebit: signs + one fp32 scale per {self.chunk} elements, error feedback, plain all-reduce "
            f"for the first {self.warmup} steps"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "residual": {k: v.clone() for k, v in self.residual.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = int(sd["step"])
        self.residual = dict(sd["residual"])
        self._layouts.clear()

    def _layout(self, grads: list[torch.Tensor], names: list[str]) -> _OneBitLayout:
        key = tuple(names)
        lay = self._layouts.get(key)
        if lay is None:  # first step, or DDP rebuilt its buckets: move the residuals into the new layout
            lay = self._layouts[key] = _OneBitLayout(grads, self.chunk, self.world_size, self.numpy_ops)
            for i, off, n in lay.slots:
                res = self.residual.get(names[i])
                if res is not None:
                    lay.x[off : off + n].copy_(res.view(-1))
                self.residual[names[i]] = lay.x[off : off + n]
        return lay

    def compress_bucket(
        self, grads: list[torch.Tensor], names: list[str]
    ) -> tuple[torch.Tensor, _OneBitLayout]:
        """Residual-corrected gradients -> the message (packed signs, then the scales' bytes); the layout's
        ``x`` (and so ``self.residual``) becomes what the message leaves out."""
        lay = self._layout(grads, names)
        for blk, pieces in zip(lay.blocks, lay.pieces(grads), strict=True):
            for g, x, _ in pieces:
                x.add_(g)
            torch.sum(torch.abs(blk.x, out=blk.work).view(-1, lay.chunk), 1, out=blk.scales).div_(blk.counts)
            if lay.numpy_ops:
                np.signbit(blk.x_np, out=blk.bits_np)
                blk.packed_np[:] = np.packbits(blk.bits_np, bitorder="little")
            else:
                torch.signbit(blk.x, out=blk.bits)
                torch.mul(blk.bits.view(torch.uint8).view(torch.int64), _PACK, out=blk.int64)
                blk.packed.copy_(blk.int64.bitwise_right_shift_(56))
            # residual = x - what was sent = x - copysign(s, x) (signbit and copysign agree on -0.0); the
            # padding must stay zero (it is not sent).
            torch.add(blk.scale_bits, blk.bits2, alpha=_SIGN_BIT, out=blk.work_bits2)
            blk.x.sub_(blk.work)
            for pad in blk.pads:
                pad.zero_()
        return lay.message, lay

    def decompress_into(self, grads: list[torch.Tensor], lay: _OneBitLayout) -> None:
        """All ranks' messages (in ``lay.gathered``) -> their average, written into ``grads``."""
        world = lay.world
        torch.div(lay.gathered[:, lay.nsign :].view(torch.float32), world, out=lay.rank_scales)
        for blk, pieces in zip(lay.blocks, lay.pieces(grads), strict=True):
            for r in range(world):  # fixed rank order: the sum is the same on every rank
                if lay.numpy_ops:
                    blk.bits_np[:] = np.unpackbits(blk.rank_packed_np[r], bitorder="little")
                else:
                    unpack_signs(blk.rank_packed[r], out=blk.bits.view(torch.uint8), numpy_ops=False)
                target = blk.total_bits2 if r == 0 else blk.work_bits2
                torch.add(blk.rank_scale_bits[r], blk.bits2, alpha=_SIGN_BIT, out=target)
                if r:
                    blk.total.add_(blk.work)
            for g, _, total in pieces:
                g.copy_(total)


def _onebit_hook(self: OneBitCompression, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    buf = bucket.buffer()
    in_warmup = self.step < self.warmup
    if bucket.is_last():
        self.step += 1
    if in_warmup:
        self.counter.add("allreduce", buf.numel() * buf.element_size())
        return default_hooks.allreduce_hook(None, bucket)
    grads = bucket.gradients()
    names = [self.names[id(p)] for p in bucket.parameters()]
    message, lay = self.compress_bucket(grads, names)
    self.counter.add("allgather", message.numel())
    fut = _all_gather(lay.gathered.view(-1), message, async_op=True).get_future()

    def decode(_: torch.futures.Future) -> torch.Tensor:
        self.decompress_into(grads, lay)
        return buf

    return fut.then(decode)
