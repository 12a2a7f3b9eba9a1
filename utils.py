"""Setup and file bookkeeping for train.py and test.py: run directories, loggers, checkpoints, RNG state."""

import contextlib
import csv
import io
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.fabric.connector import _is_using_cli
from lightning.fabric.loggers import Logger, TensorBoardLogger
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.loggers import CSVLogger  # Fabric's own CSVLogger cannot log hyperparameters
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from tqdm import tqdm

from config import ArchConfig, TrainConfig, UsageError, to_yaml
from data import DataInfo
from model import build_model

PERIODIC_CHECKPOINT = re.compile(r"^step-(\d+)\.ckpt$")


@contextlib.contextmanager
def exit_on_usage_error() -> Iterator[None]:
    """Turn a UsageError into one `error:` line per problem on stderr and its exit code (2, or 3 for a
    non-finite loss); `--debug` shows the traceback instead."""
    try:
        yield
    except UsageError as err:
        if "--debug" in sys.argv:
            raise
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(err.exit_code)


class NonFiniteLoss(UsageError):
    exit_code = 3

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}; stopped without saving, so the newest checkpoint holds the last finite weights. "
                         "Resume from it with a lower --lr or a --grad_clip")


class Preempted(Exception):
    """Raised after the checkpoint that a stop signal asked for is safely written."""

    def __init__(self, signum: int, run_dir: Path) -> None:
        self.signum, self.run_dir, self.signal_name = signum, run_dir, signal.Signals(signum).name
        super().__init__(self.signal_name)


class StopSignals:
    """SIGTERM, SIGUSR1 (SLURM's warning before the time limit) and Ctrl-C ask the run to stop cleanly:
    every rank finishes its current optimizer step, they agree, save a checkpoint, and exit.
    A second Ctrl-C stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received = 0
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received:
            raise KeyboardInterrupt
        self.received = signum

    def agreed(self, fabric: Fabric) -> int:
        """The signal any rank received, 0 if none. Every rank must call this at the same point."""
        if fabric.world_size == 1:
            return self.received
        return int(fabric.all_reduce(torch.tensor(self.received, device=fabric.device), reduce_op="max").item())


def exit_after_preemption(fabric: Fabric, cfg: TrainConfig, signum: int) -> None:
    """Requeue the SLURM job if asked to, then exit with 128 + the signal number, as a shell reports it."""
    wait_for_checkpoints()
    job_id = os.environ.get("SLURM_JOB_ID")
    if cfg.requeue and fabric.global_rank == 0:
        if job_id:
            fabric.print(f"Requeueing SLURM job {job_id}")
            subprocess.run(["scontrol", "requeue", job_id], check=False)
        else:
            fabric.print("--requeue: not under SLURM (no SLURM_JOB_ID), nothing to requeue")
    sys.exit(128 + signum)


def make_fabric(accelerator: str, devices: str, num_nodes: int = 1, strategy: str = "auto",
                precision: str = "32-true") -> Fabric:
    devices_arg = int(devices) if devices.lstrip("-").isdigit() else devices  # "2" -> 2; "0,1" and "auto" as is
    try:
        return Fabric(accelerator=accelerator, devices=devices_arg, num_nodes=num_nodes, strategy=strategy,
                      precision=precision)
    except (ValueError, RuntimeError, TypeError, ImportError) as err:  # e.g. --accelerator cuda without a GPU
        flags = f"--accelerator {accelerator} --devices {devices} --num_nodes {num_nodes} --strategy {strategy}"
        reason = " ".join(str(err).split())
        raise UsageError(f"cannot start Fabric with {flags} --precision {precision}: {reason}") from None


def launch(fabric: Fabric, function: Callable, *args: Any) -> Any:
    """fabric.launch(function, *args), leaving the process group when `function` returns. Under `fabric run`,
    which has started the processes already, a plain call."""
    if _is_using_cli():
        return _call_then_leave_process_group(function, args, fabric)
    # Bound here rather than passed to launch(): ddp_spawn's launcher rejects frozen dataclasses in arguments.
    return fabric.launch(partial(_call_then_leave_process_group, function, args))


def _call_then_leave_process_group(function: Callable, args: tuple, fabric: Fabric) -> Any:
    try:
        return function(fabric, *args)
    finally:
        if torch.distributed.is_initialized():  # a process that exits with the group still up may abort (gloo)
            torch.distributed.destroy_process_group()


def training_flops_per_step(cfg: ArchConfig, info: DataInfo, batch_size: int) -> int:
    """FLOPs of a forward and backward pass over one micro-batch, counted on the meta device (no memory, no time)."""
    with torch.device("meta"):
        model = build_model(replace(cfg, pretrained=False), info)
        x = torch.empty(batch_size, info.in_channels, info.image_size, info.image_size)
    return measure_flops(model, lambda: model(x), lambda logits: logits.sum())


class Progress:
    """Training progress, on global rank 0 only: a tqdm bar (step, ETA, loss, lr, samples/s) in a terminal, and
    plain lines at each log step when the output goes to a file (CI, SLURM logs), where a bar is noise."""

    def __init__(self, fabric: Fabric, total_steps: int, done_steps: int) -> None:
        self.shown, self.total, self.start = fabric.is_global_zero, total_steps, (time.perf_counter(), done_steps)
        self.bar = tqdm(total=total_steps, initial=done_steps, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (self.shown and sys.stderr.isatty()))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()

    def update(self) -> None:
        self.bar.update()

    def log(self, epoch: int, step: int, loss: float, lr: float, samples_per_s: float) -> None:
        if not self.bar.disable:
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", lr=f"{lr:.3g}", samples_per_s=f"{samples_per_s:.0f}")
        elif self.shown:
            seconds, steps = time.perf_counter() - self.start[0], step - self.start[1]
            eta = time.strftime("%H:%M:%S", time.gmtime((self.total - step) * seconds / max(steps, 1)))
            print(f"epoch {epoch} step {step}/{self.total} loss {loss:.4f} lr {lr:.3g} {samples_per_s:.0f} samples/s "
                  f"eta {eta}", flush=True)

    def write(self, line: str) -> None:
        if self.shown and not self.bar.disable:
            self.bar.write(line)  # above the bar, which is then redrawn
        elif self.shown:
            print(line, flush=True)


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
            clean_up_after_crash(run_dir / "checkpoints")
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
    """Loggers writing under RUN_DIR/logs/<name>/: csv always, and tensorboard and wandb when asked for. A run
    resumed from `resume_step` continues the same files (dropping what was logged after that step, before the
    interruption) and the same wandb run."""
    logs = run_dir / "logs"
    # The CSV log is always kept: it is the run's own record, that curves.png is drawn from. It is written at
    # every log call (once per log interval), so a killed run keeps its log up to the kill.
    loggers: list[Logger] = [
        ResumableCSVLogger(resume_step, save_dir=logs, name="csv", version="", flush_logs_every_n_steps=1)]
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


_publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-publisher")
_publishing: list[Future] = []


def save_checkpoint(fabric: Fabric, state: dict[str, Any], *paths: Path, keep: int | None = None) -> None:
    """Save `state` and every rank's RNG states under each of `paths`, each appearing only when complete; then,
    with `keep`, delete all but the newest `keep` periodic checkpoints.

    It is written once, to a temporary name in the same directory, flushed to disk and renamed (the other
    names are hard links to it): a crash at any moment leaves either the previous file or the new one, never a
    partial one. The flush, renames and pruning (disk time, not CPU) run in order in a background thread on
    rank 0 while training goes on; the end of the run and a requeue wait for them. Non-finite weights are never
    saved: the last good checkpoint stays the newest.
    """
    if not paths:
        return
    finite = torch.stack([p.isfinite().all() for p in state["model"].parameters()]).all()
    if not fabric.all_reduce(finite.float(), reduce_op="min").item():  # one sync per checkpoint, not per step
        raise NonFiniteLoss(f"the weights are not finite at step {state['global_step']} ({paths[0].name})")
    tmp = _temporary_name(paths[0])
    fabric.save(tmp, {**state, "rng": gather_rng_states(fabric)})
    fabric.barrier()  # every rank's part is written
    if fabric.global_rank == 0:
        _publishing.append(_publisher.submit(_publish_and_prune, tmp, paths, keep))


def _temporary_name(path: Path) -> Path:
    """Hidden, unique (a save may be queued while the previous one with the same name is being published)."""
    return path.with_name(f".{path.name}.{time.monotonic_ns()}.tmp")


def _publish_and_prune(tmp: Path, paths: tuple[Path, ...], keep: int | None) -> None:
    publish(tmp, paths[0])
    for path in paths[1:]:
        link = _temporary_name(path)
        if paths[0].is_dir():  # a sharded checkpoint: directories cannot be hard-linked
            shutil.copytree(paths[0], link)
        else:
            os.link(paths[0], link)
        publish(link, path)
    if keep:
        prune_checkpoints(paths[0].parent, keep)  # only once the new checkpoint is durable


def wait_for_checkpoints() -> None:
    """Until the checkpoints being published are on disk under their names; re-raises a failure (disk full)."""
    while _publishing:
        _publishing.pop(0).result()


def publish(tmp: Path, path: Path) -> None:
    """Flush `tmp` to disk and give it the name `path`, atomically. `tmp` may be a directory: the sharded
    checkpoint that Fabric writes under FSDP. A directory cannot replace another in one step, so an existing
    one is first renamed aside and deleted only after the new one is in place."""
    for file in [tmp] if tmp.is_file() else [p for p in tmp.rglob("*") if p.is_file()]:
        _fsync(file)
    _fsync(tmp.parent)
    if tmp.is_dir() and path.exists():
        old = path.with_name(f".{path.name}.old.tmp")
        os.replace(path, old)
        os.replace(tmp, path)
        remove_checkpoint(old)
    else:
        os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_checkpoint(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def clean_up_after_crash(ckpt_dir: Path) -> None:
    """Remove the temporary files a crash left in the middle of `publish`, or put back a checkpoint that it
    had renamed aside."""
    for tmp in ckpt_dir.glob(".*.tmp"):
        original = ckpt_dir / tmp.name[1:].removesuffix(".old.tmp")
        if tmp.name.endswith(".old.tmp") and not original.exists():  # a crash between publish()'s two renames
            os.replace(tmp, original)
        else:
            remove_checkpoint(tmp)


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` periodic checkpoints."""
    for path in periodic_checkpoints(ckpt_dir)[:-keep]:
        remove_checkpoint(path)


def load_newest_checkpoint(fabric: Fabric, run_dir: Path, state: dict[str, Any]) -> Path:
    """Restore `state` from the newest checkpoint of `run_dir` that loads: final.ckpt if training finished,
    else the periodic ones from the newest back. One that fails to load (truncated, corrupted, another
    model's) is skipped with a warning and kept on disk."""
    ckpt_dir = run_dir / "checkpoints"
    final = ckpt_dir / "final.ckpt"
    candidates = ([final] if final.exists() else []) + periodic_checkpoints(ckpt_dir)[::-1]
    for path in candidates:
        try:
            load_checkpoint(fabric, path, state)
            return path
        except UsageError as err:
            fabric.print(f"warning: skipping an unloadable checkpoint: {err}", file=sys.stderr)
    skipped = f" ({len(candidates)} could not be loaded)" if candidates else ""
    raise UsageError(f"--resume {str(run_dir)!r} has no loadable checkpoint in {ckpt_dir}{skipped}")


def load_checkpoint(fabric: Fabric, path: Path, state: dict[str, Any]) -> None:
    """Restore every key of `state` from `path`, loaded with weights_only=True (a file that carries
    arbitrary pickled code is refused, not run), and this rank's RNG states."""
    try:
        with warnings.catch_warnings():  # a foreign file's pickle protocol is not worth a warning before our error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            remainder = fabric.load(path, state, strict=True, weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"cannot load checkpoint {path}: it holds objects other than tensors and plain Python "
                         "values, and loading it could run code: refused") from None
    except Exception as err:  # noqa: BLE001 - any failure to read the file is the user's to know about
        reason = " ".join(str(err).split()).split(". ")[0]  # torch's first sentence says what went wrong
        raise UsageError(f"cannot load checkpoint {path}: {reason[:300]}") from None
    if "rng" in remainder:
        restore_rng_states(remainder["rng"], fabric.global_rank)


# ---------------------------------------------------------------------------------------------------- RNG


def capture_rng_states() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors only, so they can be gathered and loaded with weights_only=True."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_rest": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
        "python_rest": torch.tensor([py_version, math.nan if py_gauss is None else py_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def gather_rng_states(fabric: Fabric) -> dict[str, torch.Tensor]:
    """Every rank's RNG states, each stacked along a first dimension of size world_size."""
    states = capture_rng_states()
    if fabric.world_size == 1:
        return {name: state.unsqueeze(0) for name, state in states.items()}
    with warnings.catch_warnings():  # Fabric's all_gather goes through torch's differentiable one, now deprecated
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated")
        return {name: state.cpu() for name, state in fabric.all_gather(states).items()}


def restore_rng_states(states: dict[str, torch.Tensor], rank: int) -> None:
    """Restore this rank's RNG states. After a change of world size, rank r takes saved rank r % saved."""
    row = rank % len(states["torch"])
    torch.set_rng_state(states["torch"][row].clone())  # a copy: set_rng_state reads a row view from its start
    pos, has_gauss, gauss = states["numpy_rest"][row].tolist()
    np_keys = states["numpy_keys"][row].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", np_keys, int(pos), int(has_gauss), gauss))
    version, py_gauss = states["python_rest"][row].tolist()
    random.setstate((int(version), tuple(states["python_internal"][row].tolist()),
                     None if math.isnan(py_gauss) else py_gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"][row].clone())
