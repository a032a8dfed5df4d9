"""The training loop. It owns the step/epoch counters and composes the components built in setup()."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from imgtrain.checkpoint import CheckpointManager, load_checkpoint
from imgtrain.config import Config, dump_config, literal_credentials
from imgtrain.data import DataBundle, build_data
from imgtrain.data.prefetch import device_batches
from imgtrain.data.shards.cache import cache_record
from imgtrain.data.transforms import DeviceNormalize, batch_mix
from imgtrain.distributed import process_group as D
from imgtrain.distributed.comm_hooks import Compression, create_compression
from imgtrain.distributed.launch import max_world_size_from_launcher
from imgtrain.errors import CheckpointError, ConfigError, DataError, DivergenceError
from imgtrain.fault import PreemptionHandler, Watchdog
from imgtrain.models import create_model
from imgtrain.monitoring import JsonlSink, ProgressBar
from imgtrain.monitoring.logs import LogSink, configure_logging, resolve_run_id
from imgtrain.monitoring.notify import Notifier
from imgtrain.monitoring.profiler import StepProfiler
from imgtrain.optim import create_optimizer, create_schedule, scaled_lr, set_lr
from imgtrain.precision import amp_dtype
from imgtrain.train.evaluate import EvalResult, evaluate_model
from imgtrain.train.state import Progress, rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def checkpoint_run_id(cfg: Config) -> str:
    """The run a checkpoint belongs to (recorded in its manifest): monitoring.run_id, else the run
    directory's name. Not torchrun's --rdzv-id: the launch scripts set it to the scheduler's job id, which
    a resubmitted run that should continue from its checkpoints does not keep."""
    return cfg.monitoring.run_id or Path(cfg.output_dir).resolve().name


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        if cfg.fault_tolerance.mode == "replicated":  # each replica group writes its own run files
            self.output_dir = self.output_dir / f"group-{cfg.fault_tolerance.replicated.resolved()[1]}"
        self.replicas = None  # replicated mode: distributed.replicas.Replicas
        self.progress = Progress()
        self.info: D.DistInfo
        self.data: DataBundle
        self.model: nn.Module
        self.model_without_ddp: nn.Module
        self.ema: AveragedModel | None = None
        self.optimizer: torch.optim.Optimizer
        self.scaler: torch.amp.GradScaler
        self.checkpointer: CheckpointManager
        self.preemption = PreemptionHandler(cfg.fault_tolerance.grace_period)
        self.watchdog: Watchdog
        self.accumulation = cfg.optimization.accumulation_steps
        self.reference_world_size: int | None = None  # the job's full world size (see _apply_elastic_policy)
        self.previous_world_size: int | None = None  # of the checkpoint resumed from
        self.last_eval: EvalResult | None = None
        self.last_ema_eval: EvalResult | None = None
        self.resumed_from: str | None = None
        self.epoch_bad = 0  # unreadable training files in the steps trained this epoch, all ranks
        self.first_bad: list[str] = []  # the first of them on this rank, named by the ceiling's error
        self.last_checkpoint_stall = 0.0
        self._last_loss = float("nan")  # of the last logged window, for the progress bar
        self.save_due = False  # agreed by all ranks after each step (see _should_stop)
        self.timeline: dict[str, float] = {"process_start": _process_start_time()}
        self._steps_this_run = 0  # steps since this process started (the first one gets init_timeout)
        self._sinks: list = []
        self.profiler = StepProfiler(cfg.profiler, self.output_dir)
        self.metrics = None  # Prometheus sink (monitoring.prometheus.enabled); None costs nothing
        self.compression: Compression | None = None
        self._saved_compression: dict[str, Any] | None = None  # from the checkpoint, applied after DDP wrap

    # ------------------------------------------------------------------ setup

    def setup(self) -> Trainer:
        cfg = self.cfg
        t0 = time.time()
        self.info = D.init_distributed(cfg.distributed)
        self.timeline["process_group_ready"] = time.time()
        self.timeline["setup_start"] = t0
        self.run_id = resolve_run_id(cfg.monitoring.run_id, self.output_dir)
        configure_logging(
            self.info.rank,
            self.info.is_main,
            self.run_id,
            self.output_dir,
            cfg.monitoring.log_format,
            step_fn=lambda: self.progress.step,
        )
        self.notifier = Notifier(cfg.monitoring.notify, self.run_id, enabled=self.info.is_main)
        info = self.info
        self.control_group = D.new_control_group(info)
        if cfg.training.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        else:
            torch.backends.cudnn.benchmark = True
        seed_everything(cfg.training.seed)
        # Data first: a wrong data.root must not leave a half-made run directory behind.
        self.data = build_data(
            cfg.data, cfg.training.batch_size, info.rank, info.world_size, cfg.training.seed, info.device
        )
        # The writer lock (and the refusal of another run's directory) before anything is written there.
        ckpt_dir = cfg.checkpoint.dir or str(self.output_dir / "checkpoints")
        self.checkpointer = CheckpointManager(
            cfg.checkpoint, ckpt_dir, is_writer=info.is_main, run_id=checkpoint_run_id(cfg)
        )
        if info.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.output_dir / "config.yaml")  # secrets redacted
            for key in literal_credentials(cfg):
                log.warning(
                    "%s is a literal credential (or a notification URL without ${VAR}): imgtrain "
                    "redacts it from everything it writes, but your config file or command line holds "
                    "it; read it from the environment (${VAR}) or use a role",
                    key,
                )
        self.model_without_ddp = create_model(cfg.model, self.data.num_classes, cfg.data.image_size)
        self.model_without_ddp.to(info.device)
        self.channels_last = cfg.model.channels_last and info.device.type == "cuda"
        if self.channels_last:
            self.model_without_ddp.to(memory_format=torch.channels_last)
        self.normalize = DeviceNormalize(cfg.data.mean, cfg.data.std, info.device, self.channels_last)
        self.mix = batch_mix(cfg.data, self.data.num_classes)
        oc = cfg.optimization
        self.optimizer = create_optimizer(self.model_without_ddp, oc, lr=cfg.training.base_lr)
        self.amp_dtype = amp_dtype(oc.mixed_precision)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=oc.mixed_precision == "fp16")
        if oc.ema:
            self.ema = AveragedModel(
                self.model_without_ddp, multi_avg_fn=get_ema_multi_avg_fn(oc.ema_decay), use_buffers=True
            )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=oc.label_smoothing, reduction="none")
        self.schedule = create_schedule(cfg.training)
        self.timeline["built"] = time.time()
        self._maybe_resume()
        self.timeline["checkpoint_loaded"] = time.time()
        # DDP broadcasts rank 0's parameters at construction: build it after loading the checkpoint.
        if cfg.fault_tolerance.mode == "replicated":
            from imgtrain.distributed.replicas import Replicas

            self.replicas = Replicas(cfg, info, self.state_dict, self._load_peer_state, self._emit)
            self.replicas.attach(self.data.train_sampler)
            self.replicas.resume_at(self.progress.step)
            self.model = self.replicas.wrap(self.model_without_ddp)
        else:
            self.model = D.wrap_ddp(self.model_without_ddp, info, cfg.distributed)
        self._setup_compression()
        if cfg.training.compile:
            # Compiling the DDP module lets DDP's optimizer split graphs at bucket boundaries (overlap kept).
            self.model = torch.compile(self.model)
        self._apply_elastic_policy()
        if info.is_main:
            self._sinks.append(JsonlSink(self.output_dir / "metrics.jsonl"))
        self._sinks.append(LogSink(info.rank))
        if info.is_main and cfg.monitoring.tensorboard:
            from imgtrain.monitoring.tensorboard import TensorBoardSink

            self._sinks.append(TensorBoardSink(self.output_dir / "tensorboard"))
        if cfg.monitoring.prometheus.enabled:
            from imgtrain.monitoring.metrics import PrometheusMetrics

            steps_per_epoch = math.ceil(self.data.train_sampler.steps_per_epoch() / self.accumulation)
            self.metrics = PrometheusMetrics(
                cfg,
                info,
                self.model_without_ddp,
                steps_per_epoch=steps_per_epoch,
                group=self.control_group,
                checkpointer=self.checkpointer,
            )
            self._sinks.append(self.metrics)
        self.bar = ProgressBar(info.is_main and cfg.training.progress_bar)
        self.watchdog = Watchdog(
            cfg.fault_tolerance.hang_timeout, cfg.fault_tolerance.first_step_timeout, rank=info.rank
        )
        log.info(
            "imgtrain: world size %d (%s), device %s, global batch %d = %d per process x %d "
            "processes x %d accumulation steps, peak LR %.4g",
            info.world_size,
            info.backend or "no process group",
            info.device,
            self.global_batch,
            cfg.training.batch_size,
            info.world_size,
            self.accumulation,
            self.peak_lr,
            extra={
                "fields": {
                    "world_size": info.world_size,
                    "device": str(info.device),
                    "global_batch": self.global_batch,
                    "peak_lr": self.peak_lr,
                }
            },
        )
        self._log_fault_tolerance_settings()
        return self

    def _setup_compression(self) -> None:
        info, dc = self.info, self.cfg.distributed
        self.compression = create_compression(self.model, dc, info.world_size, info.backend)
        saved = self._saved_compression
        if saved is not None and saved.get("method") == dc.compression and dc.compression != "none":
            if saved.get("world_size") != info.world_size:
                log.warning(
                    "compression: the checkpoint's %s state is from %s ranks, the job has %d: reset "
                    "(error feedback starts from zero)",
                    dc.compression,
                    saved.get("world_size"),
                    info.world_size,
                )
            else:
                self.compression.load_state_dict(saved["ranks"][info.rank])
        elif saved is not None and saved.get("method") != dc.compression:
            log.warning(
                "compression: the checkpoint was saved with %s, the config asks for %s: %s starts fresh",
                saved.get("method"),
                dc.compression,
                dc.compression,
            )
        if not info.enabled:  # one process, no process group: no gradient is exchanged
            if dc.compression != "none":
                log.info("gradient compression %s: unused, one process has no collectives", dc.compression)
            return
        fp32 = self.compression._fp32_bytes
        sent = self.compression.expected_bytes_per_step()
        log.info(
            "gradient compression %s; %s per step handed to collectives per rank instead of %s fp32 (1/%.1f)",
            self.compression.describe(),
            _fmt_bytes(sent),
            _fmt_bytes(fp32),
            fp32 / max(sent, 1),
        )

    def _compression_state(self) -> dict[str, Any] | None:
        """Every rank's compression state (rank-local) on rank 0. Collective: every rank must call it."""
        if self.compression is None or self.compression.method == "none":
            return None
        own = {k: _to_cpu(v) for k, v in self.compression.state_dict().items()}
        ranks = [own]
        if self.info.enabled:
            ranks = [None] * self.info.world_size if self.info.is_main else None
            # Live ranks of this job send their state; nothing read from disk is unpickled.
            dist.gather_object(own, ranks, dst=0)
        return {"method": self.compression.method, "world_size": self.info.world_size, "ranks": ranks}

    @property
    def global_batch(self) -> int:
        groups = 1 if self.replicas is None else self.replicas.num_groups  # replicated: all groups' shares
        return self.cfg.training.batch_size * self.info.world_size * groups * self.accumulation

    @property
    def peak_lr(self) -> float:
        return scaled_lr(self.cfg.training, self.global_batch)

    def _apply_elastic_policy(self) -> None:
        """Sets the gradient accumulation for this start's world size and logs the decision.

        ``keep_global``: the global batch (and so the peak LR) is the recipe's at the job's full world size,
        the reference: ``imgtrain launch`` tells it (``--nnodes`` maximum x ``--nproc-per-node``), else it is
        the world size of the run's first start. It is fixed then and saved in every checkpoint, so a run
        that first started small keeps the same global batch as one that started full; fewer processes
        accumulate more. ``keep_per_process``: the per-process batch stays and the LR follows the global
        batch (linear scaling rule). Every start at another world size than the last checkpoint's (or, at
        the first start, than the reference) is logged with the policy's decision."""
        w = self.info.world_size
        if self.reference_world_size is None:
            self.reference_world_size = max(w, max_world_size_from_launcher() or w)
        ref = self.reference_world_size
        oc, tc, dc = self.cfg.optimization, self.cfg.training, self.cfg.distributed
        self.accumulation = oc.accumulation_steps
        if dc.elastic_batch == "keep_global":
            target = tc.batch_size * ref * oc.accumulation_steps
            accum = max(1, math.ceil(target / (tc.batch_size * w)))
            if accum > 1 and dc.static_graph:  # DDP's static graph cannot no_sync
                raise ConfigError(
                    "distributed.static_graph",
                    True,
                    "false or distributed.elastic_batch="
                    f"keep_per_process: keeping the global batch {target} at world size {w} "
                    f"needs {accum} accumulation steps",
                )
            if accum * tc.batch_size * w != target:
                log.warning(
                    "elastic: global batch %d cannot be kept exactly at world size %d; using %d",
                    target,
                    w,
                    accum * tc.batch_size * w,
                )
            self.accumulation = accum
        prev = self.previous_world_size
        if prev == w or (prev is None and ref == w):
            return
        if prev is None:
            change = f"world size {w} at the first start, {ref} for the whole job (imgtrain launch's --nnodes maximum)"
            rest = ""
        else:
            change = f"world size changed {prev} -> {w}"
            rest = f"; the rest of epoch {self.progress.epoch + 1} is re-sharded over the new ranks"
        log.warning(
            "elastic: %s; policy %s: accumulation %d, global batch %d, peak LR %.4g%s",
            change,
            dc.elastic_batch,
            self.accumulation,
            self.global_batch,
            self.peak_lr,
            rest,
            extra={
                "fields": {
                    "previous_world_size": prev,
                    "world_size": w,
                    "reference_world_size": ref,
                    "accumulation": self.accumulation,
                    "global_batch": self.global_batch,
                    "peak_lr": self.peak_lr,
                }
            },
        )

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly. Collective: every rank must call it."""
        rngs = [rng_state()]
        if self.info.enabled:
            gathered: list = [None] * self.info.world_size
            # Live ranks of this very job exchange their RNG streams; nothing read from disk is unpickled.
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model_without_ddp.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "progress": vars(self.progress).copy(),
            "sampler": self.data.train_sampler.state_dict(),
            "rng": rngs,
            "compression": self._compression_state(),
            "world_size": self.info.world_size,
            "reference_world_size": self.reference_world_size,
            "accumulation": self.accumulation,
            "meta": {
                "model": self.cfg.model.name,
                "num_classes": self.data.num_classes,
                "classes": self.data.classes,
                "train_samples": len(self.data.train_set),
            },
            "config": self.cfg.to_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any], source: str) -> None:
        meta = sd.get("meta", {})
        if meta.get("model") != self.cfg.model.name:
            raise CheckpointError(
                f"checkpoint {source} holds model '{meta.get('model')}', the config asks "
                f"for model.name='{self.cfg.model.name}'"
            )
        if meta.get("num_classes") != self.data.num_classes:
            raise CheckpointError(
                f"checkpoint {source} was trained on {meta.get('num_classes')} classes, "
                f"the data at {self.data.train_set.split_dir} has {self.data.num_classes}"
            )
        saved_n, n = sd.get("sampler", {}).get("dataset_len"), len(self.data.train_set)
        if saved_n is not None and int(saved_n) != n:
            # The sample order and the position in the epoch are those of the old split: resuming would
            # skip or repeat images. A new split is a new run (another output_dir, or checkpoint.resume=never).
            raise CheckpointError(
                f"checkpoint {source} was taken on a training split of {saved_n} samples, the "
                f"data at {self.data.train_set.split_dir} now has {n}: train into another "
                f"output_dir, or set checkpoint.resume=never to start over"
            )
        try:
            self.model_without_ddp.load_state_dict(sd["model"])
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {source} does not fit the configured model: {e}") from None
        try:
            self.optimizer.load_state_dict(sd["optimizer"])
        except ValueError as e:  # torch's check of the parameter groups (optimization.* changed since)
            raise CheckpointError(
                f"checkpoint {source}: its optimizer state does not fit the configured "
                f"optimization settings: {e}"
            ) from None
        self.scaler.load_state_dict(sd["scaler"])
        if self.ema is not None and sd.get("ema") is not None:
            self.ema.load_state_dict(sd["ema"])
        self.progress = Progress(**sd["progress"])
        self.data.train_sampler.load_state_dict(sd["sampler"])
        self.reference_world_size = sd.get("reference_world_size")
        self.previous_world_size = sd.get("world_size")
        self._saved_compression = sd.get("compression")
        rngs = sd.get("rng") or []
        if sd.get("world_size") == self.info.world_size and self.info.rank < len(rngs):
            set_rng_state(rngs[self.info.rank])
        else:
            seed_everything(self.cfg.training.seed * 7919 + self.progress.step * 31 + self.info.rank)
            log.warning(
                "RNG streams re-seeded: the checkpoint has %d rank(s), the job now has %d",
                len(rngs),
                self.info.world_size,
            )

    def _load_peer_state(self, sd: dict[str, Any]) -> None:
        """Replicated mode: a live peer's state, fetched by torchft when this group heals."""
        self.load_state_dict(sd, "a live replica group")

    def _maybe_resume(self) -> None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return
        path: str | None = None
        sd: dict[str, Any] | None = None
        if self.info.is_main:
            if mode == "auto":  # verified and loaded in one read of the file
                path, sd = self.checkpointer.load_latest() or (None, None)
            else:
                path = mode
        path = D.broadcast_string(path, self.info)
        if path is None:
            log.info("no checkpoint to resume from in %s: starting fresh", self.checkpointer.directory)
            return
        if sd is None:
            sd = load_checkpoint(path, self.checkpointer.storage_options)
        self.load_state_dict(sd, path)
        self.progress.restarts += 1
        self.resumed_from = path
        log.warning(
            "resumed from %s: epoch %d, step %d, %d samples into the epoch",
            path,
            self.progress.epoch + 1,
            self.progress.step,
            self.data.train_sampler.state.consumed,
            extra={
                "fields": {
                    "checkpoint": path,
                    "epoch": self.progress.epoch + 1,
                    "restarts": self.progress.restarts,
                }
            },
        )

    def save_checkpoint(self, blocking: bool | None = None) -> float:
        """Collective. Returns the stall the training loop paid on this rank."""
        t0 = time.perf_counter()
        state = self.state_dict()
        blocking_write = (not self.cfg.checkpoint.async_save) if blocking is None else blocking
        if blocking_write and self.info.enabled:
            # The other ranks wait in their next collective while rank 0 writes: a slow disk must not
            # look like a dead peer, so every rank widens the collective timeout until the write is done.
            D.set_collective_timeout(self.info, self.cfg.distributed.init_timeout)
        report = self.checkpointer.save(self.progress.step, state, blocking=blocking)
        if blocking_write and self.info.enabled:
            D.barrier(self.info)
            D.set_collective_timeout(self.info, self._collective_timeout())
        stall = time.perf_counter() - t0
        self.last_checkpoint_stall = stall
        self._emit(
            {
                "event": "checkpoint",
                "step": self.progress.step,
                "epoch": self.progress.epoch + 1,
                "path": report.path,
                "stall_s": stall,
                "async": self.cfg.checkpoint.async_save if blocking is None else not blocking,
            }
        )
        return stall

    def _collective_timeout(self) -> float:
        return self.cfg.distributed.timeout if self._steps_this_run > 0 else self.cfg.distributed.init_timeout

    def _log_fault_tolerance_settings(self) -> None:
        ft, dc = self.cfg.fault_tolerance, self.cfg.distributed
        env = {
            k: os.environ[k]
            for k in (
                "TORCHELASTIC_RESTART_COUNT",
                "TORCHELASTIC_MAX_RESTARTS",
                "TORCHELASTIC_RUN_ID",
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE",
                "TORCHELASTIC_USE_AGENT_STORE",
            )
            if k in os.environ
        }
        log.info(
            "fault tolerance: collective timeout %.0fs (first step: %.0fs), hang watchdog %s (first step: "
            "%s), preemption grace %.0fs, checkpoints every %s steps / %s s (%s), keep %d, resume=%s; "
            "torchrun: %s",
            dc.timeout,
            dc.init_timeout,
            _secs(ft.hang_timeout),
            _secs(ft.first_step_timeout),
            ft.grace_period,
            self.cfg.checkpoint.save_every_steps,
            self.cfg.checkpoint.save_interval,
            "async" if self.cfg.checkpoint.async_save else "sync",
            self.cfg.checkpoint.keep_last_n,
            self.cfg.checkpoint.resume,
            env or "not under torchrun",
        )

    # ------------------------------------------------------------------ training

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        self.preemption.install()
        self.watchdog.start()
        t_start = time.perf_counter()
        # When each phase of (re)starting ended, for recovery-time breakdowns (benchmarks/recovery.py).
        self._log_event(
            "start",
            resumed_from=self.resumed_from,
            timeline=self.timeline,
            restarts=self.progress.restarts,
            global_batch=self.global_batch,
            accumulation=self.accumulation,
            peak_lr=self.peak_lr,
        )
        self._notify_start()
        self.profiler.start(self.info.rank)
        stopped_early = False
        try:
            D.set_collective_timeout(self.info, cfg.distributed.init_timeout)
            while self.progress.epoch < cfg.training.epochs:
                finished = self.train_epoch()
                if finished is None:  # replicated: healed, or a step is redone; go on from the position held
                    continue
                if not finished:
                    stopped_early = True
                    if not self.preemption.requested:  # max_steps: still say how good the model is
                        self.evaluate_and_log(self.progress.epoch)
                    break
                epoch = self.progress.epoch  # the epoch just completed (0-based)
                if (epoch + 1) % cfg.training.eval_interval == 0 or epoch + 1 == cfg.training.epochs:
                    self.evaluate_and_log(epoch)
                if self.data.cache is not None:  # shards on an object store: how often the local copy served
                    counts = torch.tensor(self.data.cache.take_counts(), dtype=torch.float64)
                    hits, misses, nbytes = D.all_reduce_sum(
                        counts.to(D.comm_device(self.info)), self.info
                    ).tolist()
                    self._emit(
                        cache_record(epoch + 1, self.progress.step, int(hits), int(misses), int(nbytes))
                    )
                self.progress.epoch += 1
                self.data.train_sampler.state.epoch = self.progress.epoch
                self.data.train_sampler.state.consumed = 0
                if cfg.checkpoint.save_at_epoch_end or self.save_due:
                    self.save_checkpoint()
        finally:
            self.profiler.stop()
            self.bar.close()
            self.watchdog.stop()
        self.checkpointer.wait()
        if self.preemption.requested:
            self._log_event(
                "preempted", signal=self.preemption.signal_name, exit_code=self.preemption.exit_code
            )
            return {"preempted": True, "exit_code": self.preemption.exit_code}
        summary = self._summary(time.perf_counter() - t_start, stopped_early)
        if self.metrics is not None:
            self.metrics.mark_finished()
        if self.info.is_main:
            self._write_final(summary)
            self.notifier.notify(
                "finished",
                f"finished after {summary['steps']} steps, {summary['epochs']} "
                f"epochs: val top-1 {summary['val_top1']}",
                self._notify_details(),
            )
        return summary

    def train_epoch(self) -> bool | None:
        """Runs the rest of the current epoch. Returns False if stopped early (preemption, max_steps), None
        when the batches planned are void (replicated mode: a heal, a step to redo, other replicas)."""
        if self.replicas is not None:
            self.replicas.start_plan()
        self.data.train_sampler.state.epoch = self.progress.epoch
        it = device_batches(self.data.train_loader, self.info.device, self.data.train_batch_transform)
        try:
            return self._train_epoch(it)
        finally:
            close = getattr(it, "close", None)
            if close is not None:  # a background prefetcher must stop before the loader is reused
                close()

    def _train_epoch(self, it) -> bool | None:
        cfg, info = self.cfg, self.info
        sampler = self.data.train_sampler
        n = len(self.data.train_set)
        self.model.train()
        sizes = sampler.global_sizes()
        total_steps = math.ceil(sampler.steps_per_epoch() / self.accumulation)
        done_steps = math.ceil(sampler.state.consumed / (sampler.global_batch * self.accumulation))
        self.bar.start_epoch(self.progress.epoch, cfg.training.epochs, total_steps, done_steps)
        window = _Window()
        if sampler.state.consumed == 0:
            self.epoch_bad = 0
            self.first_bad = []
        epoch_t0 = time.perf_counter()
        micro = 0
        while micro < len(sizes):
            if self.replicas is not None and not self.replicas.plan_holds():
                return None
            group = sizes[micro : micro + self.accumulation]
            lr = self.peak_lr * self.schedule(self.progress.epoch + sampler.state.consumed / n)
            set_lr(self.optimizer, lr)
            t0 = time.perf_counter()
            batches = []
            for _ in group:
                batches.append(next(it))
            t_data = time.perf_counter() - t0
            stats = self.train_step(
                batches, group if self.replicas is None else self.replicas.trained_sizes(group)
            )
            if self.replicas is not None:
                if not self.replicas.committed:
                    return None
                self.replicas.count_dropped(group)
            micro += len(group)
            sampler.state.consumed += sum(group)
            self.progress.step += 1
            t_step = time.perf_counter() - t0
            self.watchdog.beat()
            self.profiler.step()
            if self._steps_this_run == 0:
                D.set_collective_timeout(info, cfg.distributed.timeout)
            self._steps_this_run += 1
            if self.metrics is not None:
                self.metrics.on_step(self.progress.step, t_data)
            window.add(stats, t_data, t_step, sum(group))
            shown = {"loss": f"{self._last_loss:.4f}"} if self._last_loss == self._last_loss else {}
            self.bar.update(1, **shown, lr=f"{lr:.3g}", img_s=f"{sum(group) / max(t_step, 1e-9):.0f}")
            stop = self._should_stop()
            # A save closes the window too: its loss is checked first, so a diverged state is never
            # published as the newest checkpoint (and auto-resumed from).
            if (
                self.progress.step % cfg.training.log_interval == 0
                or stop
                or self.save_due
                or micro >= len(sizes)
            ):
                self._log_window(window, lr, n)
                window = _Window()
            if stop:
                self.progress.train_seconds += time.perf_counter() - epoch_t0
                if self.preemption.requested:
                    log.warning(
                        "preemption (%s): saving a checkpoint at step %d before exiting",
                        self.preemption.signal_name,
                        self.progress.step,
                    )
                    self.save_checkpoint(blocking=True)
                else:  # training.max_steps reached: keep the position so that a longer run can go on
                    self.save_checkpoint()
                return False
            if self.save_due and micro < len(sizes):
                self.save_checkpoint()
        del it
        self.progress.train_seconds += time.perf_counter() - epoch_t0
        return True

    def _should_stop(self) -> bool:
        """All ranks agree on stopping after this step, so that they also agree on the step saved; and on
        whether a save is due (save_interval runs out at slightly different moments on each rank's clock,
        and a save is collective: one rank saving alone would pair its gather with a peer's all-reduce)."""
        flags = torch.tensor(
            [
                1.0 if self.preemption.requested else 0.0,
                1.0 if self.checkpointer.due(self.progress.step) else 0.0,
            ],
            device="cpu" if self.control_group is not None else D.comm_device(self.info),
        )
        D.all_reduce_max(flags, self.info, group=self.control_group)
        flag = flags[0]
        self.save_due = bool(flags[1].item() > 0)
        if flag.item() > 0 and not self.preemption.requested:
            self.preemption.requested_at = time.monotonic()
            self.preemption.signal_name = "peer-preemption"
            self.preemption.exit_code = 143
        max_steps = self.cfg.training.max_steps
        return flag.item() > 0 or (max_steps is not None and self.progress.step >= max_steps)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    def train_step(self, batches: list, global_sizes: list[int]) -> torch.Tensor:
        """One optimizer step over ``len(batches)`` micro-batches (gradient accumulation).

        Returns the step's (loss sum, correct, sample count, unreadable files) as a device tensor.
        Each sample's loss is divided by the number of real samples in the whole step across all ranks
        (times the world size, which DDP's averaging divides out again): the step's gradient is the
        exact mean over its samples however they are split across ranks, micro-batches or a short
        last batch.
        """
        info = self.info
        timer = self.metrics.timer if self.metrics is not None else None
        if timer is not None:
            timer.begin()
        denom = float(sum(global_sizes))
        # Running sums stay on the device: reading them here would wait for the GPU every step.
        sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, correct, count, bad files
        for i, (images, labels, weights, bad_paths) in enumerate(batches):
            sums[3] += len(bad_paths)
            self.first_bad += bad_paths[: _NAMED_BAD_FILES - len(self.first_bad)]
            images = images.to(info.device, non_blocking=True)
            labels = labels.to(info.device, non_blocking=True)
            weights = weights.to(info.device, non_blocking=True)
            x = self.normalize(images)
            targets = labels
            if self.mix is not None:
                x, targets = self.mix(x, labels)
            last = i == len(batches) - 1
            syncs = info.enabled or self.replicas is not None
            sync = contextlib.nullcontext() if last or not syncs else self.model.no_sync()
            with sync:
                with self._autocast():
                    logits = self.model(x)
                    per_sample = self.criterion(logits.float(), targets)
                averaged_over = info.world_size if self.replicas is None else self.replicas.participants
                loss = (per_sample * weights).sum() * (averaged_over / denom)
                self.scaler.scale(loss).backward()
            if timer is not None and last:
                timer.backward_done()
            with torch.no_grad():
                sums[:3] += torch.stack(
                    [
                        (per_sample.detach() * weights).sum(),
                        (logits.argmax(1) == labels).float().mul(weights).sum(),
                        weights.sum(),
                    ]
                ).double()
        oc = self.cfg.optimization
        if oc.gradient_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model_without_ddp.parameters(), oc.gradient_clip)
        commit = self.replicas is None or self.replicas.should_commit()  # replicated: no peer failed
        if commit:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if commit and self.ema is not None and self.progress.step % oc.ema_interval == 0:
            self.ema.update_parameters(self.model_without_ddp)
        if timer is not None:
            timer.end()
        return sums

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model: nn.Module | None = None) -> EvalResult:
        model = model if model is not None else self.model_without_ddp
        return evaluate_model(
            model,
            self.data.val_loader,
            self.normalize,
            self.info,
            self.amp_dtype,
            on_batch=self.watchdog.beat if self.metrics is None else self._beat,
        )

    def _beat(self) -> None:
        self.watchdog.beat()
        self.metrics.heartbeat()

    def evaluate_and_log(self, epoch: int) -> None:
        self.bar.close()
        self.last_eval = self.evaluate()
        n_val = len(self.data.val_set)
        if self.last_eval.bad > self.cfg.data.max_bad_fraction * n_val:
            raise DataError(
                f"{self.last_eval.bad} of {n_val} validation images (all ranks) failed to decode, more "
                f"than data.max_bad_fraction={self.cfg.data.max_bad_fraction}"
                f"{_named(self.last_eval.first_bad, self.info.rank)}"
            )
        record = {
            "event": "eval",
            "epoch": epoch + 1,
            "step": self.progress.step,
            "val_top1": self.last_eval.top1,
            "val_top5": self.last_eval.top5,
            "val_loss": self.last_eval.loss,
            "val_images": self.last_eval.count,
        }
        if self.ema is not None:
            self.last_ema_eval = self.evaluate(self.ema.module)
            record.update(val_ema_top1=self.last_ema_eval.top1, val_ema_top5=self.last_ema_eval.top5)
        self._emit(record)
        log.info(
            "epoch %d/%d: val top-1 %.2f%%, top-5 %.2f%% on %d images%s",
            epoch + 1,
            self.cfg.training.epochs,
            self.last_eval.top1,
            self.last_eval.top5,
            self.last_eval.count,
            f" (EMA top-1 {self.last_ema_eval.top1:.2f}%)" if self.last_ema_eval else "",
        )

    # ------------------------------------------------------------------ reporting

    def _log_window(self, w: _Window, lr: float, n: int) -> None:
        t = w.sums.to(D.comm_device(self.info))
        D.all_reduce_sum(t, self.info)
        loss_sum, correct, count, bad = t.cpu().tolist()
        self._last_loss = loss_sum / max(count, 1e-9)
        self.epoch_bad += int(bad)
        self.progress.bad_images += int(bad)
        self.progress.images_seen += round(count)  # weight 1 per real sample, 0 for padding and bad files
        limit = self.cfg.data.max_bad_fraction * n
        if self.epoch_bad > limit:
            # Counted where the batches are trained; loader workers warn when they decode, which runs ahead
            # (workers x prefetch_factor batches): the warnings above may name more files than this count.
            raise DataError(
                f"{self.epoch_bad} of the training images trained on so far this epoch (all ranks) "
                f"failed to decode, more than data.max_bad_fraction={self.cfg.data.max_bad_fraction} "
                f"of {n}{_named(self.first_bad, self.info.rank)}; the loader, decoding ahead, may "
                f"have warned about more above"
            )
        record = {
            "event": "train",
            "epoch": self.progress.epoch + 1,
            "step": self.progress.step,
            "loss": loss_sum / max(count, 1e-9),
            "train_top1": 100 * correct / max(count, 1e-9),
            "lr": lr,
            "images_per_s": w.images / max(w.seconds, 1e-9),
            "data_wait_s": w.data_wait / max(w.steps, 1),
            "step_s": w.seconds / max(w.steps, 1),
            "bad_images": int(bad),
        }
        if self.compression is not None and self.info.enabled:
            record["comm_bytes_per_step"], record["comm_wire_bytes_per_step"] = self.compression.take_bytes(
                w.steps
            )
        self._emit(record)
        if not math.isfinite(record["loss"]):
            # The loss is all-reduced, so every rank stops here at the same step.
            raise DivergenceError(
                f"training diverged: loss is {record['loss']} at step {self.progress.step} "
                f"(epoch {self.progress.epoch + 1}); nothing was saved after it, the newest "
                f"checkpoint is from before. Lower training.base_lr, set "
                f"optimization.gradient_clip, or use bf16 instead of fp16"
            )

    def _emit(self, record: dict[str, Any]) -> None:
        for s in self._sinks:
            s.log(record)

    def _log_event(self, event: str, **fields: Any) -> None:
        self._emit(
            {
                "event": event,
                "step": self.progress.step,
                "epoch": self.progress.epoch + 1,
                "world_size": self.info.world_size,
                **fields,
            }
        )

    def _notify_details(self) -> dict[str, Any]:
        return {
            "step": self.progress.step,
            "epoch": self.progress.epoch + 1,
            "world size": self.info.world_size,
            "restarts": self.progress.restarts,
            "run directory": str(self.output_dir.resolve()),
        }

    def _notify_start(self) -> None:
        if self.resumed_from:
            self.notifier.notify("resumed", f"resumed from {self.resumed_from}", self._notify_details())
        else:
            self.notifier.notify(
                "started",
                f"started: {self.cfg.model.name}, {self.cfg.training.epochs} epochs, "
                f"global batch {self.global_batch}",
                self._notify_details(),
            )

    def report_failure(self, exc: BaseException, exit_code: int) -> None:
        """An exception is leaving the run: a 'failed' (or 'diverged') record and notification. Never raises."""
        event = "diverged" if isinstance(exc, DivergenceError) else "failed"
        if event == "diverged" and getattr(self, "metrics", None) is not None:
            self.metrics.mark_finished()  # serve the non-finite loss for linger_s: ImgtrainLossNaN fires
        try:
            if hasattr(self, "info"):
                self._log_event(event, exit_code=exit_code, error=f"{type(exc).__name__}: {exc}")
            if hasattr(self, "notifier"):
                self.notifier.notify(
                    event,
                    f"{event} with exit code {exit_code}: {type(exc).__name__}: {exc}",
                    self._notify_details() if hasattr(self, "info") else None,
                )
        except Exception as e:  # the original error is the one to report
            log.warning("could not report the failure: %s: %s", type(e).__name__, e)

    def _summary(self, wall: float, stopped_early: bool) -> dict[str, Any]:
        ev = self.last_eval
        return {
            "val_top1": ev.top1 if ev else None,
            "val_top5": ev.top5 if ev else None,
            "val_images": ev.count if ev else None,
            "val_ema_top1": self.last_ema_eval.top1 if self.last_ema_eval else None,
            "epochs": self.progress.epoch,
            "steps": self.progress.step,
            "images_seen": self.progress.images_seen,
            "bad_images": self.progress.bad_images,
            "val_bad_images": ev.bad if ev else None,
            "wall_seconds": wall,
            "train_seconds": self.progress.train_seconds,
            "mean_train_images_per_s": self.progress.images_seen / max(self.progress.train_seconds, 1e-9),
            "world_size": self.info.world_size,
            "global_batch": self.global_batch,
            "restarts": self.progress.restarts,
            "completed": not stopped_early,
        }

    def _write_final(self, summary: dict[str, Any]) -> None:
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        torch.save(
            {
                "model": self.model_without_ddp.state_dict(),
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
                "meta": {
                    "model": self.cfg.model.name,
                    "num_classes": self.data.num_classes,
                    "classes": self.data.classes,
                },
                "config": self.cfg.to_dict(),
            },
            self.output_dir / "model.pt",
        )
        self._emit({"event": "finished", **summary})

    def close(self) -> None:
        self.preemption.uninstall()
        if self.replicas is not None:
            self.replicas.close()
        if hasattr(self, "checkpointer"):
            self.checkpointer.close()
        for s in self._sinks:
            s.close()
        if hasattr(self, "info"):
            D.destroy_distributed(self.info)


_NAMED_BAD_FILES = 5  # unreadable files named in the error that stops a run


def _named(paths: list[str], rank: int) -> str:
    return f"; the first on rank {rank}: {', '.join(paths)}" if paths else ""


@dataclass
class _Window:
    sums: torch.Tensor | float = 0.0  # device tensor: loss sum, correct, count, unreadable files
    images: int = 0
    seconds: float = 0.0
    data_wait: float = 0.0
    steps: int = 0

    def add(self, sums: torch.Tensor, t_data: float, t_step: float, images: int) -> None:
        self.sums = self.sums + sums
        self.images += images
        self.seconds += t_step
        self.data_wait += t_data
        self.steps += 1


def _fmt_bytes(n: float) -> str:
    return next(
        f"{n / f:.3g} {u}" for f, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B")) if n >= f or f == 1
    )


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def _process_start_time() -> float:
    import psutil

    return psutil.Process().create_time()


def _secs(v: float | None) -> str:
    return "off" if v is None else f"{v:.0f}s"
