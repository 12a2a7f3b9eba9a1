"""Two tiers of tests.

- The generic tier (test_train, test_resume, test_distributed, test_bad_inputs, test_config, test_loaders)
  checks the machinery: the loop, checkpoints, resume, distribution, logging, bad input. Whatever
  trains runs in `fork`: a copy of this repository whose task home (data.py, model.py, task.py, task_config.py) is
  replaced by the toy task in tests/toy_task (dict batches, regression, lowest error is best), as a fork would
  replace it. Counts are derived from the run, never pinned. After a fork swaps its own task in, this tier runs
  and passes unchanged.
- The task tier (test_digits, test_performance, test_readme) checks the template's own task: digits and the
  torchvision datasets, the CNN and torchvision models, classification metrics and reports, the README. A fork
  replaces these files with tests of its own task.
"""

import contextlib
import hashlib
import io
import multiprocessing
import os
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOY_TASK = REPO / "tests" / "toy_task"
TASK_HOME = (
    "data.py",
    "model.py",
    "task.py",
    "task_config.py",
)  # everything a fork changes to train something else


def run_script(
    script: str, *args: str, cwd: Path = REPO, timeout: float = 1800, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run train.py or test.py (of the repository, or of `cwd`, e.g. a fork) as a user would, offline."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(cwd / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def train_in_process(root: Path, *args: str) -> Path:
    """Run the repository's train.py main() in this process (saves the ~7 s import per run); returns RUN_DIR."""
    from machinery.cli import parse_train_config
    from machinery.launch import make_fabric
    from machinery.loggers import RunLogger
    from train import main

    before = set(root.iterdir()) if root.exists() else set()
    cfg = parse_train_config(["--root_dir", str(root), *args])
    hw = cfg.hardware
    loggers = [RunLogger(cfg)]
    make_fabric(
        hw.accelerator, hw.devices, hw.num_nodes, hw.strategy, hw.precision, loggers
    ).launch(main, cfg)
    (run_dir,) = set(root.iterdir()) - before
    return run_dir


def run_cli(script: str, *args: str) -> int:
    """Call the repository's train.py or test.py cli() in this process; returns its exit code."""
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
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=True)["model"]


def weights_and_ema(checkpoint: Path | dict) -> dict[str, torch.Tensor]:
    """The model's weights and, where the run kept one, their EMA as ema/<name>, from a checkpoint file or a loaded
    one."""
    from machinery.ema import averaged_weights

    ckpt = torch.load(checkpoint, weights_only=True) if isinstance(checkpoint, Path) else checkpoint
    return {
        **ckpt["model"],
        **{f"ema/{k}": v for k, v in (averaged_weights(ckpt) if "ema" in ckpt else {}).items()},
    }


def max_abs_diff(a: Path, b: Path) -> float:
    """Over the weights and their EMA, which both runs must have kept or not."""
    wa, wb = weights_and_ema(a), weights_and_ema(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def bitwise_equal(a: Path, b: Path) -> bool:
    """The same weights, and the same EMA of them where the runs kept one."""
    wa, wb = weights_and_ema(a), weights_and_ema(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------------------------ the toy fork


class Fork:
    """A copy of the repository with the toy task swapped in. `run` starts train.py/test.py as a real process;
    `call` runs their cli() in one long-lived worker process that has imported the fork once (fast)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._worker = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_enter_fork,
            initargs=(str(path),),
        )

    def run(self, script: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return run_script(script, *args, cwd=self.path, **kwargs)

    def call(self, script: str, *args: str) -> subprocess.CompletedProcess:
        """Like `run`, in the worker: a CompletedProcess with the exit code and what was printed."""
        code, out, err = self._worker.submit(_call_cli, script, list(args)).result(timeout=1800)
        return subprocess.CompletedProcess([script, *args], code, out, err)

    def train(self, root: Path, *args: str) -> Path:
        """train.py in the worker; returns the new RUN_DIR."""
        before = set(root.iterdir()) if root.exists() else set()
        result = self.call("train.py", "--root_dir", str(root), *args)
        assert result.returncode == 0, result.stderr[-3000:]
        (run_dir,) = set(root.iterdir()) - before
        return run_dir

    def close(self) -> None:
        self._worker.shutdown()


def _enter_fork(path: str) -> None:
    os.chdir(path)
    sys.path.insert(0, path)
    os.environ["WANDB_MODE"] = "offline"


def _call_cli(script: str, args: list[str]) -> tuple[int, str, str]:
    import importlib

    from machinery.cli import AUTO_RESUME_ENV

    os.environ.pop(AUTO_RESUME_ENV, None)  # decided once per command, as in a real process
    module = importlib.import_module(script.removesuffix(".py"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.cli(args)
            code = 0
        except SystemExit as exit:
            code = exit.code
        finally:  # as a process's exit would: the background checkpoint publishing finishes
            importlib.import_module("machinery.checkpoints").wait_for_checkpoints()
    return code, out.getvalue(), err.getvalue()


def make_fork(path: Path) -> Path:
    """Copy the repository's modules (its top-level .py files, machinery/ and tools/) to `path`, then
    replace the task home with the toy task's files."""
    path.mkdir(parents=True)
    for module in REPO.glob("*.py"):
        shutil.copy(module, path / module.name)
    for package in ("machinery", "tools"):
        shutil.copytree(
            REPO / package, path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    replaced = sorted(p.name for p in TOY_TASK.glob("*.py"))
    assert replaced == sorted(TASK_HOME), "the toy task replaces exactly the task home"
    for name in replaced:
        shutil.copy(TOY_TASK / name, path / name)
    return path


def readme_diff(name: str) -> str:
    """The diff the README's "Make it yours" shows under `<!-- diff: NAME -->`."""
    block = (REPO / "README.md").read_text().split(f"<!-- diff: {name} -->\n```diff\n", 1)[1]
    return block.split("\n```", 1)[0] + "\n"


def apply_readme_diff(name: str, fork_dir: Path, *options: str) -> subprocess.CompletedProcess:
    """`patch -p1` with that diff in `fork_dir`, as a user would apply it."""
    return subprocess.run(
        ["patch", "-p1", "--forward", "--no-backup-if-mismatch", *options],
        input=readme_diff(name),
        cwd=fork_dir,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="session")
def fork(tmp_path_factory: pytest.TempPathFactory) -> Fork:
    fork = Fork(make_fork(tmp_path_factory.mktemp("toy") / "fork"))
    yield fork
    fork.close()


@pytest.fixture(scope="session")
def default_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's quick-start training command, run once for the session."""
    root = tmp_path_factory.mktemp("runs")
    result = run_script("train.py", "--root_dir", str(root))
    assert result.returncode == 0, result.stderr
    return only_run_dir(root), result


@pytest.fixture(autouse=True)
def _fresh_auto_resume_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """--resume auto is decided once per process tree (and handed to children in the environment)."""
    monkeypatch.delenv("TEMPLATE_AUTO_RESUME_DIR", raising=False)
