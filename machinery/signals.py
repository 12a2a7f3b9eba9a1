"""On a signal or --max_time, every rank stops at one step once its checkpoint is on disk."""

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.fabric import Fabric

from machinery import checkpoints
from machinery.errors import interrupted

OUT_OF_TIME = 1000
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    def __init__(self, signum: int) -> None:
        late = signum == OUT_OF_TIME
        self.exit_code = 75 if late else 128 + signum  # 75: EX_TEMPFAIL
        super().__init__("the time budget (--max_time)" if late else signal.Signals(signum).name)


class StopSignals:
    """Out of time under 2 x the longest gap between checks + the longest write + a margin."""

    def __init__(self, budget: float | None = None, every: int = 1, clock: Callable = time.time):
        self.received, self.clock, self.every = 0, clock, every
        self.deadline = float("inf") if budget is None else process_start_time() + budget
        self.margin = min(60.0, 0.05 * (budget or 0))
        self.last_check, self.longest_gap = clock(), 0.0

    def __enter__(self) -> "StopSignals":
        self.previous = {signum: signal.signal(signum, self.handle) for signum in SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received:
            interrupted(said="a second Ctrl-C: stopped at once; the checkpoints on disk stay")
        self.received = signum

    def agreed(self, fabric: Fabric, step: int | None = None) -> int:
        """The signal any rank received, OUT_OF_TIME, or 0."""
        if fabric.world_size > 1 and step is not None and step % self.every:
            return 0
        if not self.received:
            now = self.clock()
            self.longest_gap, self.last_check = max(self.longest_gap, now - self.last_check), now
            # The stop's checkpoint is written in the background; the exit waits for it.
            reserve = 2 * self.longest_gap + checkpoints.longest_write_seconds + self.margin
            if now + reserve >= self.deadline:
                self.received = OUT_OF_TIME
        if fabric.world_size == 1:
            return self.received
        received = torch.tensor(self.received, device=fabric.device)
        return int(fabric.all_reduce(received, reduce_op="max").item())


def process_start_time() -> float:
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


def stop_after_signal(fabric: Fabric, signum: int, checkpoint: Path) -> NoReturn:
    """Every rank stops together: one that exits early could get the others killed."""
    checkpoints.wait_for_checkpoints(fabric)
    stopped = Preempted(signum)
    if fabric.global_rank == 0:
        step = checkpoints.checkpoint_step(checkpoint)
        print(
            f"Stopped by {stopped} at step {step}: {checkpoint} saved. "
            f"Continue with: python train.py --resume {checkpoint.parent.parent}",
            flush=True,
        )
        fabric.logger.finalize("failed")
    fabric.barrier()
    raise stopped
