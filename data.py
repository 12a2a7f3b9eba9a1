"""The task's data: datasets and their splits. A fork edits this file, with task_config.py.

Add a dataset: write a function `NAME(cfg) -> (fit, test, info)` here and name it in DATASETS in
task_config.py, with its one-line help; `--dataset NAME` runs it. `fit` (any map-style dataset) is
split into train and val by the seed; `test` is never trained on. Items may be anything the task's
`forward` unpacks (tuples, dicts, dataclasses); Fabric moves nested tensors to the device.

What the machinery uses from here: load_splits (its flags, DataConfig, are in task_config.py)."""

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from machinery.errors import UsageError
from task_config import DataConfig

VAL_FRACTION = 0.1  # of the training data, held out for model selection
DIGITS_TEST_FRACTION = (
    0.2  # digits has no official test split: a fixed 20% is held out, the same for every seed
)


@dataclass(frozen=True)
class DataInfo:
    """What the model and the task need to know about the data."""

    num_classes: int
    in_channels: int
    class_names: tuple[str, ...]
    augment: nn.Module | None = (
        None  # the models apply it to their input: training batches only, on the device
    )


class CropFlip(nn.Module):
    """CIFAR's usual augmentation on a whole batch, on its device: each image is cropped back to its
    size from a copy padded by `pad` reflected pixels on every side, at a random offset, and flipped
    left-right with probability 1/2. In training mode only: evaluation sees the images as they are.
    (torchvision's RandomCrop(padding=4) pads with black; reflection, as airbench does, leaves no
    black borders to learn.)

    It draws from the device's global RNG, which is seeded per rank and saved in every checkpoint: a
    run is the same under its seed, and a resumed run draws what the uninterrupted one did."""

    def __init__(self, pad: int = 4) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return images
        (n, c, h, w), device = images.shape, images.device
        padded = F.pad(images, (self.pad,) * 4, mode="reflect")
        dy, dx = torch.randint(0, 2 * self.pad + 1, (2, n, 1), device=device)
        flip = torch.rand(n, 1, device=device) < 0.5
        rows = dy + torch.arange(
            h, device=device
        )  # (n, h): the rows of the padded image each image keeps
        cols = dx + torch.where(
            flip, torch.arange(w - 1, -1, -1, device=device), torch.arange(w, device=device)
        )
        pixels = (
            rows[:, :, None] * padded.shape[-1] + cols[:, None, :]
        )  # (n, h, w): where each pixel comes from
        return (
            padded.flatten(2)
            .gather(2, pixels.view(n, 1, h * w).expand(n, c, h * w))
            .view(n, c, h, w)
        )


class ImageTensorDataset(Dataset):
    """Images held in memory as one uint8 tensor (N, C, H, W), normalised as they are read.

    `__getitems__` serves a whole batch with one indexing operation; `collate_fn` tells the loaders
    to pass it through instead of collating N single samples."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, mean: tuple, std: tuple, scale: float
    ) -> None:
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
        return ImageTensorDataset(
            self.images[indices], self.labels[indices], *self.stats, self.scale
        )


def load_splits(cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset, Dataset, DataInfo]:
    """(train, val, test, info) of --dataset. The test split is fixed per dataset and never seen in
    training; val is a seeded random VAL_FRACTION of the rest."""
    load = globals().get(cfg.dataset)  # --dataset NAME is the function NAME below
    if not callable(load):
        raise UsageError(
            f"--dataset {cfg.dataset!r} is in task_config.DATASETS, but data.py has no such "
            "function"
        )
    fit, test, info = load(cfg)
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
    images = (
        torch.from_numpy(data.images).to(torch.uint8).unsqueeze(1)
    )  # (1797, 1, 8, 8), values 0..16
    labels = torch.from_numpy(data.target).long()
    order = torch.randperm(
        len(labels), generator=torch.Generator().manual_seed(0)
    )  # fixed, not the run seed
    test_idx, fit_idx = (
        order[: int(len(labels) * DIGITS_TEST_FRACTION)],
        order[int(len(labels) * DIGITS_TEST_FRACTION) :],
    )
    stats = ((0.3053,), (0.3760,))  # per-channel mean and std of the images in [0, 1]
    return (
        ImageTensorDataset(images[fit_idx], labels[fit_idx], *stats, scale=16.0),
        ImageTensorDataset(images[test_idx], labels[test_idx], *stats, scale=16.0),
        DataInfo(10, 1, tuple(str(i) for i in range(10))),
    )


def mnist(cfg: DataConfig) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    """MNIST handwritten digits (28x28, 60k + 10k) through torchvision, into --data_dir."""
    import torchvision

    return _torchvision(cfg, torchvision.datasets.MNIST, ((0.1307,), (0.3081,)))


def fashion_mnist(cfg: DataConfig) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    """Fashion-MNIST clothing images (28x28, 60k + 10k) through torchvision, into --data_dir."""
    import torchvision

    return _torchvision(cfg, torchvision.datasets.FashionMNIST, ((0.2860,), (0.3530,)))


CIFAR10_STATS = (
    (0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2616),
)  # per-channel mean and std in [0, 1]


def cifar10(cfg: DataConfig) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    """CIFAR-10 colour images (32x32, 50k + 10k) through torchvision, into --data_dir; crop and flip
    (--augment)."""
    import torchvision

    fit, test, info = _torchvision(cfg, torchvision.datasets.CIFAR10, CIFAR10_STATS)
    return fit, test, replace(info, augment=CropFlip(pad=4) if cfg.augment else None)


def synthetic_cifar10(cfg: DataConfig) -> tuple[ImageTensorDataset, ImageTensorDataset, DataInfo]:
    """Uniformly random CIFAR-10-shaped uint8 images and labels, the same for every seed: measures
    speed offline (nothing to learn), with CIFAR-10's normalisation and augmentation."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(
        0, 256, (cfg.synthetic_size * 6 // 5, 3, 32, 32), dtype=torch.uint8, generator=generator
    )
    labels = torch.randint(0, 10, (len(images),), generator=generator)
    fit, test = images[: cfg.synthetic_size], images[cfg.synthetic_size :]
    return (
        ImageTensorDataset(fit, labels[: cfg.synthetic_size], *CIFAR10_STATS, 255.0),
        ImageTensorDataset(test, labels[cfg.synthetic_size :], *CIFAR10_STATS, 255.0),
        DataInfo(
            10, 3, tuple(f"class {i}" for i in range(10)), CropFlip(pad=4) if cfg.augment else None
        ),
    )


def _torchvision(
    cfg: DataConfig, dataset_class: type, stats: tuple
) -> tuple[ImageTensorDataset, ...]:
    """A torchvision dataset read once into uint8 tensors (N, C, H, W); its official test set is the
    test split."""
    splits = []
    for train in (True, False):
        try:
            ds = dataset_class(cfg.data_dir, train=train, download=True)
        except (RuntimeError, OSError):  # offline, or a partial download
            folder = getattr(dataset_class, "base_folder", f"{dataset_class.__name__}/raw")
            raise UsageError(
                f"--dataset {cfg.dataset}: the files are not in {Path(cfg.data_dir) / folder} and "
                "could not be "
                f"downloaded (no internet?). Copy the {dataset_class.__name__} files there, or use "
                "--dataset digits"
            ) from None
        images = torch.as_tensor(ds.data)
        images = (
            images.permute(0, 3, 1, 2) if images.ndim == 4 else images.unsqueeze(1)
        )  # CIFAR: NHWC; MNIST: NHW
        splits.append(
            ImageTensorDataset(
                images.contiguous(), torch.as_tensor(ds.targets).long(), *stats, 255.0
            )
        )
    return (
        splits[0],
        splits[1],
        DataInfo(len(ds.classes), splits[0].images.shape[1], tuple(ds.classes)),
    )
