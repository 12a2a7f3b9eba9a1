"""A toy task's data, as a fork writes it: tabular regression whose items are dicts, not (image, label).

The generic tests swap this file, model.py and task.py into a copy of the repository, in place of the
template's own, and run the machinery against them (tests/conftest.py, `fork`).
"""

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch.utils.data import Dataset, Subset


VAL_FRACTION = 0.1


@dataclass(frozen=True)
class DataConfig:
    """The data: datasets are the functions in DATASETS (data.py)."""

    RESUME_LOCKED: ClassVar[tuple[str, ...]] = ("dataset", "num_samples")  # the split would change

    dataset: str = "waves"
    """Dataset: a name from DATASETS in data.py (listed at the end of --help)."""
    num_samples: int = 750
    """Samples to draw; a fifth of them are the test split."""

    def problems(self) -> list[str]:
        problems = []
        if self.dataset not in DATASETS:
            problems.append(f"--dataset {self.dataset!r} is not one of: {', '.join(DATASETS)}")
        if self.num_samples < 10:
            problems.append(f"--num_samples {self.num_samples} must be >= 10")
        return problems


@dataclass(frozen=True)
class DataInfo:
    num_features: int


class DictDataset(Dataset):
    """Items are {"features": (F,), "target": ()} dicts; the DataLoader's default collation stacks them."""

    def __init__(self, features: torch.Tensor, target: torch.Tensor) -> None:
        self.features, self.target = features, target

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"features": self.features[index], "target": self.target[index]}


def load_splits(cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset, Dataset, DataInfo]:
    fit, test, info = DATASETS[cfg.dataset](cfg)
    order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(seed)).tolist()
    num_val = int(len(fit) * VAL_FRACTION)
    return Subset(fit, order[num_val:]), Subset(fit, order[:num_val]), test, info


def waves(cfg: DataConfig) -> tuple[Dataset, Dataset, DataInfo]:
    """y = sin(x . w) + noise for 8 random features: fixed data, the same for every seed."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(cfg.num_samples, 8, generator=generator)
    target = torch.sin(features @ torch.linspace(-1, 1, 8)) + 0.05 * torch.randn(cfg.num_samples, generator=generator)
    num_test = cfg.num_samples // 5
    return (DictDataset(features[num_test:], target[num_test:]), DictDataset(features[:num_test], target[:num_test]),
            DataInfo(num_features=8))


DATASETS: dict[str, Callable[[DataConfig], tuple[Dataset, Dataset, DataInfo]]] = {
    "waves": waves,
}
