"""Stopping cleanly: SIGTERM, SIGUSR1 (SLURM's warning), Ctrl-C and the --max_time budget.

Guarantees: a stop is agreed by every rank at the same optimizer step, at the latest `every` steps
(the log interval) after the signal, or at the epoch's end; a checkpoint is saved and on disk before
any rank exits (128 + the signal, or 75 for the time budget); a second Ctrl-C stops at once; the
handlers that were installed before are put back on exit. Checking costs no CPU sync between log
steps."""

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.fabric import Fabric

from machinery import checkpoints

OUT_OF_TIME = 1000  # what `agreed` returns when the time budget is nearly spent (above any signal)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """Raised on every rank once the checkpoint a stop asked for is on disk. `exit_code`: 128 + the
    signal, as a shell reports it, or 75 (EX_TEMPFAIL) for the time budget."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 75 if signum == OUT_OF_TIME else 128 + signum
        super().__init__(stop_reason(signum))


def stop_reason(signum: int) -> str:
    return "the time budget (--max_time)" if signum == OUT_OF_TIME else signal.Signals(signum).name


class StopSignals:
    """With a time budget (seconds from the process's start: imports count), the run stops once the
    time left is under twice the longest stretch between two checks, plus the longest checkpoint
    write, plus a margin of 5% of the budget (at most a minute) for the exit."""

    def __init__(
        self, budget: float | None = None, every: int = 1, clock: Callable = time.time
    ) -> None:
        self.received, self.clock, self.every = 0, clock, every
        self.deadline = None if budget is None else process_start_time() + budget
        self.margin = 0.0 if budget is None else min(60.0, 0.05 * budget)
        self.last_check, self.longest_gap = clock(), 0.0

    def __enter__(self) -> "StopSignals":
        self.previous = {signum: signal.signal(signum, self.handle) for signum in SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received:
            raise KeyboardInterrupt
        self.received = signum

    def agreed(self, fabric: Fabric, step: int | None = None) -> int:
        """The signal any rank received, OUT_OF_TIME, or 0. Every rank calls it at the same points:
        after each optimizer `step` (on several processes they talk only when step % every == 0),
        and at each epoch's end (`step` None)."""
        if fabric.world_size > 1 and step is not None and step % self.every:
            return 0
        if self.deadline is not None and not self.received:
            now = self.clock()
            self.longest_gap, self.last_check = max(self.longest_gap, now - self.last_check), now
            # The stop's checkpoint is written in the background, and the exit waits for it.
            reserve = 2 * self.longest_gap + checkpoints.longest_write_seconds + self.margin
            if now + reserve >= self.deadline:
                self.received = OUT_OF_TIME
        if fabric.world_size == 1:
            return self.received
        received = torch.tensor(self.received, device=fabric.device)
        return int(fabric.all_reduce(received, reduce_op="max").item())


def process_start_time() -> float:
    """When this process started (seconds since the epoch, from /proc on Linux), else now."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        stat = Path("/proc/stat").read_text().splitlines()
        boot = next(int(line.split()[1]) for line in stat if line.startswith("btime "))
        return boot + int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start, in ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def stop_after_signal(fabric: Fabric, cfg: Any, signum: int, checkpoint: Path) -> NoReturn:
    """Once the checkpoint a stop asked for is on disk: rank 0 says so, requeues the SLURM job if
    asked and flushes the loggers; only then does any rank stop (a rank that exits early could get
    the others killed by the launcher before the checkpoint is durable)."""
    checkpoints.wait_for_checkpoints(fabric)
    if fabric.global_rank == 0:
        step = checkpoints.checkpoint_step(checkpoint)
        print(
            f"Stopped by {stop_reason(signum)} at step {step}: {checkpoint} saved. "
            f"Continue with: python train.py --resume {checkpoint.parent.parent}",
            flush=True,
        )
        job_id = os.environ.get("SLURM_JOB_ID")
        if cfg.requeue and job_id:
            print(f"Requeueing SLURM job {job_id}", flush=True)
            subprocess.run(["scontrol", "requeue", job_id], check=False)
        elif cfg.requeue:
            print("--requeue: not under SLURM (no SLURM_JOB_ID), nothing to requeue", flush=True)
        fabric.logger.finalize("failed")
    fabric.barrier()
    raise Preempted(signum)
