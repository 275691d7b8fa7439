"""Recipes: every training setting in one YAML file, loaded into plain dataclasses.

A recipe is `recipes/<name>.yaml`. `load_recipe("pets37", ["optimizer.lr=0.01"])` finds the file,
applies `--set` style overrides and validates every key, so a typo or an impossible value stops
the run before any weights are downloaded, with one line naming the file (or override), the
dotted key, the value and what is allowed.

The schema is the dataclasses below: each key is declared once, with its type, its bounds or
choices, its default (the value it takes when a recipe leaves it out) and what it means. The
checks and the "what is allowed" of error messages are read off those declarations, so adding a
key is one line.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import operator
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Mapping, NamedTuple, Optional, Sequence
from typing import get_args, get_origin

import yaml

from .errors import FinetuneError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Attention = Literal["auto", "fused", "explicit"]
OptimizerName = Literal["sgd", "adamw"]
ScheduleName = Literal["step", "cosine", "none"]
Dataset = Literal["imagefolder", "oxford_pets", "cifar10", "cifar100", "flowers102", "digits", "csv", "hf", "webdataset"]
Task = Literal["classification", "multilabel"]
Augment = Literal["none", "flip", "affine", "crop_flip", "randaugment"]
TrackerName = Literal["tensorboard", "mlflow", "wandb"]

PRECISIONS = get_args(Precision)
ATTENTIONS = get_args(Attention)
OPTIMIZERS = get_args(OptimizerName)
SCHEDULES = get_args(ScheduleName)
DATASETS = get_args(Dataset)
AUGMENTS = get_args(Augment)
TRACKERS = get_args(TrackerName)
TASKS = get_args(Task)
TORCHVISION_DATASETS = ("oxford_pets", "cifar10", "cifar100", "flowers102")
ROOT_REQUIRED = {  # data.dataset -> what data.root must then be
    "imagefolder": "a folder of class folders",
    "csv": "a .csv, .tsv or .jsonl manifest",
    "hf": "a Hugging Face hub id, a save_to_disk folder or parquet files",
    "webdataset": "a folder or URL of tar shards with _info.json",
}
DEFAULT_DOWNLOAD_ROOT = "data/"

_MODEL_REFS = (
    "a model ref such as B_16, ppv:B_16_imagenet1k, timm:NAME, hf:ORG/NAME, npz:PATH, "
    "a checkpoint path or scratch:patch_size=..."
)


_BOUNDS = {"gt": (operator.gt, ">"), "ge": (operator.ge, ">="), "lt": (operator.lt, "<"),
           "le": (operator.le, "<=")}


def bounded(default: Any, **bounds: float) -> Any:
    """A key's default and its bounds (gt, ge, lt, le; lower first), e.g. `bounded(0.01, gt=0)`."""
    unknown = set(bounds) - set(_BOUNDS)
    if unknown:
        raise TypeError(f"bounded() takes gt, ge, lt, le, not {', '.join(sorted(unknown))}")
    return field(default=default, metadata={"bounds": bounds})


# ----------------------------------------------------------------------------------------- schema
# A key is one line: `name: type = default`, or `= bounded(default, ge=..., lt=...)`; the type is
# bool, int, float, str, a Literal of choices, Optional[...] of those (null allowed), List[a Literal]
# (a list of choices; also written `a,b` or `none`), or a section (a dataclass here,
# `field(default_factory=...)` in its parent). Dotted keys name nested ones.
@dataclass
class OptimizerConfig:
    name: OptimizerName = "sgd"
    lr: float = bounded(0.01, gt=0)  # peak learning rate
    momentum: float = bounded(0.9, ge=0, lt=1)  # SGD momentum (adamw ignores it)
    weight_decay: float = bounded(0.0, ge=0)
    layer_decay: Optional[float] = bounded(None, gt=0, le=1)  # layer-wise lr decay (BEiT: 0.65-0.85)


@dataclass
class ScheduleConfig:
    name: ScheduleName = "cosine"  # stepped per epoch; none = constant lr
    step_size: int = bounded(5, ge=1)  # step: multiply the lr by gamma every step_size epochs
    gamma: float = bounded(0.7, gt=0, le=1)  # step: the factor
    warmup_epochs: int = bounded(0, ge=0)  # linear warmup from ~0 to lr; must be < epochs


@dataclass
class DataConfig:
    dataset: Dataset = "imagefolder"
    # imagefolder: the folder of class folders; csv: a .csv/.tsv/.jsonl manifest; hf: a hub id, a
    # save_to_disk folder or parquet files; webdataset: a folder or URL of tar shards (all required);
    # torchvision sets: the download dir
    root: Optional[str] = None  # null = DEFAULT_DOWNLOAD_ROOT for those
    image_key: Optional[str] = None  # csv/hf/webdataset: the image column; null = the source's default
    label_key: Optional[str] = None  # csv/hf: the label column; null = label (hf: also labels)
    split_key: Optional[str] = None  # csv: the split column; null = `split` when present
    label_separator: str = field(default=" ", metadata={"allowed": "a non-empty string (a space is fine)", "blank_ok": True})  # multilabel csv
    class_names: Optional[List[str]] = None  # csv/hf/webdataset: the classes and their order; null = from the data
    val_split: float = bounded(0.1, gt=0, lt=1)  # train fraction held out if there is no val split
    test_split: float = bounded(0.0, ge=0, lt=1)  # fraction held out as test, likewise
    balanced: bool = False  # class-balanced sampling of the training set
    workers: int = bounded(2, ge=0)  # DataLoader worker processes
    augment: Augment = "flip"  # affine = shift/rotate, no mirror (for digits)
    random_erasing: float = bounded(0.0, ge=0, le=1)  # probability of timm's RandomErasing per image


@dataclass
class ModelEmaConfig:
    decay: float = bounded(0.0, ge=0, lt=1)  # EMA of the weights per optimizer step; 0 = off
    warmup: bool = False  # timm's decay warmup (1 - (1 + step) ** -2/3, capped at decay)


@dataclass
class MixupConfig:  # timm.data.Mixup; on when either alpha > 0
    mixup_alpha: float = bounded(0.0, ge=0)
    cutmix_alpha: float = bounded(0.0, ge=0)
    prob: float = bounded(1.0, ge=0, le=1)  # probability of mixing a batch
    switch_prob: float = bounded(0.5, ge=0, le=1)  # of cutmix instead of mixup, when both are on
    off_epoch: Optional[int] = bounded(None, ge=1)  # from this epoch on, no mixing; null = never off


@dataclass
class LoraConfig:  # peft LoRA adapters; on when rank > 0; the head trains in full
    rank: int = bounded(0, ge=0)
    alpha: float = bounded(16.0, gt=0)
    dropout: float = bounded(0.0, ge=0, lt=1)
    targets: str = "qkv,fc1,fc2"  # comma-separated names of the linear layers to adapt


@dataclass
class Recipe:
    name: str = ""  # defaults to the recipe file's stem
    model: str = field(default="", metadata={"allowed": _MODEL_REFS})  # required
    img_size: Optional[int] = bounded(None, ge=1)  # training resolution; null = the weights' own
    epochs: int = bounded(10, ge=1)
    batch_size: int = bounded(32, ge=1)  # images per forward pass, over all DDP processes
    precision: Precision = "auto"  # autocast dtype; auto = bf16 where the device has it, else fp32
    attention: Attention = "auto"  # auto = the faster kernel for this model on this device, measured
    seed: int = bounded(0, ge=0)  # seeds torch, numpy, python and the data split
    keep_best: int = bounded(3, ge=1)  # how many best checkpoints to keep (and average)
    early_stop_patience: Optional[int] = bounded(None, ge=0)  # epochs w/o val gain; 0/null = off
    grad_accum: int = bounded(1, ge=1)  # batches per optimizer step
    clip_grad: Optional[float] = bounded(None, gt=0)  # max gradient norm; null = no clipping
    label_smoothing: float = bounded(0.0, ge=0, lt=1)
    grad_checkpointing: bool = False  # recompute activations in backward to save memory
    compile: bool = False  # torch.compile the model's forward (opt-in: measured no gain on a CPU, BENCHMARKS.md)
    drop_path: float = bounded(0.0, ge=0, lt=1)  # stochastic depth, rising linearly over the blocks
    dropout: float = bounded(0.0, ge=0, lt=1)  # embedding, projection, MLP, head; not attention probs
    task: Task = "classification"  # multilabel: several labels per image, sigmoid + BCE, ranked by val mAP
    calibrate: bool = False  # fit a temperature on val at the end of train (finetune calibrate)
    freeze: str = "none"  # none | backbone (train the head only) | blocks:N (the first N frozen)
    max_steps_per_epoch: Optional[int] = bounded(None, ge=1)  # step cap per epoch (smoke tests)
    log_every: int = bounded(10, ge=1)  # optimizer steps between host syncs: NaN check, progress bar loss
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model_ema: ModelEmaConfig = field(default_factory=ModelEmaConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Experiment trackers fed per epoch (finetune/tracking.py): a list, or `tensorboard,mlflow`;
    # none or [] = no tracker (metrics.jsonl is written anyway)
    tracking: List[TrackerName] = field(default_factory=lambda: ["tensorboard"])
    # Where the recipe came from (a file path or "<dict>"): not a recipe key, never serialised
    # nor compared; `resolve_path` uses it to find the repo root.
    source: str = field(default="<dict>", compare=False, repr=False)


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


# ------------------------------------------------------------------- a key's declaration, read back
class _Key(NamedTuple):
    kind: Any  # bool, int, float, str, a Literal, or a section's dataclass
    nullable: bool  # Optional[...]: null is allowed
    bounds: Dict[str, float]
    allowed: Optional[str]  # its own "what is allowed", where the type does not say it
    blank_ok: bool = False  # a str key for which whitespace is a value (data.label_separator)


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string"}
_NUMBERS = {int: (int,), float: (int, float)}  # an integer is a fine float (cast); bool is neither


@functools.lru_cache(maxsize=None)
def _keys(schema: type) -> Dict[str, _Key]:
    """The keys `schema` declares, in declaration order; `source` is not a key."""
    hints = typing.get_type_hints(schema)
    return {f.name: _key(hints[f.name], f.metadata) for f in dataclasses.fields(schema)
            if f.name != "source"}


def _key(kind: Any, metadata: Mapping[str, Any]) -> _Key:
    nullable = get_origin(kind) is not Literal and type(None) in get_args(kind)
    if nullable:
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    return _Key(kind, nullable, metadata.get("bounds", {}), metadata.get("allowed"), metadata.get("blank_ok", False))


def _section_of(schema: type, name: str) -> Optional[type]:
    """The dataclass of `schema.name` when that key is a section (has sub-keys), else None."""
    kind = _keys(schema)[name].kind
    return kind if dataclasses.is_dataclass(kind) else None


def _choices_of_list(k: _Key) -> Optional[tuple]:
    """The choices of a List[Literal[...]] key, else None."""
    return get_args(get_args(k.kind)[0]) if get_origin(k.kind) is list and not _is_names(k) else None


def _is_names(k: _Key) -> bool:
    """A List[str] key: distinct non-empty names (e.g. data.class_names)."""
    return get_origin(k.kind) is list and get_args(k.kind)[0] is str


def _as_list(value: Any) -> Any:
    """A list key's value as a list: `a,b` and `none` are lists too; anything else is left as is."""
    if isinstance(value, str):
        names = [part.strip() for part in value.split(",") if part.strip()]
        return [] if names == ["none"] else names
    return value


def _allowed(k: _Key) -> str:
    """Completes "VALUE is not ...", e.g. "a number > 0 and <= 1 or null"."""
    if k.allowed:
        text = k.allowed
    elif _choices_of_list(k) is not None:
        choices = _choices_of_list(k)
        text = f"a list of {', '.join(choices)} (e.g. {choices[0]},{choices[1]}) or none"
    elif _is_names(k):
        text = "a list of distinct names, e.g. [ant, bee] or ant,bee"
    elif get_origin(k.kind) is Literal:
        text = f"one of {', '.join(get_args(k.kind))}"
    elif dataclasses.is_dataclass(k.kind):
        text = f"a mapping of {', '.join(_keys(k.kind))}"
    else:
        bounds = " and ".join(f"{_BOUNDS[name][1]} {bound}" for name, bound in k.bounds.items())
        text = f"{_KINDS[k.kind]} {bounds}".strip()
    return f"{text} or null" if k.nullable else text


def _accepts(k: _Key, value: Any) -> bool:
    if value is None:
        return k.nullable
    if _choices_of_list(k) is not None:
        return isinstance(value, list) and all(isinstance(v, str) and v in _choices_of_list(k) for v in value)
    if _is_names(k):
        return (isinstance(value, list) and len(value) > 0 and len(set(map(str, value))) == len(value)
                and all(isinstance(v, (str, int)) and not isinstance(v, bool) and str(v).strip() for v in value))
    if get_origin(k.kind) is Literal:
        return isinstance(value, str) and value in get_args(k.kind)
    if k.kind is str:
        return isinstance(value, str) and (value.strip() != "" or (k.blank_ok and value != ""))
    if k.kind is bool or isinstance(value, bool):  # true is not 1, nor 1 true
        return k.kind is bool and isinstance(value, bool)
    if not isinstance(value, _NUMBERS.get(k.kind, ())) or not math.isfinite(value):
        return False
    return all(_BOUNDS[name][0](value, bound) for name, bound in k.bounds.items())


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


def _unknown_key(where: str, dotted: str, known: Sequence[str]) -> FinetuneError:
    prefix, _, key = dotted.rpartition(".")
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        suggestion = f"{prefix}.{close[0]}" if prefix else close[0]
        hint = f"did you mean {suggestion!r}?"
    else:
        hint = f"allowed: {', '.join(known)}"
    return FinetuneError(f"{where}: unknown key {dotted!r} ({hint})")


def _build(schema: type, raw: Any, prefix: str, ctx: _Context) -> Any:
    keys = _keys(schema)
    for name in raw:
        if name not in keys:
            dotted = f"{prefix}{name}"
            raise _unknown_key(ctx.where(dotted), dotted, list(keys))
    checked = {n: _checked(k, raw[n], f"{prefix}{n}", ctx) for n, k in keys.items() if n in raw}
    return schema(**checked)


def _checked(k: _Key, value: Any, dotted: str, ctx: _Context) -> Any:
    if dataclasses.is_dataclass(k.kind) and (value is None or isinstance(value, dict)):
        return _build(k.kind, value or {}, f"{dotted}.", ctx)  # null: every sub-key commented out
    if _choices_of_list(k) is not None:
        listed = _as_list(value)
        if not _accepts(k, listed):
            raise ctx.fail(dotted, f"{_show(value)} is not {_allowed(k)}")
        return list(dict.fromkeys(listed))  # each once, in the order given
    if _is_names(k) and value is not None:
        listed = _as_list(value) if isinstance(value, str) else value
        if not _accepts(k, listed):
            raise ctx.fail(dotted, f"{_show(value)} is not {_allowed(k)}")
        return [str(name) for name in listed]
    if not _accepts(k, value):
        raise ctx.fail(dotted, f"{_show(value)} is not {_allowed(k)}")
    return float(value) if k.kind is float and value is not None else value


def _check_consistency(recipe: Recipe, ctx: _Context) -> None:
    """Rules that span keys; an error names the key an override touched, if any."""
    if not recipe.model:
        raise ctx.fail("model", f"is required: {_MODEL_REFS}")
    _check_warmup(recipe, ctx)
    _check_splits(recipe.data, ctx)
    if recipe.data.root is None and recipe.data.dataset in ROOT_REQUIRED:
        raise ctx.fail("data.root", f"is required when data.dataset is {recipe.data.dataset} "
                                    f"({ROOT_REQUIRED[recipe.data.dataset]})")
    if not re.fullmatch(r"none|backbone|blocks:\d+", recipe.freeze):
        raise ctx.fail("freeze", f"{_show(recipe.freeze)} is not none, backbone or blocks:N (N an integer)")
    if recipe.data.balanced and recipe.task == "multilabel":
        raise ctx.fail("data.balanced", "class-balanced sampling draws 1/(size of its class) per image, which an "
                                        "image of several classes does not have; set data.balanced: false for "
                                        "task: multilabel")
    if recipe.freeze != "none" and recipe.lora.rank:
        raise ctx.fail("freeze", "and lora.rank > 0 both choose what trains; LoRA already freezes the backbone "
                       "but its adapters: set one of them")


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


def _checked_key(parts: List[str], label: str) -> Optional[type]:
    """Refuse an unknown dotted key; return the section's model when the key names a section."""
    schema: Optional[type] = Recipe
    for depth, part in enumerate(parts):
        dotted = ".".join(parts[: depth + 1])
        if schema is None:
            parent = ".".join(parts[:depth])
            raise FinetuneError(f"{label}: unknown key {dotted!r} ({parent} has no sub-keys)")
        if part not in _keys(schema):
            raise _unknown_key(label, dotted, list(_keys(schema)))
        schema = _section_of(schema, part)
    return schema


def _set(raw: Dict[str, Any], key: str, value: Any, label: str, ctx: _Context) -> None:
    """Set dotted `key` in the raw nested dict; a mapping given for a section merges into it."""
    section = _checked_key(key.split("."), label)
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if section is not None:
        if not isinstance(value, dict):
            example = f"{key}.{next(iter(_keys(section)))}=..."
            raise FinetuneError(
                f"{label}: {key} is a section; set one of its keys, e.g. --set {example}"
            )
        for sub, sub_value in value.items():
            _set(raw, f"{key}.{sub}", sub_value, label, ctx)
        return
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value
    ctx.origins[key] = label


def _apply_override(raw: Dict[str, Any], text: str, ctx: _Context) -> None:
    key, value = _parse_override(text)
    _set(raw, key, value, f"--set {text}", ctx)


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
    del d["source"]
    return d


def with_changes(recipe: Recipe, **changes: Any) -> Recipe:
    """A validated copy of `recipe` with dotted keys changed; `recipe` itself is untouched.

    `with_changes(r, **{"model": "B_16", "data.root": "/abs"})`. A mapping (or a config object)
    given for a section merges into it. Unlike `dataclasses.replace`, every value is
    checked and the cross-key rules are applied, with errors naming the change.
    """
    ctx = _Context(recipe.source)
    raw = recipe_to_dict(recipe)
    for key, value in changes.items():
        _set(raw, key, value, f"with_changes({key}={_show(value)})", ctx)
    return _validate(raw, ctx, recipe.name)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> Path:
    """Write the fully resolved recipe as YAML (e.g. `run_dir/recipe.yaml`); loads back identical."""
    from .checkpoints import atomic_write  # a kill mid-write must not leave half a recipe behind
    header = f"# Resolved recipe (every key explicit), from {recipe.source}\n"
    body = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(header + body, encoding="utf-8"))


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
    current directory (where a download dir such as `data/` would be created). A URL (webdataset
    shards over http(s)) is not a path and is kept as it is."""
    if "://" in str(value):
        return str(value)
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
