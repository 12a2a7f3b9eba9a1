"""The task's data: datasets, their splits, and the flags that choose them. A fork edits this file.

Add a dataset: write a function `(cfg) -> (fit, test, info)` and put it in DATASETS at the bottom. `--dataset`
takes its name, and `--help` lists it with the first line of its docstring. `fit` (any map-style dataset) is
split into train and val by the seed; `test` is never trained on. Items may be anything the task's `forward`
unpacks (tuples, dicts, dataclasses); Fabric moves nested tensors to the device.

What the machinery uses from here: DataConfig (with its `dataset` field and `problems()`), DATASETS and
load_splits.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch.utils.data import Dataset, Subset

from errors import UsageError

VAL_FRACTION = 0.1  # of the training data, held out for model selection
DIGITS_TEST_FRACTION = 0.2  # digits has no official test split: a fixed 20% is held out, the same for every seed


@dataclass(frozen=True)
class DataConfig:
    """The data: datasets are the functions in DATASETS (data.py)."""

    RESUME_LOCKED: ClassVar[tuple[str, ...]] = ("dataset",)  # a resume that changed them would not fit its checkpoint

    dataset: str = "digits"
    """Dataset: a name from DATASETS in data.py (listed at the end of --help)."""
    data_dir: str = "data"
    """Where torchvision datasets are stored (downloaded on first use when online)."""

    def problems(self) -> list[str]:
        """What is wrong with these values, one line each; checked with the rest of the config."""
        if self.dataset not in DATASETS:
            return [f"--dataset {self.dataset!r} is not one of: {', '.join(DATASETS)}"]
        return []


@dataclass(frozen=True)
class DataInfo:
    """What the model and the task need to know about the data."""

    num_classes: int
    in_channels: int
    class_names: tuple[str, ...]


class ImageTensorDataset(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W), normalised as they are read.

    `__getitems__` serves a whole batch with one indexing operation; `collate_fn` tells the loaders to pass it
    through instead of collating N single samples.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple, std: tuple, scale: float) -> None:
        self.images, self.labels, self.scale, self.stats = images, labels, scale, (mean, std)
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

    @staticmethod
    def collate_fn(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch

    def subset(self, indices: torch.Tensor) -> "ImageTensorDataset":
        return ImageTensorDataset(self.images[indices], self.labels[indices], *self.stats, self.scale)


def load_splits(cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset, Dataset, DataInfo]:
    """(train, val, test, info) of --dataset. The test split is fixed per dataset and never seen in training;
    val is a seeded random VAL_FRACTION of the rest."""
    fit, test, info = DATASETS[cfg.dataset](cfg)
    order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(seed))
    num_val = int(len(fit) * VAL_FRACTION)
    return _subset(fit, order[num_val:]), _subset(fit, order[:num_val]), test, info


def _subset(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    """In-memory images stay one batch-serving tensor; any other dataset is wrapped in a Subset."""
    if isinstance(dataset, ImageTensorDataset):
        return dataset.subset(indices)
    return Subset(dataset, indices.tolist())


def digits(cfg: DataConfig) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes): bundled, works offline."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images).to(torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    labels = torch.from_numpy(data.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # fixed, not the run seed
    test_idx, fit_idx = order[:int(len(labels) * DIGITS_TEST_FRACTION)], order[int(len(labels) * DIGITS_TEST_FRACTION):]
    stats = ((0.3053,), (0.3760,))  # per-channel mean and std of the images in [0, 1]
    return (ImageTensorDataset(images[fit_idx], labels[fit_idx], *stats, scale=16.0),
            ImageTensorDataset(images[test_idx], labels[test_idx], *stats, scale=16.0),
            DataInfo(10, 1, tuple(str(i) for i in range(10))))


def mnist(cfg: DataConfig) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    """MNIST handwritten digits (28x28, 60k + 10k) through torchvision, into --data_dir."""
    import torchvision

    return _torchvision(cfg, torchvision.datasets.MNIST, ((0.1307,), (0.3081,)))


def fashion_mnist(cfg: DataConfig) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    """Fashion-MNIST clothing images (28x28, 60k + 10k) through torchvision, into --data_dir."""
    import torchvision

    return _torchvision(cfg, torchvision.datasets.FashionMNIST, ((0.2860,), (0.3530,)))


def cifar10(cfg: DataConfig) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    """CIFAR-10 colour images (32x32, 50k + 10k) through torchvision, into --data_dir."""
    import torchvision

    return _torchvision(cfg, torchvision.datasets.CIFAR10, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))


def _torchvision(cfg: DataConfig, dataset_class: type, stats: tuple) -> tuple[ImageTensorDataset, ...]:
    """A torchvision dataset read once into uint8 tensors (N, C, H, W); its official test set is the test split."""
    splits = []
    for train in (True, False):
        try:
            ds = dataset_class(cfg.data_dir, train=train, download=True)
        except (RuntimeError, OSError):  # offline, or a partial download
            folder = getattr(dataset_class, "base_folder", f"{dataset_class.__name__}/raw")
            raise UsageError(
                f"--dataset {cfg.dataset}: the files are not in {Path(cfg.data_dir) / folder} and could not be "
                f"downloaded (no internet?). Copy the {dataset_class.__name__} files there, or use --dataset digits"
            ) from None
        images = torch.as_tensor(ds.data)
        images = images.permute(0, 3, 1, 2) if images.ndim == 4 else images.unsqueeze(1)  # CIFAR: NHWC; MNIST: NHW
        splits.append(ImageTensorDataset(images.contiguous(), torch.as_tensor(ds.targets).long(), *stats, 255.0))
    return splits[0], splits[1], DataInfo(len(ds.classes), splits[0].images.shape[1], tuple(ds.classes))


# --dataset NAME: one line per dataset.
DATASETS: dict[str, Callable[[DataConfig], tuple[Dataset, Dataset, DataInfo]]] = {
    "digits": digits,
    "mnist": mnist,
    "fashion_mnist": fashion_mnist,
    "cifar10": cifar10,
}
