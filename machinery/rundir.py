"""The run directory: its name, its lock, its config files, and where its checkpoints are.

Guarantees: a new run creates exactly one new ROOT_DIR/YYYYmmdd-HHMMSS-OUT_DIR and never reads,
changes or deletes another run's files; a run has one writer at a time (RUN_DIR/.lock, released by
the kernel however the process ends); files are replaced atomically. No torch here (the CLI's fast
path uses it)."""

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
    """The periodic checkpoints (step-N.ckpt), oldest first by the step in their name."""
    found = [(int(m[1]), p) for p in ckpt_dir.glob("step-*.ckpt") if (m := PERIODIC.match(p.name))]
    return [p for _, p in sorted(found)]


def is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a sharded checkpoint's directory (FSDP), not a run directory."""
    return path.is_file() or (path / "meta.pt").is_file()


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """test.py --checkpoint: best, final, last (the newest periodic checkpoint), or a path."""
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"--out_dir {str(run_dir)!r} is not a run directory (no config.yaml)")
    periodic = periodic_checkpoints(run_dir / "checkpoints")
    named = {
        "best": "best.ckpt",
        "final": "final.ckpt",
        "last": periodic[-1].name if periodic else "step-*",
    }
    path = run_dir / "checkpoints" / named[which] if which in named else Path(which)
    if not is_checkpoint(path):
        raise UsageError(
            f"--checkpoint {which!r}: no checkpoint at {path} (best, last, final or a path)"
        )
    return path


def create_run_dir(fabric: Any, cfg: Any, step: int, lr_schedule: dict) -> Path:
    """RUN_DIR, decided and locked on rank 0, broadcast to every rank. A new run gets a new
    directory (one second later if the name is taken) with its config.yaml. A resume writes into its
    run (or, from a chosen checkpoint file, a new run dir starting with a copy of the run's logs); a
    config that flags changed is rewritten, and resumes.yaml records what changed, at which step.
    Every launch is appended to provenance.yaml."""
    from machinery.checkpoints import clean_up_after_crash
    from machinery.cli import load_train_config, overrides, resumed_run, to_yaml
    from machinery.provenance import record_provenance

    run_dir, problem = None, None
    if fabric.global_rank == 0:
        try:
            branch = bool(cfg.resume) and is_checkpoint(Path(cfg.resume))
            run_dir = Path(cfg.resume) if cfg.resume and not branch else new_run_dir(cfg)
            problem = lock_run_dir(run_dir)
            ran = replace(cfg, resume="")  # how this process was launched is not part of the run
            if cfg.resume and not problem:
                source = resumed_run(cfg.resume)
                if branch and (source / "logs").is_dir():
                    ignore = shutil.ignore_patterns("wandb")
                    shutil.copytree(source / "logs", run_dir / "logs", ignore=ignore)
                if branch and (source / "resumes.yaml").is_file():
                    shutil.copy2(source / "resumes.yaml", run_dir / "resumes.yaml")
                clean_up_after_crash(run_dir / "checkpoints")
                changed = overrides(load_train_config(source / "config.yaml"), ran)
                if changed or branch:
                    entry = {"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
                    entry |= {"from_checkpoint": str(Path(cfg.resume).resolve())} if branch else {}
                    entry |= {"overrides": {k: list(v) for k, v in changed.items()}}
                    append_yaml(run_dir / "resumes.yaml", entry | {"lr_schedule": lr_schedule})
            if not problem and read_text(run_dir / "config.yaml") != to_yaml(ran):
                atomic_write_text(run_dir / "config.yaml", to_yaml(ran))
            if not problem:
                record_provenance(run_dir, step, fabric.world_size)
            problem = problem and UsageError(problem)
        except OSError as err:  # the filesystem refused: every rank stops with the same line
            problem = FilesystemError.of(err)
    run_dir, problem = fabric.broadcast((str(run_dir), problem), src=0)
    if problem:
        raise problem
    return Path(run_dir)


def new_run_dir(cfg: Any) -> Path:
    root = Path(cfg.root_dir)
    root.mkdir(parents=True, exist_ok=True)
    now = time.time()
    while True:
        run_dir = root / f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{cfg.out_dir}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            now += 1


_locks: dict[
    Path, int
] = {}  # run dir -> the open file that holds its lock, for this process's life


def lock_run_dir(run_dir: Path) -> str | None:
    """Hold RUN_DIR/.lock for the rest of this process: one run, one writer. None when held, else
    the problem, naming the holder."""
    if run_dir.resolve() in _locks:
        return None
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return f"{run_dir} is being trained by {holder}: one writer at a time; let it finish"
    os.ftruncate(fd, 0)
    since = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} (since {since})".encode())
    _locks[run_dir.resolve()] = fd
    return None


def read_text(path: Path) -> str | None:
    return path.read_text() if path.is_file() else None


def append_yaml(path: Path, entry: dict) -> int:
    """Append `entry` to the YAML list in `path` (created if missing); returns its index."""
    history = yaml.safe_load(read_text(path) or "[]")
    history = history if isinstance(history, list) else []
    atomic_write_text(path, yaml.safe_dump([*history, entry], sort_keys=False))
    return len(history)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # never write through a planted link
    with open(tmp, "x") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
