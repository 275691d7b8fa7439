"""Photos as WebDataset shards, for tests and benchmarks: write them, serve them over loopback HTTP.

    from wds_shards import write_image_folder_as_shards, serve_folder
    info = write_image_folder_as_shards(HYMENOPTERA, tmp_path / "shards", shards={"train": 3, "val": 2})
    with serve_folder(tmp_path / "shards") as url:   # http://127.0.0.1:PORT
        ...

An image folder (`<root>/<split>/<class>/*.jpg`, torchvision's ImageFolder order) becomes
`<out>/<split>-000000.tar ...`, an `_info.json` in timm's layout (splits by name, each with
filenames, shard_lengths and num_samples, plus a top-level classes list) and a `classes.txt`.
Each photo keeps its bytes and extension under the key `shard_key(class, file)`.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from finetune.data.images import IMAGE_EXTENSIONS

Sample = Tuple[str, Dict[str, bytes]]  # (key, extension -> file bytes)


def shard_key(class_name: str, path: Path) -> str:
    # webdataset's key ends at the first dot of the name (F.pergan.28(f).jpg would split early)
    return f"{class_name}_{Path(path).stem}".replace(".", "_")


def photos_of(folder: Path) -> List[Tuple[str, Path]]:
    """(class, file) for every visible image under folder/<class>/, in ImageFolder's order."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    return [(name, path) for name in classes for path in sorted((folder / name).rglob("*"))
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in path.relative_to(folder).parts)]


def photo_samples(folder: Path, classes: Sequence[str], label: str = "cls") -> List[Sample]:
    """One sample per photo: its bytes under its extension, its label as `.cls` (index) or `.json` (name)."""
    samples = []
    for name, path in photos_of(folder):
        label_file = ({"cls": str(classes.index(name)).encode()} if label == "cls"
                      else {"json": json.dumps({"label": name, "filename": path.name}).encode()})
        samples.append((shard_key(name, path), {path.suffix.lower().lstrip("."): path.read_bytes(), **label_file}))
    return samples


def write_tar(path: Path, samples: Iterable[Sample]) -> int:
    """A plain tar of the samples' files (KEY.EXT), in order; returns the number of samples."""
    count = 0
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                member = tarfile.TarInfo(f"{key}.{ext}")
                member.size, member.mtime, member.mode = len(data), 0, 0o644
                tar.addfile(member, io.BytesIO(data))
            count += 1
    return count


def split_evenly(items: Sequence, parts: int) -> List[list]:
    """`parts` contiguous runs of `items` whose sizes differ by at most one (the first ones longer)."""
    per, extra = divmod(len(items), parts)
    runs, start = [], 0
    for i in range(parts):
        stop = start + per + (i < extra)
        runs.append(list(items[start:stop]))
        start = stop
    return runs


def write_split(out: Path, split: str, samples: Sequence[Sample], shards: int) -> Dict:
    """`samples` as `shards` tars <out>/<split>-NNNNNN.tar; returns the split's _info.json entry."""
    filenames, lengths = [], []
    for i, run in enumerate(split_evenly(samples, shards)):
        name = f"{split}-{i:06d}.tar"
        lengths.append(write_tar(out / name, run))
        filenames.append(name)
    return {"name": split, "filenames": filenames, "shard_lengths": lengths, "num_samples": sum(lengths)}


def write_info(out: Path, splits: Dict[str, Dict], classes: Optional[Sequence[str]], name: str = "") -> Dict:
    info = {"name": name or out.name, "splits": splits}
    if classes is not None:
        info["classes"] = list(classes)
    (out / "_info.json").write_text(json.dumps(info, indent=2))
    return info


def write_shards(out: Path, samples: Dict[str, Sequence[Sample]], classes: Optional[Sequence[str]],
                 shards: Optional[Dict[str, int]] = None, info: bool = True, classes_txt: bool = True) -> Dict:
    """Split -> samples written as shards (shards[split] tars each, default 1) with `_info.json`
    (unless `info` is False) and `classes.txt`; returns the info."""
    out.mkdir(parents=True, exist_ok=True)
    shards = shards or {}
    entries = {split: write_split(out, split, listed, shards.get(split, 1)) for split, listed in samples.items()}
    if classes_txt and classes is not None:
        (out / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    result = {"name": out.name, "splits": entries, "classes": list(classes or [])}
    return write_info(out, entries, classes) if info else result


def write_image_folder_as_shards(image_root: Path, out: Path, shards: Optional[Dict[str, int]] = None,
                                 label: str = "cls", info: bool = True) -> Dict:
    """Every split folder (train/, val/, test/) of an ImageFolder tree as shards; see the module doc."""
    shards = shards or {"train": 3, "val": 2}
    classes = sorted(d.name for d in (Path(image_root) / "train").iterdir()
                     if d.is_dir() and not d.name.startswith("."))
    samples = {split: photo_samples(Path(image_root) / split, classes, label) for split in ("train", "val", "test")
               if (Path(image_root) / split).is_dir()}
    return write_shards(Path(out), samples, classes, shards, info=info)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve `folder` on 127.0.0.1 (a free port) from a thread; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
