"""``data.decode: gpu``: loader workers only read bytes and draw the crop; nvJPEG decodes the batch.

Worker side (:class:`GpuTrainPlan`): for a JPEG, the encoded bytes plus the sample's crop window and flip,
drawn exactly as the CPU path draws them (same seeded RNG, same order), so a sample's augmentation does not
depend on where it is decoded. Anything that is not a JPEG is decoded and cropped on the CPU right away.
Main-process side (:class:`GpuBatchDecoder`, run by the prefetcher on its side stream): one batched
``torchvision.io.decode_jpeg(..., device="cuda")`` call, then crop + antialiased resize + flip per image on
the GPU. Written against the documented torchvision API and tested on CPU (the same code with
``device="cpu"``); it has not been run or measured on a GPU yet.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from ..config import ConfigError, DataConfig
from .decode import JPEG_MAGIC, create_decoder, crop_resize, sample_crop

log = logging.getLogger(__name__)


def check_gpu_decode(cfg: DataConfig, device: torch.device) -> None:
    """ConfigError naming ``data.decode`` when GPU decode cannot run as configured."""
    if cfg.decode == "cpu":
        return
    if device.type != "cuda":
        raise ConfigError(
            "data.decode",
            cfg.decode,
            f"'cpu' on this machine: GPU decode needs CUDA, this process runs on {device.type}",
        )
    if cfg.auto_augment != "none" or cfg.random_erase > 0:
        raise ConfigError(
            "data.decode",
            cfg.decode,
            "'cpu' with data.auto_augment or data.random_erase (GPU decode "
            "does RandomResizedCrop and flip only)",
        )
    if cfg.decode == "dali":
        from .dali_decode import import_dali

        import_dali()


class GpuTrainPlan:
    """Worker side of GPU decode: bytes -> (encoded uint8 tensor, [top, left, height, width, flip]) for a
    JPEG, or the finished uint8 CHW crop for any other format (decoded on the CPU)."""

    def __init__(self, cfg: DataConfig):
        self.decoder = create_decoder(cfg.decoder)
        self.size = cfg.image_size
        self.scale = (cfg.random_resized_crop_scale[0], cfg.random_resized_crop_scale[1])
        self.hflip = cfg.hflip

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
        out: list[torch.Tensor | None] = []
        s = self.size
        for img, (top, left, h, w, flip) in zip(self._decode(jpegs), params, strict=True):
            if img is not None:
                img = TF.resized_crop(img, top, left, h, w, [s, s], antialias=True)
                img = img.flip(-1) if flip else img
            out.append(img)
        return out

    def __call__(self, batch):
        enc, labels, weights, bad = batch
        n = len(labels)
        s = self.size
        images = torch.zeros(n, 3, s, s, dtype=torch.uint8, device=self.device)
        weights = weights.clone()
        failed = 0
        for pos, img in zip(
            enc.jpeg_index.tolist(), self._crop_batch(enc.jpegs, enc.params.tolist()), strict=True
        ):
            if img is None:
                weights[pos] = 0.0
                failed += 1
                continue
            images[pos] = img
        if len(enc.ready_index):
            images[enc.ready_index.to(self.device)] = enc.ready.to(self.device, non_blocking=True)
        if failed:
            log.warning(
                "%d JPEG(s) of this batch failed to decode on %s and were given weight 0", failed, self.device
            )
            bad = bad + ["<gpu-decode-failure>"] * failed
        return images, labels, weights, bad
