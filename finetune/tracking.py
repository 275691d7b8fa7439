"""Experiment trackers: the recipe's `tracking` list (TensorBoard by default, MLflow, W&B).

One interface for all of them, driven by `rundir.RunWriter` on rank 0 only:

    start(run_dir, recipe, first_epoch, saved)  -> ids to keep in tracking.json (or None)
    epoch(row)                                  one metrics.jsonl row, step = its epoch
    finish(state, details)                      the run's end: finished | stopped_early | failed | interrupted
    close()

- TensorBoard writes `tb/` (purging the epochs a resumed run trains again).
- MLflow (`MLFLOW_TRACKING_URI` honoured, else mlflow's own default): experiment = the recipe's
  name, params = the resolved recipe with dotted keys (`optimizer.lr`), one metric per epoch key
  with step = epoch, tags `best_checkpoint` / `best_epoch`, the test scores, best.json, results.json
  and the pictures present at the end as artifacts, status FINISHED / FAILED / KILLED (interrupted);
  shorter HTTP retries than mlflow's own unless MLFLOW_HTTP_REQUEST_* say otherwise.
- Weights & Biases (`WANDB_MODE=offline`, `WANDB_DIR`, `WANDB_PROJECT` honoured; the project
  defaults to the recipe's name): config = the flattened recipe, history per epoch (step = epoch),
  summary with the best epoch, checkpoint and test scores.

A resumed run continues the same MLflow / W&B run: their ids are kept in the run directory's
`tracking.json` (written atomically). Tracking never loses a run: a tracker that fails (a server
down, a full disk) warns once and is dropped; the training goes on. Only a tracker whose package is
not installed stops the run, before it starts, with a one-line error naming the extra to install.
"""
from __future__ import annotations

import importlib.util
import os
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from . import rundir
from .errors import FinetuneError

PACKAGES = {"mlflow": "mlflow", "wandb": "wandb"}  # tracker -> the module it needs (= its extra)
TERMINAL = {"finished": "FINISHED", "stopped_early": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
PICTURES = ("curves.png", "confusion.png")
# mlflow's defaults (7 retries, backoff factor 2, 120 s timeout) stall a run for minutes per call when its
# server is down; ours, unless the environment sets them: one failure costs seconds, then mlflow is dropped.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def require(names: Iterable[str]) -> None:
    """A one-line error when a tracker's package is missing (checked on every rank, before training)."""
    for name in names:
        module = PACKAGES.get(name)
        try:
            found = module is None or importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise FinetuneError(f"tracking: {module} is not installed; pip install 'finetune[{module}]' "
                                f"(or drop {name} from the recipe's tracking: list)")


def flatten(recipe: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}; lists become `a,b` strings."""
    flat: Dict[str, Any] = {}
    for key, value in recipe.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return flat


def numbers(row: Dict[str, Any]) -> Dict[str, float]:
    """The numeric metrics of a metrics row (the epoch is the step, not a metric)."""
    return {k: float(v) for k, v in row.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_ids(run_dir: Path) -> Dict[str, Any]:
    return rundir.read_document(Path(run_dir) / rundir.TRACKING)


def end_summary(run_dir: Path, details: Dict[str, Any]) -> Dict[str, Any]:
    """What every tracker records at the end: the best epoch and checkpoint, and the test scores."""
    run_dir = Path(run_dir)
    summary: Dict[str, Any] = {}
    best = rundir.best_entries(run_dir)
    if best:
        key = rundir.score_key(best[0])
        summary.update({"best_epoch": best[0].get("epoch"), f"best_{key}": best[0].get(key),
                        "best_checkpoint": str(run_dir / str(best[0].get("path")))})
    test = rundir.read_results(run_dir).get("test")
    if isinstance(test, dict):
        summary.update({f"test_{k}": test[k] for k in sum(rundir.RESULT_KEYS, ())
                        if isinstance(test.get(k), (int, float))})
    if details.get("reason"):
        summary["failure"] = str(details["reason"])[:500]
    return summary


# ======================================================================================= trackers
class Tracker:
    name = "tracker"

    def start(self, run_dir: Path, recipe: Dict[str, Any], first_epoch: int,
              saved: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        return None

    def epoch(self, row: Dict[str, Any]) -> None:
        pass

    def finish(self, state: str, details: Dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def start(self, run_dir, recipe, first_epoch, saved):
        from torch.utils.tensorboard import SummaryWriter  # slow import: only when a run writes
        # purge_step drops the events of epochs that a resumed run trains again.
        self.writer = SummaryWriter(str(Path(run_dir) / rundir.TENSORBOARD), purge_step=first_epoch)
        return None

    def epoch(self, row):
        for key, value in numbers(row).items():
            self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def finish(self, state, details):
        self.writer.flush()

    def close(self):
        self.writer.close()


class MlflowTracker(Tracker):
    name = "mlflow"

    def start(self, run_dir, recipe, first_epoch, saved):
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        self.run_dir = Path(run_dir)
        for name, value in HTTP_DEFAULTS.items():  # a server down costs seconds, not mlflow's minutes of retries
            os.environ.setdefault(name, value)
        # A resume goes back to the server the run was started on unless MLFLOW_TRACKING_URI says otherwise.
        uri = os.environ.get("MLFLOW_TRACKING_URI") or saved.get("tracking_uri") or mlflow.get_tracking_uri()
        if uri.startswith("file:") or "://" not in uri and not uri.startswith("sqlite"):
            # The user named a file store; mlflow >= 3 refuses one unless this is set (it deprecates them).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        params = {k: "null" if v is None else str(v)[:500] for k, v in flatten(recipe).items()}
        run = self._existing(saved.get("run_id"))
        if run is None:
            name = recipe.get("name") or "finetune"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self._create_experiment(name)
            run = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                         tags={"finetune.run_dir": str(self.run_dir.resolve())})
            logged: Dict[str, str] = {}
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            logged = dict(run.data.params)
        self.run_id = run.info.run_id
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=new[i:i + 100])
        changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
        for key, value in changed.items():  # params are immutable: a resume's changes (epochs=40) are tags
            self.client.set_tag(self.run_id, f"resume.{key}", f"{logged[key]} -> {value}")
        return {"run_id": self.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": str(uri)}

    def _existing(self, run_id: Optional[str]):
        if not run_id:
            return None
        try:
            return self.client.get_run(run_id)
        except Exception as e:  # noqa: BLE001 — gone, or another server: a new run, said once
            warnings.warn(f"tracking: mlflow run {run_id} of {self.run_dir} not found on {self.client.tracking_uri} "
                          f"({str(e).splitlines()[0][:120]}); starting a new mlflow run", stacklevel=2)
            return None

    def _create_experiment(self, name: str) -> str:
        try:
            return self.client.create_experiment(name)
        except Exception:  # noqa: BLE001 — another process created it meanwhile
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def epoch(self, row):
        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, int(row["epoch"]))
                                                    for k, v in numbers(row).items()])

    def finish(self, state, details):
        summary = end_summary(self.run_dir, details)
        for key in ("best_checkpoint", "best_epoch", "failure"):
            if key in summary:
                self.client.set_tag(self.run_id, key, str(summary[key]))
        step = int(details.get("epoch") or 0)
        for key in ("test_top1", "test_top5", "test_loss"):
            if key in summary:
                self.client.log_metric(self.run_id, key, float(summary[key]), step=step)
        for name in (rundir.BEST, rundir.RESULTS, *PICTURES):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id, TERMINAL[state])

    def attach(self, paths: List[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))


class WandbTracker(Tracker):
    name = "wandb"

    def start(self, run_dir, recipe, first_epoch, saved):
        import wandb
        self.run_dir = Path(run_dir)
        run_id = saved.get("id")
        project = os.environ.get("WANDB_PROJECT") or saved.get("project") or recipe.get("name") or "finetune"
        self.run = wandb.init(project=project, id=run_id, resume="allow" if run_id else None,
                              name=self.run_dir.name, config=flatten(recipe), allow_val_change=True,
                              reinit="create_new")
        return {"id": self.run.id, "project": project}

    def epoch(self, row):
        self.run.log({"epoch": row["epoch"], **numbers(row)}, step=int(row["epoch"]))

    def finish(self, state, details):
        summary = end_summary(self.run_dir, details)
        for key, value in summary.items():
            self.run.summary[key] = value
        self.run.summary["status"] = state
        self.run.finish(exit_code={"finished": 0, "stopped_early": 0, "failed": 1, "interrupted": 130}[state])
        self.run = None

    def close(self):
        if getattr(self, "run", None) is not None:  # dropped after a failure: end what was logged
            self.run.finish(exit_code=1)
            self.run = None


KINDS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


# ======================================================================================= the set
class Trackers:
    """The recipe's trackers for one run; each call is guarded: the first failure of a tracker
    warns (naming it and why) and drops it, and the training goes on."""

    def __init__(self, run_dir: Path, recipe: Dict[str, Any], first_epoch: int = 1):
        self.run_dir = Path(run_dir)
        self.finished = self.closing = False
        names = recipe.get("tracking", ["tensorboard"])
        require(names)
        saved = read_ids(self.run_dir)  # {} for a new run: rundir.reset removed it
        ids = dict(saved)  # a tracker that fails to start, or is left out on resume, keeps its run's id
        self.active: List[Tracker] = []
        for name in names:
            tracker = KINDS[name]()
            started = self._guarded(tracker, "start", self.run_dir, recipe, first_epoch, dict(saved.get(name) or {}))
            if started is not _FAILED:
                self.active.append(tracker)
                if started:
                    ids[name] = started
        if ids != saved:
            self._guarded(None, "write tracking.json", ids)

    def epoch(self, row: Dict[str, Any]) -> None:
        for tracker in list(self.active):
            self._guarded(tracker, "epoch", row)

    def finish(self, state: str, details: Dict[str, Any]) -> None:
        """The run's end (a terminal status); later statuses are ignored."""
        if state not in TERMINAL or self.finished:
            return
        self.finished = True
        for tracker in list(self.active):
            self._guarded(tracker, "finish", state, details)
        if self.closing:
            self.close()

    def close(self) -> None:
        """The engine closes its log before the final status of a finished run (after the test
        scores): the trackers then close at that status, so that they record it."""
        if not self.finished:
            self.closing = True
            return
        for tracker in list(self.active):
            self._guarded(tracker, "close")
        self.active = []

    def _guarded(self, tracker: Optional[Tracker], what: str, *args: Any) -> Any:
        try:
            if tracker is None:
                return rundir.write_json(self.run_dir / rundir.TRACKING, args[0])
            return getattr(tracker, what)(*args)
        except Exception as e:  # noqa: BLE001 — whatever a tracker raises, the run goes on
            name = tracker.name if tracker else "tracking"
            first = str(e).splitlines()[0][:200] if str(e) else ""
            warnings.warn(f"tracking: {name} failed in {what} ({type(e).__name__}: {first}); the training goes on "
                          f"without it", stacklevel=3)
            if tracker in self.active:
                self.active.remove(tracker)
                try:
                    tracker.close()
                except Exception:  # noqa: BLE001 — already reported
                    pass
            return _FAILED


_FAILED = object()


def attach(run_dir: Path, paths: Iterable[Path]) -> None:
    """Add files written after the run ended (the CLI's curves.png, confusion.png) to its MLflow run
    as artifacts. Never raises: a failure is one warning."""
    run_dir, paths = Path(run_dir), [Path(p) for p in paths if Path(p).is_file()]
    saved = read_ids(run_dir).get("mlflow")
    if not paths or not isinstance(saved, dict) or not saved.get("run_id"):
        return
    try:
        from mlflow.tracking import MlflowClient
        tracker = MlflowTracker()
        tracker.client = MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or saved.get("tracking_uri"))
        tracker.run_id = saved["run_id"]
        tracker.attach(paths)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"tracking: mlflow could not attach {', '.join(p.name for p in paths)} "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})", stacklevel=2)
