"""Linear warmup, then cosine decay to zero; a changed --epochs or --warmup causes no LR jump."""

import math
from typing import Any


def lr_schedule(
    cfg: Any, epochs: int, steps_per_epoch: int, start: int = 0, start_factor: float = 0.0
) -> dict:
    """From step `start`: a warmup from start_factor x lr, then a cosine."""
    end = epochs * steps_per_epoch
    warmup_steps = min(round(cfg.warmup * steps_per_epoch), end - start)
    return dict(
        epochs=epochs,
        warmup_epochs=cfg.warmup,
        start=start,
        start_factor=start_factor,
        warmup_steps=warmup_steps,
        end=end,
    )


def lr_factor(step: int, schedule: dict[str, Any]) -> float:
    k, warmup, first = step - schedule["start"], schedule["warmup_steps"], schedule["start_factor"]
    if k < warmup:
        return first + (1 - first) * (k + 1) / warmup
    progress = (k - warmup) / max(1, schedule["end"] - schedule["start"] - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def continue_schedule(state: dict, cfg: Any, epochs: int, steps_per_epoch: int, lr: float) -> str:
    """What changed, in words, or ""."""
    old, step = state["schedule"], state["global_step"]
    if (old["epochs"], old["warmup_epochs"]) == (epochs, cfg.warmup) or state["epoch"] >= epochs:
        return ""
    now = lr_factor(step, old)
    state["schedule"] = new = lr_schedule(cfg, epochs, steps_per_epoch, step, now)
    return (
        f"--epochs/--warmup changed the LR schedule: from step {step} it warms up from "
        f"{now * lr:.4g} to {lr:.4g} over {new['warmup_steps']} steps, then decays to 0 at "
        f"step {new['end']}"
    )
