"""Train/eval transforms from encoded bytes to uint8 tensors (torchvision.transforms.v2) and on-device normalization."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from imgtrain.config import DataConfig
from imgtrain.data.decode.cpu import create_decoder, decode_eval, decode_limits, decode_train, into_slot


def augment_tail(cfg: DataConfig) -> v2.Compose | None:
    """The augmentations that run on the uint8 crop after the fused decode + crop + flip."""
    t: list = []
    if cfg.augment.auto_augment == "randaugment":
        t.append(v2.RandAugment(magnitude=cfg.augment.randaugment_magnitude))
    elif cfg.augment.auto_augment == "trivialaugment":
        t.append(v2.TrivialAugmentWide())
    if cfg.augment.random_erase > 0:
        # On uint8 the erased patch is zeros: the black that normalization later maps to -mean/std.
        t.append(v2.RandomErasing(p=cfg.augment.random_erase, value=0))
    return v2.Compose(t) if t else None


class TrainTransform:
    """Encoded bytes -> training sample (uint8 CHW): RandomResizedCrop + flip fused with the decode
    (:func:`decode.decode_train`), then :func:`augment_tail`. Draws from the global torch RNG, which the
    dataset seeds per (seed, epoch, index)."""

    batch_slots = True  # can write a sample into its slot of a batch (folder.load_batch)

    def __init__(self, cfg: DataConfig):
        self.decoder = create_decoder(cfg.decode.decoder, decode_limits(cfg))
        self.size = cfg.image_size
        self.scale = (cfg.augment.random_resized_crop_scale[0], cfg.augment.random_resized_crop_scale[1])
        self.hflip = cfg.augment.hflip
        self.tail = augment_tail(cfg)

    def __call__(self, data: bytes, out: torch.Tensor | None = None) -> torch.Tensor:
        """The sample; written into ``out`` (its slot in a batch, see ``folder.load_batch``) when given."""
        if self.tail is None:
            return decode_train(data, self.decoder, self.size, self.scale, self.hflip, out=out)
        img = self.tail(decode_train(data, self.decoder, self.size, self.scale, self.hflip))
        return into_slot(img, out)


class EvalTransform:
    """Encoded bytes -> eval sample: shorter side resized to ``eval_resize``, center crop ``image_size``."""

    batch_slots = True

    def __init__(self, cfg: DataConfig):
        self.decoder = create_decoder(cfg.decode.decoder, decode_limits(cfg))
        self.resize = eval_resize(cfg)
        self.size = cfg.image_size

    def __call__(self, data: bytes, out: torch.Tensor | None = None) -> torch.Tensor:
        return decode_eval(data, self.decoder, self.resize, self.size, out)


def train_transform(cfg: DataConfig) -> TrainTransform:
    return TrainTransform(cfg)


def eval_resize(cfg: DataConfig) -> int:
    return (
        cfg.val_resize if cfg.val_resize is not None else int(round(cfg.image_size / cfg.val_crop_fraction))
    )


def eval_transform(cfg: DataConfig) -> EvalTransform:
    return EvalTransform(cfg)


class DeviceNormalize(torch.nn.Module):
    """uint8 NCHW on the device -> float normalized. Done here, not in the workers, so that workers
    ship 4x fewer bytes and the arithmetic runs on the accelerator."""

    def __init__(
        self, mean: list[float], std: list[float], device: torch.device, channels_last: bool = False
    ):
        super().__init__()
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One new float tensor, in the model's memory format, normalized in place (copy=True: never the
        # caller's tensor). The out-of-place form made three batch-sized float tensors per step; on CPU
        # glibc can return such freed blocks to the kernel, and the next step page-faults them in again:
        # up to 6.4 ms against 0.3 ms for 8 images of 224 px (docs/BENCHMARKS.md, issue 16 section).
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.to(torch.float32, memory_format=fmt, copy=True)
        return x.sub_(self.mean).mul_(self.inv_std)


def batch_mix(cfg: DataConfig, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix on a device batch (soft labels); one of them chosen per batch when both."""
    mixes = []
    if cfg.augment.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=cfg.augment.mixup_alpha, num_classes=num_classes))
    if cfg.augment.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cfg.augment.cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
