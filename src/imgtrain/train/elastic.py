"""World-size policies: what a start at another world size than the job's full one (or than the last
checkpoint's) does to the batch and the learning rate.

``keep_global``: the global batch (and so the peak LR) is the recipe's at the job's full world size, the
reference: ``imgtrain launch`` tells it (``--nnodes`` maximum x ``--nproc-per-node``), else it is the world
size of the run's first start. It is fixed then and saved in every checkpoint, so a run that first started
small keeps the same global batch as one that started full; fewer processes accumulate more.
``keep_per_process``: the per-process batch stays and the LR follows the global batch (linear scaling rule).
"""

from __future__ import annotations

import logging
import math

from imgtrain.config import Config, ConfigError

log = logging.getLogger(__name__)


def accumulation_for(cfg: Config, world_size: int, reference: int) -> int:
    """Gradient accumulation steps for ``world_size`` processes under ``distributed.elastic_batch``."""
    oc, tc, dc = cfg.optimization, cfg.training, cfg.distributed
    if dc.elastic_batch != "keep_global":
        return oc.accumulation_steps
    target = tc.batch_size * reference * oc.accumulation_steps
    accum = max(1, math.ceil(target / (tc.batch_size * world_size)))
    if accum > 1 and dc.static_graph:  # DDP's static graph cannot no_sync
        raise ConfigError(
            "distributed.static_graph",
            True,
            "false or distributed.elastic_batch="
            f"keep_per_process: keeping the global batch {target} at world size {world_size} "
            f"needs {accum} accumulation steps",
        )
    if accum * tc.batch_size * world_size != target:
        log.warning(
            "elastic: global batch %d cannot be kept exactly at world size %d; using %d",
            target,
            world_size,
            accum * tc.batch_size * world_size,
        )
    return accum


def log_world_size_change(
    cfg: Config,
    *,
    previous: int | None,
    world_size: int,
    reference: int,
    accumulation: int,
    global_batch: int,
    peak_lr: float,
    epoch: int,
) -> None:
    """Every start at another world size than the last checkpoint's (or, at the first start, than the
    reference) is logged with the policy's decision."""
    if previous == world_size or (previous is None and reference == world_size):
        return
    if previous is None:
        change = (
            f"world size {world_size} at the first start, {reference} for the whole job "
            "(imgtrain launch's --nnodes maximum)"
        )
        rest = ""
    else:
        change = f"world size changed {previous} -> {world_size}"
        rest = f"; the rest of epoch {epoch + 1} is re-sharded over the new ranks"
    log.warning(
        "elastic: %s; policy %s: accumulation %d, global batch %d, peak LR %.4g%s",
        change,
        cfg.distributed.elastic_batch,
        accumulation,
        global_batch,
        peak_lr,
        rest,
        extra={
            "fields": {
                "previous_world_size": previous,
                "world_size": world_size,
                "reference_world_size": reference,
                "accumulation": accumulation,
                "global_batch": global_batch,
                "peak_lr": peak_lr,
            }
        },
    )
