"""Typed run configuration: one dataclass per YAML section, loading, dotted overrides, validation.

Precedence, lowest first: the defaults below < the YAML recipe (``--config``) < command-line overrides
(``section.key=value``). Everything is validated here, before any process group, data or model is
touched; a bad value raises :class:`ConfigError` naming the full key path, the value and what was
expected (the CLI turns it into exit code 2).
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import os
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from imgtrain import model_names, registry
from imgtrain.distributed.rendezvous import is_wildcard
from imgtrain.errors import ConfigError, expected_one_of


def _check(cond: bool, key: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(key, value, expected)


_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?"


def bare_host(value: str) -> str | None:
    """``value`` as a host for socket calls, or None when it is not one: an IPv4 address, an IPv6 address
    with or without [brackets] (returned without them), or a host name. No scheme, no port, no path. A
    dotted name whose last label is a number (``10.0.0.256``) is a mistyped address, not a name."""
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        named = re.fullmatch(rf"{_LABEL}(\.{_LABEL})*\.?", value) is not None
        return value if named and not value.rstrip(".").rsplit(".", 1)[-1].isdigit() else None
    return bare if bare == value or ip.version == 6 else None


def _at_least(section: Any, p: str, name: str, low: int, optional: bool = False) -> None:
    v = getattr(section, name)
    ok = v >= low if v is not None else optional
    _check(ok, f"{p}.{name}", v, f"{'null or ' if optional else ''}an integer >= {low}")


def _within(section: Any, p: str, name: str, low: float, high: float, low_open: bool = False) -> None:
    v = getattr(section, name)
    ok = low < v <= high if low_open else low <= v <= high
    _check(ok, f"{p}.{name}", v, f"a number in {'(' if low_open else '['}{low}, {high}]")


def _above_zero(section: Any, p: str, name: str, what: str = "a number", optional: bool = False) -> None:
    v = getattr(section, name)
    ok = v > 0 if v is not None else optional
    _check(ok, f"{p}.{name}", v, f"{'null or ' if optional else ''}{what} > 0")


@dataclass
class ModelConfig:
    name: str = "resnet50"
    """torchvision name (resnet18..152, vit_b_16), an imgtrain small model, or ``timm/<name>``."""
    pretrained: bool = False
    """Load published weights. Needs the weights in the local torch/timm cache: nothing is downloaded."""
    small_input: bool = False
    """CIFAR-style stem (3x3 stride-1 conv, no max-pool) for images of 32 px and less."""
    width: int = 64
    """Channel width of imgtrain's own small models (simple_cnn); ignored by torchvision/timm models."""
    activation_checkpointing: bool | Literal["off", "block", "stage"] = "off"
    """Recompute activations in backward to save memory: per residual block / transformer block
    (``block``) or per ResNet stage / group of transformer blocks (``stage``). See models.py."""
    channels_last: bool = True
    """Use channels-last memory format on CUDA (faster convolutions with tensor cores)."""

    def __post_init__(self) -> None:
        # true/false from older configs (and YAML reads a bare `off` as false).
        if isinstance(self.activation_checkpointing, bool):
            self.activation_checkpointing = "block" if self.activation_checkpointing else "off"

    def validate(self, p: str) -> None:
        _check(bool(self.name), f"{p}.name", self.name, "a model name")
        if not model_names.is_known(self.name):
            raise ConfigError(f"{p}.name", self.name, model_names.unknown_model_hint(self.name))
        _at_least(self, p, "width", 1)


@dataclass
class AugmentConfig:
    """Training-time augmentation (``data.augment``); evaluation images are never augmented."""

    random_resized_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    """[min, max] share of the image's area a training crop covers (torchvision's RandomResizedCrop scale)."""
    hflip: float = 0.5
    """Probability of a horizontal flip."""
    auto_augment: Literal["none", "randaugment", "trivialaugment"] = "none"
    randaugment_magnitude: int = 9
    random_erase: float = 0.0
    """Probability of random erasing."""
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    def validate(self, p: str) -> None:
        s = self.random_resized_crop_scale
        _check(
            len(s) == 2 and 0 < s[0] <= s[1] <= 1,
            f"{p}.random_resized_crop_scale",
            s,
            "[min, max] with 0 < min <= max <= 1",
        )
        for k in ("hflip", "random_erase"):
            v = getattr(self, k)
            _check(0.0 <= v <= 1.0, f"{p}.{k}", v, "a number in [0, 1]")
        for k in ("mixup_alpha", "cutmix_alpha"):
            v = getattr(self, k)
            _check(v >= 0.0, f"{p}.{k}", v, "a number >= 0")
        _check(
            0 <= self.randaugment_magnitude <= 30,
            f"{p}.randaugment_magnitude",
            self.randaugment_magnitude,
            "an integer in [0, 30]",
        )


@dataclass
class DecodeConfig:
    """How and where images are decoded (``data.decode``); docs/decode.md."""

    device: Literal["cpu", "gpu", "dali"] = "cpu"
    """Where training images are decoded: cpu (loader workers), or gpu (CUDA only: workers read the bytes,
    nvJPEG decodes the batch, crops/flips/resizes run on the GPU; see docs/decode.md), or dali (as gpu, with
    NVIDIA DALI doing the decode, crop, resize and flip; needs nvidia-dali, not run on a GPU yet)."""
    decoder: str = "libjpeg_roi"
    """JPEG decoder of the CPU path (measurements in docs/decode.md): libjpeg_roi (simplejpeg_fast's output,
    but only the crop window is decoded; needs imgtrain's small C extension, built by ``pip install -e .``
    where libjpeg-turbo's headers are installed, else it falls back to simplejpeg_fast), simplejpeg_fast
    (fast IDCT and chroma upsampling, within the tested tolerance), simplejpeg, simplejpeg_pillow (simplejpeg_fast's decode with
    Pillow's resize: faster on full-size photos with pillow-simd installed, scripts/install_pillow_simd.sh), opencv,
    torchvision, or pil (the reference); the names of registry.DECODERS, and when each is the one to use in
    docs/decode.md. Files that are not JPEGs decode with PIL; a decoder whose library is missing falls back to
    the next fastest."""
    max_image_pixels: int = 100_000_000
    """Largest image decoded (width x height, from the header, before any pixel is decoded); a larger one is
    a bad sample. Bounds a loader worker's memory per image (docs/decode.md, "Hostile files")."""

    def validate(self, p: str) -> None:
        registry.DECODERS.check(self.decoder, f"{p}.decoder")
        _at_least(self, p, "max_image_pixels", 1)


@dataclass
class CacheConfig:
    """Node-local cache of shards read from an object store (``data.cache``; docs/input_pipeline.md)."""

    dir: str | None = None
    """Cache folder; None: $IMGTRAIN_DATA_HOME/shard-cache."""
    size_gb: float = 200.0
    """Size limit of that cache (least recently used shards are evicted above it)."""

    def validate(self, p: str) -> None:
        _check(self.size_gb > 0, f"{p}.size_gb", self.size_gb, "a number of GB > 0")


@dataclass
class DataConfig:
    """Where the images are and how the loader feeds them; augmentation, decoding and the shard cache are
    nested sections (``data.augment``, ``data.decode``, ``data.cache``)."""

    root: str | None = None
    """ImageFolder root with train/ and val/. None: the embedded default (scikit-learn's digits)."""
    format: Literal["folder", "shards"] = "folder"
    """folder: an ImageFolder tree; shards: the output of ``imgtrain prepare`` (a folder or s3://, gs:// URL)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Passed to fsspec for a data.root URL (e.g. {client_kwargs: {endpoint_url: ...}}); ``${VAR}`` in a
    value is read from the environment when the store is opened (and written down as the reference)."""
    image_size: int = 224
    """Training crop size (pixels)."""
    val_resize: int | None = None
    """Eval resize of the shorter side before the center crop; None: derived from image_size and
    val_crop_fraction, so that it follows image_size."""
    val_crop_fraction: float = 0.875
    """When val_resize is null: the center crop's share of the resized shorter side (0.875: 224 of 256,
    the standard ImageNet eval; 1.0: resize to image_size, nothing cropped)."""
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    workers: int = 8
    """DataLoader worker processes per training process."""
    prefetch_factor: int = 4
    """Batches loaded ahead by each worker."""
    pin_memory: bool = True
    persistent_workers: bool = True
    max_bad_fraction: float = 0.001
    """Stop with an error once more than this fraction of a split's files failed to decode."""
    allow_empty_classes: bool = False
    """Train with a class that has no training or no validation images (or whose folder is in only one of
    train/ and val/). Off: such a class is a data error, since it is most often a copy gone wrong."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def validate(self, p: str) -> None:
        self.augment.validate(f"{p}.augment")
        self.decode.validate(f"{p}.decode")
        self.cache.validate(f"{p}.cache")
        _at_least(self, p, "image_size", 8)
        _check(
            self.val_resize is None or self.val_resize >= self.image_size,
            f"{p}.val_resize",
            self.val_resize,
            f"null or an integer >= data.image_size ({self.image_size})",
        )
        _within(self, p, "val_crop_fraction", 0, 1, low_open=True)
        _at_least(self, p, "workers", 0)
        _at_least(self, p, "prefetch_factor", 1)
        _within(self, p, "max_bad_fraction", 0, 1)
        for k in ("mean", "std"):
            v = getattr(self, k)
            _check(len(v) == 3, f"{p}.{k}", v, "a list of 3 numbers (RGB)")
        _check(all(x > 0 for x in self.std), f"{p}.std", self.std, "positive numbers")
        _check(
            self.format == "shards" or self.root is None or "://" not in self.root,
            f"{p}.root",
            self.root,
            "a local ImageFolder directory (a URL needs data.format=shards)",
        )
        _check(
            self.format == "folder" or self.root is not None,
            f"{p}.root",
            self.root,
            "the output of `imgtrain prepare` when data.format=shards",
        )


@dataclass
class TrainingConfig:
    epochs: int = 90
    batch_size: int = 64
    """Per-process micro-batch size."""
    base_lr: float = 0.1
    """Learning rate at a global batch of ``lr_reference_batch``; scaled linearly with the global batch."""
    lr_reference_batch: int = 256
    warmup_epochs: float = 5.0
    warmup_start_factor: float = 0.0
    """LR at step 0 as a fraction of the peak LR."""
    lr_schedule: str = "cosine"
    """cosine, step (lr_step_epochs, lr_step_gamma) or constant, after the warmup (registry.LR_SCHEDULES)."""
    lr_step_epochs: list[int] = field(default_factory=lambda: [30, 60, 80])
    lr_step_gamma: float = 0.1
    min_lr_factor: float = 0.0
    """Cosine floor as a fraction of the peak LR."""
    seed: int = 0
    deterministic: bool = False
    """Deterministic algorithms: with the same seed and world size, bit-identical weights on CPU."""
    log_interval: int = 10
    """Optimizer steps between metrics.jsonl records."""
    eval_interval: int = 1
    """Epochs between evaluations (the last epoch is always evaluated)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (smoke tests, benchmarks)."""
    progress_bar: bool = True
    compile: bool = False
    """torch.compile the model (first steps pay the compilation)."""

    def validate(self, p: str) -> None:
        registry.LR_SCHEDULES.check(self.lr_schedule, f"{p}.lr_schedule")
        _at_least(self, p, "epochs", 1)
        _at_least(self, p, "batch_size", 1)
        _above_zero(self, p, "base_lr")
        _at_least(self, p, "lr_reference_batch", 1)
        # Longer than the run is allowed: the trainer shortens it and says so (optim.create_schedule).
        _check(self.warmup_epochs >= 0, f"{p}.warmup_epochs", self.warmup_epochs, "a number >= 0")
        _within(self, p, "warmup_start_factor", 0, 1)
        _within(self, p, "lr_step_gamma", 0, 1, low_open=True)
        _within(self, p, "min_lr_factor", 0, 1)
        _check(
            self.lr_step_epochs == sorted(self.lr_step_epochs),
            f"{p}.lr_step_epochs",
            self.lr_step_epochs,
            "epochs in increasing order",
        )
        _at_least(self, p, "log_interval", 1)
        _at_least(self, p, "eval_interval", 1)
        _at_least(self, p, "max_steps", 1, optional=True)


@dataclass
class OptimizationConfig:
    optimizer: str = "sgd"
    """sgd or adamw (registry.OPTIMIZERS)."""
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-4
    no_weight_decay_on_norm_bias: bool = False
    """Exclude normalization weights and all biases from weight decay."""
    mixed_precision: Literal["none", "bf16", "fp16"] = "none"
    """bf16 or fp16 autocast; fp16 uses dynamic loss scaling. bf16 also works on CPU."""
    gradient_clip: float | None = None
    """Max global gradient L2 norm; null disables clipping."""
    accumulation_steps: int = 1
    label_smoothing: float = 0.0
    ema: bool = False
    ema_decay: float = 0.9998
    ema_interval: int = 1
    """Optimizer steps between EMA updates."""
    optimizer_impl: Literal["auto", "foreach", "fused", "for_loop"] = "auto"
    """torch's optimizer implementation: auto (torch's default, foreach where supported), foreach
    (multi-tensor), fused (one kernel; CUDA and CPU in recent torch), for_loop (per parameter)."""

    def validate(self, p: str) -> None:
        registry.OPTIMIZERS.check(self.optimizer, f"{p}.optimizer")
        _check(0 <= self.momentum < 1, f"{p}.momentum", self.momentum, "a number in [0, 1)")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"{p}.betas",
            self.betas,
            "two numbers in [0, 1)",
        )
        _check(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, "a number >= 0")
        _above_zero(self, p, "gradient_clip", optional=True)
        _at_least(self, p, "accumulation_steps", 1)
        _check(
            0 <= self.label_smoothing < 1, f"{p}.label_smoothing", self.label_smoothing, "a number in [0, 1)"
        )
        _check(0 < self.ema_decay < 1, f"{p}.ema_decay", self.ema_decay, "a number in (0, 1)")
        _at_least(self, p, "ema_interval", 1)
        _check(
            not (self.nesterov and self.momentum == 0),
            f"{p}.nesterov",
            self.nesterov,
            "false when optimization.momentum is 0",
        )


@dataclass
class PowerSGDConfig:
    """torch's PowerSGD hook (Vogels et al. 2019); see docs/compression.md."""

    rank: int = 1
    """Rank of the low-rank approximation of each gradient matrix."""
    start_iter: int = 10
    """Optimizer steps of plain all-reduce before compression starts (>= 2 with error feedback or warm
    start: DDP rebuilds its buckets after the first step)."""
    error_feedback: bool = True
    """Add what compression lost last step to this step's gradient (needed for accuracy)."""
    warm_start: bool = True
    """Reuse last step's Q matrices instead of fresh random ones."""
    min_compression_rate: float = 2.0
    """Compress a tensor only if (n x m) / ((n + m) x rank) is at least this; others go uncompressed."""

    def validate(self, p: str) -> None:
        _at_least(self, p, "rank", 1)
        _at_least(self, p, "start_iter", 0)
        _check(
            self.start_iter >= 2 or not (self.error_feedback or self.warm_start),
            f"{p}.start_iter",
            self.start_iter,
            "an integer >= 2 when error_feedback or warm_start is on",
        )
        _check(
            self.min_compression_rate >= 1,
            f"{p}.min_compression_rate",
            self.min_compression_rate,
            "a number >= 1",
        )


@dataclass
class OneBitConfig:
    """imgtrain's 1-bit SGD hook with error feedback (Seide et al. 2014); see docs/compression.md."""

    warmup_steps: int = 10
    """Optimizer steps of plain all-reduce before compression starts."""
    chunk_size: int = 2048
    """Elements per scale: each chunk of a gradient tensor is sent as its signs and one fp32 mean |g|."""

    def validate(self, p: str) -> None:
        _at_least(self, p, "warmup_steps", 0)
        # 32: the packed signs of a chunk are then whole 4-byte words, so the scales after them stay aligned.
        _check(
            self.chunk_size >= 32 and self.chunk_size % 32 == 0,
            f"{p}.chunk_size",
            self.chunk_size,
            "a multiple of 32, >= 32",
        )


@dataclass
class DistributedConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto: NCCL when CUDA is available, else Gloo."""
    bucket_cap_mb: float = 25.0
    sync_batchnorm: bool = False
    timeout: float = 600.0
    """Process-group (collective) timeout in seconds once training runs."""
    init_timeout: float = 1800.0
    """Timeout of the first collectives (rendezvous, model broadcast, checkpoint load)."""
    elastic_batch: Literal["keep_global", "keep_per_process"] = "keep_global"
    """When the world size changes: keep the global batch by changing gradient accumulation, or keep
    the per-process batch and rescale the LR linearly."""
    compression: str = "none"
    """Gradient compression as a DDP communication hook: none, fp16, bf16, powersgd or onebit
    (registry.COMPRESSION, docs/compression.md)."""
    powersgd: PowerSGDConfig = field(default_factory=PowerSGDConfig)
    onebit: OneBitConfig = field(default_factory=OneBitConfig)
    gradient_as_bucket_view: bool = True
    """Gradients are views into DDP's buckets: saves one gradient-sized copy and its memory."""
    static_graph: bool = False
    """Tell DDP the graph never changes (lets it skip per-step bookkeeping). Not with
    find_unused-style models."""

    def validate(self, p: str) -> None:
        registry.COMPRESSION.check(self.compression, f"{p}.compression")
        self.powersgd.validate(f"{p}.powersgd")
        self.onebit.validate(f"{p}.onebit")
        _above_zero(self, p, "bucket_cap_mb")
        _check(self.timeout > 0, f"{p}.timeout", self.timeout, "a number of seconds > 0")
        _check(
            self.init_timeout >= self.timeout,
            f"{p}.init_timeout",
            self.init_timeout,
            f"seconds >= distributed.timeout ({self.timeout})",
        )


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """Local directory or fsspec URL (s3://, gs://). None: <output-dir>/checkpoints."""
    save_interval: float | None = None
    """Seconds between time-based saves; null disables them."""
    save_every_steps: int | None = None
    """Optimizer steps between saves; null disables them."""
    save_at_epoch_end: bool = True
    keep_last_n: int = 3
    """Checkpoints kept: the N newest of this run that verify (sha256) and any newer; older ones are removed
    after each save. The same rule as `imgtrain checkpoints prune --keep N`; the newest good one always stays."""
    async_save: bool = True
    """Serialize and write in a background thread; the loop only pays for the copy off the device."""
    resume: str = "auto"
    """auto (newest valid checkpoint in dir), never, or a checkpoint path."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """Passed to fsspec (e.g. {client_kwargs: {endpoint_url: ...}} for an S3-compatible store); ``${VAR}`` in
    a value is read from the environment when the store is opened (and written down as the reference)."""
    lock_timeout: float = 120.0
    """Seconds a starting writer waits for the writer lock of checkpoint.dir held by another process (an
    evicted pod still saving) before exiting with code 4 naming the holder."""

    def validate(self, p: str) -> None:
        _check(self.lock_timeout >= 0, f"{p}.lock_timeout", self.lock_timeout, "seconds >= 0")
        _above_zero(self, p, "save_interval", "seconds", optional=True)
        _at_least(self, p, "save_every_steps", 1, optional=True)
        _at_least(self, p, "keep_last_n", 1)
        _check(bool(self.resume), f"{p}.resume", self.resume, "'auto', 'never' or a checkpoint path")


# torchft orders a quorum's groups by replica id as a string: imgtrain zero-pads the group id in it to the
# digits of this bound (imgtrain.internals.torchft.replica_id), so that the order is the group ids'.
MAX_REPLICA_GROUPS = 10**6


@dataclass
class ReplicatedConfig:
    """``fault_tolerance.mode: replicated``: each replica group (one ``imgtrain launch``/torchrun, e.g. one
    node) is a torchft replica; a lighthouse forms a quorum of the live groups every step, a dead group's
    peers go on without it and a returning one heals from a live peer (docs/fault_tolerance.md)."""

    lighthouse: str | None = None
    """The lighthouse's address, http://host:port; null: the environment variable TORCHFT_LIGHTHOUSE."""
    group_id: int | None = None
    """This replica group's id, 0 .. num_groups - 1; null: the environment variable REPLICA_GROUP_ID."""
    num_groups: int = 2
    """Replica groups of the full job (at most 1000000): each step's global batch is num_groups x processes
    per group x training.batch_size (x accumulation), shared between the groups present."""
    min_replicas: int = 1
    """Fewest replica groups that may commit a step; with fewer the step is not committed and retried."""
    missing_group_policy: Literal["redistribute", "drop"] = "redistribute"
    """A group missing from a step: redistribute (the present groups train its share too, the global
    batch is kept; each present group's batch grows by num_groups / present) or drop (its share of the
    step is skipped and counted as dropped samples)."""
    collective_timeout: float = 10.0
    """Seconds a gradient all-reduce waits for a peer: what catches a frozen (not dead) replica group."""
    quorum_timeout: float = 60.0
    """Seconds a step waits for the lighthouse to form a quorum."""
    timeout: float = 30.0
    """Seconds for the commit vote and for fetching a live peer's state when healing."""
    connect_timeout: float = 10.0
    """Seconds to connect to the lighthouse and to the group's manager."""
    quorum_retries: int = 20
    """Times a failed quorum request is retried (a new connection each time): a lighthouse restarted
    within them is rejoined without losing a step; after them the group exits with code 6."""
    heartbeat_interval: float = 0.1
    """Seconds between heartbeats to the lighthouse (its --heartbeat_timeout_ms declares a group dead)."""
    bind: str | None = None
    """The one address of this machine that the group's own servers listen on: torchft's manager, the
    checkpoint server a healing peer fetches from, and (outside torchrun) the group's store. null: the
    address that ``advertise_address`` (unset: this machine's host name) resolves to, where the other groups
    connect. An address this machine cannot listen on exits 2 naming this key.
    0.0.0.0 or :: (every interface) only when set so, behind a firewall (docs/security.md)."""
    advertise_address: str | None = None
    """The address (or host name) at which the other replica groups reach this one: handed to them for
    this group's store, torchft manager and checkpoint server, and the address its Gloo all-reduce listens
    on (unless GLOO_SOCKET_IFNAME is set; one this host cannot listen on exits 2 naming this key). null:
    this host's name, which must then resolve to a reachable address on every other group's host. IPv4,
    IPv6 with or without [brackets] (quoted in YAML), or a host name; as for ``bind``."""
    state_digest: bool = False
    """Write a checksum (CRC-32) of the whole state into each ``heal`` record and each ``heal_served`` record
    of the group that served it: equal when a heal transferred the state intact. For tests and debugging:
    the serving group computes it on its own step (about 30 ms per 100 MB of state); off, the records carry
    no digest."""

    def validate(self, p: str) -> None:
        _check(
            1 <= self.num_groups <= MAX_REPLICA_GROUPS,
            f"{p}.num_groups",
            self.num_groups,
            f"an integer in [1, {MAX_REPLICA_GROUPS}]",
        )
        _check(
            1 <= self.min_replicas <= self.num_groups,
            f"{p}.min_replicas",
            self.min_replicas,
            f"an integer in [1, num_groups={self.num_groups}]",
        )
        for key in (
            "collective_timeout",
            "quorum_timeout",
            "timeout",
            "connect_timeout",
            "heartbeat_interval",
        ):
            value = getattr(self, key)
            _check(value > 0, f"{p}.{key}", value, "seconds > 0")
        if self.group_id is not None:
            _check(
                0 <= self.group_id < self.num_groups,
                f"{p}.group_id",
                self.group_id,
                f"an integer in [0, num_groups={self.num_groups})",
            )
        for key, expected in (
            ("bind", "null or one address of this machine (an IP address or a host name, no port)"),
            ("advertise_address", "null, a host name or an IP address (no scheme, no port)"),
        ):
            value = getattr(self, key)
            _check(value is None or bare_host(value) is not None, f"{p}.{key}", value, expected)
        if self.advertise_address is not None:
            _check(
                not is_wildcard(self.advertise_address),
                f"{p}.advertise_address",
                self.advertise_address,
                "an address the other groups connect to, not 0.0.0.0 or :: (that is for bind)",
            )
        if self.lighthouse is not None:
            _check(
                re.fullmatch(r"https?://[^/\s]+:\d+/?", self.lighthouse) is not None,
                f"{p}.lighthouse",
                self.lighthouse,
                "an address http://host:port",
            )

    def resolved(self, p: str = "fault_tolerance.replicated") -> tuple[str, int]:
        """(lighthouse address, group id), from the config or else the environment; a ConfigError names
        the key (and the variable) when neither has a usable value."""
        lighthouse = self.lighthouse or os.environ.get("TORCHFT_LIGHTHOUSE")
        if not lighthouse:
            raise ConfigError(
                f"{p}.lighthouse", None, "an address http://host:port, or TORCHFT_LIGHTHOUSE set"
            )
        group = self.group_id
        if group is None:
            raw = os.environ.get("REPLICA_GROUP_ID")
            if raw is None or not raw.strip().isdigit():
                raise ConfigError(
                    f"{p}.group_id",
                    raw,
                    f"an integer in [0, {self.num_groups}), or REPLICA_GROUP_ID set to one",
                )
            group = int(raw)
        _check(
            0 <= group < self.num_groups,
            f"{p}.group_id",
            group,
            f"an integer in [0, num_groups={self.num_groups}) (from REPLICA_GROUP_ID if unset)",
        )
        return lighthouse, group


@dataclass
class FaultToleranceConfig:
    mode: Literal["restart", "replicated"] = "restart"
    """restart: a fault restarts every worker from the last checkpoint (TorchElastic); replicated: replica
    groups under torchft, the survivors of a fault go on and a returning group heals from a live peer."""
    replicated: ReplicatedConfig = field(default_factory=ReplicatedConfig)
    grace_period: float = 30.0
    """Seconds a SIGTERM/SIGINT leaves to finish the step, save and exit."""
    hang_timeout: float | None = 1800.0
    """Seconds without a completed step before the watchdog dumps all stacks and exits; null disables."""
    first_step_timeout: float | None = 3600.0
    """Watchdog limit for the first step (loader start-up, compilation); null: hang_timeout."""

    def validate(self, p: str) -> None:
        self.replicated.validate(f"{p}.replicated")
        _above_zero(self, p, "grace_period", "seconds")
        _above_zero(self, p, "hang_timeout", "seconds", optional=True)
        _above_zero(self, p, "first_step_timeout", "seconds", optional=True)


NOTIFY_EVENTS = ("started", "finished", "failed", "resumed", "diverged")


@dataclass
class NotifyConfig:
    urls: list[str] = field(default_factory=list)
    """Apprise URLs (slack://..., https://hooks.slack.com/services/..., json://host/path,
    mailtos://user:pass@smtp.example.com?to=ops@example.com). ``${VAR}`` is read from the environment
    at start, so secrets stay out of the YAML; a URL without ``${VAR}`` is redacted from everything imgtrain
    writes (config.yaml, checkpoints, model.pt) and warned about at start."""
    urls_file: str | None = None
    """An apprise configuration file (one URL per line) kept outside the repository, e.g. a mounted secret."""
    events: list[Literal["started", "finished", "failed", "resumed", "diverged"]] = field(
        default_factory=lambda: list(NOTIFY_EVENTS)
    )
    """Which run events are sent (by rank 0)."""

    def validate(self, p: str) -> None:
        _check(
            len(set(self.events)) == len(self.events), f"{p}.events", self.events, "events without repeats"
        )


@dataclass
class PrometheusConfig:
    enabled: bool = False
    """Serve Prometheus metrics from every training process (docs/monitoring.md)."""
    port: int = 9450
    """Base port: each process listens on port + its local rank (9450, 9451, ... on every node)."""
    bind_address: str = "127.0.0.1"
    """Address to listen on; 0.0.0.0 (or the pod IP) for a Prometheus on another machine."""
    linger_s: float = 15.0
    """After a run finishes or diverges, keep serving its final values this long so that Prometheus scrapes
    them (set it to at least the scrape interval). Not after another failure or a preemption."""
    stall_after_s: float = 600.0
    """Exported as imgtrain_stall_threshold_seconds: the TrainingStalled alert fires when no step (or
    evaluation batch) finished for this long."""
    straggler_interval: int = 50
    """Optimizer steps between cross-rank comparisons of step time (one tiny all-gather)."""
    straggler_threshold: float = 0.2
    """A rank is slow when its step time (without waiting for peers) exceeds the median by this fraction."""
    straggler_patience: int = 3
    """Consecutive slow comparisons before a rank is named a straggler (log line + metric)."""

    def validate(self, p: str) -> None:
        _check(0 <= self.port <= 65535, f"{p}.port", self.port, "a port number in [0, 65535]")
        _check(
            bool(self.bind_address), f"{p}.bind_address", self.bind_address, "an address such as 127.0.0.1"
        )
        _check(self.linger_s >= 0, f"{p}.linger_s", self.linger_s, "seconds >= 0")
        _above_zero(self, p, "stall_after_s", "seconds")
        _at_least(self, p, "straggler_interval", 1)
        _check(
            self.straggler_threshold > 0,
            f"{p}.straggler_threshold",
            self.straggler_threshold,
            "a fraction > 0 (0.2: 20% slower than the median)",
        )
        _at_least(self, p, "straggler_patience", 1)


@dataclass
class MonitoringConfig:
    run_id: str | None = None
    """Names the run in logs and notifications. None: torchrun's --rdzv-id if set, else the run directory's name."""
    log_format: Literal["text", "json"] = "text"
    """Console (stderr) log format. Every rank also writes JSON lines to <output_dir>/logs/rank<R>.jsonl."""
    tensorboard: bool = False
    """Write TensorBoard event files (rank 0) to <output_dir>/tensorboard."""
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)

    def validate(self, p: str) -> None:
        _check(
            self.run_id is None or bool(self.run_id.strip()),
            f"{p}.run_id",
            self.run_id,
            "null or a non-empty name",
        )
        self.notify.validate(f"{p}.notify")
        self.prometheus.validate(f"{p}.prometheus")


@dataclass
class ProfilerConfig:
    enabled: bool = False
    """torch.profiler on the ranks below; a Chrome trace per rank and cycle in <output_dir>/profiler/."""
    skip_first: int = 0
    wait: int = 1
    warmup: int = 1
    active: int = 3
    repeat: int = 1
    """Cycles of wait+warmup+active steps; 0 repeats until the run ends."""
    ranks: list[int] | None = None
    """Global ranks to profile; null: every rank."""
    record_shapes: bool = False
    profile_memory: bool = False
    with_stack: bool = False

    def validate(self, p: str) -> None:
        for k in ("skip_first", "wait", "warmup", "repeat"):
            v = getattr(self, k)
            _check(v >= 0, f"{p}.{k}", v, "an integer >= 0")
        _at_least(self, p, "active", 1)
        _check(
            self.ranks is None or all(r >= 0 for r in self.ranks),
            f"{p}.ranks",
            self.ranks,
            "null or a list of ranks >= 0",
        )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    profiler: ProfilerConfig = field(default_factory=ProfilerConfig)
    output_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, summary.json, checkpoints/, model.pt."""

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate(f.name)
        _check(bool(self.output_dir), "output_dir", self.output_dir, "a directory path")
        # torch's DDP with static_graph crashes under no_sync (reducer assert) and, patched past that,
        # stops all-reducing after the first step (pytorch#143580, pytorch PR #187732).
        _check(
            not (self.distributed.static_graph and self.optimization.accumulation_steps > 1),
            "distributed.static_graph",
            self.distributed.static_graph,
            "false with optimization.accumulation_steps > 1 (DDP's static graph does not support no_sync)",
        )
        if self.fault_tolerance.mode == "replicated":
            self._validate_replicated()

    def _validate_replicated(self) -> None:
        """What torchft's replicated mode cannot run with, rejected before anything starts."""
        why = "with fault_tolerance.mode=replicated"
        _check(
            self.distributed.compression == "none",
            "distributed.compression",
            self.distributed.compression,
            f"'none' {why}: gradients are averaged by torchft's fault-tolerant all-reduce, which takes no "
            "DDP communication hook (docs/fault_tolerance.md)",
        )
        _check(
            self.optimization.mixed_precision != "fp16",
            "optimization.mixed_precision",
            self.optimization.mixed_precision,
            f"'bf16' or 'none' {why}: fp16's loss scaler would have to skip a step the commit vote also skips",
        )
        _check(
            not self.training.compile,
            "training.compile",
            self.training.compile,
            f"false {why}: torchft's DDP wrapper is not compiled",
        )
        _check(
            not self.distributed.static_graph,
            "distributed.static_graph",
            self.distributed.static_graph,
            f"false {why}: torchft's DDP wrapper finds unused parameters every step",
        )

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """Plain data. Redacted by default (see :func:`redact_secrets`): this is what gets written down
        (config.yaml, checkpoints, model.pt); the live config object keeps the real values."""
        data = dataclasses.asdict(self)
        return redact_secrets(data) if redact else data


# ---------------------------------------------------------------------------------------------------
# Building the typed objects from plain YAML data, with the key path in every error.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(key, value, expected_one_of(value, choices))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(key, value, _type_name(tp))
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(key, value, _type_name(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(key, value, _type_name(tp))
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, value, "true/false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, value, "an integer")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _EXP_FLOAT.fullmatch(value):
            return float(value)  # PyYAML (YAML 1.1) reads 1e-4 or 1.0e5 as strings
        raise ConfigError(key, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, value, "a string")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise TypeError(f"unsupported config type {tp} at {key}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        if prefix in MOVED_KEYS:  # data.decode: the device, before it became a section
            raise MovedKeyError(prefix, MOVED_KEYS[prefix], data)
        raise ConfigError(prefix or "<root>", data, "a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if k not in names and path in MOVED_KEYS:
            raise MovedKeyError(path, MOVED_KEYS[path], v)
        if k not in names:
            raise ConfigError(path, v, "a known key; valid keys here: " + ", ".join(sorted(names)))
        kwargs[k] = _coerce(v, hints[k], path)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value), the value parsed as YAML (so 3 is int, true is bool)."""
    if "=" not in text:
        raise ConfigError(text, text, "an override of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(key or text, raw, "a dotted key such as training.epochs")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(key, raw, f"a YAML value ({e.__class__.__name__})") from None
    return key.split("."), value


# The flat data section before it was split into data.augment, data.decode and data.cache: old key -> new
# key. A recipe or command line still using an old key is told where it went (ConfigError, exit 2); the
# config embedded in a checkpoint saved before the split is moved by upgrade_saved_config.
MOVED_KEYS: dict[str, str] = {
    **{f"data.{f.name}": f"data.augment.{f.name}" for f in dataclasses.fields(AugmentConfig)},
    "data.decode": "data.decode.device",
    "data.decoder": "data.decode.decoder",
    "data.max_image_pixels": "data.decode.max_image_pixels",
    "data.cache_dir": "data.cache.dir",
    "data.cache_size_gb": "data.cache.size_gb",
}


class MovedKeyError(ConfigError):
    """A key of the flat data section, used where its new nested key belongs."""

    def __init__(self, old: str, new: str, value: Any):
        super().__init__(old, value, f"the key {new}")
        self.new_key = new
        self.args = (f"config key '{old}' moved to '{new}' (got {value!r})",)


_MISSING = object()


def _old_keys(data: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    """(old, new, value) for each moved key that ``data`` (plain config data) still holds. ``data.decode``
    is both an old key (the device) and the new section: only a value that is not a mapping is the old one."""
    for old, new in MOVED_KEYS.items():
        cur: Any = data
        for part in old.split("."):
            cur = cur.get(part, _MISSING) if isinstance(cur, dict) else _MISSING
        if cur is not _MISSING and not (new.startswith(old + ".") and isinstance(cur, dict)):
            yield old, new, cur


def reject_moved_keys(data: dict[str, Any]) -> None:
    """MovedKeyError for the first old flat data key in ``data`` (a recipe, or one override)."""
    for old, new, value in _old_keys(data):
        raise MovedKeyError(old, new, value)


def upgrade_saved_config(data: dict[str, Any]) -> dict[str, Any]:
    """A config saved before the data section was split, with its old keys moved to their sections (a copy;
    a config saved after it comes back unchanged), so that `imgtrain eval` still reads an old checkpoint."""
    out = copy.deepcopy(data)
    moved = list(_old_keys(out))
    for old, _, _ in moved:  # all removed first: data.decode (the old device) makes room for the section
        section, name = old.split(".")
        del out[section][name]
    for _, new, value in moved:
        *parents, name = new.split(".")
        cur = out
        for part in parents:
            cur = cur.setdefault(part, {})
        cur[name] = value
    return out


RECIPES_DIR = Path(__file__).parent / "recipes"
DEFAULT_RECIPE = "quickstart"
FOLDER_RECIPE = "folder"


def default_recipe(overrides: list[str] | tuple[str, ...]) -> tuple[str, str]:
    """(recipe, why) for a command line without --config: the quickstart recipe is tuned for the embedded
    8 px digits, so a user's own folder (``data.root=...``) gets the general-purpose one instead."""
    for ov in overrides:
        if "=" in ov:
            keys, value = parse_override(ov)
            if keys == ["data", "root"] and value is not None:
                return FOLDER_RECIPE, (
                    f"data.root is given and no --config: using the '{FOLDER_RECIPE}' recipe "
                    "(ResNet-18 at 160 px, flips, ImageNet mean/std; "
                    f"{RECIPES_DIR / FOLDER_RECIPE}.yaml); --config NAME picks another"
                )
    return DEFAULT_RECIPE, (
        f"no --config: using the '{DEFAULT_RECIPE}' recipe (the embedded digits dataset, "
        "8 px images); give data.root=DIR to train on a folder of your own"
    )


def resolve_recipe(path: str | Path) -> Path:
    """A YAML path, or the bare name of a recipe shipped in the package (``quickstart``)."""
    p = Path(path)
    if not p.exists() and (RECIPES_DIR / f"{p.name}.yaml").is_file() and p.suffix == "":
        return RECIPES_DIR / f"{p.name}.yaml"
    return p


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> Config:
    """Defaults < ``base`` (e.g. a checkpoint's config) or YAML file < overrides, validated.
    Raises ConfigError on any bad key or value."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        p = resolve_recipe(path)
        if not p.is_file():
            raise ConfigError("--config", str(path), "an existing YAML file")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError("--config", str(path), f"valid YAML ({e})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("--config", str(path), "a YAML mapping of sections")
        data = loaded or {}
        reject_moved_keys(data)
    for ov in overrides:
        keys, value = parse_override(ov)
        nested: dict[str, Any] = {}
        cur = nested
        for k in keys[:-1]:
            cur[k] = {}
            cur = cur[k]
        cur[keys[-1]] = value
        # Each source on its own: merged, an old key's value could be replaced by its new section's.
        reject_moved_keys(nested)
        data = _merge(data, nested)
    cfg = _build(Config, data, "")
    cfg.validate()
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    cfg.validate()
    return cfg


def dump_config(cfg: Config, path: str | Path) -> None:
    """Writes the resolved config with its secrets redacted."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------------------------------------
def resolve_storage_options(options: dict[str, Any], key: str) -> dict[str, Any]:
    """``options`` for fsspec with every ``${VAR}`` replaced from the environment: the way to give a
    credential without writing it into a config (the config keeps the reference; only this copy, handed to
    fsspec, holds the value). An unset variable is a config error naming the key."""

    def expand(value: Any, at: str) -> Any:
        if isinstance(value, dict):
            return {k: expand(v, f"{at}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [expand(v, f"{at}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str):
            missing = [
                m.group(0)[2:-1] for m in _ENV_REF.finditer(value) if m.group(0)[2:-1] not in os.environ
            ]
            if missing:
                raise ConfigError(at, value, f"environment variable(s) {', '.join(missing)} to be set")
            return _ENV_REF.sub(lambda m: os.environ[m.group(0)[2:-1]], value)
        return value

    return expand(dict(options or {}), key)


# Secrets: never written down. Whatever a config holds under a secret-looking key (storage_options'
# key/secret/token, a password), URL credentials (user:pass@, ?token=) and notification URLs (apprise
# keeps its tokens in the path) are replaced before a config is persisted. ${VAR} references are kept:
# they name a secret without holding it.

REDACTED = "<redacted>"
_SECRET_KEY = re.compile(r"key|secret|token|passw|pwd|credential|auth", re.I)
_ENV_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)(.*)$", re.S)
_SECRET_QUERY = re.compile(r"([?&;])([^=&;#]*)=([^&;#]*)")


def _literal(text: str) -> bool:
    """Whether ``text`` holds anything besides ${VAR} references (and the ':' of user:pass)."""
    return bool(_ENV_REF.sub("", text).strip(":"))


def _token_like(segment: str) -> bool:
    """A literal path segment that looks like an API token: long, mixing digits into a token alphabet."""
    return (
        _literal(segment)
        and len(segment) >= 12
        and re.search(r"\d", segment) is not None
        and re.fullmatch(r"[\w:.~-]+", segment) is not None
    )


def redact_url(url: str, whole: bool = False) -> str:
    """``url`` with literal credentials replaced: user:pass@ and secret-looking query values; everything
    after the scheme when ``whole`` and the URL holds no ${VAR} (apprise URLs keep tokens in the path)."""
    m = _URL.match(url)
    if m is None:
        return url
    scheme, authority, rest = m.groups()
    if whole and not _ENV_REF.search(url):
        return scheme + REDACTED
    if whole:  # partly templated: a literal token may still sit in a path segment (tgram://${BOT}/<id:token>)
        path, sep, tail = rest.partition("?")
        path = "/".join(REDACTED if _token_like(seg) else seg for seg in path.split("/"))
        rest = path + sep + tail
    if "@" in authority:
        userinfo, host = authority.rsplit("@", 1)
        if _literal(userinfo):
            authority = f"{REDACTED}@{host}"

    def query(q: re.Match) -> str:
        sep, name, value = q.groups()
        return f"{sep}{name}={REDACTED}" if _SECRET_KEY.search(name) and _literal(value) else q.group(0)

    return scheme + authority + _SECRET_QUERY.sub(query, rest)


def redact_secrets(data: Any, key: str = "") -> Any:
    """A copy of plain config data (``Config.to_dict(redact=False)``) that is safe to write down."""
    if isinstance(data, dict):
        return {k: redact_secrets(v, f"{key}.{k}" if key else str(k)) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [redact_secrets(v, f"{key}[{i}]") for i, v in enumerate(data)]
    name = key.rsplit(".", 1)[-1]
    if _SECRET_KEY.search(name) and not (isinstance(data, str) and not _literal(data)) and data is not None:
        return REDACTED
    if isinstance(data, str):
        return redact_url(data, whole=key.startswith("monitoring.notify.urls["))
    return data


def literal_credentials(cfg: Config) -> list[str]:
    """Keys whose value holds a literal credential instead of a ${VAR} reference (for a warning at start:
    they are redacted from everything imgtrain writes, but they stay in the YAML or command line)."""
    plain = cfg.to_dict(redact=False)
    found: list[str] = []

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        elif redact_secrets(value, key) != value:
            found.append(key)

    walk(plain, "")
    return found
