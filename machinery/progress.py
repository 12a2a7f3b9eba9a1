"""Training progress on global rank 0: tqdm's bar in a terminal, plain lines in a file.

Guarantees: other ranks print nothing; in a terminal, a bar with tqdm's ETA, loss, lr and samples/s;
when the output goes to a file (CI, SLURM logs), one plain line per log step, with tqdm's ETA too.
"""

import os
import sys
from typing import Any

from lightning.fabric import Fabric
from tqdm import tqdm


class Progress:
    def __init__(self, fabric: Fabric, total_steps: int, done_steps: int) -> None:
        self.shown, self.tty = fabric.is_global_zero, sys.stderr.isatty()
        self.devnull = None if self.tty else open(os.devnull, "w")  # noqa: SIM115 - closed in __exit__
        self.bar = tqdm(
            total=total_steps,
            initial=done_steps,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not self.shown,
            file=sys.stderr if self.tty else self.devnull,
        )

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()
        if self.devnull:
            self.devnull.close()

    def update(self) -> None:
        self.bar.update()

    def log(self, epoch: int, step: int, loss: float, lr: float, samples_per_s: float) -> None:
        if self.shown and self.tty:
            rate = f"{samples_per_s:.0f}"
            self.bar.set_postfix(
                epoch=epoch, loss=f"{loss:.4f}", lr=f"{lr:.3g}", samples_per_s=rate
            )
        elif self.shown:  # a line, with tqdm's ETA
            eta = self.bar.format_meter(**{**self.bar.format_dict, "bar_format": "{remaining}"})
            print(
                f"epoch {epoch} step {step}/{self.bar.total} loss {loss:.4f} lr {lr:.3g} "
                f"{samples_per_s:.0f} samples/s eta {eta}",
                flush=True,
            )

    def write(self, line: str) -> None:
        if self.shown and self.tty:
            self.bar.write(line)  # above the bar, which is then redrawn
        elif self.shown:
            print(line, flush=True)
