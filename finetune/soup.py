"""Model soups (Wortsman et al. 2022): average the weights of fine-tunes of one pretrained model.

    make_soup(["runs/pets37-20240101-120000"], method="greedy")   # -> runs/.../soup-greedy.safetensors

Ingredients are checkpoint files, or run directories (their kept best checkpoints, from
`best.json`). They are checked from headers alone (same tensors, shapes, architecture, classes)
before any weights are read.

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

The output is an ordinary checkpoint (loads with `finetune.load_model`) whose metadata is the
first ingredient's plus `source: "soup"` and a `soup` record of the method and ingredients.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open

from .checkpoints import StateDict, read_checkpoint, read_meta, refuse_to_overwrite, tensor_shapes, write_checkpoint
from .errors import FinetuneError
from .evaluation import ScoreFn, fraction, state_scorer
from .rundir import SPLITS, best_checkpoints

METHODS = ("uniform", "greedy")
MATCHING_FIELDS = ("arch", "num_classes", "class_names")
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# ------------------------------------------------------------------------------------- ingredients
def resolve_ingredients(inputs: Iterable[str | os.PathLike]) -> List[Path]:
    """Checkpoint files as given; run directories expand to their best checkpoints, best first."""
    paths: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            paths.extend(best_checkpoints(path))
        elif path.is_file():
            paths.append(path)
        else:
            raise FinetuneError(f"{path}: no such checkpoint file or run directory")
    if not paths:
        raise FinetuneError("no ingredients given; pass checkpoint files or run directories")
    return paths


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


# ------------------------------------------------------------------------------------------ soups
def make_soup(inputs: Iterable[str | os.PathLike], out: Optional[str | os.PathLike] = None,
              method: str = "uniform", weights: Optional[Sequence[float]] = None, recipe: Any = None,
              split: str = "val", score_fn: Optional[ScoreFn] = None, evaluate: Optional[bool] = None,
              device: Optional[str] = None, force: bool = False) -> Path:
    """Soup the ingredients `inputs` into a checkpoint at `out`; return its path.

    Scoring uses `score_fn`, else `evaluation.state_scorer` with the first ingredient as the
    vessel and `recipe` (a Recipe, a recipe name or path) or the ingredients' stored recipe, on
    `device` (default CUDA when present). Greedy always scores; uniform scores when it can, unless
    `evaluate=False` (`evaluate=True` makes a missing recipe an error).
    """
    _check_options(method, weights, split, evaluate)
    inputs = list(inputs)
    paths = resolve_ingredients(inputs)
    metas = validate_ingredients(paths)
    out = refuse_to_overwrite(_output_path(inputs, paths, out, method), force)
    if evaluate is False:
        score_fn = None
    elif score_fn is None and _wants_score(method, recipe, metas[0], evaluate):
        score_fn = state_scorer(paths[0], recipe, split, device)
    if method == "greedy":
        tensors, info = greedy_soup(paths, score_fn)
        score = info["score"]
    else:
        tensors, info = uniform_soup(paths, weights)
        score = _score(score_fn, tensors, out) if score_fn else None
    meta = _soup_meta(metas, paths, out, info, split if score is not None else None, score)
    return write_checkpoint(out, tensors, meta)


def _check_options(method: str, weights, split: str, evaluate: Optional[bool]) -> None:
    if method not in METHODS:
        raise FinetuneError(f"method: unknown value {method!r}; expected one of {', '.join(METHODS)}")
    if split not in SPLITS:
        raise FinetuneError(f"split: unknown value {split!r}; expected one of {', '.join(SPLITS)}")
    if method == "greedy" and weights is not None:
        raise FinetuneError("weights: only the uniform method takes weights; greedy weighs its kept ingredients equally")
    if method == "greedy" and evaluate is False:
        raise FinetuneError("greedy soups are built by scoring on a split; drop --no-eval or use --method uniform")


def _wants_score(method: str, recipe: Any, first_meta: Dict[str, Any], evaluate: Optional[bool]) -> bool:
    if method == "greedy" or evaluate:
        return True
    return evaluate is None and (recipe is not None or bool(first_meta.get("recipe")))


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
               split: Optional[str], score: Optional[float]) -> Dict[str, Any]:
    meta = {k: metas[0].get(k) for k in ("arch", "num_classes", "class_names", "img_size", "data_config",
                                         "recipe")}
    scores = info.get("scores") or [None] * len(paths)
    ingredients = [{"path": _relative_to(p, out.parent), "sha256": sha256_of(p),
                    "val_top1": (m.get("metrics") or {}).get("val_top1"),
                    **({"score": s} if s is not None else {})} for p, m, s in zip(paths, metas, scores)]
    soup = {"method": info["method"], "weights": info["weights"], "split": split, "ingredients": ingredients}
    if info["method"] == "greedy":
        soup["kept"] = [_relative_to(Path(p), out.parent) for p in info["kept"]]
    meta.update(source="soup", epoch=None, metrics={f"{split}_top1": score} if score is not None else {},
                soup=soup)
    return meta


def _relative_to(path: Path, folder: Path) -> str:
    # Relative to the soup's folder, so a run directory can be moved with its soups intact.
    return os.path.relpath(path.resolve(), folder.resolve())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ report
def describe_soup(path: Path) -> List[str]:
    """The report printed after a soup is written, from its own metadata."""
    meta = read_meta(path)
    soup = meta["soup"]
    lines = [f"wrote {path} ({soup['method']} soup of {len(soup['ingredients'])} checkpoints)",
             f"  {'ingredient':40} {'val_top1':>8} {'score':>8} {'weight':>7}"]
    for entry, weight in zip(soup["ingredients"], soup["weights"]):
        lines.append(f"  {entry['path']:40} {fraction(entry.get('val_top1')):>8} "
                     f"{fraction(entry.get('score')):>8} {weight:>7.3f}")
    if "kept" in soup:
        lines.append(f"kept: {', '.join(soup['kept'])}")
    score = (meta.get("metrics") or {}).get(f"{soup['split']}_top1")
    lines.append(f"soup {soup['split']} top-1: {fraction(score)}" if score is not None else "soup not scored")
    return lines
