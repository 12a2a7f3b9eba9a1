"""Datasets, splits and the sampler that owns the data order.

To use your own data, change `load_splits` to return three datasets (train, val, test) and a `DataInfo`.
Any map-style dataset that yields `(image_tensor, label)` works; the loaders below need no change.
"""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from config import DataConfig, UsageError

VAL_FRACTION = 0.1  # of the training data, held out for model selection
DIGITS_TEST_FRACTION = 0.2  # digits has no official test split: a fixed 20% is held out, the same for every seed

# Per-channel mean and std of each dataset's images in [0, 1], used to normalise them.
NORMALIZATION = {
    "digits": ((0.3053,), (0.3760,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


@dataclass(frozen=True)
class DataInfo:
    num_classes: int
    in_channels: int
    image_size: int
    class_names: tuple[str, ...]


class ImageTensorDataset(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W), normalised as they are read.

    `__getitems__` serves a whole batch with one indexing operation: the DataLoader calls it instead of
    collating N single samples (see `make_train_loader`).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple, std: tuple, scale: float) -> None:
        self.images, self.labels, self.scale = images, labels, scale
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([index])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        x = (self.images[index].float() / self.scale - self.mean) / self.std
        return x, self.labels[index]


def load_splits(cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset, Dataset, DataInfo]:
    """(train, val, test, info). The test split is fixed per dataset and never seen in training;
    val is a seeded random VAL_FRACTION of the remaining data."""
    if cfg.dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).to(torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
        labels = torch.from_numpy(digits.target).long()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # fixed, not the run seed
        num_test = int(len(labels) * DIGITS_TEST_FRACTION)
        test_idx, fit_idx = order[:num_test], order[num_test:]
        fit_images, fit_labels = images[fit_idx], labels[fit_idx]
        test_images, test_labels = images[test_idx], labels[test_idx]
        scale, class_names = 16.0, tuple(str(i) for i in range(10))
    else:
        fit_images, fit_labels, class_names = _torchvision_arrays(cfg, train=True)
        test_images, test_labels, _ = _torchvision_arrays(cfg, train=False)
        scale = 255.0

    order = torch.randperm(len(fit_labels), generator=torch.Generator().manual_seed(seed))
    num_val = int(len(fit_labels) * VAL_FRACTION)
    val_idx, train_idx = order[:num_val], order[num_val:]
    mean, std = NORMALIZATION[cfg.dataset]

    def split(images: torch.Tensor, labels: torch.Tensor) -> ImageTensorDataset:
        return ImageTensorDataset(images, labels, mean, std, scale)

    info = DataInfo(len(class_names), fit_images.shape[1], fit_images.shape[-1], class_names)
    return (split(fit_images[train_idx], fit_labels[train_idx]), split(fit_images[val_idx], fit_labels[val_idx]),
            split(test_images, test_labels), info)


def _torchvision_arrays(cfg: DataConfig, train: bool) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Read a torchvision dataset once into (uint8 images (N, C, H, W), labels, class names)."""
    import torchvision

    dataset_class = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST,
                     "cifar10": torchvision.datasets.CIFAR10}[cfg.dataset]
    try:
        ds = dataset_class(cfg.data_dir, train=train, download=True)
    except (RuntimeError, OSError):  # offline, or a partial download
        folder = dataset_class.base_folder if cfg.dataset == "cifar10" else f"{dataset_class.__name__}/raw"
        where = Path(cfg.data_dir) / folder
        raise UsageError(
            f"--dataset {cfg.dataset}: the files are not in {where} and could not be downloaded (no internet?). "
            f"Copy the {dataset_class.__name__} files there, or use --dataset digits"
        ) from None
    images = torch.as_tensor(ds.data)
    images = images.permute(0, 3, 1, 2) if images.ndim == 4 else images.unsqueeze(1)  # CIFAR is NHWC; MNIST is NHW
    return images.contiguous(), torch.as_tensor(ds.targets).long(), tuple(ds.classes)


class GlobalBatchSampler(Sampler[list[int]]):
    """Owns the training data order, the same at every world size.

    Each epoch is one permutation drawn from (seed, epoch), cut into global batches of `eff_batch_size`
    samples; a last partial batch is dropped, so every optimizer step sees exactly `eff_batch_size` samples.
    Each rank takes its contiguous slice of every global batch, in micro-batches of `batch_size_per_device`.
    The order depends only on (seed, epoch), so training can continue from any global sample offset on any
    number of devices.

    The method is `set_position`, not `set_epoch`, on purpose: Fabric's dataloader wrapper calls `set_epoch`
    with its own iteration count, which would differ from the real epoch after a resume.
    """

    def __init__(self, num_samples: int, eff_batch_size: int, batch_size_per_device: int, rank: int,
                 world_size: int, seed: int, max_steps_per_epoch: Optional[int] = None) -> None:
        self.num_samples, self.eff_batch_size, self.batch_size = num_samples, eff_batch_size, batch_size_per_device
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
        for start in range(self.sample_offset, self.steps_per_epoch * self.eff_batch_size, self.eff_batch_size):
            mine = order[start + self.rank * self.per_rank: start + (self.rank + 1) * self.per_rank]
            yield from (chunk.tolist() for chunk in mine.split(self.batch_size))


def _batch_as_is(batch: tuple) -> tuple:
    return batch


def _collate_fn(dataset: Dataset):  # noqa: ANN202
    """Batched datasets (`__getitems__`) already return a batch; anything else is collated as usual."""
    return _batch_as_is if isinstance(dataset, ImageTensorDataset) else None


def make_train_loader(dataset: Dataset, sampler: GlobalBatchSampler, num_workers: int) -> DataLoader:
    # Its own generator: creating an iterator then draws no number from the global RNG, which a resumed run
    # must find exactly as the checkpoint left it.
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=_collate_fn(dataset),
                      persistent_workers=num_workers > 0, generator=torch.Generator())


def make_eval_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, num_workers: int) -> DataLoader:
    """Rank r evaluates samples r, r + world_size, ...: every sample exactly once, with no padding, so
    metrics summed over ranks equal the single-device ones."""
    return DataLoader(dataset, batch_size=batch_size, sampler=range(rank, len(dataset), world_size),
                      num_workers=num_workers, collate_fn=_collate_fn(dataset), generator=torch.Generator())
