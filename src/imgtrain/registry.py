"""The named components a config chooses from: decoders, gradient compression methods, optimizers and LR
schedules, one :class:`Registry` each (models have theirs in models.py and model_names.py).

A registry is declared here with its names so that the config checks a name when it loads, before torch
is imported (a bad value exits 2 at once); the module that implements the components registers a factory
under each name (``@DECODERS.register("pil")``), and looking a name up imports that module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from imgtrain.errors import ConfigError, expected_one_of


class Registry(Mapping[str, Callable[..., Any]]):
    """name -> factory for one config key (``data.decode.decoder``, ...)."""

    def __init__(self, key: str, module: str, names: tuple[str, ...]):
        self.key, self.module, self.names = key, module, names
        self._factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        if name not in self.names:
            raise ValueError(f"{self.key}: declare {name!r} in imgtrain.registry before registering it")

        def deco(factory: Callable[..., Any]) -> Callable[..., Any]:
            self._factories[name] = factory
            return factory

        return deco

    def check(self, value: Any, key: str | None = None) -> None:
        """ConfigError (exit 2) naming ``key`` when ``value`` is not a registered name."""
        if value not in self.names:
            raise ConfigError(key or self.key, value, expected_one_of(value, self.names))

    def __getitem__(self, name: str) -> Callable[..., Any]:
        if name not in self._factories:
            if name not in self.names:
                raise KeyError(name)
            importlib.import_module(self.module)  # registers the factories
        return self._factories[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


DECODERS = Registry(
    "data.decode.decoder",
    "imgtrain.data.decode.cpu",
    ("libjpeg_roi", "simplejpeg_fast", "simplejpeg", "simplejpeg_pillow", "opencv", "torchvision", "pil"),
)
"""CPU JPEG decoders (decode.py); their measured speed and when each is the one to use: docs/decode.md."""

COMPRESSION = Registry(
    "distributed.compression",
    "imgtrain.distributed.comm_hooks",
    ("none", "fp16", "bf16", "powersgd", "onebit"),
)
"""Gradient compression as DDP communication hooks (distributed/comm_hooks/, docs/compression.md)."""

OPTIMIZERS = Registry("optimization.optimizer", "imgtrain.optim", ("sgd", "adamw"))
"""torch optimizers built from OptimizationConfig (optim.py)."""

LR_SCHEDULES = Registry("training.lr_schedule", "imgtrain.optim", ("cosine", "step", "constant"))
"""LR multipliers after warmup, as functions of the schedule and training progress in epochs (optim.py)."""
