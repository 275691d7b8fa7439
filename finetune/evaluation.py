"""Evaluating and using a checkpoint: `finetune eval` and `finetune predict`."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import data as data_lib
from .checkpoints import read_meta
from .compare import store_result
from .engine import evaluate, split_loader
from .errors import FinetuneError
from .loading import data_config_of, load_model
from .recipes import Recipe, load_recipe, recipe_from_dict
from .soup import best_checkpoints


def recipe_for(checkpoint: str, recipe: Optional[str] = None, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe named by `recipe`, else the one stored in the checkpoint, with overrides."""
    if recipe:
        return load_recipe(recipe, overrides)
    stored = read_meta(checkpoint).get("recipe")
    if not stored:
        raise FinetuneError(f"{checkpoint}: no recipe stored in the checkpoint; pass --recipe NAME_OR_PATH "
                            "to say which data to evaluate on")
    return recipe_from_dict(stored, source=f"<recipe stored in {checkpoint}>", overrides=overrides)


def evaluate_on_split(checkpoint: str, recipe: Optional[str] = None, overrides: Sequence[str] = (),
                      split: str = "val", batch_size: Optional[int] = None) -> Dict[str, Any]:
    """Scores of `checkpoint` on a split; recorded in the run's results.json when it is in a run."""
    chosen = recipe_for(checkpoint, recipe, overrides)
    model = load_model(checkpoint)
    loader = split_loader(chosen, model, split, batch_size)
    report = evaluate(model, loader, precision="fp32")
    report.update(checkpoint=str(checkpoint), split=split, class_names=model.finetune_info["class_names"])
    if (Path(checkpoint).parent / "recipe.yaml").is_file():  # a run directory: keep the score with it
        store_result(Path(checkpoint), split, report, as_run=_is_runs_best(Path(checkpoint)))
    return report


def _is_runs_best(checkpoint: Path) -> bool:
    try:
        return best_checkpoints(checkpoint.parent)[0].name == checkpoint.name
    except FinetuneError:  # no (readable) best.json: not a finished run's best
        return False


def format_report(report: Dict[str, Any]) -> str:
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


@torch.no_grad()
def predict(checkpoint: str, images: Sequence[str], top_k: int = 5) -> List[Dict[str, Any]]:
    """For each image path: its top-k classes with probabilities."""
    model = load_model(checkpoint).eval()
    config = data_config_of(model)
    transform = data_lib.build_transforms(config, config["input_size"][-1], "none", train=False)
    names = model.finetune_info["class_names"] or [str(i) for i in range(model.num_classes)]
    results = []
    for path in images:
        probabilities = model(transform(data_lib.load_image(path))[None]).softmax(-1)[0]
        values, indices = probabilities.topk(min(top_k, len(names)))
        results.append({"image": str(path), "top": [{"class": names[i], "probability": round(v, 6)}
                                                    for v, i in zip(values.tolist(), indices.tolist())]})
    return results
