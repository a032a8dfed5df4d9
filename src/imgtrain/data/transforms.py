"""Train/eval transforms on uint8 tensors (torchvision.transforms.v2) and on-device normalization."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from ..config import DataConfig


def train_transform(cfg: DataConfig) -> v2.Compose:
    t: list = [v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.random_resized_crop_scale),
                                    antialias=True)]
    if cfg.hflip > 0:
        t.append(v2.RandomHorizontalFlip(cfg.hflip))
    if cfg.auto_augment == "randaugment":
        t.append(v2.RandAugment(magnitude=cfg.randaugment_magnitude))
    elif cfg.auto_augment == "trivialaugment":
        t.append(v2.TrivialAugmentWide())
    if cfg.random_erase > 0:
        # On uint8 the erased patch is zeros: the black that normalization later maps to -mean/std.
        t.append(v2.RandomErasing(p=cfg.random_erase, value=0))
    return v2.Compose(t)


def eval_resize(cfg: DataConfig) -> int:
    return cfg.val_resize if cfg.val_resize is not None else int(round(cfg.image_size / 0.875))


def eval_transform(cfg: DataConfig) -> v2.Compose:
    return v2.Compose([v2.Resize(eval_resize(cfg), antialias=True), v2.CenterCrop(cfg.image_size)])


class DeviceNormalize(torch.nn.Module):
    """uint8 NCHW on the device -> float normalized. Done here, not in the workers, so that workers
    ship 4x fewer bytes and the arithmetic runs on the accelerator."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device,
                 channels_last: bool = False):
        super().__init__()
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255.0)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) * self.inv_std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def batch_mix(cfg: DataConfig, num_classes: int) -> v2.Transform | None:
    """MixUp and/or CutMix on a device batch (soft labels); one of them chosen per batch when both."""
    mixes = []
    if cfg.mixup_alpha > 0:
        mixes.append(v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes))
    if cfg.cutmix_alpha > 0:
        mixes.append(v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
