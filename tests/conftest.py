import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run train.py or test.py as a user would, offline, and capture what it prints."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


def train_in_process(root: Path, *args: str) -> Path:
    """Run train.py's main() in this process (saves the ~7 s import per run); returns the new RUN_DIR."""
    import utils
    from config import parse_train_config
    from train import main

    before = set(root.iterdir()) if root.exists() else set()
    cfg = parse_train_config(["--root_dir", str(root), *args])
    hw = cfg.hardware
    utils.make_fabric(hw.accelerator, hw.devices, hw.num_nodes, hw.strategy, hw.precision).launch(main, cfg)
    (run_dir,) = set(root.iterdir()) - before
    return run_dir


def run_cli(script: str, *args: str) -> int:
    """Call train.py's or test.py's cli() in this process; returns its exit code."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{script}_cli", REPO / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        module.cli(list(args))
    except SystemExit as exit:
        return exit.code
    return 0


def only_run_dir(root: Path) -> Path:
    (run_dir,) = list(root.iterdir())
    return run_dir


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its SHA-256, to prove that nothing changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=True)["model"]


@pytest.fixture(scope="session")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's quick-start training command, run once for the session."""
    root = tmp_path_factory.mktemp("runs")
    result = run_script("train.py", "--root_dir", str(root))
    assert result.returncode == 0, result.stderr
    return only_run_dir(root), result


@pytest.fixture(autouse=True)
def _fresh_auto_resume_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume auto is decided once per process tree (and handed to children in the environment)."""
    from config import AUTO_RESUME_ENV

    monkeypatch.delenv(AUTO_RESUME_ENV, raising=False)
