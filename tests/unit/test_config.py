"""Config: every bad value is a ConfigError naming key, value and expectation; precedence; recipes; CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from imgtrain import cli, commands
from imgtrain.config import (
    MOVED_KEYS,
    RECIPES_DIR,
    Config,
    ConfigError,
    config_from_dict,
    dump_config,
    load_config,
    upgrade_saved_config,
)
from imgtrain.errors import EXIT_CONFIG
from imgtrain.train.evaluate import eval_base

from conftest import old_saved_config

# (override, key path, value as the message shows it, words of the expectation)
BAD_OVERRIDES = [
    ("training.epochz=3", "training.epochz", "3", "known key"),
    ("training.epochs=abc", "training.epochs", "'abc'", "an integer"),
    ("training.batch_size=0", "training.batch_size", "0", ">= 1"),
    ("optimization.mixed_precision=fp8", "optimization.mixed_precision", "'fp8'", "'bf16'"),
    ("data.augment.hflip=1.5", "data.augment.hflip", "1.5", "[0, 1]"),
    ("data.cache.size_gb=0", "data.cache.size_gb", "0.0", "GB > 0"),
    # names are checked against their registries when the config loads, with the close matches
    ("model.name=resnet5O", "model.name", "'resnet5O'", "did you mean resnet50"),
    ("model.name=timm/resnet5", "model.name", "'timm/resnet5'", "did you mean timm/resnet50"),
    ("data.decode.decoder=libjpeg_ro", "data.decode.decoder", "'libjpeg_ro'", "did you mean libjpeg_roi"),
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


def test_data_sections_from_yaml_and_command_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "data:\n  image_size: 32\n  augment:\n    hflip: 0.0\n    mixup_alpha: 0.2\n"
        "  decode:\n    decoder: pil\n  cache:\n    dir: /nvme/cache\n"
    )
    cfg = load_config(
        recipe, ["data.decode.max_image_pixels=1000", "data.cache.size_gb=5", "data.augment.hflip=0.25"]
    )
    assert cfg.data.image_size == 32
    assert (cfg.data.augment.hflip, cfg.data.augment.mixup_alpha) == (0.25, 0.2)  # override beats the recipe
    assert (cfg.data.decode.decoder, cfg.data.decode.max_image_pixels, cfg.data.decode.device) == (
        "pil",
        1000,
        "cpu",
    )
    assert (cfg.data.cache.dir, cfg.data.cache.size_gb) == ("/nvme/cache", 5.0)
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["data.decode.devise=gpu"])
    assert ei.value.key == "data.decode.devise" and "device" in ei.value.expected


@pytest.mark.parametrize(("old", "new"), sorted(MOVED_KEYS.items()))
def test_an_old_flat_data_key_says_where_it_moved(old, new, tmp_path):
    value = Config().to_dict()
    for part in new.split("."):
        value = value[part]  # the default: a value the new key accepts
    for overrides in ([f"{old}={value}"], []):
        recipe = None
        if not overrides:  # the same key in a recipe
            recipe = tmp_path / "old.yaml"
            recipe.write_text(yaml.safe_dump({"data": {old.split(".")[1]: value}}))
        with pytest.raises(ConfigError) as ei:
            load_config(recipe, overrides)
        assert ei.value.key == old and ei.value.exit_code == EXIT_CONFIG
        assert f"config key '{old}' moved to '{new}'" in str(ei.value)


def test_an_old_key_in_a_recipe_is_not_hidden_by_a_new_override(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("data:\n  decode: gpu\n")  # the device, before data.decode became a section
    with pytest.raises(ConfigError, match="'data.decode' moved to 'data.decode.device'"):
        load_config(recipe, ["data.decode.decoder=pil"])
    for overrides in (
        ["data.decode.decoder=pil", "data.decode=gpu"],
        ["data.decode=gpu", "data.decode.decoder=pil"],
    ):
        with pytest.raises(ConfigError, match="'data.decode' moved to 'data.decode.device'"):
            load_config(None, overrides)


def test_cli_names_the_moved_key_in_one_line_and_exits_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--output-dir", str(out), "data.decoder=pil"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "imgtrain: error: config key 'data.decoder' moved to 'data.decode.decoder' (got 'pil')"
    )
    assert "Traceback" not in err
    assert not out.exists()


# The data section of a config written before it was split (an old checkpoint's "config", config.yaml).
def test_a_config_saved_before_the_data_split_still_loads():
    saved = old_saved_config()
    with pytest.raises(ConfigError, match="moved to"):  # as written, the new schema refuses it
        config_from_dict(saved)
    cfg = config_from_dict(upgrade_saved_config(saved))
    assert saved["data"]["decoder"] == "pil"  # the caller's data is left as it was
    d = cfg.data
    assert (d.root, d.image_size, d.val_resize, d.workers, d.mean) == ("/their/data", 24, 28, 1, [0.5] * 3)
    assert d.augment.random_resized_crop_scale == [0.85, 1.0] and d.augment.hflip == 0.0
    assert (d.augment.auto_augment, d.augment.randaugment_magnitude, d.augment.random_erase) == (
        "randaugment",
        7,
        0.1,
    )
    assert (d.augment.mixup_alpha, d.augment.cutmix_alpha) == (0.2, 0.5)
    assert (d.decode.device, d.decode.decoder, d.decode.max_image_pixels) == ("cpu", "pil", 1_000_000)
    assert (d.cache.dir, d.cache.size_gb) == ("/their/cache", 50.0)
    # A config saved after the split is already in shape.
    assert upgrade_saved_config(cfg.to_dict()) == cfg.to_dict()


def test_eval_of_an_old_checkpoint_keeps_its_decoder_and_transform():
    cfg = load_config(None, ["data.root=/mine"], base=eval_base(old_saved_config()))
    assert cfg.data.decode.decoder == "pil"
    assert (cfg.data.image_size, cfg.data.val_resize, cfg.data.mean) == (24, 28, [0.5] * 3)
    assert (
        cfg.data.root == "/mine" and cfg.data.cache.dir is None
    )  # the checkpoint's data location is not used


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
