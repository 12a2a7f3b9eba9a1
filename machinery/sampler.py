"""The same global batches at any world size and resume; eval shards cover each sample once."""

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset

from machinery.errors import UsageError


class GlobalBatchSampler(Sampler[list[int]]):
    """`set_position`, not `set_epoch`: Fabric's loader wrapper calls that with its own count."""

    def __init__(
        self,
        num_samples: int,
        eff_batch_size: int,
        batch_size_per_device: int,
        rank: int,
        world_size: int,
        seed: int,
        max_steps_per_epoch: int | None = None,
    ) -> None:
        self.num_samples, self.eff_batch_size = num_samples, eff_batch_size
        self.batch_size, self.per_rank = batch_size_per_device, eff_batch_size // world_size
        self.rank, self.seed, self.epoch, self.sample_offset = rank, seed, 0, 0
        self.steps_per_epoch = min(num_samples // eff_batch_size, max_steps_per_epoch or math.inf)

    def set_position(self, epoch: int, sample_offset: int = 0) -> None:
        self.epoch, self.sample_offset = epoch, sample_offset

    def __len__(self) -> int:
        steps = self.steps_per_epoch - self.sample_offset // self.eff_batch_size
        return steps * (self.per_rank // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        end, mine = self.steps_per_epoch * self.eff_batch_size, self.rank * self.per_rank
        for start in range(self.sample_offset, end, self.eff_batch_size):
            batch = order[start + mine : start + mine + self.per_rank]
            yield from (chunk.tolist() for chunk in batch.split(self.batch_size))


def make_loaders(fabric: Any, cfg: Any, train: Any, val: Dataset, fast: Any) -> tuple:
    """(sampler, train loader, val loader): map-style data gets the GlobalBatchSampler, streamed
    (iterable) data litdata's loader, whose batches depend on the world size."""
    (size, accum), rank, world = (
        cfg.optim.micro_batching(fabric.world_size),
        fabric.global_rank,
        fabric.world_size,
    )
    if streamed := isinstance(train, IterableDataset):
        from machinery.stream import StreamedBatches

        sampler = StreamedBatches(fabric, train, size, accum, cfg, fast)
    else:
        sizes = (cfg.optim.eff_batch_size, size, rank, world, cfg.seed, fast)
        sampler = GlobalBatchSampler(len(train), *sizes)
    if sampler.steps_per_epoch == 0:
        raise UsageError(
            f"--eff_batch_size {cfg.optim.eff_batch_size} is larger than the training split: "
            "no full batch fits in an epoch"
        )
    if len(val) == 0:
        problem = f"--dataset {cfg.data.dataset}: the validation split is empty; use more data"
        raise UsageError(problem)
    workers = cfg.hardware.num_workers
    loaders = [sampler.loader if streamed else make_train_loader(train, sampler, workers)]
    loaders += [make_eval_loader(val, size, rank, world, workers)]
    train_loader, val_loader = fabric.setup_dataloaders(*loaders, use_distributed_sampler=False)
    if streamed:  # its own iterator: a whole epoch or the rest of one
        sampler.train, train_loader = train_loader, sampler
    return sampler, train_loader, val_loader


def make_train_loader(dataset: Dataset, sampler: Sampler, num_workers: int) -> DataLoader:
    n = num_workers
    return loader(dataset, batch_sampler=sampler, num_workers=n, persistent_workers=n > 0)


def make_eval_loader(
    dataset: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int
) -> DataLoader:
    shard = range(rank, len(dataset), world_size)
    return loader(dataset, batch_size=batch_size, sampler=shard, num_workers=num_workers)


def loader(dataset: Dataset, **options: Any) -> DataLoader:
    # Its own generator: an iterator draws nothing from the global RNG, which a resume restores.
    # A dataset whose __getitems__ serves whole batches passes them through its collate_fn.
    collate = getattr(dataset, "collate_fn", None)
    return DataLoader(dataset, **options, collate_fn=collate, generator=torch.Generator())


def first_samples(dataset: Dataset, count: int) -> Dataset:
    if isinstance(dataset, IterableDataset):
        raise UsageError("--overfit_batches needs a map-style dataset, not a streamed one")
    subset = Subset(dataset, range(min(count, len(dataset))))
    subset.collate_fn = getattr(dataset, "collate_fn", None)
    return subset
