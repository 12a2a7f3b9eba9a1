"""RUN_DIR/provenance.yaml: an entry per launch (command, versions, hardware, git commit)."""

import contextlib
import itertools
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import lightning
import torch
import yaml

from machinery.rundir import atomic_write_text, now


def record_provenance(run_dir: Path, step: int, world_size: int, launch: dict) -> None:
    entry = {
        "step": step,
        "time": now(),
        "command": shlex.join(["python", *sys.argv]),
        "host": socket.gethostname(),
        "world_size": world_size,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        or [platform.processor() or platform.machine()],
        **launch,
    }
    entries = read_entries(run_dir)
    if commit := git("rev-parse", "HEAD").strip():
        entry["git_commit"] = commit
        if patch := git("diff", "HEAD", "--", "."):  # the template's files, even in a larger repo
            names = (f"code-{n}.patch" for n in itertools.count(len(entries)))
            entry["uncommitted_changes"] = next(n for n in names if not (run_dir / n).exists())
            atomic_write_text(run_dir / entry["uncommitted_changes"], patch)
    text = yaml.safe_dump([*entries, entry], sort_keys=False)
    atomic_write_text(run_dir / "provenance.yaml", text)


def git(*args: str) -> str:
    command = ["git", "-C", str(Path(__file__).resolve().parents[1]), *args]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        run = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
        return run.stdout
    return ""


def read_entries(run_dir: Path) -> list[dict]:
    with contextlib.suppress(yaml.YAMLError, UnicodeDecodeError):
        path = run_dir / "provenance.yaml"
        entries = yaml.safe_load(path.read_text() if path.is_file() else "[]")
        if isinstance(entries, list) and all(isinstance(e, dict) for e in entries):
            return entries
    return []
