"""The logit ensemble of fine-tunes: the reference a soup is measured against.

    ensemble_on_split(["a.safetensors", "b.safetensors", "c.safetensors"], split="val")

Its prediction is the argmax of the mean of the members' logits (not of their probabilities),
the ensemble of Wortsman et al.'s model-soups paper (2022), which soups approach at the cost of one
model. The price: k forward passes per image at inference (k models in memory, or k times the
time); scoring it here costs k passes over the split, one member loaded at a time, keeping only
the split's logits (images x classes) between them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import tasks
from .checkpoints import read_meta
from .errors import FinetuneError
from .evaluation import (RecipeLike, autocast, eval_batch_size, load_for_scoring, recipe_for, scoring_precision,
                         split_loader)

PathLike = Union[str, Path]


@torch.inference_mode()
def member_logits(checkpoint: PathLike, recipe, split: str, device: Optional[str] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of one checkpoint over a split, in the split's order, on the CPU in float32."""
    model = load_for_scoring(checkpoint, device)
    target = next(model.parameters()).device
    loader = split_loader(recipe, model, split)
    precision = scoring_precision(recipe, model, eval_batch_size(recipe))
    logits, labels = [], []
    with autocast(target, precision):
        for images, batch_labels in loader:
            if batch_labels.numel() == 0:
                continue
            logits.append(model(images.to(target)).float().cpu())
            labels.append(batch_labels)
    if not labels:
        raise FinetuneError(f"{checkpoint}: the {split} split has no readable image to score the ensemble on")
    return torch.cat(logits), torch.cat(labels)


def ensemble_on_split(checkpoints: Sequence[PathLike], recipe: RecipeLike = None, split: str = "val",
                      device: Optional[str] = None) -> Dict[str, Any]:
    """Top-1 and loss of the mean of the checkpoints' logits on `split` of the first one's recipe
    (or `recipe`); k forward passes over the split, one model in memory at a time."""
    checkpoints = [Path(c) for c in checkpoints]
    if len(checkpoints) < 2:
        raise FinetuneError(f"ensemble: {len(checkpoints)} checkpoint given; an ensemble needs at least two")
    resolved = recipe_for(checkpoints[0], recipe)
    total: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    for checkpoint in checkpoints:
        logits, member_labels = member_logits(checkpoint, resolved, split, device)
        if labels is None:
            total, labels = logits, member_labels
            continue
        if not torch.equal(member_labels, labels):
            raise FinetuneError(f"{checkpoint}: its {split} split differs from {checkpoints[0]}'s (other images or "
                                "labels); ensemble members must be scored on the same data")
        total = total + logits
    mean = total / len(checkpoints)
    meta = read_meta(checkpoints[0])
    if tasks.of_meta(meta).name == "multilabel":  # mAP/F1 of the mean logits, at the first member's threshold
        return {**tasks.multilabel_report(mean.float(), labels.float(), meta.get("threshold")),
                "members": len(checkpoints), "forward_passes": len(checkpoints), "split": split}
    top5 = (float((mean.topk(5, dim=1).indices == labels[:, None]).any(1).double().mean())
            if mean.shape[1] >= 5 else None)
    return {"top1": float((mean.argmax(1) == labels).double().mean()), "top5": top5,
            "loss": float(F.cross_entropy(mean, labels)), "n": int(labels.numel()),
            "members": len(checkpoints), "forward_passes": len(checkpoints), "split": split}
