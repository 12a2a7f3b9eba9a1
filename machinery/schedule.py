"""The learning-rate schedule: linear warmup, then cosine decay to zero, as plain numbers in the
state.

Guarantees: the LR of each optimizer step is lr x lr_factor(step, state["schedule"]), the same after
any resume; a resume that changes --epochs or --warmup continues from the LR reached, never a jump.
A schedule of your own: compute the LR in train.py's loop instead of calling lr_factor."""

import math
from typing import Any


def lr_schedule(
    cfg: Any, epochs: int, steps_per_epoch: int, start: int = 0, start_factor: float = 0.0
) -> dict:
    """From optimizer step `start` on: warmup over cfg.warmup epochs from start_factor x lr up to
    lr, then a cosine decay to zero at the end of `epochs`."""
    end = epochs * steps_per_epoch
    warmup_steps = min(round(cfg.warmup * steps_per_epoch), end - start)
    return {
        "epochs": epochs,
        "warmup_epochs": cfg.warmup,
        "start": start,
        "start_factor": start_factor,
        "warmup_steps": warmup_steps,
        "end": end,
    }


def lr_factor(step: int, schedule: dict[str, Any]) -> float:
    """The LR of optimizer step `step` (from 0), as a fraction of the peak LR."""
    k, warmup = step - schedule["start"], schedule["warmup_steps"]
    if k < warmup:
        return schedule["start_factor"] + (1 - schedule["start_factor"]) * (k + 1) / warmup
    progress = (k - warmup) / max(1, schedule["end"] - schedule["start"] - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def continue_schedule(state: dict, cfg: Any, epochs: int, steps_per_epoch: int, lr: float) -> str:
    """After a resume whose --epochs or --warmup differ from the schedule's: a new schedule from the
    step reached, warming up from the LR reached back to the peak, then decaying to zero at the new
    end (a finished run, at LR zero, warms up from zero). "" if unchanged, else what changed, in
    words."""
    old, step = state["schedule"], state["global_step"]
    if (old["epochs"], old["warmup_epochs"]) == (epochs, cfg.warmup) or state["epoch"] >= epochs:
        return ""
    now = lr_factor(step, old)
    state["schedule"] = new = lr_schedule(cfg, epochs, steps_per_epoch, step, now)
    return (
        f"--epochs/--warmup changed the LR schedule: from step {step} it warms up from "
        f"{now * lr:.4g} to {lr:.4g} over {new['warmup_steps']} steps, then decays to 0 at "
        "step "
        f"{new['end']}"
    )
