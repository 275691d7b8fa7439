"""Wall time and best val top-1 of a real fine-tune: `finetune train` vs timm's `train.py` vs Hugging Face's `Trainer`.

    python -m benchmarks.vs_peers --timm-train /tmp/timm-src/train.py [--repeats 2] [--epochs 3]
        [--only finetune,timm,hf] [--configs default,bf16] [--json results.json]

The peers' code is not part of this repository: timm's `train.py` comes from a checkout of
huggingface/pytorch-image-models (it is not in the timm wheel), the `Trainer` from the installed
`transformers`, whose image-folder loading needs `datasets` (`pip install datasets`).

All three fine-tune the real DeiT-Tiny weights of `../shared/weights` on the hymenoptera photos of
`../shared/data` (train / val) with the same hyper-parameters, those of
`recipes/hymenoptera-deit-tiny.yaml` but `--epochs` (default 3): 224 px, batch 32, plain momentum SGD
lr 0.001 momentum 0.9, no weight decay, cosine decay without warm-up, RandomResizedCrop(scale 0.6-1,
bicubic) + flip, eval resize 248 / center crop 224 (the weights' crop_pct 0.9), ImageNet mean/std,
2 loader workers, eval every epoch, best 3 checkpoints kept, no gradient clipping (the Trainer's
default `max_grad_norm=1.0` is turned off: these gradients have norm ~8, so it would cut every step
~8x). timm's flags come from `benchmarks/vs_timm_train.py`; the `Trainer` script is `HF_SCRIPT`
below, written to a temp file. One difference is left by default: `finetune` and timm set the
cosine lr once per epoch, the Trainer's usual schedule per step (`--hf-schedule epoch` gives it the
others' per-epoch values).

Two configurations: `default` (each tool's own default precision: `finetune`'s `auto`, bf16 only where
the device runs it faster, the row names what it chose; timm fp32; Trainer fp32) and `bf16` (bf16 autocast everywhere:
`--set precision=bf16`, `--amp --amp-dtype bfloat16`, `bf16=True`). Each side is the whole command in
its own process, the order reversed every other repeat; reported per configuration: the median wall
time of the command (start-up, data, training, evaluation, checkpoints; `finetune train` also draws
its pictures unless `--no-pictures`), the best val top-1 each reached (median over repeats), and
finetune's wall time over each peer's (below 1 = finetune is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.vs_timm_train import DATA, REPO, WEIGHTS, finetune_best, finetune_command, run, timm_best, timm_command

LEGS = ("finetune", "timm", "hf")
LABELS = {"finetune": "`finetune train hymenoptera-deit-tiny`", "timm": "timm `train.py`", "hf": "HF `Trainer`"}
CONFIGS = ("default", "bf16")
RESULT_TAG = "VS_PEERS_RESULT "

# The Trainer side, run as `python SCRIPT CONFIG_JSON` with the same interpreter as the others.
HF_SCRIPT = r'''
import json, math, sys
import numpy as np
import torch
import timm
import transformers
from datasets import load_dataset
from torchvision import transforms as T
from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

cfg = json.loads(sys.argv[1])
ARCH, SIZE, BATCH = "deit_tiny_patch16_224", 224, 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # IMAGENET_DEFAULT_MEAN/STD, as the weights' cfg
bicubic = T.InterpolationMode.BICUBIC
# timm's train transform for these flags (scale 0.6-1, ratio 3/4-4/3, bicubic, flip, no jitter,
# no random erasing) and its eval transform (resize floor(224 / 0.9) = 248, center crop 224).
train_tf = T.Compose([T.RandomResizedCrop(SIZE, scale=(0.6, 1.0), interpolation=bicubic), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(MEAN, STD)])
eval_tf = T.Compose([T.Resize(int(SIZE / 0.9), interpolation=bicubic), T.CenterCrop(SIZE), T.ToTensor(),
                     T.Normalize(MEAN, STD)])

data = load_dataset("imagefolder", data_dir=cfg["data_dir"], cache_dir=cfg["cache_dir"])
train, val = data["train"], data["validation"]  # imagefolder maps the `val` folder to "validation"
assert train.features["label"].names == val.features["label"].names, (train.features, val.features)


def transform(tf):
    return lambda batch: {"pixel_values": [tf(image.convert("RGB")) for image in batch["image"]],
                          "labels": batch["label"]}


train.set_transform(transform(train_tf))
val.set_transform(transform(eval_tf))


def collate(examples):
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples])}


num_classes = train.features["label"].num_classes
kind = cfg["model"]
if kind == "auto":
    kind = "timm-wrapper" if hasattr(transformers, "TimmWrapperForImageClassification") else "plain"
if kind == "timm-wrapper":
    from safetensors.torch import load_file
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture=ARCH, num_labels=num_classes))
    # The new head keeps the wrapper's init (normal, std 0.02); every other tensor from the weights.
    state = {k: v for k, v in load_file(cfg["weights"]).items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert sorted(missing) == ["timm_model.head.bias", "timm_model.head.weight"] and not unexpected, \
        (missing, unexpected)
else:
    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.timm_model = timm.create_model(ARCH, pretrained=True, num_classes=num_classes,
                                                pretrained_cfg_overlay=dict(file=cfg["weights"]))

        def forward(self, pixel_values, labels=None):
            logits = self.timm_model(pixel_values)
            loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
            return {"loss": loss, "logits": logits}

    model = Classifier()

steps_per_epoch = math.ceil(len(train) / BATCH)  # the Trainer keeps the last partial batch
optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=0.0)
if cfg["schedule"] == "step":  # the Trainer's own: a half cosine over every step, to 0 at the last one
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=0,
                                               num_training_steps=steps_per_epoch * cfg["epochs"])
else:  # finetune's and timm's: one lr per epoch, 0.5 * (1 + cos(pi * (epoch - 1) / epochs))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(
        math.pi * min(step // steps_per_epoch, cfg["epochs"] - 1) / cfg["epochs"])))


def accuracy(prediction):
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.asarray(logits).argmax(-1) == prediction.label_ids).mean())}


args = TrainingArguments(
    output_dir=cfg["out"], num_train_epochs=cfg["epochs"], per_device_train_batch_size=BATCH,
    per_device_eval_batch_size=BATCH, eval_strategy="epoch", save_strategy="epoch", save_total_limit=3,
    metric_for_best_model="accuracy", greater_is_better=True,  # the best checkpoint survives the rotation
    logging_strategy="epoch", dataloader_num_workers=2, report_to=[], use_cpu=True, bf16=cfg["bf16"],
    max_grad_norm=0.0,  # the Trainer clips at 1.0 by default; the recipe (and timm) do not clip
    remove_unused_columns=False, disable_tqdm=True, seed=0)
trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, data_collator=collate,
                  compute_metrics=accuracy, optimizers=(optimizer, schedule))
trainer.train()
evals = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry]
print("VS_PEERS_RESULT " + json.dumps({
    "model": kind, "schedule": cfg["schedule"], "best_val_top1": max(e["eval_accuracy"] for e in evals),
    "val_top1_by_epoch": [e["eval_accuracy"] for e in evals], "steps": trainer.state.global_step,
    "train_images": len(train), "val_images": len(val)}), flush=True)
'''


def _set_flag(command: list, flag: str, value: str) -> list:
    """`command` with the value after `flag` replaced (timm_command fixes `--epochs 5`)."""
    if flag not in command:
        raise ValueError(f"{flag} not in {command}")
    command = list(command)
    command[command.index(flag) + 1] = value
    return command


def leg_command(leg: str, config: str, out: Path, args, hf_script: Path) -> list:
    if leg == "finetune":
        command = finetune_command(out, pictures=not args.no_pictures) + ["--set", f"epochs={args.epochs}"]
        return command + (["--set", "precision=bf16"] if config == "bf16" else [])
    if leg == "timm":
        command = _set_flag(timm_command(args.timm_train.resolve(), out), "--epochs", str(args.epochs))
        return command + (["--amp", "--amp-dtype", "bfloat16"] if config == "bf16" else [])
    hf_config = dict(data_dir=str(DATA), weights=str(WEIGHTS), out=str(out), cache_dir=str(out / "datasets-cache"),
                     epochs=args.epochs, bf16=config == "bf16", model=args.hf_model, schedule=args.hf_schedule)
    return [sys.executable, str(hf_script), json.dumps(hf_config)]


def leg_result(leg: str, out: Path, log: str) -> dict:
    if leg == "finetune":
        found = re.findall(r"precision (\w+) \(", log)  # what `auto` resolved to, from its log
        return {"best_val_top1": finetune_best(out), "precision": found[-1] if found else None}
    if leg == "timm":
        return {"best_val_top1": timm_best(log)}
    lines = [line for line in log.splitlines() if line.startswith(RESULT_TAG)]
    return json.loads(lines[-1][len(RESULT_TAG):]) if lines else {"best_val_top1": float("nan")}


def machine() -> dict:
    import timm
    import torch
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for name in ("transformers", "datasets", "accelerate"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def _ratio(finetune_s, peer_s) -> str:
    return f"{finetune_s / peer_s:.2f}" if finetune_s and peer_s else "-"


def table(results: dict, args) -> str:
    """The markdown table for BENCHMARKS.md: one row per (configuration, command)."""
    rows = [f"| config | command ({args.epochs} epochs, {args.repeats} repeat(s), order alternated) | wall s, median "
            f"| finetune / this, wall | best val top-1, median |",
            "| --- | --- | --- | --- | --- |"]
    for config in args.configs:
        walls = {leg: statistics.median(results[config][leg]["wall_s"]) if results[config][leg]["wall_s"] else None
                 for leg in args.only}
        for leg in args.only:
            runs = results[config][leg]
            best = [b for b in runs["best_val_top1"] if b == b]  # NaN: the log had no accuracy
            wall = f"{walls[leg]:.0f}" if walls[leg] else "failed"
            ratio = _ratio(walls.get("finetune"), walls[leg]) if "finetune" in walls else "-"
            label = LABELS[leg] + (f" ({runs['detail']})" if runs.get("detail") else "")
            top1 = f"{statistics.median(best):.1%}" if best else "-"
            rows.append(f"| {config} | {label} | {wall} | {ratio} | {top1} |")
    return "\n".join(rows)


def _detail(leg: str, config: str, result: dict) -> str:
    if leg == "finetune":
        return f"precision {result['precision']}" if result.get("precision") else ""
    if leg == "timm":
        return "bf16 autocast" if config == "bf16" else "fp32"
    return (f"{result.get('model', '?')}, {'bf16 autocast' if config == 'bf16' else 'fp32'}, "
            f"cosine per {result.get('schedule', '?')}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-train", type=Path, help="timm's train.py, from a checkout of pytorch-image-models "
                                                        "(needed unless --only leaves timm out)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--only", default=",".join(LEGS), help="comma-separated subset of " + ",".join(LEGS))
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--json", type=Path, help="also write the raw results (every run) here")
    parser.add_argument("--no-pictures", action="store_true", help="pass --no-pictures to finetune train")
    parser.add_argument("--hf-model", choices=("auto", "timm-wrapper", "plain"), default="auto",
                        help="Trainer's model: transformers' TimmWrapperForImageClassification (auto: when the "
                             "installed transformers has it) or a plain nn.Module around timm.create_model")
    parser.add_argument("--hf-schedule", choices=("step", "epoch"), default="step",
                        help="Trainer's cosine: per step (its usual get_cosine_schedule_with_warmup, down to 0 at "
                             "the last step) or per epoch (the lr finetune and timm train.py use: constant within an "
                             "epoch, 1, 0.75, 0.25 of lr over 3 epochs)")
    args = parser.parse_args(argv)
    args.only = [leg.strip() for leg in args.only.split(",") if leg.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not args.only or set(args.only) - set(LEGS):
        parser.error(f"--only: expected a comma-separated subset of {','.join(LEGS)}, got {args.only}")
    if not args.configs or set(args.configs) - set(CONFIGS):
        parser.error(f"--configs: expected a comma-separated subset of {','.join(CONFIGS)}, got {args.configs}")
    if args.repeats < 1 or args.epochs < 1:
        parser.error("--repeats and --epochs must be >= 1")
    if "timm" in args.only and (args.timm_train is None or not args.timm_train.is_file()):
        parser.error("the timm leg needs --timm-train PATH/TO/train.py (git clone "
                     "https://github.com/huggingface/pytorch-image-models), or leave it out with --only")
    if "hf" in args.only:
        try:
            import datasets  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            parser.error(f"the hf leg needs transformers and datasets (pip install transformers datasets): {e}")
    if not WEIGHTS.is_file() or not DATA.is_dir():
        raise SystemExit(f"needs {WEIGHTS} and {DATA} (../shared beside the checkout)")

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable); python {info['python']}, "
          f"torch {info['torch']}, timm {info['timm']}, transformers {info['transformers']}, "
          f"datasets {info['datasets']}, accelerate {info['accelerate']}", flush=True)
    results = {c: {leg: {"wall_s": [], "best_val_top1": [], "runs": []} for leg in args.only} for c in args.configs}
    failures = 0
    # The same environment for every side; no side may reach the network (the weights are a local file).
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    previous_env = dict(os.environ)
    os.environ.update(env)  # vs_timm_train.run passes no env: its children inherit this process's
    try:
        with tempfile.TemporaryDirectory(prefix="vs-peers-") as tmp:
            hf_script = Path(tmp) / "hf_trainer.py"
            hf_script.write_text(HF_SCRIPT)
            for repeat in range(args.repeats):
                for config in args.configs:
                    order = args.only if repeat % 2 == 0 else args.only[::-1]
                    for leg in order:
                        out = Path(tmp) / f"{config}-{leg}-{repeat}"
                        command = leg_command(leg, config, out, args, hf_script)
                        try:
                            seconds, log = run(command, REPO)
                        except SystemExit as failed:  # run() exits with the command's stderr tail
                            failures += 1
                            print(f"[{config}] {leg} repeat {repeat}: FAILED\n{failed}", flush=True)
                            results[config][leg]["runs"].append({"repeat": repeat, "command": command,
                                                                  "error": str(failed)})
                            continue
                        result = leg_result(leg, out, log)
                        entry = results[config][leg]
                        entry["wall_s"].append(seconds)
                        entry["best_val_top1"].append(result["best_val_top1"])
                        entry["detail"] = _detail(leg, config, result)
                        entry["runs"].append(dict(result, repeat=repeat, wall_s=seconds, command=command))
                        print(f"[{config}] {leg} repeat {repeat}: {seconds:.1f} s, best val top-1 "
                              f"{result['best_val_top1']:.1%}" + (f" ({entry['detail']})" if entry["detail"] else ""),
                              flush=True)
    finally:
        os.environ.clear()
        os.environ.update(previous_env)

    print()
    print(f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, timm {info['timm']}, "
          f"transformers {info['transformers']}, datasets {info['datasets']}.")
    print()
    print(table(results, args))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "epochs": args.epochs, "repeats": args.repeats,
                                         "results": results}, indent=2, default=str))
        print(f"\nraw results: {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
