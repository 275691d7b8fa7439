"""The training engine: recipe -> data + model -> train_one_epoch / evaluate -> checkpoints.

Read `train` top to bottom: it is the whole loop. Everything it writes lands in the run directory:

    recipe.yaml       the resolved recipe (overrides applied)
    metrics.jsonl     one JSON object per epoch (train/val loss, top-1, top-5, lr, images/s)
    tb/               the same metrics for TensorBoard
    last.safetensors  the model after the latest finished epoch, + last.state.pt beside it
                      (optimizer, scheduler, RNG, early-stopping state) for --resume
    epoch-NNN.safetensors   the `keep_best` best epochs by val top-1, indexed by best.json
    status.json       running | finished | stopped_early | failed (with the reason)
    results.json      test-split scores of the best checkpoint, when the dataset has a test split

Multi-process: `torchrun --nproc_per_node N -m finetune train RECIPE` (DDP; gloo on CPU, nccl on
GPU). `batch_size` is the global batch; only rank 0 logs and writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as data_lib
from .checkpoints import atomic_write, read_meta, save_checkpoint
from .compare import store_result
from .errors import FinetuneError
from .loading import data_config_of, load_model, load_pretrained, model_from_pretrained
from .recipes import Recipe, load_recipe, recipe_to_dict, resolve_path, save_recipe

STATE_FILE = "last.state.pt"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunResult:
    run_dir: Path
    best_val_top1: float
    best_epoch: int
    best_checkpoint: Optional[Path]
    status: str
    test: Optional[Dict[str, Any]] = None


# ============================================================================== the training run
def train(recipe: Recipe, out_dir: Optional[str] = None, resume: Optional[str] = None,
          progress: bool = True) -> RunResult:
    """Fine-tune as `recipe` says; with `resume`, continue the run in that directory."""
    rank, world_size, device = setup_distributed()
    seed_everything(recipe.seed + rank)
    recipe = _with_absolute_paths(recipe)
    run_dir = _check_resumable(Path(resume)) if resume else _agree_on_run_dir(out_dir, recipe.name, rank)

    resumed = load_model(str(run_dir / "last.safetensors")) if resume else None
    pretrained = None if resume else load_pretrained(recipe.model)
    native = resumed.finetune_info if resumed else {"data_config": pretrained.data_config, "img_size": pretrained.img_size}
    img_size = recipe.img_size or native["img_size"]
    splits = build_splits(recipe, img_size, native["data_config"])
    model = resumed or model_from_pretrained(pretrained, len(splits.class_names), img_size, splits.class_names)
    if recipe.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    train_model = _wrap_ddp(model, device, world_size)

    distributed = world_size > 1
    train_loader = data_lib.build_loader(splits.train, batch_size=recipe.batch_size, train=True,
                                         balanced=recipe.data.balanced, workers=recipe.data.workers,
                                         seed=recipe.seed, distributed=distributed)
    val_loader = data_lib.build_loader(splits.val, batch_size=recipe.batch_size, train=False,
                                       workers=recipe.data.workers, distributed=distributed)
    optimizer = build_optimizer(recipe, model)
    scheduler = build_scheduler(recipe, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.precision == "fp16" and device.type == "cuda")

    state = {"epoch": 0, "best": [], "bad_epochs": 0}
    if resume:
        state = _restore_training_state(run_dir, optimizer, scheduler, scaler)
    log = RunLog(run_dir, enabled=rank == 0, resume_after=state["epoch"] if resume else None)
    if rank == 0:
        save_recipe(recipe, run_dir / "recipe.yaml")
        log.status("running", epoch=state["epoch"])
        log.say(f"run directory: {run_dir}  |  {len(splits.train)} train / {len(splits.val)} val images, "
                f"{len(splits.class_names)} classes, {_device_name(device)} x{world_size}")

    status = "finished"
    for epoch in range(state["epoch"] + 1, recipe.epochs + 1):
        train_loader.sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        try:
            train_stats = train_one_epoch(train_model, train_loader, optimizer, scaler, recipe=recipe,
                                          epoch=epoch, device=device, progress=progress and rank == 0)
        except FinetuneError as diverged:
            log.status("failed", epoch=epoch - 1, reason=str(diverged))
            raise FinetuneError(f"{diverged}; the last good checkpoint is {run_dir / 'last.safetensors'} "
                                f"(epoch {epoch - 1}); lower optimizer.lr or set clip_grad") from None
        except KeyboardInterrupt:
            log.status("interrupted", epoch=epoch - 1, resume=f"finetune train --resume {run_dir}")
            raise
        scheduler.step()
        val = evaluate(model, val_loader, device=device, precision=recipe.precision)
        metrics = {"epoch": epoch, "train_loss": train_stats["loss"], "val_loss": val["loss"],
                   "val_top1": val["top1"], "val_top5": val["top5"], "lr": lr,
                   "images_per_s": train_stats["images_per_s"], "time_s": train_stats["time_s"]}
        state["epoch"] = epoch
        improved = not state["best"] or val["top1"] > max(b["val_top1"] for b in state["best"])
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        ckpt_metrics = {k: metrics[k] for k in ("val_top1", "val_top5", "val_loss", "train_loss")}
        previous_best, state["best"] = state["best"], _rank_best(state["best"], epoch, val["top1"], recipe.keep_best)
        if rank == 0:
            log.epoch(metrics)
            save_checkpoint(run_dir / "last.safetensors", model, epoch=epoch, metrics=ckpt_metrics,
                            recipe=recipe_to_dict(recipe))
            _write_best(run_dir, model, recipe, epoch, ckpt_metrics, previous_best, state["best"])
            _save_training_state(run_dir, optimizer, scheduler, scaler, state)
        if recipe.early_stop_patience and state["bad_epochs"] >= recipe.early_stop_patience:
            status = "stopped_early"
            log.say(f"early stop: val top-1 has not improved for {state['bad_epochs']} epochs")
            break

    best = state["best"][0] if state["best"] else None
    test = None
    if best is not None and splits.test is not None:
        _barrier()  # rank 0 has written the best checkpoint
        test = evaluate_checkpoint(run_dir / best["path"], splits.test, recipe, device, distributed=distributed)
        if rank == 0:
            store_result(run_dir / best["path"], "test", test, as_run=True)
    if rank == 0:
        log.status(status, epoch=state["epoch"], best_epoch=best and best["epoch"],
                   best_val_top1=best and best["val_top1"])
        log.close()
    cleanup_distributed()
    return RunResult(run_dir, best["val_top1"] if best else float("nan"), best["epoch"] if best else 0,
                     run_dir / best["path"] if best else None, status, test)


# ============================================================================ one epoch, evaluation
def train_one_epoch(model, loader, optimizer, scaler, *, recipe: Recipe, epoch: int, device: torch.device,
                    progress: bool = True) -> Dict[str, float]:
    """One pass over `loader` with gradient accumulation, clipping and autocast."""
    model.train()
    autocast = _autocast(device, recipe.precision)
    accum, steps, micro = recipe.grad_accum, 0, 0
    loss_sum, images, start = torch.zeros((), device=device), 0, time.perf_counter()
    # disable=None: a bar on a terminal only, so logs and CI output stay clean.
    bar = tqdm(loader, desc=f"epoch {epoch}/{recipe.epochs}", disable=None if progress else True, leave=False,
               unit="batch")
    optimizer.zero_grad(set_to_none=True)
    for batch_images, labels in bar:
        if labels.numel() == 0:  # every image of this batch was unreadable (skipped with a warning)
            continue
        batch_images, labels = batch_images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        micro += 1
        sync = micro % accum == 0
        with (contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()):
            with autocast:
                loss = F.cross_entropy(model(batch_images), labels, label_smoothing=recipe.label_smoothing)
            _stop_if_not_finite(loss, epoch, micro)
            scaler.scale(loss * _share_of_global_batch(labels.numel(), device) / accum).backward()
        loss_sum += loss.detach() * labels.numel()
        images += labels.numel()
        if sync:
            _optimizer_step(model, optimizer, scaler, recipe.clip_grad)
            steps += 1
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{images / (time.perf_counter() - start):.1f}")
            if recipe.max_steps_per_epoch and steps >= recipe.max_steps_per_epoch:
                break
    if micro % accum:  # a last, incomplete accumulation still counts
        _optimizer_step(model, optimizer, scaler, recipe.clip_grad)
    totals = _all_reduce(torch.stack([loss_sum.float(), torch.tensor(float(images), device=device)]))
    elapsed = time.perf_counter() - start
    return {"loss": (totals[0] / totals[1].clamp(min=1)).item(), "images_per_s": totals[1].item() / elapsed,
            "time_s": elapsed}


def _share_of_global_batch(local_n: int, device) -> float:
    """Loss weight that makes DDP's gradient average equal the mean over the global batch, also
    when processes hold different numbers of images (the last batch, skipped unreadable images)."""
    if not dist.is_initialized():
        return 1.0
    global_n = _all_reduce(torch.tensor(float(local_n), device=device)).item()
    return local_n * dist.get_world_size() / global_n


def _optimizer_step(model, optimizer, scaler, clip_grad: Optional[float]) -> None:
    if clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _stop_if_not_finite(loss: torch.Tensor, epoch: int, step: int) -> None:
    bad = (~torch.isfinite(loss.detach())).float()
    if _all_reduce(bad).item() > 0:  # every process takes the same decision
        raise FinetuneError(f"training diverged: loss is {loss.item()} at epoch {epoch} batch {step}")


@torch.no_grad()
def evaluate(model, loader, *, device=None, precision: str = "fp32") -> Dict[str, Any]:
    """Loss, top-1, top-5 (None below 5 classes), per-class accuracy and confusion matrix.

    Under DDP each process evaluates its shard and the sums are all-reduced, so every process
    returns the scores of the whole split.
    """
    model = getattr(model, "module", model)
    device = device or next(model.parameters()).device
    num_classes = model.num_classes
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-5 correct, count
    with _autocast(device, precision):
        for images, labels in loader:
            if labels.numel() == 0:
                continue
            images, labels = images.to(device), labels.to(device)
            logits = model(images).float()
            sums[0] += F.cross_entropy(logits, labels, reduction="sum")
            if num_classes >= 5:
                sums[1] += (logits.topk(5, dim=1).indices == labels[:, None]).any(1).sum()
            sums[2] += labels.numel()
            confusion.index_put_((labels, logits.argmax(1)), torch.ones_like(labels, dtype=torch.float64),
                                 accumulate=True)
    sums, confusion = _all_reduce(sums), _all_reduce(confusion)
    n = max(sums[2].item(), 1)
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    return {"loss": sums[0].item() / n, "top1": confusion.diag().sum().item() / n,
            "top5": sums[1].item() / n if num_classes >= 5 else None, "n": int(sums[2].item()),
            "per_class": per_class, "confusion": confusion.long().tolist()}


def evaluate_checkpoint(path, dataset, recipe: Recipe, device=None, batch_size: Optional[int] = None,
                        distributed: bool = False):
    model = load_model(str(path)).to(device or "cpu")
    loader = data_lib.build_loader(dataset, batch_size=batch_size or recipe.batch_size, train=False,
                                   workers=recipe.data.workers, distributed=distributed)
    return evaluate(model, loader, device=device, precision=recipe.precision)


def split_loader(recipe: Recipe, model, split: str = "val", batch_size: Optional[int] = None):
    """An evaluation DataLoader over `split` ('train', 'val' or 'test') of the recipe's dataset,
    transformed with `model`'s own data config and resolution."""
    config = data_config_of(model)
    splits = build_splits(recipe, config["input_size"][-1], config, augment="none")
    dataset = getattr(splits, split, None) if split in ("train", "val", "test") else None
    if dataset is None:
        raise FinetuneError(f"split: {split!r} is not available for dataset {recipe.data.dataset}; "
                            f"use val{' or test' if splits.test is not None else ''}")
    class_names = getattr(model, "finetune_info", {}).get("class_names")
    if class_names and list(class_names) != list(splits.class_names):
        raise FinetuneError(f"the checkpoint's classes {class_names[:3]}... differ from the dataset's "
                            f"{splits.class_names[:3]}...: wrong --recipe or data root?")
    return data_lib.build_loader(dataset, batch_size=batch_size or recipe.batch_size, train=False,
                                 workers=recipe.data.workers)


def build_splits(recipe: Recipe, img_size: int, data_config: Dict[str, Any], augment: Optional[str] = None):
    root = resolve_path(recipe, recipe.data.root) if recipe.data.root else None
    return data_lib.build_datasets(recipe.data.dataset, root, img_size=img_size, data_config=data_config,
                                   augment=augment or recipe.data.augment, val_split=recipe.data.val_split,
                                   test_split=recipe.data.test_split, seed=recipe.seed)


# ========================================================================== optimiser and schedule
def build_optimizer(recipe: Recipe, model) -> torch.optim.Optimizer:
    o = recipe.optimizer
    # No weight decay on biases, norms, tokens and position embeddings (timm / ViT practice).
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or "pos_embed" in n)]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    return torch.optim.AdamW(groups, lr=o.lr)


def build_scheduler(recipe: Recipe, optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-epoch lr factor: `step` multiplies by gamma every step_size epochs; `cosine` warms up
    linearly for warmup_epochs, then decays to 0 on a half cosine; `none` keeps lr."""
    s, total = recipe.schedule, recipe.epochs

    def factor(done_epochs: int) -> float:
        if s.name == "step":
            return s.gamma ** (done_epochs // s.step_size)
        if s.name == "cosine":
            if done_epochs < s.warmup_epochs:
                return (done_epochs + 1) / (s.warmup_epochs + 1)
            progress = (done_epochs - s.warmup_epochs) / max(1, total - s.warmup_epochs)
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# =============================================================================== best checkpoints
def _rank_best(best: List[Dict[str, Any]], epoch: int, val_top1: float, keep: int) -> List[Dict[str, Any]]:
    """The `keep` best epochs by val top-1 (earlier epoch first on ties), this one included if it ranks."""
    candidate = {"epoch": epoch, "path": f"epoch-{epoch:03d}.safetensors", "val_top1": val_top1}
    return sorted(best + [candidate], key=lambda b: (-b["val_top1"], b["epoch"]))[:keep]


def _write_best(run_dir: Path, model, recipe: Recipe, epoch: int, metrics: Dict[str, Any],
                previous: List[Dict[str, Any]], kept: List[Dict[str, Any]]) -> None:
    """Write this epoch if it ranks, update best.json, then delete the checkpoint it pushed out.

    The order never loses work: the new file first, then the index, then the deletion.
    """
    if any(b["epoch"] == epoch for b in kept):
        save_checkpoint(run_dir / f"epoch-{epoch:03d}.safetensors", model, epoch=epoch, metrics=metrics,
                        recipe=recipe_to_dict(recipe))
    index = {"metric": "val_top1", "keep": recipe.keep_best, "checkpoints": kept}
    atomic_write(run_dir / "best.json", lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    for entry in previous:
        if entry not in kept:
            (run_dir / entry["path"]).unlink(missing_ok=True)


# ==================================================================================== resume state
def _save_training_state(run_dir: Path, optimizer, scheduler, scaler, state: Dict[str, Any]) -> None:
    payload = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "scaler": scaler.state_dict(), "epoch": state["epoch"], "best": state["best"],
               "bad_epochs": state["bad_epochs"], "rng": _rng_state()}
    atomic_write(run_dir / STATE_FILE, lambda tmp: torch.save(payload, tmp))


def _check_resumable(run_dir: Path) -> Path:
    if not (run_dir / "last.safetensors").is_file() or not (run_dir / STATE_FILE).is_file():
        raise FinetuneError(f"{run_dir}: nothing to resume (needs last.safetensors and {STATE_FILE} from a "
                            "finished epoch)")
    return run_dir


def _restore_training_state(run_dir: Path, optimizer, scheduler, scaler) -> Dict[str, Any]:
    path = run_dir / STATE_FILE
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise FinetuneError(f"{path}: unreadable resume state ({e})") from e
    epoch_of_weights = read_meta(run_dir / "last.safetensors").get("epoch")
    if epoch_of_weights != payload["epoch"]:
        raise FinetuneError(f"{run_dir}: last.safetensors is epoch {epoch_of_weights} but {STATE_FILE} is epoch "
                            f"{payload['epoch']}; the run was interrupted between the two saves, so the optimizer state does not "
                            f"match the weights: start a new run from them with --set model={run_dir / 'last.safetensors'}")
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    scaler.load_state_dict(payload["scaler"])
    _set_rng_state(payload["rng"])
    return {"epoch": payload["epoch"], "best": payload["best"], "bad_epochs": payload["bad_epochs"]}


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def _set_rng_state(rng: Dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(rng["python"]), None))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


# ========================================================================================= logging
class RunLog:
    """metrics.jsonl + TensorBoard + console + status.json, written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, resume_after: Optional[int] = None):
        self.run_dir, self.enabled, self.writer = run_dir, enabled, None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_after is not None:
            self._truncate_metrics_after(resume_after)
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(run_dir / "tb"))

    def _truncate_metrics_after(self, epoch: int) -> None:
        # Epochs logged after the last saved checkpoint will be trained again: forget them.
        path = self.run_dir / "metrics.jsonl"
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if _epoch_of(line) <= epoch]
            path.write_text("".join(line + "\n" for line in kept))

    def epoch(self, metrics: Dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if key != "epoch" and value is not None:
                self.writer.add_scalar(key, value, metrics["epoch"])
        self.writer.flush()
        top5 = f" top-5 {metrics['val_top5']:.4f}" if metrics["val_top5"] is not None else ""
        self.say(f"epoch {metrics['epoch']:3d}  train loss {metrics['train_loss']:.4f}  val loss "
                 f"{metrics['val_loss']:.4f}  top-1 {metrics['val_top1']:.4f}{top5}  lr {metrics['lr']:.2e}  "
                 f"{metrics['images_per_s']:.1f} img/s")

    def status(self, state: str, **details: Any) -> None:
        if self.enabled:
            body = {"state": state, "updated": datetime.now().isoformat(timespec="seconds"), **details}
            atomic_write(self.run_dir / "status.json", lambda tmp: Path(tmp).write_text(json.dumps(body, indent=2)))

    def say(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _epoch_of(line: str) -> int:
    try:
        return int(json.loads(line)["epoch"])
    except (ValueError, KeyError, TypeError):
        return 10**9  # a damaged line is dropped


# ====================================================================================== processes
def setup_distributed():
    """(rank, world_size, device); initialises the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return rank, world_size, torch.device("cuda", local_rank)
    return rank, world_size, torch.device("cpu")


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _wrap_ddp(model, device: torch.device, world_size: int):
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def _agree_on_run_dir(out_dir: Optional[str], name: str, rank: int) -> Path:
    chosen = [out_dir or f"runs/{name}-{datetime.now():%Y%m%d-%H%M%S}"]
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    path = Path(chosen[0])
    if (path / "last.safetensors").exists():  # every process checks, so all stop together
        raise FinetuneError(f"{path}: already holds a run; use --resume {path} to continue it or another --out")
    return path


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
    data = dataclasses.replace(recipe.data, root=resolve_path(recipe, recipe.data.root) if recipe.data.root else None)
    return dataclasses.replace(recipe, model=_resolve_model_ref(recipe), data=data)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def train_recipe(name_or_path: str, overrides=(), out_dir: Optional[str] = None, progress: bool = True) -> RunResult:
    """Load a recipe by name or path, apply `key=value` overrides, and train it."""
    return train(load_recipe(name_or_path, overrides), out_dir=out_dir, progress=progress)


def resume_run(run_dir: str, overrides=(), progress: bool = True) -> RunResult:
    """Continue the run in `run_dir` from its last finished epoch (overrides may extend `epochs`)."""
    recipe_file = Path(run_dir) / "recipe.yaml"
    if not recipe_file.is_file():
        raise FinetuneError(f"{run_dir}: not a run directory (no recipe.yaml)")
    return train(load_recipe(str(recipe_file), overrides), resume=run_dir, progress=progress)
