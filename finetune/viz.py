"""See inside a fine-tuned ViT: attention maps, rollout, position embeddings, features, figures.

    maps = viz.attention_maps(model, images)          # (batch, layers, heads, tokens, tokens)
    heat = viz.attention_rollout(maps, **viz.token_layout(model))   # (batch, grid_h, grid_w)

Attention is recomputed from each block's `attn.qkv` output by a forward hook, as timm's unfused
path computes it (softmax(q_norm(q) k_norm(k)^T * scale)), so it works with fused SDPA attention
on and the model's own forward is untouched. The figure writers take plain arguments (paths,
names) so the CLI is a thin layer over them; matplotlib is imported only when a figure is drawn.

Models without a class token (global average pooling) have no CLS row: `cls_attention` and
`attention_rollout` then use the mean over the patch-token query rows, which is what the
average-pooled output mixes.
"""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import rundir
from .data import build_transforms, load_image
from .errors import FinetuneError
from .evaluation import evaluate_on_split, load_for_scoring, recipe_for, split_loader
from .loading import data_config_of

DPI = 100
HEAD_FUSIONS = ("mean", "max", "min")
ATTENTION_METHODS = ("rollout", "last")
ATTENTION_STYLES = ("overlay", "mask")
MAX_POSEMBED_TILES = 16       # per side: larger grids show every k-th patch
ROLLOUT_DISCARD_RATIO = 0.9   # figures: drop the faintest 90% of links (jacobgil's vit-explain default)
ROLLOUT_HEAD_FUSION = "max"   # figures: strongest head per link, sharper than the mean on real photos
ATTENTION_FIGSIZE = (6.4, 3.6)
POSEMBED_FIGSIZE = (6.0, 5.4)
CONFUSION_FIGSIZE = (7.0, 6.0)
TSNE_FIGSIZE = (7.0, 5.6)
CURVES_FIGSIZE = (10.0, 4.0)


# ------------------------------------------------------------------------------------ attention
def attention_maps(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Softmax attention of every block: (batch, layers, heads, tokens, tokens), float32.

    Runs the model in eval mode without gradients and restores every module's train/eval mode.
    """
    vit = _unwrap(model)
    attentions = [_checked_attention(vit, i, block) for i, block in enumerate(_blocks(vit))]
    captured: List[Optional[torch.Tensor]] = [None] * len(attentions)
    hooks = [attn.qkv.register_forward_hook(_capture_into(captured, i, attn)) for i, attn in enumerate(attentions)]
    try:
        with torch.no_grad(), eval_mode(vit):
            vit.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(captured, dim=1)


def _capture_into(captured: List[Optional[torch.Tensor]], index: int, attn: torch.nn.Module):
    def hook(module, inputs, qkv_out):
        captured[index] = _softmax_attention(attn, qkv_out)
    return hook


def _softmax_attention(attn: torch.nn.Module, qkv_out: torch.Tensor) -> torch.Tensor:
    batch, tokens, _ = qkv_out.shape
    head_dim = getattr(attn, "head_dim", None) or attn.qkv.out_features // 3 // attn.num_heads
    qkv = qkv_out.reshape(batch, tokens, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q = getattr(attn, "q_norm", torch.nn.Identity())(qkv[0]).float()
    k = getattr(attn, "k_norm", torch.nn.Identity())(qkv[1]).float()
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _blocks(vit: torch.nn.Module) -> Sequence[torch.nn.Module]:
    blocks = getattr(vit, "blocks", None)
    if blocks is None or not hasattr(vit, "forward_features") or len(blocks) == 0:
        raise FinetuneError(f"{type(vit).__name__} is not a ViT with transformer blocks (model.blocks[i].attn); "
                            "expected a timm VisionTransformer as finetune.load_model returns")
    return blocks


def _checked_attention(vit: torch.nn.Module, index: int, block: torch.nn.Module) -> torch.nn.Module:
    attn = getattr(block, "attn", None)
    # Only timm's standard `Attention` computes softmax(q k^T * scale) from one qkv Linear;
    # DiffAttention, RoPE or parallel blocks compute something else, so refuse rather than mislead.
    if (type(attn).__name__ != "Attention" or not isinstance(getattr(attn, "qkv", None), torch.nn.Linear)
            or not hasattr(attn, "num_heads") or not hasattr(attn, "scale")):
        raise FinetuneError(f"{type(vit).__name__}.blocks[{index}].attn is {type(attn).__name__}, not timm's "
                            "standard Attention with a qkv Linear; attention maps need a plain ViT block")
    return attn


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode inside the block, each module's own mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP / DataParallel


def token_layout(model: torch.nn.Module) -> Dict[str, Any]:
    """Keyword arguments for `attention_rollout` / `cls_attention` describing `model`'s tokens."""
    vit = _unwrap(model)
    return {"num_prefix_tokens": int(getattr(vit, "num_prefix_tokens", 1)),
            "grid": tuple(int(g) for g in vit.patch_embed.grid_size),
            "class_token": getattr(vit, "cls_token", None) is not None}


def rollout_matrix(maps: torch.Tensor, discard_ratio: float = 0.0, head_fusion: str = "mean") -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) through all layers: (batch, tokens, tokens), rows sum to 1.

    Heads are fused (mean | max | min), the lowest `discard_ratio` of each layer's weights are
    zeroed (never entry (0, 0), the CLS->CLS link), the identity is added for the residual
    path, rows are renormalised, and the layers are multiplied from the first to the last.
    """
    fused = _fuse_heads(maps, head_fusion)
    if not 0.0 <= discard_ratio < 1.0:
        raise FinetuneError(f"discard_ratio: {discard_ratio!r} must be in [0, 1), e.g. 0.9")
    if discard_ratio > 0:
        fused = _discard_lowest(fused, discard_ratio)
    tokens = fused.shape[-1]
    with_residual = fused + torch.eye(tokens, dtype=fused.dtype, device=fused.device)
    with_residual = with_residual / with_residual.sum(dim=-1, keepdim=True)
    joint = with_residual[:, 0]
    for layer in range(1, with_residual.shape[1]):
        joint = with_residual[:, layer] @ joint
    return joint


def _fuse_heads(maps: torch.Tensor, head_fusion: str) -> torch.Tensor:
    if maps.dim() != 5:
        raise FinetuneError(f"attention maps: expected (batch, layers, heads, tokens, tokens), got shape "
                            f"{tuple(maps.shape)}; pass what attention_maps returns")
    if head_fusion == "mean":
        return maps.mean(dim=2)
    if head_fusion == "max":
        return maps.amax(dim=2)
    if head_fusion == "min":
        return maps.amin(dim=2)
    raise FinetuneError(f"head_fusion: unknown value {head_fusion!r}; expected one of {', '.join(HEAD_FUSIONS)}")


def _discard_lowest(fused: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    flat = fused.flatten(2)
    count = int(flat.shape[-1] * discard_ratio)
    lowest = flat.topk(count, dim=-1, largest=False).indices
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, lowest, True)
    drop[..., 0] = False
    return flat.masked_fill(drop, 0.0).view_as(fused)


def attention_rollout(maps: torch.Tensor, discard_ratio: float = 0.0, head_fusion: str = "mean", *,
                      num_prefix_tokens: int = 1, grid: Optional[Tuple[int, int]] = None,
                      class_token: bool = True) -> torch.Tensor:
    """The CLS row of the rollout over the patch tokens: (batch, grid_h, grid_w)."""
    joint = rollout_matrix(maps, discard_ratio, head_fusion)
    return _patch_map(joint, num_prefix_tokens, grid, class_token)


def cls_attention(maps: torch.Tensor, layer: int = -1, *, num_prefix_tokens: int = 1,
                  grid: Optional[Tuple[int, int]] = None, class_token: bool = True) -> torch.Tensor:
    """The CLS row of one layer's attention, mean over heads, over the patch tokens: (batch, grid_h, grid_w)."""
    return _patch_map(_fuse_heads(maps, "mean")[:, layer], num_prefix_tokens, grid, class_token)


def _patch_map(matrix: torch.Tensor, num_prefix_tokens: int, grid: Optional[Tuple[int, int]],
               class_token: bool) -> torch.Tensor:
    if class_token and num_prefix_tokens < 1:
        raise FinetuneError("class_token=True needs num_prefix_tokens >= 1 (the class token is token 0)")
    patch_columns = matrix[:, :, num_prefix_tokens:]
    row = patch_columns[:, 0] if class_token else patch_columns[:, num_prefix_tokens:].mean(dim=1)
    grid_h, grid_w = grid or _square_grid(row.shape[-1])
    if grid_h * grid_w != row.shape[-1]:
        raise FinetuneError(f"grid {grid_h}x{grid_w} does not hold {row.shape[-1]} patch tokens; "
                            "check num_prefix_tokens and grid (see token_layout(model))")
    return row.reshape(row.shape[0], grid_h, grid_w)


def _square_grid(patches: int) -> Tuple[int, int]:
    side = math.isqrt(patches)
    if side * side != patches:
        raise FinetuneError(f"{patches} patch tokens do not form a square grid; pass grid=(h, w) "
                            "(see token_layout(model))")
    return side, side


# ------------------------------------------------------------------------ features, embeddings
def features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pre-head features (batch, dim): the pooled, normed token the classifier reads."""
    vit = _unwrap(model)
    with torch.no_grad(), eval_mode(vit):
        return vit.forward_head(vit.forward_features(images), pre_logits=True)


def posembed_similarity(model: torch.nn.Module) -> torch.Tensor:
    """Cosine similarity of each patch's position embedding with every patch's: (grid_h*grid_w, grid_h, grid_w)."""
    vit = _unwrap(model)
    pos_embed = getattr(vit, "pos_embed", None)
    if pos_embed is None:
        source = getattr(vit, "finetune_info", {}).get("source", type(vit).__name__)
        raise FinetuneError(f"{source}: the model has no learned position embedding (pos_embed is None), "
                            "so there is nothing to compare; use a ViT with absolute position embeddings")
    grid_h, grid_w = (int(g) for g in vit.patch_embed.grid_size)
    prefix = 0 if getattr(vit, "no_embed_class", False) else int(getattr(vit, "num_prefix_tokens", 1))
    patches = pos_embed.detach().float()[0, prefix:]
    if patches.shape[0] != grid_h * grid_w:
        raise FinetuneError(f"pos_embed has {patches.shape[0]} patch positions, not the grid's "
                            f"{grid_h}x{grid_w}; cannot lay them out")
    unit = F.normalize(patches, dim=-1)
    return (unit @ unit.T).reshape(grid_h * grid_w, grid_h, grid_w).cpu()


# --------------------------------------------------------------------------- shared plumbing
def resolve_checkpoint(run_or_ckpt) -> Path:
    """A checkpoint file as given, or a run directory's best checkpoint."""
    path = Path(run_or_ckpt)
    if rundir.is_run_dir(path):
        return rundir.best_checkpoints(path)[0]
    if not path.is_file():
        raise FinetuneError(f"{path}: neither a checkpoint file nor a run directory (with recipe.yaml)")
    return path


def _class_names(model: torch.nn.Module) -> List[str]:
    names = getattr(model, "finetune_info", {}).get("class_names")
    return list(names) if names else [str(i) for i in range(model.num_classes)]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out, palette: bool = False) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        # 256 dithered colours keep photos and noisy maps ~2x smaller than truecolour PNG; the
        # octree palette keeps the heat map's rare reds that median cut merges away.
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=DPI, format="png")
        rgb = Image.open(buffer).convert("RGB")
        colours = rgb.quantize(256, method=Image.Quantize.FASTOCTREE)
        rgb.quantize(palette=colours, dither=Image.Dither.FLOYDSTEINBERG).save(out, format="PNG", optimize=True)
    else:
        fig.savefig(out, dpi=DPI, format="png")
    _pyplot().close(fig)
    return out


# --------------------------------------------------------------------------- attention figures
def write_attention_figures(checkpoint, images: Sequence, out_dir, method: str = "rollout",
                            style: str = "overlay", device: Optional[str] = None) -> List[Path]:
    """Per image one PNG: the model's input and its attention map, predicted class in the title.

    `method`: rollout (all layers) or last (last layer's CLS row, mean over heads). `style`:
    overlay (heat map over the image) or mask (the CIFAR tutorial's: map min-max normalised and
    multiplied into the image; `--method last --style mask` is exactly its recipe).
    """
    _check_choice("method", method, ATTENTION_METHODS)
    _check_choice("style", style, ATTENTION_STYLES)
    if not images:
        raise FinetuneError("no images given; pass one or more image files")
    model = load_for_scoring(checkpoint, device)
    config = data_config_of(model)
    transform = build_transforms(config, config["input_size"][-1], "none", train=False)
    inputs = [transform(load_image(path)) for path in images]  # every file checked before any drawing
    out_paths = _unique_outputs(images, Path(out_dir), f"{method}-{style}")
    names, model_device = _class_names(model), next(model.parameters()).device
    for path, x, out in zip(images, inputs, out_paths):
        heat, probabilities = _attention_and_prediction(model, x[None].to(model_device), method)
        picture = _denormalise(x, config)
        title = _prediction_title(path, names, probabilities)
        _draw_attention(picture, _upsample(heat, picture.shape[:2]), style, title, out)
    return out_paths


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise FinetuneError(f"{name}: unknown value {value!r}; expected one of {', '.join(choices)}")


def _unique_outputs(images: Sequence, out_dir: Path, suffix: str) -> List[Path]:
    seen: Dict[str, int] = {}
    outputs = []
    for path in images:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        name = stem if seen[stem] == 1 else f"{stem}-{seen[stem]}"
        outputs.append(out_dir / f"{name}.{suffix}.png")
    return outputs


def _attention_and_prediction(model, x: torch.Tensor, method: str) -> Tuple[np.ndarray, torch.Tensor]:
    maps = attention_maps(model, x)
    layout = token_layout(model)
    if method == "rollout":
        heat = attention_rollout(maps, ROLLOUT_DISCARD_RATIO, ROLLOUT_HEAD_FUSION, **layout)
    else:
        heat = cls_attention(maps, **layout)
    with torch.no_grad():
        probabilities = model(x).float().softmax(dim=-1)[0].cpu()
    return heat[0].cpu().numpy(), probabilities


def _denormalise(x: torch.Tensor, config: Dict[str, Any]) -> np.ndarray:
    mean, std = (torch.tensor(config[key], dtype=x.dtype).view(3, 1, 1) for key in ("mean", "std"))
    return (x.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _upsample(heat: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    grid = torch.from_numpy(heat)[None, None].float()
    resized = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    low, high = resized.min(), resized.max()
    return (resized - low) / (high - low) if high > low else np.zeros_like(resized)


def _prediction_title(path, names: List[str], probabilities: torch.Tensor) -> str:
    index = int(probabilities.argmax())
    return f"{Path(path).name}: predicted {names[index]} ({probabilities[index]:.1%})"


def _draw_attention(picture: np.ndarray, heat: np.ndarray, style: str, title: str, out: Path) -> Path:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=ATTENTION_FIGSIZE)
    left.imshow(picture)
    left.set_title("model input", fontsize=9)
    if style == "overlay":
        right.imshow(picture)
        right.imshow(heat, cmap="jet", alpha=0.45)
        right.set_title("attention", fontsize=9)
    else:
        # The tutorial doubles the masked image so the attended region stands out.
        right.imshow(np.clip(picture * heat[..., None] * 2.0, 0, 1))
        right.set_title("image x attention", fontsize=9)
    for axis in (left, right):
        axis.axis("off")
    fig.suptitle(_shorten(title, 70), fontsize=10)
    fig.tight_layout()
    return _save(fig, out, palette=True)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else "..." + text[-(limit - 3):]


# ---------------------------------------------------------------------- position-embedding figure
def write_posembed_figure(checkpoint, out) -> Path:
    """The pets37 notes' figure: for each patch, its position embedding's similarity to all others."""
    model = load_for_scoring(checkpoint, "cpu")
    try:
        similarity = posembed_similarity(model)
    except FinetuneError as e:
        raise FinetuneError(f"{checkpoint}: {e}") from None
    grid_h, grid_w = similarity.shape[1:]
    step = max(1, math.ceil(max(grid_h, grid_w) / MAX_POSEMBED_TILES))
    mosaic = _similarity_mosaic(similarity.numpy(), step)
    return _draw_posembed(mosaic, (grid_h, grid_w), step, _describe(Path(checkpoint)), out)


def _similarity_mosaic(similarity: np.ndarray, step: int) -> np.ndarray:
    """Tiles of the shown patches' maps in grid order, one NaN pixel between tiles."""
    patches, grid_h, grid_w = similarity.shape
    rows, cols = range(0, grid_h, step), range(0, grid_w, step)
    mosaic = np.full((len(rows) * (grid_h + 1) - 1, len(cols) * (grid_w + 1) - 1), np.nan)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            top, left = i * (grid_h + 1), j * (grid_w + 1)
            mosaic[top:top + grid_h, left:left + grid_w] = similarity[row * grid_w + col]
    return mosaic


def _draw_posembed(mosaic: np.ndarray, grid: Tuple[int, int], step: int, name: str, out) -> Path:
    plt = _pyplot()
    grid_h, grid_w = grid
    fig, axis = plt.subplots(figsize=POSEMBED_FIGSIZE)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    image = axis.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    rows, cols = range(0, grid_h, step), range(0, grid_w, step)
    tick_every = max(1, len(cols) // 8)
    axis.set_xticks([j * (grid_w + 1) + (grid_w - 1) / 2 for j in range(0, len(cols), tick_every)],
                    [str(cols[j] + 1) for j in range(0, len(cols), tick_every)])
    axis.set_yticks([i * (grid_h + 1) + (grid_h - 1) / 2 for i in range(0, len(rows), tick_every)],
                    [str(rows[i] + 1) for i in range(0, len(rows), tick_every)])
    axis.tick_params(length=0, labelsize=8)
    axis.set_xlabel("input patch column")
    axis.set_ylabel("input patch row")
    for side in axis.spines.values():
        side.set_visible(False)
    shown = "" if step == 1 else f", every {step}th patch shown"
    axis.set_title(f"Position embedding similarity ({grid_h}x{grid_w} patches{shown})\n{_shorten(name, 60)}",
                   fontsize=10)
    fig.colorbar(image, ax=axis, fraction=0.046, pad=0.03, label="cosine similarity")
    fig.tight_layout()
    return _save(fig, out, palette=True)


# ---------------------------------------------------------------------------- confusion matrix
def write_confusion_figure(run_or_ckpt, out, split: str = "val", recipe: Optional[str] = None,
                           device: Optional[str] = None, report: Optional[Dict[str, Any]] = None) -> Path:
    """Confusion counts (rows true, columns predicted) and per-class accuracy on a split; `report`
    (evaluation's scores of this checkpoint on `split`, e.g. from the training run) saves scoring it."""
    checkpoint = resolve_checkpoint(run_or_ckpt)
    if report is None or Path(report.get("checkpoint", "")).resolve() != checkpoint.resolve() \
            or report.get("split") != split:
        # A picture should not change what `compare` reports, so the score is not stored.
        report = evaluate_on_split(checkpoint, recipe, split=split, device=device, store=False)
    if "mAP" in report:  # multi-label: no single predicted class, so no confusion matrix
        return _draw_multilabel(report, checkpoint, split, out)
    names = report["class_names"] or [str(i) for i in range(len(report["confusion"]))]
    title = (f"{_shorten(_describe(checkpoint), 60)}\n{split}: top-1 {report['top1']:.1%} "
             f"({report['n']} images)")
    return _draw_confusion(np.asarray(report["confusion"]), names, report["per_class"], title, out)


def _draw_multilabel(report: Dict[str, Any], checkpoint: Path, split: str, out) -> Path:
    """Per-class average precision (bars) beside the label co-occurrence of the split (true labels)."""
    plt = _pyplot()
    names = report["class_names"] or [str(i) for i in range(len(report["per_class_ap"]))]
    classes = len(names)
    ap = [np.nan if v is None else v for v in report["per_class_ap"]]
    fig, (bars, matrix) = plt.subplots(1, 2, figsize=(CONFUSION_FIGSIZE[0] * 1.8, CONFUSION_FIGSIZE[1]))
    bars.barh(range(classes), ap, color="tab:blue")
    bars.set(xlim=(0, 1), xlabel="average precision", title="per-class AP")
    bars.invert_yaxis()
    cooccurrence = np.asarray(report["cooccurrence"])
    image = matrix.imshow(cooccurrence, cmap="Blues")
    if classes <= 20:
        for (row, col), count in np.ndenumerate(cooccurrence):
            matrix.text(col, row, str(count), ha="center", va="center", fontsize=8,
                        color="white" if count > cooccurrence.max() / 2 else "black")
    if classes <= 40:
        labels = [_shorten(n, 14) for n in names]
        bars.set_yticks(range(classes), [f"{n} ({p})" for n, p in zip(labels, report["positives"])], fontsize=8)
        matrix.set_xticks(range(classes), labels, rotation=45, ha="right", fontsize=8)
        matrix.set_yticks(range(classes), labels, fontsize=8)
    matrix.set_title("label co-occurrence (images with both)", fontsize=10)
    fig.colorbar(image, ax=matrix, fraction=0.046, pad=0.03, label="images")
    mAP = "-" if report["mAP"] is None else f"{report['mAP']:.1%}"
    fig.suptitle(f"{_shorten(_describe(checkpoint), 60)}\n{split}: mAP {mAP}, F1 micro {report['f1_micro']:.1%} "
                 f"at {report['threshold']:.2f} ({report['n']} images)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def _describe(checkpoint: Path) -> str:
    return f"{checkpoint.parent.name}/{checkpoint.name}" if rundir.is_run_dir(checkpoint.parent) else checkpoint.name


def _draw_confusion(confusion: np.ndarray, names: List[str], per_class: List[float], title: str, out) -> Path:
    plt = _pyplot()
    classes = len(names)
    fig, axis = plt.subplots(figsize=CONFUSION_FIGSIZE)
    image = axis.imshow(confusion, cmap="Blues")
    if classes <= 20:  # beyond that the numbers are unreadable; the colours still tell
        threshold = confusion.max() / 2
        for (row, col), count in np.ndenumerate(confusion):
            axis.text(col, row, str(count), ha="center", va="center", fontsize=9 if classes <= 10 else 6,
                      color="white" if count > threshold else "black")
    if classes <= 40:
        axis.set_xticks(range(classes), [_shorten(n, 14) for n in names], rotation=45, ha="right", fontsize=8)
        axis.set_yticks(range(classes), [f"{_shorten(n, 14)} ({acc:.0%})" for n, acc in zip(names, per_class)],
                        fontsize=8)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class (per-class accuracy)")
    axis.set_title(title, fontsize=10)
    fig.colorbar(image, ax=axis, fraction=0.046, pad=0.03, label="images")
    fig.tight_layout()
    return _save(fig, out)


# -------------------------------------------------------------------------------------- t-SNE
def write_tsne_figure(run_or_ckpt, out, split: str = "val", recipe: Optional[str] = None,
                      device: Optional[str] = None) -> Path:
    """t-SNE of the pre-head (CLS) features of a split, coloured by true class."""
    checkpoint = resolve_checkpoint(run_or_ckpt)
    chosen = recipe_for(checkpoint, recipe)
    model = load_for_scoring(checkpoint, device)
    vectors, labels = split_features(model, split_loader(chosen, model, split))
    if len(labels) < 5:
        raise FinetuneError(f"{split} split of {chosen.data.dataset} has {len(labels)} images; "
                            "t-SNE needs at least 5")
    points = _tsne(vectors)
    title = f"{_shorten(_describe(checkpoint), 60)}\nt-SNE of pre-head features, {split} ({len(labels)} images)"
    return _draw_tsne(points, labels, _class_names(model), title, out)


def split_features(model: torch.nn.Module, loader) -> Tuple[np.ndarray, np.ndarray]:
    """Pre-head features and labels of every image a loader yields, as numpy arrays."""
    device = next(_unwrap(model).parameters()).device
    vectors, labels = [], []
    for images, targets in loader:
        if targets.numel():
            vectors.append(features(model, images.to(device)).float().cpu())
            labels.append(targets.cpu())
    if not vectors:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return torch.cat(vectors).numpy(), torch.cat(labels).numpy()


def _tsne(vectors: np.ndarray) -> np.ndarray:
    from sklearn.manifold import TSNE
    perplexity = min(30.0, (len(vectors) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(vectors)


def _draw_tsne(points: np.ndarray, labels: np.ndarray, names: List[str], title: str, out) -> Path:
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=TSNE_FIGSIZE)
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for index, name in enumerate(names):
        chosen = labels == index
        if chosen.any():
            axis.scatter(points[chosen, 0], points[chosen, 1], s=14, color=cmap(index % cmap.N), label=name,
                         alpha=0.8, linewidths=0)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(title, fontsize=10)
    axis.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=2, frameon=False,
                ncol=1 if len(names) <= 20 else 2)
    fig.tight_layout()
    return _save(fig, out)


# ------------------------------------------------------------------------------------- curves
def write_curves_figure(run_dirs: Sequence, out) -> Path:
    """Train and val loss, and val top-1, per epoch; one colour per run, legend = run names."""
    if not run_dirs:
        raise FinetuneError("no run directories given; pass one or more runs/<name>/ folders")
    runs = [(Path(run).name, _metrics_of(Path(run))) for run in run_dirs]
    return _draw_curves(runs, out)


def _metrics_of(run_dir: Path) -> List[Dict[str, Any]]:
    if not rundir.is_run_dir(run_dir):
        raise FinetuneError(f"{run_dir}: not a run directory (no {rundir.RECIPE}); pass runs/<name>/ folders")
    rows = [row for row in rundir.read_metrics(run_dir) if "epoch" in row]
    if not rows:
        raise FinetuneError(f"{run_dir / rundir.METRICS}: no epochs logged yet; train at least one epoch")
    return rows


def _column(rows: List[Dict[str, Any]], key: str) -> Tuple[List[int], List[float]]:
    kept = [row for row in rows if isinstance(row.get(key), (int, float))]
    return [row["epoch"] for row in kept], [row[key] for row in kept]


def _draw_curves(runs: List[Tuple[str, List[Dict[str, Any]]]], out) -> Path:
    plt = _pyplot()
    from matplotlib.ticker import PercentFormatter
    fig, (loss_axis, top1_axis) = plt.subplots(1, 2, figsize=CURVES_FIGSIZE)
    # the runs' ranking metric: mAP when every run is multi-label, else top-1
    score_key = "val_mAP" if all(any("val_mAP" in r for r in rows) for _, rows in runs) and runs else "val_top1"
    colours = plt.get_cmap("tab10")
    for index, (name, rows) in enumerate(runs):
        colour = colours(index % 10)
        loss_axis.plot(*_column(rows, "train_loss"), color=colour, marker=".", label=f"{name} train")
        loss_axis.plot(*_column(rows, "val_loss"), color=colour, marker=".", linestyle="--", label=f"{name} val")
        top1_axis.plot(*_column(rows, score_key), color=colour, marker=".", label=name)
    loss_axis.set(xlabel="epoch", ylabel="loss", title="loss (solid: train, dashed: val)")
    label = {"val_top1": "top-1", "val_mAP": "mAP"}[score_key]
    top1_axis.set(xlabel="epoch", ylabel=f"val {label}", title=f"validation {label}")
    for axis in (loss_axis, top1_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    top1_axis.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
    top1_axis.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out)


# --------------------------------------------------------------------------------- run pictures
def write_run_pictures(run_dir, device: Optional[str] = None, val_report: Optional[Dict[str, Any]] = None
                       ) -> List[Path]:
    """curves.png and confusion.png (best checkpoint, val split) into the run directory; with
    `val_report` (engine.RunResult.best_val, the training run's own scores of that checkpoint) the
    checkpoint is not scored again."""
    run_dir = Path(run_dir)
    return [write_curves_figure([run_dir], run_dir / "curves.png"),
            write_confusion_figure(run_dir, run_dir / "confusion.png", split="val", device=device, report=val_report)]


# -------------------------------------------------------------------------------- reliability
RELIABILITY_PANEL_SIZE = (4.6, 5.0)


def write_reliability_figure(run_or_ckpt, out, split: str = "val", recipe: Optional[str] = None,
                             device: Optional[str] = None) -> Path:
    """Reliability diagram (Guo et al. 2017, fig. 1) on a split: per 15-bin of top-1 confidence, the
    accuracy against the diagonal, and the share of images above it; at T = 1 and, for a calibrated
    checkpoint, beside it at its temperature. The ECE is in each panel's title. Multi-label: the bins
    are of every (image, class) sigmoid and the bars the share of those whose class is present."""
    from .calibration import reliability_panels
    checkpoint = resolve_checkpoint(run_or_ckpt)
    panels, images = reliability_panels(checkpoint, split, recipe, device)
    title = f"{_shorten(_describe(checkpoint), 60)}: {split} ({images} images)"
    return _draw_reliability(panels, title, out)


def _draw_reliability(panels: List[Tuple[str, Dict[str, Any]]], title: str, out) -> Path:
    plt = _pyplot()
    from matplotlib.ticker import PercentFormatter
    width, height = RELIABILITY_PANEL_SIZE
    fig, axes = plt.subplots(2, len(panels), figsize=(width * len(panels), height), squeeze=False,
                             gridspec_kw={"height_ratios": (1, 3)}, sharex=True)
    for column, (label, bins) in enumerate(panels):
        share_axis, axis = axes[0][column], axes[1][column]
        edges = np.asarray(bins["edges"])
        left, step = edges[:-1], np.diff(edges)
        counts = np.asarray(bins["counts"], dtype=float)
        share_axis.bar(left, counts / max(counts.sum(), 1), width=step, align="edge", color="0.6", edgecolor="white")
        share_axis.set_ylabel("images")
        share_axis.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        share_axis.set_title(f"{label}: ECE {bins['ece']:.2%}", fontsize=10)
        filled = counts > 0
        accuracy = np.asarray([a if a is not None else 0.0 for a in bins["accuracy"]])
        confidence = np.asarray([c if c is not None else 0.0 for c in bins["confidence"]])
        axis.bar(left[filled], accuracy[filled], width=step[filled], align="edge", color="tab:blue",
                 edgecolor="white", label="accuracy")
        axis.bar(left[filled], (confidence - accuracy)[filled], bottom=accuracy[filled], width=step[filled],
                 align="edge", color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//",
                 label="gap to mean confidence")
        axis.plot([0, 1], [0, 1], linestyle="--", color="0.3", linewidth=1, label="perfect calibration")
        axis.set(xlim=(0, 1), ylim=(0, 1), xlabel=bins.get("of", "top-1 confidence"),
                 ylabel=bins.get("accuracy_of", "accuracy"))
        axis.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)
