"""The `finetune` command: one verb per capability, each a thin layer over the Python API.

Errors a user can cause are `FinetuneError`s: printed as one `error: ...` line, exit status 2.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Optional, Sequence

import click

from .errors import FinetuneError

SPLITS = ("val", "test")
FORMATS = ("markdown", "csv", "json")
DEVICE_HELP = "Where to score: cpu, cuda, cuda:N (default: CUDA when present, else the CPU)."
TTA_CHOICES = ("flip", "crops")  # finetune.calibration.TTA_MODES, without importing torch for --help
TTA_HELP = ("Test-time augmentation, probabilities averaged over the passes: flip = the image and its mirror; "
            "crops = the image and five zoomed crops (corners and centre, 7/8 of the side).")


def device_option(command):
    return click.option("--device", default=None, help=DEVICE_HELP)(command)


def split_figure_options(command):
    """RUN_OR_CKPT, --split, --recipe, -o/--out and --device: a figure drawn from a split's data."""
    for option in reversed((
            click.argument("run_or_ckpt", type=click.Path()),
            click.option("--split", type=click.Choice(SPLITS), default="val", show_default=True),
            click.option("--recipe", default=None, help="Recipe for the data (default: the one stored in the checkpoint)."),
            click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output PNG."),
            device_option)):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Fine-tune pretrained Vision Transformers for your own classes."""


# ------------------------------------------------------------------------------------- loading
@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_cmd(as_json: bool) -> None:
    """List the model zoo: parameters, resolution, sources, and which weights are cached."""
    from .loading import zoo_table
    rows = zoo_table()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'name':6} {'params':>8} {'res':>4}  sources (* = cached; first = default)")
    for row in rows:
        sources = "  ".join(("*" if s["cached"] else "") + s["ref"] for s in row["sources"])
        click.echo(f"{row['name']:6} {row['params_m']:>7}M {row['img_size']:>4}  {sources}")
    from .hubs import hf_cache_dir, torch_hub_checkpoints
    click.echo(f"\ncaches: torch hub {torch_hub_checkpoints()}  |  Hugging Face {hf_cache_dir()}")


@cli.command("info")
@click.argument("ref")
@click.option("--num-classes", type=int, default=None, help="Head size to build (default: the weights').")
@click.option("--img-size", type=int, default=None, help="Resolution to build (default: the weights').")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info_cmd(ref: str, num_classes: Optional[int], img_size: Optional[int], as_json: bool) -> None:
    """Load REF (zoo name, ppv:/timm:/hf:/npz: ref or checkpoint) and describe the model."""
    from .loading import load_model
    model = load_model(ref, num_classes=num_classes, img_size=img_size)
    info = dict(model.finetune_info, params=sum(p.numel() for p in model.parameters()))
    names = info.pop("class_names") or []
    info["class_names"] = names[:10] + (["..."] if len(names) > 10 else [])
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    for key, value in info.items():
        click.echo(f"{key:12} {value}")


@cli.command("export")
@click.argument("checkpoint", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--to", "layout", type=click.Choice(["onnx", "transformers", "timm", "ppv"]), required=True,
              help="onnx: one .onnx file (+ OUT.md model card); transformers: a ViTForImageClassification folder; "
                   "timm: a Hub-ready timm folder; ppv: pytorch-pretrained-vit's ViT state dict.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (a folder only if it is an earlier export).")
@click.option("--push-to-hub", "push_to_hub", default=None, metavar="ORG/NAME",
              help="Then upload the export to this Hugging Face Hub repo (huggingface_hub; your saved token).")
@click.option("--eval/--no-eval", "score", default=True, show_default=True,
              help="Score val and test now for the model card (per-class accuracy, split sizes); "
                   "--no-eval: only the scores stored with the checkpoint.")
@device_option
def export_cmd(checkpoint: str, out: str, layout: str, force: bool, push_to_hub: Optional[str], score: bool,
               device: Optional[str]) -> None:
    """Write CHECKPOINT (a checkpoint, or a run directory: its best) for another library at OUT.

    onnx, transformers and timm exports are loaded back with that library alone and their logits
    compared with finetune's before anything is written; they carry a model card (README.md).
    """
    from .export import export
    export(checkpoint, out, layout, force=force, push_to_hub=push_to_hub, score=score, device=device,
           log=click.echo)


# ------------------------------------------------------------------------------------- training
def _progress(no_progress: bool) -> bool:
    """Whether bars are drawn; --no-progress also quiets downloads (ours and the Hub's, in DDP children too)."""
    if no_progress:
        from .download import set_progress
        set_progress(False)
    return not no_progress


@cli.command("train")
@click.argument("recipe", required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field (dotted keys, repeatable): --set optimizer.lr=0.01")
@click.option("--out", default=None, help="Run directory (default runs/<recipe>-<timestamp>).")
@click.option("--resume", default=None, type=click.Path(file_okay=False),
              help="Continue the run in this directory from its last finished epoch.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
@click.option("--force", is_flag=True, help="Write into a non-empty --out that is not a run directory.")
@click.option("--no-pictures", is_flag=True, help="Do not write curves.png and confusion.png at the end.")
def train_cmd(recipe: Optional[str], overrides: Sequence[str], out: Optional[str], resume: Optional[str],
              no_progress: bool, force: bool, no_pictures: bool) -> None:
    """Fine-tune as RECIPE (a name in recipes/ or a .yaml path) says.

    SIGINT (Ctrl-C) or SIGTERM finishes the current step, saves a resume point and exits
    128+signal; `--resume RUN_DIR` continues exactly where it stopped. With --resume, --set may
    change epochs, the lr, the schedule and a few other keys, from the next epoch on.
    """
    from .checkpoints import refuse_onnx
    from .engine import resume_run, train_recipe
    if recipe:
        refuse_onnx(recipe)
    if resume and recipe:
        raise FinetuneError(f"train: give a RECIPE or --resume {resume}, not both (a resume reads the run's "
                            "own recipe.yaml; change keys with --set)")
    if resume:
        result = resume_run(resume, overrides, progress=_progress(no_progress))
    elif recipe:
        result = train_recipe(recipe, overrides, out_dir=out, progress=_progress(no_progress), force=force)
    else:
        raise FinetuneError("train: give a RECIPE (e.g. pets37, demo, or a .yaml path) or --resume RUN_DIR")
    _print_result(result, pictures=not no_pictures)


def _print_result(result, pictures: bool = True) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from .evaluation import fraction
    label = {"top1": "top-1"}.get(result.metric, result.metric)
    test = f", test {label} {fraction(result.test[result.metric])}" if result.test else ""
    click.echo(f"run: {result.run_dir}  ({result.status})")
    click.echo(f"best val {label} {result.best_val_score:.4f} at epoch {result.best_epoch}{test}: "
               f"{result.best_checkpoint}")
    if pictures and result.best_checkpoint:
        from .tracking import attach
        from .viz import write_run_pictures
        paths = write_run_pictures(result.run_dir, val_report=result.best_val)
        for path in paths:
            click.echo(f"picture: {path}")
        attach(result.run_dir, paths)  # the trackers of the run get the pictures drawn after it


@cli.command("sweep")
@click.argument("recipe")
@click.option("--grid", "grid", multiple=True, required=True, metavar="KEY=V1,V2,...",
              help="A recipe key and its values (YAML scalars), repeatable: --grid optimizer.lr=0.001,0.003 "
                   "--grid label_smoothing=0,0.1 runs every combination.")
@click.option("--random", "random_trials", type=click.IntRange(min=1), default=None, metavar="N",
              help="Run N combinations drawn from the grid (without replacement, seeded by --seed) instead of all.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --random draw.")
@click.option("--out", default=None, help="Sweep directory (default runs/sweep-<recipe>); the same command "
                                          "run again continues the sweep in it.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field in every trial (repeatable): --set epochs=3")
@click.option("--launcher", default=None, metavar="COMMAND",
              help="Run each trial as `COMMAND -m finetune train ...` in a subprocess, e.g. "
                   "--launcher 'torchrun --nproc_per_node 8' (default: in this process).")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
def sweep_cmd(recipe: str, grid: Sequence[str], random_trials: Optional[int], seed: int, out: Optional[str],
              overrides: Sequence[str], launcher: Optional[str], no_progress: bool) -> None:
    """Train RECIPE once per combination of --grid values, one ordinary run per trial under --out.

    Trials run one after the other; the sweep directory's sweep.json records the grid and every
    trial's overrides, run directory and state. Running the same command again skips finished
    trials, resumes interrupted or crashed ones and trains the rest; another grid in the same
    directory is refused. Ends with the comparison table of all trials. Soup them with
    `finetune soup DIR --method greedy`.
    """
    from pathlib import Path
    from .sweep import parse_grid, run_sweep, summary_lines
    parsed = parse_grid(grid)
    out = out or f"runs/sweep-{Path(recipe).stem}"
    result = run_sweep(recipe, parsed, out, random_trials=random_trials, seed=seed, overrides=overrides,
                       launcher=launcher, progress=_progress(no_progress))
    click.echo("\n" + result.table + "\n")
    for line in summary_lines(result):
        click.echo(line)


@cli.command("eval")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--recipe", default=None, help="Recipe for the data (default: the one stored in the checkpoint).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field.")
@click.option("--split", type=click.Choice(["val", "test", "train"]), default="val", show_default=True)
@click.option("--batch-size", type=int, default=None)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--tta", type=click.Choice(TTA_CHOICES), default=None, help=TTA_HELP + " Reported beside the plain scores.")
@device_option
def eval_cmd(checkpoint: str, recipe: Optional[str], overrides: Sequence[str], split: str,
             batch_size: Optional[int], as_json: bool, tta: Optional[str], device: Optional[str]) -> None:
    """Top-1, top-5, per-class accuracy, loss and confusion matrix of CHECKPOINT (or an .onnx export)
    on a split, and its calibration (ECE, NLL, Brier) with its temperature and without; a multi-label
    checkpoint: mAP, F1 at its threshold (per class once calibrated), per-class AP and the calibration
    of its sigmoids."""
    from .calibration import evaluate_calibrated, report_lines
    from .evaluation import format_report
    from .export import evaluate_onnx_on_split, is_onnx
    if is_onnx(checkpoint):
        report = evaluate_onnx_on_split(checkpoint, recipe=recipe, overrides=overrides, split=split,
                                        batch_size=batch_size, device=device)
    else:
        report = evaluate_calibrated(checkpoint, recipe=recipe, overrides=overrides, split=split,
                                     batch_size=batch_size, device=device, tta=tta)
    click.echo(json.dumps(report, indent=2) if as_json else "\n".join([format_report(report), *report_lines(report)]))


@cli.command("calibrate")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Output .safetensors: CHECKPOINT with the temperature in its metadata (CHECKPOINT itself "
                   "with --force: replaced atomically).")
@click.option("--split", type=click.Choice(SPLITS), default="val", show_default=True,
              help="Split to fit on (fitted on test, calibration scores on test are optimistic).")
@click.option("--recipe", default=None, help="Recipe for the data (default: the one stored in the checkpoint).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe field.")
@click.option("--batch-size", type=int, default=None)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@device_option
def calibrate_cmd(checkpoint: str, out: str, split: str, recipe: Optional[str], overrides: Sequence[str],
                  batch_size: Optional[int], force: bool, as_json: bool, device: Optional[str]) -> None:
    """Fit a softmax temperature on a split (temperature scaling, Guo et al. 2017) and write
    CHECKPOINT with it to OUT; eval, predict and compare then use it. A multi-label checkpoint gets
    a temperature on its sigmoid and per-class thresholds (best F1 of each class on the split)."""
    from .calibration import calibrate_checkpoint, describe_calibration
    record = calibrate_checkpoint(checkpoint, out, split=split, recipe=recipe, overrides=overrides,
                                  batch_size=batch_size, device=device, force=force)
    click.echo(json.dumps(record, indent=2) if as_json else "\n".join(describe_calibration(record)))


@cli.command("predict")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--tta", type=click.Choice(TTA_CHOICES), default=None, help=TTA_HELP)
@device_option
def predict_cmd(checkpoint: str, images: Sequence[str], top_k: int, as_json: bool, tta: Optional[str],
                device: Optional[str]) -> None:
    """Top-k class names and probabilities for each IMAGE, with the checkpoint's temperature
    (multi-label: every label above the checkpoint's threshold, or its per-class thresholds once
    calibrated, with its probability); CHECKPOINT may be an .onnx export."""
    from .calibration import predict
    from .export import is_onnx, predict_onnx
    if is_onnx(checkpoint):
        results = predict_onnx(checkpoint, images, top_k=top_k, device=device)
    else:
        results = predict(checkpoint, images, top_k=top_k, device=device, tta=tta)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for item in results:
        ranked = "  ".join(f"{p['class']} {p['probability']:.3f}" for p in item.get("labels", item["top"]))
        nothing = ("(no label above its per-class threshold)" if item.get("thresholds")
                   else f"(no label above {item.get('threshold', 0.5):.2f})")
        click.echo(f"{item['image']}: {ranked or nothing}")


# ---------------------------------------------------------------------------------- soup, compare
@cli.command("soup")
@click.argument("ingredients", nargs=-1, required=True)
@click.option("-o", "--out", default=None, help="Output .safetensors (default: soup.safetensors, soup-METHOD"
              ".safetensors beside the first fine-tune, or in the run/sweep directory given).")
@click.option("--method", type=click.Choice(("uniform", "greedy", "wise", "stock", "learned")), default="uniform",
              show_default=True,
              help="uniform: the mean; greedy: add ingredients best first while the selection score improves; "
                   "wise: WiSE-FT, PRETRAINED_REF CHECKPOINT interpolated with each --alpha; stock: Model Stock, "
                   "PRETRAINED_REF CKPT CKPT [...], each tensor pulled from the fine-tunes' mean towards the "
                   "pretrained one by their angle; learned: mixing weights learned on --split by gradient descent.")
@click.option("--weights", default=None, help="Uniform only: comma-separated weights, one per ingredient.")
@click.option("--alpha", "alphas", default=None, metavar="A1,A2,...",
              help="wise: the alphas to try, 0 = the pretrained backbone, 1 = the fine-tune "
                   "(default 0,0.25,0.5,0.75,1); the best on --split is written.")
@click.option("--recipe", default=None, help="Recipe whose dataset scores the soup (default: the stored one).")
@click.option("--split", type=click.Choice(SPLITS), default="val", show_default=True,
              help="Split that greedy and wise select on (uniform: scores on); with val, the soup is also "
                   "scored on test when the data has a test split.")
@click.option("--allow-test-selection", is_flag=True,
              help="Let greedy/wise/learned select on --split test (their score there is then optimistic).")
@click.option("--no-eval", "no_eval", is_flag=True, help="Uniform and stock: do not score the soup.")
@click.option("--by-layer", is_flag=True, help="learned: one weight per ingredient and block, not per ingredient.")
@click.option("--epochs", type=int, default=None, help="learned: passes over --split (default 5).")
@click.option("--lr", type=float, default=None, help="learned: AdamW learning rate of the mixing weights (default 0.05).")
@click.option("--batch-size", type=int, default=None, help="learned: images per step (default: the recipe's).")
@click.option("--ensemble/--no-ensemble", default=None,
              help="Also score the logit ensemble of the ingredients (k forward passes per image) and report it "
                   "beside the soup (default: when the soup is scored from a known recipe).")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
@device_option
def soup_cmd(ingredients, out, method, weights, alphas, recipe, split, allow_test_selection, no_eval, by_layer,
             epochs, lr, batch_size, ensemble, force, device) -> None:
    """Average the weights of INGREDIENTS into one checkpoint.

    INGREDIENTS are checkpoints, run directories (their best checkpoints) or a sweep directory
    (every finished trial's best checkpoints, ranked by val top-1). With --method wise they are
    PRETRAINED_REF CHECKPOINT: the weights the fine-tune started from (any model ref) and the
    fine-tune (a checkpoint or run directory); with --method stock, PRETRAINED_REF then two or more
    fine-tunes of it.
    """
    from .soup import describe_soup, make_soup, parse_alphas
    path = make_soup(ingredients, out=out, method=method, weights=_parse_weights(weights), recipe=recipe,
                     split=split, evaluate=False if no_eval else None, device=device, force=force,
                     alphas=parse_alphas(alphas), allow_test_selection=allow_test_selection, by_layer=by_layer,
                     epochs=epochs, lr=lr, batch_size=batch_size, ensemble=ensemble)
    from .calibration import temperature_lines
    for line in describe_soup(path) + temperature_lines(path):
        click.echo(line)


def _parse_weights(text: Optional[str]):
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise FinetuneError(f"--weights: {text!r} is not a comma-separated list of numbers, e.g. 0.5,0.3,0.2") from None


@cli.command("compare")
@click.argument("inputs", nargs=-1)
@click.option("--runs-dir", default="runs", show_default=True, help="Where to find runs when none are given.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="markdown", show_default=True)
@click.option("--sort", default=None, help="Column to sort by: name, kind, model, recipe, dataset, img_size, "
              "epochs, best_val_top1 (val), best_epoch, test_top1 (test), params, images_per_s, status.")
@click.option("--eval", "do_eval", is_flag=True, help="First score checkpoints that have no score on --split.")
@click.option("--split", type=click.Choice(SPLITS), default="test", show_default=True)
@click.option("--tta", type=click.Choice(TTA_CHOICES), default=None,
              help="With --eval: also score each checkpoint with this test-time augmentation (a 'TTA top-1' "
                   "column; 'TTA mAP' for multi-label rows). " + TTA_HELP)
@click.option("--ensemble", is_flag=True, help="Add a row for the logit ensemble of the checkpoints given (runs' "
              "best checkpoints and checkpoint files; soups always bring the ensemble of their ingredients).")
@device_option
def compare_cmd(inputs, runs_dir, fmt, sort, do_eval, split, tta, ensemble, device) -> None:
    """Table of runs (RUN_DIR) and checkpoints or soups (CKPT), default every run under --runs-dir.

    Each soup of two or more fine-tunes is followed by an `ensemble` row: the logit ensemble (mean
    of logits, k forward passes an image) of its ingredients, scored when the soup was, or by --eval.
    """
    from .compare import collect_rows, evaluate_missing, format_table, sort_key_of
    from .evaluation import fraction
    sort_key_of(sort)  # a typo fails before any evaluation runs
    if tta and not do_eval:
        raise FinetuneError(f"--tta {tta}: scores with TTA are computed by --eval; add --eval")
    rows = collect_rows(inputs, runs_dir, ensemble=ensemble)
    if do_eval:
        for done in evaluate_missing(rows, split, device=device, tta=tta):
            score = f"top-1 {fraction(done['top1'])}" if "top1" in done else f"mAP {fraction(done.get('mAP'))}"
            tta_score = (f"TTA top-1 {fraction(done.get('top1_tta'))}" if "top1" in done
                         else f"TTA mAP {fraction(done.get('mAP_tta'))}")
            message = done.get("skipped") or f"{done['split']} {score}" + (f", {tta} {tta_score}" if tta else "")
            click.echo(f"{done['name']}: {message}", err=True)  # stdout stays a clean table/CSV/JSON
        rows = collect_rows(inputs, runs_dir, ensemble=ensemble)
    click.echo(format_table(rows, fmt, sort))


# --------------------------------------------------------------------------------------- bench
@cli.command("bench")
@click.option("--model", "model_ref", required=True,
              help="Model ref (zoo name, ppv:/timm:/hf:/npz: ref, checkpoint, scratch:...). Uncached weights "
                   "are replaced by random ones of the same architecture; nothing is downloaded.")
@click.option("--img-size", type=click.IntRange(min=1), default=None,
              help="Training resolution (default: the weights' own).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images per training step.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: bf16 where it measures at least 1.05x faster than fp32 at start (one block of the model, "
                   "timed; cached per machine), else fp32; CUDA: bf16 where the card has it.")
@click.option("--attention", type=click.Choice(["auto", "fused", "explicit"]), default="auto", show_default=True,
              help="auto: fused on CUDA; on a CPU the faster kernel for this shape, timed at start.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present, else the CPU).")
@click.option("--steps", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed rounds (each times every contender once); the median is reported.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed rounds first.")
@click.option("--no-baselines", is_flag=True,
              help="Time only the engine (skip pytorch-pretrained-vit fp32, timm fp32, timm bf16).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output: one JSON object.")
def bench_cmd(model_ref: str, img_size: Optional[int], batch_size: int, precision: str, attention: str,
              device: Optional[str], steps: int, warmup: int, no_baselines: bool, as_json: bool) -> None:
    """Time the engine's training step for a model beside the hand-written baselines.

    Reports images/s of the engine (the same step as `finetune train`, with the precision and
    attention kernel it would choose), pytorch-pretrained-vit fp32, timm fp32 and timm bf16, their
    ratios, FLOPs per image, MFU against a matmul peak measured on the spot, evaluation and
    data-pipeline throughput and peak memory. Progress goes to stderr; the table or JSON to stdout.
    """
    from .bench import bench, format_bench
    result = bench(model_ref, img_size=img_size, batch_size=batch_size, precision=precision, device=device,
                   attention=attention, steps=steps, warmup=warmup, baselines=not no_baselines,
                   log=lambda message: click.echo(message, err=True))
    click.echo(json.dumps(result, indent=2) if as_json else format_bench(result))


# ----------------------------------------------------------------------------------------- viz
@cli.group("viz")
def viz_group() -> None:
    """Pictures of a model: attention maps, position embeddings, confusion, t-SNE, curves, reliability."""


@viz_group.command("attention")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the pictures (one PNG per image).")
@click.option("--method", type=click.Choice(("rollout", "last")), default="rollout", show_default=True,
              help="rollout: attention rollout through all layers; last: the last layer's CLS row.")
@click.option("--style", type=click.Choice(("overlay", "mask")), default="overlay", show_default=True,
              help="overlay: heat map over the image; mask: the image multiplied by the map.")
@device_option
def viz_attention_cmd(checkpoint: str, images: Sequence[str], out_dir: str, method: str, style: str,
                      device: Optional[str]) -> None:
    """Where CHECKPOINT looks in each IMAGE, with its prediction."""
    from .viz import write_attention_figures
    for path in write_attention_figures(checkpoint, images, out_dir, method=method, style=style, device=device):
        click.echo(str(path))


@viz_group.command("posembed")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output PNG.")
def viz_posembed_cmd(checkpoint: str, out: str) -> None:
    """Cosine similarity of each patch's position embedding with every other patch's."""
    from .viz import write_posembed_figure
    click.echo(str(write_posembed_figure(checkpoint, out)))


@viz_group.command("confusion")
@split_figure_options
def viz_confusion_cmd(run_or_ckpt: str, split: str, recipe: Optional[str], out: str, device: Optional[str]) -> None:
    """Confusion matrix and per-class accuracy (a run directory means its best checkpoint)."""
    from .viz import write_confusion_figure
    click.echo(str(write_confusion_figure(run_or_ckpt, out, split=split, recipe=recipe, device=device)))


@viz_group.command("tsne")
@split_figure_options
def viz_tsne_cmd(run_or_ckpt: str, split: str, recipe: Optional[str], out: str, device: Optional[str]) -> None:
    """t-SNE of the split's pre-head (CLS) features, coloured by class."""
    from .viz import write_tsne_figure
    click.echo(str(write_tsne_figure(run_or_ckpt, out, split=split, recipe=recipe, device=device)))


@viz_group.command("reliability")
@split_figure_options
def viz_reliability_cmd(run_or_ckpt: str, split: str, recipe: Optional[str], out: str, device: Optional[str]) -> None:
    """Reliability diagram: accuracy against top-1 confidence in 15 bins, with the ECE; before and
    after the checkpoint's temperature when it has one."""
    from .viz import write_reliability_figure
    click.echo(str(write_reliability_figure(run_or_ckpt, out, split=split, recipe=recipe, device=device)))


@viz_group.command("curves")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output PNG.")
def viz_curves_cmd(run_dirs: Sequence[str], out: str) -> None:
    """Loss and val top-1 per epoch of one or more runs, on one figure."""
    from .viz import write_curves_figure
    click.echo(str(write_curves_figure(run_dirs, out)))


@cli.command("demo")
@click.option("--out", default=None, help="Demo folder, for its data and three runs (default runs/demo-<timestamp>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe field in all three stages, e.g. --set epochs=2 for a smoke test.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
def demo_cmd(out: Optional[str], overrides: Sequence[str], no_progress: bool) -> None:
    """Offline demo: pretrain a small ViT on digits 0-4, fine-tune it on digits 5-9, soup, compare.

    Stage 2 is also trained from scratch with the same recipe, to show what the pretrained weights
    bought. About 1.5 minutes on 2 CPU cores; scikit-learn's bundled digits, no download.
    """
    from .demo import run_demo
    result = run_demo(out, overrides, progress=_progress(no_progress))
    click.echo("\n" + result.table + "\n")
    _print_result(result.run)


# ------------------------------------------------------------------------------------ entry point
def run_click(command: click.Command, argv: Optional[Sequence[str]], prog_name: str) -> None:
    """Run a click command so that user errors are one `error: ...` line and exit status 2."""
    try:
        command.main(args=list(argv) if argv is not None else None, prog_name=prog_name, standalone_mode=False)
    except FinetuneError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except click.exceptions.Abort:
        click.echo("error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:  # usage errors too: one line, like every other user error
        click.echo(f"error: {' '.join(e.format_message().split())} (see {prog_name} --help)", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 — a bug of ours: still one line, traceback on request
        if os.environ.get("FINETUNE_DEBUG"):
            traceback.print_exc()
        click.echo(f"error: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                   "(set FINETUNE_DEBUG=1 for the traceback, and please report it)", err=True)
        sys.exit(1)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console entry point `finetune`."""
    run_click(cli, argv, "finetune")


def soup_main(argv: Optional[Sequence[str]] = None) -> None:
    """`python tools/soup.py ...`: `finetune soup` from a checkout."""
    run_click(soup_cmd, argv, "soup")


def compare_main(argv: Optional[Sequence[str]] = None) -> None:
    """`python tools/compare.py ...`: `finetune compare` from a checkout."""
    run_click(compare_cmd, argv, "compare")
