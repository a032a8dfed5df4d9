"""The training loop. It owns the step/epoch counters and composes the components built in setup()."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from imgtrain.checkpoint import CheckpointManager, Component
from imgtrain.config import Config, dump_config, literal_credentials
from imgtrain.data import DataBundle, build_data
from imgtrain.data.prefetch import device_batches
from imgtrain.data.shards.cache import cache_record
from imgtrain.data.transforms import DeviceNormalize, batch_mix
from imgtrain.distributed import process_group as D
from imgtrain.distributed.comm_hooks import Compression, create_compression
from imgtrain.distributed.launch import max_world_size_from_launcher
from imgtrain.errors import CheckpointError, DataError, DivergenceError
from imgtrain.fault import PreemptionHandler, Watchdog
from imgtrain.models import create_model
from imgtrain.monitoring import JsonlSink, MetricsSink, ProgressBar
from imgtrain.monitoring.logs import LogSink, configure_logging, resolve_run_id
from imgtrain.monitoring.notify import Notifier
from imgtrain.monitoring.processor import MetricsProcessor
from imgtrain.monitoring.profiler import StepProfiler
from imgtrain.optim import create_optimizer, create_schedule, scaled_lr, set_lr
from imgtrain.precision import amp_dtype
from imgtrain.train.elastic import accumulation_for, log_world_size_change
from imgtrain.train.evaluate import EvalResult, evaluate_model
from imgtrain.train.state import Progress, rng_state, seed_everything, set_rng_state

if TYPE_CHECKING:
    from imgtrain.monitoring.metrics import PrometheusMetrics

log = logging.getLogger(__name__)


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
        # Components, built by setup() (or, for the batch-size finder's probes, by setup_step()); None
        # until then, so that report_failure() and close() work whenever setup() stopped.
        self.info: D.DistInfo | None = None
        self.run_id: str | None = None
        self.notifier: Notifier | None = None
        self.control_group: Any = None  # a Gloo group beside NCCL for the per-step agreements, else None
        self.data: DataBundle | None = None
        self.checkpointer: CheckpointManager | None = None
        self.model_without_ddp: nn.Module | None = None
        self.model: nn.Module | None = None  # model_without_ddp wrapped in DDP (and compiled), as trained
        self.channels_last = False
        self.normalize: DeviceNormalize | None = None
        self.mix: Callable | None = None  # mixup/cutmix of a normalized batch and its labels, if configured
        self.optimizer: torch.optim.Optimizer | None = None
        self.amp_dtype: torch.dtype | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.ema: AveragedModel | None = None
        self.criterion: nn.Module | None = None
        self.schedule: Callable[[float], float] | None = None
        self.compression: Compression | None = None
        self.metrics: PrometheusMetrics | None = None  # monitoring.prometheus.enabled; None costs nothing
        self.metrics_processor: MetricsProcessor | None = None
        self.watchdog: Watchdog | None = None
        self.preemption = PreemptionHandler(cfg.fault_tolerance.grace_period)
        self.profiler = StepProfiler(cfg.profiler, self.output_dir)
        self.accumulation = cfg.optimization.accumulation_steps
        self.reference_world_size: int | None = None  # the job's full world size (see _apply_elastic_policy)
        self.previous_world_size: int | None = None  # of the checkpoint resumed from
        self.last_eval: EvalResult | None = None
        self.last_ema_eval: EvalResult | None = None
        self.resumed_from: str | None = None
        self.epoch_bad = 0  # unreadable training files in the steps trained this epoch, all ranks
        self.first_bad: list[str] = []  # the first of them on this rank, named by the ceiling's error
        self.last_checkpoint_stall = 0.0
        self.save_due = False  # agreed by all ranks after each step (see _should_stop)
        self.timeline: dict[str, float] = {"process_start": _process_start_time()}
        self._steps_this_run = 0  # steps since this process started (the first one gets init_timeout)
        self._saved_compression: dict[str, Any] | None = None  # from the checkpoint, applied after DDP wrap

    # ------------------------------------------------------------------ setup

    def setup(self) -> Trainer:
        cfg = self.cfg
        t0 = time.time()
        self.info = D.init_distributed(cfg.distributed)
        self.timeline["process_group_ready"] = time.time()
        self.timeline["setup_start"] = t0
        self.run_id = resolve_run_id(cfg.monitoring.run_id, self.output_dir)
        # The log handlers outlive the trainer (they are the root logger's): they hold its progress, not the
        # trainer, whose model and process group must go when it closes (see close()).
        progress = self.progress
        configure_logging(
            self.info.rank,
            self.info.is_main,
            self.run_id,
            self.output_dir,
            cfg.monitoring.log_format,
            step_fn=lambda: progress.step,
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
            cfg.checkpoint,
            ckpt_dir,
            is_writer=info.is_main,
            run_id=checkpoint_run_id(cfg),
            rank=info.rank,
            world_size=info.world_size,
            agree=lambda text: D.broadcast_string(text, info),
            rank_timeout=cfg.distributed.init_timeout,
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
        self._build_step_parts(self.data.num_classes)
        self.timeline["built"] = time.time()
        self._register_state()
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
        sinks: list[MetricsSink] = []
        if info.is_main:
            sinks.append(JsonlSink(self.output_dir / "metrics.jsonl"))
        sinks.append(LogSink(info.rank))
        if info.is_main and cfg.monitoring.tensorboard:
            from imgtrain.monitoring.tensorboard import TensorBoardSink

            sinks.append(TensorBoardSink(self.output_dir / "tensorboard"))
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
            sinks.append(self.metrics)
        self.metrics_processor = MetricsProcessor(
            info,
            cfg.training.log_interval,
            sinks,
            bar=ProgressBar(info.is_main and cfg.training.progress_bar),
            prometheus=self.metrics,
            compression=self.compression,
        )
        self.watchdog = Watchdog(
            cfg.fault_tolerance.hang_timeout, cfg.fault_tolerance.first_step_timeout, rank=info.rank
        )
        log.info(
            "imgtrain: world size %d (%s), device %s, global batch %d = %d per process x %d "
            "processes%s x %d accumulation steps, peak LR %.4g",
            info.world_size,
            info.backend or "no process group",
            info.device,
            self.global_batch,
            cfg.training.batch_size,
            info.world_size,
            "" if self.replicas is None else f" x {self.replicas.num_groups} replica groups",
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

    def setup_step(self, num_classes: int, device: torch.device) -> Trainer:
        """Only what train_step() needs, in one process on ``device``: no process group, data, run
        directory or checkpoint. The batch-size finder's probes step through this, so that a probe costs
        what a training step costs (model, optimizer state, EMA, AMP, loss as configured)."""
        self.info = D.DistInfo(
            rank=0,
            local_rank=0,
            world_size=1,
            device=device,
            backend=None,
            node=platform.node(),
            restart_count=0,
        )
        seed_everything(self.cfg.training.seed)
        self._build_step_parts(num_classes)
        self.model = self.model_without_ddp.train()
        return self

    def _build_step_parts(self, num_classes: int) -> None:
        cfg, device = self.cfg, self.info.device
        self.model_without_ddp = create_model(cfg.model, num_classes, cfg.data.image_size)
        self.model_without_ddp.to(device)
        self.channels_last = cfg.model.channels_last and device.type == "cuda"
        if self.channels_last:
            self.model_without_ddp.to(memory_format=torch.channels_last)
        self.normalize = DeviceNormalize(cfg.data.mean, cfg.data.std, device, self.channels_last)
        self.mix = batch_mix(cfg.data, num_classes)
        oc = cfg.optimization
        self.optimizer = create_optimizer(self.model_without_ddp, oc, lr=cfg.training.base_lr)
        self.amp_dtype = amp_dtype(oc.mixed_precision)
        self.scaler = torch.amp.GradScaler(device.type, enabled=oc.mixed_precision == "fp16")
        if oc.ema:
            self.ema = AveragedModel(
                self.model_without_ddp, multi_avg_fn=get_ema_multi_avg_fn(oc.ema_decay), use_buffers=True
            )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=oc.label_smoothing, reduction="none")
        self.schedule = create_schedule(cfg.training)

    def _setup_compression(self) -> None:
        info, dc = self.info, self.cfg.distributed
        self.compression = create_compression(self.model, dc, info.world_size, info.backend)
        saved = self._saved_compression  # {method, world_size, state} of the checkpoint resumed from
        if saved is not None and saved["method"] == dc.compression and dc.compression != "none":
            if saved["state"] is None:  # a checkpoint of another world size: no rank file of ours
                log.warning(
                    "compression: the checkpoint's %s state is from %s ranks, the job has %d: reset "
                    "(error feedback starts from zero)",
                    dc.compression,
                    saved["world_size"],
                    info.world_size,
                )
            else:
                self.compression.load_state_dict(saved["state"])
        elif saved is not None and saved["method"] not in ("none", dc.compression):
            log.warning(
                "compression: the checkpoint was saved with %s, the config asks for %s: %s starts fresh",
                saved["method"],
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

    @property
    def global_batch(self) -> int:
        groups = 1 if self.replicas is None else self.replicas.num_groups  # replicated: all groups' shares
        return self.cfg.training.batch_size * self.info.world_size * groups * self.accumulation

    @property
    def peak_lr(self) -> float:
        return scaled_lr(self.cfg.training, self.global_batch)

    def _apply_elastic_policy(self) -> None:
        """Sets the gradient accumulation for this start's world size (train/elastic.py) and logs it."""
        w = self.info.world_size
        if self.reference_world_size is None:
            self.reference_world_size = max(w, max_world_size_from_launcher() or w)
        self.accumulation = accumulation_for(self.cfg, w, self.reference_world_size)
        log_world_size_change(
            self.cfg,
            previous=self.previous_world_size,
            world_size=w,
            reference=self.reference_world_size,
            accumulation=self.accumulation,
            global_batch=self.global_batch,
            peak_lr=self.peak_lr,
            epoch=self.progress.epoch,
        )

    # ------------------------------------------------------------------ state

    def _register_state(self) -> None:
        """Everything needed to continue exactly, registered with the checkpoint manager, which saves and
        restores it in this order. The RNG streams and the compression state are each rank's own."""
        c = self.checkpointer
        c.register("meta", Component(self._meta))
        c.register("model", self.model_without_ddp)
        c.register("optimizer", Component(self.optimizer.state_dict, self._load_optimizer_state))
        c.register("scaler", self.scaler)
        if self.ema is not None:
            c.register("ema", self.ema, optional=True)
        c.register("progress", self.progress)
        c.register("sampler", self.data.train_sampler)
        c.register("run", Component(self._run_state, self._load_run_state))
        c.register("config", Component(self.cfg.to_dict))
        c.register("rng", Component(rng_state, set_rng_state), rank_local=True)
        c.register(
            "compression", Component(self._compression_state, self._load_compression_state), rank_local=True
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: every registered component, by name, as live tensors
        (the shared state and this rank's own RNG streams and compression state). Not collective."""
        return self.checkpointer.state_dict()

    def load_state_dict(self, sd: dict[str, Any], source: str) -> None:
        """Restore what :meth:`state_dict` returned (after the checks a checkpoint gets; ``source`` names it in
        errors). Without RNG streams of this rank (another world size), they are re-derived."""
        self._check_checkpoint(sd, source)
        loaded = self.checkpointer.load_state_dict(sd, source)
        self._rederive_missing(loaded.missing, world_size=sd.get("run", {}).get("world_size"))

    def _load_optimizer_state(self, sd: dict[str, Any]) -> None:
        try:
            self.optimizer.load_state_dict(sd)
        except ValueError as e:  # torch's check of the parameter groups (optimization.* changed since)
            raise CheckpointError(
                f"its optimizer state does not fit the configured optimization settings: {e}"
            ) from None

    def _meta(self) -> dict[str, Any]:
        return {
            "model": self.cfg.model.name,
            "num_classes": self.data.num_classes,
            "classes": self.data.classes,
            "train_samples": len(self.data.train_set),
        }

    def _run_state(self) -> dict[str, Any]:
        return {
            "world_size": self.info.world_size,
            "reference_world_size": self.reference_world_size,
            "accumulation": self.accumulation,  # informative: recomputed at every start
            "compression": self.compression.method if self.compression is not None else "none",
        }

    def _load_run_state(self, sd: dict[str, Any]) -> None:
        self.reference_world_size = sd.get("reference_world_size")
        self.previous_world_size = sd.get("world_size")
        self._saved_compression = {
            "method": sd.get("compression", "none"),
            "world_size": sd.get("world_size"),
            "state": None,
        }

    def _compression_state(self) -> dict[str, Any] | None:
        if self.compression is None or self.compression.method == "none":
            return None
        return {"method": self.compression.method, "state": self.compression.state_dict()}

    def _load_compression_state(self, sd: dict[str, Any]) -> None:
        # The hooks are built after DDP wraps the model, after loading: _setup_compression applies it.
        if self._saved_compression is not None and sd.get("method") == self._saved_compression["method"]:
            self._saved_compression["state"] = sd["state"]

    def _check_checkpoint(self, sd: dict[str, Any], source: str) -> None:
        """Refuse a checkpoint of another model, class count or training split before restoring anything;
        bring a format-1 checkpoint (every rank's state in state.pt) to the current layout."""
        if sd.get("format") == 1:
            _upgrade_format1(sd, self.info.rank, self.info.world_size)
        meta = sd.get("meta") or {}
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
        saved_n, n = (sd.get("sampler") or {}).get("dataset_len"), len(self.data.train_set)
        if saved_n is not None and int(saved_n) != n:
            # The sample order and the position in the epoch are those of the old split: resuming would
            # skip or repeat images. A new split is a new run (another output_dir, or checkpoint.resume=never).
            raise CheckpointError(
                f"checkpoint {source} was taken on a training split of {saved_n} samples, the "
                f"data at {self.data.train_set.split_dir} now has {n}: train into another "
                f"output_dir, or set checkpoint.resume=never to start over"
            )

    def _rederive_missing(self, missing: list[str], world_size: int | None) -> None:
        if "rng" in missing:
            seed_everything(self.cfg.training.seed * 7919 + self.progress.step * 31 + self.info.rank)
            log.warning(
                "RNG streams re-seeded: the checkpoint has %s rank(s), the job now has %d",
                world_size,
                self.info.world_size,
            )

    def _load_peer_state(self, sd: dict[str, Any]) -> None:
        """Replicated mode: a live peer's state, fetched by torchft when this group heals."""
        self.load_state_dict(sd, "a live replica group")

    def _maybe_resume(self) -> None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return
        which = "latest" if mode == "auto" else mode
        if mode == "auto" and self.cfg.fault_tolerance.mode == "replicated" and self.info.rank == 0:
            which = self._newest_of_all_groups() or which
        loaded = self.checkpointer.load(which, before_restore=self._check_checkpoint)
        if loaded is None:
            log.info("no checkpoint to resume from in %s: starting fresh", self.checkpointer.directory)
            return
        self._rederive_missing(loaded.missing, self.previous_world_size)
        path = loaded.path
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

    def _newest_of_all_groups(self) -> str | None:
        """Replicated mode: the newest verified checkpoint of this run in any group's checkpoint directory.
        When every group was down at once, a group's own newest may be far behind another's: resuming from
        its own would redo the difference (and the groups would heal back to whoever came up first)."""
        if self.cfg.checkpoint.dir:
            return None  # one directory for every group: "latest" already sees all of them
        best: tuple[int, str] | None = None
        for group in range(self.cfg.fault_tolerance.replicated.num_groups):
            directory = Path(self.cfg.output_dir) / f"group-{group}" / "checkpoints"
            reader = CheckpointManager(
                self.cfg.checkpoint, str(directory), is_writer=False, run_id=self.checkpointer.run_id
            )
            try:
                path = reader.resolve("latest")
                step = next((c.step for c in reader.list() if c.path == path), None)
            finally:
                reader.close()
            if path is not None and step is not None and (best is None or step > best[0]):
                best = (step, path)
        return best[1] if best else None

    def save_checkpoint(self, blocking: bool | None = None) -> float:
        """Collective. Returns the stall the training loop paid on this rank."""
        t0 = time.perf_counter()
        blocking_write = (not self.cfg.checkpoint.async_save) if blocking is None else blocking
        if blocking_write and self.info.enabled:
            # The other ranks wait in their next collective while rank 0 writes: a slow disk must not
            # look like a dead peer, so every rank widens the collective timeout until the write is done.
            D.set_collective_timeout(self.info, self.cfg.distributed.init_timeout)
        report = self.checkpointer.save(self.progress.step, blocking=blocking)
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
            self.metrics_processor.end_epoch()
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
        cfg = self.cfg
        sampler = self.data.train_sampler
        n = len(self.data.train_set)
        self.model.train()
        sizes = sampler.global_sizes()
        total_steps = math.ceil(sampler.steps_per_epoch() / self.accumulation)
        done_steps = math.ceil(sampler.state.consumed / (sampler.global_batch * self.accumulation))
        self.metrics_processor.start_epoch(self.progress.epoch, cfg.training.epochs, total_steps, done_steps)
        if sampler.state.consumed == 0:
            self.epoch_bad = 0
            self.first_bad = []
        epoch_t0 = time.perf_counter()
        micro = 0
        while micro < len(sizes):
            if self.replicas is not None and not self.replicas.plan_holds():
                return None
            group = sizes[micro : micro + self.accumulation]
            lr = self._scheduled_lr()
            t0 = time.perf_counter()
            batches = [next(it) for _ in group]
            t_data = time.perf_counter() - t0
            stats = self.train_step(
                batches, group if self.replicas is None else self.replicas.trained_sizes(group), lr
            )
            if self.replicas is not None:
                if not self.replicas.committed:
                    return None
                self.replicas.count_dropped(group)
            micro += len(group)
            sampler.state.consumed += sum(group)
            self._end_step(stats, lr, t_data, time.perf_counter() - t0, sum(group))
            stop = self._should_stop()
            # A save closes the window too: its loss is checked first, so a diverged state is never
            # published as the newest checkpoint (and auto-resumed from).
            if (
                self.metrics_processor.should_log(self.progress.step)
                or stop
                or self.save_due
                or micro >= len(sizes)
            ):
                self._log_window(lr, n)
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

    def run_steps(self, batches: Iterator, steps: int) -> None:
        """``steps`` optimizer steps on batches the caller holds (each ``next(batches)`` one micro-batch as
        the loader yields it), through the loop's own per-step path: train_step at the scheduled LR, the
        step counter, watchdog, profiler and the metrics processor (a train record every log_interval
        steps). The sampler's position, the epoch and the checkpoints do not move: benchmarks use this to
        time training on in-memory batches."""
        n = len(self.data.train_set)
        lr = self._scheduled_lr()
        self.model.train()
        for _ in range(steps):
            t0 = time.perf_counter()
            group = [next(batches) for _ in range(self.accumulation)]
            t_data = time.perf_counter() - t0
            sizes = [len(b[1]) * self.info.world_size for b in group]
            stats = self.train_step(group, sizes, lr)
            self._end_step(stats, lr, t_data, time.perf_counter() - t0, sum(sizes))
            if self.metrics_processor.should_log(self.progress.step):
                self._log_window(lr, n)

    def _scheduled_lr(self) -> float:
        """The LR at the current position: the schedule runs on fractional epochs."""
        consumed = self.data.train_sampler.state.consumed
        return self.peak_lr * self.schedule(self.progress.epoch + consumed / len(self.data.train_set))

    def _end_step(self, stats: torch.Tensor, lr: float, t_data: float, t_step: float, images: int) -> None:
        """After every optimizer step: the only place the step counter advances."""
        self.progress.step += 1
        self.watchdog.beat()
        self.profiler.step()
        if self._steps_this_run == 0:
            D.set_collective_timeout(self.info, self.cfg.distributed.timeout)
        self._steps_this_run += 1
        self.metrics_processor.on_step(self.progress.step, stats, t_data, t_step, images, lr)

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

    def train_step(self, batches: list, global_sizes: list[int], lr: float | None = None) -> torch.Tensor:
        """One optimizer step over ``len(batches)`` micro-batches (gradient accumulation), each as the
        loader yields it: (uint8 images, labels, weights, unreadable paths); ``global_sizes`` are their
        real samples summed over all ranks. ``lr``: set before the optimizer step (None keeps the LR).

        Returns the step's (loss sum, correct, sample count, unreadable files) as a device tensor.
        Each sample's loss is divided by the number of real samples in the whole step across all ranks
        (times the world size, which DDP's averaging divides out again): the step's gradient is the
        exact mean over its samples however they are split across ranks, micro-batches or a short
        last batch. The step counter is not advanced here (see _end_step).
        """
        info = self.info
        timer = self.metrics.timer if self.metrics is not None else None
        if timer is not None:
            timer.begin()
        # Replicated mode: torchft averages over the replica groups in this step's quorum.
        averaged_over = info.world_size if self.replicas is None else self.replicas.participants
        loss_scale = averaged_over / float(sum(global_sizes))
        # Running sums stay on the device: reading them here would wait for the GPU every step.
        sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, correct, count, bad files
        for i, (images, labels, weights, bad_paths) in enumerate(batches):
            sums[3] += len(bad_paths)
            self.first_bad += bad_paths[: _NAMED_BAD_FILES - len(self.first_bad)]
            images = images.to(info.device, non_blocking=True)
            labels = labels.to(info.device, non_blocking=True)
            weights = weights.to(info.device, non_blocking=True)
            # DDP all-reduces the gradients only in the last micro-batch's backward.
            last = i == len(batches) - 1
            syncs = info.enabled or self.replicas is not None
            sync = contextlib.nullcontext() if last or not syncs else self.model.no_sync()
            with sync:
                sums[:3] += self.forward_backward_step(images, labels, weights, loss_scale)
        if timer is not None:
            timer.backward_done()
        if self.replicas is None or self.replicas.should_commit():  # replicated: no peer failed this step
            self.optimizer_step(lr)
        self.optimizer.zero_grad(set_to_none=True)
        if timer is not None:
            timer.end()
        return sums

    def forward_backward_step(
        self, images: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, loss_scale: float
    ) -> torch.Tensor:
        """One micro-batch on the device: normalize (and mix) the uint8 images, forward under autocast,
        the per-sample loss weighted by ``weights`` (0 for padding and unreadable files) times
        ``loss_scale``, backward through the loss scaler. Gradients accumulate; DDP's ``no_sync`` is the
        caller's. Returns the micro-batch's (weighted loss sum, weighted correct, weight sum), detached,
        as a float64 device tensor."""
        x = self.normalize(images)
        targets = labels
        if self.mix is not None:
            x, targets = self.mix(x, labels)
        with self._autocast():
            logits = self.model(x)
            per_sample = self.criterion(logits.float(), targets)
        loss = (per_sample * weights).sum() * loss_scale
        self.scaler.scale(loss).backward()
        with torch.no_grad():
            return torch.stack(
                [
                    (per_sample.detach() * weights).sum(),
                    (logits.argmax(1) == labels).float().mul(weights).sum(),
                    weights.sum(),
                ]
            ).double()

    def optimizer_step(self, lr: float | None = None) -> None:
        """Unscale and clip the accumulated gradients, set ``lr``, step the optimizer and the loss scaler,
        update the EMA. Gradients are cleared by the caller either way, so that a step the replicas did
        not commit to (torchft's commit gate: one ``if`` around this call) is dropped whole."""
        oc = self.cfg.optimization
        if oc.gradient_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model_without_ddp.parameters(), oc.gradient_clip)
        if lr is not None:
            set_lr(self.optimizer, lr)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None and self.progress.step % oc.ema_interval == 0:
            self.ema.update_parameters(self.model_without_ddp)

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
        self.metrics_processor.end_epoch()
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

    def _log_window(self, lr: float, n: int) -> None:
        """Closes the metrics window (collective): counts its samples and unreadable files, enforces
        data.max_bad_fraction of the ``n`` training images, publishes the train record, stops on a
        non-finite loss."""
        totals = self.metrics_processor.reduce_window()
        self.epoch_bad += totals.bad
        self.progress.bad_images += totals.bad
        self.progress.images_seen += round(totals.count)  # padding and unreadable files weigh 0
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
        record = self.metrics_processor.log_window(totals, self.progress.step, self.progress.epoch, lr)
        if not math.isfinite(record["loss"]):
            # The loss is all-reduced, so every rank stops here at the same step.
            raise DivergenceError(
                f"training diverged: loss is {record['loss']} at step {self.progress.step} "
                f"(epoch {self.progress.epoch + 1}); nothing was saved after it, the newest "
                f"checkpoint is from before. Lower training.base_lr, set "
                f"optimization.gradient_clip, or use bf16 instead of fp16"
            )

    def _emit(self, record: dict[str, Any]) -> None:
        if self.metrics_processor is not None:  # None until setup() built the sinks: nothing to write to
            self.metrics_processor.log(record)

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
        if event == "diverged" and self.metrics is not None:
            self.metrics.mark_finished()  # serve the non-finite loss for linger_s: ImgtrainLossNaN fires
        try:
            if self.info is not None:
                self._log_event(event, exit_code=exit_code, error=f"{type(exc).__name__}: {exc}")
            if self.notifier is not None:
                self.notifier.notify(
                    event,
                    f"{event} with exit code {exit_code}: {type(exc).__name__}: {exc}",
                    self._notify_details(),
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
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.metrics_processor is not None:
            self.metrics_processor.close()
        if self.info is not None:
            # DDP's reducer holds the process group (and NCCL runs' control group is a Gloo one): dropped
            # first, the groups are freed by destroy_distributed, their Gloo threads joined now rather than
            # during interpreter exit.
            self.model = self.model_without_ddp
            self.control_group = None
            D.destroy_distributed(self.info)


_NAMED_BAD_FILES = 5  # unreadable files named in the error that stops a run


def _named(paths: list[str], rank: int) -> str:
    return f"; the first on rank {rank}: {', '.join(paths)}" if paths else ""


def _fmt_bytes(n: float) -> str:
    return next(
        f"{n / f:.3g} {u}" for f, u in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B")) if n >= f or f == 1
    )


def _upgrade_format1(sd: dict[str, Any], rank: int, world_size: int) -> None:
    """A format-1 checkpoint held every rank's RNG streams and compression state in state.pt: keep this
    rank's at the same world size, none at another (as with a checkpoint of today's format)."""
    saved, rngs, comp = sd.get("world_size"), sd.pop("rng", None) or [], sd.pop("compression", None)
    sd["run"] = {
        "world_size": saved,
        "reference_world_size": sd.get("reference_world_size"),
        "compression": comp["method"] if comp else "none",
    }
    if saved == world_size and rank < len(rngs):
        sd["rng"] = rngs[rank]
    if comp is not None and comp.get("world_size") == world_size:
        sd["compression"] = {"method": comp["method"], "state": comp["ranks"][rank]}


def _process_start_time() -> float:
    import psutil

    return psutil.Process().create_time()


def _secs(v: float | None) -> str:
    return "off" if v is None else f"{v:.0f}s"
