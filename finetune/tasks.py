"""What a fine-tune learns to predict: the loss, the metrics, the metric that ranks checkpoints,
and how logits become predictions. The engine, evaluation, soups, compare, viz and predict ask the
task instead of assuming argmax top-1.

- `classification` (the default): one class per image; softmax cross-entropy (label smoothing,
  timm's soft targets under Mixup/CutMix); top-1, top-5, per-class accuracy, confusion; ranked by
  val top-1.
- `multilabel`: any number of classes per image (a float multi-hot target); binary cross-entropy
  on the logits, timm's `BinaryCrossEntropy` with its label smoothing of dense targets (each
  target moved towards 0.5) and timm's multi-label Mixup/CutMix targets; metrics: mAP (the macro
  mean over the classes with positives of scikit-learn's `average_precision_score`), micro and
  macro F1 at a threshold on the sigmoid, per-class AP, label co-occurrence; ranked by val mAP.
  The threshold is chosen on val (the one of 0.05, 0.10, ..., 0.95 with the best micro F1; ties
  go to the one nearest 0.5) and stored in the checkpoint (`threshold`), so test and predict use
  val's choice rather than tuning on what they report.

A task's name is kept in the checkpoint's metadata (`task`), so scoring a checkpoint needs no recipe.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed

TASK_NAMES = ("classification", "multilabel")
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


class Classification:
    name = "classification"
    metric = "top1"          # the report key that ranks checkpoints (higher is better)
    metric_label = "top-1"

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        if targets.ndim == 2:  # Mixup/CutMix soft targets (label smoothing folded in by timm)
            from timm.loss import SoftTargetCrossEntropy
            return SoftTargetCrossEntropy()(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)

    def mixup(self, recipe, num_classes: int):
        """timm's Mixup/CutMix for this task, or None when the recipe has it off."""
        return _timm_mixup(recipe, num_classes, multi_label=False)

    def scores(self, num_classes: int, device: torch.device) -> "ClassificationScores":
        return ClassificationScores(num_classes, device)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(-1)

    def blank_targets(self, count: int, num_classes: int, device) -> torch.Tensor:
        return torch.zeros(count, dtype=torch.long, device=device)


class Multilabel(Classification):
    name = "multilabel"
    metric = "mAP"
    metric_label = "mAP"

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        from timm.loss import BinaryCrossEntropy
        # Mixed targets arrive smoothed by timm's Mixup; plain ones are smoothed here, as timm does it.
        return BinaryCrossEntropy(smoothing=label_smoothing, smooth_dense=True)(logits, targets.to(logits.dtype))

    def mixup(self, recipe, num_classes: int):
        return _timm_mixup(recipe, num_classes, multi_label=True)

    def scores(self, num_classes: int, device: torch.device) -> "MultilabelScores":
        return MultilabelScores(num_classes)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid()

    def blank_targets(self, count: int, num_classes: int, device) -> torch.Tensor:
        return torch.zeros(count, num_classes, device=device)


TASKS = {"classification": Classification(), "multilabel": Multilabel()}


def get(name: Optional[str]) -> Classification:
    """The task called `name` (None: classification, as every checkpoint before tasks existed)."""
    return TASKS[name or "classification"]


def of_model(model) -> Classification:
    info = getattr(getattr(model, "module", model), "finetune_info", None) or {}
    return get(info.get("task"))


def of_meta(meta: Dict[str, Any]) -> Classification:
    return get((meta or {}).get("task"))


def _timm_mixup(recipe, num_classes: int, multi_label: bool):
    m = recipe.mixup
    if not (m.mixup_alpha or m.cutmix_alpha):
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob, switch_prob=m.switch_prob,
                 mode="batch", label_smoothing=recipe.label_smoothing, num_classes=num_classes,
                 multi_label=multi_label)


# ------------------------------------------------------------------------------------ the scores
class ClassificationScores:
    """Sums kept on the device while a split streams by; all-reduced under DDP at the end."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-5 correct, count

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        if self.num_classes >= 5:
            self.sums[1] += (logits.topk(5, dim=1).indices == labels[:, None]).any(1).sum()
        self.sums[2] += labels.numel()
        self.confusion.index_put_((labels, logits.argmax(1)), torch.ones_like(labels, dtype=torch.float64),
                                  accumulate=True)

    def report(self, threshold: Optional[float] = None) -> Dict[str, Any]:
        sums, confusion = distributed.all_reduce(self.sums), distributed.all_reduce(self.confusion)
        n = max(sums[2].item(), 1)
        per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
        return {"loss": sums[0].item() / n, "top1": confusion.diag().sum().item() / n,
                "top5": sums[1].item() / n if self.num_classes >= 5 else None, "n": int(sums[2].item()),
                "per_class": per_class, "confusion": confusion.long().tolist()}


class MultilabelScores:
    """Logits and targets of the whole split (AP is not a sum over batches), gathered under DDP."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.logits: List[torch.Tensor] = []
        self.targets: List[torch.Tensor] = []

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.logits.append(logits.detach().float().cpu())
        self.targets.append(targets.detach().float().cpu())

    def report(self, threshold: Optional[float] = None) -> Dict[str, Any]:
        logits = _cat(sum(distributed.gather_object(self.logits), []), self.num_classes)
        targets = _cat(sum(distributed.gather_object(self.targets), []), self.num_classes)
        return multilabel_report(logits, targets, threshold)


def _cat(parts: Sequence[torch.Tensor], num_classes: int) -> torch.Tensor:
    return torch.cat(list(parts)) if parts else torch.zeros(0, num_classes)


def multilabel_report(logits: torch.Tensor, targets: torch.Tensor, threshold: Optional[float] = None
                      ) -> Dict[str, Any]:
    """mAP, F1 at `threshold` (None: chosen here, see the module docstring), per-class AP and
    label co-occurrence (true labels) of a whole split."""
    probabilities = logits.sigmoid().numpy()
    truth = (targets.numpy() > 0.5).astype(np.int64)
    n = len(truth)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum").item() / max(n * logits.shape[1], 1)
    per_class_ap = average_precisions(truth, probabilities)
    present = [ap for ap in per_class_ap if ap is not None]
    chosen = best_threshold(truth, probabilities) if threshold is None else float(threshold)
    f1_micro, f1_macro = f1_scores(truth, probabilities >= chosen)
    return {"loss": loss, "mAP": float(np.mean(present)) if present else None, "f1_micro": f1_micro,
            "f1_macro": f1_macro, "threshold": chosen, "n": n, "per_class_ap": per_class_ap,
            "positives": truth.sum(0).tolist(), "cooccurrence": (truth.T @ truth).tolist()}


def average_precisions(truth: np.ndarray, probabilities: np.ndarray) -> List[Optional[float]]:
    """Per class, scikit-learn's average precision; None for a class with no positive in the split."""
    from sklearn.metrics import average_precision_score
    return [float(average_precision_score(truth[:, c], probabilities[:, c])) if truth[:, c].any() else None
            for c in range(truth.shape[1])]


def f1_scores(truth: np.ndarray, predicted: np.ndarray):
    from sklearn.metrics import f1_score
    if len(truth) == 0:
        return None, None
    return (float(f1_score(truth, predicted, average="micro", zero_division=0)),
            float(f1_score(truth, predicted, average="macro", zero_division=0)))


def best_threshold(truth: np.ndarray, probabilities: np.ndarray) -> float:
    if len(truth) == 0:
        return 0.5
    ranked = [(f1_scores(truth, probabilities >= t)[0], -abs(t - 0.5), t) for t in THRESHOLDS]
    return max(ranked)[2]


def ranking_value(report: Dict[str, Any], metric: str) -> float:
    """The report's ranking metric as a number (a split without positives scores 0, never None)."""
    value = report.get(metric)
    return float(value) if value is not None else 0.0
