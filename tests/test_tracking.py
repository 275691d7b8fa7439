"""Experiment trackers (the recipe's `tracking` key): MLflow against a file store, W&B offline, read
back with their own clients / files; a resumed run continues the same tracker run; a tracker that
fails mid-run warns once and the run goes on; a missing package or a bad name is one line."""
from __future__ import annotations

import json
import struct
import sys
import time
import warnings
from pathlib import Path

import pytest

from finetune import engine, tracking
from finetune.cli import main as cli_main
from finetune.errors import FinetuneError
from finetune.recipes import load_recipe, recipe_to_dict

TINY = ["epochs=2", "max_steps_per_epoch=2", "schedule.warmup_epochs=0", "batch_size=32", "precision=fp32",
        "model=scratch:patch_size=4,embed_dim=32,depth=2,num_heads=2,mlp_ratio=2"]


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    # mlflow >= 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set: the tracker sets it for a
    # store the user named, so the test leaves it unset (and undone after the test).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    forget_http_defaults(monkeypatch)
    return ClientAfterTheRun()


class ClientAfterTheRun:
    """mlflow's client, made at first use, after the run: reading a file store back needs the flag the run set."""
    def __getattr__(self, name):
        from mlflow.tracking import MlflowClient
        client = self.__dict__.setdefault("client", MlflowClient())
        return getattr(client, name)


def forget_http_defaults(monkeypatch):
    """The tracker sets its MLFLOW_HTTP_REQUEST_* defaults in the environment: undone after the test."""
    for name in tracking.HTTP_DEFAULTS:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def interrupt_at(monkeypatch, at_epoch: int):
    real = engine.train_one_epoch

    def interrupted(*args, epoch, **kwargs):
        if epoch == at_epoch:
            raise KeyboardInterrupt
        return real(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", interrupted)
    return real


# ------------------------------------------------------------------------------------ the recipe key
def test_tracking_key_is_a_list_from_an_override():
    assert load_recipe("demo").tracking == ["tensorboard"]
    assert load_recipe("demo", ["tracking=tensorboard,mlflow"]).tracking == ["tensorboard", "mlflow"]
    assert load_recipe("demo", ["tracking=[wandb]"]).tracking == ["wandb"]
    assert load_recipe("demo", ["tracking=none"]).tracking == load_recipe("demo", ["tracking=[]"]).tracking == []


def test_an_unknown_tracker_is_one_line_naming_key_value_and_choices(capsys, tmp_path):
    with pytest.raises(SystemExit) as done:
        cli_main(["train", "demo", "--out", str(tmp_path / "run"), "--set", "tracking=tensorboard,comet"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --set tracking=tensorboard,comet: tracking:")
    assert "'tensorboard,comet'" in err and "tensorboard, mlflow, wandb" in err
    assert not (tmp_path / "run").exists()


def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    with pytest.raises(FinetuneError, match=r"^tracking: mlflow is not installed; pip install 'finetune\[mlflow\]'"):
        engine.train_recipe("demo", TINY + ["tracking=mlflow"], out_dir=str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()  # refused before any work


# ------------------------------------------------------------------------------------------ MLflow
def test_mlflow_run_has_the_recipe_every_epoch_and_the_artifacts_across_a_resume(tmp_path, monkeypatch,
                                                                                 mlflow_store):
    run = tmp_path / "run"
    overrides = TINY + ["tracking=tensorboard,mlflow", "optimizer.lr=0.003"]
    real = interrupt_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        engine.train_recipe("demo", overrides, out_dir=str(run), progress=False)
    run_id = json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"]
    stopped = mlflow_store.get_run(run_id)
    assert stopped.info.status == "KILLED"
    assert [m.step for m in mlflow_store.get_metric_history(run_id, "val_top1")] == [1]
    (run / "curves.png").write_bytes(b"\x89PNG picture")  # as the CLI leaves it; logged at the end

    monkeypatch.setattr(engine, "train_one_epoch", real)
    result = engine.resume_run(str(run), ["epochs=3"], progress=False)
    assert result.status == "finished"
    assert json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"] == run_id  # the same run
    finished = mlflow_store.get_run(run_id)
    assert finished.info.status == "FINISHED"
    experiment = mlflow_store.get_experiment(finished.info.experiment_id)
    assert experiment.name == "demo"
    params = finished.data.params
    assert params["optimizer.lr"] == "0.003" and params["optimizer.name"] == "adamw"
    assert params["data.dataset"] == "digits" and params["tracking"] == "tensorboard,mlflow"
    assert params["epochs"] == "2" and finished.data.tags["resume.epochs"] == "2 -> 3"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    history = mlflow_store.get_metric_history(run_id, "val_top1")
    assert [(m.step, m.value) for m in history] == [(r["epoch"], r["val_top1"]) for r in rows]
    assert [m.step for m in history] == [1, 2, 3]
    for key in ("val_loss", "train_loss", "lr"):
        assert len(mlflow_store.get_metric_history(run_id, key)) == 3
    assert finished.data.metrics["test_top1"] == json.loads((run / "results.json").read_text())["test"]["top1"]
    assert finished.data.tags["best_checkpoint"] == str(result.best_checkpoint)
    artifacts = {a.path for a in mlflow_store.list_artifacts(run_id)}
    assert {"best.json", "results.json", "curves.png"} <= artifacts
    assert (run / "tb").is_dir()  # TensorBoard still writes beside it

    (run / "confusion.png").write_bytes(b"\x89PNG picture")
    tracking.attach(run, [run / "confusion.png"])  # pictures written after the run ended
    assert "confusion.png" in {a.path for a in mlflow_store.list_artifacts(run_id)}


# ---------------------------------------------------------------------- W&B, and a tracker failing
def wandb_records(path: Path):
    """The records of a .wandb file (a LevelDB-style log of protobuf records in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2
    data, pos, pending, records = path.read_bytes(), 7, b"", []  # 7: the "W&B" header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4) and pending:  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_history_and_a_failing_tracker_does_not_stop_the_run(tmp_path, monkeypatch, mlflow_store):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    calls = []

    def server_down(self, row):
        calls.append(row["epoch"])
        raise ConnectionError("mlflow server down")

    monkeypatch.setattr(tracking.MlflowTracker, "epoch", server_down)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = engine.train_recipe("demo", TINY + ["tracking=wandb,mlflow"], out_dir=str(tmp_path / "run"),
                                     progress=False)
    assert result.status == "finished"
    assert calls == [1]  # dropped after its first failure
    said = [str(w.message) for w in caught if "tracking: mlflow failed" in str(w.message)]
    assert len(said) == 1 and "mlflow server down" in said[0]
    assert not (tmp_path / "run" / "tb").exists()

    ids = json.loads((tmp_path / "run" / "tracking.json").read_text())
    files = list((tmp_path / "wandb" / "wandb").glob(f"offline-run-*-{ids['wandb']['id']}/run-*.wandb"))
    assert len(files) == 1
    records = wandb_records(files[0])
    for _ in range(100):  # wandb's service process may still be writing the file when finish() returns
        if sum(r.WhichOneof("record_type") in ("history", "exit") for r in records) >= 3:
            break
        time.sleep(0.2)
        records = wandb_records(files[0])
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(h["epoch"], h["val_top1"]) for h in history] == [(r["epoch"], r["val_top1"]) for r in rows]
    kinds = [(r.WhichOneof("record_type"), r) for r in records]
    config = {i.key: json.loads(i.value_json) for kind, r in kinds if kind in ("run", "config")
              for i in (r.run.config.update if kind == "run" else r.config.update)}
    assert config["optimizer.name"] == "adamw" and config["optimizer.lr"] == 0.002
    assert config["data.dataset"] == "digits" and config["tracking"] == "wandb,mlflow"
    summary = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for kind, r in kinds if kind == "summary"
               for i in r.summary.update}
    assert summary["best_epoch"] == result.best_epoch and summary["status"] == "finished"
    assert [r.exit.exit_code for kind, r in kinds if kind == "exit"] == [0]


def test_an_unreachable_mlflow_server_is_one_warning_in_seconds(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")  # nothing listens there
    forget_http_defaults(monkeypatch)
    recipe = recipe_to_dict(load_recipe("demo", ["tracking=mlflow"]))
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trackers = tracking.Trackers(tmp_path, recipe)
        trackers.epoch({"epoch": 1, "val_top1": 0.5})
        trackers.finish("finished", {"epoch": 1})
        trackers.close()
    assert time.monotonic() - started < 60 and trackers.active == []
    assert [str(w.message).split(" (")[0] for w in caught if "tracking:" in str(w.message)] == \
        ["tracking: mlflow failed in start"]
