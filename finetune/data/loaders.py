"""Seeded, resumable, DDP-aware loaders over any map-style split, and over streamed splits
(`StreamedSplit`: webdataset shards), whose batch sampler reads the stream and whose workers decode."""
from __future__ import annotations

import contextlib
import random
from typing import List, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler
from torch.utils.data.dataloader import default_collate

from ..errors import FinetuneError
from .splits import dataset_targets


# ------------------------------------------------------------------------------------- loaders
def collate_skipping_unreadable(batch: list):
    """default_collate over the readable samples (None marks an unreadable image)."""
    readable = [sample for sample in batch if sample is not None]
    if not readable:
        return torch.empty(0, 3, 0, 0), torch.empty(0, dtype=torch.long)
    return default_collate(readable)


def build_loader(
    dataset,
    *,
    batch_size: int,
    train: bool,
    balanced: bool = False,
    workers: int = 0,
    seed: int = 0,
    distributed: bool = False,
) -> DataLoader:
    """A DataLoader over `dataset`: seeded shuffled batches for training, fixed order for evaluation.

    `batch_size` is the global batch: with `distributed` (torch.distributed initialised), each of
    the N processes loads `batch_size // N` samples of every global batch (see `EpochBatches`).
    `balanced` draws training samples with probability 1/(size of their class), with replacement,
    `len(dataset)` per epoch; it is ignored when `train` is False, because evaluation must see every
    sample exactly once. For training call `set_epoch(loader, epoch)` every epoch.

    A `StreamedSplit` is loaded through its own batch sampler (see there): the same arguments,
    the same `set_epoch` and `len()`, and every process yields as many training batches as the others.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise FinetuneError(f"batch_size: {batch_size!r} is not a positive integer")
    if not isinstance(workers, int) or workers < 0:
        raise FinetuneError(f"workers: {workers!r} must be an integer >= 0")
    rank, world_size = _process_group() if distributed else (0, 1)
    if batch_size % world_size:
        raise FinetuneError(f"batch_size: {batch_size} is not divisible by the {world_size} processes")
    common = dict(num_workers=workers, collate_fn=collate_skipping_unreadable, pin_memory=torch.cuda.is_available(),
                  persistent_workers=workers > 0,
                  # Its own generator: creating worker iterators never draws from the global RNG,
                  # so a resumed run's dropout and drop-path draws match an uninterrupted run's.
                  generator=torch.Generator().manual_seed(seed))
    if isinstance(dataset, StreamedSplit):
        return _streamed_loader(dataset, batch_size=batch_size, train=train, balanced=balanced, seed=seed,
                                rank=rank, world_size=world_size, common=common)
    if not train:
        return DataLoader(dataset, batch_size=batch_size // world_size,
                          sampler=ShardSampler(len(dataset), rank, world_size), **common)
    batches = EpochBatches(dataset, balanced=balanced, seed=seed, global_batch=batch_size, rank=rank,
                           world_size=world_size)
    return DataLoader(SeededSamples(dataset), batch_sampler=batches, **common)


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Point a training loader at `epoch`'s batches, leaving out the first `skip_batches` (resume);
    a streamed split's loader too (its batch sampler has the same `set_epoch`)."""
    loader.batch_sampler.set_epoch(epoch, skip_batches)


def _streamed_loader(dataset: "StreamedSplit", *, batch_size: int, train: bool, balanced: bool, seed: int,
                     rank: int, world_size: int, common: dict) -> DataLoader:
    if balanced and train:
        raise FinetuneError("data.balanced: class-balanced sampling draws by label from the whole split, which a "
                            "streamed split (webdataset) does not hold; set data.balanced: false")
    batches = dataset.batches(train=train, seed=seed, global_batch=batch_size, rank=rank, world_size=world_size)
    return DataLoader(StreamedSamples(dataset), batch_sampler=batches, **common)


class StreamedSplit(IterableDataset):
    """A split read as a stream of samples (webdataset's tar shards), not indexed.

    `len()` is its sample count; iterating it yields every readable (image, target) once, in order,
    in this process. `build_loader` loads it through the two methods a source implements:

    - `batches(train=, seed=, global_batch=, rank=, world_size=)`: the batch sampler. It reads the
      stream in the loader's own process and yields each batch as a list of undecoded items; it has
      `set_epoch(epoch, skip_batches)` and `len()` as `EpochBatches` has, and every process's
      training sampler yields the same number of batches.
    - `decode(item)`: (image, target) from one undecoded item, or None when its image is
      unreadable; run by the DataLoader's workers, where the CPU time goes.

    Reading in the sampler keeps the order a function of (seed, epoch, processes) alone, whatever
    the number of workers (`data.workers` may change on resume), and a resume can drop the batches
    already trained on before they reach a worker: read again, never decoded.
    """

    def batches(self, *, train: bool, seed: int, global_batch: int, rank: int, world_size: int) -> Sampler:
        raise NotImplementedError

    def decode(self, item):
        raise NotImplementedError


class StreamedSamples(Dataset):
    """The workers' half of a streamed split's loader: (item, sample seed) -> `split.decode(item)`,
    augmented under the sample seed as `SeededSamples` does (seed None: evaluation, unseeded)."""

    def __init__(self, split: StreamedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: Tuple[object, int]):
        raw, seed = item
        if seed is None:
            return self.split.decode(raw)
        with _rng_seeded(seed):
            return self.split.decode(raw)


class EpochBatches(Sampler):
    """Training batches: the same global batches on 1 or N processes, fixed by (seed, epoch).

    The order is a permutation (or, `balanced`, a class-balanced draw with replacement) seeded by
    seed + epoch, cut into global batches; process r takes slice r of every batch. So N processes
    with batch B/N see exactly the samples one process with batch B sees (DDP then averages the
    same gradient), and a run resumed at epoch e, batch k sees what an uninterrupted run would have.

    Every process yields the same number of batches, so their collectives line up: the last,
    partial global batch is dealt out round-robin, and dropped when it holds fewer images than
    there are processes (as DistributedSampler's drop_last would; at most N-1 images an epoch).

    Each item is (index, sample seed): the seed is a function of (seed, epoch, position in the
    epoch), and `SeededSamples` augments with it, so augmentation does not depend on workers,
    processes or restarts.
    """

    def __init__(self, dataset, *, balanced: bool, seed: int, global_batch: int, rank: int = 0, world_size: int = 1):
        self.n = len(dataset)
        self.seed, self.epoch, self.skip = seed, 0, 0
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.weights = _balanced_weights(dataset) if balanced else None

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def global_order(self) -> List[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=generator).tolist()
        return torch.randperm(self.n, generator=generator).tolist()

    def local_batches(self) -> List[List[Tuple[int, int]]]:
        order = self.global_order()
        per_process = self.global_batch // self.world_size
        batches = []
        for start in range(0, len(order), self.global_batch):
            batch = [(index, sample_seed(self.seed, self.epoch, start + i))
                     for i, index in enumerate(order[start:start + self.global_batch])]
            if len(batch) == self.global_batch:
                batches.append(batch[self.rank * per_process:(self.rank + 1) * per_process])
            elif len(batch) >= self.world_size:
                batches.append(batch[self.rank::self.world_size])
        return batches[self.skip:]

    def __iter__(self):
        return iter(self.local_batches())

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.global_batch)
        return max(0, full + (rest >= self.world_size if rest else 0) - self.skip)


class ShardSampler(Sampler):
    """Evaluation order 0..n-1, dealt round-robin across processes without padding."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


def sample_seed(seed: int, epoch: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


class SeededSamples(Dataset):
    """`dataset[index]` with torch, numpy and python's RNGs seeded by the item's sample seed, so the
    random augmentation of a sample depends on that seed alone; the caller's RNG states are restored.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]):
        index, seed = item
        with _rng_seeded(seed):
            return self.dataset[index]


@contextlib.contextmanager
def _rng_seeded(seed: int):
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _process_group() -> Tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _balanced_weights(dataset) -> torch.Tensor:
    targets = torch.as_tensor(dataset_targets(dataset), dtype=torch.long)
    if len(targets) == 0:
        raise FinetuneError("balanced: the training set is empty; there is nothing to sample")
    class_counts = torch.bincount(targets)
    return 1.0 / class_counts[targets].double()
