"""Calibrated probabilities (temperature scaling) and test-time augmentation (TTA).

    calibrate_checkpoint("runs/x/epoch-004.safetensors", "runs/x/epoch-004.safetensors", force=True)
    report = evaluate_calibrated("runs/x/epoch-004.safetensors", tta="flip")   # ece, nll, brier, top1_tta
    results = predict("runs/x/epoch-004.safetensors", ["bee.jpg"], tta="flip")  # calibrated probabilities

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks"): one scalar T > 0
divides the logits, p = softmax(z / T) (multi-label: p = sigmoid(z / T) for every class). Every argmax, so top-1, top-5 and the confusion matrix, is
unchanged; only the confidences move. T is fitted on held-out logits (val) by minimising their NLL
and stored in the checkpoint's metadata as `temperature`, with a `calibration` record (split, images,
the scores before and after). `load_model` carries it as `model.finetune_info["temperature"]` while
the head and the resolution are the checkpoint's own, and `save_checkpoint` drops it (new weights need
a new fit). No temperature means T = 1, and T = 1 changes nothing, bit for bit.

The fit is a golden-section search for log T on [log 0.05, log 20] over the logits cached from one pass
of the split, in float64, `FIT_ITERATIONS` steps (the bracket ends below 1e-9 in log T). Not LBFGS, as
in Guo et al.'s code: the NLL is convex in 1/T, hence unimodal in log T, so a bracketing search finds
its global minimum on the interval with no step size, no gradient and nothing to diverge. LBFGS on T can
step to T <= 0, and where the model gets the whole split right the NLL has no minimum at all (it falls as
T -> 0); the search then stops at the bound and the record says `at_bound`. T = 1 is kept unless the fitted
T scores a strictly lower NLL, so the calibrated NLL on the fitting split is never above the uncalibrated.

Multi-label checkpoints (task `multilabel`) get the same temperature on the sigmoid, fitted on the
binary NLL of every (image, class) pair (convex in 1/T too, so the same search), and per-class
thresholds (`thresholds`, `tasks.per_class_thresholds`) chosen on val's calibrated probabilities;
F1 and predict's labels then use them (the checkpoint's single `threshold` stays, for T = 1). mAP is
unchanged: T moves no class's ranking.

Scores (`calibration_scores`, `probability_scores`), of the probabilities with the checkpoint's T:
    nll    mean over images of -log p[true class]
    ece    expected calibration error: 15 equal-width bins (0, 1/15], (1/15, 2/15], ..., (14/15, 1] of the
           top-1 confidence; sum over bins of (images in bin / images) * |accuracy - mean confidence in bin|
    brier  multi-class Brier score: mean over images of sum over classes of (p_c - [c is the true class])^2,
           in [0, 2] (scikit-learn's brier_score_loss with scale_by_half=False; half that for 2 classes is
           the binary Brier score)
Multi-label, the same over every (image, class) pair, each a binary prediction: nll is the mean binary
cross-entropy, ece bins each sigmoid and compares it with the share of those pairs whose class is
present, brier is the mean of (p - y)^2 (in [0, 1]).
`evaluate_calibrated` reports them with T applied and, beside them, at T = 1 (`*_uncalibrated`; for
multi-label also `f1_micro_uncalibrated`, `f1_macro_uncalibrated` at the single threshold).

TTA (`TTA_MODES`) views the eval tensor (resized, centre-cropped, normalised: any data source works);
every mode's first pass is the plain image, so the plain scores come from the same pass:
    flip    the image and its mirror image (2 passes)
    crops   the image and five zoomed crops, the four corners and the centre, each 7/8 of the side,
            resized back to the input size (bilinear), as a fixed-resolution ViT needs (6 passes)
The probabilities are averaged: the mean over passes of softmax(logits / T) (multi-label: of the
sigmoids). `evaluate_calibrated` reports them beside the plain scores as `top1_tta`, `top5_tta`
(multi-label: `mAP_tta`, `f1_micro_tta`, `f1_macro_tta`), `nll_tta`, `ece_tta`, `brier_tta`.

This module sits above `evaluation` (which knows nothing of it): the CLI's eval, predict, calibrate,
`compare --eval --tta`, soups, `calibrate: true` in a recipe and `viz reliability` come through here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import data as data_lib
from . import distributed, rundir, tasks
from .checkpoints import read_checkpoint, read_meta, refuse_to_overwrite, write_checkpoint
from .errors import FinetuneError
from .evaluation import (RecipeLike, autocast, eval_batch_size, evaluate, load_for_scoring,
                         recipe_for, scoring_precision, split_loader)
from .evaluation import predict as plain_predict
from .loading import load_model
from .recipes import Recipe
from .tasks import TEMPERATURE_KEY, THRESHOLDS_KEY, scaled, temperature_of  # noqa: F401 (part of this API)

RECORD_KEY = "calibration"        # checkpoint metadata: how and where T was fitted
ECE_BINS = 15
T_BOUNDS = (0.05, 20.0)
FIT_ITERATIONS = 60
CROP_FRACTION = 0.875             # crops: each crop's side, as a fraction of the input's
View = Callable[[torch.Tensor], torch.Tensor]
PathLike = Union[str, Path]


# ------------------------------------------------------------------------------------------- TTA
def _plain(images: torch.Tensor) -> torch.Tensor:
    return images


def _mirror(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)


def _zoomed_crop(where: str) -> View:
    """A view: the crop of CROP_FRACTION of each side at `where` (t/b/c, l/r/c), resized back up."""
    def view(images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        crop_h, crop_w = max(1, round(height * CROP_FRACTION)), max(1, round(width * CROP_FRACTION))
        top = {"t": 0, "c": (height - crop_h) // 2, "b": height - crop_h}[where[0]]
        left = {"l": 0, "c": (width - crop_w) // 2, "r": width - crop_w}[where[1]]
        crop = images[..., top:top + crop_h, left:left + crop_w]
        return F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
    view.__name__ = f"crop_{where}"
    return view


TTA_MODES: Dict[str, Tuple[View, ...]] = {
    "flip": (_plain, _mirror),
    "crops": (_plain, *(_zoomed_crop(where) for where in ("tl", "tr", "bl", "br", "cc"))),
}


def tta_views(mode: Optional[str]) -> Tuple[View, ...]:
    """The views of a TTA mode (None: the plain image alone); an unknown mode is a one-line error."""
    if mode is None:
        return (_plain,)
    if mode not in TTA_MODES:
        raise FinetuneError(f"--tta: unknown value {mode!r}; expected {' or '.join(TTA_MODES)} "
                            "(flip: the image and its mirror; crops: the image and five zoomed crops)")
    return TTA_MODES[mode]


# ----------------------------------------------------------------------------------- temperature
def tta_probabilities(model: torch.nn.Module, images: torch.Tensor, temperature: float = 1.0,
                      views: Sequence[View] = (_plain,)) -> torch.Tensor:
    """Mean over `views` of the task's probabilities (softmax, or sigmoid) of model(view(images)).float()
    / T, float32, under whatever autocast the caller runs; one plain view at T = 1 is
    softmax(model(images).float()), bit for bit."""
    task = tasks.of_model(model)
    total = None
    for view in views:
        probabilities = task.probabilities(model(view(images)), temperature)
        total = probabilities if total is None else total + probabilities
    return total if len(views) == 1 else total / len(views)


def calibrated_probabilities(model: torch.nn.Module, images: torch.Tensor, views: Sequence[View] = (_plain,)
                             ) -> torch.Tensor:
    """`tta_probabilities` with the model's own temperature (the hook `evaluation.predict` takes)."""
    return tta_probabilities(model, images, temperature_of(model), views)


# ---------------------------------------------------------------------------------------- scores
def is_multi_hot(labels: torch.Tensor) -> bool:
    """Multi-label targets are (images, classes) multi-hot; single-label ones are class indices."""
    return labels.ndim == 2


def _outcomes(probabilities: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """What is binned: single-label, each image's top-1 confidence and whether its top-1 is right;
    multi-label, each (image, class) sigmoid and whether the class is present."""
    if is_multi_hot(labels):
        return probabilities.double().flatten(), (labels.double() > 0.5).double().flatten()
    confidence, predicted = probabilities.double().max(1)
    return confidence, (predicted == labels).double()


def _binned(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per confidence bin (equal width, (lo, hi]): count, summed confidence, correct (present) count."""
    confidence, correct = _outcomes(probabilities, labels)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=confidence.device)
    index = torch.bucketize(confidence, edges[1:-1], right=False)  # edges[i-1] < x <= edges[i]
    zeros = torch.zeros(bins, dtype=torch.float64, device=confidence.device)
    return (zeros.index_add(0, index, torch.ones_like(confidence)), zeros.index_add(0, index, confidence),
            zeros.index_add(0, index, correct))


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE: sum over `bins` equal-width top-1 confidence bins of (n_bin / n) |accuracy - confidence|."""
    counts, confidence, correct = _binned(probabilities, labels, bins)
    return ((correct - confidence).abs().sum() / counts.sum().clamp(min=1)).item()


def brier_score(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over images of sum over classes of (p_c - onehot_c)^2 (multi-class Brier, in [0, 2]);
    multi-label, the mean over (image, class) pairs of (p - y)^2 (in [0, 1])."""
    if is_multi_hot(labels):
        return ((probabilities.double() - (labels.double() > 0.5).double()) ** 2).mean().item()
    onehot = F.one_hot(labels, probabilities.shape[1]).double()
    return ((probabilities.double() - onehot) ** 2).sum(1).mean().item()


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean -log softmax(logits / T)[true class], in float64; multi-label, the mean binary
    cross-entropy of sigmoid(logits / T) over (image, class) pairs."""
    if is_multi_hot(labels):
        return F.binary_cross_entropy_with_logits(scaled(logits.double(), temperature),
                                                  (labels.double() > 0.5).double()).item()
    return F.cross_entropy(scaled(logits.double(), temperature), labels).item()


def _task_of(labels: torch.Tensor) -> "tasks.Classification":
    return tasks.get("multilabel" if is_multi_hot(labels) else "classification")


def calibration_scores(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> Dict[str, float]:
    """nll, ece and brier of softmax(logits / T), or of its sigmoid (see the module docstring)."""
    probabilities = _task_of(labels).normalise(scaled(logits.double(), temperature))
    return {"nll": nll(logits, labels, temperature), "ece": expected_calibration_error(probabilities, labels),
            "brier": brier_score(probabilities, labels)}


def probability_scores(probabilities: torch.Tensor, labels: torch.Tensor,
                       calibration: Optional[Dict[str, Any]] = None) -> Dict[str, Optional[float]]:
    """top1, top5 (None below 5 classes), nll, ece and brier of given probabilities (e.g. TTA's);
    multi-label, mAP and F1 (at `calibration`'s thresholds, `tasks.calibration_of`) for top1, top5."""
    if is_multi_hot(labels):
        return _multilabel_probability_scores(probabilities, labels, calibration or {})
    probabilities = probabilities.double()
    true = probabilities.gather(1, labels[:, None]).squeeze(1)
    top5 = None
    if probabilities.shape[1] >= 5:
        top5 = (probabilities.topk(5, dim=1).indices == labels[:, None]).any(1).double().mean().item()
    return {"top1": (probabilities.argmax(1) == labels).double().mean().item(), "top5": top5,
            "nll": -true.clamp(min=torch.finfo(torch.float64).tiny).log().mean().item(),
            "ece": expected_calibration_error(probabilities, labels), "brier": brier_score(probabilities, labels)}


def _multilabel_probability_scores(probabilities: torch.Tensor, labels: torch.Tensor,
                                   calibration: Dict[str, Any]) -> Dict[str, Optional[float]]:
    scores = tasks.multilabel_scores(probabilities, labels, calibration.get("threshold"),
                                     calibration.get("thresholds"))
    p = probabilities.double().clamp(1e-12, 1 - 1e-12)  # averaged sigmoids; no logits to take the NLL of
    truth = (labels.double() > 0.5).double()
    binary_nll = -(truth * p.log() + (1 - truth) * (1 - p).log()).mean().item()
    return {"mAP": scores["mAP"], "f1_micro": scores["f1_micro"], "f1_macro": scores["f1_macro"],
            "nll": binary_nll, "ece": expected_calibration_error(probabilities, labels),
            "brier": brier_score(probabilities, labels)}


def reliability_bins(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> Dict[str, Any]:
    """What a reliability diagram draws: per bin its edges, image (or image x class) count, accuracy
    (share of present classes) and mean confidence (None for an empty bin), the ECE and what the
    confidence is of (`of`)."""
    counts, confidence, correct = _binned(probabilities, labels, bins)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64).tolist()
    filled = counts.clamp(min=1)
    multi = is_multi_hot(labels)
    return {"edges": edges, "counts": counts.long().tolist(),
            "of": "sigmoid of each (image, class)" if multi else "top-1 confidence",
            "accuracy_of": "share of classes present" if multi else "accuracy",
            "accuracy": [a if n else None for a, n in zip((correct / filled).tolist(), counts.tolist())],
            "confidence": [c if n else None for c, n in zip((confidence / filled).tolist(), counts.tolist())],
            "ece": expected_calibration_error(probabilities, labels, bins)}


# ------------------------------------------------------------------------------------------- fit
def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, bounds: Tuple[float, float] = T_BOUNDS,
                    iterations: int = FIT_ITERATIONS) -> float:
    """The T in `bounds` minimising nll(logits, labels, T): golden-section search on log T (see the
    module docstring for why), then the best of that, the two bounds and T = 1 (kept on ties)."""
    if labels.numel() == 0:
        raise FinetuneError("calibrate: the split has no images to fit a temperature on")
    logits = logits.double()

    def loss(log_t: float) -> float:
        return nll(logits, labels, math.exp(log_t))

    low, high = math.log(bounds[0]), math.log(bounds[1])
    shrink = (math.sqrt(5) - 1) / 2
    c, d = high - shrink * (high - low), low + shrink * (high - low)
    loss_c, loss_d = loss(c), loss(d)
    for _ in range(iterations):
        if loss_c < loss_d:  # the minimum lies in [low, d]
            high, d, loss_d = d, c, loss_c
            c = high - shrink * (high - low)
            loss_c = loss(c)
        else:                # in [c, high]
            low, c, loss_c = c, d, loss_d
            d = low + shrink * (high - low)
            loss_d = loss(d)
    candidates = [(loss(x), x) for x in ((low + high) / 2, math.log(bounds[0]), math.log(bounds[1]))]
    best_loss, best = min(candidates)
    return math.exp(best) if best_loss < loss(0.0) else 1.0


def fit(logits: torch.Tensor, labels: torch.Tensor, split: str, threshold: Optional[float] = None
        ) -> Dict[str, Any]:
    """The temperature of cached logits and the scores it changes: the `calibration` record; for
    multi-hot labels also per-class `thresholds` on the calibrated sigmoid and F1 before (at the
    single `threshold`, None: chosen on this split) and after."""
    temperature = fit_temperature(logits, labels)
    before, after = calibration_scores(logits, labels), calibration_scores(logits, labels, temperature)
    at_bound = any(abs(math.log(temperature) - math.log(bound)) < 1e-6 for bound in T_BOUNDS)
    record = {"temperature": temperature, "split": split, "n": int(len(labels)), "at_bound": at_bound,
              **{f"{k}_uncalibrated": v for k, v in before.items()}, **after}
    if is_multi_hot(labels):
        record.update(_fit_thresholds(logits, labels, temperature, threshold))
    return record


def _fit_thresholds(logits: torch.Tensor, labels: torch.Tensor, temperature: float, threshold: Optional[float]
                    ) -> Dict[str, Any]:
    plain = tasks.multilabel_scores(logits.double().sigmoid(), labels, threshold)
    calibrated = scaled(logits.double(), temperature).sigmoid()
    thresholds = tasks.per_class_thresholds(tasks.truth_of(labels), calibrated.numpy(), plain["threshold"])
    after = tasks.multilabel_scores(calibrated, labels, plain["threshold"], thresholds)
    return {"thresholds": thresholds, "threshold": plain["threshold"], "f1_micro": after["f1_micro"],
            "f1_macro": after["f1_macro"], "f1_micro_uncalibrated": plain["f1_micro"],
            "f1_macro_uncalibrated": plain["f1_macro"]}


# ---------------------------------------------------------------------------------------- logits
@dataclass
class SplitLogits:
    """One pass over a split: per batch the plain logits (float32, as `evaluate` computes them), the
    labels and, with TTA, the float64 mean over views of softmax(logits / T)."""
    logits: List[torch.Tensor]
    labels: List[torch.Tensor]
    averaged: Optional[List[torch.Tensor]] = None

    def all_logits(self) -> torch.Tensor:
        return torch.cat(self.logits) if self.logits else torch.zeros(0, 0)

    def all_labels(self) -> torch.Tensor:
        return torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.long)


@torch.inference_mode()
def split_logits(model: torch.nn.Module, loader, *, precision: str = "fp32", views: Sequence[View] = (_plain,),
                 temperature: float = 1.0) -> SplitLogits:
    """The logits of every batch `loader` yields, in eval mode, under `precision`'s autocast; with
    more views than the plain one, their averaged probabilities too (one process: no collectives)."""
    model = getattr(model, "module", model)
    device = next(model.parameters()).device
    task = tasks.of_model(model)
    was_training = model.training
    model.eval()
    result = SplitLogits([], [], [] if len(views) > 1 else None)
    try:
        for images, labels in loader:
            if labels.numel() == 0:
                continue
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(images).float()
            result.logits.append(logits)
            result.labels.append(labels)
            if result.averaged is not None:
                total = task.normalise(scaled(logits.double(), temperature))
                for view in views[1:]:
                    with autocast(device, precision):
                        other = model(view(images)).float()
                    total += task.normalise(scaled(other.double(), temperature))
                result.averaged.append(total / len(views))
    finally:
        model.train(was_training)
    return result


class _Replay(torch.nn.Module):
    """`evaluate`'s model over cached logits: the identity, so `evaluate` scores them with its own
    arithmetic, batch by batch, exactly as it scores the model that produced them (with its task,
    threshold and calibration, from the same `finetune_info`)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.num_classes = model.num_classes
        self.finetune_info = dict(tasks.info_of(model))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


# ------------------------------------------------------------------------------------------- eval
def evaluate_calibrated(checkpoint: PathLike, recipe: RecipeLike = None, overrides: Sequence[str] = (),
                        split: str = "val", batch_size: Optional[int] = None, device: Optional[str] = None,
                        store: bool = True, tta: Optional[str] = None) -> Dict[str, Any]:
    """`evaluation.evaluate_on_split`'s report (the same numbers, from the same single pass) plus
    `temperature` (the checkpoint's, 1 when none), `nll`, `ece`, `brier` with it applied and
    `*_uncalibrated` at T = 1; with `tta`, `tta`, `tta_passes` and `top1_tta`, `top5_tta` (multi-label:
    `mAP_tta`, `f1_micro_tta`, `f1_macro_tta`), `nll_tta`, `ece_tta`, `brier_tta` of the averaged
    probabilities."""
    views = tta_views(tta)
    chosen = recipe_for(checkpoint, recipe, overrides)
    model = load_for_scoring(checkpoint, device)
    loader = split_loader(chosen, model, split, batch_size)
    precision = scoring_precision(chosen, model, eval_batch_size(chosen))
    temperature = temperature_of(model)
    cached = split_logits(model, loader, precision=precision, views=views, temperature=temperature)
    report = evaluate(_Replay(model), list(zip(cached.logits, cached.labels)),
                      device=next(model.parameters()).device, precision=precision)
    report.update(calibration_report(cached, temperature, tta, len(views), tasks.calibration_of(model)))
    report.update(checkpoint=str(checkpoint), split=split, class_names=model.finetune_info["class_names"])
    checkpoint = Path(checkpoint)
    if store and rundir.is_run_dir(checkpoint.parent):
        rundir.store_result(checkpoint, split, report, as_run=rundir.is_runs_best(checkpoint))
    return report


def calibration_report(cached: SplitLogits, temperature: float, tta: Optional[str] = None, passes: int = 1,
                       calibration: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The keys `evaluate_calibrated` adds to the report (`calibration`: the checkpoint's
    `tasks.calibration_of`, for multi-label F1)."""
    logits, labels = cached.all_logits(), cached.all_labels()
    if len(labels) == 0:
        return {"temperature": temperature}
    calibrated = calibration_scores(logits, labels, temperature)
    raw = calibrated if temperature == 1 else calibration_scores(logits, labels)
    report: Dict[str, Any] = {"temperature": temperature, **calibrated,
                              **{f"{k}_uncalibrated": v for k, v in raw.items()}}
    if is_multi_hot(labels) and (calibration or {}).get("thresholds") is not None:
        plain = tasks.multilabel_scores(logits.double().sigmoid(), labels, calibration["threshold"])
        report.update(f1_micro_uncalibrated=plain["f1_micro"], f1_macro_uncalibrated=plain["f1_macro"])
    if cached.averaged is not None:
        scores = probability_scores(torch.cat(cached.averaged), labels, calibration)
        report.update(tta=tta, tta_passes=passes, **{f"{k}_tta": v for k, v in scores.items()})
    return report


def report_lines(report: Dict[str, Any]) -> List[str]:
    """The calibration and TTA lines printed under `evaluation.format_report`'s."""
    if "nll" not in report:
        return []
    t = report["temperature"]
    multi = "mAP" in report
    lines = ["", f"calibration (15-bin ECE, NLL, Brier{' of every image x class sigmoid' if multi else ''}) at "
                 f"temperature {t:.4g}" + (" (the checkpoint's)" if t != 1 else " (none fitted: finetune calibrate)"),
             f"  ECE {report['ece']:.4f}  NLL {report['nll']:.4f}  Brier {report['brier']:.4f}"]
    if t != 1:
        lines.append(f"  uncalibrated (T=1): ECE {report['ece_uncalibrated']:.4f}  NLL {report['nll_uncalibrated']:.4f}"
                     f"  Brier {report['brier_uncalibrated']:.4f}")
    if report.get("f1_micro_uncalibrated") is not None:
        lines.append(f"  F1 micro {report['f1_micro']:.4f} macro {report['f1_macro']:.4f} at the per-class thresholds "
                     f"({report['f1_micro_uncalibrated']:.4f} / {report['f1_macro_uncalibrated']:.4f} at the single "
                     f"threshold {report['threshold']:.2f}, T = 1)")
    if "mAP_tta" in report:
        lines += ["", f"TTA {report['tta']} ({report['tta_passes']} passes, sigmoids averaged): mAP "
                      f"{report['mAP_tta']:.4f} F1 micro {report['f1_micro_tta']:.4f} (plain mAP {report['mAP']:.4f})",
                  f"  ECE {report['ece_tta']:.4f}  NLL {report['nll_tta']:.4f}  Brier {report['brier_tta']:.4f}"]
    if "top1_tta" in report:
        top5 = f"  top-5 {report['top5_tta']:.4f}" if report["top5_tta"] is not None else ""
        lines += ["", f"TTA {report['tta']} ({report['tta_passes']} passes, probabilities averaged): "
                      f"top-1 {report['top1_tta']:.4f}{top5} (plain {report['top1']:.4f})",
                  f"  ECE {report['ece_tta']:.4f}  NLL {report['nll_tta']:.4f}  Brier {report['brier_tta']:.4f}"]
    return lines


# ---------------------------------------------------------------------------------------- predict
def predict(checkpoint: PathLike, images: Sequence[str], top_k: int = 5, device: Optional[str] = None,
            batch_size: int = 32, tta: Optional[str] = None) -> List[Dict[str, Any]]:
    """`evaluation.predict` (the checkpoint's temperature applied) with, for `tta`, the probabilities
    averaged over its views; without TTA, `evaluation.predict` exactly."""
    views = tta_views(tta)
    hook = None if tta is None else partial(calibrated_probabilities, views=views)
    results = plain_predict(checkpoint, images, top_k=top_k, device=device, batch_size=batch_size, probabilities=hook)
    if tta is not None:
        for item in results:
            item["tta"] = tta
    return results


# ------------------------------------------------------------------------------------- calibrate
def calibrate_checkpoint(checkpoint: PathLike, out: PathLike, *, split: str = "val", recipe: RecipeLike = None,
                         overrides: Sequence[str] = (), batch_size: Optional[int] = None,
                         device: Optional[str] = None, force: bool = False) -> Dict[str, Any]:
    """Fit a temperature on `split` of `checkpoint`'s data and write the checkpoint, with it in its
    metadata, to `out` (atomically; `out` may be `checkpoint` itself with `force`). Returns the
    calibration record, with `checkpoint` the file written."""
    checkpoint, out = Path(checkpoint), Path(out)
    meta = read_meta(checkpoint)
    if not meta.get("arch"):
        raise FinetuneError(f"{checkpoint}: no finetune metadata (arch, num_classes); calibrate needs a checkpoint "
                            "saved by finetune (convert others with finetune.load_model + save_checkpoint)")
    _check_output(checkpoint, out, force)
    chosen = recipe_for(checkpoint, recipe, overrides)
    model = load_for_scoring(checkpoint, device)
    loader = split_loader(chosen, model, split, batch_size)
    cached = split_logits(model, loader, precision=scoring_precision(chosen, model, eval_batch_size(chosen)))
    threshold = tasks.calibration_of(model)["threshold"]
    del model
    return write_temperature(checkpoint, out, fit(cached.all_logits(), cached.all_labels(), split, threshold))


def _check_output(checkpoint: Path, out: Path, force: bool) -> None:
    if out.suffix != ".safetensors":
        raise FinetuneError(f"{out}: the output must be a .safetensors file, e.g. {out.with_suffix('.safetensors')}")
    if out.exists() and out.resolve() == checkpoint.resolve() and not force:
        raise FinetuneError(f"{out}: is the checkpoint itself; pass --force to write the temperature into it in "
                            "place (the file is replaced atomically), or choose another output")
    refuse_to_overwrite(out, force)


def write_temperature(source: PathLike, out: PathLike, record: Dict[str, Any]) -> Dict[str, Any]:
    """`source`'s tensors and metadata, plus `temperature` (multi-label: and per-class `thresholds`)
    and the `calibration` record, written to `out` atomically (a crash leaves the previous file there
    whole)."""
    tensors, meta = read_checkpoint(source)
    meta[TEMPERATURE_KEY] = record["temperature"]
    method = ("temperature scaling (Guo et al. 2017), NLL minimised by golden-section search on log T in "
              f"[{T_BOUNDS[0]}, {T_BOUNDS[1]}]")
    if record.get("thresholds") is not None:
        meta[THRESHOLDS_KEY] = record["thresholds"]
        method += ("; on the sigmoid (binary NLL), then per-class thresholds with the best F1 of each class on "
                   "the calibrated probabilities")
    meta[RECORD_KEY] = {"method": method, "bins": ECE_BINS,
                        **{k: v for k, v in record.items() if k not in ("temperature", "thresholds")}}
    write_checkpoint(out, tensors, meta)
    return {**record, "checkpoint": str(out)}


def describe_calibration(record: Dict[str, Any]) -> List[str]:
    """What `finetune calibrate` prints."""
    lines = [f"wrote {record['checkpoint']}: temperature {record['temperature']:.4f} fitted on {record['split']} "
             f"({record['n']} images)",
             f"  NLL   {record['nll_uncalibrated']:.4f} -> {record['nll']:.4f}",
             f"  ECE   {record['ece_uncalibrated']:.4f} -> {record['ece']:.4f}  (15 bins)",
             f"  Brier {record['brier_uncalibrated']:.4f} -> {record['brier']:.4f}"]
    if record.get("thresholds") is not None:
        lines.append(f"  F1 micro {record['f1_micro_uncalibrated']:.4f} -> {record['f1_micro']:.4f}, macro "
                     f"{record['f1_macro_uncalibrated']:.4f} -> {record['f1_macro']:.4f} (threshold "
                     f"{record['threshold']:.2f} -> per class: "
                     + ", ".join(f"{t:.2f}" for t in record["thresholds"][:12])
                     + (" ..." if len(record["thresholds"]) > 12 else "") + ")")
    if record.get("at_bound"):
        lines.append(f"  note: T stopped at the search bound ({T_BOUNDS[0]} or {T_BOUNDS[1]}): the NLL still falls "
                     "there; the split has too few mistakes to calibrate on")
    if record["split"] == "test":
        lines.append("  note: fitted on test, so calibration scores on test are now optimistic; fit on val")
    return lines


def temperature_lines(checkpoint: PathLike) -> List[str]:
    """One line naming a checkpoint's temperature and where it was fitted ([] when it has none)."""
    meta = read_meta(checkpoint)
    if meta.get(TEMPERATURE_KEY) is None:
        return []
    record = meta.get(RECORD_KEY) or {}
    where = f" on {record['split']}" if record.get("split") else ""
    squash = "sigmoid" if meta.get(THRESHOLDS_KEY) is not None or meta.get("task") == "multilabel" else "softmax"
    extra = "; labels above per-class thresholds" if meta.get(THRESHOLDS_KEY) is not None else ""
    return [f"temperature {meta[TEMPERATURE_KEY]:.4f} (fitted{where}; probabilities are {squash}(logits / T){extra})"]


# ------------------------------------------------------------------------------ soups and training
def calibrate_soup(path: Path, recipe: RecipeLike, split: str, device: Optional[str], scored: bool) -> Path:
    """The end of `make_soup`: a soup our own scorer scored on val gets its own temperature, fitted on
    that split and written into it in place. Soups scored by a caller's function, unscored ones and
    ones scored on test are left as they are."""
    if not scored or split != "val" or not _has_recipe(path, recipe):
        return path
    calibrate_checkpoint(path, path, split=split, recipe=recipe, device=device, force=True)
    return path


def _has_recipe(checkpoint: Path, recipe: RecipeLike) -> bool:
    return bool(recipe) or bool(read_meta(checkpoint).get("recipe")) or (checkpoint.parent / rundir.RECIPE).is_file()


def calibrate_run(run_dir: Path, best: Sequence[Dict[str, Any]], val_dataset, recipe: Recipe,
                  device: torch.device, rank: int = 0) -> List[str]:
    """`calibrate: true`: at the end of training, fit a temperature on val for each kept best
    checkpoint and write it into that checkpoint, each replaced atomically (a kill leaves it whole,
    uncalibrated, and `--resume` calibrates again: the fit reads the raw logits, so it is the same).
    Rank 0 works alone on the whole val split; the other processes wait. Returns the log lines."""
    lines: List[str] = []
    if rank == 0:
        loader = data_lib.build_loader(val_dataset, batch_size=eval_batch_size(recipe), train=False,
                                       workers=recipe.data.workers)
        for entry in best:
            path = Path(run_dir) / entry["path"]
            model = load_model(str(path)).to(device)
            cached = split_logits(model, loader, precision=recipe.precision)
            threshold = tasks.calibration_of(model)["threshold"]
            del model
            record = write_temperature(path, path, fit(cached.all_logits(), cached.all_labels(), "val", threshold))
            lines.append(f"calibrated {path.name}: temperature {record['temperature']:.4f}, val NLL "
                         f"{record['nll_uncalibrated']:.4f} -> {record['nll']:.4f}, ECE "
                         f"{record['ece_uncalibrated']:.4f} -> {record['ece']:.4f}"
                         + (f", F1 micro {record['f1_micro_uncalibrated']:.4f} -> {record['f1_micro']:.4f} at "
                            "per-class thresholds" if record.get("thresholds") is not None else ""))
    distributed.barrier()
    return lines


# ------------------------------------------------------------------------------------------- viz
def reliability_panels(checkpoint: PathLike, split: str = "val", recipe: RecipeLike = None,
                       device: Optional[str] = None) -> Tuple[List[Tuple[str, Dict[str, Any]]], int]:
    """The reliability bins of a checkpoint on a split: at T = 1 and, when it has one, at its
    temperature; and the number of images. One pass over the split."""
    chosen = recipe_for(checkpoint, recipe)
    model = load_for_scoring(checkpoint, device)
    loader = split_loader(chosen, model, split)
    cached = split_logits(model, loader, precision=scoring_precision(chosen, model, eval_batch_size(chosen)))
    logits, labels = cached.all_logits(), cached.all_labels()
    if labels.numel() == 0:
        raise FinetuneError(f"{split} split of {chosen.data.dataset} has no readable images to draw")
    temperature = temperature_of(model)
    task = tasks.of_model(model)
    panels = [("uncalibrated (T = 1)", reliability_bins(task.normalise(logits.double()), labels))]
    if temperature != 1:
        panels.append((f"calibrated (T = {temperature:.3f})",
                       reliability_bins(task.normalise(scaled(logits.double(), temperature)), labels)))
    return panels, len(labels)
