"""Recipes: the shipped files load, overrides are typed, and every bad input is one clear line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import finetune
from finetune.errors import FinetuneError
from finetune.recipes import (
    AUGMENTS,
    DATASETS,
    DEMO_RECIPE,
    DataConfig,
    Recipe,
    available_recipes,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    resolve_path,
    save_recipe,
    with_changes,
)

REPO = Path(finetune.__file__).resolve().parent.parent
SHIPPED = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """A working directory with its own recipes/ folder, like a user's project."""
    (tmp_path / "recipes").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_recipe(folder: Path, name: str, text: str) -> Path:
    path = folder / "recipes" / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(name_or_path, overrides=()) -> str:
    with pytest.raises(FinetuneError) as info:
        load_recipe(name_or_path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------- shipped files
def test_the_expected_recipes_ship():
    expected = {
        "pets37", "pets37-b32", "pets37-l16", "cifar10-scratch", "hymenoptera",
        "hymenoptera-deit-tiny", "flowers5-deit-tiny", "demo",
    }
    assert expected <= set(SHIPPED)
    assert expected <= set(available_recipes())


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_loads_by_name_and_by_path(name):
    by_name = load_recipe(name)
    by_path = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert by_name == by_path
    assert by_name.name == name
    assert by_name.model


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_says_where_its_numbers_come_from(name):
    first_line = (REPO / "recipes" / f"{name}.yaml").read_text().splitlines()[0]
    assert first_line.startswith("# ")


def test_pets37_has_the_reference_numbers():
    r = load_recipe("pets37")
    assert (r.model, r.img_size, r.batch_size, r.epochs) == ("ppv:B_16_imagenet1k", 384, 16, 30)
    assert (r.optimizer.name, r.optimizer.lr, r.optimizer.momentum) == ("sgd", 0.002, 0.9)
    assert r.optimizer.weight_decay == 0.0
    assert (r.schedule.name, r.schedule.step_size, r.schedule.gamma) == ("step", 5, 0.7)
    assert r.schedule.warmup_epochs == 0
    assert r.keep_best == 3
    assert (r.data.dataset, r.data.root, r.data.augment) == ("oxford_pets", "data/", "flip")
    assert r.precision == "auto" and r.dropout == 0.1  # bf16 where the device has it; ppv's dropout


def test_pets37_variants_differ_only_in_model_and_memory_settings():
    base = recipe_to_dict(load_recipe("pets37"))
    for name, model in [("pets37-b32", "ppv:B_32_imagenet1k"), ("pets37-l16", "ppv:L_16_imagenet1k")]:
        variant = recipe_to_dict(load_recipe(name))
        assert variant["model"] == model
        different = {k for k in base if base[k] != variant[k]}
        assert different <= {"name", "model", "precision", "grad_checkpointing"}
    l16 = load_recipe("pets37-l16")
    assert l16.grad_checkpointing and l16.precision == "bf16" and l16.batch_size == 16


def test_demo_file_and_builtin_demo_agree():
    from_file = load_recipe(REPO / "recipes" / "demo.yaml")
    builtin = recipe_from_dict(DEMO_RECIPE, source="demo.yaml")
    assert recipe_to_dict(builtin) == recipe_to_dict(from_file)


def test_demo_loads_without_any_recipes_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("finetune.recipes._package_recipes_dir", lambda: tmp_path / "missing")
    epochs_before = DEMO_RECIPE["epochs"]
    demo = load_recipe("demo", ["epochs=5"])
    assert demo.name == "demo" and demo.data.dataset == "digits" and demo.epochs == 5
    assert available_recipes() == ["demo"]
    assert DEMO_RECIPE["epochs"] == epochs_before != 5  # the override did not leak into the constant


# ------------------------------------------------------------------------------------- defaults
def test_defaults_fill_missing_keys_and_the_name_is_the_file_stem(in_tmp):
    write_recipe(in_tmp, "mini", "model: B_16\ndata:\n  dataset: cifar10\n")
    r = load_recipe("mini")
    assert r.name == "mini"
    assert r.data.root == "data/"  # torchvision datasets download to data/ by default
    assert r.img_size is None and r.early_stop_patience is None and r.clip_grad is None
    assert r.data.val_split == 0.1 and r.data.test_split == 0.0


def test_cwd_recipes_folder_wins_over_the_packaged_one(in_tmp):
    write_recipe(in_tmp, "pets37", "model: B_16\nepochs: 2\ndata:\n  dataset: cifar10\n")
    assert load_recipe("pets37").epochs == 2


# ------------------------------------------------------------------------------------ overrides
def test_overrides_use_dotted_keys_and_yaml_types():
    r = load_recipe(
        "pets37",
        ["epochs=3", "optimizer.lr=0.01", "data.root=/x", "clip_grad=null", "clip_grad=1",
         "data.balanced=true", "max_steps_per_epoch=2", "img_size=null"],
    )
    assert r.epochs == 3 and isinstance(r.epochs, int)
    assert r.optimizer.lr == 0.01
    assert r.data.root == "/x"
    assert r.clip_grad == 1.0 and isinstance(r.clip_grad, float)  # an int is accepted for a float
    assert r.data.balanced is True
    assert r.max_steps_per_epoch == 2 and r.img_size is None
    assert load_recipe("pets37", ["clip_grad=null"]).clip_grad is None


def test_exponent_floats_without_a_dot_are_numbers():
    assert load_recipe("pets37", ["optimizer.lr=1e-3"]).optimizer.lr == pytest.approx(0.001)


def test_override_can_set_a_whole_section_as_a_mapping():
    r = load_recipe("pets37", ["optimizer={name: adamw, lr: 0.0003}"])
    assert (r.optimizer.name, r.optimizer.lr, r.optimizer.momentum) == ("adamw", 0.0003, 0.9)


def test_override_can_fix_an_invalid_file_value(in_tmp):
    write_recipe(in_tmp, "x", "model: B_16\nepochs: 0\ndata: {dataset: digits}\n")
    assert load_recipe("x", ["epochs=4"]).epochs == 4


# --------------------------------------------------------------------------------------- errors
def test_unknown_key_suggests_the_close_match(in_tmp):
    write_recipe(in_tmp, "x", "model: B_16\noptimiser:\n  lr: 0.1\n")
    assert error_of("x") == "recipes/x.yaml: unknown key 'optimiser' (did you mean 'optimizer'?)"


def test_unknown_nested_key_is_dotted(in_tmp):
    write_recipe(in_tmp, "x", "model: B_16\ndata:\n  dataset: digits\n  valsplit: 0.2\n")
    assert error_of("x") == "recipes/x.yaml: unknown key 'data.valsplit' (did you mean 'data.val_split'?)"


def test_unknown_key_without_a_close_match_lists_the_allowed_keys():
    message = error_of("pets37", ["optimizer.learning_rate=0.1"])
    assert message.startswith("--set optimizer.learning_rate=0.1: unknown key 'optimizer.learning_rate'")
    assert "name, lr, momentum, weight_decay" in message


def test_unknown_key_in_an_override_names_the_override():
    message = error_of("pets37", ["optimizer.lrr=0.1"])
    assert message == "--set optimizer.lrr=0.1: unknown key 'optimizer.lrr' (did you mean 'optimizer.lr'?)"
    assert "epochs.x" in error_of("pets37", ["epochs.x=1"])


@pytest.mark.parametrize(
    "line, key, shown",
    [
        ("epochs: true", "epochs", "true"),  # a bool is not an int
        ("epochs: 2.5", "epochs", "2.5"),
        ("batch_size: '16'", "batch_size", "'16'"),
        ("grad_checkpointing: 1", "grad_checkpointing", "1"),
        ("optimizer: {lr: fast}", "optimizer.lr", "'fast'"),
        ("optimizer: sgd", "optimizer", "'sgd'"),
    ],
)
def test_wrong_type_names_file_key_and_value(in_tmp, line, key, shown):
    write_recipe(in_tmp, "x", f"model: B_16\ndata: {{dataset: digits}}\n{line}\n")
    message = error_of("x")
    assert message.startswith(f"recipes/x.yaml: {key}: {shown} is not ")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("epochs=0", "epochs: 0 is not an integer >= 1"),
        ("optimizer.lr=0", "optimizer.lr: 0 is not a number > 0"),
        ("optimizer.momentum=1", "optimizer.momentum: 1 is not a number >= 0 and < 1"),
        ("schedule.gamma=1.5", "schedule.gamma: 1.5 is not a number > 0 and <= 1"),
        ("label_smoothing=1.0", "label_smoothing: 1.0 is not a number >= 0 and < 1"),
        ("data.val_split=0", "data.val_split: 0 is not a number > 0 and < 1"),
        ("clip_grad=-1", "clip_grad: -1 is not a number > 0 or null"),
        ("keep_best=0", "keep_best: 0 is not an integer >= 1"),
        ("data.workers=-1", "data.workers: -1 is not an integer >= 0"),
        ("schedule.warmup_epochs=30", "schedule.warmup_epochs: 30 must be less than epochs (30)"),
        ("data.test_split=0.9", "data.test_split: data.val_split + data.test_split"),
    ],
)
def test_impossible_value_names_the_override_key_and_what_is_allowed(override, expected):
    assert error_of("pets37", [override]).startswith(f"--set {override}: {expected}")


def test_impossible_value_in_a_file_names_the_file(in_tmp):
    write_recipe(in_tmp, "x", "model: B_16\ndata: {dataset: digits}\nschedule:\n  step_size: 0\n")
    assert error_of("x") == "recipes/x.yaml: schedule.step_size: 0 is not an integer >= 1"


def test_shortening_epochs_below_the_warmup_says_how_to_fix_it():
    message = error_of("hymenoptera", ["epochs=1"])
    assert message.startswith("--set epochs=1: epochs: 1 must be more than schedule.warmup_epochs (1)")
    assert "--set schedule.warmup_epochs=0" in message
    assert load_recipe("hymenoptera", ["epochs=1", "schedule.warmup_epochs=0"]).epochs == 1


def test_bad_enum_lists_the_choices():
    assert error_of("pets37", ["optimizer.name=adam"]) == (
        "--set optimizer.name=adam: optimizer.name: 'adam' is not one of sgd, adamw"
    )
    assert "one of imagefolder, oxford_pets, cifar10, cifar100, flowers102, digits" in error_of(
        "pets37", ["data.dataset=mnist"]
    )


def test_enum_error_from_a_file(in_tmp):
    write_recipe(in_tmp, "x", "model: B_16\nprecision: fp64\ndata: {dataset: digits}\n")
    assert error_of("x") == "recipes/x.yaml: precision: 'fp64' is not one of auto, fp32, bf16, fp16"


def test_imagefolder_needs_a_root(in_tmp):
    write_recipe(in_tmp, "x", "model: B_16\ndata: {dataset: imagefolder}\n")
    assert error_of("x").startswith("recipes/x.yaml: data.root: is required")


def test_model_is_required(in_tmp):
    write_recipe(in_tmp, "x", "epochs: 3\ndata: {dataset: digits}\n")
    assert error_of("x").startswith("recipes/x.yaml: model: is required")


@pytest.mark.parametrize("override", ["epochs", "=3", ""])
def test_override_without_key_equals_value(override):
    message = error_of("pets37", [override])
    assert message.startswith(f"--set {override}: expected KEY=VALUE")


def test_override_of_a_whole_section_with_a_scalar():
    assert "optimizer is a section" in error_of("pets37", ["optimizer=sgd"])


def test_yaml_syntax_error_names_file_and_line(in_tmp):
    write_recipe(in_tmp, "x", "model: B_16\nepochs: 3\n  batch_size: [16\n")
    message = error_of("x")
    assert message.startswith("recipes/x.yaml: line 3: invalid YAML")


def test_yaml_error_in_an_override_value():
    assert error_of("pets37", ["data.root=[1"]).startswith("--set data.root=[1: line 1: invalid YAML")


def test_duplicate_keys_are_an_error_not_silently_the_last(in_tmp):
    write_recipe(in_tmp, "x", "model: B_16\nepochs: 3\nepochs: 4\n")
    assert error_of("x") == "recipes/x.yaml: line 3: invalid YAML: duplicate key 'epochs'"


def test_top_level_must_be_a_mapping(in_tmp):
    write_recipe(in_tmp, "x", "- model: B_16\n")
    assert error_of("x").startswith("recipes/x.yaml: expected a mapping")


def test_unknown_recipe_name_suggests_and_lists():
    message = error_of("pet37")
    assert message.startswith("unknown recipe 'pet37' (did you mean 'pets37'")
    assert "available: " in message and "cifar10-scratch" in message and "demo" in message


def test_missing_recipe_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert str(missing) in error_of(missing)


# ------------------------------------------------------------------------------ dicts and saving
def test_to_dict_from_dict_and_save_round_trip(tmp_path):
    original = load_recipe("cifar10-scratch", ["clip_grad=1.0", "data.balanced=true"])
    as_dict = recipe_to_dict(original)
    json.dumps(as_dict)  # plain data
    assert "source" not in as_dict
    assert as_dict["optimizer"]["name"] == "adamw" and as_dict["data"]["augment"] == "crop_flip"
    assert recipe_from_dict(as_dict) == original

    saved = save_recipe(original, tmp_path / "run" / "recipe.yaml")
    assert yaml.safe_load(saved.read_text()) == as_dict
    assert load_recipe(saved) == original


def test_from_dict_validates_like_a_file():
    with pytest.raises(FinetuneError, match=r"^<dict>: unknown key 'epoch' \(did you mean 'epochs'\?\)$"):
        recipe_from_dict({"model": "B_16", "epoch": 3})
    with pytest.raises(FinetuneError, match=r"^mine.yaml: epochs: -1 is not an integer >= 1$"):
        recipe_from_dict({"model": "B_16", "epochs": -1}, source="mine.yaml")


def test_numbers_must_be_finite_and_empty_sections_are_defaults():
    assert error_of("pets37", ["optimizer.lr=.inf"]) == (
        "--set optimizer.lr=.inf: optimizer.lr: inf is not a number > 0"
    )
    commented_out = {"model": "B_16", "data": {"dataset": "digits"}, "optimizer": None}
    assert recipe_from_dict(commented_out).optimizer.lr == 0.01


def test_override_below_a_plain_key_says_it_has_no_sub_keys():
    assert error_of("pets37", ["optimizer.lr.x=1"]) == (
        "--set optimizer.lr.x=1: unknown key 'optimizer.lr.x' (optimizer.lr has no sub-keys)"
    )


def test_from_dict_does_not_mutate_its_input():
    d = {"model": "B_16", "data": {"dataset": "cifar10"}}
    recipe_from_dict(d, overrides=["data.root=/x"])
    assert d == {"model": "B_16", "data": {"dataset": "cifar10"}}


def test_recipe_is_plain_data():
    assert Recipe().optimizer is not Recipe().optimizer  # no shared mutable defaults


def dotted_keys(d, prefix=""):
    for key, value in d.items():
        if isinstance(value, dict):
            yield from dotted_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def value_at(d, dotted):
    for part in dotted.split("."):
        d = d[part]
    return d


DEFAULT_KEYS = list(dotted_keys(recipe_to_dict(Recipe())))


def test_the_default_recipe_has_every_documented_key():
    assert "source" not in DEFAULT_KEYS
    some = {"model", "epochs", "optimizer.lr", "schedule.warmup_epochs", "data.augment"}
    assert some <= set(DEFAULT_KEYS)


@pytest.mark.parametrize("key", DEFAULT_KEYS)
def test_every_default_key_round_trips_through_save_and_load(tmp_path, key):
    original = Recipe(name="default", model="B_16", data=DataConfig(root="/x"))  # all else default
    saved = save_recipe(original, tmp_path / "recipe.yaml")
    loaded = load_recipe(saved)
    assert key in dotted_keys(yaml.safe_load(saved.read_text()))  # written explicitly
    assert value_at(recipe_to_dict(loaded), key) == value_at(recipe_to_dict(original), key)
    assert loaded == original


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_file_loads_and_survives_save(tmp_path, name):
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert recipe.source == str(REPO / "recipes" / f"{name}.yaml")
    assert load_recipe(save_recipe(recipe, tmp_path / "recipe.yaml")) == recipe


def test_equality_ignores_where_a_recipe_came_from():
    from_file = load_recipe("pets37")
    from_dict = recipe_from_dict(recipe_to_dict(from_file))
    assert from_dict.source == "<dict>" != from_file.source
    assert from_dict == from_file
    assert from_dict != load_recipe("pets37", ["epochs=3"])


def test_choices_have_one_owner():
    from finetune.data import factory, transforms

    assert factory.DATASETS is DATASETS and transforms.AUGMENTS is AUGMENTS
    assert set(factory.SOURCES) == set(DATASETS)  # every recipe value has its reader, and no more


# --------------------------------------------------------------------------------- with_changes
def test_with_changes_returns_a_validated_copy_and_leaves_the_original():
    original = load_recipe("pets37")
    changed = with_changes(original, **{"model": "B_32", "data.root": "/abs/pets", "clip_grad": 1})
    assert (changed.model, changed.data.root, changed.clip_grad) == ("B_32", "/abs/pets", 1.0)
    assert isinstance(changed.clip_grad, float)
    assert (original.model, original.data.root) == ("ppv:B_16_imagenet1k", "data/")
    assert original.clip_grad is None
    assert changed.source == original.source and changed.name == original.name
    assert changed.optimizer == original.optimizer and changed.optimizer is not original.optimizer


def test_with_changes_merges_a_section_given_as_a_mapping_or_a_config():
    original = load_recipe("pets37")
    assert with_changes(original, optimizer={"lr": 0.1}).optimizer.momentum == 0.9
    assert with_changes(original, data=DataConfig(dataset="digits")).data.dataset == "digits"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epochs": 0}, "with_changes(epochs=0): epochs: 0 is not an integer >= 1"),
        (
            {"data.root": True},
            "with_changes(data.root=true): data.root: true is not a non-empty string or null",
        ),
        (
            {"optimizer.lrr": 1},
            "with_changes(optimizer.lrr=1): unknown key 'optimizer.lrr' (did you mean 'optimizer.lr'?)",
        ),
        (
            {"schedule.warmup_epochs": 30},
            "with_changes(schedule.warmup_epochs=30): schedule.warmup_epochs: 30 must be less",
        ),
    ],
)
def test_with_changes_refuses_what_a_recipe_file_would(changes, message):
    with pytest.raises(FinetuneError) as info:
        with_changes(load_recipe("pets37"), **changes)
    assert str(info.value).startswith(message)


# ---------------------------------------------------------------------------------- resolve_path
def test_resolve_path_prefers_cwd_then_repo_root(in_tmp):
    recipe = load_recipe(REPO / "recipes" / "pets37.yaml")
    (in_tmp / "here").mkdir()
    assert resolve_path(recipe, "here") == str(in_tmp / "here")
    assert resolve_path(recipe, "recipes/pets37.yaml") == str(REPO / "recipes" / "pets37.yaml")
    assert resolve_path(recipe, "finetune/recipes.py") == str(REPO / "finetune" / "recipes.py")
    assert resolve_path(recipe, "/abs/x") == "/abs/x"
    assert resolve_path(recipe, "not-there/data") == str(in_tmp / "not-there" / "data")
