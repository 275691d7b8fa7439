"""`hf`: a Hugging Face `datasets` dataset: a hub id, a `save_to_disk` folder, or parquet files.

`data.root` is one of the following; a path that exists is read as a path, anything else of the
form `org/name` (or `name`) as a hub id.
- a hub id, `org/name`: read by `datasets.load_dataset`, so the Hugging Face cache (HF_HOME,
  HF_DATASETS_CACHE, read when the splits are built) and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE /
  FINETUNE_OFFLINE apply. Offline, `load_dataset` reads the prepared copy an earlier online load
  left in the datasets cache (`<HF_HOME>/datasets/org___name/<config>/<version>/<hash>/`). When
  there is none but the hub cache holds the repo's files (`<HF_HOME>/hub/datasets--org--name/
  snapshots/<rev>/`, as `hf download --repo-type dataset org/name` leaves them), those are read.
- a folder written by `save_to_disk`: a DatasetDict (its splits) or a single Dataset (one pool).
- parquet: a folder (splits named by the library's rule for file and folder names: `train-*.parquet`,
  `data/validation-00000-of-00001.parquet`, `test/...`), one `.parquet` file (one pool), or a glob
  such as `shards/*.parquet`, whose files go to the split their name says (the library's split
  keywords: train, validation/valid/val/dev, test/eval ...), the unnamed ones to train.

Splits: train; validation, val or valid; test (other splits, e.g. `unsupervised`, are not read). A
dataset with a single split, whatever its name, is one pool. A missing val split is cut from train
by `data.val_split`, and test too (by `data.test_split`) when the dataset has no test split either;
stratified by class and seeded (multi-label: `seeded_split`), so the same rows land in the same
split on every run. Splits the dataset has are used as they are.

Columns: `data.image_key` (default image, or img), `data.label_key` (default label, or labels).
- The image column is an `Image` feature, or paths / {bytes, path} cells (relative paths: against
  the root folder). It is decoded per item, never while building the splits: made RGB, then
  transformed; an undecodable image is None and one warning, as `imagefolder` does.
- Labels are read from the arrow column, without decoding an image. A `ClassLabel` names the
  classes, in its order (-1 is "no label", as in the library); strings and integers follow the
  csv source's rules (manifest.py): classes sorted, integers numerically, `data.class_names` fixes
  them and an integer that names none of them is an index into them.
- Multi-label (`task: multilabel`): a `Sequence(ClassLabel)` column, or lists of strings/integers.
  Targets are float32 multi-hot vectors and the dataset has `label_sets` instead of `targets`.

`HFImages` (one per split) pickles by reference to the library's memory-mapped arrow files, so
DataLoader workers do not copy the images.
"""
from __future__ import annotations

import contextlib
import glob
import io
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image
from torch.utils.data import Dataset

from ..download import _truthy, offline
from ..errors import FinetuneError
from ..hubs import hf_cache_dir
from .images import _warn_unreadable_once
from .manifest import SPLIT_NAMES, _choose_column, cut_splits, index_labels, multi_hot, parse_labels
from .splits import DataSplits

IMAGE_KEYS = ("image", "img")
LABEL_KEYS = ("label", "labels")
INSTALL_HINT = "pip install 'finetune[hf]'"
ROOT_FORMS = "a hub id (org/name), a save_to_disk folder, or parquet files (a folder, a .parquet file or a glob)"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_REASON_CHARS = 300  # of a library's own message quoted in ours


# ------------------------------------------------------------------------------------- dataset
class HFImages(Dataset):
    """Rows `rows` of a `datasets.Dataset`: (image, target) decoded per item; `targets` or `label_sets`."""

    def __init__(self, table, image_key: str, rows: Sequence[int], labels: Sequence[Tuple[int, ...]], *,
                 num_classes: int, multilabel: bool, transform: Optional[Callable], name: str,
                 base_dir: Optional[str] = None):
        self.table = table  # the image column alone, as {bytes, path} cells (decode=False)
        self.image_key, self.rows, self.name, self.base_dir = image_key, list(rows), name, base_dir
        self.num_classes, self.multilabel, self.transform = num_classes, multilabel, transform
        if multilabel:
            self.label_sets = [tuple(label) for label in labels]
        else:
            self.targets = [label[0] for label in labels]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        try:
            image = self.image(index)
        except FinetuneError as e:
            _warn_unreadable_once(e, self.source_of(index))
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, self.target(index)

    def target(self, index: int):
        if self.multilabel:
            return multi_hot(self.label_sets[index], self.num_classes)
        return self.targets[index]

    def image_path(self, index: int) -> Optional[str]:
        """The path stored with image `index` (its file name when it was read from one), else None."""
        cell = self._cell(index)
        return cell.get("path") if isinstance(cell, dict) else None

    def source_of(self, index: int) -> str:
        path = self.image_path(index)
        return f"{self.name} row {self.rows[index]}" + (f" ({path})" if path else "")

    def image(self, index: int) -> Image.Image:
        """Image `index` decoded as RGB, or a one-line FinetuneError naming it."""
        cell = self._cell(index)
        data, path = (cell.get("bytes"), cell.get("path")) if isinstance(cell, dict) else (None, None)
        if not data and not path:
            raise FinetuneError(f"{self.source_of(index)}: no image in column {self.image_key!r}")
        try:
            with Image.open(io.BytesIO(data) if data else self._local(path)) as image:
                return image.convert("RGB")
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... for damaged data: skip it
            raise FinetuneError(f"{self.source_of(index)}: cannot read image ({type(e).__name__}: {e}); "
                                "expected an image the Pillow library decodes") from None

    def _cell(self, index: int):
        return self.table[self.rows[index]][self.image_key]

    def _local(self, path: str) -> str:
        if self.base_dir and not os.path.isabs(path) and os.path.exists(os.path.join(self.base_dir, path)):
            return os.path.join(self.base_dir, path)
        return path


# --------------------------------------------------------------------------------------- build
def build(request) -> DataSplits:
    _datasets()
    if request.root is None:
        raise FinetuneError(f"data.dataset hf: no data.root given; expected {ROOT_FORMS}")
    source, parts = read_dataset(str(request.root))
    named = _named_splits(source, parts)
    image_key, label_key = _columns(source, named, request.options)
    tables = {split: _image_table(source, part, image_key) for split, part in named.items()}
    names, labels = _labels(source, named, label_key, request.options)
    return _splits(source, tables, labels, names, image_key, request)


def _columns(source: str, named: Dict[str, Any], options) -> Tuple[str, str]:
    """The image and label columns, chosen in train and present in every split."""
    columns = named["train"].column_names
    image_key = _choose_column(source, columns, options.image_key, IMAGE_KEYS, "image", "image_key")
    label_key = _choose_column(source, columns, options.label_key, LABEL_KEYS, "label", "label_key")
    for split, part in named.items():
        for key, recipe_key in ((image_key, "image_key"), (label_key, "label_key")):
            _choose_column(f"{source} [{split}]", part.column_names, key, (), "", recipe_key)
    return image_key, label_key


def _labels(source: str, named: Dict[str, Any], label_key: str, options):
    """(class names, {split: each row's class indices}), all splits indexed together by one rule."""
    class_label = _class_label(source, named, label_key)
    raw = {split: _raw_labels(source, split, part, label_key, options, class_label) for split, part in named.items()}
    flat = [(split, row) for split in named for row in range(len(raw[split]))]
    names, indices = index_labels([raw[split][row] for split, row in flat], source,
                                  lambda k: f"{source} [{flat[k][0]}] row {flat[k][1]}", label_key, options,
                                  text_labels=class_label is None,
                                  known_names=class_label.names if class_label is not None else None)
    labels: Dict[str, List[Tuple[int, ...]]] = {split: [] for split in named}
    for (split, _), label in zip(flat, indices):
        labels[split].append(label)
    return names, labels


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise FinetuneError(f"data.dataset hf needs the Hugging Face datasets package, which is not installed "
                            f"({e}); install it with {INSTALL_HINT}") from None
    return datasets


def _splits(source: str, tables: Dict[str, Any], labels: Dict[str, List[Tuple[int, ...]]], names: List[str],
            image_key: str, request) -> DataSplits:
    """Each split as (the split its rows are in, rows, labels); the splits the dataset lacks are cut
    from its train rows."""
    parts = {split: (split, list(range(len(tables[split]))), labels[split]) for split in tables}
    if "val" not in parts:
        train_labels = labels["train"]
        test_split = request.test_split if "test" not in parts else 0.0
        cut = cut_splits(train_labels, names, request.options.multilabel, request.val_split, test_split,
                         request.seed, source)
        for split, members in zip(("train", "val", "test"), cut):
            if members:
                parts[split] = ("train", members, [train_labels[i] for i in members])
    base_dir = _base_dir(source)
    train_tf, eval_tf = request.transforms

    def images(split: str, transform) -> Optional[HFImages]:
        if split not in parts:
            return None
        origin, rows, split_labels = parts[split]
        return HFImages(tables[origin], image_key, rows, split_labels,
                        num_classes=len(names), multilabel=request.options.multilabel, transform=transform,
                        name=f"{source} [{origin}]", base_dir=base_dir)

    return DataSplits(train=images("train", train_tf), val=images("val", eval_tf), test=images("test", eval_tf),
                      class_names=list(names))


def _base_dir(source: str) -> Optional[str]:
    """The local folder relative image paths in the cells are read against (None for a hub id or a glob)."""
    path = Path(source)
    return str(path.parent if path.is_file() else path) if path.exists() else None


# ------------------------------------------------------------------------------------ reading
def read_dataset(root: str) -> Tuple[str, Dict[str, Any]]:
    """(the name messages use, {split name: datasets.Dataset}) of `root`, by the forms of the docstring."""
    path = Path(root).expanduser()
    if path.is_dir():
        return str(path), (_load_saved(path) if _is_saved(path) else _load_parquet_folder(path))
    if path.is_file():
        if path.suffix.lower() != ".parquet":
            raise FinetuneError(f"{path}: not a .parquet file; data.dataset hf reads {ROOT_FORMS} "
                                "(a .csv, .tsv or .jsonl manifest is data.dataset csv)")
        return str(path), _load_parquet({"train": [str(path)]}, str(path))
    if glob.has_magic(root):
        return root, _load_parquet_glob(root)
    hub_id = _hub_id(root)
    if hub_id is None:
        raise FinetuneError(f"{root}: no such folder or file, nor a Hugging Face hub id; expected {ROOT_FORMS}")
    return hub_id, _load_hub(hub_id)


def _is_saved(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_saved(path: Path) -> Dict[str, Any]:
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # the library's errors for a damaged folder are of many types: one line each
        raise FinetuneError(f"{path}: cannot read the save_to_disk folder ({_reason(e)}); "
                            "expected a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk") from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"": loaded}


def _load_parquet_folder(path: Path) -> Dict[str, Any]:
    if not any(path.rglob("*.parquet")):
        raise FinetuneError(f"{path}: neither a save_to_disk folder (no dataset_dict.json or state.json) nor a "
                            f"folder of .parquet files; data.dataset hf reads {ROOT_FORMS}")
    return _load_parquet(None, str(path), data_dir=str(path))


def _load_parquet_glob(pattern: str) -> Dict[str, Any]:
    files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
    if not files:
        raise FinetuneError(f"{pattern}: the glob matches no files; expected it to match .parquet files")
    others = [f for f in files if not f.lower().endswith(".parquet")]
    if others:
        raise FinetuneError(f"{pattern}: the glob matches {others[0]}, which is not a .parquet file; "
                            "narrow it to .parquet files (e.g. shards/*.parquet)")
    by_split: Dict[str, List[str]] = {}
    for file in files:
        by_split.setdefault(_split_named_by(file), []).append(file)
    return _load_parquet(by_split, pattern)


def _split_named_by(file: str) -> str:
    """The split a parquet file's name (or its folder's) says, by the library's split keywords; else train."""
    from datasets.data_files import SPLIT_KEYWORDS
    path = Path(file)
    for name in (path.name, path.parent.name):
        words = set(re.split(r"[-._ 0-9]+", name.lower()))
        for split, keywords in SPLIT_KEYWORDS.items():
            if words & set(keywords):
                return str(split)
    return "train"


def _load_parquet(data_files: Optional[Dict[str, List[str]]], source: str, data_dir: Optional[str] = None):
    datasets = _datasets()
    try:
        with _offline_as_the_environment_says():
            return dict(datasets.load_dataset("parquet", data_files=data_files, data_dir=data_dir,
                                              cache_dir=str(datasets_cache_dir())))
    except Exception as e:  # a damaged file or mismatched schemas raise arrow's or the library's own types
        raise FinetuneError(f"{source}: cannot read the parquet files ({_reason(e)}); expected parquet files "
                            "of one schema, with an image and a label column") from None


def _hub_id(root: str) -> Optional[str]:
    """`root` as a hub id, else None. recipes.resolve_path turns a relative data.root that is no path into
    <current directory>/root, so a hub id from a recipe may arrive that way: it is read back from it."""
    candidates = [root]
    if os.path.isabs(root):
        candidates.append(os.path.relpath(root, os.getcwd()).replace(os.sep, "/"))
    return next((candidate for candidate in candidates if HUB_ID.fullmatch(candidate)), None)


def _load_hub(hub_id: str) -> Dict[str, Any]:
    datasets = _datasets()
    with _offline_as_the_environment_says():
        try:
            return dict(datasets.load_dataset(hub_id, cache_dir=str(datasets_cache_dir())))
        except Exception as e:  # not cached offline, unknown, gated...: the library's many types, one line here
            reason = _reason(e)
        snapshot = _hub_snapshot(hub_id)
        if snapshot is not None:
            try:
                return dict(datasets.load_dataset(snapshot, cache_dir=str(datasets_cache_dir())))
            except Exception as e:
                reason = f"{reason}; its files in the hub cache ({snapshot}) neither: {_reason(e)}"
    where = "offline (HF_HUB_OFFLINE=1 or FINETUNE_OFFLINE=1), so it must be in the HF cache" if _offline_now() \
        else "nor in the HF cache"
    raise FinetuneError(f"{hub_id}: cannot load the Hugging Face dataset ({reason}); {where} "
                        f"({datasets_cache_dir()} or {hf_cache_dir()}), or give a save_to_disk folder or parquet files")


def _hub_snapshot(hub_id: str) -> Optional[str]:
    """The folder of `hub_id`'s files in the hub cache (what `hf download` leaves), without any network."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(hub_id, repo_type="dataset", local_files_only=True, cache_dir=str(hf_cache_dir()))
    except Exception:  # not in the cache (the library raises its LocalEntryNotFoundError or others)
        return None


def datasets_cache_dir() -> Path:
    """HF_DATASETS_CACHE, else <HF_HOME>/datasets, as the environment says now (the library reads them
    once, at its import, and a test or notebook may point HF_HOME elsewhere later)."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(hf_home).expanduser() / "datasets"


def _offline_now() -> bool:
    return offline() or _truthy(os.environ.get("HF_DATASETS_OFFLINE"))


@contextlib.contextmanager
def _offline_as_the_environment_says():
    """datasets and huggingface_hub read HF_HUB_OFFLINE once, at import; the environment now
    (FINETUNE_OFFLINE=1 or HF_HUB_OFFLINE=1) wins, so an offline run never waits on the network."""
    if not _offline_now():
        yield
        return
    import datasets.config
    import huggingface_hub.constants
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split()) or "no message"
    text = text if len(text) <= _REASON_CHARS else text[:_REASON_CHARS] + "..."
    return f"{type(error).__name__}: {text}"


# ------------------------------------------------------------------------------------- splits
def _named_splits(source: str, parts: Dict[str, Any]) -> Dict[str, Any]:
    """{train, val, test: Dataset} from the dataset's own split names; a single split is the train pool."""
    parts = {name: part for name, part in parts.items() if len(part)}
    if not parts:
        raise FinetuneError(f"{source}: the dataset has no rows; expected images with labels")
    if len(parts) == 1:
        return {"train": next(iter(parts.values()))}
    named: Dict[str, Any] = {}
    own_names: Dict[str, str] = {}
    for name, part in parts.items():
        ours = SPLIT_NAMES.get(name.lower())
        if ours in named:
            raise FinetuneError(f"{source}: splits {own_names[ours]!r} and {name!r} are both {ours}; keep one")
        if ours is not None:
            named[ours], own_names[ours] = part, name
    if "train" not in named:
        raise FinetuneError(f"{source}: no train split among {', '.join(sorted(parts))}; expected train, "
                            "validation (val, valid) and test")
    return named


def _image_table(source: str, part, image_key: str):
    datasets = _datasets()
    table = part.select_columns([image_key])
    try:
        return table.cast_column(image_key, datasets.Image(decode=False))
    except Exception as e:  # a column of numbers, say: arrow cannot cast it to {bytes, path}
        raise FinetuneError(f"{source}: column {image_key!r} is {part.features[image_key]}, not images "
                            f"({_reason(e)}); expected an Image feature, image paths or {{bytes, path}} cells "
                            "(set data.image_key)") from None


# ------------------------------------------------------------------------------------- labels
def _class_label(source: str, named: Dict[str, Any], label_key: str):
    """The label column's ClassLabel (inside a Sequence for multi-label), the same in every split, else None."""
    found = {split: _inner_class_label(part.features[label_key]) for split, part in named.items()}
    train = found["train"]
    for split, class_label in found.items():
        if (class_label is None) != (train is None) or (train is not None and class_label.names != train.names):
            raise FinetuneError(f"{source}: the {split} split's label column {label_key!r} has classes "
                                f"{_names(class_label)}, the train split's {_names(train)}; every split needs the same")
    return train


def _inner_class_label(feature):
    datasets = _datasets()
    inner = getattr(feature, "feature", feature)  # List(ClassLabel) / Sequence(ClassLabel): the ClassLabel inside
    return inner if isinstance(inner, datasets.ClassLabel) else None


def _names(class_label) -> str:
    return "(no ClassLabel)" if class_label is None else str(class_label.names[:5])


def _raw_labels(source: str, split: str, part, label_key: str, options, class_label) -> List[Tuple[str, ...]]:
    """Every row's label texts, read from the arrow column alone (no image is decoded)."""
    _check_label_feature(source, part.features[label_key], label_key)
    values = part.with_format("arrow")[label_key].to_pylist()
    if class_label is not None:
        values = [_class_names_of(source, split, row, value, class_label, label_key)
                  for row, value in enumerate(values)]
    return [parse_labels(value, f"{source} [{split}] row {row}", label_key, options.multilabel, options.label_separator)
            for row, value in enumerate(values)]


def _check_label_feature(source: str, feature, label_key: str) -> None:
    datasets = _datasets()
    inner = getattr(feature, "feature", feature)
    if isinstance(inner, datasets.ClassLabel):
        return
    dtype = getattr(inner, "dtype", "")
    if isinstance(inner, datasets.Value) and (dtype in ("string", "large_string") or re.fullmatch(r"u?int\d+", dtype)):
        return
    raise FinetuneError(f"{source}: label column {label_key!r} is {feature}; expected a ClassLabel, strings or "
                        "integers (multi-label: a Sequence of those), or set data.label_key")


def _class_names_of(source: str, split: str, row: int, value, class_label, label_key: str):
    """A ClassLabel value (or list of them) as class names; -1, the library's "no label", as None."""
    if isinstance(value, list):
        return [_class_names_of(source, split, row, item, class_label, label_key) for item in value
                if item is not None and item != -1]
    if value is None or value == -1:
        return None
    if not 0 <= value < class_label.num_classes:
        raise FinetuneError(f"{source} [{split}] row {row}: label {value} in column {label_key!r} is outside its "
                            f"ClassLabel's {class_label.num_classes} classes")
    return class_label.names[value]
