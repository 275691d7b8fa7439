"""The run directory: the one module that knows its files, for writing (the engine) and reading
(soup, compare, eval, viz, the CLI).

    recipe.yaml       the resolved recipe (overrides applied, paths made absolute)
    metrics.jsonl     one JSON object per epoch (train/val loss, top-1, top-5, lr, images/s)
    tb/               the same metrics for TensorBoard (when the recipe's `tracking` has tensorboard)
    tracking.json     the ids of the run's MLflow / W&B runs, so that a resume continues them
    last.safetensors  the model after the latest finished epoch, + last.state.pt beside it
                      (optimizer, scheduler, RNG, early-stopping state) for --resume
    epoch-NNN.safetensors   the `keep_best` best epochs by val top-1, indexed by best.json
                      (epoch-NNN-ema.safetensors: the EMA weights of that epoch, ranked alike)
    best.json         {"metric": "val_top1", "keep": K, "checkpoints": [{"epoch", "path", "val_top1"}]}
                      (multi-label runs: "val_mAP" and a "threshold" per checkpoint)
    status.json       {"state": running | finished | stopped_early | failed | interrupted, "pid", ...};
                      a `running` run whose writer has died reads back as `crashed`
    run.lock          held (an OS file lock) by the process writing the run; the kernel releases it
    results.json      scores on a split: the run's best checkpoint under the split's name
                      ({"test": {"top1", "top5", "loss", "n", "checkpoint"}}), any other checkpoint
                      of the folder (a soup) under {"checkpoints": {FILE: {SPLIT: {...}}}}

Readers never fail on a damaged file: `read_document` returns {} and notes why, so a table of
many runs survives one run that crashed mid-write. Writers replace files atomically.

The resume point is `last.state.pt` alone: one file, replaced atomically, holding everything a
resume needs (weights, optimizer, RNGs, sampler position, best index, metrics rows). The engine
writes a ranked epoch's checkpoint before it and derives last.safetensors, best.json and
metrics.jsonl from it after; `repair` redoes that derivation from whatever a kill left.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import yaml

from .checkpoints import atomic_write
from .errors import FinetuneError

RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
BEST = "best.json"
STATUS = "status.json"
RESULTS = "results.json"
LAST = "last.safetensors"
STATE = "last.state.pt"
TENSORBOARD = "tb"
LOCK = "run.lock"
TRACKING = "tracking.json"
SPLITS = ("val", "test")
RESUME_FORMAT = "finetune.resume/2"
EPOCH_CHECKPOINT = re.compile(r"^epoch-(\d+)(-ema)?\.safetensors$")
TEMPORARY = re.compile(r"^\..+\.tmp$")  # what checkpoints.atomic_write leaves if killed mid-write


# ------------------------------------------------------------------------------------- reading
def is_run_dir(path: Path) -> bool:
    return (Path(path) / RECIPE).is_file()


def is_folder_of_runs(path: Path) -> bool:
    """A folder that is not a run itself but holds run directories (a sweep's, a demo's, runs/)."""
    path = Path(path)
    if is_run_dir(path) or (path / BEST).is_file():
        return False
    return any(child.is_dir() and is_run_dir(child) for child in path.iterdir())


def run_dirs(runs_dir: Path) -> List[Path]:
    """The run directories directly under `runs_dir` (hidden folders skipped)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FinetuneError(f"{runs_dir}: no such runs directory; pass run directories or checkpoints, "
                            "or --runs-dir DIR")
    return sorted(p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_document(path: Path, notes: Optional[List[str]] = None,
                  parse: Optional[Callable[[str], Any]] = None) -> Dict[str, Any]:
    """A JSON/YAML mapping, or {} with a note in `notes` saying why not."""
    notes = [] if notes is None else notes
    parse = parse or (yaml.safe_load if Path(path).suffix in (".yaml", ".yml") else json.loads)
    if not path.is_file():
        notes.append(f"no {path.name}")
        return {}
    try:
        value = parse(path.read_text())
    except (ValueError, yaml.YAMLError, OSError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):
        notes.append(f"unreadable {path.name}")
        return {}
    return value


def read_recipe(run_dir: Path, notes: Optional[List[str]] = None) -> Dict[str, Any]:
    return read_document(Path(run_dir) / RECIPE, notes)


def read_status(run_dir: Path) -> Dict[str, Any]:
    """status.json, with a `running` state whose writer has died (its lock is free) as `crashed`."""
    status = read_document(Path(run_dir) / STATUS)
    if status.get("state") == "running" and (Path(run_dir) / LOCK).is_file() and not is_locked(run_dir):
        status = {**status, "state": "crashed",
                  "note": f"was running (pid {status.get('pid', '?')}) and stopped without a word; resume it with "
                          f"finetune train --resume {run_dir}"}
    return status


def read_results(folder: Path, notes: Optional[List[str]] = None) -> Dict[str, Any]:
    return read_document(Path(folder) / RESULTS, notes)


def read_metrics(run_dir: Path, notes: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """The rows of metrics.jsonl; a damaged line becomes a note, never an error."""
    notes = [] if notes is None else notes
    path = Path(run_dir) / METRICS
    if not path.is_file():
        notes.append(f"no {METRICS}")
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            notes.append(f"{METRICS} line {number} unreadable (truncated?)")
    return records


def best_entries(run_dir: Path, notes: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    """best.json's entries (best first), or [] when it is missing or damaged (noted)."""
    entries = read_document(Path(run_dir) / BEST, notes).get("checkpoints")
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def best_checkpoints(run_dir: Path) -> List[Path]:
    """The checkpoints a run's `best.json` lists, best first; a one-line error if there are none."""
    run_dir = Path(run_dir)
    best = run_dir / BEST
    if not best.is_file():
        raise FinetuneError(f"{run_dir}: no {BEST}, so not a finished run directory; pass its checkpoint "
                            "files (e.g. last.safetensors) instead")
    notes: List[str] = []
    document = read_document(best, notes)
    entries = document.get("checkpoints")
    if notes:
        raise FinetuneError(f"{best}: not a readable {BEST}; expected "
                            '{"checkpoints": [{"path": "epoch-003.safetensors", ...}, ...]}')
    if not isinstance(entries, list) or not entries:
        raise FinetuneError(f"{best}: 'checkpoints' is empty or not a list; the run kept no checkpoint")
    paths = []
    for entry in entries:
        path = run_dir / str(entry.get("path", "")) if isinstance(entry, dict) else None
        if path is None or not path.is_file():
            raise FinetuneError(f"{best}: lists {entry!r}, but that checkpoint file is missing")
        paths.append(path)
    return paths


def main_checkpoint(run_dir: Path) -> Optional[Path]:
    """The run's best checkpoint (first in best.json), else last.safetensors, else None."""
    run_dir = Path(run_dir)
    for entry in best_entries(run_dir)[:1]:
        if (run_dir / str(entry.get("path"))).is_file():
            return run_dir / str(entry["path"])
    last = run_dir / LAST
    return last if last.is_file() else None


def is_runs_best(checkpoint: Path) -> bool:
    """Whether `checkpoint` is the best checkpoint of the run directory it sits in."""
    entries = best_entries(checkpoint.parent)
    return bool(entries) and entries[0].get("path") == checkpoint.name


def stored_results(checkpoint: Path) -> Dict[str, Any]:
    """Scores of a checkpoint file kept in its folder's results.json, by split."""
    results = read_results(checkpoint.parent)
    by_file = (results.get("checkpoints") or {}).get(checkpoint.name)
    scores = dict(by_file) if isinstance(by_file, dict) else {}
    for split in SPLITS:
        entry = results.get(split)
        if split not in scores and isinstance(entry, dict) and entry.get("checkpoint") == checkpoint.name:
            scores[split] = entry
    return scores


# ------------------------------------------------------------------------------------- writing
# What results.json keeps of a score, by task: classification, then multi-label.
RESULT_KEYS = (("top1", "top5", "loss"), ("mAP", "f1_micro", "f1_macro", "threshold", "loss"))


def store_result(checkpoint: Path, split: str, result: Dict[str, Any], as_run: bool) -> Path:
    """Merge a score into the checkpoint folder's results.json, atomically."""
    results_path = Path(checkpoint).parent / RESULTS
    problems: List[str] = []
    results = read_document(results_path, problems) if results_path.is_file() else {}
    if problems:  # never overwrite scores we could not read
        raise FinetuneError(f"{results_path}: not a readable JSON object; fix or delete it before --eval")
    kept = RESULT_KEYS["mAP" in result]
    entry = {k: result.get(k) for k in kept}
    if "n" in result:
        entry["n"] = result["n"]
    entry.update({k: result[k] for k in ("tta", "top1_tta", "mAP_tta") if result.get(k) is not None})  # eval --tta
    if as_run:
        results[split] = {**entry, "checkpoint": Path(checkpoint).name}
    else:
        results.setdefault("checkpoints", {}).setdefault(Path(checkpoint).name, {})[split] = entry
    return write_json(results_path, results)


def write_json(path: Path, document: Any) -> Path:
    text = json.dumps(document, indent=2) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def rank_best(best: List[Dict[str, Any]], candidates: List[Dict[str, Any]], keep: int) -> List[Dict[str, Any]]:
    """The `keep` best checkpoints by their val score (earlier epoch, then raw before EMA, first on
    ties) among the kept ones and this epoch's candidates ({"epoch", "path", "val_top1" or
    "val_mAP", "weights"})."""
    return sorted(best + candidates, key=lambda b: (-entry_score(b), b["epoch"], b.get("weights") == "ema"))[:keep]


SCORE_KEYS = ("val_top1", "val_mAP")  # what a best.json entry is ranked by: its task's metric on val


def score_key(entry: Dict[str, Any]) -> str:
    return next((key for key in SCORE_KEYS if key in entry), "val_top1")


def entry_score(entry: Dict[str, Any]) -> float:
    """A best.json entry's val score (top-1, or mAP for a multi-label run); a missing one ranks last."""
    value = entry.get(score_key(entry))
    return float(value) if isinstance(value, (int, float)) else float("-inf")


def epoch_checkpoint_name(epoch: int, weights: str = "raw") -> str:
    """epoch-007.safetensors, or epoch-007-ema.safetensors for the EMA weights of that epoch."""
    return f"epoch-{epoch:03d}{'-ema' if weights == 'ema' else ''}.safetensors"


def write_best_index(run_dir: Path, keep: int, kept: List[Dict[str, Any]]) -> Path:
    metric = score_key(kept[0]) if kept else "val_top1"
    return write_json(Path(run_dir) / BEST, {"metric": metric, "keep": keep, "checkpoints": kept})


def remove_dropped(run_dir: Path, previous: List[Dict[str, Any]], kept: List[Dict[str, Any]]) -> None:
    """Delete the checkpoints that fell out of the best list (after the new index is written)."""
    for entry in previous:
        if entry not in kept:
            (Path(run_dir) / entry["path"]).unlink(missing_ok=True)


def write_status(run_dir: Path, state: str, **details: Any) -> Path:
    body = {"state": state, "updated": datetime.now().isoformat(timespec="seconds"), **details}
    return write_json(Path(run_dir) / STATUS, body)


class RunWriter:
    """status.json and the run's experiment trackers (`finetune.tracking.Trackers`: TensorBoard,
    MLflow, W&B as the recipe says), for the one process writing a run (rank 0)."""

    def __init__(self, run_dir: Path, trackers: Any):
        self.run_dir, self.trackers = Path(run_dir), trackers

    def epoch(self, metrics: Dict[str, Any]) -> None:
        self.trackers.epoch(metrics)

    def status(self, state: str, **details: Any) -> None:
        write_status(self.run_dir, state, **details)
        self.trackers.finish(state, details)  # only an end (finished, failed, ...) reaches the trackers

    def close(self) -> None:
        self.trackers.close()


# ---------------------------------------------------------------------------------- the lock
class RunLock:
    """An exclusive OS lock on the run directory while a process writes it.

    The kernel drops it when the process dies, however it dies, so a crashed run never blocks
    its own resume. A second writer is refused with the holder's pid.
    """

    def __init__(self, run_dir: Path):
        self.run_dir, self.handle = Path(run_dir), None

    def acquire(self) -> "RunLock":
        path = self.run_dir / LOCK
        try:
            self.handle = open(path, "a+")
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(path)
            self.handle.close()
            raise FinetuneError(f"{self.run_dir}: another finetune process (pid {holder}) is writing this run "
                                "directory; wait for it to end, or use another --out") from None
        except OSError as e:
            raise FinetuneError(f"{self.run_dir}: cannot lock the run directory ({e.strerror}); "
                                "is it writable?") from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"{os.getpid()}\n")
        self.handle.flush()
        return self

    def release(self) -> None:
        if self.handle:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def is_locked(run_dir: Path) -> bool:
    try:
        with open(Path(run_dir) / LOCK) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def _read_pid(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


# ------------------------------------------------------------------------- where a run may go
def prepare_new(run_dir: Path, force: bool = False) -> Path:
    """Check that a new run may write into `run_dir` and create it; one-line errors otherwise.

    A run directory whose first epoch never finished (no resume point) is started over: the same
    command run again after a crash just works.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FinetuneError(f"{run_dir}: is a file, not a folder; choose another --out")
    if has_resume_point(run_dir):
        raise FinetuneError(f"{run_dir}: already holds a run; use --resume {run_dir} to continue it, or another --out")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run_dir(run_dir) and not force:
        raise FinetuneError(f"{run_dir}: is not empty and not a run directory; choose another --out, or pass "
                            "--force to write into it anyway")
    return ensure_writable(run_dir)


def ensure_writable(run_dir: Path) -> Path:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise FinetuneError(f"{run_dir}: cannot write the run directory ({e.strerror or e}); choose a writable "
                            "--out") from None
    return run_dir


def check_resumable(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FinetuneError(f"{run_dir}: no such run directory to resume")
    if not is_run_dir(run_dir):
        raise FinetuneError(f"{run_dir}: not a run directory (no {RECIPE}); give the folder a run wrote")
    return ensure_writable(run_dir)


# --------------------------------------------------------------------------- the resume point
def has_resume_point(run_dir: Path) -> bool:
    return (Path(run_dir) / STATE).is_file()


def write_resume_point(run_dir: Path, payload: Dict[str, Any]) -> Path:
    """The commit of an epoch (or of an interrupted one): one atomic replace of last.state.pt."""
    from .checkpoints import atomic_write as write
    return write(Path(run_dir) / STATE, lambda tmp: torch.save({"format": RESUME_FORMAT, **payload}, tmp))


def read_resume_point(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The committed resume point, or None when the run never finished an epoch."""
    path = Path(run_dir) / STATE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unpickling failure means the same to the user
        raise FinetuneError(f"{path}: unreadable resume state ({str(e).splitlines()[0][:120]}); it was not "
                            "written by finetune, or the disk lost it") from None


def write_metrics(run_dir: Path, rows: List[Dict[str, Any]]) -> Path:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    return atomic_write(Path(run_dir) / METRICS, lambda tmp: Path(tmp).write_text(text))


def remove_leftovers(run_dir: Path, kept: List[Dict[str, Any]]) -> List[str]:
    """Delete what a kill can leave: temporary files of interrupted writes, and epoch checkpoints
    that no committed best index names. Other files (soups, the user's own) are never touched."""
    keep = {entry["path"] for entry in kept}
    removed = []
    for path in Path(run_dir).iterdir():
        stale_epoch = EPOCH_CHECKPOINT.match(path.name) and path.name not in keep
        if path.is_file() and (stale_epoch or TEMPORARY.match(path.name)):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def reset(run_dir: Path) -> None:
    """Forget the derived files of a run that never committed an epoch, to start it over."""
    for name in (METRICS, BEST, RESULTS, LAST, TRACKING):
        (Path(run_dir) / name).unlink(missing_ok=True)
    remove_leftovers(run_dir, [])
