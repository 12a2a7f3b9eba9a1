"""The run dir (no torch): one writer at a time, files replaced atomically."""

import contextlib
import fcntl
import io
import os
import re
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from machinery.errors import FilesystemError, UsageError

PERIODIC = re.compile(r"^step-(\d+)\.ckpt$")


def periodic_checkpoints(ckpt_dir: Path) -> list[Path]:
    found = [(int(m[1]), p) for p in ckpt_dir.glob("step-*.ckpt") if (m := PERIODIC.match(p.name))]
    return [p for _, p in sorted(found) if not p.is_symlink()]  # a link: never this run's


def is_checkpoint(path: Path) -> bool:
    return path.is_file() or (path / "meta.pt").is_file()


def find_checkpoint(run_dir: Path, which: str) -> Path:
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"--out_dir {str(run_dir)!r} is not a run directory (no config.yaml)")
    refuse_links(run_dir)
    last = [Path("step-*"), *periodic_checkpoints(run_dir / "checkpoints")][-1].name
    name = {"best": "best.ckpt", "final": "final.ckpt", "last": last}.get(which)
    path = run_dir / "checkpoints" / name if name else Path(which)
    if is_checkpoint(path):
        return path
    raise UsageError(f"--checkpoint {which!r}: no checkpoint at {path} (best, last, final, a path)")


def create_run_dir(fabric: Any, cfg: Any, step: int, lr_schedule: dict) -> Path:
    """On rank 0: new, or the resumed run's (from a chosen checkpoint: new, with its logs)."""
    from machinery.checkpoints import tidy_checkpoints
    from machinery.cli import load_train_config, overrides, resumed_run, to_yaml
    from machinery.provenance import record_provenance

    run_dir, problem = None, None
    if fabric.global_rank == 0:
        try:
            branch = bool(cfg.resume) and is_checkpoint(Path(cfg.resume))
            run_dir = Path(cfg.resume) if cfg.resume and not branch else new_run_dir(cfg)
            lock_run_dir(run_dir)
            ran, launch = replace(cfg, resume=""), {"lr_schedule": lr_schedule}
            if cfg.resume:
                source = resumed_run(cfg.resume)
                if branch and (source / "logs").is_dir():
                    ignore = shutil.ignore_patterns("wandb")
                    shutil.copytree(source / "logs", run_dir / "logs", ignore=ignore)
                tidy_checkpoints(run_dir / "checkpoints")
                changed = overrides(load_train_config(source / "config.yaml"), ran)
                launch["overrides"] = {k: list(v) for k, v in changed.items()}
                launch |= {"from_checkpoint": str(Path(cfg.resume).resolve())} if branch else {}
            atomic_write_text(run_dir / "config.yaml", to_yaml(ran))
            record_provenance(run_dir, step, fabric.world_size, launch)
        except (UsageError, OSError) as err:
            problem = err if isinstance(err, UsageError) else FilesystemError.of(err)
    run_dir, problem = fabric.broadcast((str(run_dir), problem), src=0)
    if problem:
        raise problem
    return Path(run_dir)


def new_run_dir(cfg: Any) -> Path:
    root, when = Path(cfg.root_dir), time.time()
    root.mkdir(parents=True, exist_ok=True)
    while True:
        run_dir = root / f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}-{cfg.out_dir}"
        with contextlib.suppress(FileExistsError):
            run_dir.mkdir()
            return run_dir
        when += 1


_locks: dict[Path, int] = {}


def lock_run_dir(run_dir: Path) -> None:
    """On the folder itself: deleting RUN_DIR/.lock frees nothing."""
    refuse_links(run_dir)
    if run_dir.resolve() in _locks:
        return
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            with open(os.open(run_dir / ".lock", os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
                holder = f.read(200).decode(errors="replace").strip()
        except OSError:
            holder = ""
        message = f"{run_dir} is being trained by {holder or 'another process'}: one writer at a "
        raise UsageError(message + "time; let it finish") from None
    _locks[run_dir.resolve()] = fd
    atomic_write_text(run_dir / ".lock", f"pid {os.getpid()} on {socket.gethostname()} ({now()})")


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def atomic_write_text(path: Path, text: str | bytes) -> None:
    """Replaces `path` (a link itself, never its target)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # "x" never opens a link either
    with open(tmp, "xb" if isinstance(text, bytes) else "x") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_figure(figure: Any, path: Path) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_text(path, buffer.getvalue())


def record_problems(run_dir: Path) -> list[str]:
    """A line for each file a resume appends to that is not as written."""
    problems, fix = [], "restore it, or move it away to resume without it"
    for path in (run_dir / "provenance.yaml", run_dir / "logs/csv/metrics.csv"):
        try:
            text = path.read_bytes().decode() if path.exists() else ""
            if path.suffix == ".csv":
                wrong = text and "step" not in text.split("\n")[0].split(",") and "no step column"
            else:
                entries = yaml.safe_load(text) or []
                whole = isinstance(entries, list) and all(isinstance(e, dict) for e in entries)
                wrong = not whole and "not a YAML list of launches"
        except (OSError, UnicodeDecodeError, RecursionError, yaml.YAMLError) as err:
            wrong = str(getattr(err, "problem", 0) or getattr(err, "strerror", 0) or err)
        if wrong:
            problems.append(f"{path}: {wrong[:120]}; {fix}")
    return problems


def refuse_links(run_dir: Path) -> None:
    for name in ("logs", "logs/csv", "logs/tensorboard", "checkpoints", "test"):
        if (run_dir / name).is_symlink():
            raise FilesystemError(
                f"{run_dir / name} is a symbolic link: the template writes only inside the run "
                "directory, never through a link; replace it with a folder"
            )
