"""Ship what you trained: a checkpoint as an ONNX file, a transformers folder or a timm (Hub-ready) folder.

    finetune export runs/x/epoch-003.safetensors deit.onnx --to onnx
    finetune export runs/x deit-hf --to transformers          # a run directory means its best checkpoint
    finetune export runs/x deit-timm --to timm --push-to-hub ORG/NAME

One owner per target: `write_onnx`, `write_transformers`, `write_timm` (and `write_ppv`,
pytorch-pretrained-vit's state dict, as before). Each writes into a staging folder beside OUT, loads
what it wrote with the target library alone, compares that library's logits with ours on images
through the checkpoint's own eval transform (`Check`), and only then moves the files to OUT: an
export that fails its check, or is interrupted, leaves nothing behind. Every target but ppv carries a
model card (`model_card`): README.md in an export folder, OUT.md beside an .onnx file (the folder an
.onnx file lands in may hold other things, whose README.md is not ours to replace).

An .onnx export is scored by `finetune eval` and `finetune predict` too (`OnnxClassifier`,
onnxruntime): its metadata_props hold the class names, the data config, the calibration temperature
and the recipe, so it needs neither the checkpoint nor --recipe.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import convert, hubs, rundir, tasks
from .checkpoints import file_sha256, read_meta, refuse_to_overwrite
from .errors import FinetuneError
from .loading import ZOO, data_config_of, load_model

TARGETS = ("onnx", "transformers", "timm", "ppv")
LIBRARIES = {"onnx": "onnxruntime", "transformers": "transformers", "timm": "timm"}
ONNX_FORMAT = "finetune.onnx/1"
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"
# An export passes when the target's logits are within TOLERANCE of ours, relative to their scale
# (max(1, max |logit|)). fp32 round-off through a ViT in another runtime is ~1e-6 of it; a wrong
# weight, op or layer norm epsilon is orders of magnitude larger.
TOLERANCE = 1e-4
EXTRAS = {"onnx": "pip install 'finetune[onnx]'", "transformers": "pip install 'finetune[transformers]'"}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# The files that make a folder one of our exports: --force replaces such a folder, never another.
EXPORT_FOLDER_FILES = ("README.md", "config.json")


# ------------------------------------------------------------------------------------ the check
@dataclass
class Check:
    """How closely the exported model, loaded by its own library, reproduces our logits."""
    library: str
    max_diff: float = 0.0            # max |logit difference| over every checked input
    scale: float = 0.0               # max |logit| of ours
    agree: int = 0                   # inputs with the same top-1
    n: int = 0
    batches: List[int] = field(default_factory=list)
    pixel_diff: Optional[float] = None  # the library's own preprocessing vs our eval transform
    pixel_note: str = ""

    @property
    def tolerance(self) -> float:
        return TOLERANCE * max(1.0, self.scale)

    @property
    def passed(self) -> bool:
        return self.max_diff <= self.tolerance

    def line(self) -> str:
        pixels = "" if self.pixel_diff is None else f"; its preprocessing vs ours: max |pixel diff| " \
                                                    f"{self.pixel_diff:.3g}{self.pixel_note}"
        batches = "+".join(map(str, self.batches))
        return (f"check ({self.library} vs finetune, fp32, batches {batches}): max |logit diff| {self.max_diff:.3g}"
                f" (tolerance {self.tolerance:.3g}), top-1 agreement {self.agree}/{self.n}{pixels}")


@dataclass
class Exported:
    path: Path
    target: str
    card: Optional[Path]
    check: Optional[Check]
    pushed: Optional[str] = None
    lines: List[str] = field(default_factory=list)


def compare(model: torch.nn.Module, run: Callable[[torch.Tensor], Any], batches: Sequence[torch.Tensor],
            library: str) -> Check:
    """Logits of `run` (the exported model) against `model`'s on the same fp32 batches."""
    check = Check(library)
    with torch.inference_mode():
        for batch in batches:
            ours = model(batch).float()
            theirs = torch.as_tensor(run(batch)).float()
            if theirs.shape != ours.shape:
                raise FinetuneError(f"{library} returned logits of shape {tuple(theirs.shape)} for a batch whose "
                                    f"logits are {tuple(ours.shape)}")
            diff = (theirs - ours).abs().max().item()
            check.max_diff = max(check.max_diff, diff if math.isfinite(diff) else math.inf)  # NaN fails too
            check.scale = max(check.scale, ours.abs().max().item())
            check.agree += int((theirs.argmax(1) == ours.argmax(1)).sum())
            check.n += len(batch)
            check.batches.append(len(batch))
    return check


def check_images(img_size: int, count: int = 4, seed: int = 0) -> list:
    """Photo-like test images (smooth colour fields plus grain, PIL RGB) of several aspect ratios, so
    a resize or crop that differs from ours shows. Synthetic: an export needs no training data."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    shapes = [(1.5, 1.0), (1.0, 1.33), (1.0, 1.0), (1.21, 1.0)]
    images = []
    for i in range(count):
        w, h = (max(8, int(img_size * f * 1.3)) for f in shapes[i % len(shapes)])
        field_ = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        grain = rng.normal(0, 12, (h, w, 3))
        images.append(Image.fromarray(np.clip(np.asarray(field_, np.float32) + grain, 0, 255).astype(np.uint8)))
    return images


def eval_transform(model: torch.nn.Module) -> Callable:
    """Our eval transform for `model` (what `finetune eval` and `predict` feed it)."""
    from .data import build_transforms
    config = data_config_of(model)
    return build_transforms(config, config["input_size"][-1], "none", train=False)


def check_batches(model: torch.nn.Module, images: list) -> List[torch.Tensor]:
    """Two batches of the check images through our eval transform, of sizes other than the ONNX
    export's example batch (2), so that a batch axis frozen at export shows."""
    transform = eval_transform(model)
    tensors = torch.stack([transform(image) for image in images])
    if model.patch_embed.proj.in_channels != tensors.shape[1]:  # not RGB: random inputs of its shape
        tensors = torch.randn(len(images), model.patch_embed.proj.in_channels, *tensors.shape[2:])
    return [tensors[:3], tensors[3:4]]


# ----------------------------------------------------------------------------------- the driver
def export(checkpoint: Union[str, Path], out: Union[str, Path], to: str, *, force: bool = False,
           push_to_hub: Optional[str] = None, score: bool = True, device: Optional[str] = None,
           log: Callable[[str], None] = lambda line: None) -> Exported:
    """Export `checkpoint` (a checkpoint file, a run directory or any model ref) as `to` at `out`.

    onnx, transformers and timm are checked against our logits before they are moved into place,
    and carry a model card; with `score`, the card's val/test scores are computed now (per-class
    accuracy, split sizes), else they are the ones stored with the checkpoint. `push_to_hub`
    uploads the result to that Hugging Face repo (ORG/NAME).
    """
    if to not in TARGETS:
        raise FinetuneError(f"--to: unknown target {to!r}; choose one of {', '.join(TARGETS)}")
    source = resolve_checkpoint(checkpoint)
    out = Path(out)
    if push_to_hub and to == "ppv":
        raise FinetuneError("--push-to-hub: pytorch-pretrained-vit state dicts are not Hub repos; push an "
                            "onnx, transformers or timm export")
    if push_to_hub and not REPO_ID.match(push_to_hub):
        raise FinetuneError(f"--push-to-hub: {push_to_hub!r} is not a Hub repo id; give ORG/NAME")
    if push_to_hub and hubs.offline():
        raise FinetuneError(f"--push-to-hub {push_to_hub}: offline mode is on (HF_HUB_OFFLINE / FINETUNE_OFFLINE); "
                            "unset it, or export without --push-to-hub and upload the folder later")
    if to == "ppv":
        result = write_ppv(source, out, force)
        for line in result.lines:
            log(line)
        return result
    card_path = check_output(out, to, force)
    require_libraries(to)
    model = load_model(str(source)).eval()
    meta = read_meta(source) if Path(str(source)).suffix == ".safetensors" and Path(str(source)).is_file() else {}
    if to == "transformers":
        refuse_unrepresentable(model)
    scores = card_scores(source, model, meta, device, log) if score else stored_scores(source, meta, "--no-eval")
    with staging(out) as stage:
        staged = stage / (out.name if to == "onnx" else "export")
        writer = {"onnx": write_onnx, "transformers": write_transformers, "timm": write_timm}[to]
        check = writer(model, staged, meta, source)
        if not check.passed:
            raise FinetuneError(f"{to} export failed its check: {check.line()}; nothing written")
        card = model_card(to, out, source, model, meta, scores, check, push_to_hub)
        staged_card = stage / "card.md" if to == "onnx" else staged / "README.md"
        staged_card.write_text(card)
        move_into_place(staged, out, staged_card if to == "onnx" else None, card_path)
    result = Exported(out, to, card_path or out / "README.md", check, lines=[check.line()])
    result.lines.append(f"wrote {out}" + (f" and its model card {card_path}" if to == "onnx" else
                                          f" (model card {out / 'README.md'})"))
    if push_to_hub:
        result.pushed = push(out, to, push_to_hub, card_path)
        result.lines.append(f"pushed to {result.pushed}")
    for line in result.lines:
        log(line)
    return result


def resolve_checkpoint(checkpoint: Union[str, Path]) -> Union[Path, str]:
    """The checkpoint file (a run directory: its best checkpoint); a ref that is no path stays a ref."""
    path = Path(checkpoint)
    if is_onnx(path):
        raise FinetuneError(f"{path}: is an ONNX export already; export the .safetensors checkpoint it came from")
    if path.is_dir():
        if not rundir.is_run_dir(path):
            raise FinetuneError(f"{path}: is a folder but not a run directory (no {rundir.RECIPE}); give a "
                                "checkpoint file or a run directory")
        best = rundir.main_checkpoint(path)
        if best is None:
            raise FinetuneError(f"{path}: the run has written no checkpoint yet (no best.json entry, no "
                                f"{rundir.LAST})")
        return best
    if path.is_file():
        return path
    if path.suffix in (".safetensors", ".pth", ".pt", ".bin"):
        raise FinetuneError(f"{path}: no such checkpoint file")
    return str(checkpoint)  # a model ref (zoo name, timm:TAG, ...): load_model says if it is none


def is_onnx(path: Union[str, Path]) -> bool:
    return Path(str(path)).suffix.lower() == ".onnx"


def onnx_card_path(out: Path) -> Path:
    return out.with_name(out.name + ".md")


def check_output(out: Path, to: str, force: bool) -> Optional[Path]:
    """Refuse an existing OUT without --force (and, for a folder, one that is not an export of ours);
    the model card's path for an .onnx OUT."""
    if to == "onnx":
        if not is_onnx(out):
            raise FinetuneError(f"{out}: an ONNX export is a file ending in .onnx (finetune eval/predict recognise "
                                "it by that); e.g. model.onnx")
        refuse_to_overwrite(out, force)
        return refuse_to_overwrite(onnx_card_path(out), force)
    if out.is_file():
        raise FinetuneError(f"{out}: is a file; a {to} export is a folder, give a folder name")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FinetuneError(f"{out}: already exists; pass --force to replace it, or choose another output")
        if not all((out / name).is_file() for name in EXPORT_FOLDER_FILES):
            raise FinetuneError(f"{out}: is a folder that is not an export (no {' and '.join(EXPORT_FOLDER_FILES)}); "
                                "--force replaces only earlier exports, choose another output")
    return None


def require_libraries(to: str) -> None:
    """The optional libraries a target needs, or a one-line error naming the extra that installs them."""
    needed = {"onnx": ("onnx", "onnxruntime"), "transformers": ("transformers",)}.get(to, ())
    for name in needed:
        _import_optional(name, to)


def _import_optional(name: str, extra: str):
    import importlib
    try:
        return importlib.import_module(name)
    except ImportError:
        raise FinetuneError(f"{name} is not installed; {EXTRAS[extra]} to use {extra}"
                            + (" (finetune export --to onnx, and eval/predict of .onnx files)" if extra == "onnx"
                               else " (finetune export --to transformers)")) from None


@contextlib.contextmanager
def staging(out: Path):
    """A temporary folder beside `out` (same filesystem: the final move is a rename), removed whatever happens."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def move_into_place(staged: Path, out: Path, staged_card: Optional[Path], card_path: Optional[Path]) -> None:
    """Rename the checked files to their place; an earlier export there (--force) is replaced."""
    if staged_card is not None:  # an .onnx file and its card
        os.replace(staged, out)
        os.replace(staged_card, card_path)
        return
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", suffix=".tmp", dir=out.parent))
        os.replace(out, old / "previous")
    os.replace(staged, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -------------------------------------------------------------------------------------- metadata
def class_names_of(model: torch.nn.Module) -> List[str]:
    names = model.finetune_info.get("class_names")
    return list(names) if names else [str(i) for i in range(model.num_classes)]


def temperature_of(model: torch.nn.Module, meta: Dict[str, Any]) -> float:
    """The calibration temperature (`finetune calibrate`), 1.0 when the checkpoint has none."""
    value = meta.get("temperature", model.finetune_info.get("temperature"))
    try:
        value = float(value) if value is not None else 1.0
    except (TypeError, ValueError):
        raise FinetuneError(f"checkpoint metadata field 'temperature' is {value!r}; expected a positive "
                            "number") from None
    if not value > 0:
        raise FinetuneError(f"checkpoint metadata field 'temperature' is {value}; expected a positive number")
    return value


def data_config_record(model: torch.nn.Module) -> Dict[str, Any]:
    """The model's data config as JSON-ready values (what our eval transform reads)."""
    config = data_config_of(model)
    return {"input_size": list(config["input_size"]), "mean": list(config["mean"]), "std": list(config["std"]),
            "interpolation": config.get("interpolation", "bicubic"), "crop_pct": float(config.get("crop_pct", 1.0)),
            "crop_mode": "squash" if float(config.get("crop_pct", 1.0)) == 1.0 else "center"}


# ------------------------------------------------------------------------------------------ ppv
def write_ppv(source: Union[Path, str], out: Path, force: bool) -> Exported:
    """pytorch-pretrained-vit's state dict, as `finetune export --to ppv` always wrote it."""
    from .checkpoints import atomic_write
    from .loading import export_ppv
    refuse_to_overwrite(out, force)
    model = load_model(str(source))
    state = export_ppv(model)
    atomic_write(out, lambda tmp: torch.save(state, tmp))
    info = model.finetune_info
    line = (f"wrote {out}: load with pytorch_pretrained_vit.ViT(..., num_classes={info['num_classes']}, "
            f"image_size={info['img_size']}) and .load_state_dict(torch.load({str(out)!r}))")
    return Exported(out, "ppv", None, None, lines=[line])


# ----------------------------------------------------------------------------------------- ONNX
def onnx_metadata(model: torch.nn.Module, meta: Dict[str, Any], source: Union[Path, str]) -> Dict[str, str]:
    """The ONNX metadata_props: what `finetune eval/predict` (and anyone) need to feed and read the model."""
    provenance = {k: meta.get(k) for k in ("source", "epoch", "metrics", "recipe", "task") if meta.get(k) is not None}
    if meta.get("soup"):
        provenance["soup"] = {k: meta["soup"].get(k) for k in ("method", "ingredients", "kept")}
    provenance.update(format=ONNX_FORMAT, checkpoint=Path(str(source)).name, source=model.finetune_info.get("source"))
    return {"class_names": json.dumps(class_names_of(model)), "data_config": json.dumps(data_config_record(model)),
            "temperature": repr(temperature_of(model, meta)), "num_classes": str(model.num_classes),
            "input_name": INPUT_NAME, "output_name": OUTPUT_NAME, "finetune": json.dumps(provenance, default=str),
            **task_metadata(model, meta)}


def task_metadata(model: torch.nn.Module, meta: Dict[str, Any]) -> Dict[str, str]:
    """The task's metadata_props: `task`, and multi-label its `threshold` and per-class `thresholds`
    (what turns the exported logits into labels)."""
    calibration = tasks.calibration_of({**model.finetune_info, **meta})
    found = {"task": tasks.of_meta({**model.finetune_info, **meta}).name}
    if found["task"] == "multilabel":
        found.update(threshold=json.dumps(calibration["threshold"]), thresholds=json.dumps(calibration["thresholds"]))
    return found


def write_onnx(model: torch.nn.Module, path: Path, meta: Dict[str, Any], source: Any = "") -> Check:
    """`model` as one .onnx file (batch axis dynamic, metadata_props set), checked with onnxruntime."""
    import onnx
    import onnxruntime as ort
    size = model.patch_embed.img_size
    if sum(p.numel() * p.element_size() for p in model.parameters()) > 1.9 * 2 ** 30:
        raise FinetuneError("the model's weights exceed ONNX's 2 GB single-file limit (protobuf); exporting them "
                            "as external data is not supported yet")
    example = torch.randn(2, model.patch_embed.proj.in_channels, *size)
    exporter = _onnx_export(model, example, path)
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(onnx_metadata(model, meta, source), exporter=exporter)
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = f"finetune export of {Path(str(source)).name or 'a checkpoint'}: logits of " \
                       f"{model.num_classes} classes; see metadata_props"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return compare(model, lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0],
                   check_batches(model, check_images(size[0])), "onnxruntime")


def _onnx_export(model: torch.nn.Module, example: torch.Tensor, path: Path) -> str:
    """Export with torch's dynamo exporter; the TorchScript exporter when dynamo cannot trace the model."""
    import warnings
    try:
        # The dynamo exporter (torch.export + onnxscript) first: it is torch's maintained ONNX path and
        # default since torch 2.9, it keeps the batch axis symbolic through `dynamic_shapes` (checked
        # below at batch sizes 3 and 1), and it translates timm's fused scaled_dot_product_attention.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        return "torch.onnx dynamo"
    except Exception as dynamo_error:  # noqa: BLE001 — torch.export fails in many ways on untraceable code
        # The TorchScript exporter (deprecated upstream, still in torch) traces the eager forward
        # once: the fallback for a model torch.export cannot capture (data-dependent control flow
        # in a custom block); the check against our logits below judges its result like dynamo's.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        except Exception as e:  # noqa: BLE001
            raise FinetuneError(f"torch.onnx cannot export this model: dynamo: {_first_line(dynamo_error)}; "
                                f"TorchScript: {_first_line(e)}") from e
        return "torch.onnx TorchScript"


# --------------------------------------------------------------------------------- transformers
def unrepresentable(model: torch.nn.Module) -> List[str]:
    """What of `model` transformers' ViTForImageClassification cannot hold (empty: it is a plain class-token ViT)."""
    identity = torch.nn.Identity
    found = []
    if getattr(model, "dist_token", None) is not None:
        found.append("a distillation token (DeiT distilled)")
    if model.cls_token is None:
        found.append("no class token")
    if getattr(model, "global_pool", "token") != "token":
        found.append(f"global pool {model.global_pool!r} (transformers classifies from the class token)")
    if getattr(model, "reg_token", None) is not None:
        found.append("register tokens")
    if getattr(model, "no_embed_class", False):
        found.append("a position embedding without the class token (no_embed_class)")
    if model.pos_embed is None:
        found.append("no learned position embedding")
    if getattr(model, "attn_pool", None) is not None:
        found.append("attention pooling")
    for name in ("norm_pre", "fc_norm"):
        if not isinstance(getattr(model, name, identity()), identity):
            found.append(f"{name}")
    if not isinstance(getattr(model.patch_embed, "norm", identity()), identity) or model.patch_embed.proj.bias is None:
        found.append("a patch embedding with a norm or without bias")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    if not isinstance(model.norm, torch.nn.LayerNorm) or len({m.eps for m in norms}) > 1:
        found.append("norm layers other than one LayerNorm type")
    for block in model.blocks:
        found += _unrepresentable_block(block, model.blocks[0])
    return list(dict.fromkeys(found))


def _unrepresentable_block(block: torch.nn.Module, first: torch.nn.Module) -> List[str]:
    from timm.layers import Mlp
    from timm.models.vision_transformer import Block

    def plain(module: Optional[torch.nn.Module]) -> bool:
        return module is None or isinstance(module, torch.nn.Identity)
    if type(block) is not Block:
        return [f"{type(block).__name__} blocks"]
    found = []
    if not (plain(block.ls1) and plain(block.ls2)):
        found.append("layer scale")
    if not (plain(block.attn.q_norm) and plain(block.attn.k_norm) and plain(getattr(block.attn, "norm", None))):
        found.append("qk norm or attention norm")
    act = getattr(block.mlp, "act", None)
    if type(block.mlp) is not Mlp or not (isinstance(act, torch.nn.GELU) and act.approximate == "none") \
            or not plain(getattr(block.mlp, "norm", None)):
        found.append("an MLP other than Linear-GELU-Linear")
    if block.attn.proj.bias is None or (block.attn.qkv.bias is None) != (first.attn.qkv.bias is None):
        found.append("attention projections without bias")
    return found


def refuse_unrepresentable(model: torch.nn.Module) -> None:
    found = unrepresentable(model)
    if found:
        raise FinetuneError(f"transformers' ViTForImageClassification cannot represent this model "
                            f"({'; '.join(found)}); export it --to onnx or --to timm instead")


def transformers_config(model: torch.nn.Module):
    """The ViTConfig of `model` (sizes, LayerNorm epsilon, labels)."""
    from transformers import ViTConfig
    names = class_names_of(model)
    return ViTConfig(
        hidden_size=model.embed_dim, num_hidden_layers=len(model.blocks),
        num_attention_heads=model.blocks[0].attn.num_heads, intermediate_size=model.blocks[0].mlp.fc1.out_features,
        hidden_act="gelu", layer_norm_eps=model.norm.eps,
        image_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
        num_channels=model.patch_embed.proj.in_channels, qkv_bias=model.blocks[0].attn.qkv.bias is not None,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=model.num_classes,
        id2label={i: name for i, name in enumerate(names)}, label2id={name: i for i, name in enumerate(names)},
        architectures=["ViTForImageClassification"],
        # transformers' own switch between softmax cross-entropy and BCE (its loss and pipelines).
        problem_type="multi_label_classification" if tasks.of_model(model).name == "multilabel"
        else "single_label_classification")


def image_processor(model: torch.nn.Module):
    """The transformers image processor that reproduces our eval transform.

    Our eval transform is timm's: with crop_pct 1 a resize straight to size x size (squash), which
    is ViTImageProcessor's own; otherwise a resize of the shortest edge to floor(size / crop_pct)
    keeping the aspect ratio, then a center crop of size x size. ViTImageProcessor cannot crop
    (it squashes the whole image) and DeiTImageProcessor squashes to a fixed square before its
    crop, so both stretch non-square photos; BitImageProcessor (shortest_edge resize + crop_size
    center crop, as DINOv2's repos use with ViTs) does exactly timm's steps. ConvNext's crop_pct
    would too, but only below 384 px.
    """
    from transformers import BitImageProcessor, ViTImageProcessor
    config = data_config_record(model)
    size = config["input_size"][-1]
    resample = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1, "box": 4, "hamming": 5}.get(
        config["interpolation"], 3)
    common = dict(image_mean=config["mean"], image_std=config["std"], resample=resample, do_rescale=True,
                  rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True)
    if config["crop_pct"] == 1.0:
        return ViTImageProcessor(size={"height": size, "width": size}, do_resize=True, **common)
    return BitImageProcessor(size={"shortest_edge": math.floor(size / config["crop_pct"])}, do_resize=True,
                             do_center_crop=True, crop_size={"height": size, "width": size}, **common)


def write_transformers(model: torch.nn.Module, folder: Path, meta: Dict[str, Any], source: Any = "") -> Check:
    """config.json, model.safetensors (the Hub's ViTForImageClassification layout) and
    preprocessor_config.json; checked with AutoModelForImageClassification + AutoImageProcessor."""
    from safetensors.torch import save_file
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    from transformers.utils import logging as hf_logging
    refuse_unrepresentable(model)
    folder.mkdir(parents=True)
    transformers_config(model).save_pretrained(str(folder))
    state = convert.timm_to_hf({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    image_processor(model).save_pretrained(str(folder))
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        reloaded, info = AutoModelForImageClassification.from_pretrained(str(folder), output_loading_info=True)
        processor = AutoImageProcessor.from_pretrained(str(folder))
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise FinetuneError(f"transformers did not load every exported weight ({str(problems)[:200]}); nothing written")
    reloaded.eval()
    images = check_images(model.patch_embed.img_size[0])
    check = compare(model, lambda x: reloaded(pixel_values=x).logits, check_batches(model, images), "transformers")
    ours = torch.stack([eval_transform(model)(image) for image in images])
    theirs = torch.as_tensor(processor(images=images, return_tensors="pt")["pixel_values"])
    if theirs.shape != ours.shape:
        check.pixel_diff, check.pixel_note = math.inf, f" ({type(processor).__name__}: shape {tuple(theirs.shape)})"
        return check
    per_image = (theirs - ours).abs().flatten(1).max(1).values.tolist()
    shifted = [crop_offset_differs(image, data_config_record(model)) for image in images]
    agreeing = [d for d, s in zip(per_image, shifted) if not s]
    check.pixel_diff = max(agreeing or per_image)
    check.pixel_note = f" ({type(processor).__name__})"
    if any(shifted):
        check.pixel_note += (f" where the crops agree; {sum(shifted)} of {len(images)} images are cropped one pixel "
                             f"off (transformers floors the centre-crop offset, torchvision rounds it): "
                             f"max {max(per_image):.3g} there")
    return check


def crop_offset_differs(image, config: Dict[str, Any]) -> bool:
    """Whether transformers' center crop lands one pixel off ours for this image: after the shortest-edge
    resize, torchvision offsets the crop by round(excess / 2) (half to even), transformers by floor."""
    size, crop_pct = config["input_size"][-1], config["crop_pct"]
    if crop_pct == 1.0:
        return False
    scale, (w, h) = math.floor(size / crop_pct), image.size
    resized = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)  # torchvision's rule
    return any(int(round((side - size) / 2.0)) != (side - size) // 2 for side in resized if side > size)


# ----------------------------------------------------------------------------------------- timm
def timm_architecture(model: torch.nn.Module) -> Tuple[str, Dict[str, Any], List[str]]:
    """(timm architecture name, create_model arguments, notes) that rebuild `model` with timm alone.

    A checkpoint built from explicit arguments (DeiT read from a file, a scratch ViT) names no timm
    architecture: the plain ViT entry point of its family (vit_tiny_patch16_224, ...) stands in,
    with every size argument stated, so the entry point's own defaults change nothing.
    """
    import timm
    from .convert import FAMILY
    arch = model.finetune_info["arch"]
    kwargs = dict(arch.get("kwargs") or {})
    notes = []
    eps = kwargs.pop("norm_eps", None)
    if eps is not None and eps != 1e-6:
        notes.append(f"LayerNorm epsilon {eps:g} is built as timm's 1e-6 (timm's config cannot carry it)")
    name = arch.get("timm_name")
    if not name:
        family = FAMILY.get(model.embed_dim, ("base",))[0]
        candidate = f"vit_{family}_patch{model.patch_embed.patch_size[0]}_{model.patch_embed.img_size[0]}"
        name = candidate if timm.is_model(candidate) else "vit_base_patch16_224"
        kwargs = {"patch_size": model.patch_embed.patch_size[0], "embed_dim": model.embed_dim,
                  "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads,
                  "mlp_ratio": model.blocks[0].mlp.fc1.out_features / model.embed_dim, **kwargs}
    kwargs.update(num_classes=model.num_classes, img_size=model.patch_embed.img_size[0])
    return name, kwargs, notes


def timm_pretrained_cfg(model: torch.nn.Module, architecture: str) -> Dict[str, Any]:
    """timm's pretrained_cfg for the export: our data config, with crop_mode saying what our transform
    does (crop_pct 1 squashes; timm's 'center' would crop a non-square image)."""
    config = data_config_record(model)
    return {"architecture": architecture, "input_size": tuple(config["input_size"]), "fixed_input_size": True,
            "interpolation": config["interpolation"], "crop_pct": config["crop_pct"], "crop_mode": config["crop_mode"],
            "mean": tuple(config["mean"]), "std": tuple(config["std"]), "num_classes": model.num_classes,
            "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head"}


def write_timm(model: torch.nn.Module, folder: Path, meta: Dict[str, Any], source: Any = "") -> Check:
    """config.json (timm's format, written by timm's own save_for_hf) and model.safetensors; checked
    with timm.create_model('local-dir:FOLDER', pretrained=True), the loader hf-hub: ids go through."""
    import timm
    from timm.models import save_for_hf
    architecture, args, notes = timm_architecture(model)
    try:
        rebuilt = timm.create_model(architecture, pretrained=False, **args)
        rebuilt.load_state_dict(model.state_dict())
    except (RuntimeError, TypeError, ValueError) as e:
        raise FinetuneError(f"timm cannot rebuild this model as {architecture} with {str(args)[:160]} "
                            f"({_first_line(e)})") from e
    rebuilt.pretrained_cfg = timm_pretrained_cfg(model, architecture)
    names = model.finetune_info.get("class_names")
    save_for_hf(rebuilt.eval(), str(folder), model_config={"label_names": list(names)} if names else None,
                safe_serialization=True)
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    images = check_images(model.patch_embed.img_size[0])
    check = compare(model, reloaded, check_batches(model, images), "timm")
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=reloaded))
    ours = torch.stack([eval_transform(model)(image) for image in images])
    theirs = torch.stack([transform(image) for image in images])
    check.pixel_diff = (theirs - ours).abs().max().item() if theirs.shape == ours.shape else math.inf
    check.pixel_note = f" (timm.data.create_transform){'; ' + '; '.join(notes) if notes else ''}"
    return check


# ----------------------------------------------------------------------------------- Hub upload
def push(out: Path, to: str, repo_id: str, card_path: Optional[Path]) -> str:
    """Upload an export to the Hugging Face Hub repo `repo_id` (created if missing); its URL."""
    from huggingface_hub import HfApi
    api = HfApi(endpoint=hubs.hf_endpoint(), library_name="finetune")
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        message = f"finetune export --to {to}"
        if to == "onnx":
            api.upload_file(path_or_fileobj=str(out), path_in_repo=out.name, repo_id=repo_id, commit_message=message)
            api.upload_file(path_or_fileobj=str(card_path), path_in_repo="README.md", repo_id=repo_id,
                            commit_message=message)
        else:
            api.upload_folder(folder_path=str(out), repo_id=repo_id, commit_message=message)
    except Exception as e:  # noqa: BLE001 — HTTP, auth and network errors of huggingface_hub
        raise FinetuneError(f"--push-to-hub {repo_id}: upload failed ({_first_line(e)}); the export is at {out}") from e
    return f"{hubs.hf_endpoint()}/{repo_id}"


# ----------------------------------------------------------------------------- the model card
def stored_scores(source: Union[Path, str], meta: Dict[str, Any], reason: str) -> Dict[str, Any]:
    """The scores kept with a checkpoint: val top-1 in its metadata, test in its run's results.json."""
    splits: Dict[str, Dict[str, Any]] = {}
    metrics = meta.get("metrics") or {}
    if metrics.get("val_top1") is not None:
        splits["val"] = {"top1": metrics["val_top1"], "top5": metrics.get("val_top5"), "loss": metrics.get("val_loss")}
    if metrics.get("val_mAP") is not None:
        splits["val"] = {"mAP": metrics["val_mAP"], "f1_micro": metrics.get("val_f1_micro"),
                         "f1_macro": metrics.get("val_f1_macro"), "loss": metrics.get("val_loss")}
    if metrics.get("test_top1") is not None:
        splits["test"] = {"top1": metrics["test_top1"]}
    if isinstance(source, Path) and source.is_file():
        for split, entry in rundir.stored_results(source).items():
            if isinstance(entry, dict) and (entry.get("top1") is not None or entry.get("mAP") is not None):
                splits[split] = {**splits.get(split, {}), **entry}
    return {"splits": splits, "sizes": {}, "origin": "stored with the checkpoint", "note": reason}


def card_scores(source: Union[Path, str], model: torch.nn.Module, meta: Dict[str, Any], device: Optional[str],
                log: Callable[[str], None]) -> Dict[str, Any]:
    """Val and test scores (per-class accuracy, split sizes) of the checkpoint on its recipe's data,
    computed now as `finetune eval` does; the stored ones, with the reason, when that is impossible."""
    from . import data as data_lib
    from . import evaluation
    if not isinstance(source, Path) or not (meta.get("recipe") or (source.parent / rundir.RECIPE).is_file()):
        log("model card: no recipe stored with the checkpoint or beside it, so no data to score it on")
        return stored_scores(source, meta, "no recipe stored with the checkpoint, so no data to score it on")
    try:
        recipe = evaluation.recipe_for(source)
        config = data_config_of(model)
        splits = evaluation.build_splits(recipe, config["input_size"][-1], config, augment="none")
        if list(splits.class_names) != class_names_of(model):
            return stored_scores(source, meta, "the recipe's data has other classes than the checkpoint")
        target = evaluation.choose_device(device)
        scoring = model.to(target)
        precision = evaluation.scoring_precision(recipe, scoring, evaluation.eval_batch_size(recipe))
        reports = {}
        for split in ("val", "test"):
            dataset = getattr(splits, split)
            if dataset is None or len(dataset) == 0:
                continue
            log(f"scoring {split} ({len(dataset)} images) for the model card ...")
            loader = data_lib.build_loader(dataset, batch_size=evaluation.eval_batch_size(recipe), train=False,
                                           workers=recipe.data.workers)
            reports[split] = evaluation.evaluate(scoring, loader, precision=precision)
        model.to("cpu")
    except FinetuneError as e:
        model.to("cpu")
        log(f"model card: stored scores only ({e})")
        return stored_scores(source, meta, str(e))
    sizes = {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test) if splits.test else 0}
    return {"splits": reports, "sizes": sizes, "origin": f"scored at export ({precision}, as finetune eval)",
            "note": ""}


def describe_base(ref: str) -> Tuple[str, Optional[str]]:
    """(where the base weights came from, their Hub id for the card's base_model when there is one)."""
    from . import download
    if not ref:
        return "unknown", None
    if ref in ZOO:
        inner, hub = describe_base(ZOO[ref].sources[0])
        return f"zoo name {ref} = {ZOO[ref].sources[0]}: {inner}", hub
    scheme, _, rest = ref.partition(":")
    if scheme == "timm" and rest:
        try:
            import timm
            hub_id = timm.models.get_pretrained_cfg(rest).hf_hub_id or f"timm/{rest}"
        except Exception:  # noqa: BLE001 — an unknown tag still has a sensible description
            hub_id = f"timm/{rest}"
        return f"timm pretrained tag {rest} (https://huggingface.co/{hub_id})", hub_id
    if scheme == "hf" and rest:
        return f"transformers checkpoint https://huggingface.co/{rest}", rest
    if scheme == "ppv" and rest:
        return f"pytorch-pretrained-vit release file {download.ppv_url(rest)}", None
    if scheme == "npz" and rest:
        return f"Google ViT .npz {rest if Path(rest).is_file() else download.npz_url(rest)}", None
    if scheme == "scratch":
        return f"no pretrained weights: a randomly initialised ViT ({rest})", None
    path = Path(ref)
    if path.is_file():
        return f"local file `{path}` (sha256 {file_sha256(path)})", None
    return f"`{ref}`", None


def _recipe_summary(recipe: Dict[str, Any]) -> List[str]:
    opt, sched, data = recipe.get("optimizer") or {}, recipe.get("schedule") or {}, recipe.get("data") or {}
    lines = [f"- {recipe.get('epochs')} epochs (at most {recipe['max_steps_per_epoch']} steps each)"
             if recipe.get("max_steps_per_epoch") else f"- {recipe.get('epochs')} epochs",
             f"- batch size {recipe.get('batch_size')}, {recipe.get('precision')} precision, seed {recipe.get('seed')}",
             f"- optimizer {opt.get('name')} lr {opt.get('lr')}, momentum {opt.get('momentum')}, weight decay "
             f"{opt.get('weight_decay')}" + (f", layer decay {opt['layer_decay']}" if opt.get("layer_decay") else ""),
             f"- schedule {sched.get('name')}, {sched.get('warmup_epochs')} warmup epochs",
             f"- augment {data.get('augment')}, label smoothing {recipe.get('label_smoothing')}"]
    lora = recipe.get("lora") or {}
    if lora.get("rank"):
        lines.append(f"- LoRA rank {lora['rank']}, alpha {lora.get('alpha')} on {lora.get('targets')} (peft); the "
                     "adapters are merged into the exported weights, which are a plain ViT")
    if recipe.get("freeze", "none") != "none":
        lines.append(f"- frozen: {recipe['freeze']}")
    for key, label in (("drop_path", "drop path"), ("dropout", "dropout")):
        if recipe.get(key):
            lines.append(f"- {label} {recipe[key]}")
    if (recipe.get("model_ema") or {}).get("decay"):
        lines.append(f"- EMA of the weights, decay {recipe['model_ema']['decay']}")
    mixup = recipe.get("mixup") or {}
    if mixup.get("mixup_alpha") or mixup.get("cutmix_alpha"):
        lines.append(f"- mixup alpha {mixup.get('mixup_alpha')}, cutmix alpha {mixup.get('cutmix_alpha')}")
    return lines


def _preprocessing_text(config: Dict[str, Any]) -> str:
    size = config["input_size"][-1]
    if config["crop_pct"] == 1.0:
        geometry = f"resize to {size}x{size} ({config['interpolation']}, aspect ratio not kept)"
    else:
        geometry = (f"resize the shorter side to {math.floor(size / config['crop_pct'])} ({config['interpolation']}, "
                    f"aspect ratio kept), center crop {size}x{size} (crop_pct {config['crop_pct']})")
    return (f"RGB, {geometry}, scale to [0, 1], normalise with mean {tuple(config['mean'])} and std "
            f"{tuple(config['std'])}")


def _fraction(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _results_lines(scores: Dict[str, Any], names: List[str]) -> List[str]:
    splits = scores["splits"]
    if not splits:
        return [f"No scores: {scores['note'] or 'none stored with the checkpoint'}."]
    lines = [f"Scores {scores['origin']}" + (f" ({scores['note']})" if scores["note"] else "") + ".", ""]
    multilabel = any("mAP" in report for report in splits.values())
    columns, per_class, title = ((("mAP", "mAP"), ("F1 micro", "f1_micro"), ("F1 macro", "f1_macro")), "per_class_ap",
                                 "Per-class average precision:") if multilabel else \
        ((("top-1", "top1"), ("top-5", "top5")), "per_class", "Per-class accuracy (recall):")
    columns += (("loss", "loss"),)
    lines += ["| split | images | " + " | ".join(name for name, _ in columns) + " |",
              "| --- | ---: |" + " ---: |" * len(columns)]
    for split, report in splits.items():
        lines.append(f"| {split} | {report.get('n', '-')} | "
                     + " | ".join(_fraction(report.get(key)) for _, key in columns) + " |")
    with_classes = [s for s, r in splits.items() if r.get(per_class)]
    if with_classes:
        lines += ["", title, "",
                  "| class | " + " | ".join(with_classes) + " |", "| --- |" + " ---: |" * len(with_classes)]
        for i, name in enumerate(names):
            lines.append(f"| {name} | " + " | ".join(_fraction(splits[s][per_class][i]) for s in with_classes) + " |")
    return lines


def _soup_lines(soup: Dict[str, Any]) -> List[str]:
    lines = [f"This is a **{soup.get('method')} soup** (weights averaged, Wortsman et al. 2022)"
             + (f", selected on {soup['split']}" if soup.get("split") else "") + ". Ingredients:", "",
             "| ingredient | sha256 | val top-1 | score | weight |", "| --- | --- | ---: | ---: | ---: |"]
    weights = soup.get("weights") or []
    for i, entry in enumerate(soup.get("ingredients") or []):
        weight = weights[i] if i < len(weights) else None
        lines.append(f"| {entry.get('path')} | {str(entry.get('sha256', '-'))[:12]} | "
                     f"{_fraction(entry.get('val_top1'))} | {_fraction(entry.get('score'))} | {_fraction(weight)} |")
    if "kept" in soup:
        lines += ["", f"Kept: {', '.join(soup['kept'])}; rejected: {', '.join(soup.get('rejected') or []) or 'none'}."]
    if soup.get("method") == "wise":
        lines += ["", f"WiSE-FT alpha {soup.get('alpha')} between {soup.get('pretrained')} and the fine-tune."]
    return lines


def _label_rule(calibration: Dict[str, Any], names: List[str]) -> str:
    """Multi-label: which threshold makes a label, in words."""
    if calibration.get("thresholds") is not None:
        return ("Multi-label: a class is predicted when its calibrated sigmoid reaches its own threshold (chosen on "
                "val for the best F1 of that class): " + ", ".join(f"{n} {t:.2f}" for n, t in
                                                                 zip(names, calibration["thresholds"])) + ".")
    threshold = calibration.get("threshold")
    return (f"Multi-label: a class is predicted when its sigmoid reaches {0.5 if threshold is None else threshold:.2f} "
            "(chosen on val for the best micro F1).")


def load_snippet(to: str, out: Path, repo_id: Optional[str], temperature: float,
                 multilabel: Optional[Dict[str, Any]] = None) -> str:
    """How to load and run the export with its library alone (the card's usage section);
    `multilabel`: the checkpoint's `tasks.calibration_of`, for the sigmoid and its thresholds."""
    names = {"onnx": "names", "transformers": "model.config.id2label", "timm": 'model.pretrained_cfg["label_names"]'}[to]
    scaled = "logits / temperature" if temperature != 1.0 and to != "onnx" else "logits"  # onnx: divided above
    scaled = scaled.replace("temperature", repr(temperature))
    if multilabel is None:
        index = "int(logits.argmax())" if to == "onnx" else "int(logits.argmax(-1))"
        readout = f"print({names}[{index}])"
        if to != "onnx":
            readout = f"probabilities = ({scaled}).softmax(-1)\n" + readout
    else:
        threshold = 0.5 if multilabel.get("threshold") is None else multilabel["threshold"]
        cuts = ([round(t, 4) for t in multilabel["thresholds"]] if multilabel.get("thresholds")
                else [threshold] * len(multilabel.get("names") or []) or threshold)
        sigmoid = "1 / (1 + np.exp(-logits[0]))" if to == "onnx" else f"({scaled})[0].sigmoid()"
        readout = (f"probabilities = {sigmoid}  # multi-label: a sigmoid per class\n"
                   f"thresholds = {cuts!r}  # per class\n"
                   f"print([{names}[i] for i, p in enumerate(probabilities.tolist()) if p >= thresholds[i]])")
    return _snippet(to, out, repo_id, readout)


def _snippet(to: str, out: Path, repo_id: Optional[str], readout: str) -> str:
    if to == "onnx":
        return f'''```python
import json
import numpy as np
import onnxruntime as ort
from PIL import Image

session = ort.InferenceSession("{out.name}", providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
names, config = json.loads(meta["class_names"]), json.loads(meta["data_config"])
temperature = float(meta["temperature"])

def preprocess(path):  # the data config's eval transform (timm's), in PIL and numpy
    image, size, crop = Image.open(path).convert("RGB"), config["input_size"][-1], config["crop_pct"]
    resample = {{"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}}.get(config["interpolation"], Image.NEAREST)
    if crop == 1.0:
        image = image.resize((size, size), resample)
    else:
        scale, (w, h) = int(size / crop), image.size
        w, h = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
        image = image.resize((w, h), resample)
        left, top = int(round((w - size) / 2)), int(round((h - size) / 2))
        image = image.crop((left, top, left + size, top + size))
    x = (np.asarray(image, np.float32) / 255 - np.float32(config["mean"])) / np.float32(config["std"])
    return x.transpose(2, 0, 1)[None].astype(np.float32)

logits = session.run(["{OUTPUT_NAME}"], {{"{INPUT_NAME}": preprocess("photo.jpg")}})[0] / temperature
{readout}
```

Or with finetune itself (`pip install 'finetune[onnx]'`): `finetune predict {out.name} photo.jpg`,
`finetune eval {out.name} --recipe RECIPE`.'''
    if to == "transformers":
        where = repo_id or str(out)
        return f'''```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{where}")  # backend="pil" resizes exactly as finetune does
model = AutoModelForImageClassification.from_pretrained("{where}").eval()
inputs = processor(images=Image.open("photo.jpg").convert("RGB"), return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
{readout}
```'''
    where = f"hf-hub:{repo_id}" if repo_id else "hf-hub:ORG/NAME"
    return f'''```python
import timm
import torch
from PIL import Image

model = timm.create_model("{where}", pretrained=True).eval()  # or "local-dir:{out}"
transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))
with torch.no_grad():
    logits = model(transform(Image.open("photo.jpg").convert("RGB"))[None])
{readout}
```'''


def model_card(to: str, out: Path, source: Union[Path, str], model: torch.nn.Module, meta: Dict[str, Any],
               scores: Dict[str, Any], check: Check, repo_id: Optional[str] = None) -> str:
    """The README.md of an export: base weights, recipe, data, scores, calibration, soup, how to load."""
    import yaml
    recipe = meta.get("recipe") or {}
    names = class_names_of(model)
    config = data_config_record(model)
    temperature = temperature_of(model, meta)
    info = model.finetune_info
    recorded = meta.get("source") or info.get("source")
    base_ref = recipe.get("model") or (recorded if recorded != "soup" else "") or str(source)
    base, hub_id = describe_base(str(base_ref))
    name = out.stem if to == "onnx" else out.name
    library = {"onnx": "onnx", "transformers": "transformers", "timm": "timm"}[to]
    front = ["---", f"library_name: {library}", "pipeline_tag: image-classification",
             "tags:", "- image-classification", "- vision-transformer", "- finetune", f"- {library}"]
    if hub_id:
        front.append(f"base_model: {hub_id}")
    front.append("---")
    params = sum(p.numel() for p in model.parameters())
    lines = front + [
        f"# {name}", "",
        f"A Vision Transformer fine-tuned with finetune to tell {len(names)} classes apart"
        + (f" ({', '.join(names[:12])}{', ...' if len(names) > 12 else ''})" if names else "") + ".",
        f"Exported for **{LIBRARIES[to]}** from `{Path(str(source)).name}`"
        + (f" (sha256 {file_sha256(source)[:16]}...)" if isinstance(source, Path) and source.is_file() else "")
        + (f", epoch {meta['epoch']}" if meta.get("epoch") is not None else "") + ".", "",
        "## Base weights", "",
        f"- started from `{base_ref}`: {base}",
        f"- architecture: ViT, patch {model.patch_embed.patch_size[0]}, width {model.embed_dim}, depth "
        f"{len(model.blocks)}, {model.blocks[0].attn.num_heads} heads, {model.patch_embed.img_size[0]} px, "
        f"{params:,} parameters", ""]
    if meta.get("soup"):
        lines += ["## Soup", ""] + _soup_lines(meta["soup"]) + [""]
    lines += ["## Recipe", ""]
    if recipe:
        lines += _recipe_summary(recipe) + ["", "<details><summary>the full recipe</summary>", "", "```yaml",
                                            yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", "", "</details>"]
    else:
        lines.append("No recipe stored with the checkpoint.")
    data = recipe.get("data") or {}
    sizes = scores.get("sizes") or {}
    lines += ["", "## Data", ""]
    if data:
        lines.append(f"- dataset `{data.get('dataset')}`" + (f" at `{data['root']}`" if data.get("root") else ""))
    if sizes:
        lines.append(f"- split sizes: {sizes.get('train')} train, {sizes.get('val')} val, {sizes.get('test') or 0} "
                     "test images")
    else:
        lines.append("- split sizes: not recorded (export with --eval and the data present to count them)")
    lines.append("- classes (index: name): " + ", ".join(f"{i}: {n}" for i, n in enumerate(names[:50]))
                 + (f", ... ({len(names)} in all)" if len(names) > 50 else ""))
    lines += ["", "## Preprocessing", "", _preprocessing_text(config) + ".", "", "## Results", ""]
    lines += _results_lines(scores, names)
    lines += ["", "## Calibration", ""]
    calibration = tasks.calibration_of({**info, **meta})
    multilabel = tasks.of_meta({**info, **meta}).name == "multilabel"
    squash = "sigmoid" if multilabel else "softmax"
    if meta.get("temperature") is not None or info.get("temperature") is not None:
        lines.append(f"Temperature {temperature:.4g} (`finetune calibrate`): divide the logits by it before the "
                     f"{squash} for calibrated probabilities; the exported logits are the raw ones.")
    else:
        lines.append(f"Not calibrated (temperature 1.0): probabilities are the {squash} of the raw logits.")
    if multilabel:
        lines += ["", _label_rule(calibration, names)]
    lines += ["", "## Export check", "", f"{check.line()}.", "", f"## Load it with {LIBRARIES[to]}", "",
              load_snippet(to, out, repo_id, temperature, {**calibration, "names": names} if multilabel else None), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------ scoring an .onnx file
class OnnxClassifier(torch.nn.Module):
    """An .onnx export behind the interface `finetune.evaluation.evaluate` uses: called on a batch of
    normalised images it returns their logits (onnxruntime, fp32), and it carries the export's class
    names and data config as a model from `load_model` does (`finetune_info`, `pretrained_cfg`)."""

    def __init__(self, path: Union[str, Path], device: Optional[str] = None):
        super().__init__()
        ort = _import_optional("onnxruntime", "onnx")
        path = Path(path)
        if not path.is_file():
            raise FinetuneError(f"{path}: no such ONNX file")
        providers = ["CPUExecutionProvider"]
        if device and device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise FinetuneError(f"--device {device}: this onnxruntime has no CUDA provider; install "
                                    "onnxruntime-gpu, or use --device cpu")
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as e:  # noqa: BLE001 — onnxruntime raises its own types for unreadable files
            raise FinetuneError(f"{path}: onnxruntime cannot load it ({_first_line(e)}); is it an ONNX file?") from e
        props = self.session.get_modelmeta().custom_metadata_map
        if "data_config" not in props or "class_names" not in props:
            raise FinetuneError(f"{path}: no finetune metadata (class_names, data_config) in its metadata_props; "
                                "export the checkpoint with finetune export --to onnx")
        try:
            names, config = json.loads(props["class_names"]), json.loads(props["data_config"])
            self.temperature = float(props.get("temperature", 1.0))
            self.provenance = json.loads(props.get("finetune", "{}"))
        except (ValueError, TypeError) as e:
            raise FinetuneError(f"{path}: unreadable finetune metadata in the ONNX file ({e})") from e
        self.input_name = props.get("input_name", self.session.get_inputs()[0].name)
        self.output_name = props.get("output_name", self.session.get_outputs()[0].name)
        self.num_classes = len(names)
        config["input_size"] = tuple(config["input_size"])
        self.pretrained_cfg = dict(config)
        self.finetune_info = {"class_names": names, "data_config": config, "num_classes": len(names),
                              "img_size": config["input_size"][-1], "temperature": self.temperature,
                              "source": self.provenance.get("source"), **_task_info(path, props)}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch = images.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run([self.output_name], {self.input_name: batch})[0])


def _task_info(path: Path, props: Dict[str, str]) -> Dict[str, Any]:
    """`task_metadata` read back (exports from before it: classification)."""
    name = props.get("task", "classification")
    if name not in tasks.TASK_NAMES:
        raise FinetuneError(f"{path}: metadata task {name!r} is not one of {', '.join(tasks.TASK_NAMES)}")
    try:
        return {"task": name, **{k: json.loads(props[k]) for k in ("threshold", "thresholds") if k in props}}
    except ValueError as e:
        raise FinetuneError(f"{path}: unreadable threshold metadata in the ONNX file ({e})") from e


def onnx_recipe(path: Union[str, Path], model: OnnxClassifier, recipe=None, overrides: Sequence[str] = ()):
    """--recipe when given, else the recipe stored in the export's metadata."""
    from .recipes import Recipe, load_recipe, recipe_from_dict
    if isinstance(recipe, Recipe):
        return recipe
    if recipe:
        return load_recipe(str(recipe), overrides)
    stored = model.provenance.get("recipe")
    if stored:
        return recipe_from_dict(stored, source=f"<recipe stored in {path}>", overrides=overrides)
    raise FinetuneError(f"{path}: no recipe stored in the ONNX export; pass --recipe NAME_OR_PATH to say which "
                        "data to score it on")


def evaluate_onnx_on_split(checkpoint: Union[str, Path], recipe=None, overrides: Sequence[str] = (),
                           split: str = "val", batch_size: Optional[int] = None,
                           device: Optional[str] = None) -> Dict[str, Any]:
    """`finetune eval` of an .onnx export: the report `evaluation.evaluate_on_split` gives a checkpoint."""
    from . import evaluation
    model = OnnxClassifier(checkpoint, device)
    chosen = onnx_recipe(checkpoint, model, recipe, overrides)
    loader = evaluation.split_loader(chosen, model, split, batch_size)
    report = evaluation.evaluate(model, loader, device=torch.device("cpu"), precision="fp32")
    report.update(checkpoint=str(checkpoint), split=split, class_names=model.finetune_info["class_names"])
    return report


@torch.inference_mode()
def predict_onnx(checkpoint: Union[str, Path], images: Sequence[str], top_k: int = 5, device: Optional[str] = None,
                 batch_size: int = 32) -> List[Dict[str, Any]]:
    """`finetune predict` of an .onnx export, as of its checkpoint: top-k classes with probabilities,
    softmax(logits / temperature) (multi-label: the sigmoids, and the labels above the thresholds)."""
    from . import data as data_lib
    from .evaluation import predicted_classes
    if top_k < 1:
        raise FinetuneError(f"--top-k: {top_k} is not a positive integer; use e.g. --top-k 5")
    model = OnnxClassifier(checkpoint, device)
    transform = eval_transform(model)
    names = model.finetune_info["class_names"]
    task, calibration = tasks.of_model(model), tasks.calibration_of(model)
    results = []
    for start in range(0, len(images), batch_size):
        paths = list(images[start:start + batch_size])
        batch = torch.stack([transform(data_lib.load_image(path)) for path in paths])
        probabilities = task.probabilities(model(batch), model.temperature)
        for path, row in zip(paths, probabilities):
            results.append({"image": str(path), **predicted_classes(row, names, top_k, task, calibration)})
    return results


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__
