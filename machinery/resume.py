"""Resuming from the newest checkpoint that loads; a finished run is not trained again."""

from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning.fabric import Fabric

from config import RESUME_LOCKED
from machinery.checkpoints import load_newest_checkpoint
from machinery.cli import resumed_run
from machinery.errors import UsageError
from machinery.run import out_of_patience
from machinery.rundir import is_checkpoint
from machinery.schedule import continue_schedule


def resume(fabric: Fabric, cfg: Any, state: dict, steps_per_epoch: int, lr: float) -> bool:
    """False when nothing is left to train."""
    run_dir, rule, patience = Path(cfg.resume), state["best"], state["patience"]
    checkpoint, held = load_newest_checkpoint(fabric, run_dir, state)
    saved, now = flat(held.get("config", {})), flat(asdict(cfg))
    if wrong := [k for k in RESUME_LOCKED if k in saved and saved[k] != now.get(k)]:
        config = resumed_run(cfg.resume) / "config.yaml"
        said = ", ".join(f"{k.split('.')[-1]} {now[k]}, its checkpoints {saved[k]}" for k in wrong)
        raise UsageError(f"{config} says {said}: a resume cannot change them; put them back")
    step, epoch, offset, best = map(state.get, ("global_step", "epoch", "sample_offset", "best"))
    where = f"in epoch {epoch + 1}" if offset else f"after epoch {epoch}"
    branch = " (a chosen checkpoint: in a new run dir)" if is_checkpoint(run_dir) else ""
    fabric.print(f"Resuming from {checkpoint}: step {step}, {where}{branch}")
    for group in state["optimizer"].param_groups:  # --lr acts through the schedule
        group["weight_decay"] = cfg.optim.weight_decay
    epochs = cfg.epochs()
    if change := continue_schedule(state, cfg.optim, epochs, steps_per_epoch, lr):
        fabric.print(change)
    old, new = f"{best['mode']} {best['metric']}", f"{rule['mode']} {rule['metric']}"
    if old != new:
        fabric.print(f"best.ckpt so far followed the {old}; from now on it follows the {new}")
        state["best"], state["patience"] = rule, patience
    stopped_early = out_of_patience(state, cfg.log) if offset == 0 else ""
    if not stopped_early and epoch < epochs:
        return True
    early = f"ran out of patience at epoch {epoch}: {stopped_early}"
    why = early if stopped_early else f"already finished its {epochs} epochs"
    if checkpoint.name != "final.ckpt":  # stopped right after that epoch's checkpoint
        fabric.print(f"The run {why}; finishing the run")
        return True
    more = "--early_stopping_patience" if stopped_early else "--epochs"
    fabric.print(f"The run {why}; pass a larger {more} to train further.")
    return False


def flat(config: dict) -> dict:
    out = {}
    for k, v in config.items():
        out |= {f"{k}.{n}": x for n, x in v.items()} if isinstance(v, dict) else {k: v}
    return out
