"""``data.decode.device: gpu``: loader workers only read bytes and draw the crop; nvJPEG decodes the batch.

Worker side (:class:`GpuTrainPlan`): for a JPEG, the encoded bytes plus the sample's crop window and flip,
drawn exactly as the CPU path draws them (same seeded RNG, same order), so a sample's augmentation does not
depend on where it is decoded. Anything that is not a JPEG is decoded and cropped on the CPU right away.
Main-process side (:class:`GpuBatchDecoder`, run by the prefetcher on its side stream): one batched
``torchvision.io.decode_jpeg(..., device="cuda")`` call, then crop + antialiased resize + flip of the whole
batch as two batched matrix products (:func:`batched_resized_crop`). Tested on CPU (the same code with
``device="cpu"``); run on one H200 it works, and is slower than CPU decode with 14 workers (docs/decode.md).

"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from imgtrain.config import ConfigError, DataConfig
from imgtrain.data.decode.cpu import JPEG_MAGIC, create_decoder, crop_resize, decode_limits, sample_crop

log = logging.getLogger(__name__)


def check_gpu_decode(cfg: DataConfig, device: torch.device) -> None:
    """ConfigError naming ``data.decode.device`` when GPU decode cannot run as configured."""
    if cfg.decode.device == "cpu":
        return
    if device.type != "cuda":
        raise ConfigError(
            "data.decode.device",
            cfg.decode.device,
            f"'cpu' on this machine: GPU decode needs CUDA, this process runs on {device.type}",
        )
    if cfg.augment.auto_augment != "none" or cfg.augment.random_erase > 0:
        raise ConfigError(
            "data.decode.device",
            cfg.decode.device,
            "'cpu' with data.augment.auto_augment or data.augment.random_erase (GPU decode "
            "does RandomResizedCrop and flip only)",
        )
    if cfg.decode.device == "dali":
        import_dali()


def import_dali():
    """DALI's modules, or a ConfigError naming ``data.decode.device`` when DALI is not installed."""
    try:
        from nvidia import dali
        from nvidia.dali import fn, types
    except ImportError as e:
        raise ConfigError(
            "data.decode.device",
            "dali",
            "'gpu' (torchvision's nvJPEG), or install NVIDIA DALI: pip install nvidia-dali-cuda130 "
            f"(or -cuda120; the 'dali' extra) [{e}]",
        ) from None
    return dali, fn, types


class GpuTrainPlan:
    """Worker side of GPU decode: bytes -> (encoded uint8 tensor, [top, left, height, width, flip]) for a
    JPEG, or the finished uint8 CHW crop for any other format (decoded on the CPU)."""

    def __init__(self, cfg: DataConfig):
        self.decoder = create_decoder(cfg.decode.decoder, decode_limits(cfg))
        self.size = cfg.image_size
        self.scale = (cfg.augment.random_resized_crop_scale[0], cfg.augment.random_resized_crop_scale[1])
        self.hflip = cfg.augment.hflip

    def __call__(self, data: bytes):
        full = self.decoder.size(data)
        # The same draws, in the same order, as decode.decode_train.
        box = sample_crop(full[0], full[1], self.scale)
        flip = self.hflip > 0 and bool(torch.rand(1).item() < self.hflip)
        if data[:2] != JPEG_MAGIC:
            return crop_resize(self.decoder, data, (self.size, self.size), box, full, flip)
        params = torch.tensor([box.top, box.left, box.height, box.width, int(flip)], dtype=torch.int64)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), params


class EncodedBatch(NamedTuple):
    """What the loader hands over in GPU-decode mode (the DataLoader pins its tensors)."""

    jpegs: list[torch.Tensor]  # encoded bytes, one 1-D uint8 tensor per JPEG sample
    jpeg_index: torch.Tensor  # position of each JPEG in the batch
    params: torch.Tensor  # (n_jpegs, 5): top, left, height, width, flip
    ready: torch.Tensor  # (n_ready, 3, S, S) uint8: samples already decoded on the CPU
    ready_index: torch.Tensor


def gpu_collate(batch):
    """Like folder.collate, but keeps JPEG samples encoded (an :class:`EncodedBatch`)."""
    imgs, labels, weights, bad = zip(*batch, strict=True)
    jpeg_pos = [i for i, x in enumerate(imgs) if isinstance(x, tuple)]
    ready_pos = [i for i, x in enumerate(imgs) if not isinstance(x, tuple)]
    enc = EncodedBatch(
        jpegs=[imgs[i][0] for i in jpeg_pos],
        jpeg_index=torch.tensor(jpeg_pos, dtype=torch.long),
        params=torch.stack([imgs[i][1] for i in jpeg_pos])
        if jpeg_pos
        else torch.zeros(0, 5, dtype=torch.long),
        ready=torch.stack([imgs[i] for i in ready_pos]) if ready_pos else torch.zeros(0, dtype=torch.uint8),
        ready_index=torch.tensor(ready_pos, dtype=torch.long),
    )
    return (
        enc,
        torch.tensor(labels, dtype=torch.long),
        torch.tensor(weights, dtype=torch.float32),
        [b for b in bad if b],
    )


class GpuBatchDecoder:
    """Main-process side: (EncodedBatch, labels, weights, bad) -> (uint8 NCHW on ``device``, labels,
    weights, bad), the same batch layout the CPU path yields. A JPEG that nvJPEG rejects becomes a zero
    image of weight 0, counted like a file the CPU path could not decode."""

    def __init__(self, image_size: int, device: torch.device):
        self.size = image_size
        self.device = device

    def _decode(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if not jpegs:
            return []
        try:
            return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for j in jpegs:  # find the culprit(s); the others still decode
                try:
                    out.append(decode_jpeg(j, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out

    def _crop_batch(self, jpegs: list[torch.Tensor], params: list[list[int]]) -> list[torch.Tensor | None]:
        """Each JPEG's crop window resized to the output size and flipped as drawn (None: undecodable)."""
        decoded = self._decode(jpegs)
        ok = [i for i, img in enumerate(decoded) if img is not None]
        out: list[torch.Tensor | None] = [None] * len(decoded)
        if ok:
            crops = batched_resized_crop(
                [decoded[i] for i in ok], torch.tensor([params[i] for i in ok]), self.size
            )
            for j, i in enumerate(ok):
                out[i] = crops[j]
        return out

    def __call__(self, batch):
        enc, labels, weights, bad = batch
        n = len(labels)
        s = self.size
        images = torch.zeros(n, 3, s, s, dtype=torch.uint8, device=self.device)
        weights = weights.clone()
        failed, index, good = 0, [], []
        for pos, img in zip(
            enc.jpeg_index.tolist(), self._crop_batch(enc.jpegs, enc.params.tolist()), strict=True
        ):
            if img is None:
                weights[pos] = 0.0
                failed += 1
            else:
                index.append(pos)
                good.append(img)
        if good:  # one copy for the batch, not one per image
            images[torch.tensor(index, device=self.device)] = torch.stack(good)
        if len(enc.ready_index):
            images[enc.ready_index.to(self.device)] = enc.ready.to(self.device, non_blocking=True)
        if failed:
            log.warning(
                "%d JPEG(s) of this batch failed to decode on %s and were given weight 0", failed, self.device
            )
            bad = bad + ["<gpu-decode-failure>"] * failed
        return images, labels, weights, bad


def _axis_weights(start: torch.Tensor, length: torch.Tensor, extent: int, out: int) -> torch.Tensor:
    """(n, out, extent) resampling matrices: row i of image k holds the weights with which the input
    pixels along this axis make output pixel i of the window [start, start + length) resized to ``out``.
    PIL's antialiased bilinear ("triangle") filter: its support widens with the downscale factor, so a
    downscale averages every input pixel it covers; weights outside the window are 0, rows sum to 1."""
    scale = length / out
    support = scale.clamp(min=1.0)[:, None, None]
    centre = (
        start[:, None] + (torch.arange(out, device=start.device, dtype=start.dtype) + 0.5) * scale[:, None]
    )
    pos = torch.arange(extent, device=start.device, dtype=start.dtype) + 0.5
    w = (1 - (pos - centre[:, :, None]).abs() / support).clamp_(min=0)
    w *= (pos >= start[:, None, None]) & (pos < (start + length)[:, None, None])
    return w / w.sum(-1, keepdim=True).clamp_(min=1e-12)


def batched_resized_crop(
    images: list[torch.Tensor], params: torch.Tensor, size: int, max_elements: int = 1 << 27
) -> torch.Tensor:
    """Crop, antialiased resize to ``size`` x ``size`` and optional horizontal flip of images of different
    sizes, as two batched matrix products instead of a chain of kernels per image.

    ``images``: uint8 (3, h_i, w_i) tensors on one device; ``params``: (n, 5) rows of top, left, height,
    width, flip. The crop windows are padded with zeros into one tensor; each output is
    R_y @ crop @ R_x^T with the per-image resampling matrices of :func:`_axis_weights` (zero over the
    padding, so it never contributes), and a flip is R_x with its rows reversed. fp16 on CUDA (pixel values
    and their weighted sums stay within about 0.1 of fp32), fp32 elsewhere.

    The padded tensor is as large as the batch times its largest crop, so one large photo would inflate it
    for everyone: crops are sorted by size and processed in groups of at most ``max_elements`` padded
    values (2**27: 256 MB in fp16)."""
    device = images[0].device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = params.tolist()
    crops = [im[:, t : t + h, left : left + w] for im, (t, left, h, w, _) in zip(images, rows, strict=True)]
    # The window was drawn from the size in the JPEG header; should the decoder return a smaller image,
    # the slice is shorter: resize what is there rather than fail the batch.
    rows = [
        [t, left, int(c.shape[-2]), int(c.shape[-1]), f]
        for (t, left, _, _, f), c in zip(rows, crops, strict=True)
    ]
    out = torch.empty(len(crops), 3, size, size, dtype=torch.uint8, device=device)
    order = sorted(range(len(crops)), key=lambda k: rows[k][2] * rows[k][3])
    start = 0
    while start < len(order):
        # Grow the group while the padded tensor stays within the budget (always at least one crop).
        end, h_max, w_max = start + 1, rows[order[start]][2], rows[order[start]][3]
        while end < len(order):
            h, w = max(h_max, rows[order[end]][2]), max(w_max, rows[order[end]][3])
            if (end + 1 - start) * 3 * h * w > max_elements:
                break
            end, h_max, w_max = end + 1, h, w
        group = order[start:end]
        x = torch.zeros(len(group), 3, h_max, w_max, dtype=dtype, device=device)
        for j, k in enumerate(group):
            x[j, :, : rows[k][2], : rows[k][3]].copy_(crops[k])
        p = torch.tensor([rows[k] for k in group], dtype=torch.float32, device=device)
        zero = torch.zeros_like(p[:, 0])
        ry = _axis_weights(zero, p[:, 2], h_max, size).to(dtype)
        rx = _axis_weights(zero, p[:, 3], w_max, size)
        rx = torch.where((p[:, 4] > 0)[:, None, None], rx.flip(1), rx).to(dtype)
        res = ry[:, None] @ x @ rx.transpose(1, 2)[:, None]
        out[torch.tensor(group, device=device)] = res.round_().clamp_(0, 255).to(torch.uint8)
        start = end
    return out
