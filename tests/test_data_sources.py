"""The csv (CSV/TSV/JSONL manifests) and hf (Hugging Face datasets) sources: your data as it comes (issue 16).

The same real photos go through every door (image folder, CSV, JSONL, save_to_disk, parquet, a hub
id in an offline HF cache) and must give the image folder's classes, splits, files and, for one
model, its predictions image by image. Multi-label manifests are real photos in mosaics. Generated
manifests and datasets give DataSplits or one line; each bad input has its one-line error.
"""
from __future__ import annotations

import json
import pickle
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import Subset

import finetune
from finetune import engine
from finetune.data import DataSplits, SourceOptions, build_datasets, build_loader, dataset_targets
from finetune.data.hfds import HFImages
from finetune.errors import FinetuneError

from conftest import DEIT_WEIGHTS, HYMENOPTERA, require_shared
from data_doors import (Photo, hf_dataset, photos_of, write_csv, write_hf_hub_cache, write_hf_hub_snapshot,
                        write_hf_save_to_disk, write_jsonl, write_parquet, write_tsv)

IMG = 32
SCRATCH = "scratch:patch_size=8,embed_dim=32,depth=1,num_heads=2"
CONFIG = {"input_size": (3, IMG, IMG), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
          "interpolation": "bilinear", "crop_pct": 1.0}
HUB_ID = "photos-org/hymenoptera"
FEW = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
FEWER = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))


def build(dataset: str, root, **kwargs) -> DataSplits:
    options = SourceOptions(**{k: kwargs.pop(k) for k in list(kwargs) if k in SourceOptions.__dataclass_fields__})
    kwargs.setdefault("img_size", IMG)
    kwargs.setdefault("data_config", CONFIG)
    return build_datasets(dataset, str(root), options=options, **kwargs)


def one_line_error(action) -> str:
    with pytest.raises(FinetuneError) as excinfo:
        action()
    message = str(excinfo.value)
    assert "\n" not in message and message.strip()
    return message


def identities(dataset) -> list:
    """Each sample's file name, in the dataset's order: the library stores an HF image cell's path as the
    file's base name (`Image.embed_storage`), so that is the identity every door can show."""
    if isinstance(dataset, Subset):  # imagefolder's cut of one folder
        return [Path(dataset.dataset.samples[i][0]).name for i in dataset.indices]
    if isinstance(dataset, HFImages):
        return [dataset.image_path(i) for i in range(len(dataset))]
    return [Path(path).name for path, _ in dataset.samples]


def write_image(path: Path, colour=(200, 30, 60), size=(20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# ------------------------------------------------------------------------ the same photos, every door
@pytest.fixture(scope="module")
def doors(tmp_path_factory):
    """data.dataset and data.root of hymenoptera through every door, written once per module."""
    require_shared(HYMENOPTERA)
    names = [photo.path.name for photo in photos_of(HYMENOPTERA)]
    assert len(set(names)) == len(names) == 398  # file names alone identify the photos
    out = tmp_path_factory.mktemp("doors")
    converted = hf_dataset(HYMENOPTERA)
    return {
        "imagefolder": ("imagefolder", HYMENOPTERA),
        "csv": ("csv", write_csv(HYMENOPTERA, out / "manifests" / "photos.csv")),
        "jsonl": ("csv", write_jsonl(HYMENOPTERA, out / "manifests" / "photos.jsonl")),
        "save_to_disk": ("hf", write_hf_save_to_disk(converted, out / "saved")),
        "parquet": ("hf", write_parquet(converted, out / "parquet")),
        "parquet_glob": ("hf", out / "parquet" / "data" / "*.parquet"),
        "hub": ("hf", write_hf_hub_cache(converted, out / "hf_home", HUB_ID)),
    }, out / "hf_home"


def open_door(doors, name: str, monkeypatch) -> DataSplits:
    roots, hf_home = doors
    if name == "hub":
        monkeypatch.setenv("HF_HOME", str(hf_home))  # the cache the door was written to; HF_HUB_OFFLINE=1 (conftest)
    dataset, root = roots[name]
    return build(dataset, root)


DOORS = ["csv", "jsonl", "save_to_disk", "parquet", "parquet_glob", "hub"]


@pytest.mark.parametrize("door", DOORS)
def test_every_door_gives_the_image_folders_classes_splits_and_files(doors, door, monkeypatch):
    folder = open_door(doors, "imagefolder", monkeypatch)
    splits = open_door(doors, door, monkeypatch)
    assert splits.class_names == folder.class_names == ["ants", "bees"]
    assert (len(splits.train), len(splits.val), splits.test) == (245, 153, None)
    for ours, theirs in ((splits.train, folder.train), (splits.val, folder.val)):
        assert identities(ours) == identities(theirs)
        assert dataset_targets(ours) == dataset_targets(theirs)


@torch.no_grad()
def predictions(model, dataset) -> dict:
    """{file: logits} of every image of `dataset`, through the engine's own evaluation loader."""
    logits = torch.cat([model(images) for images, _ in build_loader(dataset, batch_size=64, train=False)])
    return dict(zip(identities(dataset), logits))


def test_every_door_gives_the_same_val_prediction_on_every_image(doors, monkeypatch):
    model = finetune.load_model(SCRATCH, num_classes=2, img_size=IMG).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # the new head starts at zero: every image would be class 0
    reference = predictions(model, open_door(doors, "imagefolder", monkeypatch).val)
    assert len(reference) == 153 and len({int(l.argmax()) for l in reference.values()}) == 2
    for door in DOORS:
        if door == "parquet_glob":  # the parquet door's files and decoding again: its files are checked above
            continue
        ours = predictions(model, open_door(doors, door, monkeypatch).val)
        assert ours.keys() == reference.keys(), door
        for name, logits in reference.items():
            assert int(ours[name].argmax()) == int(logits.argmax()), (door, name)
            assert torch.allclose(ours[name], logits, atol=1e-5), (door, name)


def test_without_splits_every_door_cuts_the_same_files_as_the_image_folder(tmp_path):
    """One pool of rows (no split column, a single Dataset) is cut stratified and seeded as imagefolder cuts."""
    require_shared(HYMENOPTERA)
    pool = HYMENOPTERA / "train"
    cut = dict(val_split=0.2, test_split=0.1, seed=3)
    folder = build("imagefolder", pool, **cut)
    for dataset, root in (("csv", write_csv(pool, tmp_path / "pool.csv")),
                          ("hf", write_hf_save_to_disk(pool, tmp_path / "pool"))):
        splits = build(dataset, root, **cut)
        again = build(dataset, root, **cut)
        for ours, theirs, twice in ((splits.train, folder.train, again.train), (splits.val, folder.val, again.val),
                                    (splits.test, folder.test, again.test)):
            assert identities(ours) == identities(theirs) == identities(twice), dataset


def test_a_hub_id_fetched_by_hf_download_is_read_offline_from_the_hub_cache(tmp_path, offline_caches, monkeypatch):
    """Only the hub snapshot (what `hf download --repo-type dataset` leaves), no prepared copy: load_dataset
    offline cannot read it, the source reads the snapshot's files; a hub id a recipe's resolve_path turned
    into <cwd>/org/name too."""
    require_shared(HYMENOPTERA)
    photos = photos_of(HYMENOPTERA)[::8]
    write_hf_hub_snapshot(photos, offline_caches / "hf", "org/sampled")
    assert not (offline_caches / "hf" / "datasets" / "org___sampled").exists()
    for root in ("org/sampled", str(Path.cwd() / "org" / "sampled")):
        splits = build("hf", root)
        assert identities(splits.train) == [p.path.name for p in photos if p.split == "train"]
        assert identities(splits.val) == [p.path.name for p in photos if p.split == "val"]


# ----------------------------------------------------------------------------------- multi-label
def mosaic(tiles, path: Path, tile: int = 48) -> Path:
    """2x2 mosaic of four real photos (or grey tiles), saved as a JPEG."""
    canvas = Image.new("RGB", (2 * tile, 2 * tile), (128, 128, 128))
    for k, source in enumerate(tiles):
        if source is not None:
            with Image.open(source) as photo:
                canvas.paste(photo.convert("RGB").resize((tile, tile)), ((k % 2) * tile, (k // 2) * tile))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, "JPEG")
    return path


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory):
    """16 mosaics of real photos labelled with every class they show: ants, bees, both, or none (grey)."""
    require_shared(HYMENOPTERA)
    out = tmp_path_factory.mktemp("mosaics")
    ants = sorted((HYMENOPTERA / "train" / "ants").glob("*.jpg"))
    bees = sorted((HYMENOPTERA / "train" / "bees").glob("*.jpg"))
    kinds = {("ants",): lambda k: ants[4 * k:4 * k + 4], ("bees",): lambda k: bees[4 * k:4 * k + 4],
             ("ants", "bees"): lambda k: [ants[40 + k], bees[40 + k], bees[50 + k], ants[50 + k]],
             (): lambda k: [None] * 4}
    photos = []
    for k in range(4):
        for labels, tiles in kinds.items():
            name = f"{'_'.join(labels) or 'none'}-{k}.jpg"
            photos.append(Photo(mosaic(tiles(k), out / "images" / name), f"images/{name}", labels,
                                "val" if k == 3 else "train"))
    return out, photos


def multilabel_doors(out: Path, photos):
    pooled = [Photo(p.path, p.name, p.labels, None) for p in photos]
    yield "csv", write_csv(photos, out / "m.csv")
    yield "tsv, comma-separated", write_tsv(photos, out / "m.tsv", separator=","), {"label_separator": ","}
    yield "jsonl", write_jsonl(photos, out / "m.jsonl", multilabel=True)
    yield "csv, no split", write_csv(pooled, out / "pool.csv")
    yield "hf Sequence(ClassLabel)", write_hf_save_to_disk(photos, out / "saved", multilabel=True)
    yield "hf list of strings", write_string_lists(photos, out / "strings.parquet")


def write_string_lists(photos, out: Path) -> Path:
    import datasets
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.Sequence(datasets.Value("string"))})
    table = datasets.Dataset.from_dict({"image": [{"bytes": p.path.read_bytes(), "path": p.path.name} for p in photos],
                                        "labels": [list(p.labels) for p in photos]}, features=features)
    table.to_parquet(str(out))
    return out


def test_multilabel_manifests_and_datasets_give_multi_hot_targets(mosaics):
    out, photos = mosaics
    expected = {p.path.name: torch.tensor([float("ants" in p.labels), float("bees" in p.labels)]) for p in photos}
    for door, root, *options in multilabel_doors(out, photos):
        dataset = "hf" if door.startswith("hf") else "csv"
        splits = build(dataset, root, multilabel=True, **(options[0] if options else {}))
        assert splits.class_names == ["ants", "bees"], door
        assert len(splits.train) + len(splits.val) == 16 and splits.test is None, door
        for split in (splits.train, splits.val):
            names = identities(split)
            assert not hasattr(split, "targets"), door
            assert split.label_sets == [tuple(i for i, c in enumerate(["ants", "bees"]) if expected[n][i])
                                        for n in names], door
            for k, name in enumerate(names):
                image, target = split[k]
                assert image.shape == (3, IMG, IMG) and target.dtype == torch.float32, door
                assert torch.equal(target, expected[name]), (door, name)


def test_multilabel_rows_in_a_single_label_run_say_to_set_task_multilabel(mosaics):
    out, photos = mosaics
    for door, root, *options in multilabel_doors(out, photos):
        dataset = "hf" if door.startswith("hf") else "csv"
        message = one_line_error(lambda: build(dataset, root, **(options[0] if options else {})))
        assert "task: multilabel" in message, (door, message)


# ---------------------------------------------------------------------------- labels, images, workers
@pytest.fixture
def images(tmp_path) -> Path:
    for i in range(6):
        write_image(tmp_path / "images" / f"{i}.png", colour=(40 * i, 100, 200))
    return tmp_path / "images"


def write_rows(path: Path, header: str, rows) -> Path:
    path.write_text("\n".join([header] + list(rows)) + "\n", encoding="utf-8")
    return path


def test_integer_labels_are_classes_or_indices_into_class_names(tmp_path, images):
    manifest = write_rows(tmp_path / "m.csv", "image,label,split",
                          [f"images/{i}.png,{i % 2},{'val' if i > 3 else 'train'}" for i in range(6)])
    plain = build("csv", manifest)
    assert plain.class_names == ["0", "1"] and plain.train.targets == [0, 1, 0, 1]
    named = build("csv", manifest, class_names=("ants", "bees"))
    assert named.class_names == ["ants", "bees"] and named.train.targets == [0, 1, 0, 1]
    reordered = build("csv", manifest, class_names=("1", "0"))  # names match first: "1" is class 0
    assert reordered.train.targets == [1, 0, 1, 0]
    numbers = write_rows(tmp_path / "n.jsonl", "", [json.dumps({"image": f"images/{i}.png", "label": n})
                                                    for i, n in enumerate([10, 2, 10, 2, 2, 10])])
    assert build("csv", numbers, val_split=0.34).class_names == ["2", "10"]  # numerically, not "10" < "2"


def test_class_names_with_spaces_stay_whole_in_single_label(tmp_path, images):
    manifest = write_rows(tmp_path / "m.csv", "image,label",
                          [f"images/{i}.png,{'Basset Hound' if i % 2 else 'Bengal'}" for i in range(6)])
    assert build("csv", manifest, val_split=0.34).class_names == ["Basset Hound", "Bengal"]


def test_an_undecodable_image_is_skipped_with_one_warning(tmp_path, images):
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    manifest = write_rows(tmp_path / "m.csv", "image,label,split",
                          ["images/broken.png,a,train", "images/0.png,a,train", "images/1.png,b,val"])
    photos = [Photo(images / name, name, (label,), split)
              for name, label, split in (("broken.png", "a", "train"), ("0.png", "a", "train"), ("1.png", "b", "val"))]
    saved = write_hf_save_to_disk(photos, tmp_path / "saved")
    for dataset, root in (("csv", manifest), ("hf", saved)):
        splits = build(dataset, root)
        with pytest.warns(UserWarning, match="broken.png") as caught:
            assert splits.train[0] is None and splits.train[0] is None
        assert len([w for w in caught if "broken.png" in str(w.message)]) == 1
        images_batch, labels = next(iter(build_loader(splits.train, batch_size=4, train=False)))
        assert images_batch.shape == (1, 3, IMG, IMG) and labels.tolist() == [0]


def test_hf_splits_pickle_for_dataloader_workers_and_balance(tmp_path, images):
    saved = write_hf_save_to_disk([Photo(images / f"{i}.png", f"{i}.png", ("ab"[i % 2],), None) for i in range(6)],
                                  tmp_path / "saved")
    splits = build("hf", saved, val_split=0.34)
    assert len(pickle.dumps(splits.train)) < 20_000  # the arrow files by reference, not the images
    clone = pickle.loads(pickle.dumps(splits.train))
    assert torch.equal(clone[0][0], splits.train[0][0]) and clone.targets == splits.train.targets
    in_workers = next(iter(build_loader(splits.val, batch_size=8, train=False, workers=2)))
    in_process = next(iter(build_loader(splits.val, batch_size=8, train=False)))
    assert torch.equal(in_workers[0], in_process[0]) and torch.equal(in_workers[1], in_process[1])
    assert len(list(build_loader(splits.train, batch_size=2, train=True, balanced=True))) == 2


def test_a_missing_val_split_is_cut_from_train_and_test_kept(tmp_path, images):
    photos = [Photo(images / f"{i % 6}.png", f"{i}.png", ("ab"[i % 2],), "test" if i >= 10 else "train")
              for i in range(12)]
    splits = build("hf", write_hf_save_to_disk(photos, tmp_path / "saved"), val_split=0.2, test_split=0.3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 2, 2)  # test as given, not cut
    assert sorted(dataset_targets(splits.val)) == [0, 1]  # stratified
    assert identities(splits.test) == ["4.png", "5.png"]  # rows 10 and 11: files 10 % 6 and 11 % 6


# ----------------------------------------------------------------------------------- one-line errors
def jsonl(*records) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n"


CSV_ERRORS = [  # (name, file name, content, options, words the message must hold)
    ("unknown extension", "m.txt", "image,label\n", {}, ["unknown manifest extension", "'.txt'", ".jsonl"]),
    ("empty file", "m.csv", "", {}, ["empty manifest"]),
    ("header only", "m.csv", "image,label\n", {}, ["empty manifest", "after the header"]),
    ("no image column", "m.csv", "photo,label\nimages/0.png,a\n", {}, ["no image column", "'photo'", "'label'"]),
    ("no label column", "m.tsv", "image\tclass\nimages/0.png\ta\n", {},
     ["no label column", "'class'", "data.label_key"]),
    ("image_key absent", "m.csv", "image,label\nimages/0.png,a\n", {"image_key": "img"},
     ["no column 'img'", "data.image_key"]),
    ("split_key absent", "m.csv", "image,label\nimages/0.png,a\n", {"split_key": "fold"}, ["no column 'fold'"]),
    ("malformed JSONL", "m.jsonl", jsonl({"image": "images/0.png", "label": "a"}, '{"image": "images/1.png", '),
     {}, ["line 2", "not valid JSON"]),
    ("JSONL line not an object", "m.jsonl", jsonl(["images/0.png", "a"]), {}, ["line 1", "not an object"]),
    ("unknown split", "m.csv", "image,label,split\nimages/0.png,a,train\nimages/1.png,a,holdout\n", {},
     ["line 3", "'holdout'", "train, val"]),
    ("split without val", "m.csv", "image,label,split\nimages/0.png,a,train\nimages/1.png,b,test\n", {},
     ["no val rows", "'split'"]),
    ("class too small", "m.csv", "image,label\n" + "".join(f"images/{i}.png,a\n" for i in range(5))
     + "images/5.png,b\n", {}, ["class 'b' has 1 image"]),
    ("label not in class_names", "m.csv", "image,label,split\nimages/0.png,a,train\nimages/1.png,wasp,val\n",
     {"class_names": ("a", "b")}, ["line 3", "'wasp'", "data.class_names"]),
    ("index out of class_names", "m.csv", "image,label,split\nimages/0.png,0,train\nimages/1.png,7,val\n",
     {"class_names": ("a", "b")}, ["line 3", "'7'", "index 0..1"]),
    ("several labels, single-label", "m.csv", "image,label,split\nimages/0.png,a,train\nimages/1.png,b,val\n"
     "images/2.png,a b,train\n", {}, ["line 4", "task: multilabel"]),
    ("a JSON list of several, single-label", "m.jsonl", jsonl({"image": "images/0.png", "label": ["a", "b"]}), {},
     ["line 1", "task: multilabel"]),
    ("missing image file", "m.csv", "image,label\nimages/0.png,a\nimages/gone.png,a\n", {},
     ["line 3", "'images/gone.png'", "not found", "relative to the manifest's folder"]),
    ("empty image cell", "m.csv", "image,label\n,a\n", {}, ["line 2", "no image path"]),
    ("empty label", "m.csv", "image,label,split\nimages/0.png,,train\n", {}, ["line 2", "no label", "'label'"]),
    ("no labels at all, multi-label", "m.csv", "image,label\nimages/0.png,\n", {"multilabel": True},
     ["no labels at all"]),
    ("too many fields", "m.csv", "image,label\nimages/0.png,a,b\n", {}, ["line 2", "3 fields", "header has 2"]),
    ("float label", "m.jsonl", jsonl({"image": "images/0.png", "label": 1.5}), {}, ["line 1", "is a float"]),
    ("repeated column", "m.csv", "image,label,label\nimages/0.png,a,b\n", {}, ["'label' twice"]),
    ("not UTF-8", "m.csv", b"image,label\nimages/0.png,\xff\xfe\n", {}, ["not UTF-8"]),
    ("val_split too large for the classes", "m.csv", "image,label\n" + "".join(f"images/{i}.png,{'ab'[i % 2]}\n"
                                                                              for i in range(6)),
     {"val_split": 0.1}, ["cannot split 6 images", "val_split=0.1"]),
]


@pytest.mark.parametrize("name,file,content,options,words", CSV_ERRORS, ids=[c[0] for c in CSV_ERRORS])
def test_bad_manifests_fail_in_one_line(tmp_path, images, name, file, content, options, words):
    manifest = tmp_path / file
    manifest.write_bytes(content if isinstance(content, bytes) else content.encode())
    message = one_line_error(lambda: build("csv", manifest, **options))
    assert str(manifest) in message
    for word in words:
        assert word in message, message


def test_manifest_roots_that_are_no_manifest_fail_in_one_line(tmp_path):
    (tmp_path / "folder.csv").mkdir()
    assert "is a folder" in one_line_error(lambda: build("csv", tmp_path / "folder.csv"))
    assert "manifest not found" in one_line_error(lambda: build("csv", tmp_path / "absent.csv"))


def saved_dataset(tmp_path, columns: dict, features: dict = None, splits=("train",)) -> Path:
    import datasets
    features = datasets.Features(features) if features else None
    parts = {split: datasets.Dataset.from_dict(columns, features=features) for split in splits}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def png_cells(images: Path, n: int) -> list:
    return [{"bytes": (images / f"{i % 6}.png").read_bytes(), "path": f"{i}.png"} for i in range(n)]


def hf_features(label):
    import datasets
    return {"image": datasets.Image(), "label": label}


def class_label(*names):
    import datasets
    return datasets.ClassLabel(names=list(names))


HF_ERRORS = [  # (name, make root (tmp_path, images) -> root, options, words)
    ("hub id not cached offline", lambda t, i: "someorg/absent", {}, ["someorg/absent", "offline", "HF cache"]),
    ("neither saved nor parquet", lambda t, i: i, {}, ["neither a save_to_disk folder", "parquet"]),
    ("not a parquet file", lambda t, i: write_rows(t / "m.csv", "image,label", []), {}, ["not a .parquet file",
                                                                                          "data.dataset csv"]),
    ("glob matching nothing", lambda t, i: str(t / "shards" / "*.parquet"), {}, ["matches no files"]),
    ("no image column", lambda t, i: saved_dataset(t, {"picture": ["0.png"], "label": [0]}), {},
     ["no image column", "'picture'"]),
    ("no label column", lambda t, i: saved_dataset(t, {"image": png_cells(i, 1), "target": [0]}), {},
     ["no label column", "'target'"]),
    ("no train split", lambda t, i: saved_dataset(t, {"image": png_cells(i, 2), "label": [0, 1]},
                                                  splits=("validation", "test")), {},
     ["no train split", "test, validation"]),
    ("class too small", lambda t, i: saved_dataset(t, {"image": png_cells(i, 6), "label": [0] * 5 + [1]},
                                                   hf_features(class_label("a", "b"))), {}, ["class 'b' has 1 image"]),
    ("label not in class_names", lambda t, i: saved_dataset(t, {"image": png_cells(i, 4), "label": [0, 1, 0, 1]},
                                                            hf_features(class_label("ants", "bees"))),
     {"class_names": ("ants", "wasps")}, ["'bees'", "data.class_names"]),
    ("float labels", lambda t, i: saved_dataset(t, {"image": png_cells(i, 2), "label": [0.5, 1.5]}), {},
     ["label column 'label'", "float"]),
    ("numbers as images", lambda t, i: saved_dataset(t, {"image": [1, 2, 3, 4], "label": ["a", "b", "a", "b"]}),
     {}, ["column 'image'", "not images", "data.image_key"]),
    ("damaged save_to_disk folder", lambda t, i: damaged(saved_dataset(t, {"image": png_cells(i, 2),
                                                                           "label": ["a", "b"]})),
     {}, ["cannot read the save_to_disk folder"]),
]


def damaged(saved: Path) -> Path:
    for arrow in saved.rglob("*.arrow"):
        arrow.write_bytes(b"not arrow")
    return saved


@pytest.mark.parametrize("name,make,options,words", HF_ERRORS, ids=[c[0] for c in HF_ERRORS])
def test_bad_hf_datasets_fail_in_one_line(tmp_path, images, name, make, options, words):
    root = make(tmp_path, images)
    message = one_line_error(lambda: build("hf", root, **options))
    for word in words:
        assert word in message, message


def test_hf_without_the_datasets_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: `import datasets` raises ImportError
    message = one_line_error(lambda: build("hf", tmp_path))
    assert "pip install 'finetune[hf]'" in message


def test_hf_splits_with_different_classes_fail_in_one_line(tmp_path, images):
    import datasets
    parts = {split: datasets.Dataset.from_dict({"image": png_cells(images, 2), "label": [0, 1]},
                                               features=datasets.Features(hf_features(class_label(*names))))
             for split, names in (("train", ("a", "b")), ("validation", ("a", "c")))}
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "saved"))
    assert "every split needs the same" in one_line_error(lambda: build("hf", tmp_path / "saved"))


# ------------------------------------------------------------------------ generated input (must-show 6)
FIXTURE_IMAGES = ("images/0.png", "images/1.png", "images/broken.png", "images/gone.png", "/abs/none.png", "")
CELLS = st.one_of(st.sampled_from(FIXTURE_IMAGES), st.sampled_from(["a", "b", "a b", "0", "1", "7", "", " "]),
                  st.sampled_from(["train", "val", "validation", "test", "dev", "TRAIN"]), st.text(max_size=6))
JSON_VALUES = st.one_of(CELLS, st.none(), st.booleans(), st.integers(-3, 12), st.floats(allow_nan=True),
                        st.lists(CELLS, max_size=3), st.dictionaries(st.text(max_size=3), CELLS, max_size=2))
COLUMNS = st.sampled_from(["image", "path", "file", "label", "labels", "split", "x", ""])
OPTIONS = st.fixed_dictionaries({}, optional={
    "multilabel": st.booleans(), "class_names": st.sampled_from([("a", "b"), ("b",), ("0", "1", "2")]),
    "image_key": st.sampled_from(["image", "path", "x"]), "label_key": st.sampled_from(["label", "labels"]),
    "split_key": st.sampled_from(["split", "x"]), "label_separator": st.sampled_from([" ", ",", "|"]),
    "val_split": st.sampled_from([0.1, 0.34, 0.5]), "test_split": st.sampled_from([0.0, 0.2]),
})


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    for i in range(2):
        write_image(root / "images" / f"{i}.png", colour=(100 * i, 50, 50))
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def delimited_text(header, rows, delimiter: str) -> str:
    import csv
    import io
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter).writerows([header] + rows)
    return out.getvalue()


def manifest_text(suffix: str, header, rows, mutations) -> tuple:
    """A manifest of `rows` (dicts) under `header`, a few cells replaced by `mutations` [(row, column index, value)]."""
    role = {"path": "image", "labels": "label"}  # a header's other names for the image and label columns
    rows = [{column: row.get(role.get(column, column)) for column in header} for row in rows]
    for row, column, value in mutations:
        rows[row % len(rows)][header[column % len(header)]] = value
    if suffix == ".jsonl":
        return suffix, "".join(json.dumps(row) + "\n" for row in rows)
    cells = [["" if row[column] is None else str(row[column]) for column in header] for row in rows]
    return suffix, delimited_text(header, cells, "," if suffix == ".csv" else "\t")


GOOD_ROWS = st.lists(st.fixed_dictionaries({
    "image": st.sampled_from(["images/0.png", "images/1.png", "images/broken.png"]),
    "label": st.sampled_from(["a", "b"] * 4 + ["a b", "0"]),
    "split": st.sampled_from(["train", "val"] * 3 + ["test", "VALID"])}), min_size=1, max_size=12)
HEADERS = st.sampled_from([["image", "label"], ["image", "label", "split"], ["path", "label", "split"],
                           ["label", "image", "x"], ["image", "label"], ["image", "labels"]])
NEARLY_RIGHT = st.builds(manifest_text, st.sampled_from([".csv", ".tsv", ".jsonl"]), HEADERS, GOOD_ROWS,
                         st.lists(st.tuples(st.integers(0, 20), st.integers(0, 3), JSON_VALUES), max_size=1))
ANYTHING = st.one_of(  # random cells under a random header, random JSON lines, random text
    st.builds(lambda h, r, d: (d, delimited_text(h, r, "," if d == ".csv" else "\t")),
              st.lists(COLUMNS, min_size=1, max_size=4), st.lists(st.lists(CELLS, max_size=5), max_size=8),
              st.sampled_from([".csv", ".tsv"])),
    st.builds(lambda lines: (".jsonl", "\n".join(lines)),
              st.lists(st.one_of(st.builds(json.dumps, st.dictionaries(COLUMNS, JSON_VALUES, max_size=4)),
                                 st.text(max_size=12)), max_size=8)),
    st.builds(lambda suffix, text: (suffix, text), st.sampled_from([".csv", ".tsv", ".jsonl"]), st.text(max_size=40)),
)
manifest_texts = st.one_of(NEARLY_RIGHT, ANYTHING)


def splits_or_one_line(action) -> None:
    try:
        splits = action()
    except FinetuneError as error:
        assert "\n" not in str(error) and str(error).strip()
        return
    assert isinstance(splits, DataSplits) and splits.class_names
    for split in (splits.train, splits.val, splits.test):
        if split is not None and len(split):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sample = split[0]
            assert sample is None or (sample[0].shape == (3, 8, 8))


@FEW
@given(manifest=manifest_texts, options=st.one_of(st.just({}), OPTIONS))
@example(manifest=(".csv", "image,label,split\nimages/0.png,a,train\nimages/broken.png,b,train\nimages/1.png,b,val\n"),
         options={})  # one that builds, whatever hypothesis draws
def test_generated_manifests_give_splits_or_a_one_line_error(fuzz_root, manifest, options):
    suffix, text = manifest
    path = fuzz_root / f"manifest{suffix}"
    path.write_text(text, encoding="utf-8")
    options = dict(options)
    splits_or_one_line(lambda: build("csv", path, img_size=8, **options))


HF_LABELS = st.one_of(st.lists(st.integers(-1, 3), min_size=6, max_size=6),
                      st.lists(st.sampled_from(["a", "b", "a b", ""]), min_size=6, max_size=6),
                      st.lists(st.lists(st.sampled_from(["a", "b"]), max_size=2), min_size=6, max_size=6),
                      st.lists(st.floats(0, 2), min_size=6, max_size=6))


@FEWER
@given(labels=HF_LABELS, names=st.sampled_from([None, ["a", "b"], ["a", "b", "c", "d"]]),
       splits=st.sampled_from([("train",), ("train", "validation"), ("train", "test"), ("data",), ("val", "test")]),
       broken=st.sets(st.integers(0, 5), max_size=2), options=OPTIONS)
def test_generated_hf_datasets_give_splits_or_a_one_line_error(tmp_path_factory, fuzz_root, labels, names, splits,
                                                              broken, options):
    import datasets
    good = (fuzz_root / "images" / "0.png").read_bytes()
    cells = [{"bytes": b"broken" if i in broken else good, "path": f"{i}.png"} for i in range(6)]
    label = datasets.ClassLabel(names=names) if names and isinstance(labels[0], int) else None
    features = datasets.Features({"image": datasets.Image(), "label": label}) if label else None
    try:
        parts = {split: datasets.Dataset.from_dict({"image": cells, "label": labels}, features=features)
                 for split in splits}
    except (ValueError, TypeError):  # the library refused the generated columns itself: nothing to read
        return
    root = tmp_path_factory.mktemp("hf") / "saved"
    datasets.DatasetDict(parts).save_to_disk(str(root))
    splits_or_one_line(lambda: build("hf", root, img_size=8, **dict(options)))


# ------------------------------------------------------------------------------ the real fine-tune
def fine_tune(out: Path, overrides) -> list:
    """recipes/hymenoptera-deit-tiny.yaml (5 epochs, the real DeiT-Tiny weights) through the engine:
    each epoch's val top-1."""
    engine.train_recipe("hymenoptera-deit-tiny", overrides, out_dir=str(out), progress=False)
    return [json.loads(line)["val_top1"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def image_folder_run(tmp_path_factory) -> list:
    require_shared(DEIT_WEIGHTS, HYMENOPTERA)
    return fine_tune(tmp_path_factory.mktemp("imagefolder"), ["data.dataset=imagefolder", f"data.root={HYMENOPTERA}"])


@pytest.mark.slow
@pytest.mark.parametrize("door", ["csv", "hf"])
def test_hymenoptera_deit_tiny_through_csv_and_hf_reaches_the_image_folders_accuracy(tmp_path, image_folder_run,
                                                                                    door):
    """The same photos as a CSV manifest or a save_to_disk dataset train as the image folder does: >= 93% val
    (the recipe's target), and every epoch within a point of the image folder run's (same order, same seeds)."""
    root = write_csv(HYMENOPTERA, tmp_path / "photos.csv") if door == "csv" else \
        write_hf_save_to_disk(HYMENOPTERA, tmp_path / "saved")
    val_top1 = fine_tune(tmp_path / "run", [f"data.dataset={door}", f"data.root={root}"])
    print(f"val top-1 by epoch: image folder {image_folder_run}, {door} {val_top1}")
    assert max(val_top1) >= 0.93 and max(image_folder_run) >= 0.93, (val_top1, image_folder_run)
    assert len(val_top1) == len(image_folder_run)
    assert all(abs(ours - theirs) <= 0.01 for ours, theirs in zip(val_top1, image_folder_run)), (val_top1,
                                                                                                 image_folder_run)
