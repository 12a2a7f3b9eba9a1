"""The task's flags and the names --dataset and --model take. A fork edits this file with data.py
and model.py.

It imports no torch, on purpose: train.py and test.py parse and check the whole config before they
import torch and Lightning (5 s here), so `--help`, a typo in a flag or a bad value answers in a
fraction of a second.

Add a dataset: write the function `NAME(cfg) -> (fit, test, info)` in data.py and one line `"NAME":
"help"` in DATASETS below; a model: the function `NAME(cfg, info) -> nn.Module` in model.py and one
line in MODELS. The help line is what `--help` and the README list."""

from dataclasses import dataclass
from typing import ClassVar

# --dataset NAME runs the function NAME in data.py.
DATASETS = {
    "digits": "scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes): bundled, offline",
    "mnist": "MNIST handwritten digits (28x28, 60k + 10k) through torchvision, into --data_dir",
    "fashion_mnist": "Fashion-MNIST clothes (28x28, 60k + 10k), through torchvision, in --data_dir",
    "cifar10": "CIFAR-10 colour images (32x32, 50k + 10k) through torchvision, into --data_dir",
    "synthetic_cifar10": "random CIFAR-10-shaped images (--synthetic_size + 1/5): speed, offline",
}

# --model NAME runs the function NAME in model.py. Any other name is looked up among torchvision's
# classification
# models (resnet18, vit_b_16, ...).
MODELS = {
    "cnn": "A small CNN (~190k parameters, no batch norm) for any of the image datasets",
    "resnet18_cifar": "ResNet-18 with a 32x32 stem: a 3x3 stride-1 first conv, no max-pool (11M)",
}


@dataclass(frozen=True)
class DataConfig:
    """The data: a dataset is a function in data.py, named in DATASETS (task_config.py)."""

    RESUME_LOCKED: ClassVar[tuple[str, ...]] = (
        "dataset",
        "synthetic_size",
    )  # the checkpoint or split would not fit

    dataset: str = "digits"
    """Dataset: a name from DATASETS in task_config.py (listed at the end of --help)."""
    data_dir: str = "data"
    """Where torchvision datasets are stored (downloaded on first use when online)."""
    augment: bool = True
    """Augment the training batches where the dataset calls for it, on the device: CIFAR-10 gets a
    random crop (of the image padded by 4 reflected pixels) and a horizontal flip; the digit
    datasets get none. --augment false turns it off."""
    synthetic_size: int = 50_000
    """Training images of --dataset synthetic_cifar10 (its test split has a fifth as many)."""

    def problems(self) -> list[str]:
        """What is wrong with these values, one line each; checked with the rest of the config."""
        problems = []
        if self.dataset not in DATASETS:
            problems.append(f"--dataset {self.dataset!r} is not one of: {', '.join(DATASETS)}")
        if self.synthetic_size < 10:
            problems.append(f"--synthetic_size {self.synthetic_size} must be >= 10")
        return problems


@dataclass(frozen=True)
class ArchConfig:
    """The network: a model is a function in model.py, named in MODELS (task_config.py)."""

    RESUME_LOCKED: ClassVar[tuple[str, ...]] = (
        "model",
    )  # a resume that changed them would not fit its checkpoint

    model: str = "cnn"
    """Model: a name from MODELS in task_config.py (listed at the end of --help), or any torchvision
    classification model (resnet18, vit_b_16, ...)."""
    dropout: float = 0.1
    """Dropout probability before the classifier layers."""
    pretrained: bool = False
    """Start a torchvision model from its default pretrained weights (downloaded on first use)."""

    def problems(self) -> list[str]:
        """What is wrong with these values, one line each; checked with the rest of the config."""
        problems = []
        if self.model not in MODELS and self.model not in torchvision_models():
            problems.append(
                f"--model {self.model!r} is not one of: {', '.join(MODELS)}, or a torchvision "
                "classification model (e.g. resnet18, vit_b_16)"
            )
        if not 0 <= self.dropout < 1:
            problems.append(f"--dropout {self.dropout} must be in [0, 1)")
        if self.pretrained and self.model in MODELS:
            problems.append(f"--pretrained needs a torchvision --model, not {self.model}")
        return problems


def torchvision_models() -> list[str]:
    """torchvision's classification models. Imports torchvision (and torch): only for a --model
    outside MODELS."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)
