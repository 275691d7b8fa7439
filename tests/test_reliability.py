"""Nothing lost (issue 9): kills, signals, resume with overrides, DDP that cannot hang, the lock,
outputs never clobbered, one-line errors for bad input.

Runs go through the real command line in subprocesses, so a SIGKILL is a real SIGKILL. The kill
loop runs a short version here and the long one (12 kills) under `make test-slow`.
"""
from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
import yaml

from finetune import engine
from finetune.checkpoints import read_checkpoint, read_meta
from finetune.cli import main
from finetune.data import EpochBatches
from finetune.recipes import load_recipe

from conftest import REPO

TINY = ["model=scratch:patch_size=4,embed_dim=32,depth=2,num_heads=2,mlp_ratio=2", "batch_size=32",
        "schedule.warmup_epochs=0", "keep_best=2",
        "attention=fused"]  # runs compared bitwise must not each time their own kernel (auto)
# workers and augmentation on: the case whose RNG used to drift on resume.
AUGMENTED = TINY + ["epochs=4", "max_steps_per_epoch=5", "data.workers=2", "data.augment=affine"]
TIMING = ("images_per_s", "time_s")


def env(**extra: str) -> Dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def train_command(out: Path, overrides: List[str], resume: bool = False) -> List[str]:
    head = ["train", "--resume", str(out)] if resume else ["train", "demo", "--out", str(out)]
    sets = [] if resume else [a for o in overrides for a in ("--set", o)]
    return [sys.executable, "-m", "finetune", *head, "--no-progress", "--no-pictures", *sets]


def run_to_end(out: Path, overrides: List[str], resume: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(train_command(out, overrides, resume), env=env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def start(out: Path, overrides: List[str], resume: bool, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen(train_command(out, overrides, resume), env=env(**extra_env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_line(process: subprocess.Popen, needle: str, timeout: float) -> bool:
    """Read the process's output until a line contains `needle` (True), it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            line = process.stdout.readline()
            if needle in line:
                return True
            if not line and process.poll() is not None:
                return False
    return False


def killed_at(run: Path, overrides: List[str], aim: str, resume: bool = False) -> None:
    """Start a run, SIGKILL it once it pauses at the pause point `aim`."""
    process = start(run, overrides, resume, FINETUNE_PAUSE_AT=aim, FINETUNE_PAUSE_S="60")
    try:
        assert wait_for_line(process, f"paused at {aim}", timeout=120)
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def resume_point(run: Path) -> dict:
    return torch.load(run / "last.state.pt", map_location="cpu", weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise: weights, optimizer state, metrics rows (but their timings), best index."""
    pa, pb = resume_point(a), resume_point(b)
    assert pa["epoch"] == pb["epoch"] and pa["in_epoch"] is None and pb["in_epoch"] is None
    assert pa["model"].keys() == pb["model"].keys()
    for key in pa["model"]:
        assert torch.equal(pa["model"][key], pb["model"][key]), f"weights differ at {key}"
    for sa, sb in zip(pa["optimizer"]["state"].values(), pb["optimizer"]["state"].values()):
        for name in sa:
            assert torch.equal(sa[name], sb[name]), f"optimizer state {name} differs"
    assert pa["optimizer"]["param_groups"] == pb["optimizer"]["param_groups"]

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    assert strip(pa["metrics"]) == strip(pb["metrics"])
    assert strip(metrics_rows(a)) == strip(metrics_rows(b))
    assert json.loads((a / "best.json").read_text()) == json.loads((b / "best.json").read_text())
    for name in ("last.safetensors", *(e["path"] for e in json.loads((a / "best.json").read_text())["checkpoints"])):
        wa, wb = read_checkpoint(a / name)[0], read_checkpoint(b / name)[0]
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{name} differs"


def metrics_rows(run: Path) -> List[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_every_file_readable(run: Path) -> None:
    """No file under its real name is ever half-written (tb/ holds append-only event logs: skipped)."""
    for path in run.iterdir():
        if path.is_dir() or path.name.startswith("."):
            continue
        if path.suffix == ".safetensors":
            read_checkpoint(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix == ".yaml":
            assert isinstance(yaml.safe_load(path.read_text()), dict)
        elif path.suffix == ".pt":
            resume_point(run)


# ------------------------------------------------------------------------------------ the kill loop
def kill_and_resume_until_done(run: Path, overrides: List[str], kills: int, seed: int) -> int:
    """SIGKILL the run at `kills` moments, half of them aimed inside the save, resuming each time."""
    chooser = random.Random(seed)
    aims = ["before-commit", "after-commit", "after-last"]
    done_kills = 0
    for attempt in range(kills):
        resume = (run / "recipe.yaml").is_file()
        if attempt % 2 == 0:
            aim = aims[(attempt // 2) % len(aims)]
            process = start(run, overrides, resume, FINETUNE_PAUSE_AT=aim, FINETUNE_PAUSE_S="60")
            hit = wait_for_line(process, f"paused at {aim}", timeout=120)
        else:
            process = start(run, overrides, resume)
            time.sleep(chooser.uniform(2.0, 9.0))
            hit = process.poll() is None
        process.kill()
        process.wait()
        process.stdout.close()
        done_kills += hit
        assert_every_file_readable(run)
    run_to_end(run, overrides, resume=(run / "recipe.yaml").is_file())
    return done_kills


def check_kill_loop(tmp_path: Path, kills: int) -> None:
    straight = tmp_path / "straight"
    run_to_end(straight, AUGMENTED)
    killed = tmp_path / "killed"
    landed = kill_and_resume_until_done(killed, AUGMENTED, kills, seed=kills)
    assert landed >= kills // 2, f"only {landed} of {kills} kills hit a running process"
    assert_same_run(straight, killed)
    assert json.loads((killed / "status.json").read_text())["state"] == "finished"
    assert not list(killed.glob(".*.tmp"))


def test_sigkill_anywhere_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    check_kill_loop(tmp_path, kills=4)


@pytest.mark.slow
def test_sigkill_at_twelve_moments_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    check_kill_loop(tmp_path, kills=12)


# --------------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_a_resume_point_and_resume_exactly(tmp_path, signum):
    overrides = TINY + ["epochs=3", "max_steps_per_epoch=12", "batch_size=16", "data.workers=2",
                        "data.augment=affine"]
    straight = tmp_path / "straight"
    run_to_end(straight, overrides)
    run = tmp_path / "stopped"
    process = start(run, overrides, resume=False, FINETUNE_PAUSE_AT="step", FINETUNE_PAUSE_S="0.2")
    assert wait_for_line(process, "epoch   1", timeout=120)
    assert wait_for_line(process, "paused at step", timeout=60)  # inside epoch 2 (12 steps of >= 0.2 s)
    process.send_signal(signum)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signum, output[-2000:]
    assert f"interrupted by {signal.Signals(signum).name}" in output and f"--resume {run}" in output
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and status["resume"] == f"finetune train --resume {run}"
    point = resume_point(run)
    assert point["epoch"] == 1 and point["in_epoch"] is not None and point["in_epoch"]["epoch"] == 2
    run_to_end(run, overrides, resume=True)
    assert_same_run(straight, run)


def test_ctrl_c_while_an_epoch_is_being_saved_still_leaves_a_resumable_run(tmp_path):
    overrides = TINY + ["epochs=3", "max_steps_per_epoch=3"]
    straight = tmp_path / "straight"
    run_to_end(straight, overrides)
    run = tmp_path / "run"
    process = start(run, overrides, resume=False, FINETUNE_PAUSE_AT="after-commit", FINETUNE_PAUSE_S="2")
    assert wait_for_line(process, "paused at after-commit", timeout=120)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode == 130
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"
    assert resume_point(run)["epoch"] == 1 and read_meta(run / "last.safetensors")["epoch"] == 1
    run_to_end(run, overrides, resume=True)
    assert_same_run(straight, run)


def test_a_killed_runs_running_status_reads_as_crashed(tmp_path, capsys):
    run = tmp_path / "run"
    process = start(run, TINY + ["epochs=3"], resume=False, FINETUNE_PAUSE_AT="before-commit")
    assert wait_for_line(process, "paused at before-commit", timeout=120)
    assert json.loads((run / "status.json").read_text())["state"] == "running"
    from finetune.compare import collect_rows
    from finetune.rundir import read_status
    assert read_status(run)["state"] == "running"  # alive: its lock is held
    process.kill()
    process.wait()
    process.stdout.close()
    assert read_status(run)["state"] == "crashed"
    assert collect_rows([run])[0]["status"] == "crashed"


def test_crash_in_the_first_epoch_then_the_same_command_starts_over_cleanly(tmp_path):
    run = tmp_path / "run"
    overrides = TINY + ["epochs=2", "max_steps_per_epoch=2"]
    killed_at(run, overrides, "before-commit")
    run_to_end(run, overrides)  # the very same command
    assert [r["epoch"] for r in metrics_rows(run)] == [1, 2]
    straight = tmp_path / "straight"
    run_to_end(straight, overrides)
    assert_same_run(straight, run)


def test_resume_with_nothing_committed_starts_the_run_over(tmp_path):
    run = tmp_path / "run"
    overrides = TINY + ["epochs=1", "max_steps_per_epoch=2"]
    killed_at(run, overrides, "before-commit")
    run_to_end(run, overrides, resume=True)
    assert [r["epoch"] for r in metrics_rows(run)] == [1]


# ---------------------------------------------------------------------------- resume with changes
def test_resume_with_more_epochs_recomputes_the_cosine_schedule(tmp_path):
    run = tmp_path / "run"
    common = TINY + ["max_steps_per_epoch=2", "schedule.name=cosine", "optimizer.lr=0.01"]
    engine.train_recipe("demo", common + ["epochs=6"], out_dir=str(run), progress=False)
    assert metrics_rows(run)[-1]["lr"] > 0
    engine.resume_run(str(run), ["epochs=8"], progress=False)
    rows = metrics_rows(run)
    assert [r["epoch"] for r in rows] == list(range(1, 9))
    stretched = load_recipe("demo", common + ["epochs=8"])
    assert rows[6]["lr"] == pytest.approx(0.01 * engine.lr_factor(stretched, 7)) and rows[6]["lr"] > 1e-4
    assert load_recipe(str(run / "recipe.yaml")).epochs == 8


def test_resume_with_a_new_lr_takes_effect_from_the_next_epoch(tmp_path):
    run = tmp_path / "run"
    common = TINY + ["max_steps_per_epoch=2", "schedule.name=none", "optimizer.lr=0.01"]
    engine.train_recipe("demo", common + ["epochs=2"], out_dir=str(run), progress=False)
    engine.resume_run(str(run), ["epochs=3", "optimizer.lr=0.002"], progress=False)
    assert [r["lr"] for r in metrics_rows(run)] == pytest.approx([0.01, 0.01, 0.002])
    assert load_recipe(str(run / "recipe.yaml")).optimizer.lr == 0.002


@pytest.mark.parametrize("change", ["model=scratch:patch_size=8,embed_dim=32,depth=1,num_heads=2", "img_size=24",
                                    "data.val_split=0.3", "batch_size=16", "seed=3"])
def test_resume_refuses_keys_that_would_make_another_run(tmp_path, capsys, change):
    run = tmp_path / "run"
    engine.train_recipe("demo", TINY + ["epochs=1", "max_steps_per_epoch=1"], out_dir=str(run), progress=False)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume", str(run), "--set", change, "--no-progress"])
    err = capsys.readouterr().err
    key = change.split("=")[0]
    assert exit_info.value.code == 2 and err.count("\n") == 1 and f"{key} cannot change when resuming" in err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir()) == before


def test_resume_cleans_stray_temporary_files_and_orphan_epoch_checkpoints(tmp_path):
    run = tmp_path / "run"
    engine.train_recipe("demo", TINY + ["epochs=1", "max_steps_per_epoch=1"], out_dir=str(run), progress=False)
    (run / ".last.safetensors.a1b2c3.tmp").write_bytes(b"half")
    (run / "epoch-009.safetensors").write_bytes(b"orphan of a killed save")
    (run / "soup.safetensors").write_bytes(b"the user's own file")
    engine.resume_run(str(run), ["epochs=2"], progress=False)
    names = {p.name for p in run.iterdir()}
    assert ".last.safetensors.a1b2c3.tmp" not in names and "epoch-009.safetensors" not in names
    assert "soup.safetensors" in names


# --------------------------------------------------------------------------------------- failures
def test_nan_in_the_first_epoch_says_nothing_was_saved(tmp_path, monkeypatch, capsys):
    real = engine.train_one_epoch

    def poisoned(model, *args, **kwargs):
        with torch.no_grad():
            getattr(model, "module", model).head.weight.fill_(float("nan"))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(engine, "train_one_epoch", poisoned)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "demo", "--out", str(tmp_path / "run"), "--no-progress",
              *sum((["--set", o] for o in TINY + ["epochs=2"]), [])])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "at epoch 1" in err and "no epoch finished, so nothing was saved" in err and "last.safetensors" not in err
    assert json.loads((tmp_path / "run" / "status.json").read_text())["state"] == "failed"


def test_two_runs_into_one_directory_the_second_is_refused_and_touches_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    first = start(run, TINY + ["epochs=2"], resume=False, FINETUNE_PAUSE_AT="before-commit")
    try:
        assert wait_for_line(first, "paused at before-commit", timeout=120)
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        for args in (["train", "demo", "--out", str(run)], ["train", "--resume", str(run)]):
            with pytest.raises(SystemExit) as exit_info:
                main(args + ["--no-progress"])
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and err.count("\n") == 1
            assert f"another finetune process (pid {first.pid})" in err
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    finally:
        first.kill()
        first.wait()
        first.stdout.close()


def test_out_into_a_non_empty_folder_that_is_not_a_run_needs_force(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "demo", "--out", str(folder), "--no-progress", "--set", "epochs=1",
              "--set", "schedule.warmup_epochs=0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--force" in err and err.count("\n") == 1
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    result = engine.train_recipe("demo", TINY + ["epochs=1", "max_steps_per_epoch=1"], out_dir=str(folder),
                                 progress=False, force=True)
    assert result.status == "finished" and (folder / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("where", ["under_a_file", "in_proc"])
def test_an_unusable_run_directory_is_a_one_line_error(tmp_path, capsys, where):
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    else:
        out = Path("/proc/self/finetune-run")  # no process, root included, can create a folder there
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "demo", "--out", str(out), "--no-progress", "--set", "epochs=1",
              "--set", "schedule.warmup_epochs=0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and str(out) in err and "internal error" not in err


def test_soup_and_export_never_replace_a_file_without_force(tmp_path, capsys):
    run = tmp_path / "run"
    engine.train_recipe("demo", TINY + ["epochs=2", "max_steps_per_epoch=1"], out_dir=str(run), progress=False)
    precious = tmp_path / "precious.safetensors"
    precious.write_bytes(b"someone else's file")
    for args in (["soup", str(run), "-o", str(precious), "--no-eval"],
                 ["export", str(run / "last.safetensors"), str(precious), "--to", "ppv"]):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "already exists" in err and "--force" in err
        assert precious.read_bytes() == b"someone else's file"
    main(["soup", str(run), "-o", str(precious), "--no-eval", "--force"])
    assert read_meta(precious)["source"] == "soup"


def test_predict_with_a_non_positive_top_k_is_a_one_line_error(tmp_path, capsys):
    run = tmp_path / "run"
    engine.train_recipe("demo", TINY + ["epochs=1", "max_steps_per_epoch=1"], out_dir=str(run), progress=False)
    image = tmp_path / "x.png"
    from PIL import Image
    Image.new("RGB", (16, 16)).save(image)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(run / "last.safetensors"), str(image), "--top-k", "-1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "--top-k" in err


# -------------------------------------------------------------------------------------------- DDP
DRIVER = """
import sys, torch
from finetune import engine
captured = {}
real = engine.train_one_epoch
def spy(model, *args, **kwargs):
    captured["model"] = getattr(model, "module", model)
    return real(model, *args, **kwargs)
engine.train_one_epoch = spy
out, dump, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
engine.train_recipe("demo", overrides, out_dir=out, progress=False)
import os
torch.save(captured["model"].state_dict(), f"{dump}/rank{os.environ['RANK']}.pt")
"""


def train_two_processes(tmp_path: Path, overrides: List[str], port: int) -> List[Dict[str, torch.Tensor]]:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(driver), str(tmp_path / "run"), str(tmp_path), *overrides]
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def assert_identical(weights: List[Dict[str, torch.Tensor]]) -> None:
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), f"ranks disagree on {key}"


def image_folder(tmp_path: Path, counts: Dict[str, int], broken=()) -> List[str]:
    """train/ with counts[c] images of class c (the (class, file) pairs in `broken` undecodable), val/
    with one per class; returns the overrides of a run on it."""
    from PIL import Image
    for split, per_class in (("train", counts), ("val", dict.fromkeys(counts, 1))):
        for c, (cls, count) in enumerate(per_class.items()):
            (tmp_path / "data" / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                path = tmp_path / "data" / split / cls / f"{i}.png"
                if split == "train" and (cls, path.name) in set(broken):
                    path.write_bytes(b"not an image")
                else:
                    Image.new("RGB", (16, 16), (120 * c + 10, 30 * i % 255, 90)).save(path)
    return ["model=scratch:patch_size=8,embed_dim=32,depth=1,num_heads=2", "img_size=16", "data.dataset=imagefolder",
            "schedule.warmup_epochs=0", "optimizer.name=sgd", "optimizer.lr=0.05", "data.augment=none",
            "data.workers=0", f"data.root={tmp_path / 'data'}"]


def test_ddp_when_train_images_modulo_batch_is_one(tmp_path):
    # 17 train images, global batch 4: the last global batch holds 1 image for 2 processes.
    run = image_folder(tmp_path, {"a": 9, "b": 8})
    assert_identical(train_two_processes(tmp_path, run + ["batch_size=4", "epochs=2"], port=29531))


def test_ddp_with_a_local_batch_of_only_unreadable_images(tmp_path):
    files = [("a", f"{i}.png") for i in range(6)] + [("b", f"{i}.png") for i in range(6)]  # ImageFolder's order
    batches = EpochBatches(files, balanced=False, seed=0, global_batch=4, rank=1, world_size=2)
    batches.set_epoch(1)
    victims = [files[index] for index, _ in batches.local_batches()[0]]  # rank 1's first batch, all of it
    run = image_folder(tmp_path, {"a": 6, "b": 6}, broken=victims)
    assert_identical(train_two_processes(tmp_path, run + ["batch_size=4", "epochs=1"], port=29532))


def test_ddp_grad_accum_3_with_20_batches(tmp_path):
    run = image_folder(tmp_path, {"a": 20, "b": 20})  # global batch 2: 20 batches, groups of 3 and a last of 2
    assert_identical(train_two_processes(tmp_path, run + ["batch_size=2", "grad_accum=3", "epochs=1"], port=29533))


@pytest.mark.parametrize("bad", [{"num_classes": "three"}, {"img_size": [224]}, {"arch": "vit"},
                                 {"class_names": [1, 2, 3]}, {"data_config": {"mean": "imagenet"}}])
def test_checkpoint_metadata_of_wrong_types_is_a_one_line_error(tmp_path, capsys, bad):
    from safetensors.torch import save_file
    from finetune.checkpoints import model_meta
    model = finetune_model()
    meta = {**model_meta(model), **bad}
    path = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"finetune": json.dumps(meta)})
    with pytest.raises(SystemExit) as exit_info:
        main(["info", str(path)])
    err = capsys.readouterr().err
    field = next(iter(bad))
    assert exit_info.value.code == 2 and err.count("\n") == 1 and f"'{field}'" in err and "internal" not in err


def test_an_npz_with_a_one_dimensional_patch_kernel_is_a_one_line_error(tmp_path, capsys):
    import numpy as np
    path = tmp_path / "flat.npz"
    np.savez(path, **{"embedding/kernel": np.zeros(768, np.float32)})
    with pytest.raises(SystemExit) as exit_info:
        main(["info", f"npz:{path}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "embedding/kernel" in err and "4-D" in err


def finetune_model():
    from finetune.loading import load_model
    return load_model("scratch:patch_size=8,embed_dim=16,depth=1,num_heads=2", num_classes=3, img_size=16)
