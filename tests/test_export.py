"""Ship what you trained (issue 17): ONNX, transformers and timm exports, each loaded by its library alone.

The default tests export a tiny scratch ViT to every target (seconds); the slow matrix exports real
DeiT-Tiny fine-tunes of the photos in ../shared (plain, greedy soup, LoRA) and loads each in a fresh
interpreter that imports only that library.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
from finetune import cli, export
from finetune.data import build_transforms
from finetune.errors import FinetuneError
from finetune.recipes import load_recipe, recipe_to_dict

from conftest import DEIT_WEIGHTS, HYMENOPTERA, place_in_hf_cache, require_shared, run_entry

SCRATCH = "scratch:patch_size=8,embed_dim=32,depth=1,num_heads=2"
CLASSES = ["ant", "bee", "wasp"]
TEMPERATURE = 1.5
REPO_ID = "finetune-test/scratch-vit"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small tensors score far faster on one thread than on threads fighting other processes for 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def max_diff(a, b) -> float:
    return (torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max().item()


def write_photos(root: Path, per_class: int = 3, seed: int = 0) -> None:
    """An imagefolder (train/ val/) of small photo-like JPEGs of several aspect ratios."""
    images = export.check_images(40, count=per_class * len(CLASSES) * 2, seed=seed)
    for i, image in enumerate(images):
        split = "train" if i % 2 == 0 else "val"
        folder = root / split / CLASSES[(i // 2) % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:03d}.jpg", quality=90)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A 3-class scratch ViT checkpoint (recipe and temperature stored) exported to every target."""
    root = tmp_path_factory.mktemp("export")
    write_photos(root / "photos")
    torch.manual_seed(0)
    model = finetune.load_model(SCRATCH, num_classes=3, img_size=32, class_names=CLASSES)
    with torch.no_grad():  # a new head starts at zero: every logit would be 0
        model.head.weight.normal_(0, 1.0)
    recipe = load_recipe("demo", [f"model={SCRATCH}", "img_size=32", "data.dataset=imagefolder",
                                  f"data.root={root / 'photos'}", "data.workers=0", "precision=fp32",
                                  "batch_size=4"])
    checkpoint = finetune.save_checkpoint(root / "scratch.safetensors", model, epoch=1, metrics={"val_top1": 0.5},
                                          recipe=recipe_to_dict(recipe), temperature=TEMPERATURE)
    outs = {"onnx": root / "scratch.onnx", "transformers": root / "scratch-hf", "timm": root / "scratch-timm"}
    results = {to: export.export(checkpoint, out, to) for to, out in outs.items()}
    return {"root": root, "checkpoint": checkpoint, "model": finetune.load_model(str(checkpoint)).eval(),
            "outs": outs, "results": results}


def val_images(scratch):
    paths = sorted((scratch["root"] / "photos" / "val").glob("*/*.jpg"))
    return paths, [Image.open(p).convert("RGB") for p in paths]


def our_tensors(model, images):
    return torch.stack([export.eval_transform(model)(image) for image in images])


# ------------------------------------------------------------------------------ every target
def test_every_export_passed_its_check_and_carries_a_model_card(scratch):
    for to, result in scratch["results"].items():
        assert result.check.passed and result.check.n == 4 and result.check.batches == [3, 1], to
        card = result.card.read_text()
        assert result.card == (result.path.with_name("scratch.onnx.md") if to == "onnx" else result.path / "README.md")
        assert card.startswith("---\n") and "pipeline_tag: image-classification" in card
        assert "0: ant, 1: bee, 2: wasp" in card and "Temperature 1.5" in card
        assert f"started from `{SCRATCH}`" in card and "randomly initialised" in card
        assert "| val | 9 |" in card and "Per-class accuracy" in card  # scored at export, as finetune eval
        assert "9 train, 9 val, 0 test images" in card
        assert "## Export check" in card and f"## Load it with {export.LIBRARIES[to]}" in card
        assert "```yaml" in card and "dataset: imagefolder" in card


def test_onnx_runs_in_onnxruntime_alone_with_its_metadata(scratch):
    import onnxruntime as ort
    session = ort.InferenceSession(str(scratch["outs"]["onnx"]), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["class_names"]) == CLASSES and float(props["temperature"]) == TEMPERATURE
    config = json.loads(props["data_config"])
    assert config["input_size"] == [3, 32, 32] and config["mean"] == [0.5] * 3 and config["crop_pct"] == 1.0
    assert json.loads(props["finetune"])["recipe"]["data"]["dataset"] == "imagefolder"
    assert session.get_inputs()[0].shape[0] == "batch"  # the batch axis is dynamic
    _, images = val_images(scratch)
    x = our_tensors(scratch["model"], images)  # 9 images: a batch size never seen at export
    logits = session.run(["logits"], {"pixel_values": x.numpy()})[0]
    with torch.no_grad():
        assert max_diff(logits, scratch["model"](x)) <= 1e-4


def test_transformers_folder_loads_with_auto_classes_alone(scratch):
    from transformers import AutoImageProcessor, AutoModelForImageClassification
    folder = scratch["outs"]["transformers"]
    model = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
    assert type(model).__name__ == "ViTForImageClassification"
    assert model.config.id2label == dict(enumerate(CLASSES)) and model.config.label2id == {"ant": 0, "bee": 1, "wasp": 2}
    _, images = val_images(scratch)
    x = our_tensors(scratch["model"], images)
    with torch.no_grad():
        assert max_diff(model(pixel_values=x).logits, scratch["model"](x)) <= 1e-4
    # crop_pct 1: our eval transform squashes to 32x32, as ViTImageProcessor does
    processor = AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    assert type(processor).__name__.startswith("ViTImageProcessor")
    assert max_diff(processor(images=images, return_tensors="pt")["pixel_values"], x) <= 1e-5
    default = AutoImageProcessor.from_pretrained(str(folder))  # torchvision: uint8 resize, within a level or two
    assert max_diff(default(images=images, return_tensors="pt")["pixel_values"], x) <= 2.5 / 255 / 0.5


def test_our_hf_loader_reads_the_transformers_export_back(scratch, offline_caches):
    folder = scratch["outs"]["transformers"]
    place_in_hf_cache(offline_caches / "hf", REPO_ID, {n: folder / n for n in (
        "config.json", "model.safetensors", "preprocessor_config.json")})
    back = finetune.load_model(f"hf:{REPO_ID}").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(back(x), scratch["model"](x)) <= 1e-5
    assert back.finetune_info["class_names"] == CLASSES


def test_timm_folder_loads_from_an_offline_hub_cache_with_timm_alone(scratch, offline_caches, monkeypatch):
    import huggingface_hub
    import timm
    folder = scratch["outs"]["timm"]
    place_in_hf_cache(offline_caches / "hf", REPO_ID, {n: folder / n for n in ("config.json", "model.safetensors")})
    # huggingface_hub reads HF_HOME and HF_HUB_OFFLINE once, at its import: point it at the test's cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(offline_caches / "hf" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = timm.create_model(f"hf-hub:{REPO_ID}", pretrained=True).eval()
    assert model.pretrained_cfg["label_names"] == CLASSES and model.num_classes == 3
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] and config["model_args"]["embed_dim"] == 32 and config["label_names"] == CLASSES
    _, images = val_images(scratch)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    x = torch.stack([transform(image) for image in images])
    assert max_diff(x, our_tensors(scratch["model"], images)) == 0  # timm's transform is ours
    with torch.no_grad():
        assert max_diff(model(x), scratch["model"](x)) <= 1e-4


# ------------------------------------------------------------------------- eval, predict .onnx
def test_finetune_eval_and_predict_read_an_onnx_file(scratch, capsys):
    onnx_file, checkpoint = scratch["outs"]["onnx"], scratch["checkpoint"]
    code, out, _ = run_entry(cli.main, ["eval", onnx_file, "--json"], capsys)  # the recipe stored in it
    assert code == 0
    theirs = json.loads(out)
    code, out, _ = run_entry(cli.main, ["eval", checkpoint, "--json"], capsys)
    ours = json.loads(out)
    assert theirs["confusion"] == ours["confusion"] and theirs["top1"] == ours["top1"] and theirs["n"] == 9
    assert abs(theirs["loss"] - ours["loss"]) <= 1e-5 and theirs["class_names"] == CLASSES
    paths, images = val_images(scratch)
    code, out, _ = run_entry(cli.main, ["predict", onnx_file, *paths[:3], "--json", "--top-k", "3"], capsys)
    assert code == 0
    predicted = json.loads(out)
    with torch.no_grad():
        expected = (scratch["model"](our_tensors(scratch["model"], images[:3])) / TEMPERATURE).softmax(-1)
    for item, row in zip(predicted, expected):
        assert [p["class"] for p in item["top"]] == [CLASSES[i] for i in row.argsort(descending=True).tolist()]
        assert abs(item["top"][0]["probability"] - row.max().item()) <= 1e-5  # calibrated: softmax(logits / T)


def test_the_onnx_cards_snippet_runs_as_written(scratch, monkeypatch):
    card = export.onnx_card_path(scratch["outs"]["onnx"]).read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    paths, images = val_images(scratch)
    monkeypatch.chdir(scratch["root"])  # the snippet opens the .onnx by its name
    printed = []
    namespace = {"print": printed.append}
    exec(code.replace('"photo.jpg"', repr(str(paths[0]))), namespace)  # noqa: S102 — our own card's code
    with torch.no_grad():
        ours = scratch["model"](our_tensors(scratch["model"], images[:1]))
    assert printed == [CLASSES[int(ours.argmax())]]
    assert max_diff(namespace["logits"] * TEMPERATURE, ours) <= 1e-4  # its own preprocessing is ours


# ------------------------------------------------------------------------------- bad input
def no_leftovers(folder: Path) -> list:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def one_line_error(capsys, args):
    code, out, err = run_entry(cli.main, args, capsys)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_exports_are_one_line_errors_and_leave_nothing(scratch, tmp_path, capsys):
    checkpoint = scratch["checkpoint"]
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert "unknown checkpoint extension" in one_line_error(capsys, ["export", tmp_path / "notes.txt",
                                                                     tmp_path / "a.onnx", "--to", "onnx"])
    assert "no such checkpoint file" in one_line_error(capsys, ["export", tmp_path / "missing.safetensors",
                                                                tmp_path / "a.onnx", "--to", "onnx"])
    assert "'tflite' is not one of" in one_line_error(capsys, ["export", checkpoint, tmp_path / "a", "--to", "tflite"])
    assert "ONNX export already" in one_line_error(capsys, ["export", scratch["outs"]["onnx"], tmp_path / "b.onnx",
                                                            "--to", "onnx"])
    assert "ending in .onnx" in one_line_error(capsys, ["export", checkpoint, tmp_path / "model.bin", "--to", "onnx"])
    assert "already exists" in one_line_error(capsys, ["export", checkpoint, scratch["outs"]["onnx"], "--to", "onnx"])
    assert "already exists" in one_line_error(capsys, ["export", checkpoint, scratch["outs"]["timm"], "--to", "timm"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    assert "not an export" in one_line_error(capsys, ["export", checkpoint, tmp_path / "mine", "--to", "timm",
                                                      "--force"])
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    assert "is a folder but not a run directory" in one_line_error(capsys, ["export", tmp_path / "mine",
                                                                            tmp_path / "c.onnx", "--to", "onnx"])
    assert "not a Hub repo id" in one_line_error(capsys, ["export", checkpoint, tmp_path / "d", "--to", "timm",
                                                          "--push-to-hub", "no-slash"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes.txt"]


def test_an_onnx_file_given_to_train_or_soup_is_a_one_line_error(scratch, capsys, tmp_path):
    onnx_file = scratch["outs"]["onnx"]
    for args in (["train", onnx_file], ["soup", onnx_file, onnx_file, "-o", tmp_path / "soup.safetensors"],
                 ["train", "demo", "--set", f"model={onnx_file}", "--out", tmp_path / "run"]):
        err = one_line_error(capsys, args)
        assert "is an ONNX export" in err and "not a checkpoint" in err, err


@pytest.mark.parametrize("missing, target", [("onnxruntime", "onnx"), ("onnx", "onnx"), ("transformers", "transformers")])
def test_a_missing_optional_library_names_its_extra(scratch, tmp_path, capsys, monkeypatch, missing, target):
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
    out = tmp_path / ("m.onnx" if target == "onnx" else "m")
    err = one_line_error(capsys, ["export", scratch["checkpoint"], out, "--to", target])
    assert f"{missing} is not installed" in err and f"finetune[{target}]" in err
    assert not out.exists() and not no_leftovers(tmp_path)
    if missing == "onnxruntime":
        err = one_line_error(capsys, ["eval", scratch["outs"]["onnx"]])
        assert "finetune[onnx]" in err


def test_an_export_that_fails_its_check_leaves_nothing_behind(scratch, tmp_path, capsys, monkeypatch):
    import shutil
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # every difference, even 0, is past it
    # torch.onnx's output stands in for a second real export (10 s): the staging and the check are what is tested
    monkeypatch.setattr(export, "_onnx_export", lambda model, example, path: str(shutil.copy(scratch["outs"]["onnx"], path)))
    for target, out in (("onnx", tmp_path / "m.onnx"), ("transformers", tmp_path / "m")):
        err = one_line_error(capsys, ["export", scratch["checkpoint"], out, "--to", target, "--no-eval"])
        assert "failed its check" in err and "max |logit diff|" in err
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_an_earlier_export_folder(scratch, tmp_path, capsys):
    out = tmp_path / "timm"
    for _ in range(2):
        code, stdout, _ = run_entry(cli.main, ["export", scratch["checkpoint"], out, "--to", "timm", "--force",
                                               "--no-eval"], capsys)
        assert code == 0 and "max |logit diff|" in stdout and f"wrote {out}" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "No scores" not in (out / "README.md").read_text()  # --no-eval: the stored val top-1
    assert not no_leftovers(tmp_path)


def test_what_transformers_cannot_represent_is_named(tmp_path, capsys):
    import timm
    cases = {"no class token": "class_token=False,global_pool=avg", "layer scale": "init_values=0.1",
             "register tokens": "reg_tokens=2"}
    for what, extra in cases.items():
        model = finetune.load_model(f"{SCRATCH},{extra}", num_classes=2, img_size=32)
        path = finetune.save_checkpoint(tmp_path / "odd.safetensors", model)
        err = one_line_error(capsys, ["export", path, tmp_path / "hf", "--to", "transformers"])
        assert what in err and "--to onnx or --to timm" in err, err
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", depth=1, pretrained=False)
    assert export.unrepresentable(distilled)[0].startswith("a distillation token")
    assert not (tmp_path / "hf").exists()


def test_push_to_hub_uploads_the_checked_folder(scratch, tmp_path, monkeypatch):
    import huggingface_hub
    calls = []

    class FakeApi:
        def __init__(self, **kwargs):
            calls.append(("init", kwargs))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path))))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    with pytest.raises(FinetuneError, match="offline mode is on"):  # the suite is offline: refused before any work
        export.export(scratch["checkpoint"], tmp_path / "a", "timm", push_to_hub="org/name", score=False)
    assert not (tmp_path / "a").exists() and calls == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("FINETUNE_OFFLINE")
    result = export.export(scratch["checkpoint"], tmp_path / "b", "timm", push_to_hub="org/name", score=False)
    assert calls[1:] == [("create_repo", "org/name"),
                         ("upload_folder", "org/name", ["README.md", "config.json", "model.safetensors"])]
    assert result.pushed.endswith("/org/name") and 'hf-hub:org/name' in (tmp_path / "b" / "README.md").read_text()


def test_ppv_export_is_unchanged(scratch, tmp_path, capsys):
    code, out, _ = run_entry(cli.main, ["export", scratch["checkpoint"], tmp_path / "vit.pth", "--to", "ppv"], capsys)
    assert code == 0 and "pytorch_pretrained_vit.ViT(..., num_classes=3, image_size=32)" in out
    state = torch.load(tmp_path / "vit.pth", weights_only=True)
    assert "transformer.blocks.0.attn.proj_q.weight" in state


# ------------------------------------------------------- the processor on real photos (shared)
def floor_crop_transform(config, size):
    """Our eval transform with transformers' center-crop offsets (floor) instead of torchvision's (round)."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    scale = math.floor(size / config["crop_pct"])

    def transform(image):
        image = T.Resize(scale, interpolation=T.InterpolationMode.BICUBIC)(image)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = TF.crop(image, top, left, size, size)
        return T.Normalize(config["mean"], config["std"])(T.ToTensor()(image))
    return transform


def test_the_image_processor_reproduces_our_eval_preprocessing_on_real_photos(tmp_path):
    """BitImageProcessor (shortest edge floor(224 / 0.875) = 256, bicubic, center crop 224) against our
    eval transform on every hymenoptera val photo. The PIL backend resizes exactly as we do (PIL under
    torchvision); the one residual is the crop offset when the resized side exceeds 224 by an odd
    number: torchvision rounds half the excess (to even), transformers floors it, a one-pixel shift.
    The default torchvision backend resizes uint8 tensors, within about one grey level of PIL."""
    require_shared(HYMENOPTERA)
    from transformers import AutoImageProcessor
    config = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bicubic", "crop_pct": 0.875}
    model = finetune.load_model(SCRATCH.replace("patch_size=8", "patch_size=16"), num_classes=2, img_size=224,
                                data_config=config)
    processor = export.image_processor(model)
    assert type(processor).__name__ == "BitImageProcessor" and processor.size["shortest_edge"] == 256
    folder = tmp_path / "processor"
    processor.save_pretrained(str(folder))
    pil = AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    default = AutoImageProcessor.from_pretrained(str(folder))
    ours, floor = build_transforms(config, 224, "none", train=False), floor_crop_transform(config, 224)
    shifted, worst = 0, {"pil": 0.0, "default": 0.0, "default_same_crop": 0.0}
    paths = sorted((HYMENOPTERA / "val").glob("*/*.jpg"))[::3]  # 51 of the 153: seconds, both kinds of offsets
    for path in paths:
        image = Image.open(path).convert("RGB")
        x, floored = ours(image), floor(image)
        by_pil = pil(images=image, return_tensors="pt")["pixel_values"][0]
        by_default = default(images=image, return_tensors="pt")["pixel_values"][0]
        same_crop = max_diff(floored, x) == 0
        assert export.crop_offset_differs(image, export.data_config_record(model)) == (not same_crop)
        shifted += not same_crop
        assert max_diff(by_pil, floored) <= 1e-5  # the PIL backend is exactly us, floor-cropped
        worst["pil"] = max(worst["pil"], max_diff(by_pil, x))
        worst["default"] = max(worst["default"], max_diff(by_default, x))
        if same_crop:
            worst["default_same_crop"] = max(worst["default_same_crop"], max_diff(by_default, x))
            assert max_diff(by_pil, x) <= 1e-5
    print(f"\n{len(paths)} photos, {shifted} with a one-pixel crop shift; max |pixel diff|: {worst}")
    assert 0 < shifted < len(paths) and worst["default_same_crop"] <= 3 / 255 / 0.224


# --------------------------------------------------- the slow matrix: real fine-tunes (shared)
REAL = ["precision=fp32", "attention=fused", "data.workers=0", "schedule.warmup_epochs=0", "batch_size=16",
        "max_steps_per_epoch=2"]

LOADER = r'''
"""Load every export with its own library alone (no finetune) and write its logits."""
import json, sys
import numpy as np, torch
from PIL import Image
jobs = json.load(open(sys.argv[1]))
x = torch.from_numpy(np.load(jobs["tensors"]))
images = [Image.open(p).convert("RGB") for p in jobs["images"]]
out = {}
for job in jobs["exports"]:
    name, to, path = job["name"], job["to"], job["path"]
    if to == "onnx":
        import onnxruntime as ort
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        logits = np.concatenate([s.run(["logits"], {"pixel_values": x[i:i + 32].numpy()})[0] for i in range(0, len(x), 32)])
        own = None  # ONNX has no preprocessing of its own: its users apply the data config (our transform)
    elif to == "transformers":
        from transformers import AutoImageProcessor, AutoModelForImageClassification
        m = AutoModelForImageClassification.from_pretrained(path).eval()
        p = AutoImageProcessor.from_pretrained(path)
        with torch.no_grad():
            logits = torch.cat([m(pixel_values=x[i:i + 32]).logits for i in range(0, len(x), 32)]).numpy()
            own = torch.cat([m(**p(images=images[i:i + 32], return_tensors="pt")).logits
                             for i in range(0, len(images), 32)]).argmax(-1).tolist()
    else:
        import timm
        m = timm.create_model("hf-hub:" + job["repo"], pretrained=True).eval()
        t = timm.data.create_transform(**timm.data.resolve_data_config({}, model=m))
        with torch.no_grad():
            logits = torch.cat([m(x[i:i + 32]) for i in range(0, len(x), 32)]).numpy()
            own = torch.cat([m(torch.stack([t(im) for im in images[i:i + 32]])) for i in range(0, len(images), 32)]
                            ).argmax(-1).tolist()
    np.save(job["logits"], logits)
    out[name] = {"own_top1": own, "modules": sorted(k.split(".")[0] for k in sys.modules if k.startswith("finetune"))}
json.dump(out, open(jobs["result"], "w"))
'''


@pytest.fixture(scope="session")
def real_checkpoints(tmp_path_factory):
    """A DeiT-Tiny fine-tune of the photos (2 kept epochs), its greedy soup, and a LoRA fine-tune."""
    require_shared(DEIT_WEIGHTS, HYMENOPTERA)
    from finetune import engine
    from finetune.soup import make_soup
    root = tmp_path_factory.mktemp("real")
    torch.set_num_threads(1)  # the module's one-thread fixture is not up yet for a session fixture
    plain = engine.train_recipe("hymenoptera-deit-tiny", REAL + ["epochs=2", "keep_best=2", "optimizer.lr=0.002"],
                                out_dir=str(root / "plain"), progress=False)
    soup = make_soup([plain.run_dir], out=root / "plain" / "soup-greedy.safetensors", method="greedy")
    lora = engine.train_recipe("hymenoptera-deit-tiny", REAL + ["epochs=1", "lora.rank=4", "lora.alpha=8",
                                                               "optimizer.lr=0.01"],
                               out_dir=str(root / "lora"), progress=False)
    return root, {"plain": plain.best_checkpoint, "soup": Path(soup), "lora": lora.best_checkpoint}


@pytest.mark.slow
def test_real_finetunes_soups_and_lora_exported_to_every_target_match_finetune_eval(real_checkpoints, capsys):
    from finetune.evaluation import evaluate_on_split
    root, checkpoints = real_checkpoints
    paths = sorted((HYMENOPTERA / "val").glob("*/*.jpg"))
    images = [Image.open(p).convert("RGB") for p in paths]
    hf_home = root / "hf-home"
    jobs, ours, reports, lines = [], {}, {}, []
    for kind, checkpoint in checkpoints.items():
        model = finetune.load_model(str(checkpoint)).eval()
        x = our_tensors(model, images)
        np.save(root / f"{kind}-x.npy", x.numpy())
        with torch.no_grad():
            ours[kind] = torch.cat([model(x[i:i + 32]) for i in range(0, len(x), 32)])
        reports[kind] = evaluate_on_split(checkpoint, split="val", store=False)
        assert reports[kind]["n"] == len(paths)
        top1 = ours[kind].argmax(1)
        confusion = torch.zeros(2, 2, dtype=torch.long).index_put_((torch.tensor([0 if "/ants/" in str(p) else 1
                                                                                  for p in paths]), top1),
                                                                   torch.tensor(1), accumulate=True)
        assert confusion.tolist() == reports[kind]["confusion"]  # our per-image top-1 is finetune eval's
        for to in ("onnx", "transformers", "timm"):
            out = root / "exports" / (f"{kind}.onnx" if to == "onnx" else f"{kind}-{to}")
            code, stdout, err = run_entry(cli.main, ["export", checkpoint, out, "--to", to]
                                          + ([] if (kind, to) == ("soup", "transformers") else ["--no-eval"]), capsys)
            assert code == 0, err
            lines.append(f"{kind:5} {to:12} {stdout.splitlines()[-2]}")
            repo = f"finetune-test/{kind}"
            if to == "timm":
                place_in_hf_cache(hf_home, repo, {n: out / n for n in ("config.json", "model.safetensors")})
            jobs.append({"name": f"{kind}-{to}", "to": to, "path": str(out), "repo": repo,
                         "logits": str(root / f"{kind}-{to}.npy")})
    card = (root / "exports" / "soup-transformers" / "README.md").read_text()
    assert "greedy soup" in card and "epoch-00" in card and "Per-class accuracy" in card and "| val | 153 |" in card
    assert "LoRA rank 4" in (root / "exports" / "lora.onnx.md").read_text()
    results = {}
    for kind in checkpoints:
        spec = root / f"{kind}-jobs.json"
        spec.write_text(json.dumps({"tensors": str(root / f"{kind}-x.npy"), "images": [str(p) for p in paths],
                                    "exports": [j for j in jobs if j["name"].startswith(kind + "-")],
                                    "result": str(root / f"{kind}-result.json")}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONPATH"))}
        env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
        done = subprocess.run([sys.executable, "-c", LOADER, str(spec)], env=env, capture_output=True, text=True,
                              timeout=900, cwd=str(root))
        assert done.returncode == 0, done.stderr[-3000:]
        results.update(json.loads((root / f"{kind}-result.json").read_text()))
    print("\n" + "\n".join(lines))
    for job in jobs:
        kind, to = job["name"].split("-", 1)
        logits = torch.from_numpy(np.load(job["logits"]))
        diff = max_diff(logits, ours[kind])
        agree = (logits.argmax(1) == ours[kind].argmax(1)).float().mean().item()
        own = results[job["name"]]["own_top1"]
        own_agree = None if own is None else float(np.mean(np.array(own) == ours[kind].argmax(1).numpy()))
        print(f"{job['name']:18} max |logit diff| {diff:.2e}  same top-1 {agree:.4f}  with its own preprocessing "
              f"{own_agree}")
        assert results[job["name"]]["modules"] == []  # the library alone: finetune never imported
        assert diff <= 1e-4 and agree == 1.0
        assert own_agree is None or own_agree == 1.0
