"""Hyper-parameter sweeps: one recipe, a grid of overrides, one ordinary run per trial.

    grid = parse_grid(["optimizer.lr=0.001,0.003,0.01", "label_smoothing=0,0.1"])
    result = run_sweep("pets37", grid, "runs/sweep-pets37")     # 6 trials, one after the other
    print(result.table)
    # then: finetune soup runs/sweep-pets37 --method greedy     (the model-soups workflow)

The sweep directory holds `sweep.json` (the recipe, the overrides, the grid and every trial with
its overrides, run directory and state, replaced atomically after every change) and one run
directory per trial, `trial-000-lr0.001-ls0/`, ... Each trial is an ordinary run: `finetune train
--resume`, `eval`, `compare` and `soup` work on it as on any other.

Running the same sweep again continues it: trials that finished (status.json `finished` or
`stopped_early`) are skipped and their files never touched; a trial that was interrupted, crashed
or failed is resumed from its resume point (trained again when it never committed an epoch); the
others are trained. A different grid, recipe or overrides in the same directory is refused.

Every trial's recipe is loaded and validated before any training, so a typo in a key or value
fails in one line at once. With `launcher` ("torchrun --nproc_per_node 8", "python"), each trial
runs as `LAUNCHER -m finetune train ...` in a subprocess; otherwise in this process.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import yaml

from . import compare, engine, rundir
from .errors import FinetuneError
from .evaluation import fraction
from .recipes import Recipe, load_recipe, recipe_from_dict, recipe_to_dict

SWEEP_FILE = "sweep.json"
FORMAT = "finetune.sweep/1"
DONE = ("finished", "stopped_early")
# Short names of keys in trial directory names; other keys use their last dotted part, or the
# initials of a multi_word one (label_smoothing -> ls).
SHORT_KEYS = {"optimizer.lr": "lr", "optimizer.name": "opt", "optimizer.momentum": "mom",
              "optimizer.weight_decay": "wd", "schedule.name": "sched", "data.augment": "aug"}
_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$")  # 1e-3, which YAML 1.1 calls a string
RecipeRef = Union[str, Recipe]
Grid = Dict[str, List[Any]]


@dataclass
class Trial:
    index: int
    name: str                       # also its run directory's name under the sweep directory
    params: Dict[str, Any]          # grid key -> value
    overrides: List[str]            # the same as `key=value` texts (the sweep's own overrides come first)
    state: str = "pending"          # pending | running | finished | stopped_early | interrupted | crashed | failed
    reason: Optional[str] = None    # why it failed
    best_val_top1: Optional[float] = None
    best_epoch: Optional[int] = None
    test_top1: Optional[float] = None
    best_val_mAP: Optional[float] = None  # multi-label trials are ranked by val mAP instead of top-1
    test_mAP: Optional[float] = None

    @property
    def score(self) -> Optional[float]:
        """The val score the sweep ranks by: top-1, or mAP for a multi-label trial."""
        return self.best_val_top1 if self.best_val_top1 is not None else self.best_val_mAP

    def to_json(self) -> Dict[str, Any]:
        mAP = {"best_val_mAP": self.best_val_mAP, "test_mAP": self.test_mAP} if self.best_val_mAP is not None else {}
        return {"index": self.index, "name": self.name, "dir": self.name, "params": self.params,
                "overrides": self.overrides, "state": self.state, "reason": self.reason,
                "best_val_top1": self.best_val_top1, "best_epoch": self.best_epoch, "test_top1": self.test_top1,
                **mAP}

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> "Trial":
        return cls(index=int(entry["index"]), name=str(entry["name"]), params=dict(entry["params"]),
                   overrides=list(entry["overrides"]), state=str(entry.get("state") or "pending"),
                   reason=entry.get("reason"), best_val_top1=entry.get("best_val_top1"),
                   best_epoch=entry.get("best_epoch"), test_top1=entry.get("test_top1"),
                   best_val_mAP=entry.get("best_val_mAP"), test_mAP=entry.get("test_mAP"))


@dataclass
class SweepResult:
    out_dir: Path
    trials: List[Trial]
    table: str                                          # compare's table of every trial (and soups)
    trained: List[str] = field(default_factory=list)    # trials trained or resumed by this call
    skipped: List[str] = field(default_factory=list)    # trials already finished before it

    @property
    def failed(self) -> List[Trial]:
        return [t for t in self.trials if t.state not in DONE]

    @property
    def best(self) -> Optional[Trial]:
        """The finished trial with the best val score (top-1, or mAP for multi-label)."""
        done = [t for t in self.trials if t.state in DONE and t.score is not None]
        return max(done, key=lambda t: t.score) if done else None

    def run_dir(self, trial: Trial) -> Path:
        return self.out_dir / trial.name


# ------------------------------------------------------------------------------------------- grid
def parse_grid(texts: Iterable[str]) -> Grid:
    """`["optimizer.lr=0.001,0.003", "label_smoothing=0,0.1"]` -> {"optimizer.lr": [0.001, 0.003], ...}.

    Values are YAML scalars (0.001, 1e-3, 0, true, sgd, null), comma-separated. A malformed text
    is a one-line error naming it; keys and values are checked against the recipe by `run_sweep`.
    """
    grid: Grid = {}
    for text in texts:
        label = f"--grid {text}"
        key, sep, values_text = str(text).partition("=")
        key = key.strip()
        if not sep or not key or not values_text.strip():
            raise FinetuneError(f"{label}: expected KEY=V1,V2,..., e.g. --grid optimizer.lr=0.001,0.003,0.01")
        if key in grid:
            raise FinetuneError(f"{label}: {key} is already in the grid; give each key once, with all its values")
        values = [_scalar(item, label) for item in values_text.split(",")]
        repeated = [v for i, v in enumerate(values) if any(_same(v, w) for w in values[:i])]
        if repeated:
            raise FinetuneError(f"{label}: the value {_yaml_text(repeated[0])} is given twice; each trial must differ")
        grid[key] = values
    return grid


def _scalar(item: str, label: str) -> Any:
    text = item.strip()
    if not text:
        raise FinetuneError(f"{label}: an empty value (two commas, or one at an end); write V1,V2,...")
    if _FLOAT.match(text):
        return float(text)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text if re.fullmatch(r"[\w.:/+-]+", text) else None
        if value is None:
            raise FinetuneError(f"{label}: {text!r} is not a YAML scalar (a number, true/false, null or a "
                                "word)") from None
    if isinstance(value, (dict, list)) or (isinstance(value, float) and not math.isfinite(value)):
        raise FinetuneError(f"{label}: {text!r} is not a single value; grid values are numbers, true/false, "
                            "null or words, separated by commas")
    if not isinstance(value, (str, int, float, bool, type(None))):
        value = text  # dates and the like: keep the text, the recipe check decides
    return value


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _yaml_text(value: Any) -> str:
    """A value as `--set` text that parses back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    return text if yaml.safe_load(text) == text and "," not in text else json.dumps(text)


def grid_trials(grid: Mapping[str, Sequence[Any]], random_trials: Optional[int] = None, seed: int = 0
                ) -> List[Dict[str, Any]]:
    """Every combination of the grid (the first key varies slowest), or `random_trials` of them drawn
    without replacement with `seed` (kept in grid order)."""
    if not grid:
        raise FinetuneError("no --grid given; a sweep needs at least one, e.g. --grid optimizer.lr=0.001,0.01")
    keys = list(grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    if random_trials is None:
        return combos
    if isinstance(random_trials, bool) or not isinstance(random_trials, int) or random_trials < 1:
        raise FinetuneError(f"--random: {random_trials!r} is not a positive integer")
    if random_trials > len(combos):
        raise FinetuneError(f"--random {random_trials}: the grid has only {len(combos)} combinations; ask for at "
                            f"most {len(combos)}, or drop --random to run them all")
    chosen = sorted(random.Random(seed).sample(range(len(combos)), random_trials))
    return [combos[i] for i in chosen]


def trial_name(index: int, params: Mapping[str, Any]) -> str:
    """`trial-000-lr0.001-ls0`: the index, then each key's short name and value."""
    parts = [f"trial-{index:03d}"]
    for key, value in params.items():
        text = re.sub(r"[^A-Za-z0-9.+-]+", "_", _yaml_text(value).strip('"')).strip("_")[:24]
        parts.append(f"{short_key(key)}{text}")
    return "-".join(parts)


def short_key(key: str) -> str:
    if key in SHORT_KEYS:
        return SHORT_KEYS[key]
    last = key.rsplit(".", 1)[-1]
    words = [w for w in last.split("_") if w]
    return "".join(w[0] for w in words) if len(words) > 1 else last


# ------------------------------------------------------------------------------------ the sweep
def run_sweep(recipe: RecipeRef, grid: Mapping[str, Sequence[Any]], out_dir: Union[str, Path],
              random_trials: Optional[int] = None, seed: int = 0, overrides: Sequence[str] = (),
              launcher: Optional[str] = None, progress: bool = True) -> SweepResult:
    """Train every trial of the grid (or `random_trials` of it) as a run under `out_dir`, one at a
    time; continue a sweep already there (see the module docstring). Returns the trials and the
    comparison table.

    `recipe` is a recipe name or .yaml path (or a Recipe, in-process only); `overrides` are `--set`
    texts applied to every trial before its grid values; `launcher` runs each trial as
    `LAUNCHER -m finetune train ...` in a subprocess.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FinetuneError("sweep: run the sweep in one process and its trials under DDP with --launcher "
                            "'torchrun --nproc_per_node N', not the sweep itself under torchrun")
    out = Path(out_dir)
    grid = {str(k): list(v) for k, v in grid.items()}
    overrides = [str(o) for o in overrides]
    launch = _launcher_argv(launcher)
    if launch and isinstance(recipe, Recipe):
        raise FinetuneError("--launcher: give the recipe as a name or .yaml path, which the launched "
                            "`finetune train` can read")
    base = _load(recipe, overrides, None)
    trials = [Trial(i, trial_name(i, params), params, [f"{k}={_yaml_text(v)}" for k, v in params.items()])
              for i, params in enumerate(grid_trials(grid, random_trials, seed))]
    for trial in trials:  # every trial's recipe is valid before anything trains
        _load(recipe, overrides + trial.overrides, trial)
    document = _definition(recipe, base, overrides, grid, random_trials, seed)
    trials = _open_sweep(out, document, trials)
    result = SweepResult(out, trials, "")
    engine.say(f"sweep {out}: {len(trials)} trials of {base.name} "
               f"({sum(t.state in DONE for t in trials)} finished before)")
    for trial in trials:
        run_dir = out / trial.name
        state = rundir.read_status(run_dir).get("state") if run_dir.is_dir() else None
        if state in DONE:
            _record(trial, run_dir, state)
            result.skipped.append(trial.name)
            continue
        if state == "running":  # its writer is alive (a dead one reads as crashed)
            raise FinetuneError(f"{run_dir}: trial {trial.name} is being trained by another process "
                                f"(pid {rundir.read_status(run_dir).get('pid', '?')}); wait for it to end")
        resume = rundir.has_resume_point(run_dir)
        engine.say(f"sweep trial {trial.index + 1}/{len(trials)} {trial.name}: {' '.join(trial.overrides)}"
                   + (f" (resuming, was {state})" if resume else ""))
        trial.state, trial.reason = "running", None
        _write(out, document, trials)
        try:
            if launch:
                _launch(launch, recipe, overrides + trial.overrides, run_dir, resume, progress)
            elif resume:
                engine.resume_run(str(run_dir), progress=progress)
            else:
                _train_in_process(recipe, overrides + trial.overrides, run_dir, progress)
        except engine.RunInterrupted as stop:  # Ctrl-C / SIGTERM: save, record, stop the sweep
            _record(trial, run_dir, "interrupted")
            _write(out, document, trials)
            raise engine.RunInterrupted(f"sweep {out}: trial {trial.name} {stop}; run the same sweep command "
                                        "again to continue", stop.exit_code - 128) from None
        except FinetuneError as error:  # diverged, bad data...: record it, go on with the next trial
            _record(trial, run_dir, "failed", reason=str(error))
            engine.say(f"sweep trial {trial.name} failed: {error}")
        except BaseException as error:
            _record(trial, run_dir, "interrupted" if isinstance(error, KeyboardInterrupt) else "failed",
                    reason=f"{type(error).__name__}: {error}")
            _write(out, document, trials)
            raise
        else:
            _record(trial, run_dir, rundir.read_status(run_dir).get("state") or "failed")
        result.trained.append(trial.name)
        _write(out, document, trials)
    _write(out, document, trials)
    result.table = sweep_table(out)
    return result


def sweep_table(out_dir: Union[str, Path], sort: Optional[str] = "val") -> str:
    """compare's table of a sweep's trials (those that have a run directory) and its soups."""
    out = Path(out_dir)
    inputs: List[Path] = [p for p in trial_dirs(out) if p.is_dir()]
    inputs += sorted(out.glob("soup*.safetensors"))
    if not inputs:
        return "(no trial has started yet)"
    return compare.format_table(compare.collect_rows(inputs), sort=sort)


def trial_dirs(out_dir: Union[str, Path]) -> List[Path]:
    """The run directories of a sweep, in trial order: from sweep.json, or else every run directory
    directly under `out_dir`. Missing ones (trials not started) are included."""
    out = Path(out_dir)
    document = rundir.read_document(out / SWEEP_FILE)
    entries = document.get("trials")
    if isinstance(entries, list):
        names = [str(e.get("dir") or e.get("name")) for e in entries if isinstance(e, dict)]
        return [out / n for n in names if n and Path(n).name == n]
    return [p for p in rundir.run_dirs(out) if rundir.is_run_dir(p)] if out.is_dir() else []


def read_sweep(out_dir: Union[str, Path]) -> Dict[str, Any]:
    """sweep.json as written (a one-line error when it is missing or unreadable)."""
    path = Path(out_dir) / SWEEP_FILE
    notes: List[str] = []
    document = rundir.read_document(path, notes)
    if notes or document.get("format") != FORMAT or not isinstance(document.get("trials"), list):
        raise FinetuneError(f"{path}: not a readable {SWEEP_FILE} (written by finetune sweep); "
                            "move it away to start a new sweep in this folder")
    return document


# ------------------------------------------------------------------------------------ internals
def _load(recipe: RecipeRef, overrides: Sequence[str], trial: Optional[Trial]) -> Recipe:
    try:
        if isinstance(recipe, Recipe):
            return recipe_from_dict(recipe_to_dict(recipe), source=recipe.source, overrides=overrides)
        return load_recipe(recipe, overrides)
    except FinetuneError as error:
        if trial is None:
            raise
        raise FinetuneError(f"--grid: trial {trial.name} ({' '.join(trial.overrides)}): {error}") from None


def _definition(recipe: RecipeRef, base: Recipe, overrides: List[str], grid: Grid, random_trials: Optional[int],
                seed: int) -> Dict[str, Any]:
    """What makes a sweep this sweep: rerunning with the same definition continues it."""
    return {"format": FORMAT, "recipe": recipe if isinstance(recipe, str) else base.source,
            "base_recipe": recipe_to_dict(base), "overrides": overrides, "grid": grid,
            "random_trials": random_trials, "seed": seed if random_trials is not None else None}


def _open_sweep(out: Path, document: Dict[str, Any], trials: List[Trial]) -> List[Trial]:
    """The trials of the sweep in `out`: new ones (sweep.json written), or those recorded there when
    the definition is the same; a different sweep in `out` is refused."""
    path = out / SWEEP_FILE
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"{out}: is a file, not a folder; choose another --out for the sweep")
    if not path.is_file():
        if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
            raise FinetuneError(f"{out}: is not empty and holds no {SWEEP_FILE}; choose another --out for the sweep")
        rundir.ensure_writable(out)
        _write(out, document, trials)
        return trials
    stored = read_sweep(out)
    for key, what in (("recipe", "recipe"), ("overrides", "--set overrides"), ("grid", "grid"),
                      ("random_trials", "--random"), ("seed", "--seed")):
        if _jsonable(stored.get(key)) != _jsonable(document[key]):
            raise FinetuneError(f"{path}: this folder holds another sweep (its {what} was "
                                f"{_describe(key, stored.get(key))}, now {_describe(key, document[key])}); "
                                "rerun it with the same arguments to continue it, or choose another --out")
    try:
        recorded = [Trial.from_json(e) for e in stored["trials"]]
    except (KeyError, TypeError, ValueError, AttributeError):
        raise FinetuneError(f"{path}: its trials are not readable (edited by hand?); move it away to start a new "
                            "sweep in this folder") from None
    if [(t.name, t.overrides) for t in recorded] != [(t.name, t.overrides) for t in trials]:
        raise FinetuneError(f"{path}: its trials differ from this grid's; choose another --out")
    return recorded


def _describe(key: str, value: Any) -> str:
    if key == "grid" and isinstance(value, dict):
        return " ".join(f"{k}={','.join(_yaml_text(v) for v in vs)}" for k, vs in value.items()) or "empty"
    return json.dumps(value)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _write(out: Path, document: Dict[str, Any], trials: List[Trial]) -> None:
    body = {**document, "updated": datetime.now().isoformat(timespec="seconds"),
            "trials": [t.to_json() for t in trials]}
    rundir.write_json(out / SWEEP_FILE, body)


def _record(trial: Trial, run_dir: Path, state: str, reason: Optional[str] = None) -> None:
    trial.state, trial.reason = state, reason
    if rundir.is_run_dir(run_dir):
        row = compare.run_row(run_dir)
        trial.best_val_top1, trial.best_epoch = row["best_val_top1"], row["best_epoch"]
        trial.test_top1 = row["test_top1"]
        trial.best_val_mAP, trial.test_mAP = row["best_val_mAP"], row["test_mAP"]
        if state == "failed" and reason is None:
            trial.reason = rundir.read_status(run_dir).get("reason")


def _train_in_process(recipe: RecipeRef, overrides: List[str], run_dir: Path, progress: bool) -> None:
    # force: the trial's folder is the sweep's own, whatever a kill left in it (a lock file alone)
    if isinstance(recipe, Recipe):
        engine.train(_load(recipe, overrides, None), out_dir=str(run_dir), progress=progress, force=True)
    else:
        engine.train_recipe(recipe, overrides, out_dir=str(run_dir), progress=progress, force=True)


def _launcher_argv(launcher: Optional[str]) -> Optional[List[str]]:
    if launcher is None:
        return None
    try:
        argv = shlex.split(launcher)
    except ValueError as e:
        raise FinetuneError(f"--launcher {launcher!r}: cannot split it into words ({e})") from None
    if not argv:
        raise FinetuneError("--launcher: empty; give e.g. --launcher 'torchrun --nproc_per_node 8' or 'python'")
    return argv


def launch_command(launch: List[str], recipe: str, overrides: Sequence[str], run_dir: Path, resume: bool,
                   progress: bool = True) -> List[str]:
    """`LAUNCHER -m finetune train ...` for one trial."""
    command = [*launch, "-m", "finetune", "train"]
    command += ["--resume", str(run_dir)] if resume else [str(recipe), *sum((["--set", o] for o in overrides), []),
                                                          "--out", str(run_dir), "--force"]
    return command + ([] if progress else ["--no-progress"])


def _launch(launch: List[str], recipe: str, overrides: Sequence[str], run_dir: Path, resume: bool,
            progress: bool) -> None:
    """Run one trial as a subprocess in its own session; SIGINT/SIGTERM to the sweep are passed on
    to it once (it saves a resume point and exits), then the sweep stops."""
    command = launch_command(launch, recipe, overrides, run_dir, resume, progress)
    try:
        child = subprocess.Popen(command, start_new_session=True)
    except OSError as e:
        raise FinetuneError(f"--launcher: cannot run {command[0]!r} ({e.strerror or e})") from None
    received: List[int] = []

    def forward(signum, frame) -> None:
        if received:  # a second one: stop the trial at once
            child.kill()
        received.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    previous = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, forward)
    except ValueError:  # not the main thread: no forwarding
        pass
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if child.poll() is None:
            child.kill()
            child.wait()
    if received:
        raise engine.RunInterrupted(f"interrupted by {signal.Signals(received[0]).name}; its resume point is "
                                    "saved", received[0])
    if code != 0:
        status = rundir.read_status(run_dir)
        raise FinetuneError(status.get("reason") or f"`{shlex.join(command)}` exited with status {code}")


def summary_lines(result: SweepResult) -> List[str]:
    """What the CLI prints after the table: the best trial, and the trials that did not finish."""
    lines = []
    best = result.best
    if best is not None:
        label, test = ("top-1", best.test_top1) if best.best_val_top1 is not None else ("mAP", best.test_mAP)
        lines.append(f"best trial: {best.name} ({' '.join(best.overrides)}), val {label} {fraction(best.score)}"
                     + (f", test {label} {fraction(test)}" if test is not None else ""))
    for trial in result.failed:
        lines.append(f"trial {trial.name}: {trial.state}" + (f" ({trial.reason})" if trial.reason else ""))
    lines.append(f"sweep: {result.out_dir} ({len(result.trials) - len(result.failed)}/{len(result.trials)} "
                 f"trials finished); soup them with: finetune soup {result.out_dir} --method greedy")
    return lines
