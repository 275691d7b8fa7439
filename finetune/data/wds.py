"""`webdataset`: tar shards, in a local folder or over http(s), streamed.

Layout
------
`data.root` is a folder or an http(s) URL holding `_info.json` in timm's format, with the class
names as a top-level `classes` list:

    {"classes": ["ants", "bees"],
     "splits": {"train": {"name": "train", "filenames": ["train-000000.tar", "train-000001.tar"],
                          "shard_lengths": [123, 122], "num_samples": 245},
                "val": {...}, "test": {...}}}

`splits` may also be a list of those split objects; `validation` stands for `val`; `test` is
optional; shard names are resolved relative to `data.root`. Without `classes`, a `classes.txt`
beside `_info.json` (one name per line) or `data.class_names` names them. A local folder may
instead hold `train-*.tar`, `val-*.tar`, `test-*.tar` and `classes.txt`: its samples are then
counted from the tar headers. The splits are the shards' own: `val_split`/`test_split` do not apply.

A sample is the files of one key: `KEY.jpg` (or `.jpeg`, `.png`, `.webp`, any image extension;
`data.image_key` names others, `jpg;png` several: the first present wins) and its label,
`KEY.cls` (a class index as text) or `KEY.json` `{"label": index or name}` (`data.label_key`
names another field). `task: multilabel` reads `{"label": [names or indices]}` into a float32
multi-hot target. `data.class_names` fixes the classes and their order; index labels then still
refer to the data's own class list, when it has one.

Training: one epoch of one process
----------------------------------
1. The shards are shuffled with `random.Random(seed + epoch)` and concatenated: stream positions
   0..N-1, N the split's count in `_info.json` (or counted).
2. Rank r of W reads the contiguous positions [r*N/W, (r+1)*N/W) (shares differ by at most one):
   only the shards its share overlaps, skipping into the first one without decoding. So every
   sample is in one rank's share: each is trained on exactly once an epoch, none is dropped or
   repeated. (webdataset's `split_by_node`/`split_by_worker` deal whole shards, which leaves ranks
   with unequal counts whenever the shards do not divide evenly; we need the counts exactly.)
3. The share passes, undecoded, through a shuffle buffer of SHUFFLE_BUFFER samples (webdataset's
   `shuffle` with `random.Random(f"{seed + epoch}/{rank}")`), filled before the first sample leaves.
4. Equal steps: every rank yields ceil(ceil(N/W) / (batch_size/W)) batches, computed from the
   counts. A rank whose share is one sample smaller may end on a shorter batch, or an empty one,
   which the engine runs as a zero-weight step (as it runs a batch of unreadable images): the
   ranks' collectives line up and nothing hangs. A shard holding other than its count stops the
   run with an error, never with a rank running short.
Each sample is augmented under `sample_seed(seed, epoch, position)`, so its augmentation depends on
neither the workers nor the processes nor restarts.

The batch sampler reads the stream in the loader's process and the DataLoader's workers decode and
augment (see `loaders.StreamedSplit`); shards are not dealt to workers, because the order would
then depend on `data.workers`, which a resume may change, and on how the DataLoader interleaves them.

Resume: exact. After a restart the engine calls `set_epoch(loader, epoch, skip_batches=k)`: the same
seeded stream is replayed and its first k batches are dropped before any worker sees them (read
again, never decoded), so a resume point saved on SIGINT/SIGTERM continues with the very next
batch. A kill -9 leaves the last epoch's commit: that epoch restarts from its first batch, in the
same order. Either way the resumed run trains on what the uninterrupted run trained on.

Val/test (and any split loaded with train=False): every sample once, in the fixed order of the
split (shards as listed, samples as in the tar), rank r reading its contiguous share as in 2, with
no shuffle, so the engine's all-reduced evaluation counts each sample once. Ranks may run one batch
more or less: evaluation has no per-batch collective. Each evaluation streams its shards again.

HTTP: shards and `_info.json` are opened with urllib in this process, not with webdataset's
`gopen`, which pipes `curl --retry 30 --retry-delay 2` (a dead server stalls a minute, and its
failure surfaces as a short pipe). The tar streams are parsed by webdataset (`tar_file_expander`,
`group_by_keys`).

Every bad input is a one-line FinetuneError naming the file, URL, key or value: no `_info.json` and
no shards, a malformed `_info.json`, a sample without an image or a label, a label out of range or
unknown, a corrupt or truncated tar, a shard holding another count than listed, an HTTP failure.
An image that does not decode is skipped with a warning, as in every source (see `finetune.data`).
"""
from __future__ import annotations

import contextlib
import http.client
import io
import itertools
import json
import lzma
import math
import random
import re
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import Sampler

try:  # the `webdataset` extra; this module is imported only when a recipe reads webdataset
    from webdataset.filters import shuffle
    from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander
except ImportError:
    shuffle = None

from ..errors import FinetuneError
from .images import IMAGE_EXTENSIONS, _warn_unreadable_once
from .loaders import StreamedSplit, sample_seed
from .splits import DataSplits

INFO = "_info.json"
CLASSES_TXT = "classes.txt"
SHUFFLE_BUFFER = 1000  # samples (undecoded bytes) held per process for the in-epoch shuffle
HTTP_TIMEOUT_S = 60
SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
DEFAULT_IMAGE_KEYS = tuple(dict.fromkeys(["jpg", "jpeg", "png", "webp"] + [e.lstrip(".") for e in IMAGE_EXTENSIONS]))
LAYOUT = (f"a folder or http(s) URL holding {INFO} (timm's format: splits with filenames, shard_lengths, "
          "num_samples, and a classes list), or a folder of train-*.tar, val-*.tar and classes.txt")
# What reading a damaged or cut-off tar raises, through tarfile, its decompressors and the socket.
READ_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError, http.client.HTTPException, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class Shard:
    url: str  # a local path or an http(s) URL
    length: int  # its sample count, as listed in _info.json or counted


class RawSample(NamedTuple):
    """One sample as read, before decoding: what the batch sampler hands to a worker."""
    key: str
    url: str
    image: bytes
    target: Union[int, Tuple[int, ...]]  # a class index; multilabel: the indices of its labels
    position: int  # in the epoch's stream (seeds its augmentation)


# ========================================================================================= build
def build(request) -> DataSplits:
    _require_webdataset()
    root = Root.of(request.root)
    info = root.read_json(INFO)
    shards = _shards_from_info(info, root) if info is not None else _shards_in_folder(root)
    if info is not None and "classes" in info:
        data_classes, classes_from = info["classes"], root.where(INFO)
    else:
        data_classes, classes_from = root.read_class_list(), root.where(CLASSES_TXT)
    labels = Labels.of(data_classes, classes_from, request.options)
    image_keys = _image_keys(request.options.image_key)
    train_tf, eval_tf = request.transforms

    def split(name, transform):
        return WdsSplit(name, shards[name], labels, image_keys, transform) if name in shards else None
    return DataSplits(train=split("train", train_tf), val=split("val", eval_tf), test=split("test", eval_tf),
                      class_names=list(labels.names))


def _require_webdataset() -> None:
    if shuffle is None:
        raise FinetuneError("data.dataset webdataset needs the webdataset package: pip install 'finetune[webdataset]'")


def _image_keys(option: Optional[str]) -> Tuple[str, ...]:
    if option is None:
        return DEFAULT_IMAGE_KEYS
    keys = tuple(k.lstrip(".").lower() for k in re.split(r"[;,\s]+", option) if k.lstrip("."))
    if not keys:
        raise FinetuneError(f"data.image_key: {option!r} names no extension; expected e.g. jpg, or jpg;png")
    return keys


# ===================================================================================== the root
class Root:
    """data.root: a local folder, or the base URL of the shards."""

    def __init__(self, base: str, remote: bool):
        self.base, self.remote = base, remote

    @classmethod
    def of(cls, root: Optional[str]) -> "Root":
        if not root:
            raise FinetuneError(f"webdataset: no data.root given; expected {LAYOUT}")
        root = _unmangled_url(str(root))
        if root.startswith("file://"):
            root = urllib.request.url2pathname(urllib.parse.urlparse(root).path)
        remote = root.startswith(("http://", "https://"))
        if root.endswith(".json"):  # the _info.json itself
            root = root.rsplit("/", 1)[0] if remote else str(Path(root).parent)
        if not remote and not Path(root).is_dir():
            raise FinetuneError(f"{root}: folder not found; data.root must be {LAYOUT}")
        return cls(root.rstrip("/") if remote else root, remote)

    def where(self, name: str) -> str:
        """The path or URL of `name` (a file name relative to the root, or absolute)."""
        if "://" in name:
            return name
        if self.remote:
            return f"{self.base}/{urllib.parse.quote(name.lstrip('/'))}"
        return str(Path(self.base) / name)

    def read_optional(self, name: str) -> Optional[bytes]:
        """The bytes of `name`, or None when it is not there."""
        where = self.where(name)
        if not self.remote:
            return Path(where).read_bytes() if Path(where).is_file() else None
        response = open_url(where, missing_ok=True)
        if response is None:
            return None
        with contextlib.closing(response):
            return _read_all(response, where)

    def read_json(self, name: str) -> Optional[dict]:
        raw = self.read_optional(name)
        if raw is None:
            return None
        try:
            info = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise FinetuneError(f"{self.where(name)}: not valid JSON ({e}); expected timm's {INFO} layout") from None
        if not isinstance(info, dict):
            raise FinetuneError(f"{self.where(name)}: expected a JSON object with \"splits\", "
                                f"got {type(info).__name__}")
        return info

    def read_class_list(self) -> Optional[List[str]]:
        raw = self.read_optional(CLASSES_TXT)
        if raw is None:
            return None
        try:
            return [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise FinetuneError(f"{self.where(CLASSES_TXT)}: not UTF-8 text ({e}); "
                                "expected one class name per line") from None


def _unmangled_url(root: str) -> str:
    """The URL in a data.root that the recipe's path resolution took for a relative path:
    /cwd/http:/host/x (pathlib joined it to the working directory and merged its //)."""
    found = re.search(r"(?:^|/)(https?):/+(?!/)(.*)$", root)
    return f"{found.group(1)}://{found.group(2)}" if found and "://" not in root else root


def _read_all(stream, where: str) -> bytes:
    try:
        return stream.read()
    except READ_ERRORS as e:
        raise FinetuneError(f"{where}: reading failed ({_detail(e)}); check the server and retry") from None


# =============================================================================== split listing
def _shards_from_info(info: dict, root: Root) -> Dict[str, Tuple[Shard, ...]]:
    where = root.where(INFO)
    shards = {}
    for name, entry in _split_entries(info, where):
        split = _canonical_split(name)
        if split is not None and split not in shards:
            shards[split] = _listed_shards(entry, name, root, where)
    return _required_splits(shards, where)


def _split_entries(info: dict, where: str) -> List[Tuple[str, dict]]:
    splits = info.get("splits")
    if isinstance(splits, dict):
        entries = [(entry.get("name", key) if isinstance(entry, dict) else key, entry) for key, entry in splits.items()]
    elif isinstance(splits, list):
        entries = [(entry.get("name") if isinstance(entry, dict) else None, entry) for entry in splits]
    else:
        raise FinetuneError(f"{where}: \"splits\" is {_shown(splits)}; expected a list of "
                            "{name, filenames, shard_lengths, num_samples}, as timm writes it")
    for name, entry in entries:
        if not isinstance(entry, dict) or not isinstance(name, str):
            raise FinetuneError(f"{where}: split entry {_shown(entry)} is not an object with a \"name\"; "
                                "expected {\"name\": \"train\", \"filenames\": [...], \"shard_lengths\": [...], "
                                "\"num_samples\": N}")
    return entries


def _canonical_split(name: str) -> Optional[str]:
    return next((split for split, names in SPLIT_NAMES.items() if name in names), None)


def _listed_shards(entry: dict, name: str, root: Root, where: str) -> Tuple[Shard, ...]:
    filenames, lengths = entry.get("filenames"), entry.get("shard_lengths")
    if not isinstance(filenames, list) or not all(isinstance(f, str) and f for f in filenames):
        raise FinetuneError(f"{where}: split {name}: \"filenames\" is {_shown(filenames)}; "
                            "expected a list of shard names")
    if not isinstance(lengths, list) or not all(_is_count(n) for n in lengths) or len(lengths) != len(filenames):
        raise FinetuneError(f"{where}: split {name}: \"shard_lengths\" is {_shown(lengths)}; expected one sample "
                            f"count (an integer >= 0) per file, {len(filenames)} in all")
    total = entry.get("num_samples", sum(lengths))
    if not _is_count(total) or total != sum(lengths):
        raise FinetuneError(f"{where}: split {name}: \"num_samples\" is {_shown(total)} but its shard_lengths sum "
                            f"to {sum(lengths)}; make them agree")
    shards = tuple(Shard(root.where(f), n) for f, n in zip(filenames, lengths))
    missing = next((s.url for s in shards if "://" not in s.url and not Path(s.url).is_file()), None)
    if missing:  # a local file is checked now; a URL when it is read
        raise FinetuneError(f"{missing}: shard listed in {where} not found; copy it there or fix its filename")
    return shards


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _required_splits(shards: Dict[str, Tuple[Shard, ...]], where: str) -> Dict[str, Tuple[Shard, ...]]:
    for split in ("train", "val"):
        if split not in shards:
            raise FinetuneError(f"{where}: no {split} split; expected splits named "
                                f"{' or '.join(SPLIT_NAMES[split])} (and optionally test)")
    for split, listed in shards.items():
        if not sum(s.length for s in listed):
            raise FinetuneError(f"{where}: split {split} holds no samples; give it shards with samples")
    return shards


def _shards_in_folder(root: Root) -> Dict[str, Tuple[Shard, ...]]:
    if root.remote:
        raise FinetuneError(f"{root.where(INFO)}: not found (HTTP 404); a webdataset URL needs an {INFO} listing "
                            "its shards (timm's format), since a server cannot be listed")
    folder = Path(root.base)
    found = {split: sorted(p for n in names for p in folder.glob(f"{n}-*.tar"))
             for split, names in SPLIT_NAMES.items()}
    if not found["train"] and not found["val"]:
        raise FinetuneError(f"{folder}: no {INFO} and no train-*.tar / val-*.tar shards; data.root must be {LAYOUT}")
    shards = {split: tuple(Shard(str(p), count_samples(p)) for p in paths) for split, paths in found.items() if paths}
    return _required_splits(shards, f"{folder} (no {INFO}: its *-NNN.tar files)")


def count_samples(path: Path) -> int:
    """The samples in a local tar shard, counted from its headers as webdataset groups them."""
    keys = SampleKeys()
    size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.offset_data + member.size > size:
                    raise FinetuneError(f"{path}: truncated tar: {member.name} runs past the end of the file; "
                                        "re-create or re-copy the shard")
                if member.isreg():
                    keys.see(member.name)
            end = tar.offset
        with open(path, "rb") as tail:
            tail.seek(end)
            if tail.read().strip(b"\0"):
                raise FinetuneError(f"{path}: corrupt tar: unreadable header at byte {end}; "
                                    "re-create or re-copy the shard")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise FinetuneError(f"{path}: not a readable tar shard ({_detail(e)}); expected an uncompressed .tar") from None
    return keys.count


class SampleKeys:
    """Counts samples as webdataset's `tar_file_iterator` + `group_by_keys` form them: regular files
    but __meta__ ones, grouped by consecutive key (the name up to its first dot)."""
    META = re.compile(r"__[^/]*__($|/)")

    def __init__(self):
        self.key, self.count = None, 0

    def see(self, name: str) -> bool:
        """Count `name`'s sample; False for files webdataset leaves out of every sample."""
        if self.META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
            return False
        key, _ = base_plus_ext(name)
        if key is None:
            return False
        if key != self.key:
            self.key, self.count = key, self.count + 1
        return True


class SkipSamples(SampleKeys):
    """webdataset's `select_files`: no file of the first `skip` samples is extracted."""

    def __init__(self, skip: int):
        super().__init__()
        self.skip = skip

    def __call__(self, name: str) -> bool:
        return self.see(name) and self.count > self.skip


# ======================================================================================= labels
class Labels:
    """Reads a sample's .cls / .json label as an index into `names` (the model's classes)."""

    def __init__(self, names: Tuple[str, ...], index_names: Tuple[str, ...], field: str, multilabel: bool):
        self.names, self.field, self.multilabel = names, field, multilabel
        self.lookup = {name: i for i, name in enumerate(names)}
        # index labels refer to the data's own class list (else to `names`)
        self.by_index = [self.lookup[name] for name in index_names]

    @classmethod
    def of(cls, data_classes, classes_from: str, options) -> "Labels":
        if data_classes is not None:
            data_classes = tuple(_checked_class_list(data_classes, classes_from))
        names = tuple(options.class_names) if options.class_names else data_classes
        if names is None:
            raise FinetuneError(f"{classes_from}: no class names; add a \"classes\" list to {INFO}, a {CLASSES_TXT} "
                                "(one name per line), or set data.class_names")
        missing = [c for c in data_classes or () if c not in names]
        if missing:
            raise FinetuneError(f"data.class_names {list(names)} lacks {missing} of {classes_from}; "
                                "list every class of the data")
        return cls(names, data_classes or names, options.label_key or "label", options.multilabel)

    def target(self, sample: dict, where: str) -> Union[int, Tuple[int, ...]]:
        """The label of one sample (a dict of extension -> bytes), checked."""
        if "cls" in sample and ("json" not in sample or not self.multilabel):
            value = self._cls_value(sample["cls"], where)
        elif "json" in sample:
            value = self._json_value(sample["json"], where)
        else:
            raise FinetuneError(f"{where}: no label; expected a .cls file (a class index) or a .json file with "
                                f"{{\"{self.field}\": ...}} beside the image")
        if self.multilabel:
            values = value if isinstance(value, list) else [value]
            return tuple(sorted({self.index(v, where) for v in values}))
        if isinstance(value, list):
            raise FinetuneError(f"{where}: label {_shown(value)} is a list; "
                                "several labels per image need task: multilabel")
        return self.index(value, where)

    def index(self, value, where: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(self.by_index):
                raise FinetuneError(f"{where}: label {value} is out of range; expected a class index "
                                    f"0..{len(self.by_index) - 1} ({len(self.by_index)} classes)")
            return self.by_index[value]
        if isinstance(value, str) and value in self.lookup:
            return self.lookup[value]
        if isinstance(value, str):
            raise FinetuneError(f"{where}: label {value!r} is not one of the {len(self.names)} classes "
                                f"({_preview(self.names)}); fix the label or data.class_names")
        raise FinetuneError(f"{where}: label {_shown(value)} is neither a class index nor a class name")

    def tensor(self, target: Union[int, Tuple[int, ...]]):
        if not self.multilabel:
            return target
        hot = torch.zeros(len(self.names), dtype=torch.float32)
        hot[list(target)] = 1.0
        return hot

    @staticmethod
    def _cls_value(raw: bytes, where: str) -> Union[int, str]:
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise FinetuneError(f"{where}.cls: not text ({_shown(raw)}); expected a class index such as 0") from None
        return int(text) if re.fullmatch(r"[+-]?\d+", text) else text

    def _json_value(self, raw: bytes, where: str):
        try:
            meta = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise FinetuneError(f"{where}.json: not valid JSON ({_detail(e)}); "
                                f"expected {{\"{self.field}\": ...}}") from None
        if not isinstance(meta, dict) or self.field not in meta:
            several = " or a list of them" if self.multilabel else ""
            raise FinetuneError(f"{where}.json: no \"{self.field}\" field in {_shown(meta)}; "
                                f"expected {{\"{self.field}\": a class index or name{several}}}")
        return meta[self.field]


def _checked_class_list(classes, source: str) -> List[str]:
    if (not isinstance(classes, list) or not classes
            or not all(isinstance(c, str) and c.strip() for c in classes) or len(set(classes)) != len(classes)):
        raise FinetuneError(f"{source}: the classes {_shown(classes)} are not a list of distinct, non-empty names")
    return classes


# ======================================================================================== a split
class WdsSplit(StreamedSplit):
    """One split's shards: `len()` samples, streamed (see the module docstring for the order)."""

    def __init__(self, name: str, shards: Sequence[Shard], labels: Labels, image_keys: Tuple[str, ...], transform):
        self.name, self.shards, self.labels = name, tuple(shards), labels
        self.image_keys, self.transform = image_keys, transform

    def __len__(self) -> int:
        return sum(shard.length for shard in self.shards)

    def __repr__(self) -> str:
        return f"WdsSplit({self.name}: {len(self)} samples in {len(self.shards)} shards)"

    def __iter__(self):
        in_order = pieces(range(len(self.shards)), [s.length for s in self.shards], 0, len(self))
        for raw in self.read(in_order):
            sample = self.decode(raw)
            if sample is not None:
                yield sample

    def batches(self, *, train: bool, seed: int, global_batch: int, rank: int, world_size: int) -> "ShardBatches":
        return ShardBatches(self, train=train, seed=seed, global_batch=global_batch, rank=rank, world_size=world_size)

    def read(self, parts: Sequence[Tuple[int, int, int, int]]) -> Iterator[RawSample]:
        """The undecoded samples of `parts` ((shard, start, stop, stream position of start)), in order."""
        for shard, start, stop, position in parts:
            yield from self._read_part(self.shards[shard], start, stop, position)

    def decode(self, raw: RawSample):
        try:
            with Image.open(io.BytesIO(raw.image)) as image:
                rgb = image.convert("RGB")
        except Exception as e:  # PIL's format plugins raise many types on damaged bytes; all mean unreadable
            _warn_unreadable_once(FinetuneError(f"{raw.url}: sample {raw.key}: cannot read image "
                                                f"({type(e).__name__}: {e})"), f"{raw.url}#{raw.key}")
            return None
        return (self.transform(rgb) if self.transform else rgb), self.labels.tensor(raw.target)

    def _read_part(self, shard: Shard, start: int, stop: int, position: int) -> Iterator[RawSample]:
        skipper = SkipSamples(start)
        count = start
        with contextlib.closing(open_shard(shard.url)) as stream:
            for sample in tar_samples(stream, shard.url, skipper):
                if count == stop:
                    if stop < shard.length:
                        return
                    raise FinetuneError(f"{shard.url}: holds more than the {shard.length} samples its split lists; "
                                        f"correct shard_lengths in {INFO} or re-create the shard")
                yield self._raw(sample, shard.url, position + count - start)
                count += 1
        if count < stop:
            raise FinetuneError(f"{shard.url}: ends after {max(count, skipper.count)} samples but its split lists "
                                f"{shard.length}; correct shard_lengths in {INFO} or re-create the shard")

    def _raw(self, sample: dict, url: str, position: int) -> RawSample:
        key = sample["__key__"]
        where = f"{url}: sample {key}"
        image = next((sample[k] for k in self.image_keys if k in sample), None)
        if image is None:
            files = ", ".join(f"{key}.{ext}" for ext in sample if not ext.startswith("__"))
            expected = " or ".join(f"{key}.{ext}" for ext in self.image_keys[:4])
            raise FinetuneError(f"{where} has no image (only {files}); expected {expected}, "
                                "or data.image_key naming its extension")
        return RawSample(key, url, image, self.labels.target(sample, where), position)


def tar_samples(stream, url: str, select_files) -> Iterator[dict]:
    """webdataset's parse of one tar stream into samples (dicts of extension -> bytes), its errors
    made one line naming the shard."""
    samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}], select_files=select_files))
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            return
        except READ_ERRORS as e:
            raise _unreadable(url, e) from None
        yield sample


def _unreadable(url: str, error: Exception) -> FinetuneError:
    if isinstance(error, Truncated):
        return FinetuneError(f"{url}: the download ended after {error.got} of {error.total} bytes; retry, "
                             "or check the server")
    if isinstance(error, (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)):
        return FinetuneError(f"{url}: not a readable tar shard ({_detail(error)}): truncated or corrupt; "
                             "re-create or re-download it")
    if isinstance(error, ValueError) and "duplicate file name" in str(error):
        return FinetuneError(f"{url}: {_detail(error).split(':')[0]} appears twice in one sample; each file of "
                             "a sample needs its own extension")
    return FinetuneError(f"{url}: reading failed ({_detail(error)}); check the file or the connection and retry")


# ===================================================================================== opening
def open_shard(url: str):
    if url.startswith(("http://", "https://")):
        return open_url(url)
    try:
        return open(url, "rb")
    except OSError as e:
        raise FinetuneError(f"{url}: cannot open shard ({e.strerror or e}); "
                            "check data.root and the shard names") from None


def open_url(url: str, missing_ok: bool = False):
    """The response to GET `url`, checked for a cut-off body; None for a 404 with `missing_ok`."""
    try:
        response = urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        e.close()
        if missing_ok and e.code == 404:
            return None
        raise FinetuneError(f"{url}: HTTP {e.code} {e.reason}; check data.root and the shard names in {INFO}, "
                            "and that the server serves them") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        raise FinetuneError(f"{url}: cannot connect ({_detail(getattr(e, 'reason', e))}); check that the server "
                            "is running and data.root is right") from None
    return CheckedBody(response)


class Truncated(OSError):
    def __init__(self, got: int, total: int):
        super().__init__(f"body ended after {got} of {total} bytes")
        self.got, self.total = got, total


class CheckedBody(io.RawIOBase):
    """An HTTP body that raises Truncated when the connection ends before Content-Length
    (http.client returns a short read silently, which tarfile may take for the end of the archive)."""

    def __init__(self, response):
        self.response, self.got = response, 0
        length = response.headers.get("Content-Length")
        self.total = int(length) if length and length.isdigit() else None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.response.readinto(buffer)
        self.got += n
        if n == 0 and len(buffer) and self.total is not None and self.got < self.total:
            raise Truncated(self.got, self.total)
        return n

    def close(self) -> None:
        self.response.close()
        super().close()


# ============================================================================ the batch sampler
def contiguous_share(total: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Rank `rank`'s positions [lo, hi) of 0..total-1: contiguous, sizes differing by at most one."""
    per, extra = divmod(total, world_size)
    lo = rank * per + min(rank, extra)
    return lo, lo + per + (rank < extra)


def pieces(order: Sequence[int], lengths: Sequence[int], lo: int, hi: int) -> List[Tuple[int, int, int, int]]:
    """(shard, start, stop, stream position of start) covering positions [lo, hi) of the shards
    concatenated in `order`."""
    parts, position = [], 0
    for shard in order:
        start, stop = max(lo - position, 0), min(hi - position, lengths[shard])
        if start < stop:
            parts.append((shard, start, stop, position + start))
        position += lengths[shard]
    return parts


class ShardBatches(Sampler):
    """One process's batches of a WdsSplit, each a list of (RawSample, sample seed): the rules of
    the module docstring (training: shuffled shards and buffer, equal steps; else: fixed order)."""

    def __init__(self, split: WdsSplit, *, train: bool, seed: int, global_batch: int, rank: int = 0,
                 world_size: int = 1):
        self.split, self.train, self.seed = split, train, seed
        self.local_batch, self.rank, self.world_size = global_batch // world_size, rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def steps(self) -> int:
        """Batches per epoch: in training the same on every rank, from the largest share."""
        lo, hi = contiguous_share(len(self.split), 0 if self.train else self.rank, self.world_size)
        return math.ceil((hi - lo) / self.local_batch)

    def __len__(self) -> int:
        return max(0, self.steps() - self.skip)

    def __iter__(self):
        with contextlib.closing(self.items()) as items:
            for index in range(self.steps()):
                batch = list(itertools.islice(items, self.local_batch))
                if index >= self.skip:
                    yield batch

    def shard_order(self) -> List[int]:
        order = list(range(len(self.split.shards)))
        if self.train:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def items(self) -> Iterator[Tuple[RawSample, Optional[int]]]:
        lo, hi = contiguous_share(len(self.split), self.rank, self.world_size)
        raw = self.split.read(pieces(self.shard_order(), [s.length for s in self.split.shards], lo, hi))
        if not self.train:
            return ((sample, None) for sample in raw)
        # webdataset's buffer, with our RNG: its default seeds itself from the pid and the clock
        rng = random.Random(f"{self.seed + self.epoch}/{self.rank}")
        buffered = shuffle(SHUFFLE_BUFFER, SHUFFLE_BUFFER, rng=rng)(raw)
        return ((sample, sample_seed(self.seed, self.epoch, sample.position)) for sample in buffered)


# ======================================================================================= helpers
def _detail(error) -> str:
    """An exception's own words, without what webdataset appends to them (' @ <stream>', the URL)."""
    args = getattr(error, "args", None)
    text = str(args[0]) if args else str(error)
    return " ".join(text.split(" @ ")[0].split())[:200] or type(error).__name__


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _preview(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
