"""errors.py is the one table of expected errors and exit codes: the README states it, the CLI follows it,
and the names a config accepts are those of the registries that build them."""

from __future__ import annotations

import functools
import re
import typing

import pytest

from imgtrain import errors
from imgtrain.config import (
    ConfigError,
    OptimizationConfig,
    load_config,
)

from conftest import REPO


def _readme_exit_codes() -> dict[int, str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {int(m[1]): m[2].strip() for m in re.finditer(r"^\| (\d+) \| (.+) \|$", section, re.MULTILINE)}


def test_readme_exit_code_table_is_errors_py():
    readme = _readme_exit_codes()
    assert set(readme) == set(errors.EXIT_CODES), "codes only in one of README.md / errors.py"
    for code, meaning in errors.EXIT_CODES.items():
        assert readme[code] == meaning, f"exit code {code}: README says {readme[code]!r}"


def test_every_expected_error_has_a_code_of_the_table():
    for cls, code in (
        (errors.ConfigError, 2),
        (errors.DataError, 3),
        (errors.CheckpointError, 4),
        (errors.DivergenceError, 5),
        (errors.QuorumError, 6),
    ):
        assert cls.exit_code == code and code in errors.EXIT_CODES
    assert errors.exit_code_of(errors.DataError("x")) == 3
    assert errors.exit_code_of(KeyboardInterrupt()) == 130
    assert errors.exit_code_of(RuntimeError("a bug")) == 1


def test_the_old_homes_of_the_errors_are_the_same_classes():
    from imgtrain.checkpoint import CheckpointError
    from imgtrain.data import DataError
    from imgtrain.fault import WATCHDOG_EXIT_CODE
    from imgtrain.train.trainer import DivergenceError

    assert (ConfigError, DataError, CheckpointError, DivergenceError) == (
        errors.ConfigError,
        errors.DataError,
        errors.CheckpointError,
        errors.DivergenceError,
    )
    assert WATCHDOG_EXIT_CODE == errors.EXIT_HANG


def test_config_choices_are_the_registries():
    """The config checks these names at load time against the registries; each name is one the code builds."""
    from imgtrain import optim, registry  # noqa: F401  (importing them registers the factories)
    from imgtrain.data.decode import cpu  # noqa: F401
    from imgtrain.distributed import comm_hooks  # noqa: F401

    regs = (registry.DECODERS, registry.COMPRESSION, registry.OPTIMIZERS, registry.LR_SCHEDULES)
    for reg in regs:
        assert set(reg._factories) == set(reg.names), reg.key
        for name in reg:
            assert callable(reg[name])
            assert _value(load_config(None, [f"{reg.key}={name}"]), reg.key) == name
        with pytest.raises(ConfigError) as ei:
            load_config(None, [f"{reg.key}={reg.names[0]}x"])
        assert ei.value.key == reg.key and f"did you mean {reg.names[0]}" in str(ei.value)
    assert typing.get_args(typing.get_type_hints(OptimizationConfig)["optimizer_impl"]) == tuple(
        optim._IMPLEMENTATIONS
    )


def test_a_name_is_declared_before_it_is_registered():
    from imgtrain import registry

    with pytest.raises(ValueError, match="lion"):
        registry.OPTIMIZERS.register("lion")


def _value(cfg, key: str):
    return functools.reduce(getattr, key.split("."), cfg)


@pytest.mark.parametrize(
    "name",
    ["simple_cnn", "resnet18", "regnet_y_400mf", "densenet121", "timm/resnet18", "timm/resnet50.a1_in1k"],
)
def test_model_names_of_every_registry_load(name):
    assert load_config(None, [f"model.name={name}"]).model.name == name


@pytest.mark.parametrize("name", ["resnet5O", "fasterrcnn_resnet50_fpn", "timm/not_a_model", "timm/"])
def test_unknown_or_non_classifier_model_names_are_config_errors(name):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [f"model.name={name}"])
    assert ei.value.key == "model.name"


def test_models_registry_builds_what_the_config_accepts():
    from imgtrain.model_names import IMGTRAIN_MODELS, torchvision_models
    from imgtrain.models import _SMALL_MODELS, list_models

    assert set(_SMALL_MODELS) == set(IMGTRAIN_MODELS)
    assert set(torchvision_models()) <= set(list_models())


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--headroom", "1"),
        ("--headroom", "nan"),
        ("--tolerance", "0"),
        ("--steps", "0"),
        ("--max-batch", "x"),
    ],
)
def test_find_batch_size_names_the_option_out_of_range_before_loading_anything(option, value, capsys):
    from imgtrain.cli import main

    with pytest.raises(SystemExit) as e:  # argparse's refusal: no config loaded, no model built
        main(["find-batch-size", "--config", "quickstart", "--memory-limit", "1GiB", option, value])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == errors.EXIT_CONFIG
    assert f"argument {option}: {value!r}: expected" in err
    assert all(o not in err for o in ("--headroom", "--tolerance", "--steps", "--max-batch") if o != option)
