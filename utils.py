"""Setup and file bookkeeping for train.py and test.py: run directories, loggers, checkpoints, RNG state."""

import contextlib
import csv
import io
import os
import random
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import Logger, TensorBoardLogger
from lightning.pytorch.loggers import CSVLogger  # Fabric's own CSVLogger cannot log hyperparameters
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from config import TrainConfig, UsageError, to_yaml

PERIODIC_CHECKPOINT = re.compile(r"^step-(\d+)\.ckpt$")


@contextlib.contextmanager
def exit_on_usage_error() -> Iterator[None]:
    """Turn a UsageError into one `error:` line per problem on stderr and exit code 2."""
    try:
        yield
    except UsageError as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def make_fabric(accelerator: str, devices: str, num_nodes: int = 1, strategy: str = "auto",
                precision: str = "32-true") -> Fabric:
    devices_arg = int(devices) if devices.lstrip("-").isdigit() else devices  # "2" -> 2; "0,1" and "auto" as is
    try:
        return Fabric(accelerator=accelerator, devices=devices_arg, num_nodes=num_nodes, strategy=strategy,
                      precision=precision)
    except (ValueError, RuntimeError, TypeError) as err:  # e.g. --accelerator cuda on a machine without GPUs
        flags = f"--accelerator {accelerator} --devices {devices} --num_nodes {num_nodes} --strategy {strategy}"
        reason = " ".join(str(err).split())
        raise UsageError(f"cannot start Fabric with {flags} --precision {precision}: {reason}") from None


# ------------------------------------------------------------------------------------------- run directory


def create_run_dir(fabric: Fabric, cfg: TrainConfig) -> Path:
    """RUN_DIR for this run, decided once on rank 0 and broadcast to every rank.

    A fresh run creates exactly one new ROOT_DIR/YYYYmmdd-HHMMSS-OUT_DIR (one second later if that name is
    taken, so two runs never share a directory) and writes config.yaml into it before training starts.
    A resumed run uses the given directory, and rewrites its config.yaml only if flags overrode it.
    """
    run_dir = None
    if fabric.global_rank == 0:
        if cfg.resume:
            run_dir = Path(cfg.resume)
        else:
            run_dir = _new_run_dir(Path(cfg.root_dir), cfg.out_dir)
        # The saved config describes the run; how this process was launched (--resume) is not part of it.
        config_path, text = run_dir / "config.yaml", to_yaml(replace(cfg, resume=""))
        if not config_path.exists() or config_path.read_text() != text:
            atomic_write_text(config_path, text)
    return Path(fabric.broadcast(str(run_dir), src=0))


def _new_run_dir(root_dir: Path, out_dir: str) -> Path:
    root_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    while True:
        run_dir = root_dir / f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{out_dir}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            now += 1


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_loggers(cfg: TrainConfig, run_dir: Path, resume_step: int | None) -> list[Logger]:
    """Loggers writing under RUN_DIR/logs/<name>/. A run resumed from `resume_step` continues the same files
    (dropping what was logged after that step, before the interruption) and the same wandb run."""
    logs = run_dir / "logs"
    loggers: list[Logger] = []
    if "csv" in cfg.logger_name:
        # Written at every log call (once per log interval), so a killed run keeps its log up to the kill.
        csv_logger = ResumableCSVLogger(resume_step, save_dir=logs, name="csv", version="", flush_logs_every_n_steps=1)
        loggers.append(csv_logger)
    if "tensorboard" in cfg.logger_name:
        purge = {} if resume_step is None else {"purge_step": resume_step + 1}  # TensorBoard drops later events
        loggers.append(TensorBoardLogger(root_dir=logs, name="tensorboard", version="", **purge))
    if "wandb" in cfg.logger_name:
        from lightning.pytorch.loggers import WandbLogger

        (logs / "wandb").mkdir(parents=True, exist_ok=True)
        loggers.append(WandbLogger(project=cfg.project, name=run_dir.name, id=wandb_run_id(run_dir),
                                   save_dir=str(logs), resume="allow", notes=cfg.comment or None))
    return loggers


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger deletes an existing metrics.csv when it starts; a resumed run appends instead."""

    def __init__(self, resume_step: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resume_step = resume_step

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingCSVWriter(self.log_dir, self.resume_step)
        return self._experiment


class _AppendingCSVWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Instead of deleting metrics.csv: keep its rows up to the resumed step, and its columns."""
        path = Path(self.metrics_file_path)
        if self.resume_step is None or not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [row for row in reader if int(row["step"]) <= self.resume_step]
            self.metrics_keys = list(reader.fieldnames or [])
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buffer.getvalue())


def wandb_run_id(run_dir: Path) -> str:
    """Derived from the run directory's name, so a resumed run continues the same wandb run."""
    return re.sub(r"[^a-zA-Z0-9_-]", "-", run_dir.name)


# ---------------------------------------------------------------------------------------------- checkpoints


def periodic_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The periodic checkpoints (step-N.ckpt), oldest first, ordered by the step number in their name."""
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("step-*.ckpt") if (m := PERIODIC_CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(fabric: Fabric, path: Path, state: dict[str, Any]) -> None:
    """Save `state` plus the RNG states so that the file appears under `path` only when complete.

    It is written to a temporary name in the same directory, flushed to disk, and renamed: a crash at any
    moment leaves either the previous file or the new one, never a partial one.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fabric.save(tmp, {**state, "rng": capture_rng_states()})
    fabric.barrier()
    if fabric.global_rank == 0:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    fabric.barrier()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(fabric: Fabric, ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` periodic checkpoints, after the newest one is safely on disk."""
    if fabric.global_rank == 0:
        for path in periodic_checkpoints(ckpt_dir)[:-keep]:
            path.unlink()


def resume_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a resumed run continues from: final.ckpt if training finished, else the newest periodic."""
    ckpt_dir = run_dir / "checkpoints"
    final = ckpt_dir / "final.ckpt"
    if final.exists():
        return final
    periodic = periodic_checkpoints(ckpt_dir)
    if not periodic:
        raise UsageError(f"--resume {str(run_dir)!r} has no checkpoint to resume from in {ckpt_dir}")
    return periodic[-1]


def load_checkpoint(fabric: Fabric, path: Path, state: dict[str, Any]) -> None:
    """Restore `state` in place from `path`, loaded with weights_only=True, and restore the RNG states."""
    try:
        remainder = fabric.load(path, state, strict=False, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read the file is the user's to know about
        raise UsageError(f"cannot load checkpoint {path}: {' '.join(str(err).split())[:300]}") from None
    restore_rng_states(remainder["rng"])


# ---------------------------------------------------------------------------------------------------- RNG


def capture_rng_states() -> dict[str, Any]:
    """RNG states as tensors and plain Python values only, so checkpoints load with weights_only=True."""
    np_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
