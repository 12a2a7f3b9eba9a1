"""Progress on rank 0 only: tqdm's bar in a terminal, one line per log step in a file."""

import os
import sys
from typing import Any

from lightning.fabric import Fabric
from tqdm import tqdm


class Progress:
    def __init__(self, fabric: Fabric, total_steps: int, done_steps: int) -> None:
        self.shown = fabric.is_global_zero
        self.tty = self.shown and sys.stderr.isatty()
        # In a file, the bar draws to /dev/null: it still keeps the ETA.
        self.file = sys.stderr if self.tty else open(os.devnull, "w")  # noqa: SIM115
        options = dict(desc="train", unit="step", dynamic_ncols=True, file=self.file)
        self.bar = tqdm(total=total_steps, initial=done_steps, disable=not self.shown, **options)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()
        if not self.tty:
            self.file.close()

    def log(self, epoch: int, step: int, loss: float, lr: float, samples_per_s: float) -> None:
        loss_, lr_, rate = f"{loss:.4f}", f"{lr:.3g}", f"{samples_per_s:.0f}"
        if self.tty:
            self.bar.set_postfix(epoch=epoch, loss=loss_, lr=lr_, samples_per_s=rate)
        elif self.shown:
            eta = self.bar.format_meter(**{**self.bar.format_dict, "bar_format": "{remaining}"})
            line = f"epoch {epoch} step {step}/{self.bar.total} loss {loss_} lr {lr_}"
            print(f"{line} {rate} samples/s eta {eta}", flush=True)

    def write(self, line: str) -> None:
        if self.tty:
            self.bar.write(line)
        elif self.shown:
            print(line, flush=True)
