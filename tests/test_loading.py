"""Loading from every hub gives the same logits as that hub's own code (issue: foundation, items 1-5)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from timm.layers import resample_abs_pos_embed

import finetune
from finetune.errors import FinetuneError
from finetune.loading import is_cached

from conftest import DEIT_WEIGHTS, HYMENOPTERA, place_in_hf_cache, require_shared


def randomize_(module: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (ppv zero-inits its head, which would make logits trivially equal)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------ pytorch-pretrained-vit
def save_ppv(name: str, torch_home: Path, with_pre_logits: bool = False):
    from pytorch_pretrained_vit import ViT
    ref = randomize_(ViT(name, pretrained=False))
    state = ref.state_dict()
    if with_pre_logits:  # the real 21k release files carry the representation layer
        dim = state["norm.weight"].shape[0]
        state["pre_logits.weight"], state["pre_logits.bias"] = torch.randn(dim, dim), torch.randn(dim)
    target = torch_home / "hub" / "checkpoints" / f"{name}.pth"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return ref


@pytest.mark.parametrize("name,size", [("B_16", 224), ("B_32_imagenet1k", 384)])
def test_ppv_matches_pytorch_pretrained_vit(name, size, offline_caches):
    ref = save_ppv(name, offline_caches / "torch", with_pre_logits=name == "B_16")
    with pytest.warns(UserWarning, match="pre-logits") if name == "B_16" else _no_warning():
        model = finetune.load_model(f"ppv:{name}").eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert max_diff(model(x), ref(x)) <= 1e-4
    assert model.finetune_info["data_config"]["mean"] == (0.5, 0.5, 0.5)
    assert model.finetune_info["data_config"]["std"] == (0.5, 0.5, 0.5)


def test_ppv_resampled_to_384_matches_timm_resample(offline_caches):
    save_ppv("B_16", offline_caches / "torch")
    native = finetune.load_model("ppv:B_16")
    model = finetune.load_model("ppv:B_16", num_classes=37, img_size=384)
    expected = resample_abs_pos_embed(native.pos_embed.detach(), new_size=[24, 24], num_prefix_tokens=1,
                                      interpolation="bicubic", antialias=True)
    assert model.pos_embed.shape == (1, 24 * 24 + 1, 768)
    assert torch.allclose(model.pos_embed, expected)
    assert torch.equal(model.pos_embed[:, :1], native.pos_embed[:, :1])  # class token position is kept
    assert model.head.out_features == 37
    assert model.head.weight.abs().sum() == 0 and model.head.bias.abs().sum() == 0
    assert torch.equal(model.blocks[3].attn.qkv.weight, native.blocks[3].attn.qkv.weight)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 384, 384)).shape == (1, 37)


class _no_warning:
    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# --------------------------------------------------------------------------------- Google .npz
def write_google_npz(path: Path, model, pre_logits: bool = False) -> None:
    """Write `model` (a timm ViT) in the layout of Google's vit_jax checkpoints."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    heads = model.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        q, k, v = np.split(sd[b + "attn.qkv.weight"], 3)
        qb, kb, vb = np.split(sd[b + "attn.qkv.bias"], 3)
        for name, w, bias in (("query", q, qb), ("key", k, kb), ("value", v, vb)):
            out[p + f"MultiHeadDotProductAttention_1/{name}/kernel"] = w.T.reshape(dim, heads, -1)
            out[p + f"MultiHeadDotProductAttention_1/{name}/bias"] = bias.reshape(heads, -1)
        out[p + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(heads, -1, dim)
        out[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for ln, key in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            out[p + f"{ln}/scale"], out[p + f"{ln}/bias"] = sd[b + key + ".weight"], sd[b + key + ".bias"]
        for dense, key in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            out[p + f"MlpBlock_3/{dense}/kernel"] = sd[b + f"mlp.{key}.weight"].T
            out[p + f"MlpBlock_3/{dense}/bias"] = sd[b + f"mlp.{key}.bias"]
    if pre_logits:
        out["pre_logits/kernel"], out["pre_logits/bias"] = np.eye(dim, dtype=np.float32), np.zeros(dim, np.float32)
    np.savez(path, **out)


def tiny_timm_vit(**kw):
    import timm
    args = dict(patch_size=16, embed_dim=192, depth=2, num_heads=3, img_size=64, num_classes=5)
    args.update(kw)
    return randomize_(timm.models.vision_transformer.VisionTransformer(**args))


def test_npz_matches_timm_npz_loader(tmp_path):
    import timm
    path = tmp_path / "ViT-Ti_16.npz"
    write_google_npz(path, tiny_timm_vit())
    reference = timm.models.vision_transformer.VisionTransformer(
        patch_size=16, embed_dim=192, depth=2, num_heads=3, img_size=64, num_classes=5).eval()
    reference.load_pretrained(str(path))  # timm's own reader of Google's layout
    model = finetune.load_model(f"npz:{path}").eval()
    assert model.finetune_info["img_size"] == 64 and model.head.out_features == 5
    assert model.finetune_info["arch"]["kwargs"]["depth"] == 2
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert max_diff(model(x), reference(x)) <= 1e-5
    assert model.finetune_info["data_config"]["mean"] == (0.5, 0.5, 0.5)


def test_npz_resampled_and_new_head(tmp_path):
    path = tmp_path / "ViT-Ti_16.npz"
    source = tiny_timm_vit()
    write_google_npz(path, source, pre_logits=True)
    model = finetune.load_model(f"npz:{path}", num_classes=3, img_size=96)
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, expected, atol=1e-6)
    assert model.head.out_features == 3 and model.head.weight.abs().sum() == 0


# ------------------------------------------------------------------------- transformers (hf:) ViT
def place_hf_vit(hf_home: Path, tmp_path: Path, repo_id="acme/vit-tiny-test"):
    transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency")
    config = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, image_size=32, patch_size=8, num_labels=3,
                                    id2label={0: "cat", 1: "dog", 2: "fox"}, label2id={"cat": 0, "dog": 1, "fox": 2})
    ref = randomize_(transformers.ViTForImageClassification(config))
    export = tmp_path / "export"
    ref.save_pretrained(export, safe_serialization=True)
    transformers.ViTImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], resample=3).save_pretrained(export)
    place_in_hf_cache(hf_home, repo_id, {f.name: f for f in export.iterdir()})
    return ref


def test_hf_matches_transformers(offline_caches, tmp_path):
    ref = place_hf_vit(offline_caches / "hf", tmp_path)
    model = finetune.load_model("hf:acme/vit-tiny-test").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(model(x), ref(pixel_values=x).logits) <= 1e-4
    info = model.finetune_info
    assert info["class_names"] == ["cat", "dog", "fox"]
    assert info["data_config"]["mean"] == (0.1, 0.2, 0.3) and info["data_config"]["interpolation"] == "bicubic"


# ------------------------------------------------------------------- timm tag via the HF cache, real
def test_timm_deit_tiny_real_weights_classify_hymenoptera(offline_caches):
    require_shared(DEIT_WEIGHTS, HYMENOPTERA)
    import timm.data
    from torchvision.datasets import ImageFolder
    place_in_hf_cache(offline_caches / "hf", "timm/deit_tiny_patch16_224.fb_in1k", {"model.safetensors": DEIT_WEIGHTS})
    model = finetune.load_model("timm:deit_tiny_patch16_224.fb_in1k").eval()
    config = finetune.data_config_of(model)
    assert config["mean"] == (0.485, 0.456, 0.406) and config["std"] == (0.229, 0.224, 0.225)
    transform = timm.data.create_transform(**config)
    val = ImageFolder(HYMENOPTERA / "val", transform=transform)
    assert val.classes == ["ants", "bees"]
    loader = torch.utils.data.DataLoader(val, batch_size=32)
    correct = 0
    with torch.no_grad():
        for images, labels in loader:
            ant_bee = model(images)[:, [310, 309]]  # ImageNet: 310 ant, 309 bee
            correct += (ant_bee.argmax(1) == labels).sum().item()
    accuracy = correct / len(val)
    assert accuracy >= 0.95, f"DeiT-Tiny ant/bee accuracy {accuracy:.3f}"


# ------------------------------------------------- timm tags whose hub files timm converts on load
TINYCLIP = "vit_xsmall_patch16_clip_224.tinyclip_yfcc15m"  # TinyCLIP 8M: the smallest OpenCLIP-layout ViT tag
OPENCLIP_BLOCK_RENAMES = [(".norm1.", ".ln_1."), (".norm2.", ".ln_2."), (".attn.qkv.", ".attn.in_proj_"),
                          (".attn.proj.", ".attn.out_proj."), (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj.")]


def to_openclip_layout(sd: dict) -> dict:
    """A timm CLIP ViT's weights as OpenCLIP stores them: the inverse of timm's `_convert_openai_clip`."""
    out = {"visual.class_embedding": sd["cls_token"][0, 0], "visual.positional_embedding": sd["pos_embed"][0],
           "visual.conv1.weight": sd["patch_embed.proj.weight"], "visual.proj": sd["head.weight"].T,
           # the text tower shares the file; timm keeps only visual.*
           "logit_scale": torch.tensor(4.6), "text_projection": torch.randn(64, 512),
           "transformer.resblocks.0.attn.in_proj_weight": torch.randn(192, 64)}
    for part in ("weight", "bias"):
        out[f"visual.ln_pre.{part}"], out[f"visual.ln_post.{part}"] = sd[f"norm_pre.{part}"], sd[f"norm.{part}"]
    for key, value in sd.items():
        if key.startswith("blocks."):
            for old, new in OPENCLIP_BLOCK_RENAMES:
                key = key.replace(old, new)
            out["visual.transformer.resblocks." + key.removeprefix("blocks.")] = value
    return {k: v.contiguous() for k, v in out.items()}


def place_openclip_weights(hf_home: Path, tmp_path: Path, tag: str):
    """Random TinyCLIP weights in OpenCLIP layout where timm looks for `tag` (its hub repo and file name)."""
    import timm
    from safetensors.torch import save_file
    source = randomize_(timm.create_model(tag, pretrained=False))
    with torch.no_grad():
        source.head.bias.zero_()  # OpenCLIP's projection has no bias; timm's conversion adds a zero one
    state = to_openclip_layout(source.state_dict())
    cfg = timm.models.get_pretrained_cfg(tag)
    filename = cfg.hf_hub_filename or "model.safetensors"
    weights = tmp_path / filename
    save_file(state, weights) if filename.endswith(".safetensors") else torch.save(state, weights)
    place_in_hf_cache(hf_home, cfg.hf_hub_id, {filename: weights})
    return source


def timm_reference(tag: str, monkeypatch) -> torch.nn.Module:
    """timm's own pretrained loading from the test's Hugging Face cache, with huggingface_hub held offline."""
    import huggingface_hub
    import timm
    from finetune import hubs
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read by the hub at import time
    return timm.create_model(tag, pretrained=True, cache_dir=hubs.hf_cache_dir()).eval()


@pytest.mark.parametrize("hub_filename", [None, "open_clip_pytorch_model.bin"])
def test_timm_openclip_tag_loads_through_timms_conversion(hub_filename, offline_caches, tmp_path, monkeypatch):
    import timm
    if hub_filename:  # the tag as timm releases before 1.0 registered it: OpenCLIP's own file name
        registered = timm.models._registry._model_pretrained_cfgs[TINYCLIP]
        monkeypatch.setattr(registered, "hf_hub_filename", hub_filename)
    source = place_openclip_weights(offline_caches / "hf", tmp_path, TINYCLIP)
    assert is_cached(f"timm:{TINYCLIP}")
    model = finetune.load_model(f"timm:{TINYCLIP}").eval()
    reference = timm_reference(TINYCLIP, monkeypatch)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        logits = model(x)
        assert max_diff(logits, reference(x)) <= 1e-5
        assert max_diff(logits, source(x)) <= 1e-5  # the conversion restored the weights we wrote
    cfg = timm.models.get_pretrained_cfg(TINYCLIP)
    config = finetune.data_config_of(model)
    assert config["mean"] == cfg.mean and config["std"] == cfg.std and config["crop_pct"] == cfg.crop_pct
    assert model.finetune_info["arch"] == {"timm_name": "vit_xsmall_patch16_clip_224"}
    assert model.finetune_info["num_classes"] == 512 and model.finetune_info["img_size"] == 224


def test_timm_tag_missing_offline_names_ref_and_cache(offline_caches):
    with pytest.raises(FinetuneError) as err:
        finetune.load_model(f"timm:{TINYCLIP}")
    message = str(err.value)
    cache = offline_caches / "hf" / "hub" / f"models--timm--{TINYCLIP}"
    assert f"timm:{TINYCLIP}" in message and str(cache) in message and "hf download" in message
    assert "\n" not in message and "offline" in message


def test_timm_cache_state_follows_the_hub_repo_and_file_timm_reads(offline_caches, monkeypatch):
    import timm
    hf_home = offline_caches / "hf"
    place_in_hf_cache(hf_home, "naver-ai/rdnet_tiny.nv_in1k", {"model.safetensors": b"x"})  # not a timm/ repo
    assert is_cached("timm:rdnet_tiny.nv_in1k")
    place_in_hf_cache(hf_home, f"timm/{TINYCLIP}", {"model.safetensors": b"x"})
    assert is_cached(f"timm:{TINYCLIP}")
    monkeypatch.setattr(timm.models._registry._model_pretrained_cfgs[TINYCLIP], "hf_hub_filename",
                        "open_clip_pytorch_model.bin")
    assert not is_cached(f"timm:{TINYCLIP}")
    place_in_hf_cache(hf_home, f"timm/{TINYCLIP}", {"open_clip_model.safetensors": b"x"})  # timm's safe alternative
    assert is_cached(f"timm:{TINYCLIP}")
    assert not is_cached("timm:no_such_tag.none")


def test_timm_tag_of_a_non_vit_is_one_line_error():
    with pytest.raises(FinetuneError, match=r"timm:resnet18.a1_in1k: resnet18 is a timm ResNet, not a VisionTransformer"):
        finetune.load_model("timm:resnet18.a1_in1k")


def test_timm_corrupt_cached_file_is_one_line_error(offline_caches):
    place_in_hf_cache(offline_caches / "hf", f"timm/{TINYCLIP}", {"model.safetensors": b"not safetensors"})
    with pytest.raises(FinetuneError, match=r"cannot load .*model.safetensors.*delete it and fetch it again"):
        finetune.load_model(f"timm:{TINYCLIP}")


def test_plain_state_dict_file_named_after_timm_tag_gets_its_data_config(tmp_path):
    require_shared(DEIT_WEIGHTS)
    model = finetune.load_model(str(DEIT_WEIGHTS), num_classes=2)
    assert model.finetune_info["data_config"]["mean"] == (0.485, 0.456, 0.406)
    assert model.finetune_info["arch"]["kwargs"]["num_heads"] == 3


# -------------------------------------------------------------------------- head, sizes, zoo, scratch
def test_equal_num_classes_keeps_head(tmp_path):
    source = tiny_timm_vit()
    path = tmp_path / "plain.pth"
    torch.save(source.state_dict(), path)
    with pytest.warns(UserWarning, match="no data config"):
        kept = finetune.load_model(str(path), num_classes=5)
    assert torch.equal(kept.head.weight, source.head.weight)
    with pytest.warns(UserWarning):
        replaced = finetune.load_model(str(path), num_classes=7)
    assert replaced.head.weight.shape == (7, 192) and replaced.head.weight.abs().sum() == 0


def test_scratch_model_is_untrained_vit_with_kwargs():
    model = finetune.load_model("scratch:patch_size=4,embed_dim=64,depth=3,num_heads=4,mlp_ratio=2",
                                num_classes=10, img_size=32)
    assert len(model.blocks) == 3 and model.patch_embed.grid_size == (8, 8)
    assert model.blocks[0].mlp.fc1.out_features == 128


def test_zoo_lists_cache_state(offline_caches):
    rows = {r["name"]: r for r in finetune.zoo_table()}
    assert {"B_16", "B_32", "L_16", "L_32", "Ti_16", "S_16"} <= set(rows)
    assert rows["B_16"]["default"] == "ppv:B_16_imagenet1k" and rows["B_16"]["img_size"] == 384
    assert 80 < rows["B_16"]["params_m"] < 90 and 300 < rows["L_16"]["params_m"] < 310
    assert not any(s["cached"] for s in rows["B_32"]["sources"])
    save_ppv("B_32_imagenet1k", offline_caches / "torch")
    rows = {r["name"]: r for r in finetune.zoo_table()}
    assert rows["B_32"]["sources"][0] == {"ref": "ppv:B_32_imagenet1k", "cached": True}
    model = finetune.load_model("B_32", num_classes=4)
    assert model.finetune_info["source"] == "ppv:B_32_imagenet1k"


def test_unknown_ref_suggests_close_matches():
    with pytest.raises(FinetuneError, match="did you mean B_16"):
        finetune.load_model("B16")
    with pytest.raises(FinetuneError, match="deit_tiny_patch16_224.fb_in1k"):
        finetune.load_model("timm:deit_tiny_patch16_224.fb_in")


def test_missing_weights_offline_names_places_and_never_hangs(offline_caches):
    with pytest.raises(FinetuneError) as err:
        finetune.load_model("B_16")
    message = str(err.value)
    assert "ppv:B_16_imagenet1k" in message and str(offline_caches / "torch" / "hub" / "checkpoints") in message
    assert "B_16_imagenet1k.pth" in message and "alternatives" in message and "\n" not in message
    with pytest.raises(FinetuneError, match="models--google--vit-base-patch16-384"):
        finetune.load_model("hf:google/vit-base-patch16-384")
