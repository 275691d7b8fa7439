"""The training engine: recipe -> data + model -> train_one_epoch / evaluate -> checkpoints.

Read `train` top to bottom: it is the whole loop. What it writes into the run directory, and
how those files are read back, is `finetune.rundir`'s business; scoring is `finetune.evaluation`'s.

Nothing is lost (README, "When things go wrong"):
- Each epoch ends in one commit, the atomic replace of `last.state.pt`, which holds everything a
  resume needs; a ranked epoch's checkpoint is written before it, and last.safetensors, best.json
  and metrics.jsonl are derived after it (and re-derived by `--resume` from whatever a kill left).
- SIGINT and SIGTERM finish the current optimizer step, commit a mid-epoch resume point, mark the
  run `interrupted` and exit non-zero; `--resume` continues from that very batch, bit for bit.
- The run directory is locked while a process writes it.

Multi-process: `torchrun --nproc_per_node N -m finetune train RECIPE` (DDP; gloo on CPU, nccl on
GPU). `batch_size` is the global batch; only rank 0 writes files. Every rank runs the same number
of micro-batches and collectives (see `data.EpochBatches`), whatever images turn out unreadable.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data as data_lib
from . import calibration, distributed, methods, rundir, speed, tasks, tracking
from .checkpoints import model_meta, save_checkpoint
from .errors import FinetuneError
from .evaluation import autocast, build_splits, eval_batch_size, evaluate
from .loading import Pretrained, load_model, load_pretrained, model_from_pretrained
from .recipes import Recipe, load_recipe, recipe_to_dict, resolve_path, save_recipe, with_changes

# What a resume may change (taking effect from the next epoch), and what it may not: the rest
# decides which model is trained on which images, in which order.
RESUMABLE_CHANGES = ("epochs", "optimizer.lr", "optimizer.momentum", "optimizer.weight_decay", "schedule.",
                     "early_stop_patience", "keep_best", "clip_grad", "label_smoothing", "max_steps_per_epoch",
                     "log_every", "data.workers", "precision", "attention", "grad_checkpointing", "compile", "name", "tracking")


@dataclass
class RunResult:
    run_dir: Path
    best_val_score: float  # the best val score of the task's metric: top-1, or mAP for multi-label
    best_epoch: int
    best_checkpoint: Optional[Path]
    status: str
    test: Optional[Dict[str, Any]] = None
    # The val scores (confusion included) of the best checkpoint when this process computed them,
    # so the run's pictures need not evaluate it again; None after a resume that found it earlier.
    best_val: Optional[Dict[str, Any]] = None
    metric: str = "top1"  # the task's ranking metric (`finetune.tasks`)

    @property
    def best_val_top1(self) -> Optional[float]:
        return self.best_val_score if self.metric == "top1" else None


class RunInterrupted(FinetuneError):
    """SIGINT/SIGTERM stopped the run after saving a resume point; exit status 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass
class Progress:
    """Where a run stands; committed with the weights at every resume point."""
    epoch: int = 0                       # epochs finished
    steps: int = 0                       # optimizer steps taken (the EMA's warmup clock)
    best: List[Dict[str, Any]] = field(default_factory=list)
    bad_epochs: int = 0
    metrics: List[Dict[str, Any]] = field(default_factory=list)
    in_epoch: Optional[Dict[str, Any]] = None   # an interrupted epoch: batches done, partial sums


# ============================================================================== the training run
def train(recipe: Recipe, out_dir: Optional[str] = None, resume: Optional[str] = None,
          progress: bool = True, force: bool = False) -> RunResult:
    """Fine-tune as `recipe` says; with `resume`, continue the run in that directory."""
    rank, world_size, device = distributed.setup()
    try:
        recipe = _with_absolute_paths(recipe)
        tracking.require(recipe.tracking)  # on every rank, before any work: a missing package is one line
        run_dir = _agree_on_run_dir(out_dir, recipe.name, resume, force, rank)
        with _locked(run_dir, rank), StopSignals() as stop:
            return _train(recipe, run_dir, resume is not None, progress, rank, world_size, device, stop)
    finally:
        distributed.cleanup()


def _train(recipe: Recipe, run_dir: Path, resuming: bool, progress: bool, rank: int, world_size: int,
           device: torch.device, stop: "StopSignals") -> RunResult:
    stored_recipe = recipe  # recipe.yaml keeps `auto`; checkpoints record what it resolved to
    point = rundir.read_resume_point(run_dir) if resuming else None
    seed_everything(recipe.seed + rank)
    model, splits = _model_and_data(recipe, run_dir, point)
    task = tasks.get(recipe.task)
    model.finetune_info["task"] = task.name  # scoring a checkpoint asks its metadata which task it is
    for fitted in ("threshold", "thresholds", "temperature"):  # chosen afresh for the weights trained here
        model.finetune_info.pop(fitted, None)
    model = methods.prepare(model, recipe)
    if point and "model" in point:
        model.load_state_dict(point["model"])  # adapters included
    if recipe.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    ema = methods.make_ema(model, recipe)
    if ema is not None and point and point.get("ema") is not None:
        ema.module.load_state_dict(point["ema"])
    mixup = task.mixup(recipe, len(splits.class_names))
    recipe, chosen = resolve_auto_settings(recipe, model, device, point.get("resolved") if point else None)
    if recipe.compile:
        model.compile()  # in place: state_dict keys, EMA and checkpoints see the plain module
    train_model = distributed.wrap_ddp(model, device)
    multi = world_size > 1
    train_loader = data_lib.build_loader(splits.train, batch_size=recipe.batch_size, train=True,
                                         balanced=recipe.data.balanced, workers=recipe.data.workers,
                                         seed=recipe.seed, distributed=multi)
    val_loader = data_lib.build_loader(splits.val, batch_size=eval_batch_size(recipe), train=False,
                                       workers=recipe.data.workers, distributed=multi)
    optimizer = build_optimizer(recipe, model, device)
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.precision == "fp16" and device.type == "cuda")
    state = _restore(point, run_dir, recipe, model, optimizer, scaler, rank) if point else Progress()
    log = _open_log(run_dir, rank, stored_recipe, state, resuming)
    if rank == 0:
        say(f"run directory: {run_dir}  |  {len(splits.train)} train / {len(splits.val)} val images, "
            f"{len(splits.class_names)} classes, {_device_name(device)} x{world_size}"
            + (f"  |  resumed after epoch {state.epoch}" if point else ""))
        say(methods.describe(model, recipe))
        say(chosen)

    status, best_val = "finished", None
    try:
        for epoch in range(state.epoch + 1, recipe.epochs + 1):
            lr = set_epoch_lr(optimizer, recipe, epoch)
            partial, state.in_epoch = state.in_epoch, None
            data_lib.set_epoch(train_loader, epoch, skip_batches=partial["batches"] if partial else 0)
            stats = train_one_epoch(train_model, train_loader, optimizer, scaler, recipe=recipe, epoch=epoch,
                                    device=device, progress=progress and rank == 0, resume_from=partial,
                                    stop=stop, ema=ema, mixup=mixup, first_step=state.steps)
            state.steps += stats["steps"]
            if stats.get("stopped"):
                state.in_epoch = {k: stats[k] for k in ("epoch", "batches", "loss_sum", "images", "time_s")}
                _commit(run_dir, model, ema, optimizer, scaler, state, recipe, rank, epoch_done=False)
                raise _interrupted(log, run_dir, epoch, stop.signum)
            val = evaluate(model, val_loader, device=device, precision=recipe.precision)
            row = {"epoch": epoch, "train_loss": stats["loss"], **_val_columns(val, task), "lr": lr,
                   "images_per_s": stats["images_per_s"], "time_s": stats["time_s"]}
            candidates = [_candidate(epoch, val, "raw", task)]
            reports = {candidates[0]["path"]: val}
            if ema is not None:
                ema_val = evaluate(ema.module, val_loader, device=device, precision=recipe.precision)
                row.update({f"ema_{k}": v for k, v in _val_columns(ema_val, task).items()})
                candidates.append(_candidate(epoch, ema_val, "ema", task))
                reports[candidates[1]["path"]] = ema_val
            score = max(rundir.entry_score(c) for c in candidates)
            improved = not state.best or score > max(rundir.entry_score(b) for b in state.best)
            state.epoch, state.metrics = epoch, state.metrics + [row]
            state.bad_epochs = 0 if improved else state.bad_epochs + 1
            previous_best, state.best = state.best, rundir.rank_best(state.best, candidates, recipe.keep_best)
            if state.best and state.best[0]["path"] in reports:
                best_val = dict(reports[state.best[0]["path"]], class_names=splits.class_names, split="val",
                                checkpoint=str(run_dir / state.best[0]["path"]))
            _commit(run_dir, model, ema, optimizer, scaler, state, recipe, rank, epoch_done=True,
                    previous=previous_best)
            if rank == 0:
                log.epoch(row)
                say(epoch_line(row))
            if epoch < recipe.epochs and _agreed(stop.requested, device):
                raise _interrupted(log, run_dir, epoch + 1, stop.signum)
            if recipe.early_stop_patience and state.bad_epochs >= recipe.early_stop_patience:
                status = "stopped_early"
                if rank == 0:
                    say(f"early stop: val {task.metric_label} has not improved for {state.bad_epochs} epochs")
                break
    except FinetuneError as error:
        if not isinstance(error, RunInterrupted):
            log.status("failed", epoch=state.epoch, reason=str(error))
            raise _explain_failure(error, run_dir, state) from None
        raise
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once; the last commit is the resume point
        log.status("interrupted", epoch=state.epoch, resume=f"finetune train --resume {run_dir}")
        raise
    except BaseException as crash:
        log.status("failed", epoch=state.epoch, reason=f"{type(crash).__name__}: {crash}")
        raise
    finally:
        log.close()

    best = state.best[0] if state.best else None
    try:
        test = _test_and_calibrate(run_dir, state, splits, recipe, device, multi, rank, say)
    except BaseException as crash:  # the epochs are committed: a --resume redoes only this part
        reason = str(crash) if isinstance(crash, FinetuneError) else f"{type(crash).__name__}: {crash}"
        log.status("failed", epoch=state.epoch, reason=reason, resume=f"finetune train --resume {run_dir}")
        raise
    best_score = rundir.entry_score(best) if best else float("nan")
    log.status(status, epoch=state.epoch, best_epoch=best and best["epoch"],
               **{f"best_val_{task.metric}": best_score if best else None})
    return RunResult(run_dir, best_score, best["epoch"] if best else 0,
                     run_dir / best["path"] if best else None, status, test, best_val, task.metric)


def _test_and_calibrate(run_dir: Path, state: Progress, splits, recipe: Recipe, device: torch.device, multi: bool,
                        rank: int, say) -> Optional[Dict[str, Any]]:
    """After the last epoch: the best checkpoint scored on test, and `calibrate: true`."""
    best = state.best[0] if state.best else None
    test = None
    if best is not None and splits.test is not None:
        distributed.barrier()  # rank 0 has written the best checkpoint
        test = _evaluate_best(run_dir / best["path"], splits.test, recipe, device, multi)
        if rank == 0:
            rundir.store_result(run_dir / best["path"], "test", test, as_run=True)
    if recipe.calibrate and state.best:  # each kept checkpoint replaced atomically; --resume redoes it
        for line in calibration.calibrate_run(run_dir, state.best, splits.val, recipe, device, rank):
            say(line)
    return test


def resolve_auto_settings(recipe: Recipe, model, device: torch.device, earlier: Optional[Dict[str, str]] = None):
    """The recipe with `precision: auto` and `attention: auto` resolved for this model on this
    device (`finetune.speed` measures), and a log line saying what and why.

    A resumed run keeps what its start resolved `auto` to (`earlier`, from the resume point) on the
    same kind of device: a measurement that came out otherwise this time would change the kernels
    mid-run and the resume would no longer be exact. Under DDP rank 0 measures and every process
    takes its verdict (each timing its own would let ranks run different kernels)."""
    earlier = earlier if earlier and earlier.get("device") == device.type else {}
    requested = {key: earlier[key] if getattr(recipe, key) == "auto" and earlier.get(key) else getattr(recipe, key)
                 for key in ("precision", "attention")}
    kept = [key for key in requested if requested[key] != getattr(recipe, key)]
    if distributed.is_distributed() and "auto" in requested.values():
        chosen, whys = _measured(recipe, model, device, requested) if distributed.rank() == 0 else (None, None)
        chosen = distributed.broadcast_object(chosen)
        if distributed.rank() != 0:
            chosen, whys = _measured(recipe, model, device, chosen)  # rank 0's verdict, set on this model
    else:
        chosen, whys = _measured(recipe, model, device, requested)
    why_precision, why_attention = whys
    precision, attention = chosen["precision"], chosen["attention"]
    if kept:
        why_precision, why_attention = (f"{why} (auto, as resolved when this run started)" if key in kept else why
                                        for key, why in (("precision", why_precision), ("attention", why_attention)))
    return (with_changes(recipe, precision=precision, attention=attention),
            f"precision {precision} ({why_precision}); attention {attention} ({why_attention})")


def _measured(recipe: Recipe, model, device: torch.device, requested: Dict[str, str]):
    precision, why_precision = speed.choose_precision(requested["precision"], device, model, recipe.batch_size)
    attention, why_attention = speed.choose_attention(model, device, precision, recipe.batch_size,
                                                      requested["attention"])
    return {"precision": precision, "attention": attention}, (why_precision, why_attention)


def resolved_settings(recipe: Recipe, device: torch.device) -> Dict[str, str]:
    """What a resume point keeps of `auto`'s verdicts (see resolve_auto_settings)."""
    return {"precision": recipe.precision, "attention": recipe.attention, "device": device.type}


def _candidate(epoch: int, scores: Dict[str, Any], weights: str, task) -> Dict[str, Any]:
    entry = {"epoch": epoch, "path": rundir.epoch_checkpoint_name(epoch, weights),
             f"val_{task.metric}": tasks.ranking_value(scores, task.metric), "weights": weights}
    if "threshold" in scores:  # multi-label: the threshold chosen on val travels with the weights
        entry["threshold"] = scores["threshold"]
    return entry


def _val_columns(val: Dict[str, Any], task) -> Dict[str, Any]:
    """A metrics row's val columns: loss and the task's scores (top-1/top-5, or mAP/F1/threshold)."""
    if task.name == "multilabel":
        return {"val_loss": val["loss"], "val_mAP": val["mAP"], "val_f1_micro": val["f1_micro"],
                "val_f1_macro": val["f1_macro"], "val_threshold": val["threshold"]}
    return {"val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"]}


def _model_and_data(recipe: Recipe, run_dir: Path, point: Optional[Dict[str, Any]]):
    """The model to train (from the resume point, or the pretrained weights) and the data splits."""
    if point is None:
        pretrained = load_pretrained(recipe.model)
        img_size = recipe.img_size or pretrained.img_size
        splits = build_splits(recipe, img_size, pretrained.data_config)
        return model_from_pretrained(pretrained, len(splits.class_names), img_size, splits.class_names), splits
    if "model" in point:
        model = _model_from_point(point)
    else:  # a run directory of finetune 0.1: the weights of the resume point are last.safetensors
        model = load_model(str(run_dir / rundir.LAST))
    info = model.finetune_info
    return model, build_splits(recipe, info["img_size"], info["data_config"])


def _evaluate_best(path: Path, dataset, recipe: Recipe, device: torch.device, multi: bool):
    model = load_model(str(path)).to(device)
    loader = data_lib.build_loader(dataset, batch_size=eval_batch_size(recipe), train=False,
                                   workers=recipe.data.workers, distributed=multi)
    return evaluate(model, loader, device=device, precision=recipe.precision)


def _explain_failure(error: FinetuneError, run_dir: Path, state: Progress) -> FinetuneError:
    if "diverged" not in str(error):
        return error
    where = (f"the last good checkpoint is {run_dir / rundir.LAST} (epoch {state.epoch})" if state.epoch
             else "no epoch finished, so nothing was saved")
    return FinetuneError(f"{error}; {where}; lower optimizer.lr or set clip_grad")


def _agreed(flag: bool, device: torch.device) -> bool:
    """True on every process when any of them says so."""
    return distributed.all_reduce(torch.tensor(float(flag), device=device)).item() > 0


def _interrupted(log: "RunLog", run_dir: Path, epoch: int, signum: Optional[int]) -> RunInterrupted:
    signum = signum or signal.SIGTERM  # another process got the signal; this one stops with it
    command = f"finetune train --resume {run_dir}"
    log.status("interrupted", epoch=epoch - 1, in_epoch=epoch, resume=command, signal=signal.Signals(signum).name)
    return RunInterrupted(f"interrupted by {signal.Signals(signum).name} in epoch {epoch}; a resume point is "
                          f"saved: continue with `{command}`", signum)


# ============================================================================ one epoch, evaluation
def train_one_epoch(model, loader, optimizer, scaler, *, recipe: Recipe, epoch: int, device: torch.device,
                    progress: bool = True, resume_from: Optional[Dict[str, Any]] = None,
                    stop: Optional["StopSignals"] = None, ema=None, mixup=None, first_step: int = 0
                    ) -> Dict[str, Any]:
    """One pass over `loader` (from where `resume_from` stopped) with gradient accumulation,
    clipping, autocast, Mixup/CutMix and the EMA update.

    The host waits on the device only to check the loss: in one process every `recipe.log_every`
    optimizer steps, when a stop is requested and at the end of the epoch (so a NaN is caught
    before anything is saved, but the device is never drained per step); with several processes
    once per step, where one small all_reduce must agree on NaN, stopping and empty groups anyway."""
    model.train()
    precision = autocast(device, recipe.precision)
    accum = recipe.grad_accum
    done = resume_from["batches"] if resume_from else 0
    total = len(loader) if not recipe.max_steps_per_epoch else min(len(loader), recipe.max_steps_per_epoch * accum - done)
    loss_sum = resume_from["loss_sum"].to(device) if resume_from else torch.zeros((), device=device)
    images = resume_from["images"] if resume_from else 0
    elapsed_before, start = (resume_from["time_s"] if resume_from else 0.0), time.perf_counter()
    nonfinite = torch.zeros((), device=device)
    first_bad = torch.zeros((), device=device)   # the first micro-batch with a NaN/inf loss, 1-based
    bad_loss = torch.zeros((), device=device)    # and its loss
    multi = distributed.is_distributed()
    group_images = 0
    # disable=None: a bar on a terminal only, so logs and CI output stay clean.
    # iter(): tqdm.auto's class calls iter() on what it wraps once more, which would restart the
    # DataLoader (a stream re-reads its first batches; map-style workers throw decoded batches away).
    bar = tqdm(iter(loader), total=total, desc=f"epoch {epoch}/{recipe.epochs}", disable=None if progress else True,
               leave=False, unit="batch")
    optimizer.zero_grad(set_to_none=True)
    micro, steps, stopped = 0, 0, False
    mixing = mixup is not None and methods.mixup_active(recipe, epoch)
    for batch_images, labels in bar:
        if micro == total:
            break
        micro += 1
        group_size = min(accum, total - (micro - 1) // accum * accum)
        last_of_group = micro % accum == 0 or micro == total
        batch_images, labels, weight = _usable_batch(batch_images, labels, model, device)
        with (contextlib.nullcontext() if last_of_group or not hasattr(model, "no_sync") else model.no_sync()):
            with precision:
                loss = _loss(model, batch_images, labels, recipe, mixup if mixing and weight else None)
            share = _share_of_global_batch(len(labels) * weight, device)
            scaler.scale(loss * share / group_size).backward()
        loss = loss.detach()
        bad = (~torch.isfinite(loss)).float() * weight
        newly_bad = (nonfinite == 0) & (bad > 0)   # kept on the device: no sync per micro-batch
        first_bad += newly_bad.float() * (done + micro)
        bad_loss = torch.where(newly_bad, loss.float(), bad_loss)
        nonfinite += bad
        loss_sum += torch.nan_to_num(loss) * len(labels) * weight
        group_images += len(labels) * weight
        images += len(labels) * weight
        if not last_of_group:
            continue
        stop_now = stop is not None and stop.requested
        if multi:  # every process takes the same decisions
            flags = distributed.all_reduce(torch.tensor([float(nonfinite), float(stop_now), float(group_images)],
                                                        device=device)).tolist()
            _raise_if_diverged(flags[0], first_bad, bad_loss, epoch)
            stop_now, any_images = flags[1] > 0, flags[2] > 0
        else:
            if stop_now or micro == total or (steps + 1) % recipe.log_every == 0:
                _raise_if_diverged(nonfinite, first_bad, bad_loss, epoch)
            any_images = group_images > 0
        if any_images:  # a group in which every image was unreadable does not step
            _optimizer_step(model, optimizer, scaler, recipe.clip_grad)
            steps += 1
            if ema is not None:
                ema.update(getattr(model, "module", model), step=first_step + steps)
        optimizer.zero_grad(set_to_none=True)
        group_images = 0
        pause_point("step")
        if progress and steps % recipe.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if stop_now and micro < total:
            stopped = True
            break
    bar.close()
    _raise_if_diverged(nonfinite, first_bad, bad_loss, epoch)   # nothing unchecked leaves the epoch
    elapsed = elapsed_before + time.perf_counter() - start
    if stopped:
        return {"stopped": True, "epoch": epoch, "batches": done + micro, "loss_sum": loss_sum.detach().cpu(),
                "images": images, "time_s": elapsed, "steps": steps}
    totals = distributed.all_reduce(torch.stack([loss_sum.float(), torch.tensor(float(images), device=device)]))
    return {"loss": (totals[0] / totals[1].clamp(min=1)).item(), "images_per_s": totals[1].item() / max(elapsed, 1e-9),
            "time_s": elapsed, "steps": steps}


def _raise_if_diverged(nonfinite, first_bad: torch.Tensor, bad_loss: torch.Tensor, epoch: int) -> None:
    if float(nonfinite) > 0:
        raise FinetuneError(f"training diverged: loss is {bad_loss.item()} at epoch {epoch} batch {int(first_bad)}")


def _loss(model, images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, mixup) -> torch.Tensor:
    """The task's loss (cross-entropy, or BCE for multi-label) with label smoothing; with
    Mixup/CutMix (timm's, whose soft targets carry the smoothing) on batches of an even size, as its
    pairing needs; an odd last batch is not mixed."""
    task = tasks.get(recipe.task)
    if mixup is not None and len(labels) % 2 == 0:
        images, targets = mixup(images, labels)
        return task.loss(model(images), targets)
    return task.loss(model(images), labels, label_smoothing=recipe.label_smoothing)


def _usable_batch(images: torch.Tensor, labels: torch.Tensor, model, device: torch.device):
    """(images, labels, weight) on the device. A batch whose every image was unreadable becomes one
    blank image of weight 0, so this process still runs the forward, backward and collectives the
    others run (skipping them would hang DDP)."""
    if len(labels):
        return images.to(device, non_blocking=True), labels.to(device, non_blocking=True), 1
    plain = getattr(model, "module", model)
    blank = tasks.of_model(plain).blank_targets(1, plain.num_classes, device)
    return torch.zeros(1, 3, *plain.patch_embed.img_size, device=device), blank, 0


def _share_of_global_batch(local_n: int, device) -> float:
    """Loss weight that makes DDP's gradient average equal the mean over the global batch, also
    when processes hold different numbers of images (the last batch, skipped unreadable images)."""
    if not distributed.is_distributed():
        return 1.0 if local_n else 0.0
    global_n = distributed.all_reduce(torch.tensor(float(local_n), device=device)).item()
    return local_n * distributed.world_size() / global_n if global_n else 0.0


def _optimizer_step(model, optimizer, scaler, clip_grad: Optional[float]) -> None:
    if clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()


# ========================================================================== optimiser and schedule
# Our `sgd` is PyTorch's plain momentum SGD (the pets37 notes'); timm's "sgd" means Nesterov.
TIMM_OPTIMIZERS = {"sgd": "momentum", "adamw": "adamw"}


def build_optimizer(recipe: Recipe, model, device: Optional[torch.device] = None) -> torch.optim.Optimizer:
    """timm's optimizer factory: no weight decay on biases, norms and the parameters the model
    names in `no_weight_decay()` (cls_token, pos_embed, ...), as timm's train.py does; with a
    `device`, torch's fused implementation where it has one (see speed.optimizer_kwargs)."""
    from timm.optim import create_optimizer_v2
    o = recipe.optimizer
    extra = {"momentum": o.momentum} if o.name == "sgd" else {}
    scaled = recipe.precision == "fp16" and device is not None and torch.device(device).type == "cuda"
    extra.update(speed.optimizer_kwargs(device, o.name, grad_scaler=scaled) if device is not None else {})
    optimizer = create_optimizer_v2(model, opt=TIMM_OPTIMIZERS[o.name], lr=o.lr, weight_decay=o.weight_decay,
                                    layer_decay=o.layer_decay, **extra)
    for group in optimizer.param_groups:  # timm leaves the layer-decay factor to its scheduler
        group["initial_lr"] = group["lr"] * group.get("lr_scale", 1.0)
    return optimizer


def lr_factor(recipe: Recipe, epoch: int) -> float:
    """The lr multiplier of 1-based `epoch`: `step` multiplies by gamma every step_size epochs;
    `cosine` warms up linearly for warmup_epochs, then decays to 0 on a half cosine over the rest
    of `epochs`; `none` keeps lr."""
    s, done = recipe.schedule, epoch - 1
    if s.name == "step":
        return s.gamma ** (done // s.step_size)
    if s.name == "cosine":
        if done < s.warmup_epochs:
            return (done + 1) / (s.warmup_epochs + 1)
        progress = (done - s.warmup_epochs) / max(1, recipe.epochs - s.warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def set_epoch_lr(optimizer, recipe: Recipe, epoch: int) -> float:
    """Set every group's lr for `epoch` from the recipe alone (so a resume that changes `epochs`,
    the lr or the schedule recomputes it); returns the first group's."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_factor(recipe, epoch)
    return optimizer.param_groups[0]["lr"]


# =================================================================================== resume point
def _commit(run_dir: Path, model, ema, optimizer, scaler, state: Progress, recipe: Recipe, rank: int,
            epoch_done: bool, previous: Optional[List[Dict[str, Any]]] = None) -> None:
    """The transaction at the end of an epoch (or of an interrupted one): a ranked epoch's
    checkpoints, then the resume point (the commit), then the files derived from it."""
    rngs = distributed.gather_object(_rng_state())  # every process's, so DDP resumes exactly too
    if rank != 0:
        return
    meta = dict(epoch=state.epoch, metrics=_checkpoint_metrics(state), recipe=recipe_to_dict(recipe))
    for entry in state.best if epoch_done else []:
        if entry["epoch"] == state.epoch:
            weights = ema.module if entry.get("weights") == "ema" else model
            score_key = rundir.score_key(entry)
            save_checkpoint(run_dir / entry["path"], weights, state=methods.plain_state(weights),
                            **dict(meta, metrics={**meta["metrics"], score_key: entry[score_key]},
                                   **({"threshold": entry["threshold"]} if "threshold" in entry else {})))
    pause_point("before-commit")
    rundir.write_resume_point(run_dir, {
        "epoch": state.epoch, "steps": state.steps, "in_epoch": state.in_epoch, "best": state.best,
        "bad_epochs": state.bad_epochs, "metrics": state.metrics, "model": _cpu_state(model),
        "ema": _cpu_state(ema.module) if ema is not None else None,
        "model_meta": json.dumps(model_meta(model)), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(), "rng": rngs,
        "resolved": resolved_settings(recipe, next(model.parameters()).device)})
    pause_point("after-commit")
    if epoch_done:
        _derive_files(run_dir, model, state, recipe, meta, previous or [])


def _cpu_state(module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _model_from_point(point: Dict[str, Any]):
    """The plain ViT of a resume point (base weights, adapters left out: the caller adds them back)."""
    meta = json.loads(point["model_meta"])
    return model_from_pretrained(Pretrained(methods.unadapted_state(point["model"]), meta["arch"], meta["num_classes"],
                                            meta["img_size"], meta["data_config"], meta["source"], meta["class_names"],
                                            extra=meta))


def _derive_files(run_dir: Path, model, state: Progress, recipe: Recipe, meta: Dict[str, Any],
                  previous: List[Dict[str, Any]]) -> None:
    save_checkpoint(run_dir / rundir.LAST, model, state=methods.plain_state(model), **meta)
    pause_point("after-last")
    rundir.write_metrics(run_dir, state.metrics)
    rundir.write_best_index(run_dir, recipe.keep_best, state.best)
    rundir.remove_dropped(run_dir, previous, state.best)


def _checkpoint_metrics(state: Progress) -> Dict[str, Any]:
    row = state.metrics[-1] if state.metrics else {}
    return {k: row[k] for k in ("val_top1", "val_top5", "val_mAP", "val_f1_micro", "val_f1_macro", "val_loss",
                                "train_loss") if k in row}


def _restore(point: Dict[str, Any], run_dir: Path, recipe: Recipe, model, optimizer, scaler, rank: int) -> Progress:
    """Optimizer, scaler and RNG state from the resume point; then bring the derived files in line
    with it (a kill may have come between the commit and them)."""
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    saved = point["optimizer"] if "format" in point else _optimizer_state_of_0_1(point["optimizer"], model, optimizer)
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError) as e:
        raise FinetuneError(f"{run_dir / rundir.STATE}: its optimizer state does not fit this run's optimizer "
                            f"({e}); start a new run from {run_dir / rundir.LAST} instead") from None
    for group, fresh in zip(optimizer.param_groups, fresh_groups):
        group.update(fresh)  # the recipe's lr, decay and momentum, which a resume may have changed
    scaler.load_state_dict(point["scaler"])
    rngs = point["rng"] if isinstance(point["rng"], list) else [point["rng"]]
    _set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
    metrics = point.get("metrics")
    if metrics is None:  # finetune 0.1 kept the rows only in metrics.jsonl
        metrics = [r for r in rundir.read_metrics(run_dir) if r.get("epoch", 0) <= point["epoch"]]
    state = Progress(point["epoch"], point.get("steps", 0), point["best"], point["bad_epochs"], metrics,
                     point.get("in_epoch"))
    if rank == 0:
        _repair(run_dir, state, recipe)
    distributed.barrier()
    return state


def _optimizer_state_of_0_1(saved: Dict[str, Any], model, optimizer) -> Dict[str, Any]:
    """finetune 0.1's optimizer state, renumbered for today's parameter groups: 0.1 built two groups
    itself (decay: matrices except pos_embed; then no decay), timm's factory orders them otherwise
    (and puts cls_token with no decay). The per-parameter state (momentum, Adam moments) carries over."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    old_order = ([n for n, p in named if p.ndim > 1 and "pos_embed" not in n]
                 + [n for n, p in named if p.ndim <= 1 or "pos_embed" in n])
    name_of = {id(p): n for n, p in named}
    new_index = {name_of[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    renumbered = optimizer.state_dict()
    renumbered["state"] = {new_index[old_order[i]]: state for i, state in saved["state"].items()
                           if i < len(old_order) and old_order[i] in new_index}
    return renumbered


def _repair(run_dir: Path, state: Progress, recipe: Recipe) -> None:
    from .checkpoints import read_meta
    rundir.remove_leftovers(run_dir, state.best)
    rundir.write_metrics(run_dir, state.metrics)
    if state.best:
        rundir.write_best_index(run_dir, recipe.keep_best, state.best)
    last = run_dir / rundir.LAST
    if state.in_epoch is None and state.epoch and (not last.is_file() or read_meta(last).get("epoch") != state.epoch):
        point = rundir.read_resume_point(run_dir)
        model = _model_from_point(point)
        save_checkpoint(last, model, state=methods.plain_state(_adapted(model, point, recipe)), epoch=state.epoch,
                        metrics=_checkpoint_metrics(state), recipe=rundir.read_recipe(run_dir))


def _adapted(model, point: Dict[str, Any], recipe: Recipe):
    model = methods.prepare(model, recipe)
    model.load_state_dict(point["model"])
    return model


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def _set_rng_state(rng: Dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(rng["python"]), None))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def pause_point(name: str) -> None:
    """Tests aim kills inside the save: FINETUNE_PAUSE_AT=NAME[,NAME] sleeps FINETUNE_PAUSE_S here."""
    if name in os.environ.get("FINETUNE_PAUSE_AT", "").split(","):
        print(f"finetune: paused at {name}", flush=True)
        time.sleep(float(os.environ.get("FINETUNE_PAUSE_S", "30")))


# ====================================================================================== signals
class StopSignals:
    """SIGINT and SIGTERM ask the run to stop after the current optimizer step (a second one stops
    at once, as KeyboardInterrupt). Only in the main thread, where Python delivers signals."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.previous: Dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


# ========================================================================================= logging
class RunLog:
    """The run directory's log files (rank 0 only; other ranks get one that does nothing)."""

    def __init__(self, writer: Optional[rundir.RunWriter]):
        self.writer = writer

    def epoch(self, row: Dict[str, Any]) -> None:
        if self.writer:
            self.writer.epoch(row)  # TensorBoard, MLflow, W&B as the recipe's `tracking` says

    def status(self, state: str, **details: Any) -> None:
        if self.writer:
            self.writer.status(state, **details)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _open_log(run_dir: Path, rank: int, recipe: Recipe, state: Progress, resuming: bool) -> RunLog:
    if rank != 0:
        return RunLog(None)
    if not resuming or state.epoch == 0 and state.in_epoch is None:
        rundir.reset(run_dir)  # a new run, or one whose first epoch never finished: start clean
    save_recipe(recipe, run_dir / rundir.RECIPE)
    trackers = tracking.Trackers(run_dir, recipe_to_dict(recipe), first_epoch=state.epoch + 1)
    writer = rundir.RunWriter(run_dir, trackers)
    writer.status("running", epoch=state.epoch, pid=os.getpid())
    return RunLog(writer)


def say(message: str) -> None:
    tqdm.write(message)  # keeps a progress bar, when there is one, below the log lines


def epoch_line(metrics: Dict[str, Any]) -> str:
    if "val_mAP" in metrics:
        mAP = "-" if metrics["val_mAP"] is None else f"{metrics['val_mAP']:.4f}"
        scores = (f"mAP {mAP}  F1 micro {metrics['val_f1_micro']:.4f} at {metrics['val_threshold']:.2f}")
    else:
        top5 = f" top-5 {metrics['val_top5']:.4f}" if metrics["val_top5"] is not None else ""
        scores = f"top-1 {metrics['val_top1']:.4f}{top5}"
    return (f"epoch {metrics['epoch']:3d}  train loss {metrics['train_loss']:.4f}  val loss "
            f"{metrics['val_loss']:.4f}  {scores}  lr {metrics['lr']:.2e}  {metrics['images_per_s']:.1f} img/s")


# ====================================================================================== processes
def _agree_on_run_dir(out_dir: Optional[str], name: str, resume: Optional[str], force: bool, rank: int) -> Path:
    """The run directory, checked by rank 0 and agreed by every process (which all stop together
    on a refusal, instead of hanging at their next collective)."""
    chosen = resume or out_dir or f"runs/{name}-{datetime.now():%Y%m%d-%H%M%S}"
    path, problem = Path(distributed.broadcast_object(chosen)), None
    if rank == 0:
        try:
            rundir.check_resumable(path) if resume else rundir.prepare_new(path, force)
        except FinetuneError as e:
            problem = str(e)
    problem = distributed.broadcast_object(problem)
    if problem:
        raise FinetuneError(problem)
    return path


@contextlib.contextmanager
def _locked(run_dir: Path, rank: int):
    lock, problem = rundir.RunLock(run_dir), None
    if rank == 0:
        try:
            lock.acquire()
        except FinetuneError as e:
            problem = str(e)
    problem = distributed.broadcast_object(problem)
    if problem:
        raise FinetuneError(problem)
    try:
        yield
    finally:
        lock.release()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resolve_model_ref(recipe: Recipe) -> str:
    ref = recipe.model
    scheme, sep, rest = ref.partition(":")
    if sep and scheme == "npz":
        return f"npz:{resolve_path(recipe, rest)}"
    if not sep and (ref.startswith((".", "/", "~")) or Path(ref).suffix in (".safetensors", ".pth", ".bin", ".pt")):
        return resolve_path(recipe, ref)
    return ref


def _with_absolute_paths(recipe: Recipe) -> Recipe:
    # The run directory's recipe.yaml must mean the same thing from any working directory.
    root = resolve_path(recipe, recipe.data.root) if recipe.data.root else None
    return with_changes(recipe, **{"model": _resolve_model_ref(recipe), "data.root": root})


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# ===================================================================================== entry points
def train_recipe(name_or_path: str, overrides=(), out_dir: Optional[str] = None, progress: bool = True,
                 force: bool = False) -> RunResult:
    """Load a recipe by name or path, apply `key=value` overrides, and train it."""
    return train(load_recipe(name_or_path, overrides), out_dir=out_dir, progress=progress, force=force)


def resume_run(run_dir: str, overrides=(), progress: bool = True) -> RunResult:
    """Continue the run in `run_dir` from its resume point. Overrides of `epochs`, the lr, the
    schedule and the other RESUMABLE_CHANGES take effect from the next epoch; the others (model,
    data, batch, seed, ...) would make it another run, and are refused."""
    recipe_file = Path(run_dir) / rundir.RECIPE
    rundir.check_resumable(Path(run_dir))
    stored = load_recipe(str(recipe_file))
    changed = load_recipe(str(recipe_file), overrides)
    _refuse_frozen_changes(recipe_to_dict(stored), recipe_to_dict(changed), run_dir)
    return train(changed, resume=run_dir, progress=progress)


def _refuse_frozen_changes(before: Dict[str, Any], after: Dict[str, Any], run_dir: str, prefix: str = "") -> None:
    for key, value in after.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _refuse_frozen_changes(before.get(key) or {}, value, run_dir, f"{dotted}.")
        elif before.get(key) != value and not any(dotted == k or (k.endswith(".") and dotted.startswith(k))
                                                  for k in RESUMABLE_CHANGES):
            raise FinetuneError(f"--set {dotted}={value}: {dotted} cannot change when resuming {run_dir} (it was "
                                f"{before.get(key)!r}); a resume may change {', '.join(RESUMABLE_CHANGES)}; "
                                "start a new run for the rest")
