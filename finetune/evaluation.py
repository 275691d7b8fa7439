"""Scoring: "how good is this checkpoint (or state dict) on this split?", answered in one place.

    report = evaluate_on_split("runs/x/epoch-007.safetensors", split="test")   # finetune eval
    score = state_scorer(first_checkpoint, recipe, "val")                       # soup's judge

Everything that scores (the engine's final test, `eval`, `predict`, soup, `compare --eval`, viz)
goes through here: the recipe that belongs to a checkpoint (`recipe_for`), the loaders of a split
(`split_loader`), the device (`choose_device`: CUDA when present, else CPU) and `evaluate`, in
inference mode, under the autocast a run of the recipe uses on that device (`scoring_precision`)
and at twice the training batch (`eval_batch_size`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from . import data as data_lib
from . import rundir
from . import speed
from . import tasks
from .checkpoints import StateDict, read_meta
from .errors import FinetuneError
from .loading import data_config_of, load_model
from .recipes import Recipe, load_recipe, recipe_from_dict, resolve_path

PRECISION_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
RecipeLike = Union[Recipe, str, None]
ScoreFn = Callable[[StateDict], float]
# Scoring keeps no activations for a backward pass, so twice the training batch fits in the memory
# training needed (timm's train.py validates at the training batch; torchvision's reference too).
EVAL_BATCH_FACTOR = 2


# -------------------------------------------------------------------------------------- device
def choose_device(device: Optional[str] = None) -> torch.device:
    """`device` as given ("cpu", "cuda", "cuda:1"), else CUDA when present, else the CPU."""
    if device:
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise FinetuneError(f"--device: {device!r} is not a device; use cpu, cuda or cuda:N") from None
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise FinetuneError(f"--device: {device!r} asked for, but CUDA is not available here; use cpu")
        return chosen
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def scoring_precision(recipe: Optional[Recipe], model: torch.nn.Module, batch_size: int = 2) -> str:
    """The autocast to score `model` with on its device: the recipe's precision (a checkpoint's
    recipe holds what `auto` resolved to in training), or `auto` measured for inference there."""
    requested = recipe.precision if recipe is not None else "auto"
    return speed.choose_precision(requested, next(model.parameters()).device, model, batch_size, train=False)[0]


def eval_batch_size(recipe: Recipe) -> int:
    return EVAL_BATCH_FACTOR * recipe.batch_size


def autocast(device: torch.device, precision: str):
    dtype = PRECISION_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# -------------------------------------------------------------------------------------- recipes
def recipe_for(checkpoint: Union[str, Path], recipe: RecipeLike = None, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe whose data scores `checkpoint`: `recipe` (a Recipe, name or path) when given,
    else the one stored in the checkpoint, else the recipe.yaml of the run directory it sits in."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe:
        return load_recipe(str(recipe), overrides)
    stored = read_meta(checkpoint).get("recipe")
    if stored:
        return recipe_from_dict(stored, source=f"<recipe stored in {checkpoint}>", overrides=overrides)
    beside = Path(checkpoint).parent / rundir.RECIPE
    if beside.is_file():
        return load_recipe(str(beside), overrides)
    raise FinetuneError(f"{checkpoint}: no recipe stored in the checkpoint or beside it; pass --recipe "
                        "NAME_OR_PATH to say which data to score it on")


# ---------------------------------------------------------------------------------------- data
def build_splits(recipe: Recipe, img_size: int, data_config: Dict[str, Any], augment: Optional[str] = None):
    root = resolve_path(recipe, recipe.data.root) if recipe.data.root else None
    return data_lib.build_datasets(recipe.data.dataset, root, img_size=img_size, data_config=data_config,
                                   augment=augment or recipe.data.augment, val_split=recipe.data.val_split,
                                   test_split=recipe.data.test_split, seed=recipe.seed,
                                   random_erasing=recipe.data.random_erasing, options=source_options(recipe))


def source_options(recipe: Recipe) -> "data_lib.SourceOptions":
    data = recipe.data
    return data_lib.SourceOptions(
        image_key=data.image_key, label_key=data.label_key, split_key=data.split_key,
        label_separator=data.label_separator,
        class_names=tuple(data.class_names) if data.class_names else None,
        multilabel=recipe.task == "multilabel")


def split_loader(recipe: Recipe, model, split: str = "val", batch_size: Optional[int] = None):
    """An evaluation DataLoader over `split` ('train', 'val' or 'test') of the recipe's dataset,
    transformed with `model`'s own data config and resolution."""
    config = data_config_of(model)
    splits = build_splits(recipe, config["input_size"][-1], config, augment="none")
    dataset = getattr(splits, split, None) if split in ("train", "val", "test") else None
    if dataset is None:
        raise FinetuneError(f"split: {split!r} is not available for dataset {recipe.data.dataset}; "
                            f"use val{' or test' if splits.test is not None else ''}")
    class_names = getattr(model, "finetune_info", {}).get("class_names")
    if class_names and list(class_names) != list(splits.class_names):
        raise FinetuneError(f"the checkpoint's classes {class_names[:3]}... differ from the dataset's "
                            f"{splits.class_names[:3]}...: wrong --recipe or data root?")
    return data_lib.build_loader(dataset, batch_size=batch_size or eval_batch_size(recipe), train=False,
                                 workers=recipe.data.workers)


# ------------------------------------------------------------------------------------- scoring
@torch.inference_mode()
def evaluate(model, loader, *, device=None, precision: str = "fp32", threshold: Optional[float] = None
             ) -> Dict[str, Any]:
    """The scores of the model's task on the loader's split (`finetune.tasks`): for classification
    loss, top-1, top-5 (None below 5 classes), per-class accuracy and confusion matrix; for
    multi-label loss, mAP, F1 at `threshold` (default: the checkpoint's per-class thresholds on its
    calibrated sigmoid, else its single threshold, else one chosen on this split), per-class AP and
    co-occurrence.

    Under DDP each process evaluates its shard and the scores are combined, so every process
    returns the scores of the whole split.
    """
    model = getattr(model, "module", model)
    device = device or next(model.parameters()).device
    task = tasks.of_model(model)
    scores = task.scores(model.num_classes, device)
    was_training = model.training
    model.eval()
    with autocast(device, precision):
        for images, labels in loader:
            if len(labels) == 0:
                continue
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            scores.add(model(images).float(), labels)
    model.train(was_training)
    calibration = tasks.calibration_of(model)
    if threshold is not None:
        calibration.update(threshold=threshold, thresholds=None)
    return scores.report(**calibration)


def load_for_scoring(checkpoint: Union[str, Path], device: Optional[str] = None):
    """The checkpoint's model on the scoring device, in eval mode."""
    return load_model(str(checkpoint)).to(choose_device(device)).eval()


def evaluate_on_split(checkpoint: Union[str, Path], recipe: RecipeLike = None, overrides: Sequence[str] = (),
                      split: str = "val", batch_size: Optional[int] = None, device: Optional[str] = None,
                      store: bool = True) -> Dict[str, Any]:
    """Scores of `checkpoint` on a split; with `store`, kept in its run directory's results.json."""
    chosen = recipe_for(checkpoint, recipe, overrides)
    model = load_for_scoring(checkpoint, device)
    report = split_scorer(model, chosen, split, batch_size)()
    report.update(checkpoint=str(checkpoint), split=split, class_names=model.finetune_info["class_names"])
    checkpoint = Path(checkpoint)
    if store and rundir.is_run_dir(checkpoint.parent):
        rundir.store_result(checkpoint, split, report, as_run=rundir.is_runs_best(checkpoint))
    return report


def state_scorer(vessel: Union[str, Path], recipe: RecipeLike, split: str, device: Optional[str] = None) -> ScoreFn:
    """A function scoring state dicts (the task's ranking metric on `split`: top-1, or mAP), with the checkpoint `vessel`'s model
    and recipe: the soup's judge. The model and loader are built once."""
    resolved = recipe_for(vessel, recipe)
    model = load_for_scoring(vessel, device)
    run = split_scorer(model, resolved, split)

    metric = tasks.of_model(model).metric

    def score(state: StateDict) -> float:
        model.load_state_dict(state)
        return tasks.ranking_value(run(), metric)
    return score


def split_scorer(model, recipe: Recipe, split: str, batch_size: Optional[int] = None
                 ) -> Callable[[], Dict[str, Any]]:
    """`evaluate` of `model`'s current weights on `split`, with the loader built once and the autocast
    a run of `recipe` uses on the model's device."""
    loader = split_loader(recipe, model, split, batch_size)
    precision = scoring_precision(recipe, model, eval_batch_size(recipe))
    return lambda: evaluate(model, loader, precision=precision)


# ------------------------------------------------------------------------------------- reports
def format_report(report: Dict[str, Any]) -> str:
    if "mAP" in report:
        return _format_multilabel_report(report)
    names = report["class_names"] or [str(i) for i in range(len(report["per_class"]))]
    top5 = f"  top-5 {report['top5']:.4f}" if report["top5"] is not None else ""
    lines = [f"{report['checkpoint']} on {report['split']} ({report['n']} images)",
             f"top-1 {report['top1']:.4f}{top5}  loss {report['loss']:.4f}", "", "per-class accuracy:"]
    width = max(len(n) for n in names)
    lines += [f"  {name:{width}}  {acc:.4f}" for name, acc in zip(names, report["per_class"])]
    lines += ["", "confusion matrix (rows: true, columns: predicted):"]
    cell = max(4, max(len(str(v)) for row in report["confusion"] for v in row) + 1)
    short = [n[:cell - 1] for n in names]
    lines.append(" " * (width + 2) + "".join(f"{s:>{cell}}" for s in short))
    lines += [f"  {name:{width}}" + "".join(f"{v:>{cell}}" for v in row)
              for name, row in zip(names, report["confusion"])]
    return "\n".join(lines)


def _format_multilabel_report(report: Dict[str, Any]) -> str:
    names = report["class_names"] or [str(i) for i in range(len(report["per_class_ap"]))]
    lines = [f"{report['checkpoint']} on {report['split']} ({report['n']} images, multi-label)",
             f"mAP {fraction(report['mAP'])}  F1 micro {fraction(report['f1_micro'])}  macro "
             f"{fraction(report['f1_macro'])} at "
             + ("the per-class thresholds" if report.get("thresholds") else f"threshold {report['threshold']:.2f}")
             + f"  loss {report['loss']:.4f}",
             "", "per-class average precision (positives):"]
    width = max(len(n) for n in names)
    lines += [f"  {name:{width}}  {fraction(ap)}  ({count})"
              for name, ap, count in zip(names, report["per_class_ap"], report["positives"])]
    return "\n".join(lines)


def fraction(value: Optional[float]) -> str:
    """An accuracy as printed in every table and report: 4 decimals, '-' when unknown."""
    return "-" if value is None else f"{value:.4f}"


# ------------------------------------------------------------------------------------- predict
@torch.inference_mode()
def predict(checkpoint: Union[str, Path], images: Sequence[str], top_k: int = 5,
            device: Optional[str] = None, batch_size: int = 32,
            probabilities: Optional[Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = None
            ) -> List[Dict[str, Any]]:
    """For each image path: its top-k classes with probabilities (scored `batch_size` at a time,
    under the autocast of the checkpoint's recipe on this device), with the checkpoint's temperature
    (`finetune calibrate`) applied. A multi-label checkpoint gives every class whose sigmoid reaches
    its threshold (`labels`, most probable first; per class when calibrated) and, as `top`, the
    top-k sigmoids whatever the threshold. `probabilities(model, batch)` replaces the task's
    probabilities of model(batch): `finetune.calibration.predict` averages TTA views with it."""
    if top_k < 1:
        raise FinetuneError(f"--top-k: {top_k} is not a positive integer; use e.g. --top-k 5")
    model = load_for_scoring(checkpoint, device)
    target = next(model.parameters()).device
    config = data_config_of(model)
    transform = data_lib.build_transforms(config, config["input_size"][-1], "none", train=False)
    names = model.finetune_info["class_names"] or [str(i) for i in range(model.num_classes)]
    stored = read_meta(checkpoint).get("recipe") or {}
    precision = speed.choose_precision(stored.get("precision", "auto"), target, model, batch_size, train=False)[0]
    task = tasks.of_model(model)
    calibration = tasks.calibration_of(model)
    results = []
    for start in range(0, len(images), batch_size):
        paths = list(images[start:start + batch_size])
        batch = torch.stack([transform(data_lib.load_image(path)) for path in paths]).to(target)
        with autocast(target, precision):
            if probabilities is not None:
                scores = probabilities(model, batch).cpu()
            else:
                scores = task.probabilities(model(batch), calibration["temperature"]).cpu()
        for path, row in zip(paths, scores):
            results.append({"image": str(path), **predicted_classes(row, names, top_k, task, calibration)})
    return results


def predicted_classes(probabilities: torch.Tensor, names: List[str], top_k: int, task,
                      calibration: Dict[str, Any]) -> Dict[str, Any]:
    """One image's prediction: `top` (the top-k probabilities) and, multi-label, `labels` (every
    class at or above its threshold) with `threshold` and, when calibrated, `thresholds`."""
    values, indices = probabilities.topk(min(top_k, len(names)))
    found = {"top": [{"class": names[i], "probability": round(v, 6)} for v, i in zip(values.tolist(), indices.tolist())]}
    if task.name == "multilabel":
        threshold = calibration.get("threshold")
        threshold = 0.5 if threshold is None else threshold
        cuts = calibration.get("thresholds") or [threshold] * len(names)
        above = [(v, i) for i, v in enumerate(probabilities.tolist()) if v >= cuts[i]]
        found = {"labels": [{"class": names[i], "probability": round(v, 6)} for v, i in sorted(above, reverse=True)],
                 "threshold": threshold, **found}
        if calibration.get("thresholds"):
            found["thresholds"] = {name: cut for name, cut in zip(names, cuts)}
    return found
