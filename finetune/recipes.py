"""Recipes: every training setting in one YAML file, loaded into plain dataclasses.

A recipe is `recipes/<name>.yaml`. `load_recipe("pets37", ["optimizer.lr=0.01"])` finds the file,
applies `--set` style overrides and validates every key, so a typo or an impossible value stops
the run before any weights are downloaded, with one line naming the file (or override), the
dotted key, the value and what is allowed.

The schema is the dataclasses below; their defaults are the values a key takes when a recipe
leaves it out.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence

import yaml

from .errors import FinetuneError

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "none")
DATASETS = ("imagefolder", "oxford_pets", "cifar10", "cifar100", "flowers102", "digits")
TORCHVISION_DATASETS = ("oxford_pets", "cifar10", "cifar100", "flowers102")
AUGMENTS = ("none", "flip", "affine", "crop_flip", "randaugment")
DEFAULT_DOWNLOAD_ROOT = "data/"


# ----------------------------------------------------------------------------------------- schema
@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.01  # peak learning rate, > 0
    momentum: float = 0.9  # 0 <= x < 1; SGD momentum (adamw ignores it)
    weight_decay: float = 0.0  # >= 0


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # step | cosine | none (constant lr)
    step_size: int = 5  # step: multiply the lr by gamma every step_size epochs
    gamma: float = 0.7  # step: 0 < gamma <= 1
    warmup_epochs: int = 0  # linear warmup from ~0 to lr, >= 0 and < epochs


@dataclass
class DataConfig:
    dataset: str = "imagefolder"  # one of DATASETS
    root: Optional[str] = None  # imagefolder: the folder (required); torchvision sets: download dir
    val_split: float = 0.1  # 0 < x < 1: train fraction held out when the dataset has no val split
    test_split: float = 0.0  # 0 <= x < 1: fraction held out as test when there is no test split
    balanced: bool = False  # class-balanced sampling of the training set
    workers: int = 2  # DataLoader worker processes, >= 0
    augment: str = "flip"  # none | flip | affine (shift/rotate, no flip) | crop_flip | randaugment


@dataclass
class Recipe:
    name: str = ""  # defaults to the recipe file's stem
    model: str = ""  # model ref: B_16, ppv:..., timm:..., hf:..., npz:PATH, a checkpoint, scratch:...
    img_size: Optional[int] = None  # training resolution; null = the weights' native size
    epochs: int = 10  # >= 1
    batch_size: int = 32  # images per forward pass, >= 1
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a grad scaler)
    seed: int = 0  # >= 0; seeds torch, numpy, python and the data split
    keep_best: int = 3  # how many best checkpoints to keep (and average), >= 1
    early_stop_patience: Optional[int] = None  # epochs without val improvement; 0/null = off
    grad_accum: int = 1  # batches per optimizer step, >= 1
    clip_grad: Optional[float] = None  # max gradient norm, > 0; null = no clipping
    label_smoothing: float = 0.0  # 0 <= x < 1
    grad_checkpointing: bool = False  # recompute activations in backward to save memory
    max_steps_per_epoch: Optional[int] = None  # cap on optimizer steps per epoch (smoke tests)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Where the recipe came from (a file path or "<dict>"): not a recipe key, never serialised;
    # `resolve_path` uses it to find the repo root.
    source: str = field(default="<dict>", compare=False, repr=False)


_SECTIONS: Dict[str, type] = {
    "optimizer": OptimizerConfig,
    "schedule": ScheduleConfig,
    "data": DataConfig,
}
_NOT_KEYS = {"source"}

# The built-in copy of recipes/demo.yaml, so `finetune demo` works from a bare pip install.
DEMO_RECIPE: Dict[str, Any] = {
    "model": "scratch:patch_size=4,embed_dim=64,depth=4,num_heads=4,mlp_ratio=2",
    "img_size": 16,
    "epochs": 60,
    "batch_size": 64,
    "keep_best": 3,
    "label_smoothing": 0.1,
    "optimizer": {"name": "adamw", "lr": 0.002, "weight_decay": 0.05},
    "schedule": {"name": "cosine", "warmup_epochs": 2},
    "data": {
        "dataset": "digits",
        "val_split": 0.1,
        "test_split": 0.2,
        "augment": "affine",
        "workers": 0,
    },
}


# ------------------------------------------------------------------------------------------ rules
class _Rule(NamedTuple):
    allowed: str  # completes "VALUE is not ...", e.g. "an integer >= 1"
    accepts: Callable[[Any], bool]
    cast: Callable[[Any], Any] = lambda value: value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _nullable(rule: _Rule) -> _Rule:
    return _Rule(
        f"{rule.allowed} or null",
        lambda v: v is None or rule.accepts(v),
        lambda v: None if v is None else rule.cast(v),
    )


def _integer(minimum: int) -> _Rule:
    return _Rule(f"an integer >= {minimum}", lambda v: _is_int(v) and v >= minimum)


def _number(allowed: str, within: Callable[[float], bool]) -> _Rule:
    return _Rule(allowed, lambda v: _is_number(v) and within(v), float)


def _choice(options: Sequence[str]) -> _Rule:
    return _Rule(f"one of {', '.join(options)}", lambda v: isinstance(v, str) and v in options)


def _text() -> _Rule:
    return _Rule("a non-empty string", lambda v: isinstance(v, str) and v.strip() != "")


def _boolean() -> _Rule:
    return _Rule("true or false", lambda v: isinstance(v, bool))


_RULES: Dict[str, _Rule] = {
    "name": _text(),
    "model": _Rule(
        "a model ref such as B_16, ppv:B_16_imagenet1k, timm:NAME, hf:ORG/NAME, npz:PATH, "
        "a checkpoint path or scratch:patch_size=...",
        _text().accepts,
    ),
    "img_size": _nullable(_integer(1)),
    "epochs": _integer(1),
    "batch_size": _integer(1),
    "precision": _choice(PRECISIONS),
    "seed": _integer(0),
    "keep_best": _integer(1),
    "early_stop_patience": _nullable(_integer(0)),
    "grad_accum": _integer(1),
    "clip_grad": _nullable(_number("a number > 0", lambda x: x > 0)),
    "label_smoothing": _number("a number >= 0 and < 1", lambda x: 0 <= x < 1),
    "grad_checkpointing": _boolean(),
    "max_steps_per_epoch": _nullable(_integer(1)),
    "optimizer.name": _choice(OPTIMIZERS),
    "optimizer.lr": _number("a number > 0", lambda x: x > 0),
    "optimizer.momentum": _number("a number >= 0 and < 1", lambda x: 0 <= x < 1),
    "optimizer.weight_decay": _number("a number >= 0", lambda x: x >= 0),
    "schedule.name": _choice(SCHEDULES),
    "schedule.step_size": _integer(1),
    "schedule.gamma": _number("a number > 0 and <= 1", lambda x: 0 < x <= 1),
    "schedule.warmup_epochs": _integer(0),
    "data.dataset": _choice(DATASETS),
    "data.root": _nullable(_text()),
    "data.val_split": _number("a number > 0 and < 1", lambda x: 0 < x < 1),
    "data.test_split": _number("a number >= 0 and < 1", lambda x: 0 <= x < 1),
    "data.balanced": _boolean(),
    "data.workers": _integer(0),
    "data.augment": _choice(AUGMENTS),
}


# ------------------------------------------------------------------------------------------- YAML
class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`) and rejects duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise FinetuneError(f"{where}: {line}invalid YAML: {problem}") from None


# ------------------------------------------------------------------------------------- validation
class _Context:
    """Names the origin of each key in error messages: the recipe file, or the override that set it."""

    def __init__(self, source: str):
        self.source = source
        self.origins: Dict[str, str] = {}

    def where(self, key: str) -> str:
        return self.origins.get(key, self.source)

    def fail(self, key: str, message: str) -> FinetuneError:
        return FinetuneError(f"{self.where(key)}: {key}: {message}")


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML (`true`, `null`, `'adam'`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _keys_of(cls: type) -> List[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name not in _NOT_KEYS]


def _unknown_key(where: str, dotted: str, known: Sequence[str]) -> FinetuneError:
    prefix, _, key = dotted.rpartition(".")
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        suggestion = f"{prefix}.{close[0]}" if prefix else close[0]
        hint = f"did you mean {suggestion!r}?"
    else:
        hint = f"allowed: {', '.join(known)}"
    return FinetuneError(f"{where}: unknown key {dotted!r} ({hint})")


def _build(cls: type, raw: Mapping[str, Any], prefix: str, ctx: _Context) -> Any:
    known = _keys_of(cls)
    for key in raw:
        if key not in known:
            dotted = f"{prefix}{key}"
            raise _unknown_key(ctx.where(dotted), dotted, known)
    values = {}
    for key in known:
        if key not in raw:
            continue
        dotted = f"{prefix}{key}"
        if key in _SECTIONS and not prefix:
            values[key] = _build(_SECTIONS[key], _section(raw[key], dotted, ctx), f"{key}.", ctx)
        else:
            values[key] = _checked(raw[key], dotted, ctx)
    return cls(**values)


def _section(value: Any, dotted: str, ctx: _Context) -> Mapping[str, Any]:
    if value is None:  # a section with every sub-key commented out: all defaults
        return {}
    if not isinstance(value, dict):
        keys = ", ".join(_keys_of(_SECTIONS[dotted]))
        raise ctx.fail(dotted, f"{_show(value)} is not a mapping of {keys}")
    return value


def _checked(value: Any, dotted: str, ctx: _Context) -> Any:
    rule = _RULES[dotted]
    if not rule.accepts(value):
        raise ctx.fail(dotted, f"{_show(value)} is not {rule.allowed}")
    return rule.cast(value)


def _check_consistency(recipe: Recipe, ctx: _Context) -> None:
    """Rules that span keys; an error names the key an override touched, if any."""
    if not recipe.model:
        raise ctx.fail("model", f"is required: {_RULES['model'].allowed}")
    _check_warmup(recipe, ctx)
    _check_splits(recipe.data, ctx)
    if recipe.data.dataset == "imagefolder" and recipe.data.root is None:
        raise ctx.fail(
            "data.root", "is required when data.dataset is imagefolder (a folder of class folders)"
        )


def _check_warmup(recipe: Recipe, ctx: _Context) -> None:
    warmup, epochs = recipe.schedule.warmup_epochs, recipe.epochs
    if warmup < epochs:
        return
    if "epochs" in ctx.origins:
        raise ctx.fail(
            "epochs",
            f"{epochs} must be more than schedule.warmup_epochs ({warmup}); "
            "lower that too, e.g. --set schedule.warmup_epochs=0",
        )
    raise ctx.fail("schedule.warmup_epochs", f"{warmup} must be less than epochs ({epochs})")


def _check_splits(data: DataConfig, ctx: _Context) -> None:
    if data.val_split + data.test_split < 1:
        return
    key = "data.test_split" if "data.test_split" in ctx.origins else "data.val_split"
    raise ctx.fail(
        key,
        f"data.val_split + data.test_split = {data.val_split} + {data.test_split} "
        "leaves nothing to train on; the sum must be less than 1",
    )


def _fill_derived_defaults(recipe: Recipe, default_name: str) -> Recipe:
    if not recipe.name:
        recipe.name = default_name
    if recipe.data.root is None and recipe.data.dataset in TORCHVISION_DATASETS:
        recipe.data.root = DEFAULT_DOWNLOAD_ROOT
    return recipe


def _validate(raw: Any, ctx: _Context, default_name: str) -> Recipe:
    if not isinstance(raw, Mapping):
        raise FinetuneError(
            f"{ctx.source}: expected a mapping of recipe keys at the top level, "
            f"got {type(raw).__name__}"
        )
    recipe = _build(Recipe, raw, "", ctx)
    _check_consistency(recipe, ctx)
    recipe.source = ctx.source
    return _fill_derived_defaults(recipe, default_name)


# -------------------------------------------------------------------------------------- overrides
def _parse_override(text: str) -> tuple[str, Any]:
    label = f"--set {text}"
    key, sep, value_text = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise FinetuneError(
            f"{label}: expected KEY=VALUE, e.g. --set epochs=3 or --set optimizer.lr=0.01"
        )
    return key, _parse_yaml(value_text, label)


def _check_override_key(parts: List[str], label: str) -> None:
    cls: Optional[type] = Recipe
    for depth, part in enumerate(parts):
        dotted = ".".join(parts[: depth + 1])
        if cls is None:
            parent = ".".join(parts[:depth])
            raise FinetuneError(f"{label}: unknown key {dotted!r} ({parent} has no sub-keys)")
        if part not in _keys_of(cls):
            raise _unknown_key(label, dotted, _keys_of(cls))
        cls = _SECTIONS.get(part) if depth == 0 else None


def _apply_override(raw: Dict[str, Any], text: str, ctx: _Context) -> None:
    label = f"--set {text}"
    key, value = _parse_override(text)
    parts = key.split(".")
    _check_override_key(parts, label)
    if len(parts) == 1 and key in _SECTIONS:
        if not isinstance(value, dict):
            example = f"{key}.{_keys_of(_SECTIONS[key])[0]}=..."
            raise FinetuneError(
                f"{label}: {key} is a section; set one of its keys, e.g. --set {example}"
            )
        section = raw.get(key) if isinstance(raw.get(key), dict) else {}
        raw[key] = {**section, **value}
        ctx.origins.update({f"{key}.{sub}": label for sub in value})
        return
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    ctx.origins[key] = label


# ------------------------------------------------------------------------------------ public API
def recipe_from_dict(
    d: Mapping[str, Any], source: str = "<dict>", overrides: Iterable[str] = ()
) -> Recipe:
    """Validate a plain nested dict (as read from YAML) into a `Recipe`; errors name `source`."""
    default_name = "recipe" if source.startswith("<") else Path(source).stem
    return _from_raw(d, source, default_name, overrides)


def recipe_to_dict(recipe: Recipe) -> Dict[str, Any]:
    """The recipe as plain nested dicts of str/int/float/bool/None, ready for JSON or YAML."""
    d = dataclasses.asdict(recipe)
    for key in _NOT_KEYS:
        d.pop(key, None)
    return d


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> Path:
    """Write the fully resolved recipe as YAML (e.g. `run_dir/recipe.yaml`); loads back identical."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Resolved recipe (every key explicit), from {recipe.source}\n"
    body = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=False)
    path.write_text(header + body, encoding="utf-8")
    return path


def available_recipes() -> List[str]:
    """Names `load_recipe` accepts: recipes/*.yaml here and beside the package, plus the built-in demo."""
    names = {"demo"}
    for folder in _recipe_dirs():
        names.update(p.stem for p in folder.glob("*.yaml"))
    return sorted(names)


def load_recipe(name_or_path: str | os.PathLike, overrides: Iterable[str] = ()) -> Recipe:
    """Load `recipes/NAME.yaml` (or a .yaml path), apply `key=value` overrides and validate."""
    text = str(name_or_path)
    if _looks_like_path(text):
        return _load_file(Path(text), overrides)
    for folder in _recipe_dirs():
        candidate = folder / f"{text}.yaml"
        if candidate.is_file():
            return _load_file(candidate, overrides)
    if text == "demo":
        return _from_raw(DEMO_RECIPE, "<built-in demo recipe>", "demo", overrides)
    raise FinetuneError(_unknown_recipe_message(text))


def resolve_path(recipe: Recipe, value: str | os.PathLike) -> str:
    """Resolve a relative path from a recipe: against the current directory if it exists there,
    else against the repo root (the folder holding `recipes/`) if it exists there, else the
    current directory (where a download dir such as `data/` would be created)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    here = Path.cwd() / path
    if here.exists():
        return str(here)
    beside_recipes = _repo_root(recipe) / path
    if beside_recipes.exists():
        return str(beside_recipes.resolve())
    return str(here)


# -------------------------------------------------------------------------------------- internals
def _package_recipes_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "recipes"


def _recipe_dirs() -> List[Path]:
    dirs = []
    for folder in (Path.cwd() / "recipes", _package_recipes_dir()):
        if folder.is_dir() and all(not _same_dir(folder, d) for d in dirs):
            dirs.append(folder)
    return dirs


def _same_dir(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _looks_like_path(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or "/" in text or os.sep in text


def _display(path: Path) -> str:
    """The path relative to the current directory when it is inside it, as in `recipes/pets37.yaml`."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def _load_file(path: Path, overrides: Iterable[str]) -> Recipe:
    where = _display(path) if path.exists() else str(path)
    if not path.is_file():
        raise FinetuneError(
            f"recipe file {where!r} does not exist; give a .yaml path or one of: "
            f"{', '.join(available_recipes())}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FinetuneError(f"{where}: cannot read recipe: {exc}") from None
    recipe = _from_raw(_parse_yaml(text, where), where, path.stem, overrides)
    recipe.source = str(path.resolve())
    return recipe


def _from_raw(raw: Any, source: str, default_name: str, overrides: Iterable[str]) -> Recipe:
    ctx = _Context(source)
    if raw is None:  # an empty file
        raw = {}
    if isinstance(raw, Mapping):
        raw = _deep_copy(raw)  # overrides must not mutate the caller's dict (or DEMO_RECIPE)
        for text in overrides:
            _apply_override(raw, text, ctx)
    return _validate(raw, ctx, default_name)


def _unknown_recipe_message(name: str) -> str:
    names = available_recipes()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return f"unknown recipe {name!r}{hint}; available: {', '.join(names)}"


def _repo_root(recipe: Recipe) -> Path:
    if recipe.source.startswith("<"):
        return _package_recipes_dir().parent
    folder = Path(recipe.source).resolve().parent
    return folder.parent if folder.name == "recipes" else folder


def _deep_copy(d: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in d.items()}
