"""Evaluation: exact distributed top-1/top-5, and the `imgtrain eval` command."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from imgtrain.checkpoint import CheckpointError, read_checkpoint
from imgtrain.config import upgrade_saved_config
from imgtrain.distributed import process_group as D

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    count: int
    bad: int = 0
    first_bad: list[str] = field(default_factory=list)  # the first unreadable files of this rank


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader,
    normalize: nn.Module,
    info: D.DistInfo,
    amp_dtype: torch.dtype | None = None,
    on_batch: Callable[[], None] | None = None,
) -> EvalResult:
    """Each validation image is counted exactly once across ranks (the loader's sampler shards without
    padding) and the per-rank sums are added with one all-reduce."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # top1 hits, top5 hits, loss sum, count, bad files
    amp = (
        torch.autocast(info.device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    first_bad: list[str] = []
    for images, labels, weights, bad_paths in loader:
        first_bad += bad_paths[: 5 - len(first_bad)]
        images = images.to(info.device, non_blocking=True)
        labels = labels.to(info.device, non_blocking=True)
        weights = weights.to(info.device, non_blocking=True).double()
        with amp:
            logits = model(normalize(images)).float()
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        loss = nn.functional.cross_entropy(logits, labels, reduction="none").double()
        sums += torch.stack(
            [
                (hit[:, 0].double() * weights).sum(),
                (hit.any(1).double() * weights).sum(),
                (loss * weights).sum(),
                weights.sum(),
                torch.tensor(float(len(bad_paths)), device=weights.device, dtype=torch.float64),
            ]
        ).cpu()
        if on_batch is not None:
            on_batch()
    sums = D.all_reduce_sum(sums.to(D.comm_device(info)), info).cpu()
    model.train(was_training)
    cnt = max(sums[3].item(), 1.0)
    return EvalResult(
        top1=100 * sums[0].item() / cnt,
        top5=100 * sums[1].item() / cnt,
        loss=sums[2].item() / cnt,
        count=int(sums[3].item()),
        bad=int(sums[4].item()),
        first_bad=first_bad,
    )


# What a checkpoint's own config may decide for `imgtrain eval`: the model and how an evaluation image is
# made. Where the data is and how to reach it (data.root, storage options, endpoints, credentials) comes
# from the user: a shared checkpoint must not point the evaluation at its author's data or secrets.
EVAL_DATA_KEYS = ("image_size", "val_resize", "val_crop_fraction", "mean", "std")


def eval_base(saved: dict | None) -> dict:
    """The model fields and the eval-transform fields of a checkpoint's embedded config (one saved before
    the data section was split into nested sections included)."""
    saved = upgrade_saved_config(saved or {})
    data = saved.get("data") or {}
    base = {k: data[k] for k in EVAL_DATA_KEYS if k in data}
    if "decoder" in (data.get("decode") or {}):
        base["decode"] = {"decoder": data["decode"]["decoder"]}
    return {"model": saved.get("model") or {}, "data": base}


def run_eval(checkpoint: str, config_path: str | None, overrides: list[str]) -> int:
    from imgtrain.config import ConfigError, load_config, resolve_storage_options
    from imgtrain.data import build_data
    from imgtrain.data.transforms import DeviceNormalize
    from imgtrain.models import create_model
    from imgtrain.monitoring.logs import configure_logging
    from imgtrain.precision import amp_dtype

    # Validate what the user typed before touching the process group or data.
    user = load_config(config_path, overrides)
    # A step directory, a checkpoints directory or its 'latest', a run directory, or a model.pt: the
    # checkpoint manager's one rule (its newest checkpoint that verifies, for the folders).
    sd = read_checkpoint(
        checkpoint, resolve_storage_options(user.checkpoint.storage_options, "checkpoint.storage_options")
    )
    if config_path is None:
        saved = sd.get("config") or {}
        cfg = load_config(None, overrides, base=eval_base(saved))
        if cfg.data.root is None and (saved.get("data") or {}).get("root") is not None:
            raise ConfigError(
                "data.root",
                None,
                "the evaluation data: data.root=PATH or --config (the "
                "checkpoint's own data location and credentials are not used)",
            )
    else:
        cfg = user
    # GPU decode is a training-time option: evaluation decodes on the CPU anyway.
    cfg.data.decode.device = "cpu"
    info = D.init_distributed(cfg.distributed)
    configure_logging(info.rank, info.is_main)
    try:
        data = build_data(
            cfg.data, cfg.training.batch_size, info.rank, info.world_size, cfg.training.seed, info.device
        )
        meta = sd.get("meta", {})
        if meta.get("num_classes") not in (None, data.num_classes):
            raise CheckpointError(
                f"{checkpoint} was trained on {meta['num_classes']} classes, the data at "
                f"{data.val_set.split_dir} has {data.num_classes}"
            )
        if meta.get("classes") is not None and list(meta["classes"]) != list(data.classes):
            raise CheckpointError(
                f"{checkpoint} was trained on classes {_brief(meta['classes'])}, the data at "
                f"{data.val_set.split_dir} has {_brief(data.classes)}"
            )
        model = create_model(cfg.model, data.num_classes, cfg.data.image_size).to(info.device)
        try:
            model.load_state_dict(sd["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{checkpoint} does not fit model.name='{cfg.model.name}': {e}") from None
        normalize = DeviceNormalize(cfg.data.mean, cfg.data.std, info.device)
        res = evaluate_model(
            model, data.val_loader, normalize, info, amp_dtype(cfg.optimization.mixed_precision)
        )
        if info.is_main:
            print(
                json.dumps(
                    {
                        "checkpoint": checkpoint,
                        "val_top1": res.top1,
                        "val_top5": res.top5,
                        "val_loss": res.loss,
                        "val_images": res.count,
                        "bad_images": res.bad,
                    }
                )
            )
    finally:
        D.destroy_distributed(info)
    return 0


def _brief(names, n: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")
