"""The task's flags; no torch import, so `--help` and bad values answer before torch loads."""

from dataclasses import dataclass
from typing import ClassVar

DATASETS = {
    "digits": "scikit-learn's 8x8 digits (1,797 images, 10 classes): bundled, offline",
    "mnist": "MNIST digits (28x28, 60k + 10k), downloaded into --data_dir",
    "fashion_mnist": "Fashion-MNIST clothes (28x28, 60k + 10k), downloaded into --data_dir",
    "cifar10": "CIFAR-10 colour images (32x32, 50k + 10k), downloaded into --data_dir",
    "synthetic_cifar10": "random CIFAR-10-shaped images (--synthetic_size + 1/5): speed, offline",
    "streamed": "litdata chunks from tools/stream.py in --data_dir (a folder, or s3://...)",
}

MODELS = {
    "cnn": "A small CNN (~190k parameters, no batch norm) for any of the image datasets",
    "resnet18_cifar": "ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32x32 (11M)",
}


@dataclass(frozen=True)
class DataConfig:
    """The data: a dataset is a function in data.py, named in DATASETS."""

    RESUME_LOCKED: ClassVar[tuple[str, ...]] = ("dataset", "synthetic_size")

    dataset: str = "digits"
    """A name from DATASETS (listed at the end of --help)."""
    data_dir: str = "data"
    """Where the torchvision datasets are downloaded to and read from; streamed's chunks."""
    augment: bool = True
    """Augment training batches on the device: CIFAR-10 gets a random crop and flip, digits none."""
    synthetic_size: int = 50_000
    """Training images of --dataset synthetic_cifar10 (its test split has a fifth as many)."""

    def problems(self) -> list[str]:
        problems = []
        if self.dataset not in DATASETS:
            problems.append(f"--dataset {self.dataset!r} is not one of: {', '.join(DATASETS)}")
        if not 10 <= self.synthetic_size <= 10**6:  # in memory: 3 KiB an image
            problems.append(f"--synthetic_size {self.synthetic_size} must be in [10, 10**6]")
        return problems


@dataclass(frozen=True)
class ArchConfig:
    """The network: a model is a function in model.py, named in MODELS."""

    RESUME_LOCKED: ClassVar[tuple[str, ...]] = ("model",)  # the checkpoint would not fit

    model: str = "cnn"
    """A name from MODELS (listed at the end of --help), or a torchvision model (resnet18, ...)."""
    dropout: float = 0.1
    """Dropout probability before the classifier layers."""
    pretrained: bool = False
    """Start a torchvision model from its default pretrained weights (downloaded on first use)."""

    def problems(self) -> list[str]:
        problems = []
        if self.model not in MODELS:
            import torchvision  # and torch: only for a --model outside MODELS

            if self.model not in torchvision.models.list_models(module=torchvision.models):
                problems.append(
                    f"--model {self.model!r} is not one of: {', '.join(MODELS)}, or a torchvision "
                    "classification model (e.g. resnet18, vit_b_16)"
                )
        if not 0 <= self.dropout < 1:
            problems.append(f"--dropout {self.dropout} must be in [0, 1)")
        if self.pretrained and self.model in MODELS:
            problems.append(f"--pretrained needs a torchvision --model, not {self.model}")
        return problems
