"""A toy task's flags and names, as a fork writes them: one dataset with a flag of its own, three models."""

from dataclasses import dataclass
from typing import ClassVar

DATASETS = {
    "waves": "y = sin(x . w) + noise for 8 random features: fixed data, the same for every seed",
}

MODELS = {
    "mlp": "Two linear layers with a tanh and dropout between them",
    "deeper": "The MLP with a second hidden layer: the same first layer, a new head",
    "linear": "Linear regression",
}


@dataclass(frozen=True)
class DataConfig:
    """The data: a dataset is a function in data.py, named in DATASETS (task_config.py)."""

    RESUME_LOCKED: ClassVar[tuple[str, ...]] = ("dataset", "num_samples")  # the split would change

    dataset: str = "waves"
    """Dataset: a name from DATASETS in task_config.py (listed at the end of --help)."""
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
class ArchConfig:
    """The network: a model is a function in model.py, named in MODELS (task_config.py)."""

    RESUME_LOCKED: ClassVar[tuple[str, ...]] = ("model", "hidden")  # the checkpoint would not fit

    model: str = "mlp"
    """Model: a name from MODELS in task_config.py (listed at the end of --help)."""
    hidden: int = 32
    """Hidden units of the MLP."""
    dropout: float = 0.1
    """Dropout probability after the hidden layer."""

    def problems(self) -> list[str]:
        problems = []
        if self.model not in MODELS:
            problems.append(f"--model {self.model!r} is not one of: {', '.join(MODELS)}")
        if self.hidden < 1:
            problems.append(f"--hidden {self.hidden} must be >= 1")
        return problems
