"""`--dataset NAME` runs `NAME(cfg) -> (fit, test, info)` below; `test` is never trained on."""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from machinery.errors import UsageError
from task_config import DataConfig

VAL_FRACTION = 0.1
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


@dataclass(frozen=True)
class DataInfo:
    num_classes: int
    in_channels: int
    class_names: tuple[str, ...]
    augment: nn.Module | None = None  # applied by the model, on the device


Splits = tuple[Dataset, Dataset, DataInfo]  # (fit, test, info)


class CropFlip(nn.Module):
    """In training: a random crop of the reflect-padded image, flipped left-right half the time."""

    def __init__(self, pad: int = 4) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return images
        (n, c, h, w), device = images.shape, images.device
        padded = F.pad(images, (self.pad,) * 4, mode="reflect")
        dy, dx = torch.randint(0, 2 * self.pad + 1, (2, n, 1, 1), device=device)
        flip = torch.rand(n, 1, 1, device=device) < 0.5
        i, j = torch.arange(h, device=device), torch.arange(w, device=device)
        rows, cols = dy + i[:, None], dx + torch.where(flip, j.flip(0), j)
        pixels = (rows * padded.shape[-1] + cols).view(n, 1, h * w).expand(n, c, h * w)
        return padded.flatten(2).gather(2, pixels).view(n, c, h, w)


class ImageTensorDataset(Dataset):
    """uint8 images normalised as read; one indexing serves a batch."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *stats) -> None:
        self.images, self.labels, self.stats = images, labels, stats
        self.mean, self.std = (torch.tensor(s).view(-1, 1, 1) for s in stats[:2])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | list[int]) -> tuple:
        index = torch.as_tensor(index)
        x = (self.images[index].float() / self.stats[2] - self.mean) / self.std
        return x, self.labels[index]

    __getitems__ = __getitem__

    @staticmethod
    def collate_fn(batch: tuple) -> tuple:
        return batch

    def subset(self, indices: torch.Tensor | slice) -> "ImageTensorDataset":
        return ImageTensorDataset(self.images[indices], self.labels[indices], *self.stats)


def load_splits(cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset, Dataset, DataInfo]:
    fit, test, info = globals()[cfg.dataset](cfg)
    if isinstance(fit, tuple):  # (train, val): a streamed dataset comes split
        return *fit, test, info
    order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(seed))
    val, train = order.tensor_split([int(len(fit) * VAL_FRACTION)])
    if isinstance(fit, ImageTensorDataset):
        return fit.subset(train), fit.subset(val), test, info
    return Subset(fit, train.tolist()), Subset(fit, val.tolist()), test, info


def digits(cfg: DataConfig) -> Splits:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images).to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(data.target).long()
    # No official test split: a fixed 20%, whatever the seed.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, fit = order.tensor_split([len(labels) // 5])
    full = ImageTensorDataset(images, labels, (0.3053,), (0.3760,), 16.0)
    return full.subset(fit), full.subset(test), DataInfo(10, 1, tuple("0123456789"))


def mnist(cfg: DataConfig) -> Splits:
    return _torchvision(cfg, "MNIST", ((0.1307,), (0.3081,)))


def fashion_mnist(cfg: DataConfig) -> Splits:
    return _torchvision(cfg, "FashionMNIST", ((0.2860,), (0.3530,)))


def cifar10(cfg: DataConfig) -> Splits:
    return _torchvision(cfg, "CIFAR10", CIFAR10_STATS, CropFlip() if cfg.augment else None)


def synthetic_cifar10(cfg: DataConfig) -> Splits:
    """Random images, the same for every seed."""
    n, generator = cfg.synthetic_size, torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n * 6 // 5, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (len(images),), generator=generator)
    full = ImageTensorDataset(images, labels, *CIFAR10_STATS, 255.0)
    augment = CropFlip() if cfg.augment else None
    info = DataInfo(10, 3, tuple(f"class {i}" for i in range(10)), augment)
    return full.subset(slice(n)), full.subset(slice(n, None)), info


def streamed(cfg: DataConfig) -> Splits:
    """tools/stream.py's chunks in --data_dir (a folder or s3://...): train streamed by litdata."""
    from machinery.stream import open_splits

    found = open_splits(cfg.data_dir, Normalise)
    try:
        i = found["info"]
        augment = CropFlip() if i["crop_flip"] and cfg.augment else None
        info = DataInfo(i["num_classes"], i["in_channels"], tuple(i["class_names"]), augment)
    except (KeyError, TypeError):
        raise UsageError(f"--data_dir {cfg.data_dir}: info/ is not tools/stream.py's") from None
    return (found["train"], found["val"]), found["test"], info


class Normalise:
    """A sample {"image": uint8 tensor, "label": int} as ImageTensorDataset serves it."""

    def __init__(self, info: dict) -> None:
        self.mean, self.std = (torch.tensor(info[k]).view(-1, 1, 1) for k in ("mean", "std"))
        self.scale = info["scale"]

    def __call__(self, sample: dict) -> tuple:
        return (sample["image"].float() / self.scale - self.mean) / self.std, sample["label"]


def _torchvision(
    cfg: DataConfig, name: str, stats: tuple, augment: nn.Module | None = None
) -> Splits:
    import torchvision

    dataset_class, splits = getattr(torchvision.datasets, name), []
    for train in (True, False):
        try:
            ds = dataset_class(cfg.data_dir, train=train, download=True)
        except (RuntimeError, OSError):
            folder = Path(cfg.data_dir) / getattr(dataset_class, "base_folder", f"{name}/raw")
            raise UsageError(
                f"--dataset {cfg.dataset}: the files are not in {folder} and could not be "
                "downloaded; copy them there, or use --dataset digits"
            ) from None
        images = torch.as_tensor(ds.data)
        images = images.permute(0, 3, 1, 2) if images.ndim == 4 else images.unsqueeze(1)
        labels = torch.as_tensor(ds.targets).long()
        splits.append(ImageTensorDataset(images.contiguous(), labels, *stats, 255.0))
    info = DataInfo(len(ds.classes), images.shape[1], tuple(ds.classes), augment)
    return *splits, info
