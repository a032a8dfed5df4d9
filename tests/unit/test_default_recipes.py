"""Which recipe a command line without --config gets, and recipe values that must follow others
(data.val_resize from data.image_size; a warmup longer than a short run)."""

import logging

import pytest

from imgtrain import cli, commands
from imgtrain.config import RECIPES_DIR, default_recipe, load_config
from imgtrain.data.transforms import eval_resize
from imgtrain.optim import create_schedule


def test_a_folder_of_ones_own_gets_the_general_recipe_and_the_run_says_why(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(commands, "run_training", lambda cfg: seen.setdefault("cfg", cfg) and 0)
    monkeypatch.delenv("RANK", raising=False)
    assert cli.main(["train", "data.root=/my/photos", "--output-dir", str(tmp_path / "o")]) == 0
    cfg = seen["cfg"]
    assert cfg.data.root == "/my/photos"
    assert (cfg.model.name, cfg.model.small_input) == ("resnet18", False)
    assert cfg.data.image_size >= 128 and cfg.data.augment.hflip == 0.5
    assert cfg.data.mean == [0.485, 0.456, 0.406] and cfg.data.std == [0.229, 0.224, 0.225]
    err = capsys.readouterr().err
    assert "data.root is given and no --config: using the 'folder' recipe" in err


def test_without_data_root_the_quickstart_recipe_is_named(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(commands, "run_training", lambda cfg: seen.setdefault("cfg", cfg) and 0)
    monkeypatch.delenv("RANK", raising=False)
    assert cli.main(["train", "--output-dir", str(tmp_path / "o")]) == 0
    assert seen["cfg"].data.root is None and seen["cfg"].data.image_size == 8
    assert "no --config: using the 'quickstart' recipe" in capsys.readouterr().err
    # An explicit recipe is the user's choice: taken as is, nothing to explain.
    assert (
        cli.main(
            ["train", "--config", "quickstart", "data.root=/my/photos", "--output-dir", str(tmp_path / "o")]
        )
        == 0
    )
    assert seen["cfg"].data.image_size == 8
    assert "recipe" not in capsys.readouterr().err


def test_default_recipe_only_for_a_real_data_root():
    assert default_recipe(["data.root=/x", "training.epochs=3"])[0] == "folder"
    assert default_recipe(["data.root=null"])[0] == "quickstart"
    assert default_recipe(["training.epochs=3"])[0] == "quickstart"


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_recipes_eval_resize_follows_image_size(recipe):
    base = load_config(recipe)
    size = base.data.image_size
    double = load_config(recipe, [f"data.image_size={2 * size}"])
    assert abs(eval_resize(double.data) - 2 * eval_resize(base.data)) <= 1  # up to rounding


def test_imagenet_recipe_at_112_px_resizes_to_128():
    assert eval_resize(load_config("imagenet_resnet50").data) == 256
    assert eval_resize(load_config("imagenet_resnet50", ["data.image_size=112"]).data) == 128


def test_a_warmup_longer_than_the_run_is_shortened_and_said(caplog):
    cfg = load_config("imagenet_resnet50", ["training.epochs=1"])  # the recipe warms up over 5 epochs
    with caplog.at_level(logging.WARNING, logger="imgtrain.optim"):
        schedule = create_schedule(cfg.training)
    assert schedule.warmup_epochs == 0.5
    assert schedule(0.5) == pytest.approx(1.0)  # the peak LR is reached within the run
    assert "training.warmup_epochs=5 is not shorter than the run (training.epochs=1)" in caplog.text
