"""`data.dataset: webdataset` (issue 16): tar shards read locally and over loopback HTTP, the seeded
training stream (equal steps per rank, exact resume), val/test once each, and the one-line errors."""
from __future__ import annotations

import functools
import http.server
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from finetune import engine
from finetune.data import build_datasets, build_loader, set_epoch
from finetune.data.factory import SourceOptions
from finetune.data.wds import RawSample, Shard, ShardBatches, WdsSplit, contiguous_share
from finetune.errors import FinetuneError
from finetune.loading import load_model

from conftest import DEIT_WEIGHTS, HYMENOPTERA, REPO, require_shared
from wds_shards import serve_folder, shard_key, write_image_folder_as_shards, write_shards, write_tar

CONFIG = {"input_size": (3, 16, 16), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear",
          "crop_pct": 1.0}
IMAGENET = {"input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "interpolation": "bicubic", "crop_pct": 0.875}
CLASSES = ["cat", "dog", "owl"]
TINY_MODEL = "scratch:patch_size=8,embed_dim=32,depth=1,num_heads=2"


def png(index: int, size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (index * 37 % 256, index * 91 % 256, index * 13 % 256)).save(buffer, "PNG")
    return buffer.getvalue()


def samples(count: int, prefix: str = "s", classes=CLASSES) -> list:
    return [(f"{prefix}{i:04d}", {"png": png(i), "cls": str(i % len(classes)).encode()}) for i in range(count)]


def shard_folder(root: Path, train=17, val=5, shards=None, **kwargs) -> Path:
    write_shards(root, {"train": samples(train, "t"), "val": samples(val, "v")}, CLASSES,
                 shards or {"train": 3, "val": 2}, **kwargs)
    return root


def build(root, **kwargs):
    kwargs.setdefault("img_size", 16)
    kwargs.setdefault("data_config", CONFIG)
    return build_datasets("webdataset", str(root), **kwargs)


def epoch_keys(loader, epoch: int, skip: int = 0) -> List[List[str]]:
    """The keys of each batch the loader's sampler hands to its workers in `epoch`."""
    set_epoch(loader, epoch, skip_batches=skip)
    return [[raw.key for raw, _ in batch] for batch in loader.batch_sampler]


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message.strip()
    return message


# ------------------------------------------------------------------------------------ real photos
@pytest.fixture(scope="module")
def hymenoptera_shards(tmp_path_factory) -> Path:
    require_shared(HYMENOPTERA)
    out = tmp_path_factory.mktemp("hymenoptera-wds")
    write_image_folder_as_shards(HYMENOPTERA, out, shards={"train": 3, "val": 2})
    return out


def keyed_logits(model, loader, keys: List[str]) -> Dict[str, torch.Tensor]:
    with torch.inference_mode():
        logits = torch.cat([model(images) for images, _ in loader])
    assert len(keys) == len(logits)
    return dict(zip(keys, logits))


def test_real_photos_as_shards_local_and_over_http_match_the_image_folder(hymenoptera_shards):
    folder = build_datasets("imagefolder", str(HYMENOPTERA), img_size=32, data_config=IMAGENET)
    local = build_datasets("webdataset", str(hymenoptera_shards), img_size=32, data_config=IMAGENET)
    with serve_folder(hymenoptera_shards) as url:
        remote = build_datasets("webdataset", url, img_size=32, data_config=IMAGENET)
        for splits in (local, remote):
            assert splits.class_names == folder.class_names == ["ants", "bees"]
            assert (len(splits.train), len(splits.val), splits.test) == (len(folder.train), len(folder.val), None) \
                == (245, 153, None)
        torch.manual_seed(0)
        model = load_model(TINY_MODEL, num_classes=2, img_size=32).eval()
        torch.nn.init.normal_(model.head.weight)  # a zero head would predict the same for every image
        wds_loader = build_loader(remote.val, batch_size=32, train=False)
        wds_keys = [raw.key for batch in wds_loader.batch_sampler for raw, _ in batch]
        over_http = keyed_logits(model, wds_loader, wds_keys)
        assert Counter(target for _, target in remote.val) == Counter(folder.val.targets)
    folder_keys = [shard_key(folder.val.classes[target], Path(path)) for path, target in folder.val.samples]
    from_folder = keyed_logits(model, build_loader(folder.val, batch_size=32, train=False), folder_keys)
    assert over_http.keys() == from_folder.keys() and len(over_http) == 153
    for key, logits in from_folder.items():
        assert torch.allclose(over_http[key], logits, atol=1e-5), key
    assert {int(v.argmax()) for v in from_folder.values()} == {0, 1}  # a model that tells images apart


# ---------------------------------------------------------------------------------- the stream
def test_every_sample_once_per_epoch_seeded_shuffle_other_order_next_epoch(tmp_path):
    splits = build(shard_folder(tmp_path, train=23, shards={"train": 4, "val": 1}), seed=0)
    loader = build_loader(splits.train, batch_size=4, train=True, seed=7)
    first, again = epoch_keys(loader, 1), epoch_keys(build_loader(splits.train, batch_size=4, train=True, seed=7), 1)
    second = epoch_keys(loader, 2)
    other_seed = epoch_keys(build_loader(splits.train, batch_size=4, train=True, seed=8), 1)
    flat = [k for batch in first for k in batch]
    assert sorted(flat) == [f"t{i:04d}" for i in range(23)]  # each once
    assert sorted(k for b in second for k in b) == sorted(flat)
    assert first == again and first != second and first != other_seed
    assert [len(b) for b in first] == [4, 4, 4, 4, 4, 3] and len(loader) == 6
    set_epoch(loader, 1)
    assert sum(len(labels) for _, labels in loader) == 23


def test_evaluation_reads_every_sample_once_in_the_listed_order(tmp_path):
    splits = build(shard_folder(tmp_path, val=11, shards={"train": 1, "val": 3}))
    loader = build_loader(splits.val, batch_size=4, train=False)
    keys = [raw.key for batch in loader.batch_sampler for raw, _ in batch]
    assert keys == [f"v{i:04d}" for i in range(11)] and len(loader) == 3
    assert [len(labels) for _, labels in loader] == [4, 4, 3]
    assert [int(label) for _, label in splits.val] == [i % 3 for i in range(11)]


class FakeShards(WdsSplit):
    """A WdsSplit whose shards are never opened: sample i of shard s is key 's/i'."""

    def __init__(self, lengths):
        super().__init__("train", [Shard(f"mem://{s}", n) for s, n in enumerate(lengths)], None, ("png",), None)

    def _read_part(self, shard, start, stop, position):
        index = int(shard.url.rsplit("/", 1)[1])
        for i in range(start, stop):
            yield RawSample(f"{index}/{i}", shard.url, b"", 0, position + i - start)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=5).filter(sum), world_size=st.integers(1, 4),
       local_batch=st.integers(1, 4), epoch=st.integers(0, 3))
def test_ranks_take_equal_steps_and_every_sample_once_whatever_the_shards(lengths, world_size, local_batch, epoch):
    split = FakeShards(lengths)
    per_rank = []
    for rank in range(world_size):
        batches = ShardBatches(split, train=True, seed=3, global_batch=local_batch * world_size, rank=rank,
                               world_size=world_size)
        batches.set_epoch(epoch)
        per_rank.append([[raw.key for raw, _ in batch] for batch in batches])
        assert len(per_rank[-1]) == len(batches)
    seen = [key for batches in per_rank for batch in batches for key in batch]
    assert len({len(b) for b in per_rank}) == 1  # equal steps: DDP's collectives line up
    assert sorted(seen) == sorted(f"{s}/{i}" for s, n in enumerate(lengths) for i in range(n))  # once each
    assert all(len(batch) <= local_batch for batches in per_rank for batch in batches)


def test_contiguous_shares_differ_by_at_most_one():
    shares = [contiguous_share(17, r, 4) for r in range(4)]
    assert shares == [(0, 5), (5, 9), (9, 13), (13, 17)]


def test_resume_skips_batches_without_decoding_them_and_continues_exactly(tmp_path, monkeypatch):
    splits = build(shard_folder(tmp_path, train=21, shards={"train": 3, "val": 1}), augment="crop_flip")
    straight = build_loader(splits.train, batch_size=4, train=True, seed=5)
    set_epoch(straight, 2)
    full = list(straight)
    tail_keys = [key for batch in epoch_keys(straight, 2)[3:] for key in batch]
    decoded = []
    real_decode = WdsSplit.decode
    monkeypatch.setattr(WdsSplit, "decode", lambda self, raw: decoded.append(raw.key) or real_decode(self, raw))
    for workers in (0, 2):  # the order does not depend on the workers (data.workers may change on resume)
        resumed = build_loader(build(tmp_path, augment="crop_flip").train, batch_size=4, train=True, seed=5,
                               workers=workers)
        set_epoch(resumed, 2, skip_batches=3)
        assert len(resumed) == len(full) - 3 == 3
        tail = list(resumed)
        assert len(tail) == 3
        for (images, labels), (want_images, want_labels) in zip(tail, full[3:]):
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)  # augmentation too
        if workers == 0:
            assert decoded == tail_keys  # the 12 skipped samples were read, never decoded


def test_balanced_sampling_of_a_stream_is_a_one_line_error(tmp_path):
    splits = build(shard_folder(tmp_path))
    with pytest.raises(FinetuneError) as e:
        build_loader(splits.train, batch_size=4, train=True, balanced=True)
    assert "data.balanced" in one_line(e)


# -------------------------------------------------------------------------------------- layouts
def test_folder_of_tars_without_info_json_is_counted_from_the_tar_headers(tmp_path):
    shard_folder(tmp_path, train=9, val=4, info=False)
    splits = build(tmp_path)
    assert not (tmp_path / "_info.json").exists()
    assert (len(splits.train), len(splits.val), splits.class_names) == (9, 4, CLASSES)
    assert [s.length for s in splits.train.shards] == [3, 3, 3]


def test_info_splits_as_a_list_validation_for_val_and_a_test_split(tmp_path):
    write_tar(tmp_path / "a.tar", samples(5, "a"))
    write_tar(tmp_path / "b.tar", samples(3, "b"))
    write_tar(tmp_path / "c.tar", samples(2, "c"))
    (tmp_path / "_info.json").write_text(json.dumps({"classes": CLASSES, "splits": [
        {"name": "train", "filenames": ["a.tar"], "shard_lengths": [5], "num_samples": 5},
        {"name": "validation", "filenames": ["b.tar"], "shard_lengths": [3], "num_samples": 3},
        {"name": "test", "filenames": ["c.tar"], "shard_lengths": [2], "num_samples": 2}]}))
    splits = build(tmp_path / "_info.json")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (5, 3, 2)


def test_json_labels_by_name_class_names_reorder_and_image_key(tmp_path):
    rows = [(f"k{i}", {"webp": png(i), "JPG": b"not this one", "json": json.dumps({"label": CLASSES[i % 3]}).encode()})
            for i in range(6)]
    write_shards(tmp_path, {"train": rows, "val": rows[:3]}, CLASSES)
    options = SourceOptions(class_names=("owl", "dog", "cat"), image_key="webp")
    splits = build(tmp_path, options=options)
    assert splits.class_names == ["owl", "dog", "cat"]
    assert [label for _, label in splits.val] == [2, 1, 0]  # cat, dog, owl in the new order
    reordered_cls = build(shard_folder(tmp_path / "cls"), options=SourceOptions(class_names=("owl", "dog", "cat")))
    assert [label for _, label in reordered_cls.val][:3] == [2, 1, 0]  # indices still mean the data's classes


def test_multilabel_json_lists_become_float_multi_hot_targets(tmp_path):
    labels = [["cat", "owl"], [1], [], "dog", [0, "cat"]]
    rows = [(f"m{i}", {"png": png(i), "json": json.dumps({"label": value}).encode()}) for i, value in enumerate(labels)]
    write_shards(tmp_path, {"train": rows, "val": rows}, CLASSES)
    splits = build(tmp_path, options=SourceOptions(multilabel=True))
    loader = build_loader(splits.val, batch_size=5, train=False)
    _, targets = next(iter(loader))
    assert targets.dtype == torch.float32
    assert targets.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0], [0, 1, 0], [1, 0, 0]]


# --------------------------------------------------------------------------------------- errors
def bad_sample_error(tmp_path, files: dict, **kwargs) -> str:
    write_shards(tmp_path, {"train": [("good", {"png": png(0), "cls": b"0"}), ("bad0", files)],
                            "val": samples(2, "v")}, CLASSES)
    splits = build(tmp_path, **kwargs)
    with pytest.raises(FinetuneError) as e:
        list(build_loader(splits.train, batch_size=2, train=True))
    return one_line(e)


@pytest.mark.parametrize("files, says", [
    ({"cls": b"1"}, "bad0 has no image"),
    ({"png": png(1)}, "bad0: no label"),
    ({"png": png(1), "cls": b"3"}, "label 3 is out of range"),
    ({"png": png(1), "cls": b"-1"}, "label -1 is out of range"),
    ({"png": png(1), "json": b'{"label": "emu"}'}, "label 'emu' is not one of the 3 classes"),
    ({"png": png(1), "json": b'{"lab": 1}'}, 'no "label" field'),
    ({"png": png(1), "json": b"{not json"}, "bad0.json: not valid JSON"),
    ({"png": png(1), "json": b'{"label": [0, 1]}'}, "need task: multilabel"),
])
def test_a_bad_sample_is_a_one_line_error_naming_it(tmp_path, files, says):
    message = bad_sample_error(tmp_path, files)
    assert says in message and "train-000000.tar" in message


def test_an_undecodable_image_is_skipped_with_a_warning(tmp_path):
    write_shards(tmp_path, {"train": [("a", {"png": b"not a png", "cls": b"0"}), ("b", {"png": png(1), "cls": b"1"})],
                            "val": samples(1)}, CLASSES)
    with pytest.warns(UserWarning, match="sample a: cannot read image"):
        batches = list(build_loader(build(tmp_path).train, batch_size=2, train=True))
    assert [labels.tolist() for _, labels in batches] == [[1]]


@pytest.mark.parametrize("layout, says", [
    ("nothing", "no _info.json and no train-*.tar"),
    ("bad json", "_info.json: not valid JSON"),
    ("splits not a list", '"splits" is 3'),
    ("lengths disagree", '"num_samples" is 99'),
    ("no val", "no val split"),
    ("missing shard", "shard listed in"),
    ("no classes", "no class names"),
])
def test_a_bad_layout_is_a_one_line_error(tmp_path, layout, says):
    shard_folder(tmp_path, classes_txt=False)
    info = json.loads((tmp_path / "_info.json").read_text())
    if layout == "nothing":
        for path in tmp_path.iterdir():
            path.unlink()
    elif layout == "bad json":
        (tmp_path / "_info.json").write_text("{\"splits\": ")
    else:
        if layout == "splits not a list":
            info["splits"] = 3
        elif layout == "lengths disagree":
            info["splits"]["train"]["num_samples"] = 99
        elif layout == "no val":
            del info["splits"]["val"]
        elif layout == "missing shard":
            info["splits"]["train"]["filenames"][0] = "gone.tar"
        elif layout == "no classes":
            del info["classes"]
        (tmp_path / "_info.json").write_text(json.dumps(info))
    with pytest.raises(FinetuneError) as e:
        build(tmp_path)
    assert says in one_line(e)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "more samples", "fewer samples"])
def test_a_corrupt_or_miscounted_shard_is_a_one_line_error(tmp_path, damage):
    shard_folder(tmp_path, train=9, shards={"train": 1, "val": 1})
    shard = tmp_path / "train-000000.tar"
    info = json.loads((tmp_path / "_info.json").read_text())
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:1500])
    elif damage == "garbage":
        shard.write_bytes(os.urandom(4096))
    else:
        info["splits"]["train"]["shard_lengths"] = [8 if damage == "more samples" else 10]
        info["splits"]["train"]["num_samples"] = info["splits"]["train"]["shard_lengths"][0]
        (tmp_path / "_info.json").write_text(json.dumps(info))
    with pytest.raises(FinetuneError) as e:
        list(build_loader(build(tmp_path).train, batch_size=3, train=True))
    assert str(shard) in one_line(e)
    if damage == "garbage":
        (tmp_path / "_info.json").unlink()  # counted from the headers instead: refused when building
        with pytest.raises(FinetuneError, match="not a readable tar shard"):
            build(tmp_path)


class TruncatingHandler(http.server.SimpleHTTPRequestHandler):
    """Announces a shard's full length, sends half of it and hangs up."""

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.name.endswith(".tar"):
            return super().do_GET()
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2])

    def log_message(self, *args):
        pass


def test_http_failures_are_one_line_errors_naming_the_url(tmp_path):
    shard_folder(tmp_path, train=6, shards={"train": 1, "val": 1})
    with serve_folder(tmp_path) as url:
        (tmp_path / "train-000000.tar").rename(tmp_path / "moved.tar")
        with pytest.raises(FinetuneError) as e:
            list(build_loader(build(url).train, batch_size=2, train=True))
        assert f"{url}/train-000000.tar: HTTP 404" in one_line(e)
        with pytest.raises(FinetuneError) as e:
            build(url + "/elsewhere")
        assert f"{url}/elsewhere/_info.json" in one_line(e)
    (tmp_path / "moved.tar").rename(tmp_path / "train-000000.tar")
    with pytest.raises(FinetuneError) as e:
        build(url)  # the server is gone
    assert "cannot connect" in one_line(e) and url in str(e.value)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(TruncatingHandler,
                                                                                  directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cut = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(FinetuneError) as e:
            list(build_loader(build(cut).train, batch_size=2, train=True))
        assert f"{cut}/train-000000.tar" in one_line(e) and ("download ended" in str(e.value) or
                                                              "truncated" in str(e.value))
    finally:
        server.shutdown()
        server.server_close()


def test_a_url_root_survives_the_recipes_path_resolution(tmp_path):
    from finetune.evaluation import build_splits
    from finetune.recipes import load_recipe
    shard_folder(tmp_path)
    with serve_folder(tmp_path) as url:
        recipe = load_recipe("demo", ["data.dataset=webdataset", f"data.root={url}"])
        splits = build_splits(recipe, 16, CONFIG)  # resolve_path joins the URL to the working directory
        assert (len(splits.train), len(splits.val)) == (17, 5)


# ------------------------------------------------------------------------------ generated shards
VALID = st.fixed_dictionaries({"png": st.sampled_from([png(1), png(2, 3)]),
                               "cls": st.integers(0, 2).map(lambda i: str(i).encode())})
DAMAGED = st.fixed_dictionaries({}, optional={
    "png": st.sampled_from([png(1), b"", b"\x89PNG broken"]),
    "jpg": st.sampled_from([b"\xff\xd8\xff", png(4)]),
    "cls": st.one_of(st.integers(-2, 4).map(lambda i: str(i).encode()), st.sampled_from([b"cat", b"x", b"\xff", b""])),
    "json": st.one_of(st.sampled_from([b"{", b"[]", b"null", b'{"label": true}']),
                      st.lists(st.sampled_from([0, 1, 5, -1, "cat", "emu", 1.5, None]), max_size=3).map(
                          lambda labels: json.dumps({"label": labels if len(labels) != 1 else labels[0]}).encode())),
    "txt": st.just(b"notes"),
})
DEFECTS = ("damaged sample", "repeated key", "key in a folder", "miscounted", "broken info", "no info", "cut tar",
           "noise tar")
# half the examples are sound (they must train), the others carry one or two defects
SOME_DEFECTS = st.one_of(st.just(frozenset()), st.sets(st.sampled_from(DEFECTS), min_size=1, max_size=2))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(shard_rows=st.lists(st.lists(VALID, min_size=1, max_size=4), min_size=2, max_size=4),
       damaged=DAMAGED, defects=SOME_DEFECTS, at=st.integers(0, 20), multilabel=st.booleans(),
       batch=st.integers(1, 3))
def test_generated_shards_give_training_batches_or_a_one_line_error(tmp_path_factory, shard_rows, damaged, defects,
                                                                    at, multilabel, batch):
    root = tmp_path_factory.mktemp("gen")
    *train_shards, val_rows = [[(f"k{s}_{i}", files) for i, files in enumerate(rows)] for s, rows in
                               enumerate(shard_rows)]
    victim = train_shards[at % len(train_shards)]
    if "damaged sample" in defects:
        victim[at % len(victim)] = (victim[at % len(victim)][0], damaged)
    if "repeated key" in defects and len(victim) > 1:
        victim[-1] = (victim[-2][0], victim[-1][1])
    if "key in a folder" in defects:
        victim[0] = (f"folder/{victim[0][0]}", victim[0][1])
    entries = {}
    for split, shards in (("train", train_shards), ("val", [val_rows])):
        names = [f"{split}-{i:06d}.tar" for i in range(len(shards))]
        lengths = [write_tar(root / name, rows) + ("miscounted" in defects) for name, rows in zip(names, shards)]
        entries[split] = {"name": split, "filenames": names, "shard_lengths": lengths, "num_samples": sum(lengths)}
    shard = root / f"train-{at % len(train_shards):06d}.tar"
    if "cut tar" in defects:
        shard.write_bytes(shard.read_bytes()[:512 + at * 97])
    if "noise tar" in defects:
        shard.write_bytes(os.urandom(1024))
    (root / "classes.txt").write_text("\n".join(CLASSES))
    if "no info" not in defects:
        info = '{"splits": [{"na' if "broken info" in defects else json.dumps({"splits": entries})
        (root / "_info.json").write_text(info)

    def epoch():
        splits = build(root, options=SourceOptions(multilabel=multilabel), augment="crop_flip")
        for split, train_mode in ((splits.train, True), (splits.val, False)):
            loader = build_loader(split, batch_size=batch, train=train_mode)
            if train_mode:
                set_epoch(loader, 1)
            got = list(loader)
            assert len(got) == len(loader)
            for images, targets in got:
                assert isinstance(images, torch.Tensor) and isinstance(targets, torch.Tensor)
                assert len(images) == len(targets) <= batch
    try:
        epoch()
        event("batches")
    except FinetuneError as error:
        assert "\n" not in str(error) and str(error).strip()
        event(re.sub(r"\S*/\S*", "<path>", str(error))[:60])
    if not defects:
        epoch()  # a sound data set must train


# ------------------------------------------------------------------------------- through the engine
def run_overrides(root, *extra: str) -> List[str]:
    return [f"model={TINY_MODEL}", "img_size=16", "data.dataset=webdataset", f"data.root={root}", "data.workers=0",
            "data.augment=flip", "batch_size=4", "epochs=2", "schedule.warmup_epochs=0", "optimizer.name=sgd",
            "optimizer.lr=0.05", "precision=fp32", "attention=fused", "keep_best=1", *extra]


def test_sigterm_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    root = shard_folder(tmp_path / "data", train=12, val=3, shards={"train": 3, "val": 1})
    overrides = run_overrides(root, "epochs=2")
    straight = engine.train_recipe("demo", overrides, out_dir=str(tmp_path / "straight"), progress=False)
    steps = []

    def stop_in_epoch_two(name):
        if name == "step":
            steps.append(name)
            if len(steps) == 3 + 1:  # 3 steps an epoch (12 images, batch 4): the first of epoch 2
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(engine, "pause_point", stop_in_epoch_two)
    with pytest.raises(engine.RunInterrupted):
        engine.train_recipe("demo", overrides, out_dir=str(tmp_path / "stopped"), progress=False)
    monkeypatch.undo()
    point = torch.load(tmp_path / "stopped" / "last.state.pt", weights_only=True)
    assert point["in_epoch"]["epoch"] == 2 and 0 < point["in_epoch"]["batches"] < 3
    resumed = engine.resume_run(str(tmp_path / "stopped"), progress=False)
    assert resumed.status == straight.status == "finished"
    a = torch.load(tmp_path / "straight" / "last.state.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "stopped" / "last.state.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


DDP_DRIVER = """
import json, os, sys
from finetune import engine
from finetune.data import wds
passes, real = [], wds.ShardBatches.__iter__
def spy(self):  # one record per pass over the sampler: the engine's progress bar starts one it drops
    keys = []
    if self.train:
        passes.append([self.epoch, keys])
    for batch in real(self):
        keys.append([raw.key for raw, _ in batch])
        yield batch
wds.ShardBatches.__iter__ = spy
out, dump, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
engine.train_recipe("demo", overrides, out_dir=out, progress=False)
json.dump(passes, open(os.path.join(dump, f"rank{os.environ['RANK']}.json"), "w"))
"""


def test_torchrun_two_processes_three_shards_equal_steps_every_sample_once(tmp_path):
    root = shard_folder(tmp_path / "data", train=17, shards={"train": 3, "val": 2})  # shards of 6, 6, 5
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
               str(driver), str(tmp_path / "run"), str(tmp_path), *run_overrides(root)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)  # a hang fails here
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in (1, 2):
        batches = [[keys for e, keys in rank if e == epoch][-1] for rank in ranks]  # the pass trained on
        assert [len(b) for b in batches] == [5, 5]  # ceil(ceil(17 / 2) / 2) steps on each rank
        seen = [key for rank in batches for batch in rank for key in batch]
        assert sorted(seen) == [f"t{i:04d}" for i in range(17)]  # once each, across the ranks
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_restarts_the_epoch_and_equals_the_uninterrupted_run(tmp_path):
    from test_reliability import assert_same_run, run_to_end, start, wait_for_line
    root = shard_folder(tmp_path / "data", train=40, shards={"train": 3, "val": 1})
    overrides = run_overrides(root, "epochs=3", "data.workers=2", "data.augment=crop_flip")
    run_to_end(tmp_path / "straight", overrides)
    run = tmp_path / "killed"
    process = start(run, overrides, resume=False, FINETUNE_PAUSE_AT="step", FINETUNE_PAUSE_S="0.3")
    try:
        assert wait_for_line(process, "epoch   1", timeout=180)
        assert wait_for_line(process, "paused at step", timeout=60)
        assert wait_for_line(process, "paused at step", timeout=60)  # two steps into epoch 2
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
    point = torch.load(run / "last.state.pt", weights_only=True)
    assert point["epoch"] == 1 and point["in_epoch"] is None  # nothing of epoch 2 was committed
    run_to_end(run, overrides, resume=True)
    assert_same_run(tmp_path / "straight", run)


# ------------------------------------------------------------------------------ real weights, real photos
@pytest.mark.slow
def test_hymenoptera_deit_tiny_through_webdataset_reaches_93_percent(tmp_path, hymenoptera_shards):
    require_shared(DEIT_WEIGHTS)
    with serve_folder(hymenoptera_shards) as url:
        result = engine.train_recipe("hymenoptera-deit-tiny", ["data.dataset=webdataset", f"data.root={url}"],
                                     out_dir=str(tmp_path / "run"), progress=False)
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(epochs) <= 5
    assert result.best_val_top1 >= 0.93, [round(m["val_top1"], 4) for m in epochs]

