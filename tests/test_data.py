"""Tests for finetune.data: offline, synthetic images in tmp_path, plus the real folders when present."""
from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision.datasets as tvd
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import Dataset, Subset

from finetune.data import (
    DataSplits,
    ImageFolderSkippingUnreadable,
    build_datasets,
    build_loader,
    build_transforms,
    dataset_targets,
    load_image,
)
from finetune.errors import FinetuneError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IMAGENET_CONFIG = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}
HALF_CONFIG = {"input_size": (3, 224, 224), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "crop_pct": 0.9}


def write_image(path: Path, colour=(200, 30, 60), size=(20, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_class_tree(root: Path, counts: dict) -> None:
    for name, count in counts.items():
        for i in range(count):
            write_image(root / name / f"{name}_{i:03d}.jpg", colour=(10 * i % 256, 100, 200))


def build_folder(root, **kwargs) -> DataSplits:
    kwargs.setdefault("img_size", 16)
    kwargs.setdefault("data_config", IMAGENET_CONFIG)
    return build_datasets("imagefolder", str(root), **kwargs)


def sample_paths(split) -> set:
    return {Path(split.dataset.samples[i][0]).name for i in split.indices}


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------- image folders
def test_presplit_folder_ignores_hidden_and_non_image_files(tmp_path):
    write_class_tree(tmp_path / "train", {"ants": 3, "bees": 2})
    write_class_tree(tmp_path / "val", {"ants": 1, "bees": 2})
    (tmp_path / ".DS_Store").write_bytes(b"\0Bud1")
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\0Bud1")
    (tmp_path / "train" / "ants" / ".DS_Store").write_bytes(b"\0Bud1")
    (tmp_path / "train" / "ants" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "train" / "ants" / "._ant.jpg")  # macOS resource-fork twin
    write_image(tmp_path / "train" / ".thumbnails" / "x.jpg")
    write_image(tmp_path / "val" / ".thumbnails" / "x.jpg")

    splits = build_folder(tmp_path)

    assert splits.class_names == ["ants", "bees"]
    assert (len(splits.train), len(splits.val), splits.test) == (5, 3, None)
    assert dataset_targets(splits.train) == [0, 0, 0, 1, 1]
    image, label = splits.train[0]
    assert image.shape == (3, 16, 16) and label == 0


def test_presplit_folder_with_test_dir(tmp_path):
    for split in ("train", "val", "test"):
        write_class_tree(tmp_path / split, {"a": 2, "b": 2})
    splits = build_folder(tmp_path)
    assert len(splits.test) == 4 and splits.test.classes == ["a", "b"]


def test_presplit_class_mismatch_names_both_folders(tmp_path):
    write_class_tree(tmp_path / "train", {"ants": 2, "bees": 2})
    write_class_tree(tmp_path / "val", {"ants": 2, "wasps": 2})
    with pytest.raises(FinetuneError) as excinfo:
        build_folder(tmp_path)
    message = one_line_error(excinfo)
    assert str(tmp_path / "train") in message and str(tmp_path / "val") in message


def test_missing_root_names_path_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FinetuneError) as excinfo:
        build_folder(missing)
    message = one_line_error(excinfo)
    assert str(missing) in message and "<root>/train/<class>" in message


def test_folder_without_class_dirs_is_an_error(tmp_path):
    write_image(tmp_path / "loose.jpg")
    with pytest.raises(FinetuneError, match="no class folders"):
        build_folder(tmp_path)


def test_flat_folder_split_is_stratified_and_deterministic(tmp_path):
    write_class_tree(tmp_path, {"cat": 20, "dog": 20, "fox": 20})
    (tmp_path / ".DS_Store").write_bytes(b"\0Bud1")

    first = build_folder(tmp_path, val_split=0.2, test_split=0.2, seed=0)
    again = build_folder(tmp_path, val_split=0.2, test_split=0.2, seed=0)
    other_seed = build_folder(tmp_path, val_split=0.2, test_split=0.2, seed=1)

    assert (len(first.train), len(first.val), len(first.test)) == (36, 12, 12)
    for split in (first.train, first.val, first.test):
        assert set(Counter(dataset_targets(split)).values()) == {len(split) // 3}  # every class, equally
    parts = [sample_paths(s) for s in (first.train, first.val, first.test)]
    assert set.union(*parts) == {p.name for p in tmp_path.rglob("*.jpg")}
    assert sum(map(len, parts)) == 60  # disjoint
    assert [sample_paths(s) for s in (again.train, again.val, again.test)] == parts
    assert sample_paths(other_seed.val) != parts[1]


def test_flat_folder_val_uses_eval_transform_and_train_augments(tmp_path):
    write_class_tree(tmp_path, {"a": 10, "b": 10})
    splits = build_folder(tmp_path, augment="crop_flip", val_split=0.2)
    train_ops = [type(t) for t in splits.train.dataset.transform.transforms]
    val_ops = [type(t) for t in splits.val.dataset.transform.transforms]
    assert T.RandomResizedCrop in train_ops
    assert T.RandomResizedCrop not in val_ops and T.CenterCrop in val_ops


def test_too_small_class_for_stratified_split_is_one_line_error(tmp_path):
    write_class_tree(tmp_path, {"a": 10, "b": 1})
    with pytest.raises(FinetuneError) as excinfo:
        build_folder(tmp_path, val_split=0.2)
    assert str(tmp_path) in one_line_error(excinfo)


@pytest.mark.parametrize("val_split, test_split", [(0.0, 0.1), (1.0, 0.0), (0.5, 0.5), (0.1, -0.1), ("0.1", 0.0)])
def test_bad_split_fractions(tmp_path, val_split, test_split):
    write_class_tree(tmp_path, {"a": 10, "b": 10})
    with pytest.raises(FinetuneError, match="split"):
        build_folder(tmp_path, val_split=val_split, test_split=test_split)


def test_corrupt_image_is_skipped_with_one_warning_naming_it(tmp_path):
    write_class_tree(tmp_path / "train", {"a": 3, "b": 3})
    write_class_tree(tmp_path / "val", {"a": 1, "b": 1})
    corrupt = tmp_path / "train" / "a" / "a_zzz_corrupt.jpg"
    corrupt.write_bytes(b"this is not a jpeg")
    splits = build_folder(tmp_path)
    assert len(splits.train) == 7  # listed (we do not decode at build time) ...
    loader = build_loader(splits.train, batch_size=8, train=False)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [next(iter(loader)), next(iter(loader))]

    naming_it = [str(w.message) for w in caught if str(corrupt) in str(w.message)]
    assert len(naming_it) == 1  # ... warned about once across two passes, naming the file
    for images, labels in batches:
        assert images.shape == (6, 3, 16, 16)
        assert labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_all_unreadable_batch_is_empty(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "broken.png").write_bytes(b"\x89PNG garbage")
    dataset = ImageFolderSkippingUnreadable(str(tmp_path))
    with pytest.warns(UserWarning, match="broken.png"):
        images, labels = next(iter(build_loader(dataset, batch_size=2, train=False)))
    assert images.shape == (0, 3, 0, 0) and labels.dtype == torch.long and labels.numel() == 0


def test_load_image_converts_to_rgb_and_names_bad_path(tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("L", (5, 5), 7).save(grey)
    assert load_image(grey).mode == "RGB"
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(FinetuneError) as excinfo:
        load_image(bad)
    assert str(bad) in one_line_error(excinfo)
    with pytest.raises(FinetuneError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")


# ------------------------------------------------------------------------------------ transforms
@pytest.mark.parametrize("config", [IMAGENET_CONFIG, HALF_CONFIG])
def test_normalisation_uses_the_data_config(config):
    colour = (255, 0, 128)
    out = build_transforms(config, 24)(Image.new("RGB", (40, 30), colour))
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, config["mean"], config["std"])]
    assert out.shape == (3, 24, 24)
    for channel, value in enumerate(expected):
        assert torch.allclose(out[channel], torch.full((24, 24), value), atol=1e-5)


@pytest.mark.parametrize("augment", ["none", "flip", "crop_flip", "randaugment"])
@pytest.mark.parametrize("train", [True, False])
def test_every_augment_outputs_img_size(augment, train):
    torch.manual_seed(0)
    out = build_transforms(IMAGENET_CONFIG, 32, augment, train=train)(Image.new("RGB", (70, 45), (1, 2, 3)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_eval_transform_resize_and_crop_follow_crop_pct():
    resize, crop = build_transforms(IMAGENET_CONFIG, 224).transforms[:2]
    assert (resize.size, resize.interpolation, crop.size) == (256, T.InterpolationMode.BICUBIC, (224, 224))
    resize, crop = build_transforms(HALF_CONFIG, 224).transforms[:2]
    assert (resize.size, resize.interpolation, crop.size) == (248, T.InterpolationMode.BILINEAR, (224, 224))
    full = build_transforms({**HALF_CONFIG, "crop_pct": 1.0}, 224).transforms[0]
    assert isinstance(full, T.Resize) and tuple(full.size) == (224, 224)


def test_eval_crop_keeps_the_centre():
    framed = Image.new("RGB", (64, 64), (0, 0, 0))
    framed.paste((255, 255, 255), (16, 16, 48, 48))  # white centre, black frame
    white = [(1 - m) / s for m, s in zip(HALF_CONFIG["mean"], HALF_CONFIG["std"])]
    cropped = build_transforms({**HALF_CONFIG, "crop_pct": 0.5}, 32)(framed)
    assert torch.allclose(cropped, torch.tensor(white).view(3, 1, 1).expand(3, 32, 32))
    squashed = build_transforms({**HALF_CONFIG, "crop_pct": 1.0}, 32)(framed)
    assert squashed.shape == (3, 32, 32) and squashed[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]


def test_flip_augment_is_eval_geometry_plus_flip():
    ops = [type(t) for t in build_transforms(IMAGENET_CONFIG, 32, "flip", train=True).transforms]
    assert ops == [T.Resize, T.CenterCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    ops = [type(t) for t in build_transforms(IMAGENET_CONFIG, 32, "randaugment", train=True).transforms]
    assert ops == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.RandAugment, T.ToTensor, T.Normalize]


def test_bad_transform_inputs_are_one_line_errors():
    with pytest.raises(FinetuneError, match="augment.*'mixup'.*crop_flip"):
        build_transforms(IMAGENET_CONFIG, 32, "mixup", train=True)
    with pytest.raises(FinetuneError, match="'mean'"):
        build_transforms({"std": (1, 1, 1)}, 32)
    with pytest.raises(FinetuneError, match="interpolation.*'cubic'"):
        build_transforms({**IMAGENET_CONFIG, "interpolation": "cubic"}, 32)
    with pytest.raises(FinetuneError, match="std"):
        build_transforms({**IMAGENET_CONFIG, "std": (0.2, 0.2)}, 32)


# ---------------------------------------------------------------------------------------- digits
def test_digits_splits_classes_and_tensors():
    splits = build_datasets("digits", None, img_size=16, data_config=HALF_CONFIG, val_split=0.1, test_split=0.1, seed=3)
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sum(sizes) == 1797 and 170 <= sizes[1] <= 190 and 170 <= sizes[2] <= 190
    assert splits.class_names == [str(d) for d in range(10)]
    for split in (splits.train, splits.val, splits.test):
        assert set(dataset_targets(split)) == set(range(10))
    image, label = splits.val[0]
    assert image.shape == (3, 16, 16) and 0 <= label <= 9
    assert image.min().item() == pytest.approx(-1.0)  # digits have black (0) background -> (0-0.5)/0.5
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(FinetuneError, match="'mnist'.*imagefolder.*digits"):
        build_datasets("mnist", None, img_size=16, data_config=HALF_CONFIG)


# ---------------------------------------------------------------------------------------- loaders
class LabelsOnly(Dataset):
    """Labels readable from `targets`; fetching an item returns its label as the 'image'."""

    def __init__(self, targets):
        self.targets = list(targets)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return torch.tensor([float(self.targets[index])]), self.targets[index]


class Undecodable(LabelsOnly):
    def __getitem__(self, index):
        raise AssertionError("dataset_targets must not decode images")


def drawn_labels(loader, epochs: int) -> list:
    return [label for _ in range(epochs) for _, labels in loader for label in labels.tolist()]


def test_balanced_sampler_evens_out_an_imbalanced_set():
    imbalanced = LabelsOnly([0] * 90 + [1] * 10)
    balanced = drawn_labels(build_loader(imbalanced, batch_size=10, train=True, balanced=True, seed=0), epochs=20)
    plain = drawn_labels(build_loader(imbalanced, batch_size=10, train=True, seed=0), epochs=20)
    assert len(balanced) == 2000
    assert 0.42 < sum(balanced) / len(balanced) < 0.58
    assert sum(plain) / len(plain) == pytest.approx(0.1)


def test_loaders_are_seeded():
    dataset = LabelsOnly(range(50))
    first = drawn_labels(build_loader(dataset, batch_size=7, train=True, seed=5), epochs=1)
    again = drawn_labels(build_loader(dataset, batch_size=7, train=True, seed=5), epochs=1)
    other = drawn_labels(build_loader(dataset, batch_size=7, train=True, seed=6), epochs=1)
    in_order = drawn_labels(build_loader(dataset, batch_size=7, train=False, balanced=True), epochs=1)
    assert first == again != other and sorted(first) == list(range(50))
    assert in_order == list(range(50))  # eval: no shuffle and balanced ignored, every sample once


@pytest.mark.parametrize("balanced", [False, True])
def test_epoch_batches_give_processes_slices_of_the_same_global_batches(balanced):
    from finetune.data import EpochBatches
    dataset = LabelsOnly([0] * 9 + [1] * 3)
    single = EpochBatches(dataset, balanced=balanced, seed=3, global_batch=4)
    shards = [EpochBatches(dataset, balanced=balanced, seed=3, global_batch=4, rank=r, world_size=2)
              for r in range(2)]
    for batches in (single, *shards):
        batches.set_epoch(5)
    order = list(single)
    assert len(order) == 3 and [len(b) for b in shards[0]] == [2, 2, 2]
    for b in range(3):  # each global batch of 4 = rank 0's 2 samples + rank 1's 2 samples, seeds included
        assert list(shards[0])[b] + list(shards[1])[b] == order[b]
    single.set_epoch(6)
    assert list(single) != order  # a new epoch, a new order; the same epoch, the same order (resume)
    single.set_epoch(5)
    assert list(single) == order
    single.set_epoch(5, skip_batches=2)
    assert list(single) == order[2:] and len(single) == 1


@pytest.mark.parametrize("n", [17, 16, 13])
def test_every_process_gets_the_same_number_of_batches(n):
    from finetune.data import EpochBatches
    shards = [EpochBatches(LabelsOnly([0] * n), balanced=False, seed=0, global_batch=4, rank=r, world_size=2)
              for r in range(2)]
    counts = [len(list(s)) for s in shards]
    assert counts[0] == counts[1] == len(shards[0]) == len(shards[1])
    used = sum(len(b) for s in shards for b in s)
    assert n - used == (n % 4 if n % 4 < 2 else 0)  # only a last batch smaller than 2 images is dropped


def test_augmentation_depends_on_seed_epoch_and_position_not_on_workers():
    from finetune.data import SeededSamples, build_transforms
    transform = build_transforms({"mean": (0.5,) * 3, "std": (0.5,) * 3}, 16, "randaugment", train=True)

    class Images(LabelsOnly):
        def __getitem__(self, index):
            from PIL import Image
            return transform(Image.new("RGB", (20, 20), (index * 40 % 255, 90, 30))), self.targets[index]

    dataset = Images([0, 1, 0, 1, 0, 1])
    first = [t for images, _ in build_loader(dataset, batch_size=3, train=True, seed=1, workers=0) for t in images]
    again = [t for images, _ in build_loader(dataset, batch_size=3, train=True, seed=1, workers=2) for t in images]
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == 6
    torch.manual_seed(123)
    state = torch.get_rng_state()
    SeededSamples(dataset)[(0, 42)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is left as it was


def test_dataset_targets_maps_subsets_without_decoding():
    dataset = Undecodable([3, 1, 4, 1, 5])
    assert dataset_targets(dataset) == [3, 1, 4, 1, 5]
    assert dataset_targets(Subset(Subset(dataset, [4, 2, 0]), [0, 2])) == [5, 3]
    with pytest.raises(FinetuneError, match="list"):
        dataset_targets([(torch.zeros(1), 0)])


# --------------------------------------------------------------------------- torchvision offline
def refuse_download(self, *args, **kwargs):
    raise AssertionError("no download may be attempted while offline")


@pytest.mark.parametrize("env", ["FINETUNE_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_cifar10_is_one_line_error_naming_root(tmp_path, monkeypatch, env):
    monkeypatch.setenv(env, "1")
    monkeypatch.setattr(tvd.CIFAR10, "download", refuse_download)
    with pytest.raises(FinetuneError) as excinfo:
        build_datasets("cifar10", str(tmp_path), img_size=32, data_config=IMAGENET_CONFIG)
    message = one_line_error(excinfo)
    assert message.startswith(f"cifar10: not found under {tmp_path} and cannot download (offline)")
    assert str(tmp_path / "cifar-10-batches-py") in message


def test_a_failed_download_is_one_line_naming_the_dataset_root_and_why(tmp_path, monkeypatch):
    for env in ("FINETUNE_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(env, raising=False)

    def unreachable(self, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvd.OxfordIIITPet, "_download", unreachable)
    with pytest.raises(FinetuneError) as excinfo:
        build_datasets("oxford_pets", str(tmp_path), img_size=32, data_config=IMAGENET_CONFIG)
    message = one_line_error(excinfo)
    assert message.startswith("oxford_pets: not found under") and str(tmp_path) in message
    assert "the download of" in message and "name resolution" in message  # what failed and why


def test_download_false_never_downloads(tmp_path, monkeypatch):
    monkeypatch.delenv("FINETUNE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(tvd.Flowers102, "download", refuse_download)
    with pytest.raises(FinetuneError, match="flowers102: not found under .*flowers-102"):
        build_datasets("flowers102", str(tmp_path), img_size=32, data_config=IMAGENET_CONFIG, download=False)


# ------------------------------------------------------------------------------------- real data
def require_shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real-data test: {path} is absent (the ../shared data checkout is not beside the repo)")
    return path


def test_real_flowers5_split():
    root = require_shared("flowers5")
    splits = build_folder(root, val_split=0.15, test_split=0.15)
    assert splits.class_names == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 4317
    assert not any(".DS_Store" in path for path, _ in splits.train.dataset.samples)
    for split in (splits.train, splits.val, splits.test):
        assert set(dataset_targets(split)) == set(range(5))
    image, _ = splits.val[0]
    assert image.shape == (3, 16, 16)


def test_real_hymenoptera_presplit():
    root = require_shared("hymenoptera_data")
    splits = build_folder(root)
    assert (len(splits.train), len(splits.val), splits.test) == (245, 153, None)
    assert splits.class_names == ["ants", "bees"]
