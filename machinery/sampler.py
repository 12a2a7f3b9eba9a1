"""The data order and the DataLoaders.

Guarantees: the same global batches at any world size, every epoch from (seed, epoch), resumable at
any global sample offset; evaluation shards cover every sample exactly once, without padding. Any
map-style dataset works, whatever its items are (tuples, dicts, dataclasses). A dataset may set a
`collate_fn` attribute: one whose `__getitems__` serves a whole batch sets it to pass that batch
through."""

import math
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from machinery.errors import UsageError


class GlobalBatchSampler(Sampler[list[int]]):
    """Owns the training data order, the same at every world size.

    Each epoch is one permutation drawn from (seed, epoch), cut into global batches of
    `eff_batch_size` samples; a last partial batch is dropped, so every optimizer step sees exactly
    `eff_batch_size` samples. Each rank takes its contiguous slice of every global batch, in
    micro-batches of `batch_size_per_device`. The order depends only on (seed, epoch), so training
    can continue from any global sample offset on any number of devices.

    The method is `set_position`, not `set_epoch`, on purpose: Fabric's dataloader wrapper calls
    `set_epoch` with its own iteration count, which would differ from the real epoch after a resume.
    """

    def __init__(
        self,
        num_samples: int,
        eff_batch_size: int,
        batch_size_per_device: int,
        rank: int,
        world_size: int,
        seed: int,
        max_steps_per_epoch: Optional[int] = None,
    ) -> None:
        self.num_samples, self.eff_batch_size, self.batch_size = (
            num_samples,
            eff_batch_size,
            batch_size_per_device,
        )
        self.per_rank = eff_batch_size // world_size
        self.rank, self.seed = rank, seed
        self.steps_per_epoch = min(num_samples // eff_batch_size, max_steps_per_epoch or math.inf)
        self.epoch, self.sample_offset = 0, 0

    def set_position(self, epoch: int, sample_offset: int = 0) -> None:
        """Start `epoch` at global sample `sample_offset` (a multiple of eff_batch_size)."""
        self.epoch, self.sample_offset = epoch, sample_offset

    def __len__(self) -> int:
        remaining_steps = self.steps_per_epoch - self.sample_offset // self.eff_batch_size
        return remaining_steps * (self.per_rank // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        for start in range(
            self.sample_offset, self.steps_per_epoch * self.eff_batch_size, self.eff_batch_size
        ):
            mine = order[
                start + self.rank * self.per_rank : start + (self.rank + 1) * self.per_rank
            ]
            yield from (chunk.tolist() for chunk in mine.split(self.batch_size))


def make_loaders(
    fabric: Any,
    cfg: Any,
    train_set: Dataset,
    val_set: Dataset,
    sampler: GlobalBatchSampler,
    batch_size: int,
) -> tuple[Any, Any]:
    """The training loader (in `sampler`'s order) and the validation loader, set up by Fabric, which
    only moves their batches to the device: our samplers shard the data themselves."""
    if sampler.steps_per_epoch == 0:
        raise UsageError(
            f"--eff_batch_size {cfg.optim.eff_batch_size} is larger than the "
            f"{len(train_set)} training samples: no full batch fits in an epoch"
        )
    if len(val_set) == 0:
        raise UsageError(
            f"--dataset {cfg.data.dataset}: the validation split is empty; use more data"
        )
    workers = cfg.hardware.num_workers
    train = make_train_loader(train_set, sampler, workers)
    val = make_eval_loader(val_set, batch_size, fabric.global_rank, fabric.world_size, workers)
    return fabric.setup_dataloaders(train, val, use_distributed_sampler=False)


def make_train_loader(
    dataset: Dataset, sampler: GlobalBatchSampler, num_workers: int
) -> DataLoader:
    # Its own generator: starting an iterator draws nothing from the global RNG, which a resumed run
    # must find exactly as the checkpoint left it.
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=getattr(dataset, "collate_fn", None),
        generator=torch.Generator(),
    )


def make_eval_loader(
    dataset: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int
) -> DataLoader:
    """Rank r evaluates samples r, r + world_size, ...: every sample once, no padding, so metrics
    summed over ranks equal the single-device ones."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=range(rank, len(dataset), world_size),
        num_workers=num_workers,
        collate_fn=getattr(dataset, "collate_fn", None),
        generator=torch.Generator(),
    )


def first_samples(dataset: Dataset, count: int) -> Dataset:
    """The first `count` samples of `dataset` (--overfit_batches), served as the dataset serves
    them: a Subset passes whole batches through the dataset's `__getitems__`, so it keeps the
    dataset's `collate_fn`."""
    subset = Subset(dataset, range(min(count, len(dataset))))
    subset.collate_fn = getattr(dataset, "collate_fn", None)
    return subset
