"""`csv`: a manifest file that lists one image per row, as CSV, TSV or JSON Lines.

Layout. `data.root` is a `.csv` (comma-separated) or `.tsv` (tab-separated) file with a header
row, or a `.jsonl` file with one JSON object per line (blank lines are skipped):

    image,label,split                      {"image": "ants/0013035.jpg", "label": "ants", "split": "train"}
    ants/0013035.jpg,ants,train            {"image": "/photos/bee1.jpg", "label": ["bees"]}

- image column: `data.image_key`; default the first present of image, path, file, filename,
  filepath. A path relative to the manifest's folder, or absolute (`~` expanded).
- label column: `data.label_key`; default label.
- split column: `data.split_key`; default split, when that column is present. Values train, val
  (valid, validation) or test, in any case.

Rules
- Every bad input is a one-line FinetuneError naming the manifest and, for a row, its line in the
  file and its number among the image rows ("line 7 (row 6)").
- Every listed image must exist when the splits are built (one os.path.isfile each, nothing
  decoded): a missing one is an error naming the manifest, line and path, because a run that
  silently trains on part of its list is worse than one that does not start. An image that exists
  but cannot be decoded is skipped (None and one warning), as `imagefolder` does.
- Classes: `data.class_names` fixes them and their order; otherwise they are the distinct labels,
  sorted (numerically when every label is an integer, so 2 comes before 10).
- Integer labels: a label is first matched to a class by its text. When `data.class_names` is
  given, an integer that names no class is the 0-based index into it, so a 0/1 column with
  class_names [ants, bees] reads as ants/bees; without class_names, 0/1 labels are the classes
  "0" and "1", i.e. indices 0 and 1 (labels 0..K-1 keep their own index).
- Splits: with a split column, train and val rows must both be present and test is optional;
  `val_split`/`test_split` do not apply. Without one, the rows are cut stratified by class
  (`splits._stratified_split`) or, multi-label, by `splits.seeded_split`, both seeded: the same
  rows land in the same split on every run with the same seed.
- Single-label: a label is the whole cell, so class names may hold spaces ("Basset Hound"). A
  cell that is several classes joined by `data.label_separator` ("ants bees", where ants and bees
  are each in data.class_names or the whole label of other rows) or a JSON list of several labels
  is an error that says to set `task: multilabel`.
- Multi-label (`task: multilabel`): a CSV/TSV cell holds the names joined by
  `data.label_separator` (default a space); a JSONL value is a list of names (or such a joined
  string). A sample's target is a float32 multi-hot vector of len(class_names); the dataset has
  `label_sets` (a tuple of class indices per sample, read without decoding) instead of `targets`.
  An empty cell, [] or null is an image with no label (an all-zero target): negatives are data.

The label rules (`index_labels`, `multi_hot`, `cut_splits`) are shared with the `hf` source.
"""
from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from ..errors import FinetuneError
from .images import load_transformed
from .splits import DataSplits, _stratified_split, seeded_split

DELIMITERS = {".csv": ",", ".tsv": "\t"}
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl")
IMAGE_KEYS = ("image", "path", "file", "filename", "filepath")
LABEL_KEY = "label"
SPLIT_KEY = "split"
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_INTEGER = re.compile(r"[+-]?[0-9]+")
_SHOWN_COLUMNS = 20  # a message lists at most this many of a manifest's columns


# ------------------------------------------------------------------------------------- dataset
class ManifestImages(Dataset):
    """One split's images: `samples` [(path, target)], and `targets` (single-label) or `label_sets`."""

    def __init__(self, paths: Sequence[str], labels: Sequence[Tuple[int, ...]], num_classes: int,
                 multilabel: bool, transform: Optional[Callable] = None):
        self.paths = list(paths)
        self.num_classes, self.multilabel, self.transform = num_classes, multilabel, transform
        if multilabel:
            self.label_sets = [tuple(label) for label in labels]
        else:
            self.targets = [label[0] for label in labels]

    @property
    def samples(self) -> List[Tuple[str, Any]]:
        return list(zip(self.paths, self.label_sets if self.multilabel else self.targets))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        image = load_transformed(path, self.transform)
        return None if image is None else (image, self.target(index))

    def target(self, index: int):
        if self.multilabel:
            return multi_hot(self.label_sets[index], self.num_classes)
        return self.targets[index]


def multi_hot(indices: Sequence[int], num_classes: int) -> torch.Tensor:
    target = torch.zeros(num_classes, dtype=torch.float32)
    target[list(indices)] = 1.0
    return target


# --------------------------------------------------------------------------------------- build
@dataclass(frozen=True)
class _Row:
    line: int
    image: str  # the path as resolved (absolute, or relative to the current directory)
    labels: Tuple[str, ...]
    split: Optional[str]  # train, val or test; None without a split column


def build(request) -> DataSplits:
    manifest = _manifest_path(request.root)
    columns, records = read_manifest(manifest)
    options = request.options
    image_key = _choose_column(manifest, columns, options.image_key, IMAGE_KEYS, "image", "image_key")
    label_key = _choose_column(manifest, columns, options.label_key, (LABEL_KEY,), "label", "label_key")
    split_key = _split_column(manifest, columns, options.split_key)
    rows = [_row(manifest, _where(manifest, line, number), line, record, image_key, label_key, split_key, options)
            for number, (line, record) in enumerate(records, 1)]
    names, indices = index_labels([row.labels for row in rows], str(manifest),
                                  lambda i: _where(manifest, rows[i].line, i + 1), label_key, options,
                                  text_labels=True)
    by_split = _rows_by_split(manifest, rows, split_key) if split_key else None
    return _splits(manifest, rows, indices, names, by_split, request)


def _manifest_path(root) -> Path:
    if root is None:
        raise FinetuneError("data.dataset csv: no data.root given; expected a .csv, .tsv or .jsonl manifest")
    path = Path(root).expanduser()
    if path.suffix.lower() not in MANIFEST_SUFFIXES:
        raise FinetuneError(f"{path}: unknown manifest extension {path.suffix or '(none)'!r}; data.dataset csv "
                            f"reads {', '.join(MANIFEST_SUFFIXES)} files (a folder of class folders is imagefolder)")
    if path.is_dir():
        raise FinetuneError(f"{path}: is a folder; data.dataset csv expects a {path.suffix} manifest file")
    if not path.is_file():
        raise FinetuneError(f"{path}: manifest not found; expected a {path.suffix} file listing one image per row")
    return path


# --------------------------------------------------------------------------------- reading rows
def read_manifest(path: Path) -> Tuple[List[str], List[Tuple[int, Dict[str, Any]]]]:
    """(columns, [(line number, row as a dict)]) of a .csv/.tsv/.jsonl manifest; never an empty list."""
    try:
        if path.suffix.lower() == ".jsonl":
            columns, records = _read_jsonl(path)
        else:
            columns, records = _read_delimited(path, DELIMITERS[path.suffix.lower()])
    except UnicodeDecodeError as e:
        raise FinetuneError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); "
                            "save the manifest as UTF-8") from None
    except OSError as e:
        raise FinetuneError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    if not records:
        raise FinetuneError(f"{path}: empty manifest: no image rows{' after the header' if columns else ''}; "
                            f"expected one row per image with an image and a label column")
    return columns, records


def _read_delimited(path: Path, delimiter: str):
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark is not a column name
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = [name.strip() for name in next((row for row in reader if any(f.strip() for f in row)), [])]
            _check_header(path, header)
            records = []
            for fields in reader:
                if not any(field.strip() for field in fields):
                    continue
                if len(fields) > len(header):
                    raise FinetuneError(f"{path}: line {reader.line_num}: {len(fields)} fields but the header has "
                                        f"{len(header)} ({', '.join(header)}); quote fields that hold a "
                                        f"{'comma' if delimiter == ',' else 'tab'}")
                records.append((reader.line_num, dict(zip(header, fields))))
        except csv.Error as e:
            raise FinetuneError(f"{path}: line {reader.line_num}: not valid {path.suffix[1:].upper()} ({e})") from None
    return header, records


def _check_header(path: Path, header: List[str]) -> None:
    repeated = [name for name, count in Counter(header).items() if count > 1]
    if repeated:
        raise FinetuneError(f"{path}: the header names column {repeated[0]!r} twice; every column needs its own name")


def _read_jsonl(path: Path):
    records = []
    with open(path, encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, 1):
            if line.strip():
                records.append((line_number, _json_object(path, line_number, line)))
    columns = list(dict.fromkeys(key for _, record in records for key in record))
    return columns, records


def _json_object(path: Path, line_number: int, line: str) -> Dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise FinetuneError(f"{path}: line {line_number}: not valid JSON ({e.msg} at column {e.colno}); "
                            f"expected one JSON object per line") from None
    except (ValueError, RecursionError) as e:  # a 5000-digit integer, nesting deeper than the stack
        raise FinetuneError(f"{path}: line {line_number}: not readable JSON ({type(e).__name__}); "
                            f"expected one JSON object per line") from None
    if not isinstance(record, dict):
        raise FinetuneError(f"{path}: line {line_number}: a JSON {type(record).__name__}, not an object; "
                            'expected one object per line such as {"image": "ants/1.jpg", "label": "ants"}')
    return record


# ---------------------------------------------------------------------------------- the columns
def _choose_column(path: Path, columns: List[str], wanted: Optional[str], defaults: Sequence[str],
                   what: str, recipe_key: str) -> str:
    if wanted is not None:
        if wanted in columns:
            return wanted
        raise FinetuneError(f"{path}: no column {wanted!r} (data.{recipe_key}); columns present: {_shown(columns)}")
    found = next((name for name in defaults if name in columns), None)
    if found is None:
        raise FinetuneError(f"{path}: no {what} column: expected {' or '.join(defaults)}, or set data.{recipe_key} "
                            f"to one of the columns present: {_shown(columns)}")
    return found


def _split_column(path: Path, columns: List[str], wanted: Optional[str]) -> Optional[str]:
    if wanted is None:
        return SPLIT_KEY if SPLIT_KEY in columns else None
    return _choose_column(path, columns, wanted, (), "split", "split_key")


def _shown(columns: Sequence[str]) -> str:
    if not columns:
        return "(none)"
    shown = ", ".join(repr(name) for name in columns[:_SHOWN_COLUMNS])
    return shown + (f" and {len(columns) - _SHOWN_COLUMNS} more" if len(columns) > _SHOWN_COLUMNS else "")


def _where(manifest: Path, line: int, number: int) -> str:
    """A row in messages: its line in the file (what an editor shows) and its number among the image rows."""
    return f"{manifest}: line {line} (row {number})"


def _row(manifest: Path, where: str, line: int, record: Dict[str, Any], image_key: str, label_key: str,
         split_key: Optional[str], options) -> _Row:
    image = _image_path(manifest, where, record.get(image_key), image_key)
    labels = parse_labels(record.get(label_key), where, label_key, options.multilabel, options.label_separator)
    split = _split_value(where, record.get(split_key), split_key) if split_key else None
    return _Row(line, image, labels, split)


def _image_path(manifest: Path, where: str, value: Any, image_key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise FinetuneError(f"{where}: no image path in column {image_key!r} (got {value!r}); "
                            "expected a path relative to the manifest's folder, or absolute")
    path = os.path.join(manifest.parent, os.path.expanduser(value.strip()))  # an absolute value wins the join
    if not os.path.isfile(path):
        raise FinetuneError(f"{where}: image {value.strip()!r} not found (looked for {path}); paths are relative to "
                            f"the manifest's folder {manifest.parent}, or absolute")
    return path


def _split_value(where: str, value: Any, split_key: str) -> str:
    split = SPLIT_NAMES.get(str(value).strip().lower()) if isinstance(value, (str, int)) else None
    if split is None:
        raise FinetuneError(f"{where}: split {value!r} in column {split_key!r} is not one of "
                            f"{', '.join(SPLIT_NAMES)}")
    return split


# --------------------------------------------------------------------- labels (shared with hf)
def parse_labels(value: Any, where: str, label_key: str, multilabel: bool, separator: str) -> Tuple[str, ...]:
    """The label texts of one cell: a string (multi-label: joined by `separator`), an integer, a list of
    those, or nothing (None). Each once, in order; single-label cells are checked later by `index_labels`."""
    if value is None:
        items: List[Any] = []
    elif isinstance(value, list):
        items = value
    elif isinstance(value, str):
        items = split_joined(value, separator) if multilabel else [value]
    else:
        items = [value]
    labels = [_label_text(item, where, label_key) for item in items]
    return tuple(dict.fromkeys(label for label in labels if label))


def split_joined(text: str, separator: str) -> List[str]:
    return [piece.strip() for piece in text.split(separator) if piece.strip()]


def _label_text(item: Any, where: str, label_key: str) -> str:
    if isinstance(item, bool) or not isinstance(item, (str, int)):
        raise FinetuneError(f"{where}: label {item!r} in column {label_key!r} is a {type(item).__name__}; "
                            "expected a class name or an integer (multi-label: a list of those)")
    return str(item).strip()


def index_labels(labels: Sequence[Tuple[str, ...]], source: str, where: Callable[[int], str], label_key: str,
                 options, text_labels: bool,
                 known_names: Optional[Sequence[str]] = None) -> Tuple[List[str], List[Tuple[int, ...]]]:
    """(class names, each row's class indices) by the rules of this module's docstring.

    `source` names the data and `where(i)` its row i in messages; `known_names` (a ClassLabel's names)
    is the class order when data.class_names is not given; `text_labels` says that a label may be
    several names joined by the separator (free text, not a ClassLabel), which single-label runs refuse.
    """
    fixed = _fixed_class_names(options.class_names)
    if not options.multilabel:
        _check_one_label_each(labels, where, label_key, options.label_separator if text_labels else None, fixed)
    names = fixed or list(known_names or sorted_classes({label for row in labels for label in row}))
    if not names:
        raise FinetuneError(f"{source}: no labels at all in column {label_key!r}; expected class names (or integers) "
                            "for at least some images")
    lookup = _ClassLookup(names, by_position=fixed is not None)
    indices = []
    for i, row in enumerate(labels):
        found = tuple(lookup(label) for label in row)
        if None in found:
            label = row[found.index(None)]
            raise FinetuneError(f"{where(i)}: label {label!r} in column {label_key!r} is not one of data.class_names "
                                f"({_shown(names)}) nor an index 0..{len(names) - 1} into them")
        indices.append(tuple(sorted(set(found))))
    return names, indices


def _fixed_class_names(class_names: Optional[Sequence[str]]) -> Optional[List[str]]:
    if not class_names:
        return None
    names = [str(name).strip() for name in class_names]
    if len(set(names)) != len(names) or not all(names):
        raise FinetuneError(f"data.class_names: {list(class_names)!r} must be distinct, non-empty names")
    return names


def _check_one_label_each(labels, where, label_key: str, separator: Optional[str], fixed) -> None:
    known = set(fixed) if fixed else {row[0] for row in labels if len(row) == 1}
    for i, row in enumerate(labels):
        if not row:
            raise FinetuneError(f"{where(i)}: no label in column {label_key!r}; every image needs one "
                                "(task: multilabel allows images without labels)")
        pieces = split_joined(row[0], separator) if separator and len(row) == 1 else list(row)
        if len(pieces) > 1 and (len(row) > 1 or (row[0] not in (fixed or ()) and set(pieces) <= known)):
            raise FinetuneError(f"{where(i)}: {len(pieces)} labels ({', '.join(pieces)}) in column {label_key!r} "
                                "for one image; set task: multilabel to train on several labels per image")


def sorted_classes(labels) -> List[str]:
    """Distinct labels sorted as text, or as numbers when every one is an integer (2 before 10)."""
    if labels and all(_INTEGER.fullmatch(label) for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))
    return sorted(labels)


class _ClassLookup:
    """Label text -> class index: by name, else (data.class_names given) an integer as the index."""

    def __init__(self, names: Sequence[str], by_position: bool):
        self.index = {name: i for i, name in enumerate(names)}
        self.count, self.by_position = len(names), by_position

    def __call__(self, label: str) -> Optional[int]:
        if label in self.index:
            return self.index[label]
        if self.by_position and _INTEGER.fullmatch(label) and 0 <= int(label) < self.count:
            return int(label)
        return None


# ------------------------------------------------------------------------------------- splits
def _rows_by_split(manifest: Path, rows: List[_Row], split_key: str) -> Dict[str, List[int]]:
    by_split: Dict[str, List[int]] = {"train": [], "val": [], "test": []}
    for i, row in enumerate(rows):
        by_split[row.split].append(i)
    for required in ("train", "val"):
        if not by_split[required]:
            present = sorted(split for split, members in by_split.items() if members)
            raise FinetuneError(f"{manifest}: no {required} rows in split column {split_key!r} (only "
                                f"{', '.join(present)}); a split column needs train and val rows (test is optional), "
                                "or leave it out to cut val by data.val_split")
    return by_split


def cut_splits(labels: Sequence[Tuple[int, ...]], names: Sequence[str], multilabel: bool, val_split: float,
               test_split: float, seed: int, source: str) -> Tuple[List[int], List[int], List[int]]:
    """Row indices (train, val, test) cut from rows that came without splits: stratified by class
    (single-label), by a seeded permutation (multi-label); the same on every run with that seed."""
    if multilabel:
        return seeded_split(len(labels), val_split, test_split, seed)
    targets = [label[0] for label in labels]
    small = [(names[target], count) for target, count in sorted(Counter(targets).items()) if count < 2]
    if small:
        name, count = small[0]
        raise FinetuneError(f"{source}: class {name!r} has {count} image; a stratified split into train and val "
                            "needs at least 2 of each class: add images of it or give the splits yourself")
    return _stratified_split(targets, val_split, test_split, seed, source)


def _splits(manifest: Path, rows: List[_Row], indices, names, by_split, request) -> DataSplits:
    multilabel = request.options.multilabel
    if by_split is None:
        train, val, test = cut_splits(indices, names, multilabel, request.val_split, request.test_split,
                                      request.seed, str(manifest))
        by_split = {"train": train, "val": val, "test": test}
    train_tf, eval_tf = request.transforms

    def images(members: List[int], transform) -> Optional[ManifestImages]:
        if not members:
            return None
        return ManifestImages([rows[i].image for i in members], [indices[i] for i in members], len(names),
                              multilabel, transform)

    return DataSplits(train=images(by_split["train"], train_tf), val=images(by_split["val"], eval_tf),
                      test=images(by_split["test"], eval_tf), class_names=list(names))
