"""The run dir (no torch: the CLI's fast path): a new run makes one new ROOT_DIR/DATE-TIME-OUT_DIR
and touches no other; one writer at a time (RUN_DIR/.lock); files are replaced atomically."""

import contextlib
import fcntl
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
    return [p for _, p in sorted(found)]


def is_checkpoint(path: Path) -> bool:
    return path.is_file() or (path / "meta.pt").is_file()


def find_checkpoint(run_dir: Path, which: str) -> Path:
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"--out_dir {str(run_dir)!r} is not a run directory (no config.yaml)")
    last = [Path("step-*"), *periodic_checkpoints(run_dir / "checkpoints")][-1].name
    name = {"best": "best.ckpt", "final": "final.ckpt", "last": last}.get(which)
    path = run_dir / "checkpoints" / name if name else Path(which)
    if is_checkpoint(path):
        return path
    raise UsageError(f"--checkpoint {which!r}: no checkpoint at {path} (best, last, final, a path)")


def create_run_dir(fabric: Any, cfg: Any, step: int, lr_schedule: dict) -> Path:
    """Made on rank 0: new, or the resumed run's (from a chosen checkpoint: new, with its logs)."""
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
        except (UsageError, OSError) as err:  # every rank stops with one line
            problem = err if isinstance(err, UsageError) else FilesystemError.of(err)
    run_dir, problem = fabric.broadcast((str(run_dir), problem), src=0)
    if problem:
        raise problem
    return Path(run_dir)


def new_run_dir(cfg: Any) -> Path:
    root, when = Path(cfg.root_dir), time.time()
    root.mkdir(parents=True, exist_ok=True)
    while True:  # a second later while the name is taken
        run_dir = root / f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(when))}-{cfg.out_dir}"
        with contextlib.suppress(FileExistsError):
            run_dir.mkdir()
            return run_dir
        when += 1


_locks: dict[Path, int] = {}  # run dir -> the file holding its lock


def lock_run_dir(run_dir: Path) -> None:
    """For this process's life."""
    if run_dir.resolve() in _locks:
        return
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        message = f"{run_dir} is being trained by {holder}: one writer at a time; let it finish"
        raise UsageError(message) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} (since {now()})".encode())
    _locks[run_dir.resolve()] = fd


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def read_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def append_yaml(path: Path, entry: dict) -> None:
    history = yaml.safe_load(read_text(path) or "[]")
    history = history if isinstance(history, list) else []
    atomic_write_text(path, yaml.safe_dump([*history, entry], sort_keys=False))


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # never write through a planted link
    with open(tmp, "x") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
