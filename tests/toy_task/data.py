"""A toy task's data, as a fork writes it: tabular regression whose items are dicts, not (image, label).

The generic tests swap this file, model.py, task.py and task_config.py into a copy of the repository, in place of the
template's own, and run the machinery against them (tests/conftest.py, `fork`).
"""

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Subset

from task_config import DataConfig

VAL_FRACTION = 0.1


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
    fit, test, info = globals()[cfg.dataset](cfg)
    order = torch.randperm(len(fit), generator=torch.Generator().manual_seed(seed)).tolist()
    num_val = int(len(fit) * VAL_FRACTION)
    return Subset(fit, order[num_val:]), Subset(fit, order[:num_val]), test, info


def waves(cfg: DataConfig) -> tuple[Dataset, Dataset, DataInfo]:
    """y = sin(x . w) + noise for 8 random features: fixed data, the same for every seed."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(cfg.num_samples, 8, generator=generator)
    target = torch.sin(features @ torch.linspace(-1, 1, 8)) + 0.05 * torch.randn(
        cfg.num_samples, generator=generator
    )
    num_test = cfg.num_samples // 5
    return (
        DictDataset(features[num_test:], target[num_test:]),
        DictDataset(features[:num_test], target[:num_test]),
        DataInfo(num_features=8),
    )
