"""Compare runs, soups and checkpoints side by side in one table.

    rows = collect_rows()                      # every run directory under runs/, and their soups
    print(format_table(rows, "markdown", sort="best_val_top1"))

A row is a plain dict (ROW_KEYS). Everything is read from small files and checkpoint headers
(never the weights): a run's recipe.yaml, metrics.jsonl, best.json, results.json and status.json,
a checkpoint's metadata and tensor shapes. A run whose files are missing or cut short (a crash
mid-write) still gets a row, marked in `status` and `notes`; the table never fails on one run.

Scores added by `evaluate_missing` (`--eval`) go to the folder's results.json: a run's best
checkpoint under the split's name (`{"test": {"top1", "top5", "loss", "checkpoint"}}`, as eval
writes it), any other checkpoint of the folder (a soup) under `{"checkpoints": {FILE: {SPLIT: ...}}}`,
an ensemble under `{"ensembles": {"a.safetensors + b.safetensors": {SPLIT: ...}}}`.

Ensembles, the reference a soup approaches: every soup of k >= 2 fine-tunes among the rows brings
a row of kind `ensemble` right after it, the logit ensemble (mean of logits, k forward passes an
image) of its ingredients as its metadata lists them (one row per distinct set of ingredients),
scored from the soup's own `ensemble` record when the soup has one, else from results.json, else
by `--eval`. `ensemble=True` (`compare --ensemble`) adds the ensemble of the checkpoints given
that are not soups (checkpoint files, and each run's best checkpoint).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import rundir
from .checkpoints import read_meta, tensor_shapes
from .errors import FinetuneError
from .ensemble import ensemble_on_split
from .evaluation import evaluate_on_split, fraction
from .rundir import SPLITS

FORMATS = ("markdown", "csv", "json")
ROW_KEYS = ("name", "kind", "task", "model", "recipe", "dataset", "img_size", "epochs", "best_val_top1", "best_epoch",
            "test_top1", "best_val_mAP", "test_mAP", "test_f1_micro", "test_f1_macro", "params", "images_per_s",
            "ingredients", "status", "notes", "path", "checkpoint", "members")
TABLE_COLUMNS = (  # (header, row key)
    ("run", "name"), ("kind", "kind"), ("model", "model"), ("recipe", "recipe"), ("dataset", "dataset"),
    ("img", "img_size"), ("epochs", "epochs"), ("best val top-1 (epoch)", "best_val_top1"),
    ("test top-1", "test_top1"), ("best val mAP (epoch)", "best_val_mAP"), ("test mAP", "test_mAP"),
    ("test F1 micro / macro", "test_f1_micro"), ("params (M)", "params"), ("img/s", "images_per_s"),
    ("ingredients/notes", "notes"))
# A table shows the columns of the tasks its rows have: top-1 for classification, mAP and F1 for multi-label.
TASK_COLUMNS = {"classification": ("best_val_top1", "test_top1"),
                "multilabel": ("best_val_mAP", "test_mAP", "test_f1_micro")}
SORT_KEYS = ("name", "kind", "model", "recipe", "dataset", "img_size", "epochs", "best_val_top1", "best_epoch",
             "test_top1", "best_val_mAP", "test_mAP", "test_f1_micro", "test_f1_macro", "params", "images_per_s",
             "status")
SORT_ALIASES = {"run": "name", "img": "img_size", "val": "best_val_top1", "val_top1": "best_val_top1",
                "test": "test_top1", "img/s": "images_per_s", "mAP": "best_val_mAP", "val_mAP": "best_val_mAP",
                "f1": "test_f1_micro"}
DESCENDING = {"best_val_top1", "test_top1", "best_val_mAP", "test_mAP", "test_f1_micro", "test_f1_macro",
              "images_per_s"}  # bigger is better: best first
TTA_KEYS = ("tta", "tta_split", "tta_top1")  # in rows scored with --eval --tta only; then a column too
TTA_COLUMNS = (("TTA top-1", "tta_top1"), ("TTA mAP", "tta_mAP"))  # the second for multi-label rows
Evaluator = Callable[[Path, str], Dict[str, Any]]
EnsembleEvaluator = Callable[[Sequence[Path], str], Dict[str, Any]]


# ------------------------------------------------------------------------------------------- rows
def collect_rows(inputs: Optional[Iterable[str | os.PathLike]] = None, runs_dir: str | os.PathLike = "runs",
                 ensemble: bool = False) -> List[Dict[str, Any]]:
    """One row per run directory and per checkpoint (soups of a run directory included), and the
    ensemble rows (see the module docstring; `ensemble`: also the ensemble of the checkpoints given)."""
    rows = _collect_rows(inputs, runs_dir)
    return with_ensemble_rows(rows, given=ensemble)


def _collect_rows(inputs: Optional[Iterable[str | os.PathLike]] = None, runs_dir: str | os.PathLike = "runs"
                  ) -> List[Dict[str, Any]]:
    inputs = list(inputs or []) or rundir.run_dirs(Path(runs_dir))
    rows = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and rundir.is_folder_of_runs(path):  # a sweep's or demo's folder: its runs
            rows.extend(_collect_rows([p for p in sorted(path.iterdir()) if p.is_dir() and rundir.is_run_dir(p)]))
            rows.extend(checkpoint_row(soup) for soup in sorted(path.glob("soup*.safetensors")))
        elif path.is_dir():
            rows.append(run_row(path))
            rows.extend(checkpoint_row(soup) for soup in sorted(path.glob("soup*.safetensors")))
        elif path.is_file():
            rows.append(checkpoint_row(path))
        else:
            raise FinetuneError(f"{path}: no such run directory or checkpoint file")
    return rows


def _empty_row(name: str, kind: str, path: Path) -> Dict[str, Any]:
    row: Dict[str, Any] = dict.fromkeys(ROW_KEYS)
    row.update(name=name, kind=kind, path=str(path), notes=[])
    return row


def run_row(run_dir: Path) -> Dict[str, Any]:
    """A run directory's row; missing or damaged files become notes, never errors."""
    row = _empty_row(run_dir.name, "run", run_dir)
    notes: List[str] = row["notes"]
    recipe = rundir.read_recipe(run_dir, notes)
    records = rundir.read_metrics(run_dir, notes)
    best = rundir.best_entries(run_dir, notes)
    results = rundir.read_results(run_dir)
    status = rundir.read_status(run_dir)
    checkpoint = rundir.main_checkpoint(run_dir)
    meta = _safe_meta(checkpoint, notes) if checkpoint else {}
    recipe = recipe or meta.get("recipe") or {}
    row.update(_recipe_fields(recipe), checkpoint=str(checkpoint) if checkpoint else None,
               epochs=len(records) if records else None, images_per_s=_mean(r.get("images_per_s") for r in records))
    row["img_size"] = _first_present(row["img_size"], meta.get("img_size"))
    row["model"] = _first_present(row["model"], meta.get("source"))
    row["task"] = meta.get("task") or recipe.get("task") or "classification"
    metric = "mAP" if row["task"] == "multilabel" else "top1"
    row[f"best_val_{metric}"], row["best_epoch"] = _best_val(records, best, results, metric)
    test = _run_result(results.get("test"))
    row[f"test_{metric}"] = _first_present(test.get(metric), (meta.get("metrics") or {}).get(f"test_{metric}"))
    if metric == "mAP":
        row.update(test_f1_micro=test.get("f1_micro"), test_f1_macro=test.get("f1_macro"))
    row["params"] = _safe_params(checkpoint) if checkpoint else None
    row["status"] = _run_status(status, run_dir, notes)
    row.update(_tta_fields(results))
    return row


def checkpoint_row(path: Path) -> Dict[str, Any]:
    """A checkpoint file's row (kind "soup" for soups); an unreadable file is a row with a note."""
    row = _empty_row(f"{path.parent.name}/{path.name}", "checkpoint", path)
    row["checkpoint"] = str(path)
    try:
        meta = read_meta(path)
        row["params"] = _params(path)
    except FinetuneError as e:
        row.update(status="unreadable", notes=[str(e)])
        return row
    # A checkpoint saved without its recipe still sits beside the run's recipe.yaml.
    recipe = meta.get("recipe") or rundir.read_recipe(path.parent)
    metrics = meta.get("metrics") or {}
    stored = rundir.stored_results(path)
    task = meta.get("task") or (recipe or {}).get("task") or "classification"
    metric = "mAP" if task == "multilabel" else "top1"
    stored_test = stored.get("test") if isinstance(stored.get("test"), dict) else {}
    stored_val = stored.get("val") if isinstance(stored.get("val"), dict) else {}
    row.update(_recipe_fields(recipe), task=task, img_size=meta.get("img_size"), best_epoch=meta.get("epoch"),
               **{f"best_val_{metric}": metrics.get(f"val_{metric}", stored_val.get(metric)),
                  f"test_{metric}": metrics.get(f"test_{metric}", stored_test.get(metric))}, **_tta_fields(stored))
    if metric == "mAP":
        row.update(test_f1_micro=stored_test.get("f1_micro"), test_f1_macro=stored_test.get("f1_macro"))
    if meta.get("source") == "soup":
        row.update(_soup_fields(meta.get("soup") or {}), kind="soup")
    else:
        row.update(model=_first_present(row["model"], meta.get("source")), status="checkpoint")
    return row


def _soup_fields(soup: Dict[str, Any]) -> Dict[str, Any]:
    names = [_short_name(i.get("path", "?")) for i in soup.get("ingredients", [])]
    notes = [f"{soup.get('method', '?')} soup of {', '.join(names)}"]
    if soup.get("kept") is not None:
        notes.append(f"kept {', '.join(_short_name(k) for k in soup['kept'])}")
    return {"ingredients": names, "status": f"{soup.get('method', '?')} soup", "notes": notes}


def _short_name(path: str) -> str:
    return path[:-len(".safetensors")] if path.endswith(".safetensors") else path


def _recipe_fields(recipe: Any) -> Dict[str, Any]:
    if not isinstance(recipe, dict):
        return {}
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    return {"model": recipe.get("model") or None, "recipe": recipe.get("name") or None,
            "dataset": data.get("dataset"), "img_size": recipe.get("img_size")}


# ------------------------------------------------------------------------------------- ensembles
def with_ensemble_rows(rows: Sequence[Dict[str, Any]], given: bool = False) -> List[Dict[str, Any]]:
    """`rows` with an `ensemble` row after each soup of k >= 2 fine-tunes (one per set of
    ingredients) and, with `given`, one for the non-soup checkpoints of the rows."""
    out: List[Dict[str, Any]] = []
    seen = {_members_key(r.get("members") or []) for r in rows if r["kind"] == "ensemble"}
    for row in rows:
        out.append(row)
        if row["kind"] != "soup":
            continue
        members, record = soup_members(Path(row["path"]))
        if len(members) < 2 or _members_key(members) in seen:
            continue
        seen.add(_members_key(members))
        out.append(ensemble_row(members, Path(row["path"]).parent, [row], record, out))
    if given:
        sources = [r for r in rows if r["kind"] in ("run", "checkpoint") and r.get("checkpoint")]
        members = [Path(r["checkpoint"]) for r in sources]
        if len(members) < 2:
            raise FinetuneError(f"--ensemble: {len(members)} checkpoint among the inputs (runs' best checkpoints and "
                                "checkpoint files, soups aside); an ensemble needs at least two")
        if _members_key(members) not in seen:
            home = Path(os.path.commonpath([str(m.resolve().parent) for m in members]))
            out.append(ensemble_row(members, home, sources, None, out))
    return out


def soup_members(path: Path) -> Tuple[List[Path], Optional[Dict[str, Any]]]:
    """The fine-tuned ingredients of a soup as its metadata lists them (the pretrained weights of
    wise and stock aside), and its `ensemble` record if it has one; ([], None) for an unreadable soup."""
    try:
        soup = read_meta(path).get("soup") or {}
    except FinetuneError:
        return [], None
    entries = [e for e in soup.get("ingredients") or [] if isinstance(e, dict) and e.get("role") != "pretrained"]
    members = [Path(path).parent / str(e.get("path")) for e in entries if e.get("path")]
    record = soup.get("ensemble")
    return members, record if isinstance(record, dict) else None


def _members_key(members: Iterable[Any]) -> Tuple[str, ...]:
    return tuple(sorted(os.path.realpath(str(m)) for m in members))


def _stored_key(members: Sequence[Path], home: Path) -> str:
    return " + ".join(sorted(os.path.relpath(os.path.realpath(str(m)), os.path.realpath(str(home))) for m in members))


def ensemble_row(members: Sequence[Path], home: Path, sources: Sequence[Dict[str, Any]],
                 record: Optional[Dict[str, Any]], taken: Sequence[Dict[str, Any]] = ()) -> Dict[str, Any]:
    """The row of the logit ensemble of `members`, scored from `record` (a soup's) or the
    results.json of `home` (where `--eval` stores it)."""
    k = len(members)
    name = f"{home.name}/ensemble of {k}"
    names = {r["name"] for r in taken}
    if name in names:
        name = next(f"{name} ({i})" for i in range(2, len(names) + 3) if f"{name} ({i})" not in names)
    row = _empty_row(name, "ensemble", home)
    short = [_short_name(os.path.relpath(os.path.realpath(str(m)), os.path.realpath(str(home)))) for m in members]
    first = sources[0] if sources else {}
    params = [r.get("params") for r in sources]
    row.update(model=first.get("model"), recipe=first.get("recipe"), dataset=first.get("dataset"),
               img_size=first.get("img_size"), ingredients=short, members=[str(m) for m in members],
               status=f"logit ensemble of {k}",
               params=(params[0] * k if len(sources) == 1 and params[0] else
                       sum(params) if params and all(isinstance(p, int) for p in params) else None))
    row["notes"] = [f"logit ensemble (mean of logits) of {', '.join(short)}: {k} forward passes an image"]
    missing = [m for m in members if not Path(m).is_file()]
    if missing:
        row["status"] = "ingredient missing"
        row["notes"].append(f"missing {missing[0]}")
    stored = (rundir.read_results(home).get("ensembles") or {}).get(_stored_key(members, home)) or {}
    record = record or {}
    row["task"] = first.get("task") or "classification"
    metric = "mAP" if row["task"] == "multilabel" else "top1"
    scored = {on: stored.get(on) if isinstance(stored.get(on), dict) else {} for on in ("val", "test")}
    row[f"best_val_{metric}"] = _first_present(record.get(f"val_{metric}"), scored["val"].get(metric))
    row[f"test_{metric}"] = _first_present(record.get(f"test_{metric}"), scored["test"].get(metric))
    return row


def store_ensemble_result(home: Path, members: Sequence[Path], split: str, result: Dict[str, Any]) -> Path:
    """Merge an ensemble's score into `home`'s results.json, atomically."""
    results_path = Path(home) / rundir.RESULTS
    problems: List[str] = []
    results = rundir.read_document(results_path, problems) if results_path.is_file() else {}
    if problems:
        raise FinetuneError(f"{results_path}: not a readable JSON object; fix or delete it before --eval")
    keys = ("mAP", "f1_micro", "f1_macro", "threshold") if "mAP" in result else ("top1", "top5")
    entry = {k: result.get(k) for k in keys + ("loss", "n", "forward_passes")}
    results.setdefault("ensembles", {}).setdefault(_stored_key(members, home), {})[split] = entry
    return rundir.write_json(results_path, results)


# ---------------------------------------------------------------------------------------- reading
def _safe_meta(path: Path, notes: List[str]) -> Dict[str, Any]:
    try:
        return read_meta(path)
    except FinetuneError:
        notes.append(f"unreadable {path.name}")
        return {}


def _safe_params(path: Path) -> Optional[int]:
    try:
        return _params(path)
    except FinetuneError:
        return None  # already noted by _safe_meta


def _params(path: Path) -> int:
    return sum(math.prod(shape) for shape, _ in tensor_shapes(path).values())


def _best_val(records: List[Dict[str, Any]], entries: List[Dict[str, Any]], results: Dict[str, Any],
              metric: str = "top1") -> Tuple[Optional[float], Optional[int]]:
    # metrics.jsonl may be cut short and best.json may rank by another metric: take the best of both.
    candidates = [(r.get(f"val_{metric}"), r.get("epoch")) for r in records + entries]
    candidates = [(v, e) for v, e in candidates if isinstance(v, (int, float))]
    if candidates:
        return max(candidates, key=lambda c: c[0])
    return _run_result(results.get("val")).get(metric), None


def _run_result(result: Any) -> Dict[str, Any]:
    # `finetune eval` of a soup records it under the split too; that score is the soup's row's, not the run's.
    if not isinstance(result, dict) or Path(str(result.get("checkpoint") or "")).match("soup*.safetensors"):
        return {}
    return result


def _tta_fields(results: Dict[str, Any]) -> Dict[str, Any]:
    """tta, tta_split and tta_top1 (multi-label: tta_mAP) of the test (else val) score stored with
    TTA; {} when none was."""
    for split in ("test", "val"):
        entry = _run_result(results.get(split))
        for metric in ("top1", "mAP"):
            if entry.get(metric) is not None and isinstance(entry.get(f"{metric}_tta"), (int, float)):
                return {"tta": entry.get("tta"), "tta_split": split, f"tta_{metric}": entry[f"{metric}_tta"]}
    return {}


def _top1(result: Any) -> Optional[float]:
    return result.get("top1") if isinstance(result, dict) else None


def _first_present(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _mean(values: Iterable[Any]) -> Optional[float]:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return sum(numbers) / len(numbers) if numbers else None


def _run_status(status: Dict[str, Any], run_dir: Path, notes: List[str]) -> str:
    if isinstance(status.get("state"), str):
        return status["state"]
    if not (run_dir / "metrics.jsonl").is_file():
        return "no metrics"
    return "partial" if notes else "unknown"


# ---------------------------------------------------------------------------------------- eval
def evaluate_missing(rows: Sequence[Dict[str, Any]], split: str = "test",
                     evaluator: Optional[Evaluator] = None, device: Optional[str] = None,
                     tta: Optional[str] = None, ensemble_evaluator: Optional[EnsembleEvaluator] = None
                     ) -> List[Dict[str, Any]]:
    """Score on `split` every row's checkpoint that has no score there yet; store it in results.json.

    `evaluator(checkpoint_path, split)` returns {"top1", "top5", "loss"}; by default
    `evaluation.evaluate_on_split` scores the checkpoint on its recipe's dataset, on `device`.
    With `tta` (a `calibration.TTA_MODES` name) the default is `calibration.evaluate_calibrated`,
    which adds `top1_tta`, and a row counts as missing until it has a score with that TTA there.
    Ensemble rows are scored by `ensemble_evaluator(members, split)` (default
    `ensemble.ensemble_on_split`, k forward passes over the split) into the results.json of their
    folder; a caller's own `evaluator` without an `ensemble_evaluator` leaves them as they are.
    Returns what was done, row by row.
    """
    if split not in SPLITS:
        raise FinetuneError(f"split: unknown value {split!r}; expected one of {', '.join(SPLITS)}")
    if tta is not None:
        from .calibration import evaluate_calibrated, tta_views
        tta_views(tta)  # an unknown mode fails before any evaluation runs
        evaluator = evaluator or (lambda checkpoint, on: evaluate_calibrated(checkpoint, split=on, device=device,
                                                                             store=False, tta=tta))
    if ensemble_evaluator is None and evaluator is None:
        ensemble_evaluator = lambda members, on: ensemble_on_split(members, split=on, device=device)  # noqa: E731
    evaluator = evaluator or (lambda checkpoint, on: evaluate_on_split(checkpoint, split=on, device=device,
                                                                       store=False))
    done = []
    for row in rows:
        metric = "mAP" if row.get("task") == "multilabel" else "top1"
        score_key = f"test_{metric}" if split == "test" else f"best_val_{metric}"
        if row.get(score_key) is not None and (tta is None or (row.get("tta"), row.get("tta_split")) == (tta, split)):
            continue
        if row["kind"] == "ensemble":
            done.extend(_evaluate_ensemble(row, split, ensemble_evaluator))
            continue
        if not row.get("checkpoint"):
            done.append({"name": row["name"], "skipped": "no checkpoint to evaluate"})
            continue
        checkpoint = Path(row["checkpoint"])
        result = evaluator(checkpoint, split)
        rundir.store_result(checkpoint, split, result, as_run=row["kind"] == "run")
        done.append({"name": row["name"], "checkpoint": str(checkpoint), "split": split,
                     **{k: result[k] for k in ("top1", "mAP") if k in result},
                     **({k: result.get(k) for k in ("top1_tta", "mAP_tta") if k in result} if tta else {})})
    return done



def _evaluate_ensemble(row: Dict[str, Any], split: str, ensemble_evaluator: Optional[EnsembleEvaluator]
                       ) -> List[Dict[str, Any]]:
    if ensemble_evaluator is None:
        return []
    members = [Path(m) for m in row.get("members") or []]
    missing = [m for m in members if not m.is_file()]
    if missing:
        return [{"name": row["name"], "skipped": f"ingredient {missing[0]} is missing"}]
    result = ensemble_evaluator(members, split)
    store_ensemble_result(Path(row["path"]), members, split, result)
    return [{"name": row["name"], "members": [str(m) for m in members], "split": split, "top1": result.get("top1")}]

# ---------------------------------------------------------------------------------------- table
def sort_key_of(column: Optional[str]) -> Optional[str]:
    """The row key a --sort value names (a row key or a short table name), or a one-line error."""
    if column is None:
        return None
    key = SORT_ALIASES.get(column, column)
    if key not in SORT_KEYS:
        raise FinetuneError(f"--sort: unknown column {column!r}; expected one of {', '.join(SORT_KEYS)} "
                            f"(or {', '.join(SORT_ALIASES)})")
    return key


def sort_rows(rows: Sequence[Dict[str, Any]], column: Optional[str]) -> List[Dict[str, Any]]:
    """Rows ordered by `column` (accuracies and img/s best first); rows without a value last."""
    key = sort_key_of(column)
    if key is None:
        return list(rows)
    present = [r for r in rows if r.get(key) is not None]
    missing = [r for r in rows if r.get(key) is None]
    present.sort(key=lambda r: _sortable(r[key]), reverse=key in DESCENDING)
    return present + missing


def _sortable(value: Any) -> Tuple[int, Any]:
    # Numbers before text, so a malformed value (a string img_size) cannot break the sort.
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def format_table(rows: Sequence[Dict[str, Any]], fmt: str = "markdown", sort: Optional[str] = None) -> str:
    """The rows as a markdown table, CSV or JSON text."""
    if fmt not in FORMATS:
        raise FinetuneError(f"--format: unknown value {fmt!r}; expected one of {', '.join(FORMATS)}")
    rows = sort_rows(rows, sort)
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if fmt == "csv":
        return _csv(rows)
    return _markdown(rows)


def _markdown(rows: Sequence[Dict[str, Any]]) -> str:
    columns = table_columns(rows) + tta_columns(rows)
    lines = ["| " + " | ".join(header for header, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [_cell(row, key).replace("|", "\\|") for _, key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tta_columns(rows: Sequence[Dict[str, Any]]) -> List[Tuple[str, str]]:
    return [(header, key) for header, key in TTA_COLUMNS if any(key in row for row in rows)]


def table_columns(rows: Sequence[Dict[str, Any]]) -> List[Tuple[str, str]]:
    """TABLE_COLUMNS less the score columns of tasks no row has (classification's when none says)."""
    present = {row.get("task") or "classification" for row in rows} or {"classification"}
    hidden = {key for task, keys in TASK_COLUMNS.items() if task not in present for key in keys}
    return [(header, key) for header, key in TABLE_COLUMNS if key not in hidden]


def _cell(row: Dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "test_f1_micro" and value is not None:
        return f"{fraction(value)} / {fraction(row.get('test_f1_macro'))}"
    if key in ("best_val_top1", "best_val_mAP") and value is not None:
        return fraction(value) + (f" ({row['best_epoch']})" if row.get("best_epoch") is not None else "")
    if key == "notes":
        parts = [] if row["kind"] in ("soup", "ensemble") else [row.get("status") or ""]
        return "; ".join(p for p in parts + list(row.get("notes") or []) if p) or "-"
    if value is None:
        return "-"
    if key in ("test_top1", "test_mAP"):
        return fraction(value)
    if key in ("tta_top1", "tta_mAP"):
        return f"{fraction(value)} ({row.get('tta')}, {row.get('tta_split')})"
    if key == "params":
        return f"{value / 1e6:.2f}"
    if key == "images_per_s":
        return f"{value:.1f}"
    return str(value)


def _csv(rows: Sequence[Dict[str, Any]]) -> str:
    buffer = io.StringIO()
    extra = tuple(key for _, key in tta_columns(rows))
    fields = ROW_KEYS + (TTA_KEYS[:2] + extra if extra else ())
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ";".join(row[k]) if isinstance(row.get(k), list) else row.get(k) for k in fields})
    return buffer.getvalue().rstrip("\n")
