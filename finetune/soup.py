"""Model soups (Wortsman et al. 2022): average the weights of fine-tunes of one pretrained model.

    make_soup(["runs/pets37-20240101-120000"], method="greedy")   # -> runs/.../soup-greedy.safetensors
    make_soup(["runs/sweep-pets37"], method="greedy")             # every trial of a sweep
    make_soup(["B_16", "runs/x/epoch-007.safetensors"], method="wise", alphas=[0, 0.5, 1])   # WiSE-FT

Ingredients are checkpoint files, run directories (their kept best checkpoints, from `best.json`)
or folders of run directories, such as a sweep's (every finished run's best checkpoints, ranked by
their val top-1; unfinished runs are skipped and listed in the soup's record). They are checked
from headers alone (same tensors, shapes, architecture, classes) before any weights are read.

* uniform: the (optionally weighted) mean of every ingredient. It streams: for each tensor name
  it reads that tensor from each file in turn and adds it into a float32 (float64 for float64
  weights) accumulator, then casts the mean back to the stored dtype. Peak memory is about one
  model (the finished means) plus one tensor, however many ingredients there are.
* greedy: score each ingredient alone with `score_fn` (state dict -> held-out accuracy), start
  the soup with the best one, and try the others best first, keeping each only if the average
  of the kept ones plus it scores strictly higher. The soup returned is the one with the best
  score seen, so it is never worse than its best ingredient on that split. Memory: the float32
  running sum of the kept ingredients plus one trial average (two models), plus the scorer's
  own model.

* wise (WiSE-FT, Wortsman et al. 2022): for each alpha, theta = (1 - alpha) * pretrained + alpha *
  fine-tuned for every tensor but the head, which is the fine-tune's; the pretrained weights are
  loaded at the fine-tune's shape (`load_model(ref, num_classes=, img_size=)`, position
  embeddings resampled as the fine-tune's were). The alpha scoring best is written (ties: the
  larger alpha). Alpha 1 is the fine-tune exactly, alpha 0 the pretrained backbone with its head.

* stock (Model Stock: Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned
  models", ECCV 2024): `inputs = [PRETRAINED_REF, CKPT, CKPT, ...]`, k >= 2 fine-tunes of those
  pretrained weights (loaded at the fine-tunes' classes and resolution, as for wise). For every
  tensor, with w0 the pretrained one and w1..wk the fine-tuned ones: cos = the mean pairwise cosine
  of the flattened deltas wi - w0, t = k cos / (1 + (k - 1) cos), merged = t * mean(wi) + (1 - t) * w0.
  Edge cases (see `merging.stock_ratio` / `mean_pairwise_cosine`): t is clamped to [0, 1] (cos <= 0
  gives the pretrained tensor); a zero delta counts as cosine 0 in its pairs, and a tensor no
  fine-tune moved is kept as it is (t recorded as None); tensors without a pretrained counterpart
  (absent from the pretrained weights as stored, or shaped unlike there: the new head; the position
  embedding, resampled, is not one) are the fine-tunes' mean; non-float tensors must agree and are
  copied. k = 1 is refused. t per tensor and per block (parameter-weighted mean, min, max) go to
  the metadata and the report. Streams one tensor at a time, plus the pretrained model in memory.
  Like uniform, it chooses nothing, so it is scored when a recipe is known, not selected.
* learned (Wortsman et al. 2022, appendix I; model-soups' `learned_bylayer.py`): mixing weights
  softmax(raw) per ingredient (or per ingredient and block with `by_layer`) and a logit temperature,
  learned by AdamW through `torch.func.functional_call` on the selection split, starting from the
  uniform soup; after each epoch the soup is scored and kept only if strictly better, so it never
  ends below the uniform soup there (`merging.LearnedMixture`). Needs every ingredient in memory at
  once: about k * params * 4 bytes, plus three model-sized sets and a training step's activations
  (`merging.learned_memory`); refused in one line when that exceeds the free memory of the device.

Beside every soup of k >= 2 fine-tunes that we score ourselves (a known recipe), the metadata's
`soup.ensemble` records the logit ensemble of the ingredients (`finetune.ensemble`: the mean of
their logits, k forward passes per image) on the same splits, and the report prints it: the
reference a soup, at the cost of one model, approaches.

Selection and report use different splits. Greedy, wise and learned *select* on `split` (val), and
selecting on test is refused unless `allow_test_selection`, since the score of a choice made on a
split is optimistic there. When the data has a test split, the soup is then also scored on test:
the metadata's `metrics` hold `val_top1` (selection) and `test_top1` (reported), as compare shows.

The output is an ordinary checkpoint (loads with `finetune.load_model`) whose metadata is the
first ingredient's plus `source: "soup"` and a `soup` record of the method and ingredients.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open

from . import merging, rundir, tasks
from .calibration import calibrate_soup
from .checkpoints import StateDict, file_sha256, read_checkpoint, read_meta, refuse_to_overwrite, tensor_shapes, write_checkpoint
from .errors import FinetuneError
from .ensemble import ensemble_on_split
from .evaluation import (ScoreFn, autocast, build_splits, choose_device, fraction, load_for_scoring, recipe_for,
                         scoring_precision, split_loader, split_scorer, state_scorer)
from .loading import data_config_of, load_model, load_pretrained
from .rundir import SPLITS, best_checkpoints

METHODS = ("uniform", "greedy", "wise", "stock", "learned")
SELECTING = ("greedy", "wise", "learned")  # methods that choose on a split (the choice's score there is optimistic)
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
HEAD_PREFIX = "head."
DONE_STATES = ("finished", "stopped_early")
MATCHING_FIELDS = ("arch", "num_classes", "class_names")
# What a soup carries over from its first ingredient: the model, its data, its task (a multi-label
# soup keeps the first ingredient's val-chosen threshold) and the recipe that scores it.
CARRIED_FIELDS = ("arch", "num_classes", "class_names", "img_size", "data_config", "task", "threshold", "recipe")
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# ------------------------------------------------------------------------------------- ingredients
def resolve_ingredients(inputs: Iterable[str | os.PathLike], skipped: Optional[List[Dict[str, str]]] = None
                        ) -> List[Path]:
    """Checkpoint files as given; run directories expand to their best checkpoints, best first;
    folders of run directories (a sweep's) to every finished run's best checkpoints, ranked by val
    top-1. The runs left out (not finished) are appended to `skipped` as {"run", "reason"}."""
    paths: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and rundir.is_folder_of_runs(path):
            paths.extend(_finished_runs_checkpoints(path, skipped if skipped is not None else []))
        elif path.is_dir():
            paths.extend(best_checkpoints(path))
        elif path.is_file():
            paths.append(path)
        else:
            raise FinetuneError(f"{path}: no such checkpoint file or run directory")
    if not paths:
        raise FinetuneError("no ingredients given; pass checkpoint files or run directories")
    return paths


def _finished_runs_checkpoints(folder: Path, skipped: List[Dict[str, str]]) -> List[Path]:
    ranked: List[Tuple[float, Path]] = []
    runs = sorted(child for child in folder.iterdir() if child.is_dir() and rundir.is_run_dir(child))
    for run in runs:
        status = rundir.read_status(run)
        state = status.get("state")
        if state == "running":
            raise FinetuneError(f"{run}: still training (pid {status.get('pid', '?')}); soup {folder} when its runs "
                                "have finished, or pass the finished runs' directories")
        if state not in DONE_STATES:
            skipped.append({"run": str(run), "reason": f"{state or 'no status'}, not finished"})
            continue
        entries = rundir.best_entries(run)
        for entry, path in zip(entries, best_checkpoints(run)):
            ranked.append((rundir.entry_score(entry), path))
    if not ranked:
        raise FinetuneError(f"{folder}: none of its {len(runs)} run directories has finished, so there is "
                            "nothing to soup yet")
    ranked.sort(key=lambda item: -item[0])  # stable: trial order on ties
    return [path for _, path in ranked]


def validate_ingredients(paths: Sequence[Path]) -> List[Dict[str, Any]]:
    """Check from headers that every ingredient matches the first; return their metadata."""
    metas = [_finetune_meta(p) for p in paths]
    shapes = [tensor_shapes(p) for p in paths]
    for path, meta, shape in zip(paths[1:], metas[1:], shapes[1:]):
        _check_same_fields(paths[0], metas[0], path, meta)
        _check_same_tensors(paths[0], shapes[0], path, shape)
    return metas


def _finetune_meta(path: Path) -> Dict[str, Any]:
    meta = read_meta(path)
    if not meta.get("arch"):
        raise FinetuneError(f"{path}: no finetune metadata (arch, num_classes); soups need checkpoints "
                            "saved by finetune (convert others with finetune.load_model + save_checkpoint)")
    return meta


def _mismatch(a: Path, b: Path, what: str, value_a: Any, value_b: Any) -> FinetuneError:
    return FinetuneError(f"cannot soup {a} with {b}: {what} differs ({_short(value_a)} vs {_short(value_b)}); "
                         "ingredients must be fine-tunes of one model with the same classes")


def _check_same_fields(a: Path, meta_a: Dict[str, Any], b: Path, meta_b: Dict[str, Any]) -> None:
    for name in MATCHING_FIELDS:
        if meta_a.get(name) != meta_b.get(name):
            raise _mismatch(a, b, *_first_difference(name, meta_a.get(name), meta_b.get(name)))


def _first_difference(name: str, a: Any, b: Any) -> Tuple[str, Any, Any]:
    """The innermost differing entry of two JSON values, e.g. ('arch.kwargs.depth', 2, 3)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b or a[key] != b[key]:
                return _first_difference(f"{name}.{key}", a.get(key), b.get(key))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(f"{name}[{index}]", x, y)
    return name, a, b


def _check_same_tensors(a: Path, shapes_a: Dict[str, Any], b: Path, shapes_b: Dict[str, Any]) -> None:
    for key in sorted(set(shapes_a) ^ set(shapes_b)):
        present, absent = (a, b) if key in shapes_a else (b, a)
        raise FinetuneError(f"cannot soup {a} with {b}: tensor {key!r} is in {present} but not in {absent}; "
                            "ingredients must share one architecture")
    for key, (shape_a, dtype_a) in shapes_a.items():
        shape_b, dtype_b = shapes_b[key]
        if shape_a != shape_b:
            raise _mismatch(a, b, f"shape of tensor {key!r}", list(shape_a), list(shape_b))
        if (dtype_a in FLOAT_DTYPES) != (dtype_b in FLOAT_DTYPES):
            raise _mismatch(a, b, f"dtype of tensor {key!r}", dtype_a, dtype_b)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ------------------------------------------------------------------------------------ streaming
def _tensor_from(path: Path, key: str) -> torch.Tensor:
    # One open per read: safe_open memory-maps the whole file, and the mapped pages it touches
    # count as our memory until the handle closes; closing at once keeps that to one tensor.
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise FinetuneError(f"{path}: cannot read tensor {key!r} ({str(e).strip()[:200]}); the file is "
                            "truncated or corrupt, re-save it") from e


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 sums lose the small differences between fine-tunes; always accumulate in >= fp32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_equal(key: str, reference: torch.Tensor, other: torch.Tensor, path: Path) -> None:
    if not torch.equal(reference, other):
        raise FinetuneError(f"{path}: non-float tensor {key!r} differs from the first ingredient's; integer "
                            "buffers cannot be averaged, so they must agree exactly")


def _agreed_value(paths: Sequence[Path], key: str) -> torch.Tensor:
    first = _tensor_from(paths[0], key)
    for path in paths[1:]:
        _check_equal(key, first, _tensor_from(path, key), path)
    return first


def _weighted_mean(paths: Sequence[Path], key: str, weights: Sequence[float]) -> torch.Tensor:
    total = None
    stored_dtype = None
    for path, weight in zip(paths, weights):
        if weight == 0:
            continue
        tensor = _tensor_from(path, key)
        if total is None:
            stored_dtype = tensor.dtype
            total = torch.zeros(tensor.shape, dtype=_accumulator_dtype(tensor.dtype))
        total.add_(tensor, alpha=weight)  # promotes bf16/fp16 into the fp32 accumulator, no copy
        del tensor
    return total.to(stored_dtype)


def normalise_weights(weights: Optional[Sequence[float]], count: int) -> List[float]:
    """Weights for `count` ingredients scaled to sum 1 (None: equal weights)."""
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise FinetuneError(f"weights: {len(weights)} given for {count} ingredients; give one per ingredient")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise FinetuneError(f"weights: {weights} has a negative or non-finite value; weights must be >= 0")
    total = sum(weights)
    if total == 0:
        raise FinetuneError(f"weights: {weights} are all zero; at least one must be positive")
    return [w / total for w in weights]


# ---------------------------------------------------------------------------------------- uniform
def uniform_soup(paths: Sequence[Path], weights: Optional[Sequence[float]] = None
                 ) -> Tuple[StateDict, Dict[str, Any]]:
    """The (weighted) mean of the ingredients, streamed one tensor at a time, in the stored dtypes."""
    paths = [Path(p) for p in paths]
    weights = normalise_weights(weights, len(paths))
    soup: StateDict = {}
    for key, (_, dtype) in tensor_shapes(paths[0]).items():
        if dtype in FLOAT_DTYPES:
            soup[key] = _weighted_mean(paths, key, weights)
        else:
            soup[key] = _agreed_value(paths, key)
    return soup, {"method": "uniform", "weights": weights, "ingredients": [str(p) for p in paths]}


# ----------------------------------------------------------------------------------------- greedy
def greedy_soup(paths: Sequence[Path], score_fn: ScoreFn) -> Tuple[StateDict, Dict[str, Any]]:
    """Greedy soup: add ingredients best first while the held-out score strictly improves."""
    paths = [Path(p) for p in paths]
    scores = [_score(score_fn, read_checkpoint(p)[0], p) for p in paths]  # one model in memory at a time
    ranking = sorted(range(len(paths)), key=lambda i: -scores[i])
    kept, best_score = [ranking[0]], scores[ranking[0]]
    stored = read_checkpoint(paths[ranking[0]])[0]
    dtypes = {k: v.dtype for k, v in stored.items()}
    total = {k: v.to(_accumulator_dtype(v.dtype)) if _is_float(v.dtype) else v for k, v in stored.items()}
    del stored
    steps = []
    for index in ranking[1:]:
        trial = _trial_mean(total, paths[index], len(kept) + 1, dtypes)
        trial_score = _score(score_fn, trial, paths[index])
        del trial
        accepted = trial_score > best_score
        steps.append({"candidate": str(paths[index]), "score": trial_score, "kept": accepted})
        if accepted:
            _add_into(total, paths[index])
            kept.append(index)
            best_score = trial_score
    soup = _divide_in_place(total, len(kept), dtypes)
    info = {
        "method": "greedy", "ingredients": [str(p) for p in paths], "scores": scores,
        "ranking": [str(paths[i]) for i in ranking], "kept": [str(paths[i]) for i in kept],
        "rejected": [str(paths[i]) for i in ranking if i not in kept], "steps": steps, "score": best_score,
        "best_ingredient_score": scores[ranking[0]],
        "weights": [1.0 / len(kept) if i in kept else 0.0 for i in range(len(paths))],
    }
    return soup, info


def _score(score_fn: ScoreFn, state: StateDict, path: Path) -> float:
    value = float(score_fn(state))
    if not math.isfinite(value):
        raise FinetuneError(f"{path}: the scorer returned {value} for this state dict; expected an accuracy in [0, 1]")
    return value


def _trial_mean(total: StateDict, path: Path, count: int, dtypes: Dict[str, torch.dtype]) -> StateDict:
    # Same arithmetic as `_add_into` then `_divide_in_place`, so a kept trial is bit-identical to
    # the final soup and the score reported is the score of what is written.
    trial = {}
    for key, running in total.items():
        tensor = _tensor_from(path, key)
        if _is_float(running.dtype):
            trial[key] = (running + tensor).div_(count).to(dtypes[key])
        else:
            _check_equal(key, running, tensor, path)
            trial[key] = running
    return trial


def _add_into(total: StateDict, path: Path) -> None:
    for key, running in total.items():
        if _is_float(running.dtype):
            running.add_(_tensor_from(path, key))


def _divide_in_place(total: StateDict, count: int, dtypes: Dict[str, torch.dtype]) -> StateDict:
    for key, running in total.items():
        if _is_float(running.dtype):
            total[key] = running.div_(count).to(dtypes[key])  # replaces the fp32 sum key by key
    return total


# ------------------------------------------------------------------------------------------- wise
def wise_soup(pretrained: str, finetuned: Path, alphas: Sequence[float], score_fn: Optional[ScoreFn]
              ) -> Tuple[StateDict, Dict[str, Any]]:
    """WiSE-FT: the backbone interpolated between `pretrained` (a model ref, loaded at the fine-tune's
    classes and resolution) and the fine-tune, the head the fine-tune's, for each alpha; returns the
    state of the alpha scoring best (ties: the larger alpha), and the record of every alpha's score."""
    alphas = check_alphas(alphas)
    finetuned = Path(finetuned)
    tuned, meta = read_checkpoint(finetuned)
    if not meta.get("arch"):
        _finetune_meta(finetuned)  # the one-line error about missing metadata
    start = pretrained_state(pretrained, finetuned, meta, tuned)
    if score_fn is None and len(alphas) > 1:
        raise FinetuneError("wise: choosing among several alphas needs a score; give --recipe or keep scoring on")
    scores: List[Optional[float]] = []
    best: Optional[Tuple[float, float, StateDict]] = None
    for alpha in alphas:
        state = interpolate(start, tuned, alpha)
        score = _score(score_fn, state, finetuned) if score_fn else None
        scores.append(score)
        rank = (score if score is not None else 0.0, alpha)
        if best is None or rank > best[:2]:
            best = (*rank, state)
        del state
    _, alpha, state = best
    info = {"method": "wise", "alphas": alphas, "scores": scores, "alpha": alpha,
            "score": scores[alphas.index(alpha)], "weights": [1.0 - alpha, alpha]}
    return state, info


def pretrained_state(pretrained: str, finetuned: Path, meta: Dict[str, Any], tuned: StateDict,
                     method: str = "wise") -> StateDict:
    """The weights of `pretrained` brought to the fine-tune's shape: its classes (a new head, unused)
    and resolution (position embeddings resampled as `load_model` did when the fine-tune began).
    Only the keys and shapes of `tuned` are read; errors start with `method`."""
    model = load_model(str(pretrained), num_classes=int(meta["num_classes"]), img_size=int(meta["img_size"]))
    if model.finetune_info["arch"] != meta["arch"]:
        name, a, b = _first_difference("arch", model.finetune_info["arch"], meta["arch"])
        raise FinetuneError(f"{method}: {pretrained} is not the model {finetuned} was fine-tuned from: {name} differs "
                            f"({_short(a)} vs {_short(b)})")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for key in sorted(set(state) ^ set(tuned)):
        where, other = (pretrained, finetuned) if key in state else (finetuned, pretrained)
        raise FinetuneError(f"{method}: tensor {key!r} is in {where} but not in {other}; they are not one architecture")
    for key, value in tuned.items():
        if value.shape != state[key].shape:
            raise FinetuneError(f"{method}: tensor {key!r} has shape {list(state[key].shape)} in {pretrained} and "
                                f"{list(value.shape)} in {finetuned}; they are not one architecture")
    return state


def interpolate(pretrained: StateDict, finetuned: StateDict, alpha: float) -> StateDict:
    """(1 - alpha) * pretrained + alpha * finetuned for every float tensor but the head (the
    fine-tune's), computed in float32 (float64 for float64) and stored in the fine-tune's dtypes;
    alpha 0 and 1 give the two endpoints exactly."""
    out: StateDict = {}
    for key, tuned in finetuned.items():
        start = pretrained[key]
        if key.startswith(HEAD_PREFIX) or not _is_float(tuned.dtype) or alpha == 1:
            out[key] = tuned
        elif alpha == 0:
            out[key] = start.to(tuned.dtype)
        else:
            accumulator = _accumulator_dtype(tuned.dtype)
            mixed = start.to(accumulator) * (1.0 - alpha) + tuned.to(accumulator) * alpha
            out[key] = mixed.to(tuned.dtype)
    return out


def check_alphas(alphas: Optional[Iterable[Any]]) -> List[float]:
    """Alphas as sorted floats in [0, 1], or a one-line error."""
    values = list(DEFAULT_ALPHAS if alphas is None else alphas)
    if not values:
        raise FinetuneError("--alpha: no value given; give e.g. --alpha 0,0.25,0.5,0.75,1")
    checked = []
    for value in values:
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if number is None or not math.isfinite(number) or not 0 <= number <= 1:
            raise FinetuneError(f"--alpha: {value!r} is not a number in [0, 1]; alpha 0 is the pretrained backbone, "
                                "1 the fine-tune")
        checked.append(float(number))
    if len(set(checked)) != len(checked):
        raise FinetuneError(f"--alpha: {values} repeats a value; give each alpha once")
    return sorted(checked)


def parse_alphas(text: Optional[str]) -> Optional[List[float]]:
    """`"0,0.25,0.5"` -> [0.0, 0.25, 0.5] (None stays None: the defaults); one-line errors."""
    if text is None:
        return None
    values = []
    for item in str(text).split(","):
        try:
            values.append(float(item.strip()))
        except ValueError:
            raise FinetuneError(f"--alpha: {text!r} has {item.strip()!r}, not a number; give e.g. "
                                "--alpha 0,0.25,0.5,0.75,1") from None
    return check_alphas(values)


# ------------------------------------------------------------------------------------------ stock
def stock_soup(pretrained: str, paths: Sequence[Path]) -> Tuple[StateDict, Dict[str, Any]]:
    """Model Stock (Jang, Yun and Han, ECCV 2024) of the fine-tunes `paths` of `pretrained` (a model
    ref, loaded at the fine-tunes' classes and resolution), one tensor at a time: for every tensor
    t = k cos / (1 + (k - 1) cos) from the mean pairwise cosine of the deltas from the pretrained
    tensor, merged = t * mean + (1 - t) * pretrained (`merging.stock_tensor`); tensors without a
    pretrained counterpart (the new head) are the fine-tunes' mean. See the module docstring."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise FinetuneError(f"stock: {len(paths)} fine-tune given; Model Stock needs at least two (its ratio comes "
                            "from the angle between fine-tunes), e.g. finetune soup --method stock B_16 "
                            "a.safetensors b.safetensors")
    meta = _finetune_meta(paths[0])
    shapes = tensor_shapes(paths[0])
    stored = {key: tuple(value.shape) for key, value in load_pretrained(str(pretrained)).state_dict.items()}
    skeleton = {key: torch.empty(shape, device="meta") for key, (shape, _) in shapes.items()}
    start = pretrained_state(pretrained, paths[0], meta, skeleton, method="stock")
    new = [key for key, (shape, dtype) in shapes.items() if dtype in FLOAT_DTYPES
           and (key not in stored or (stored[key] != tuple(shape) and key != "pos_embed"))]
    soup: StateDict = {}
    ratios: Dict[str, Optional[float]] = {}
    cosines: Dict[str, Optional[float]] = {}
    sizes = {key: math.prod(shape) for key, (shape, _) in shapes.items()}
    k = len(paths)
    for key, (_, dtype) in shapes.items():
        if dtype not in FLOAT_DTYPES:
            soup[key] = _agreed_value(paths, key)
        elif key in new:
            soup[key] = _weighted_mean(paths, key, [1.0 / k] * k)
        else:
            tuned = [_tensor_from(p, key) for p in paths]
            soup[key], cosines[key], ratios[key] = merging.stock_tensor(start[key], tuned)
            del tuned
    del start
    moved = {key: t for key, t in ratios.items() if t is not None}
    weight = sum(sizes[key] for key in moved)
    t_mean = sum(t * sizes[key] for key, t in moved.items()) / weight if weight else 1.0
    by_block = merging.summarise_by_block({key: ratios.get(key) for key in shapes if key in ratios or key in new},
                                          sizes)
    info = {"method": "stock", "ingredients": [str(p) for p in paths], "weights": [t_mean / k] * k,
            "pretrained_weight": 1.0 - t_mean, "t_mean": t_mean, "t": ratios, "cos": cosines,
            "t_by_block": by_block, "mean_of_finetunes": new}
    return soup, info


def _make_stock(inputs: List, out, recipe: Any, split: str, score_fn: Optional[ScoreFn], evaluate: Optional[bool],
                device: Optional[str], force: bool, report_fn: Optional[ScoreFn], ensemble: Optional[bool]) -> Path:
    if len(inputs) < 2:
        raise FinetuneError("stock: give PRETRAINED_REF then at least two fine-tunes, e.g. finetune soup --method "
                            "stock B_16 a.safetensors b.safetensors (or a sweep directory)")
    pretrained = str(inputs[0])
    skipped: List[Dict[str, str]] = []
    paths = resolve_ingredients(inputs[1:], skipped)
    if len(paths) < 2:
        raise FinetuneError(f"stock: {paths[0]} is the only fine-tune; Model Stock needs at least two (its ratio comes "
                            "from the angle between fine-tunes): give another checkpoint or run directory")
    metas = validate_ingredients(paths)
    out = _output_path(inputs[1:], paths, out, "stock")
    if Path(pretrained).is_file() and out.resolve() == Path(pretrained).resolve():
        raise FinetuneError(f"{out}: is the pretrained ingredient; write the soup to another file with -o")
    out = refuse_to_overwrite(out, force)
    own_scorer = False
    if evaluate is False:
        score_fn = None
    elif score_fn is None and _wants_score("stock", recipe, metas[0], evaluate):
        score_fn, own_scorer = state_scorer(paths[0], recipe, split, device), True
    tensors, info = stock_soup(pretrained, paths)
    score = _score(score_fn, tensors, out) if score_fn else None
    del score_fn
    reported = _report(tensors, split, score is not None, own_scorer, report_fn, paths[0], recipe, device)
    meta = _soup_meta(metas, paths, out, info, split if score is not None else None, score, reported, skipped)
    pretrained_name = _relative_to(Path(pretrained), out.parent) if Path(pretrained).is_file() else pretrained
    meta["soup"].update(pretrained=pretrained_name, **{k: info[k] for k in (
        "pretrained_weight", "t_mean", "t_by_block", "t", "cos", "mean_of_finetunes")})
    if Path(pretrained).is_file():
        meta["soup"]["pretrained_sha256"] = file_sha256(Path(pretrained))
    _attach_ensemble(meta, paths, out, ensemble, own_scorer and score is not None, recipe, metas[0], reported, device)
    return write_checkpoint(out, tensors, meta)


# ---------------------------------------------------------------------------------------- learned
LEARNED_EPOCHS = 5
LEARNED_LR = 0.05


def learned_soup(paths: Sequence[Path], model: torch.nn.Module, batches, score_fn: ScoreFn, by_layer: bool = False,
                 epochs: int = LEARNED_EPOCHS, lr: float = LEARNED_LR, device: Optional[str] = None,
                 precision_context=None) -> Tuple[StateDict, Dict[str, Any]]:
    """The learned soup (Wortsman et al. 2022, appendix I; model-soups' `learned_bylayer.py`).

    Mixing weights softmax(raw) per ingredient (per ingredient and block with `by_layer`) and a
    logit temperature, initialised to the uniform soup and learned with AdamW over `batches` (an
    iterable of (images, labels) of the selection split, or a function returning one per epoch) in
    `model` (any ingredient's architecture, via `torch.func.functional_call`). The uniform soup is
    scored first; after each epoch the soup is scored by `score_fn` and kept only if strictly
    better, so its score is never below the uniform soup's. Returns (state, record)."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise FinetuneError(f"learned: {len(paths)} ingredient given; learning mixing weights needs at least two")
    if score_fn is None:
        raise FinetuneError("learned: the soup is learned on a split and needs a score; give --recipe (or a recipe "
                            "stored in the checkpoints)")
    target = choose_device(device)
    uniform, _ = uniform_soup(paths)
    start = _score(score_fn, uniform, paths[0])
    keys = list(tensor_shapes(paths[0]))
    mixture = merging.LearnedMixture(keys, lambda key: _every_ingredients(paths, key), len(paths), target, by_layer)
    model = model.to(target)
    result = mixture.learn(model, batches if callable(batches) else (lambda: batches), score_fn, start,
                           epochs=epochs, lr=lr, precision_context=precision_context,
                           loss_fn=tasks.of_model(model).loss)
    weights = result["weights"]
    state = uniform if result["epoch"] == 0 else mixture.state(weights)
    del uniform
    floats = {key: size for key, size in mixture.sizes.items() if mixture.dtypes[key].is_floating_point}
    total = sum(floats.values())
    per_ingredient = ([1.0 / len(paths)] * len(paths) if result["epoch"] == 0 else  # the uniform soup, exactly
                      [sum(float(weights[mixture.group_of[key], i]) * size for key, size in floats.items()) / total
                       for i in range(len(paths))])
    info = {"method": "learned", "ingredients": [str(p) for p in paths], "weights": per_ingredient,
            "by_layer": by_layer, "temperature": result["temperature"], "epoch": result["epoch"], "epochs": epochs,
            "lr": lr, "uniform_score": start, "score": result["score"], "history": result["history"],
            "mixed_tensors": len(mixture.stacks), "constant_tensors": len(mixture.constants)}
    if by_layer:
        info["weights_by_layer"] = {group: [float(w) for w in weights[g]] for g, group in enumerate(mixture.groups)}
    del mixture
    return state, info


def _every_ingredients(paths: Sequence[Path], key: str) -> List[torch.Tensor]:
    first = _tensor_from(paths[0], key)
    if not _is_float(first.dtype):
        return [_agreed_value(paths, key)] * len(paths)
    return [first] + [_tensor_from(p, key) for p in paths[1:]]


def _learned_from_recipe(paths: List[Path], score_fn: ScoreFn, recipe: Any, split: str, device: Optional[str],
                         by_layer: bool, epochs: Optional[int], lr: Optional[float], batch_size: Optional[int]
                         ) -> Tuple[StateDict, Dict[str, Any]]:
    """learned_soup on `split` of the recipe's data, in the first ingredient's model, after checking
    that every ingredient fits in the memory of the device at once."""
    resolved = recipe_for(paths[0], recipe)
    target = choose_device(device)
    batch = batch_size or resolved.batch_size
    shapes = tensor_shapes(paths[0])
    params = sum(math.prod(shape) for shape, dtype in shapes.values() if dtype in FLOAT_DTYPES)
    vessel = load_for_scoring(paths[0], device)
    estimate = merging.learned_memory(
        len(paths), params, batch, depth=len(vessel.blocks),
        tokens=vessel.patch_embed.num_patches + getattr(vessel, "num_prefix_tokens", 1), width=vessel.embed_dim,
        heads=vessel.blocks[0].attn.num_heads if len(vessel.blocks) else 1)
    merging.check_fits(estimate, merging.available_bytes(target), target, len(paths), params, batch)
    loader = split_loader(resolved, vessel, split, batch)
    precision = scoring_precision(resolved, vessel, batch)
    context = (lambda: autocast(target, "bf16")) if precision == "bf16" else None  # fp16 would need a grad scaler
    state, info = learned_soup(paths, vessel, lambda: loader, score_fn, by_layer=by_layer,
                               epochs=LEARNED_EPOCHS if epochs is None else epochs,
                               lr=LEARNED_LR if lr is None else lr, device=device, precision_context=context)
    info["memory_estimate"] = estimate
    info["batch_size"] = batch
    return state, info


def _check_learned_options(method: str, by_layer: bool, epochs: Optional[int], lr: Optional[float],
                           batch_size: Optional[int]) -> None:
    if method != "learned":
        for name, value in (("--by-layer", by_layer or None), ("--epochs", epochs), ("--lr", lr),
                            ("--batch-size", batch_size)):
            if value is not None:
                raise FinetuneError(f"{name}: only the learned method takes it (--method learned CKPT CKPT ...)")
        return
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise FinetuneError(f"--epochs: {epochs!r} is not a positive integer; e.g. --epochs 5")
    if lr is not None and (not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0):
        raise FinetuneError(f"--lr: {lr!r} is not a positive number; e.g. --lr 0.05")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise FinetuneError(f"--batch-size: {batch_size!r} is not a positive integer; e.g. --batch-size 32")


_LEARNED_RECORD = ("by_layer", "temperature", "epoch", "epochs", "lr", "uniform_score", "history", "weights_by_layer",
                   "memory_estimate", "batch_size", "mixed_tensors", "constant_tensors")


# --------------------------------------------------------------------------------------- ensemble
def _attach_ensemble(meta: Dict[str, Any], paths: Sequence[Path], out: Path, wanted: Optional[bool], scored_by_us: bool,
                     recipe: Any, first_meta: Dict[str, Any], reported: Optional[float], device: Optional[str]) -> None:
    """meta["soup"]["ensemble"]: the logit ensemble of the ingredients on the soup's splits, when
    `wanted` (None: when we scored the soup ourselves from a known recipe)."""
    if wanted is False or len(paths) < 2:
        return
    known = recipe is not None or bool(first_meta.get("recipe")) or (Path(paths[0]).parent / rundir.RECIPE).is_file()
    if wanted is None and not (scored_by_us and known):
        return
    split = meta["soup"].get("split") or "val"
    record: Dict[str, Any] = {"members": [_relative_to(Path(p), out.parent) for p in paths],
                              "forward_passes": len(paths), "split": split}
    for on in dict.fromkeys([split] + (["test"] if reported is not None else [])):
        result = ensemble_on_split(paths, recipe, on, device)
        metric = tasks.of_meta(first_meta).metric  # top1, or mAP for a multi-label soup
        record[f"{on}_{metric}"], record[f"{on}_loss"] = tasks.ranking_value(result, metric), result["loss"]
    meta["soup"]["ensemble"] = record


def _ensemble_lines(soup: Dict[str, Any]) -> List[str]:
    record = soup.get("ensemble")
    if not record:
        return []
    scores = ", ".join(f"{on} top-1 {fraction(record.get(f'{on}_top1'))}" for on in ("val", "test")
                       if record.get(f"{on}_top1") is not None)
    return [f"ensemble of the {record['forward_passes']} ingredients (mean of logits, {record['forward_passes']} "
            f"forward passes an image): {scores}"]


def _describe_stock(path: Path, soup: Dict[str, Any]) -> List[str]:
    width = max([40] + [len(entry["path"]) for entry in soup["ingredients"]])
    lines = [f"wrote {path} (Model Stock of {len(soup['ingredients'])} fine-tunes of {soup['pretrained']})",
             f"  {'ingredient':{width}} {'val_top1':>8}"]
    lines += [f"  {entry['path']:{width}} {fraction(entry.get('val_top1')):>8}" for entry in soup["ingredients"]]
    lines.append(f"  {'block':14} {'t':>6} {'min':>6} {'max':>6} {'tensors':>7}   "
                 "(merged = t * mean + (1 - t) * pretrained)")
    for block, entry in soup["t_by_block"].items():
        start = f"  {block:14} {'-':>6} {'':>6} {'':>6} {entry['tensors']:>7}   "
        if block_is_new(soup, block):
            lines.append(start + "mean of the fine-tunes (no pretrained counterpart)")
        elif entry["t"] is None:
            lines.append(start + "unchanged by every fine-tune")
        else:
            lines.append(f"  {block:14} {entry['t']:>6.3f} {entry['min']:>6.3f} {entry['max']:>6.3f} "
                         f"{entry['tensors']:>7}")
    lines.append(f"t overall (parameter-weighted): {soup['t_mean']:.3f}")
    return lines


def block_is_new(soup: Dict[str, Any], block: str) -> bool:
    new = {merging.block_of(key) for key in soup.get("mean_of_finetunes") or []}
    return block in new and all(merging.block_of(key) != block for key in soup.get("t") or {})


def _describe_learned(path: Path, soup: Dict[str, Any]) -> List[str]:
    kind = "learned soup by layer" if soup.get("by_layer") else "learned soup"
    width = max([40] + [len(entry["path"]) for entry in soup["ingredients"]])
    lines = [f"wrote {path} ({kind} of {len(soup['ingredients'])} checkpoints)",
             f"  {'ingredient':{width}} {'val_top1':>8} {'weight':>7}"]
    lines += [f"  {entry['path']:{width}} {fraction(entry.get('val_top1')):>8} {weight:>7.3f}"
              for entry, weight in zip(soup["ingredients"], soup["weights"])]
    for step in soup.get("history") or []:
        what = "uniform soup (start)" if step["epoch"] == 0 else f"loss {step['loss']:.4f}"
        lines.append(f"  epoch {step['epoch']}: {what}, {soup['split']} top-1 {fraction(step['score'])}"
                     + ("  <- written" if step["epoch"] == soup["epoch"] else ""))
    lines.append(f"temperature {soup['temperature']:.3f}" + (" (weights per block in the metadata)"
                                                           if soup.get("by_layer") else ""))
    return lines


# ------------------------------------------------------------------------------------------ soups
def make_soup(inputs: Iterable[str | os.PathLike], out: Optional[str | os.PathLike] = None,
              method: str = "uniform", weights: Optional[Sequence[float]] = None, recipe: Any = None,
              split: str = "val", score_fn: Optional[ScoreFn] = None, evaluate: Optional[bool] = None,
              device: Optional[str] = None, force: bool = False, alphas: Optional[Sequence[float]] = None,
              allow_test_selection: bool = False, report_fn: Optional[ScoreFn] = None, by_layer: bool = False,
              epochs: Optional[int] = None, lr: Optional[float] = None, batch_size: Optional[int] = None,
              ensemble: Optional[bool] = None) -> Path:
    """Soup the ingredients `inputs` into a checkpoint at `out`; return its path.

    Scoring uses `score_fn`, else `evaluation.state_scorer` with the first ingredient as the
    vessel and `recipe` (a Recipe, a recipe name or path) or the ingredients' stored recipe, on
    `device` (default CUDA when present). Greedy and wise always score (and select) on `split`;
    uniform scores when it can, unless `evaluate=False` (`evaluate=True` makes a missing recipe an
    error). With `split="val"` the soup is also scored on the test split when the data has one
    (`report_fn`, or by default the same recipe's test split), recorded as `test_top1`.

    `method="wise"` takes `inputs = [PRETRAINED_REF, FINETUNED_CHECKPOINT_OR_RUN]` and `alphas`;
    `method="stock"` takes `inputs = [PRETRAINED_REF, CKPT_OR_RUN, ...]` (k >= 2 fine-tunes);
    `method="learned"` learns its weights on `split` of the recipe's data (`by_layer`, `epochs`,
    `lr`, `batch_size`: default 5 epochs, lr 0.05, the recipe's batch). `ensemble` (None: when we
    score the soup from a known recipe) records the logit ensemble of the ingredients beside it.
    """
    _check_options(method, weights, split, evaluate, alphas, allow_test_selection)
    _check_learned_options(method, by_layer, epochs, lr, batch_size)
    inputs = list(inputs)
    if method == "wise":  # then, as below, a soup we scored on val gets its own temperature
        return calibrate_soup(_make_wise(inputs, out, recipe, split, score_fn, device, force, alphas, report_fn),
                              recipe, split, device, scored=score_fn is None)
    if method == "stock":
        return calibrate_soup(_make_stock(inputs, out, recipe, split, score_fn, evaluate, device, force, report_fn,
                                          ensemble), recipe, split, device, scored=score_fn is None)
    skipped: List[Dict[str, str]] = []
    paths = resolve_ingredients(inputs, skipped)
    metas = validate_ingredients(paths)
    out = refuse_to_overwrite(_output_path(inputs, paths, out, method), force)
    own_scorer = False
    if evaluate is False:
        score_fn = None
    elif score_fn is None and _wants_score(method, recipe, metas[0], evaluate):
        score_fn, own_scorer = state_scorer(paths[0], recipe, split, device), True
    if method == "greedy":
        tensors, info = greedy_soup(paths, score_fn)
        score = info["score"]
    elif method == "learned":
        tensors, info = _learned_from_recipe(paths, score_fn, recipe, split, device, by_layer, epochs, lr, batch_size)
        score = info["score"]
    else:
        tensors, info = uniform_soup(paths, weights)
        score = _score(score_fn, tensors, out) if score_fn else None
    scored = score is not None
    del score_fn  # the selection model is no longer needed
    reported = _report(tensors, split, scored, own_scorer, report_fn, paths[0], recipe, device)
    meta = _soup_meta(metas, paths, out, info, split if scored else None, score, reported, skipped)
    meta["soup"].update({k: info[k] for k in _LEARNED_RECORD if k in info})
    _attach_ensemble(meta, paths, out, ensemble, own_scorer and scored, recipe, metas[0], reported, device)
    return calibrate_soup(write_checkpoint(out, tensors, meta), recipe, split, device, scored=scored and own_scorer)


def _make_wise(inputs: List, out, recipe: Any, split: str, score_fn: Optional[ScoreFn], device: Optional[str],
               force: bool, alphas, report_fn: Optional[ScoreFn]) -> Path:
    if len(inputs) != 2:
        raise FinetuneError(f"wise: give two ingredients, PRETRAINED_REF FINETUNED_CHECKPOINT (got {len(inputs)}), "
                            "e.g. finetune soup --method wise B_16 runs/x/epoch-007.safetensors")
    pretrained, finetuned = str(inputs[0]), Path(inputs[1])
    if finetuned.is_dir():
        finetuned = best_checkpoints(finetuned)[0]
    elif not finetuned.is_file():
        raise FinetuneError(f"{finetuned}: no such fine-tuned checkpoint file or run directory")
    meta = _finetune_meta(finetuned)
    target = Path(out) if out is not None else finetuned.parent / "soup-wise.safetensors"
    if target.suffix != ".safetensors":
        raise FinetuneError(f"{target}: the output must be a .safetensors file, e.g. "
                            f"{target.with_suffix('.safetensors')}")
    if target.resolve() == finetuned.resolve() or (Path(pretrained).is_file()
                                                   and target.resolve() == Path(pretrained).resolve()):
        raise FinetuneError(f"{target}: is one of the ingredients; write the soup to another file with -o")
    target = refuse_to_overwrite(target, force)
    own_scorer = score_fn is None
    if own_scorer:
        score_fn = state_scorer(finetuned, recipe, split, device)
    tensors, info = wise_soup(pretrained, finetuned, check_alphas(alphas), score_fn)
    del score_fn
    reported = _report(tensors, split, info["score"] is not None, own_scorer, report_fn, finetuned, recipe, device)
    pretrained_name = (_relative_to(Path(pretrained), target.parent) if Path(pretrained).is_file() else pretrained)
    ingredients = [{"path": pretrained_name, "role": "pretrained",
                    **({"sha256": file_sha256(Path(pretrained))} if Path(pretrained).is_file() else {})},
                   {"path": _relative_to(finetuned, target.parent), "role": "finetuned", "sha256": file_sha256(finetuned),
                    "val_top1": (meta.get("metrics") or {}).get("val_top1")}]
    record = {"method": "wise", "weights": info["weights"], "split": split, "ingredients": ingredients,
              "pretrained": pretrained_name, "alpha": info["alpha"], "alphas": info["alphas"], "scores": info["scores"]}
    if reported is not None:
        record["report_split"] = "test"
    result = {k: meta.get(k) for k in CARRIED_FIELDS if k in meta}
    result.update(source="soup", epoch=None, metrics=_metrics(split, info["score"], reported, meta), soup=record)
    return write_checkpoint(target, tensors, result)


def _check_options(method: str, weights, split: str, evaluate: Optional[bool], alphas=None,
                   allow_test_selection: bool = False) -> None:
    if method not in METHODS:
        raise FinetuneError(f"method: unknown value {method!r}; expected one of {', '.join(METHODS)}")
    if split not in SPLITS:
        raise FinetuneError(f"split: unknown value {split!r}; expected one of {', '.join(SPLITS)}")
    if method in SELECTING and split == "test" and not allow_test_selection:
        raise FinetuneError(f"--split test: {method} selects on the split it scores, so its score there would be "
                            "optimistic; select on val (the test score is then reported beside it), or pass "
                            "--allow-test-selection if you really mean to choose on test")
    if method != "uniform" and weights is not None:
        raise FinetuneError(f"weights: only the uniform method takes weights; {method} chooses its own")
    if method != "wise" and alphas is not None:
        raise FinetuneError("--alpha: only the wise method takes alphas (--method wise PRETRAINED_REF CHECKPOINT)")
    if method in SELECTING and evaluate is False:
        raise FinetuneError(f"{method} soups are built by scoring on a split; drop --no-eval or use --method uniform")


def _wants_score(method: str, recipe: Any, first_meta: Dict[str, Any], evaluate: Optional[bool]) -> bool:
    if method in SELECTING or evaluate:
        return True
    return evaluate is None and (recipe is not None or bool(first_meta.get("recipe")))


def _report(tensors: StateDict, split: str, scored: bool, own_scorer: bool, report_fn: Optional[ScoreFn],
            vessel: Path, recipe: Any, device: Optional[str]) -> Optional[float]:
    """The soup's test top-1 when it was scored on val: by `report_fn`, or (when the scorer was ours)
    on the recipe's test split if the data has one. None otherwise."""
    if split != "val" or not scored:
        return None
    if report_fn is not None:
        return _score(report_fn, tensors, vessel)
    if not own_scorer:
        return None  # a caller's own scorer: we cannot know its data's test split
    return test_top1(tensors, vessel, recipe, device)


def test_top1(tensors: StateDict, vessel: Path, recipe: Any = None, device: Optional[str] = None) -> Optional[float]:
    """Top-1 of the state dict `tensors` on the test split of `vessel`'s (or `recipe`'s) data, in
    `vessel`'s model; None when that data has no test split."""
    resolved = recipe_for(vessel, recipe)
    model = load_for_scoring(vessel, device)
    config = data_config_of(model)
    if build_splits(resolved, config["input_size"][-1], config, augment="none").test is None:
        return None
    model.load_state_dict(tensors)
    return tasks.ranking_value(split_scorer(model, resolved, "test")(), tasks.of_model(model).metric)


def _metrics(split: Optional[str], score: Optional[float], reported: Optional[float],
             meta: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """`val_top1`/`test_top1`, or `val_mAP`/`test_mAP` for a multi-label soup (its task's metric)."""
    metric = tasks.of_meta(meta or {}).metric
    metrics = {f"{split}_{metric}": score} if split is not None and score is not None else {}
    if reported is not None:
        metrics[f"test_{metric}"] = reported
    return metrics


def _output_path(inputs: List, paths: List[Path], out, method: str) -> Path:
    if out is None:
        first = Path(inputs[0])
        folder = first if first.is_dir() else first.parent
        out = folder / ("soup.safetensors" if method == "uniform" else f"soup-{method}.safetensors")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise FinetuneError(f"{out}: the output must be a .safetensors file, e.g. {out.with_suffix('.safetensors')}")
    if any(out.resolve() == p.resolve() for p in paths):
        raise FinetuneError(f"{out}: is one of the ingredients; write the soup to another file with -o")
    return out


def _soup_meta(metas: List[Dict[str, Any]], paths: List[Path], out: Path, info: Dict[str, Any],
               split: Optional[str], score: Optional[float], reported: Optional[float] = None,
               skipped: Sequence[Dict[str, str]] = ()) -> Dict[str, Any]:
    meta = {k: metas[0].get(k) for k in CARRIED_FIELDS if k in metas[0]}
    scores = info.get("scores") or [None] * len(paths)
    ingredients = [{"path": _relative_to(p, out.parent), "sha256": file_sha256(p),
                    "val_top1": (m.get("metrics") or {}).get("val_top1"),
                    **({"score": s} if s is not None else {})} for p, m, s in zip(paths, metas, scores)]
    soup = {"method": info["method"], "weights": info["weights"], "split": split, "ingredients": ingredients}
    if reported is not None:
        soup["report_split"] = "test"
    if info["method"] == "greedy":
        soup["kept"] = [_relative_to(Path(p), out.parent) for p in info["kept"]]
        soup["rejected"] = [_relative_to(Path(p), out.parent) for p in info["rejected"]]
    if skipped:
        soup["skipped"] = [{"run": _relative_to(Path(s["run"]), out.parent), "reason": s["reason"]} for s in skipped]
    meta.update(source="soup", epoch=None, metrics=_metrics(split, score, reported, metas[0]), soup=soup)
    return meta


def _relative_to(path: Path, folder: Path) -> str:
    # Relative to the soup's folder, so a run directory can be moved with its soups intact.
    return os.path.relpath(path.resolve(), folder.resolve())


# ------------------------------------------------------------------------------------------ report
def describe_soup(path: Path) -> List[str]:
    """The report printed after a soup is written, from its own metadata."""
    meta = read_meta(path)
    soup = meta["soup"]
    metrics = meta.get("metrics") or {}
    if soup["method"] == "stock":
        lines = _describe_stock(path, soup)
    elif soup["method"] == "learned":
        lines = _describe_learned(path, soup)
    elif soup["method"] == "wise":
        lines = [f"wrote {path} (WiSE-FT of {soup['pretrained']} and {soup['ingredients'][-1]['path']})",
                 f"  {'alpha':>6} {soup['split'] or 'score':>8}"]
        lines += [f"  {a:>6.3f} {fraction(s):>8}" + ("  <- written" if a == soup["alpha"] else "")
                  for a, s in zip(soup["alphas"], soup["scores"])]
    else:
        width = max([40] + [len(entry["path"]) for entry in soup["ingredients"]])
        lines = [f"wrote {path} ({soup['method']} soup of {len(soup['ingredients'])} checkpoints)",
                 f"  {'ingredient':{width}} {'val_top1':>8} {'score':>8} {'weight':>7}"]
        for entry, weight in zip(soup["ingredients"], soup["weights"]):
            lines.append(f"  {entry['path']:{width}} {fraction(entry.get('val_top1')):>8} "
                         f"{fraction(entry.get('score')):>8} {weight:>7.3f}")
    if "kept" in soup:
        lines.append(f"kept: {', '.join(soup['kept'])}")
        lines.append(f"rejected: {', '.join(soup.get('rejected') or []) or 'none'}")
    for entry in soup.get("skipped") or []:
        lines.append(f"skipped: {entry['run']} ({entry['reason']})")
    score = metrics.get(f"{soup['split']}_top1") if soup.get("split") else None
    if score is None:
        lines.append("soup not scored")
        return lines
    chosen = " (selection split)" if soup["method"] in SELECTING else ""
    lines.append(f"soup {soup['split']} top-1: {fraction(score)}{chosen}")
    reported = metrics.get(f"{soup['report_split']}_top1") if soup.get("report_split") else None
    if reported is not None:
        lines.append(f"soup {soup['report_split']} top-1: {fraction(reported)} (reported)")
    return lines + _ensemble_lines(soup)
