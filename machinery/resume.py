"""Resuming: which checkpoint, and what is left to do.

Guarantees: the newest checkpoint that loads is used (newest by step: final.ckpt only if no periodic
one is newer); newer ones that fail to load are renamed NAME.damaged, out of the rotation, once this
process holds the run's lock; a finished run, or one that ran out of patience, is not trained again;
a resume's --weight_decay and a changed --epochs/--warmup take effect without a jump of the LR.
"""

import sys
from pathlib import Path
from typing import Any

from lightning.fabric import Fabric

from machinery.checkpoints import load_newest_checkpoint, set_aside
from machinery.errors import UsageError
from machinery.run import out_of_patience
from machinery.rundir import is_checkpoint, lock_run_dir
from machinery.schedule import continue_schedule


def resume(fabric: Fabric, cfg: Any, state: dict, steps_per_epoch: int, lr: float) -> bool:
    """Load `state` from --resume and say what changed; False when nothing is left to train."""
    run_dir, rule = Path(cfg.resume), (state["best"]["metric"], state["best"]["mode"])
    checkpoint, damaged = load_newest_checkpoint(fabric, run_dir, state)
    if damaged:
        set_aside_damaged(fabric, run_dir, damaged)
    step, epoch, offset = state["global_step"], state["epoch"], state["sample_offset"]
    where = f"in epoch {epoch + 1}" if offset else f"after epoch {epoch}"
    branch = " (a chosen checkpoint: in a new run dir)" if is_checkpoint(run_dir) else ""
    fabric.print(f"Resuming from {checkpoint}: step {step}, {where}{branch}")
    for group in state[
        "optimizer"
    ].param_groups:  # a resume's --weight_decay (its --lr works as is)
        group["weight_decay"] = cfg.optim.weight_decay
    epochs = cfg.epochs()
    if change := continue_schedule(state, cfg.optim, epochs, steps_per_epoch, lr):
        fabric.print(change)
    if rule != (state["best"]["metric"], state["best"]["mode"]):
        old = f"{state['best']['mode']} {state['best']['metric']}"
        fabric.print(
            f"best.ckpt so far followed the {old}; from now on it follows the {rule[1]} {rule[0]}"
        )
        state["best"] = {"metric": rule[0], "mode": rule[1], "value": None, "epoch": 0}
        state["patience"] = {"value": None, "stale_epochs": 0}
    finished = checkpoint.name == "final.ckpt"
    stopped_early = out_of_patience(state, cfg.log) if offset == 0 else ""
    if stopped_early and finished:
        fabric.print(
            f"The run stopped early at epoch {epoch}: {stopped_early}; pass a larger "
            "--early_stopping_patience to train further."
        )
        return False
    if stopped_early:  # a signal stopped it right after that epoch: only the end is left
        fabric.print(
            f"The run ran out of patience at epoch {epoch}: {stopped_early}; finishing the run"
        )
    elif epoch >= epochs and finished:
        fabric.print(
            f"The run already finished its {epochs} epochs; pass a larger --epochs to train "
            "further."
        )
        return False
    elif epoch >= epochs:  # stopped after its last epoch's checkpoint: only the end is left
        fabric.print(
            f"Training is done ({epochs} epochs); finishing the run: final.ckpt, curves, summary"
        )
    return True


def set_aside_damaged(fabric: Fabric, run_dir: Path, damaged: list[Path]) -> None:
    """Once this process holds the run's lock, rename the checkpoints that did not load."""
    problem = None
    if fabric.global_rank == 0:
        problem = lock_run_dir(run_dir)
        for path in [] if problem else set_aside(damaged):
            print(
                f"warning: a checkpoint that does not load is out of the rotation: {path}",
                file=sys.stderr,
            )
    problem = fabric.broadcast(problem, src=0)
    if problem:
        raise UsageError(problem)
