"""Provenance: what each launch of a run ran, appended to RUN_DIR/provenance.yaml.

Guarantees: one entry per launch (the first, and each resume) with the command line, versions,
machine, world size and git commit; uncommitted changes to the template's files are saved as
code-N.patch."""

import contextlib
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning
import torch
import yaml

from machinery.rundir import append_yaml, atomic_write_text, read_text


def record_provenance(run_dir: Path, step: int, world_size: int) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "step": step,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": shlex.join(["python", *sys.argv]),
        "host": socket.gethostname(),
        "world_size": world_size,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        or [cpu_model()],
    }
    code = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        try:
            command = ["git", "-C", str(code), *args]
            return subprocess.run(
                command, capture_output=True, text=True, timeout=30, check=True
            ).stdout
        except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
            return ""

    if commit := git("rev-parse", "HEAD").strip():
        entry["git_commit"] = commit
        if patch := git(
            "diff", "HEAD", "--", "."
        ):  # the template's own files, even inside a larger repo
            entry["uncommitted_changes"] = f"code-{len(read_entries(run_dir))}.patch"
            atomic_write_text(run_dir / entry["uncommitted_changes"], patch)
    append_yaml(run_dir / "provenance.yaml", entry)
    return entry


def read_entries(run_dir: Path) -> list[dict]:
    """The entries of RUN_DIR/provenance.yaml; [] when it is missing or not a list of mappings."""
    with contextlib.suppress(yaml.YAMLError, UnicodeDecodeError):
        entries = yaml.safe_load(read_text(run_dir / "provenance.yaml") or "[]")
        if isinstance(entries, list) and all(isinstance(e, dict) for e in entries):
            return entries
    return []


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
