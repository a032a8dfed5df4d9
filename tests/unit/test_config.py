"""Config: every bad value is a ConfigError naming key, value and expectation; precedence; recipes; CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from imgtrain import cli, commands
from imgtrain.config import RECIPES_DIR, Config, ConfigError, dump_config, load_config

# (override, key path, value as the message shows it, words of the expectation)
BAD_OVERRIDES = [
    ("training.epochz=3", "training.epochz", "3", "known key"),
    ("training.epochs=abc", "training.epochs", "'abc'", "an integer"),
    ("training.batch_size=0", "training.batch_size", "0", ">= 1"),
    ("optimization.mixed_precision=fp8", "optimization.mixed_precision", "'fp8'", "'bf16'"),
    ("data.hflip=1.5", "data.hflip", "1.5", "[0, 1]"),
    # names are checked against their registries when the config loads, with the close matches
    ("model.name=resnet5O", "model.name", "'resnet5O'", "did you mean resnet50"),
    ("model.name=timm/resnet5", "model.name", "'timm/resnet5'", "did you mean timm/resnet50"),
    ("data.decoder=libjpeg_ro", "data.decoder", "'libjpeg_ro'", "did you mean libjpeg_roi"),
    ("optimization.optimizer=adamW", "optimization.optimizer", "'adamW'", "did you mean adamw"),
    ("distributed.compression=powersdg", "distributed.compression", "'powersdg'", "did you mean powersgd"),
]


@pytest.mark.parametrize(("override", "key", "shown", "expected"), BAD_OVERRIDES)
def test_bad_override_names_key_value_and_expectation(override, key, shown, expected):
    with pytest.raises(ConfigError) as ei:
        load_config(None, [override])
    err = ei.value
    assert err.key == key
    msg = str(err)
    assert f"'{key}'" in msg
    assert f"got {shown}," in msg
    assert expected in msg


def test_unknown_key_lists_the_valid_keys_of_its_section():
    with pytest.raises(ConfigError, match=r"training\.epochz") as ei:
        load_config(None, ["training.epochz=3"])
    assert "epochs" in ei.value.expected and "batch_size" in ei.value.expected


def test_unknown_section_and_non_mapping_section():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["trainig.epochs=3"])
    assert ei.value.key == "trainig"
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["training=3"])
    assert ei.value.key == "training"


def test_bad_list_element_names_its_index():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["data.mean=[0.5,x,0.5]"])
    assert ei.value.key == "data.mean[1]"


def test_bad_key_in_a_yaml_recipe_names_the_full_path(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("training:\n  epochs: 3\noptimization:\n  momentun: 0.9\n")
    with pytest.raises(ConfigError) as ei:
        load_config(recipe)
    assert ei.value.key == "optimization.momentun"


def test_missing_recipe_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "nope.yaml")
    assert ei.value.key == "--config" and "nope.yaml" in str(ei.value)


def test_cross_field_check_names_both_keys():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["data.image_size=112", "data.val_resize=100"])
    assert ei.value.key == "data.val_resize"
    assert "data.image_size (112)" in ei.value.expected


def test_precedence_defaults_then_recipe_then_overrides(tmp_path):
    defaults = Config()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "training:\n  epochs: 7\n  batch_size: 16\n  warmup_epochs: 1\nmodel:\n  name: resnet18\n"
    )
    from_recipe = load_config(recipe)
    assert (from_recipe.training.epochs, from_recipe.training.batch_size) == (7, 16)
    assert from_recipe.training.base_lr == defaults.training.base_lr  # untouched keys keep defaults
    cfg = load_config(recipe, ["training.epochs=3", "data.mean=[0.5,0.5,0.5]"])
    assert cfg.training.epochs == 3  # override beats the recipe
    assert cfg.training.batch_size == 16  # the recipe's other keys in the same section survive
    assert cfg.model.name == "resnet18"
    assert cfg.data.mean == [0.5, 0.5, 0.5]
    assert cfg.data.std == defaults.data.std
    assert load_config(None).training.epochs == defaults.training.epochs == 90
    # The later of two overrides of the same key wins.
    assert load_config(None, ["training.epochs=30", "training.epochs=40"]).training.epochs == 40


@pytest.mark.parametrize("text", ["1e-4", "1E-4", "1.0e-4", "0.0001", "+1e-04"])
def test_exponent_numbers_are_numbers(text, tmp_path):
    # PyYAML (YAML 1.1) parses 1e-4 as a string; the usual way to write a weight decay must work.
    assert load_config(None, [f"optimization.weight_decay={text}"]).optimization.weight_decay == 1e-4
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"optimization:\n  weight_decay: {text}\ndata:\n  mean: [{text}, 0.5, 0.5]\n")
    cfg = load_config(recipe)
    assert cfg.optimization.weight_decay == 1e-4 and cfg.data.mean[0] == 1e-4


def test_non_numeric_strings_are_still_rejected_for_numbers():
    for bad in ("1e", "e5", "abc", "1e-4x"):
        with pytest.raises(ConfigError) as ei:
            load_config(None, [f"optimization.weight_decay={bad}"])
        assert ei.value.key == "optimization.weight_decay"
    with pytest.raises(ConfigError):  # not silently truncated to an integer
        load_config(None, ["training.epochs=1e2"])


def _recipes() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml"))


def test_quickstart_recipe_is_shipped():
    assert (RECIPES_DIR / "quickstart.yaml") in _recipes()


@pytest.mark.parametrize("recipe", _recipes(), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_validates(recipe):
    raw = yaml.safe_load(recipe.read_text())
    cfg = load_config(recipe)
    by_name = load_config(recipe.stem)  # a shipped recipe is also reachable by its bare name
    assert cfg == by_name

    # What the recipe says is what the config holds (nothing silently dropped), nested sections included
    # (e.g. distributed.powersgd.rank).
    def check(node, values: dict, path: str) -> None:
        for key, value in values.items():
            got = getattr(node, key)
            if isinstance(value, dict) and not isinstance(got, dict):
                check(got, value, f"{path}.{key}")
            else:
                assert got == pytest.approx(value) if isinstance(value, float) else got == value, (
                    f"{recipe.name}: {path}.{key}"
                )

    for section, values in raw.items():
        if not isinstance(values, dict):
            assert getattr(cfg, section) == values
            continue
        check(getattr(cfg, section), values, section)


def test_dump_config_round_trips(tmp_path):
    cfg = load_config(
        "quickstart",
        [
            "optimization.weight_decay=1e-5",
            "optimization.gradient_clip=1.0",
            "checkpoint.storage_options={anon: true}",
            "training.max_steps=7",
            "data.root=/some/where",
            "output_dir='runs/x #1'",
        ],
    )
    path = tmp_path / "config.yaml"
    dump_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.checkpoint.storage_options == {"anon": True}
    assert again.output_dir == "runs/x #1"


@pytest.mark.parametrize(("override", "key", "shown", "expected"), BAD_OVERRIDES)
def test_cli_exits_2_naming_the_key_before_creating_anything(
    override, key, shown, expected, tmp_path, monkeypatch, capsys
):
    # In this process: `python -m imgtrain` exits with main()'s code (tests/integration/test_cli_process.py).
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    # Where the default dataset would go.
    monkeypatch.setenv("IMGTRAIN_DATA_HOME", str(tmp_path / "data_home"))
    assert cli.main(["train", "--output-dir", str(out), override]) == 2
    stderr = capsys.readouterr().err
    assert key in stderr and expected in stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not (tmp_path / "data_home").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", ["runs/x #1", "2024", "yes", "a: b"])
def test_cli_output_dir_and_resume_are_taken_literally(out, monkeypatch):
    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        return 0

    monkeypatch.setattr(commands, "run_training", fake_train)
    assert cli.main(["train", "--output-dir", out, "--resume", f"{out}/ckpt", "training.epochs=3"]) == 0
    assert seen["cfg"].output_dir == out
    assert seen["cfg"].checkpoint.resume == f"{out}/ckpt"
    assert seen["cfg"].training.epochs == 3
