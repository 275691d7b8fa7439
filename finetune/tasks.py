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
  val's choice rather than tuning on what they report. `finetune calibrate` adds a temperature on
  the sigmoid, sigmoid(z / T), and per-class thresholds (`thresholds`, see `per_class_thresholds`)
  chosen on the calibrated probabilities; F1 and predict then use those.

Calibration (`temperature`, `thresholds`) is read here, where logits become probabilities, so every
scorer applies it alike; `finetune.calibration` fits it.

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
TEMPERATURE_KEY = "temperature"   # checkpoint metadata (and model.finetune_info): the fitted T
THRESHOLDS_KEY = "thresholds"     # multi-label: one threshold per class, fitted with the temperature


def temperature_of(model_or_info: Any) -> float:
    """The temperature of a model (its `finetune_info`) or of checkpoint metadata; 1.0 when none."""
    value = info_of(model_or_info).get(TEMPERATURE_KEY)
    return 1.0 if value is None else float(value)


def info_of(model_or_info: Any) -> Dict[str, Any]:
    if isinstance(model_or_info, dict):
        return model_or_info
    return getattr(getattr(model_or_info, "module", model_or_info), "finetune_info", None) or {}


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T; T = 1 returns `logits` itself, so nothing changes, not even a rounding."""
    return logits if temperature == 1 else logits / temperature


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

    def probabilities(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        return self.normalise(scaled(logits.float(), temperature))

    def normalise(self, logits: torch.Tensor) -> torch.Tensor:
        """Probabilities of (already scaled) logits, in their own dtype."""
        return logits.softmax(-1)

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

    def normalise(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid()

    def blank_targets(self, count: int, num_classes: int, device) -> torch.Tensor:
        return torch.zeros(count, num_classes, device=device)


TASKS = {"classification": Classification(), "multilabel": Multilabel()}


def get(name: Optional[str]) -> Classification:
    """The task called `name` (None: classification, as every checkpoint before tasks existed)."""
    return TASKS[name or "classification"]


def of_model(model) -> Classification:
    return get(info_of(model).get("task"))


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

    def report(self, threshold: Optional[float] = None, **_calibration) -> Dict[str, Any]:
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

    def report(self, threshold: Optional[float] = None, thresholds: Optional[Sequence[float]] = None,
               temperature: float = 1.0) -> Dict[str, Any]:
        logits = _cat(sum(distributed.gather_object(self.logits), []), self.num_classes)
        targets = _cat(sum(distributed.gather_object(self.targets), []), self.num_classes)
        return multilabel_report(logits, targets, threshold, thresholds, temperature)


def _cat(parts: Sequence[torch.Tensor], num_classes: int) -> torch.Tensor:
    return torch.cat(list(parts)) if parts else torch.zeros(0, num_classes)


def multilabel_report(logits: torch.Tensor, targets: torch.Tensor, threshold: Optional[float] = None,
                      thresholds: Optional[Sequence[float]] = None, temperature: float = 1.0) -> Dict[str, Any]:
    """mAP, F1, per-class AP and label co-occurrence (true labels) of a whole split, and its loss
    (the training loss: BCE of the raw logits). F1 is at the per-class `thresholds` on
    sigmoid(logits / `temperature`) when given (a calibrated checkpoint), else at `threshold` on the
    plain sigmoid (None: chosen here, see the module docstring)."""
    n = len(targets)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum").item() / max(n * logits.shape[1], 1)
    # The per-class thresholds were chosen on calibrated probabilities, the single one on plain ones.
    probabilities = Multilabel().probabilities(logits, temperature if thresholds is not None else 1.0)
    return {"loss": loss, **multilabel_scores(probabilities, targets, threshold, thresholds),
            "cooccurrence": (truth_of(targets).T @ truth_of(targets)).tolist()}


def multilabel_scores(probabilities: torch.Tensor, targets: torch.Tensor, threshold: Optional[float] = None,
                      thresholds: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """mAP, per-class AP and F1 of given probabilities (F1 as in `multilabel_report`)."""
    probabilities, truth = probabilities.double().numpy(), truth_of(targets)
    per_class_ap = average_precisions(truth, probabilities)
    present = [ap for ap in per_class_ap if ap is not None]
    chosen = best_threshold(truth, probabilities) if threshold is None else float(threshold)
    cut = np.asarray(thresholds, dtype=np.float64) if thresholds is not None else chosen
    f1_micro, f1_macro = f1_scores(truth, probabilities >= cut)
    return {"mAP": float(np.mean(present)) if present else None, "f1_micro": f1_micro, "f1_macro": f1_macro,
            "threshold": chosen, "thresholds": list(thresholds) if thresholds is not None else None,
            "n": len(truth), "per_class_ap": per_class_ap, "positives": truth.sum(0).tolist()}


def truth_of(targets: torch.Tensor) -> np.ndarray:
    """Multi-hot targets (smoothed or not) as 0/1 integers."""
    return (targets.double().numpy() > 0.5).astype(np.int64)


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


def per_class_thresholds(truth: np.ndarray, probabilities: np.ndarray, fallback: float) -> List[float]:
    """Per class, the grid point (`THRESHOLDS`) with the best F1 of that class alone; ties go to the
    one nearest `fallback` (the checkpoint's single threshold), and a class without a positive in
    the split keeps `fallback` (its F1 is 0 at every threshold, so the split says nothing)."""
    grid = np.asarray(THRESHOLDS, dtype=np.float64)
    predicted = probabilities[None, :, :] >= grid[:, None, None]          # threshold, image, class
    positive = truth[None, :, :].astype(bool)
    tp = (predicted & positive).sum(1)
    fp = (predicted & ~positive).sum(1)
    fn = (~predicted & positive).sum(1)
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)                          # threshold, class
    chosen = []
    for c in range(truth.shape[1]):
        if not truth[:, c].any():
            chosen.append(float(fallback))
            continue
        best = max(zip(f1[:, c], -np.abs(grid - fallback), grid))
        chosen.append(float(best[2]))
    return chosen


def calibration_of(model_or_info: Any) -> Dict[str, Any]:
    """What `evaluate` passes to a task's scores from a checkpoint: its single threshold, per-class
    thresholds and temperature (None, None, 1.0 when it has none)."""
    info = info_of(model_or_info)
    return {"threshold": info.get("threshold"), "thresholds": info.get(THRESHOLDS_KEY),
            "temperature": temperature_of(info)}


def ranking_value(report: Dict[str, Any], metric: str) -> float:
    """The report's ranking metric as a number (a split without positives scores 0, never None)."""
    value = report.get(metric)
    return float(value) if value is not None else 0.0
