"""Prometheus metrics of one training process, served over HTTP by prometheus_client.

Every process serves its own endpoint on ``monitoring.prometheus.port + LOCAL_RANK`` (so 8 processes
per node use 8 consecutive ports on each node) at ``bind_address``; every series carries the labels
``run_id``, ``rank``, ``local_rank`` and ``node``. The full list of metrics is in docs/monitoring.md.

This is one more metrics sink: the trainer hands it the same records as metrics.jsonl (train windows,
evaluations, checkpoints), plus per-step timings and a heartbeat. The registry belongs to this object
(no process-global state). When ``monitoring.prometheus.enabled`` is false none of this is built: no
server, no hooks, no timers, no collectives.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from torch import nn

from imgtrain.config import Config, ConfigError
from imgtrain.monitoring.logs import resolve_run_id
from imgtrain.monitoring.sinks import MetricsSink
from imgtrain.monitoring.step_timer import PHASES, StepPhaseTimer
from imgtrain.monitoring.stragglers import StragglerDetector, gather_step_times
from imgtrain.monitoring.system import SystemCollector

log = logging.getLogger(__name__)

LABELS = ("run_id", "rank", "local_rank", "node")


def run_id_for(cfg: Config) -> str:
    """The same run id as the JSON logs and notifications carry (monitoring.logs.resolve_run_id)."""
    return resolve_run_id(cfg.monitoring.run_id, cfg.output_dir)


class PrometheusMetrics(MetricsSink):
    def __init__(
        self,
        cfg: Config,
        info: Any,
        model: nn.Module,
        *,
        steps_per_epoch: int,
        group=None,
        checkpointer: Any = None,
    ):
        pc = cfg.monitoring.prometheus
        self.cfg, self.pc, self.info, self.group = cfg, pc, info, group
        self.steps_per_epoch = steps_per_epoch
        self.labels = {
            "run_id": run_id_for(cfg),
            "rank": str(info.rank),
            "local_rank": str(info.local_rank),
            "node": info.node,
        }
        self.registry = CollectorRegistry(auto_describe=True)
        self.timer = StepPhaseTimer(model, info.device)
        self.detector = StragglerDetector(pc.straggler_threshold, pc.straggler_patience)
        self._pushed = dict.fromkeys(PHASES, 0.0)
        self._own_at_check, self._steps_at_check, self._steps = 0.0, 0, 0
        self._step_s = math.nan  # mean wall time per step of the last record window
        self._last_checkpoint = time.time()  # before the first save: since this process started training
        self.finished = False

        g, c = self._gauge, self._counter
        g(
            "run_info",
            "Constant 1; the labels describe the run",
            model=cfg.model.name,
            backend=str(info.backend),
            device_type=info.device.type,
        ).set(1)
        self.step = g("global_step", "Optimizer steps since the start of the run")
        self.epoch = g("epoch", "Current epoch (1-based)")
        self.loss = g("loss", "Mean training loss over the last logged window (all ranks)")
        self.train_top1 = g("train_top1_percent", "Training top-1 over the last logged window (all ranks)")
        self.lr = g("learning_rate", "Learning rate")
        self.images_per_s = g(
            "images_per_second",
            "Training images per second, all ranks together, over the "
            "last logged window as timed by this rank",
        )
        self.step_seconds = g("step_seconds", "Mean wall time of one optimizer step over the last window")
        self.phase_total = Counter(
            "imgtrain_step_phase_seconds",
            "Seconds spent per phase of the training step: "
            "data_wait, forward_backward, allreduce_exposed, optimizer, checkpoint_stall",
            [*LABELS, "phase"],
            registry=self.registry,
        )
        for p in PHASES:
            self.phase_total.labels(**self.labels, phase=p)  # every phase is a series from the start
        self.val_top1 = g("val_top1_percent", "Validation top-1 of the last evaluation")
        self.val_top5 = g("val_top5_percent", "Validation top-5 of the last evaluation")
        self.val_loss = g("val_loss", "Validation loss of the last evaluation")
        self.bad_files = c("bad_files", "Training images that failed to decode (all ranks)")
        self.restarts = g("restarts", "Times this run resumed from a checkpoint (restarts seen)")
        self.world_size = g("world_size", "Processes in the job")
        self.world_size.set(info.world_size)
        self.running = g("running", "1 while the run trains or evaluates, 0 once it finished")
        self.running.set(1)
        self.progress_ts = g(
            "last_progress_timestamp_seconds",
            "Unix time of the last finished training step or evaluation batch",
        )
        self.progress_ts.set(time.time())
        g("stall_threshold_seconds", "monitoring.prometheus.stall_after_s: the stall alert's threshold").set(
            pc.stall_after_s
        )
        g(
            "checkpoint_age_seconds",
            "Seconds since the last checkpoint's state was taken (before the first "
            "save: since training started in this process)",
        ).set_function(lambda: time.time() - self._last_checkpoint)
        g(
            "checkpoint_interval_seconds",
            "Expected seconds between checkpoints: checkpoint.save_interval, or "
            "save_every_steps / steps per epoch times the current step time, whichever is shortest",
        ).set_function(self._checkpoint_interval)
        self.ckpt_stall = g("checkpoint_stall_seconds", "How long the last checkpoint held the training loop")
        self.ckpt_count = c("checkpoints", "Checkpoints taken by this process since it started")
        if checkpointer is not None and checkpointer.is_writer:
            g(
                "checkpoint_write_seconds",
                "Duration of the last checkpoint write (serialize, write, fsync, "
                "publish; in the background when async)",
            ).set_function(lambda: checkpointer.last_write_seconds)
            g("checkpoint_failures", "Checkpoint writes that failed since this process started").set_function(
                lambda: checkpointer.failures
            )
        self.max_over_median = g(
            "step_time_max_over_median",
            "Slowest rank's own step time (without waiting "
            "for peers) over the median rank's, at the last straggler check",
        )
        self.straggler_rank = g("straggler_rank", "Rank named as straggler, or -1 when there is none")
        self.straggler_rank.set(-1)
        self.registry.register(SystemCollector(self.labels, info.device))
        self.replicas = _ReplicaMetrics(self) if cfg.fault_tolerance.mode == "replicated" else None
        self._serve()

    # ---------------------------------------------------------------- construction helpers

    def _gauge(self, name: str, doc: str, **extra: str):
        gauge = Gauge(f"imgtrain_{name}", doc, [*LABELS, *extra], registry=self.registry)
        return gauge.labels(**self.labels, **extra)

    def _counter(self, name: str, doc: str, **extra: str):
        counter = Counter(f"imgtrain_{name}", doc, [*LABELS, *extra], registry=self.registry)
        return counter.labels(**self.labels, **extra)

    def _serve(self) -> None:
        port = self.pc.port + self.info.local_rank if self.pc.port else 0
        try:
            self.server, self._thread = start_http_server(
                port, addr=self.pc.bind_address, registry=self.registry
            )
        except OSError as e:
            raise ConfigError(
                "monitoring.prometheus.port",
                self.pc.port,
                f"a port where local rank {self.info.local_rank} can listen on "
                f"{self.pc.bind_address}:{port} (port + local rank): {e}",
            ) from None
        self.port = self.server.server_address[1]
        log.info(
            "prometheus metrics of rank %d on http://%s:%d/metrics",
            self.info.rank,
            self.pc.bind_address,
            self.port,
        )

    def _checkpoint_interval(self) -> float:
        ck = self.cfg.checkpoint
        out = [ck.save_interval] if ck.save_interval else []
        if math.isfinite(self._step_s):
            if ck.save_every_steps:
                out.append(ck.save_every_steps * self._step_s)
            if ck.save_at_epoch_end:
                out.append(self.steps_per_epoch * self._step_s)
        return min(out) if out else math.nan

    # ---------------------------------------------------------------- called by the trainer

    def heartbeat(self) -> None:
        self.progress_ts.set(time.time())

    def on_step(self, step: int, data_wait_s: float) -> None:
        """After every optimizer step, on every rank (the straggler check is collective)."""
        self.timer.add("data_wait", data_wait_s)
        self._steps += 1
        self.step.set(step)
        self.progress_ts.set(time.time())
        if step % self.pc.straggler_interval == 0:
            self._check_stragglers()

    def _check_stragglers(self) -> None:
        t = self.timer.resolve()
        own = t["data_wait"] + t["forward_backward"] + t["optimizer"]
        steps = self._steps - self._steps_at_check
        mean_own = (own - self._own_at_check) / max(steps, 1)
        self._own_at_check, self._steps_at_check = own, self._steps
        times = (
            gather_step_times(mean_own, self.info.world_size, self.group) if self.info.enabled else [mean_own]
        )
        verdict = self.detector.update(times)
        self.max_over_median.set(verdict.max_over_median)
        self.straggler_rank.set(-1 if verdict.straggler is None else verdict.straggler)

    def mark_finished(self) -> None:
        self.finished = True
        self.running.set(0)

    def log(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        if event == "train":
            self.loss.set(record["loss"])
            self.train_top1.set(record["train_top1"])
            self.lr.set(record["lr"])
            self.images_per_s.set(record["images_per_s"])
            self.step_seconds.set(record["step_s"])
            self._step_s = record["step_s"]
            self.step.set(record["step"])
            self.epoch.set(record["epoch"])
            self.bad_files.inc(record.get("bad_images", 0))
            self._push_phases()
        elif event == "eval":
            self.val_top1.set(record["val_top1"])
            self.val_top5.set(record["val_top5"])
            self.val_loss.set(record["val_loss"])
            self.heartbeat()
        elif event == "checkpoint":
            self.timer.add("checkpoint_stall", record["stall_s"])
            self.ckpt_stall.set(record["stall_s"])
            self.ckpt_count.inc()
            self._last_checkpoint = time.time()
            self._push_phases()
        elif self.replicas is not None and event in _ReplicaMetrics.EVENTS:
            self.replicas.log(record)
        elif event == "start":
            self.world_size.set(record["world_size"])
            self.restarts.set(record.get("restarts", 0))
            self.epoch.set(record["epoch"])
            self.step.set(record["step"])

    def _push_phases(self) -> None:
        totals = self.timer.resolve()
        for phase, total in totals.items():
            delta = total - self._pushed[phase]
            if delta > 0:
                self.phase_total.labels(**self.labels, phase=phase).inc(delta)
                self._pushed[phase] = total

    def close(self) -> None:
        self.timer.close()
        self.group = None  # the trainer destroys it next: held here, its Gloo threads would outlive that
        if self.finished and self.pc.linger_s > 0:
            log.info(
                "run finished: serving the final metrics for %.0fs (monitoring.prometheus.linger_s)",
                self.pc.linger_s,
            )
            time.sleep(self.pc.linger_s)
        self.server.shutdown()
        self.server.server_close()


class _ReplicaMetrics:
    """Replicated mode (distributed/replicas.py): the quorum, heals and dropped work of this replica group,
    labelled ``replica_group``, from the records the group writes to metrics.jsonl."""

    EVENTS = ("quorum", "heal", "step_dropped", "samples_dropped")

    def __init__(self, m: PrometheusMetrics):
        group = str(m.cfg.fault_tolerance.replicated.resolved()[1])
        g, c = m._gauge, m._counter
        self.quorum_size = g(
            "quorum_size", "Replica groups in this group's current quorum", replica_group=group
        )
        self.quorum_id = g(
            "quorum_id", "Id of this group's current quorum (changes with membership)", replica_group=group
        )
        self.heals = c("heals", "Times this group healed from a live peer", replica_group=group)
        self.heal_seconds = g(
            "heal_seconds",
            "Duration of this group's last heal (quorum and state transfer)",
            replica_group=group,
        )
        self.heal_bytes = c(
            "heal_bytes", "Bytes of state this group received when healing", replica_group=group
        )
        self.steps_dropped = c(
            "steps_dropped",
            "Steps this group computed but did not commit (a peer failed inside them): redone",
            replica_group=group,
        )
        self.samples_dropped = c(
            "samples_dropped",
            "Samples of missing groups skipped under missing_group_policy=drop",
            replica_group=group,
        )

    def log(self, record: dict[str, Any]) -> None:
        event = record["event"]
        if event == "quorum":
            self.quorum_size.set(record["quorum_size"])
            self.quorum_id.set(record["quorum_id"])
        elif event == "heal":
            self.heals.inc()
            self.heal_seconds.set(record["heal_seconds"])
            self.heal_bytes.inc(record["heal_bytes"])
        elif event == "step_dropped":
            self.steps_dropped.inc()
        else:
            self.samples_dropped.inc(record["samples"])
