"""Never lose a run: a crash at any moment, a signal, or a damaged checkpoint, then a resume that ends bitwise
equal to the run that was never interrupted, with logs that read as one run. (Generic tier: the toy fork.)"""

import csv
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import bitwise_equal, model_weights, only_run_dir

# Every test but one is marked slow: the fast one is the quick suite's check that a kill resumes to the bit.

EPOCHS = 4
# A checkpoint every 3 optimizer steps lands mid-epoch as well as on epoch ends, so both kinds are exercised;
# dropout makes the result depend on the RNG states that a resume must restore; the EMA of the weights must
# resume bitwise too.
ARGS = [
    "--epochs",
    str(EPOCHS),
    "--checkpoint_every_n_steps",
    "3",
    "--dropout",
    "0.2",
    "--log_interval",
    "2",
    "--ema_decay",
    "0.9",
]


@pytest.fixture(scope="module")
def reference(fork, tmp_path_factory) -> Path:
    """The uninterrupted run that every interrupted one must equal."""
    return fork.train(tmp_path_factory.mktemp("reference"), *ARGS)


def steps_per_epoch(run_dir: Path) -> int:
    final = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True)
    return final["global_step"] // final["epoch"]


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Final weights and their EMA bitwise equal, and the CSV log identical: every step once, none missing, same
    values."""
    assert bitwise_equal(
        run_dir / "checkpoints" / "final.ckpt", reference / "checkpoints" / "final.ckpt"
    )
    assert logged_values(run_dir) == logged_values(reference)
    assert not list(
        (run_dir / "checkpoints").glob(".*.tmp")
    )  # the crash's temporary file is cleaned up


def logged_values(run_dir: Path) -> list[dict]:
    """metrics.csv without its throughput columns, which measure time and so differ from run to run."""
    with open(run_dir / "logs" / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items() if not k.endswith("_per_sec")} for row in rows]


# Each crash is injected in a real process: `when` is patched in, and on its n-th call the process kills itself
# (or, for a stop signal, sends itself SIGTERM and goes on).
CRASH_RUNNER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, os.getcwd())
    import torch, train
    from machinery import checkpoints, run

    def crash_on_call(owner, name, n, before=None, signum=signal.SIGKILL, counts=lambda *args, **kwargs: True):
        original, calls = getattr(owner, name), [0]
        def wrapper(*args, **kwargs):
            calls[0] += counts(*args, **kwargs)
            if calls[0] == n:
                if before: before(*args, **kwargs)
                os.kill(os.getpid(), signum)
            return original(*args, **kwargs)
        setattr(owner, name, wrapper)

    original_save = torch.save  # what writes each checkpoint file (and pickles tensors sent to ranks)

    def half_written(obj, path, *args, **kwargs):  # the file is cut off in the middle of the write
        original_save(obj, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    when, n = sys.argv[1], int(sys.argv[2]) if sys.argv[2].isdigit() else sys.argv[2]
    if when == "mid_write":
        to_file = lambda obj, f, *args, **kwargs: isinstance(f, (str, os.PathLike))
        crash_on_call(torch, "save", n, before=half_written, counts=to_file)
    elif when == "before_rename":
        from pathlib import Path  # only the renames that publish a checkpoint count, not config or log writes
        publishes = lambda src, dst, *args, **kwargs: Path(dst).parent.name == "checkpoints"
        crash_on_call(checkpoints.os, "replace", n, counts=publishes)
    elif when == "disk_full":  # the n-th checkpoint write finds the disk full
        import errno
        save, saves = torch.save, [0]
        def full(obj, f, *args, **kwargs):
            saves[0] += isinstance(f, (str, os.PathLike))  # a file: not a tensor being pickled
            if saves[0] == n:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return save(obj, f, *args, **kwargs)
        torch.save = full
    elif when == "before_save":  # the loop's bookkeeping (machinery/run.py) calls save_checkpoint
        crash_on_call(run, "save_checkpoint", n)
    elif when == "before_prune":  # the n-th save that rotates is on disk, the old ones not yet pruned
        original_publish_and_prune, rotations = checkpoints.publish_and_prune, [0]
        def publish_then_die(tmp, paths, keep):
            rotations[0] += bool(keep)
            if rotations[0] == n and keep:
                original_publish_and_prune(tmp, paths, None)  # published, not pruned
                os.kill(os.getpid(), signal.SIGKILL)
            return original_publish_and_prune(tmp, paths, keep)
        checkpoints.publish_and_prune = publish_then_die
    elif when == "between_best_and_periodic":  # best.ckpt is in place, the epoch's step-N not yet
        original_publish, seen = checkpoints.publish, {"last": "", "n": 0}
        def publish(tmp, path):
            if path.name.startswith("step-") and seen["last"] == "best.ckpt":
                seen["n"] += 1
                if seen["n"] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
            seen["last"] = path.name
            return original_publish(tmp, path)
        checkpoints.publish = publish
    elif when == "sigterm_in_validation":  # evaluate's calls: the first batch's check, then each epoch's
        crash_on_call(train, "evaluate", n, signum=signal.SIGTERM)
    elif when == "move_into_place":  # how Fabric's own atomic save put a file written in $TMPDIR into place
        import shutil
        crash_on_call(shutil, "move", n)
    elif when == "csv_rewrite":  # the write of metrics.csv that adds the column n dies half-way
        from machinery import rundir
        class Dying:
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *exc): self.f.close()
            def __getattr__(self, name): return getattr(self.f, name)
            def write(self, text):
                if n in text.partition(chr(10))[0]:
                    self.f.write(text[: len(text) // 2])
                    self.f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                return self.f.write(text)
        def open_then_die(file, mode="r", *args, **kwargs):
            f = open(file, mode, *args, **kwargs)
            return Dying(f) if str(file).endswith("metrics.csv.tmp") else f
        rundir.open = open_then_die
    elif when == "ctrl_c_twice":  # Ctrl-C at the n-th step, and again before the first is acted on
        from machinery import signals
        handle = signals.StopSignals.handle
        def pressed_again(self, signum, frame):
            first = not self.received
            handle(self, signum, frame)
            if first:
                os.kill(os.getpid(), signal.SIGINT)
        signals.StopSignals.handle = pressed_again
        crash_on_call(run.Run, "log_step", n, signum=signal.SIGINT)
    train.cli(sys.argv[3:])
""")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("when", "n"),
    [
        ("mid_write", 4),  # the 4th save (a mid-epoch one) is cut off half-way
        ("before_rename", 6),  # a complete temporary file is never renamed
        ("before_prune", 5),  # a new checkpoint is on disk, the old ones not yet pruned
    ],
)
def test_sigkill_while_checkpointing_then_resume_is_bitwise_identical(
    fork, tmp_path, reference, when, n
):
    runner = fork.path / "crash_runner.py"
    runner.write_text(CRASH_RUNNER)
    root = tmp_path / "runs"
    crashed = subprocess.run(
        [sys.executable, str(runner), when, str(n), "--root_dir", str(root), *ARGS],
        capture_output=True,
        text=True,
        cwd=fork.path,
        timeout=300,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    run_dir = only_run_dir(root)
    assert not (run_dir / "checkpoints" / "final.ckpt").exists()

    resumed = fork.call("train.py", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert only_run_dir(root) == run_dir
    assert_same_run(run_dir, reference)


def start_training(fork, root: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(fork.path / "train.py"), "--root_dir", str(root), *args]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=fork.path,
        env={**os.environ, **(env or {})},
    )


def wait_for_step(root: Path, step: int, proc: subprocess.Popen) -> None:
    """Until the CSV log shows `step` or a later one: the run is training."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        logs = list(root.glob("*/logs/csv/metrics.csv"))
        lines = logs[0].read_text().splitlines() if logs else []
        if len(lines) > 1:
            column = lines[0].split(",").index("step")
            if any(
                int(line.split(",")[column]) >= step
                for line in lines[1:]
                if line.count(",") == lines[0].count(",")
            ):
                return
        time.sleep(0.005)
    raise AssertionError(f"training never reached step {step}")


SLOW = ["--num_samples", "20000"]  # epochs long enough to be interrupted in the middle, reliably


@pytest.fixture(scope="module")
def slow_reference(fork, tmp_path_factory) -> Path:
    return fork.train(tmp_path_factory.mktemp("slow_reference"), *ARGS, *SLOW)


@pytest.mark.slow
def test_sigkill_mid_epoch_from_outside_then_resume_auto_is_bitwise_identical(
    fork, tmp_path, slow_reference
):
    root = tmp_path / "runs"
    per_epoch = steps_per_epoch(slow_reference)
    proc = start_training(fork, root, *ARGS, *SLOW)
    wait_for_step(root, per_epoch + 6, proc)  # after a mid-epoch checkpoint of epoch 2
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    run_dir = only_run_dir(root)
    assert not (run_dir / "checkpoints" / "final.ckpt").exists()

    # What a requeued job runs: the same command line, with --resume auto.
    resumed = fork.call("train.py", "--root_dir", str(root), "--resume", "auto", *ARGS, *SLOW)
    assert resumed.returncode == 0, resumed.stderr
    assert f"--resume auto: resuming the newest unfinished run {run_dir}" in resumed.stdout
    assert re.search(rf"Resuming from {run_dir}/checkpoints/step-\d+\.ckpt", resumed.stdout), (
        resumed.stdout
    )
    assert only_run_dir(root) == run_dir
    assert_same_run(run_dir, slow_reference)


# Not marked slow: the quick suite's (`-m "not slow"`) check that a kill resumes to the bit. Two epochs of 56 steps:
# long enough to be killed in the middle of the second, short enough for a few seconds of training in all.
QUICK = [*ARGS, "--epochs", "2", "--num_samples", "5000"]


def test_sigkill_mid_epoch_from_outside_then_resume_is_bitwise_identical_quick(fork, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path / "runs"
    proc = start_training(fork, root, *QUICK, env={"PYTHONUNBUFFERED": "1"})
    # Meanwhile, the uninterrupted run in the fork's worker: its start-up overlaps the process's.
    with ThreadPoolExecutor(max_workers=1) as pool:
        uninterrupted = pool.submit(fork.train, tmp_path / "reference", *QUICK)
        banner = (re.search(r"(\d+) steps/epoch", line) for line in proc.stdout)
        per_epoch = int(next(filter(None, banner), [0, 0])[1])  # 0: it ended without its banner
        assert per_epoch, proc.communicate()[1][-3000:]
        wait_for_step(root, per_epoch + 6, proc)  # after a mid-epoch checkpoint of epoch 2
        proc.kill()
        reference = uninterrupted.result()
    assert proc.wait() == -signal.SIGKILL
    assert per_epoch == steps_per_epoch(reference)
    run_dir = only_run_dir(root)
    assert not (run_dir / "checkpoints" / "final.ckpt").exists()

    resumed = fork.call("train.py", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(
        rf"Resuming from {run_dir}/checkpoints/step-\d+\.ckpt: step \d+, in epoch 2\n",
        resumed.stdout,
    ), resumed.stdout
    assert only_run_dir(root) == run_dir
    assert_same_run(run_dir, reference)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_saves_exits_with_documented_code_and_resumes_bitwise(
    fork, tmp_path, slow_reference, signum, exit_code
):
    root = tmp_path / "runs"
    proc = start_training(fork, root, *ARGS, *SLOW)
    wait_for_step(root, steps_per_epoch(slow_reference) + 4, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == exit_code, err
    run_dir = only_run_dir(root)
    newest = sorted((run_dir / "checkpoints").glob("step-*.ckpt"))[-1]
    saved_step = torch.load(newest, weights_only=True)["global_step"]
    assert (
        f"Stopped by {signal.Signals(signum).name} at step {saved_step}: {newest} saved. Continue with: "
        f"python train.py --resume {run_dir}" in out
    )
    assert (
        saved_step >= steps_per_epoch(slow_reference) + 4
        and not (run_dir / "checkpoints" / "final.ckpt").exists()
    )

    resumed = fork.call("train.py", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_dir, slow_reference)


@pytest.mark.slow
def test_sigusr1_saves_then_exits_138_which_the_sbatch_script_requeues_on(fork, tmp_path):
    root = tmp_path / "runs"
    proc = start_training(fork, root, *ARGS, *SLOW)
    wait_for_step(root, 4, proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 138, (
        err
    )  # docs/resume.md's script: [ $? -eq 138 ] && scontrol requeue
    saved = max((only_run_dir(root) / "checkpoints").glob("step-*.ckpt"))  # the signal's
    assert f"Stopped by SIGUSR1 at step {int(saved.name[5:13])}: {saved} saved." in out


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(fork, tmp_path, reference):
    run_dir = fork.train(tmp_path, *ARGS)
    (run_dir / "checkpoints" / "final.ckpt").unlink()  # as if killed just before the end
    *_, previous, newest = sorted((run_dir / "checkpoints").glob("step-*.ckpt"))
    newest.write_bytes(newest.read_bytes()[:1000])
    resumed = fork.call("train.py", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert (
        f"warning: skipping an unloadable checkpoint: cannot load checkpoint {newest}"
        in resumed.stderr
    )
    assert f"Resuming from {previous}: " in resumed.stdout
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_resume_from_a_chosen_checkpoint_continues_in_a_new_run_dir_and_leaves_the_run_as_it_was(
    fork, tmp_path, reference
):
    from conftest import snapshot

    chosen = sorted((reference / "checkpoints").glob("step-*.ckpt"))[0]  # the oldest one kept
    step = torch.load(chosen, weights_only=True)["global_step"]
    before = snapshot(reference)
    resumed = fork.call("train.py", "--resume", str(chosen), "--root_dir", str(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert (
        f"Resuming from {chosen}: " in resumed.stdout
        and "(a chosen checkpoint: in a new run dir)" in resumed.stdout
    )
    branch = only_run_dir(tmp_path)
    assert snapshot(reference) == before  # the run it came from is untouched
    assert_same_run(
        branch, reference
    )  # its logs up to the checkpoint, then the same training to the bit
    record = yaml.safe_load((branch / "provenance.yaml").read_text())[-1]
    assert (record["step"], record["from_checkpoint"]) == (step, str(chosen.resolve()))
    assert record["overrides"] == {"root_dir": [str(reference.parent), str(tmp_path)]}


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_checkpoint_carrying_a_malicious_pickle_is_refused_not_run(fork, tmp_path):
    run_dir = fork.train(tmp_path / "runs", "--epochs", "2")
    marker = tmp_path / "PWNED"
    exploit = _Exploit()
    exploit.marker = marker
    evil = run_dir / "checkpoints" / "step-99999999.ckpt"  # the newest, so resume tries it first
    torch.save(
        {"model": exploit}, evil
    )  # a complete, undamaged file: only its content is malicious
    (run_dir / "checkpoints" / "final.ckpt").unlink()

    result = fork.run("test.py", "--out_dir", str(run_dir), "--checkpoint", str(evil))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"error: cannot load checkpoint {evil}: it holds objects other than tensors and "
        "plain Python values, and loading it could run code: refused"
    )
    resumed = fork.call(
        "train.py", "--resume", str(run_dir), "--epochs", "3"
    )  # skips it with a warning
    assert resumed.returncode == 0, resumed.stderr
    assert not marker.exists()
    assert torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True)["epoch"] == 3


@pytest.mark.slow
@pytest.mark.parametrize(
    "grad_clip", ["0", "1.0"]
)  # 1.0 is the default: clipping must not turn it into a crash
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(
    fork, tmp_path, grad_clip
):
    root = tmp_path / "runs"
    # SGD at a huge learning rate, warmed up over 2 epochs: the loss explodes after a few steps.
    result = fork.call(
        "train.py",
        "--root_dir",
        str(root),
        "--optimizer",
        "sgd",
        "--lr",
        "1e4",
        "--warmup",
        "2",
        "--grad_clip",
        grad_clip,
        "--epochs",
        "3",
        "--checkpoint_every_n_steps",
        "1",
        "--log_interval",
        "1",
    )
    assert result.returncode == 3 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    match = re.fullmatch(
        r"error: the (training loss is (nan|inf)|weights are not finite) at step (\d+).*", last_line
    )
    checkpoints = sorted((only_run_dir(root) / "checkpoints").glob("step-*.ckpt"))
    assert checkpoints, "the run should have saved good checkpoints before diverging"
    assert match and last_line.endswith(
        f"stopped without saving; resume with a lower --lr or a --grad_clip: it "
        f"continues from {checkpoints[-1].name}, the last finite weights"
    ), last_line
    for (
        ckpt
    ) in checkpoints:  # every checkpoint written holds finite weights, from before the failure
        assert all(t.isfinite().all() for t in model_weights(ckpt).values()), ckpt.name
        assert torch.load(ckpt, weights_only=True)["global_step"] < int(match.group(3))


@pytest.mark.slow
def test_a_loss_that_is_non_finite_before_any_checkpoint_promises_none(fork, tmp_path):
    result = fork.call(
        "train.py",
        "--root_dir",
        str(tmp_path),
        "--optimizer",
        "sgd",
        "--lr",
        "1e4",
        "--warmup",
        "0",
        "--grad_clip",
        "0",
        "--epochs",
        "3",
        "--log_interval",
        "1",
    )  # diverges before epoch 1 ends
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "stopped without saving; no checkpoint was saved before it: start again with a lower --lr or a --grad_clip"
        )
    )
    assert not list((only_run_dir(tmp_path) / "checkpoints").glob("*.ckpt"))


@pytest.mark.slow
def test_resume_auto_without_a_run_or_after_a_finished_one_starts_a_new_run(fork, tmp_path):
    started = fork.call("train.py", "--root_dir", str(tmp_path), "--resume", "auto", "--fast_run")
    assert (
        f"--resume auto: no unfinished run named *-run with a checkpoint under {tmp_path}: a new run"
        in started.stdout
    )
    finished = only_run_dir(tmp_path)

    again = fork.call("train.py", "--root_dir", str(tmp_path), "--resume", "auto", "--fast_run")
    assert (
        f"--resume auto: no unfinished run named *-run with a checkpoint under {tmp_path}: a new run"
        in again.stdout
    )
    newest = max(tmp_path.iterdir())
    assert newest != finished

    (newest / "checkpoints" / "final.ckpt").unlink()  # now it looks interrupted
    resumed = fork.call(
        "train.py", "--root_dir", str(tmp_path), "--resume", "auto"
    )  # its saved config is used
    assert f"resuming the newest unfinished run {newest}" in resumed.stdout
    assert (
        "already finished its 1 epochs; finishing the run" in resumed.stdout
    )  # the saved --fast_run: 1 epoch
    assert torch.load(newest / "checkpoints" / "final.ckpt", weights_only=True)["config"][
        "fast_run"
    ]


@pytest.mark.slow
def test_a_second_writer_into_a_run_being_trained_is_refused_in_one_line(fork, tmp_path):
    root = tmp_path / "runs"
    proc = start_training(fork, root, *ARGS, *SLOW, "--epochs", "40")
    wait_for_step(root, 4, proc)
    run_dir = only_run_dir(root)
    for args in (
        ["--resume", str(run_dir)],
        ["--root_dir", str(root), "--resume", "auto", *ARGS, *SLOW],
    ):
        second = fork.call("train.py", *args)
        assert proc.poll() is None, "the first run should still be training"
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert (
            second.stderr.strip()
            .splitlines()[-1]
            .startswith(f"error: {run_dir} is being trained by pid {proc.pid} on ")
        ), second.stderr
    proc.send_signal(
        signal.SIGTERM
    )  # the first run saves and stops; its lock goes with its process
    assert proc.wait(timeout=120) == 143
    finished = fork.call(
        "train.py", "--resume", str(run_dir), "--epochs", "1"
    )  # now a writer may take over
    assert finished.returncode == 0, finished.stderr
    assert (run_dir / "checkpoints" / "final.ckpt").is_file()


@pytest.mark.slow
def test_resume_auto_picks_up_an_interrupted_run_even_after_a_later_one_finished(fork, tmp_path):
    interrupted = fork.train(tmp_path, "--epochs", "2")
    (interrupted / "checkpoints" / "final.ckpt").unlink()  # as if killed before the end
    later = fork.train(
        tmp_path, "--fast_run"
    )  # another run with the same --out_dir, which finished
    assert later.name > interrupted.name
    resumed = fork.call("train.py", "--root_dir", str(tmp_path), "--resume", "auto")
    assert f"--resume auto: resuming the newest unfinished run {interrupted}" in resumed.stdout
    assert (interrupted / "checkpoints" / "final.ckpt").is_file()


@pytest.mark.slow
def test_a_kill_while_a_checkpoint_is_written_leaves_nothing_outside_the_run(fork, tmp_path):
    # Fabric's own save writes a temporary file in $TMPDIR and moves it into place; a kill at that moment used to
    # leave the whole checkpoint there. The template writes straight into checkpoints/, under a temporary name.
    runner = fork.path / "crash_runner.py"
    runner.write_text(CRASH_RUNNER)
    tmpdir, root = tmp_path / "tmpdir", tmp_path / "runs"
    tmpdir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    for when in [
        "move_into_place",
        "mid_write",
    ]:  # the moment Fabric's save would move its file; our write
        crashed = subprocess.run(
            [sys.executable, str(runner), when, "3", "--root_dir", str(root / when), *ARGS],
            capture_output=True,
            text=True,
            cwd=fork.path,
            timeout=300,
            env=env,
        )
        assert crashed.returncode in (0, -signal.SIGKILL), crashed.stderr
        assert not [p for p in tmpdir.rglob("*") if p.is_file()], (
            when
        )  # (torch makes an empty cache folder there)
    killed = only_run_dir(root / "mid_write")
    assert list(
        (killed / "checkpoints").glob(".*.tmp")
    )  # the cut-off file is in the run, under a temporary name
    assert fork.call("train.py", "--resume", str(killed)).returncode == 0
    assert not list((killed / "checkpoints").glob(".*.tmp"))  # and the resume removes it


@pytest.mark.slow
@pytest.mark.parametrize("how", ["RUN_DIR", "auto"])
def test_sigterm_during_the_last_validation_then_resume_finishes_the_run_once(fork, tmp_path, how):
    runner = fork.path / "crash_runner.py"
    runner.write_text(CRASH_RUNNER)
    root = tmp_path / "runs"
    stopped = subprocess.run(
        [
            sys.executable,
            str(runner),
            "sigterm_in_validation",
            "3",
            "--root_dir",
            str(root),
            "--epochs",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=fork.path,
        timeout=300,
    )
    assert stopped.returncode == 143, stopped.stderr
    run_dir = only_run_dir(root)
    last = max((run_dir / "checkpoints").glob("step-*.ckpt"))
    assert (
        f"Stopped by SIGTERM at step {last.stem[5:].lstrip('0')}: {last} saved. Continue with: python train.py "
        f"--resume {run_dir}" in stopped.stdout
    )
    assert (
        torch.load(last, weights_only=True)["epoch"] == 2
    )  # the last epoch's checkpoint, after its validation
    assert not (run_dir / "checkpoints" / "final.ckpt").exists()

    finished = fork.call(
        "train.py",
        *(
            ["--resume", str(run_dir)]
            if how == "RUN_DIR"
            else ["--root_dir", str(root), "--resume", "auto"]
        ),
    )
    assert finished.returncode == 0, finished.stderr
    assert (
        "already finished its 2 epochs; finishing the run" in finished.stdout
        and "Finished 0 steps" in finished.stdout
    )
    assert bitwise_equal(run_dir / "checkpoints" / "final.ckpt", last)
    assert "best val/mae" in finished.stdout
    # The record as an uninterrupted run's, to its memory/* row at the end (issue 21, item 9).
    assert logged_values(run_dir) == logged_values(fork.train(tmp_path / "whole", "--epochs", "2"))
    again = fork.call(
        "train.py", "--root_dir", str(root), "--resume", "auto"
    )  # a requeued job moves on
    assert (
        f"--resume auto: no unfinished run named *-run with a checkpoint under {root}: a new run"
        in again.stdout
        and len(list(root.iterdir())) == 2
    )


def crash(fork, when: str, n: int, *args: str) -> subprocess.CompletedProcess:
    runner = fork.path / "crash_runner.py"
    runner.write_text(CRASH_RUNNER)
    return subprocess.run(
        [sys.executable, str(runner), when, str(n), *args],
        capture_output=True,
        text=True,
        cwd=fork.path,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize("column", ["val/", "memory/"])  # mid-run; at the end, before final.ckpt
def test_a_kill_inside_a_rewrite_of_metrics_csv_loses_no_row(fork, tmp_path, reference, column):
    root = tmp_path / "runs"
    killed = crash(fork, "csv_rewrite", column, "--root_dir", str(root), *ARGS)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = only_run_dir(root)
    filled = [{k: v for k, v in row.items() if v} for row in logged_values(run_dir)]
    whole = [{k: v for k, v in row.items() if v} for row in logged_values(reference)]
    # As it was before the write that died: every row up to it, no column of the new kind.
    header = list(logged_values(run_dir)[0])
    assert filled == whole[: len(filled)] and not [k for k in header if k.startswith(column)]
    resumed = fork.call("train.py", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_ctrl_c_during_start_up_is_one_line(fork, tmp_path):
    root = tmp_path / "runs"
    proc = start_training(fork, root, *ARGS)
    maps = Path(f"/proc/{proc.pid}/maps")
    while proc.poll() is None and "libtorch" not in maps.read_text():  # importing torch
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and not out, out
    assert err.strip() == "error: interrupted by Ctrl-C: stopped without saving"
    assert not root.exists()  # nothing was written


@pytest.mark.slow
def test_ctrl_c_from_a_terminal_reaches_the_loader_workers_too_and_they_say_nothing(fork, tmp_path):
    root = tmp_path / "runs"
    proc = start_training(fork, root, *ARGS, "--epochs", "40", "--num_workers", "2")
    wait_for_step(root, 4, proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    assert len(workers.stdout.split()) >= 2  # the two persistent loader workers
    for pid in [proc.pid, *map(int, workers.stdout.split())]:
        os.kill(pid, signal.SIGINT)  # as a terminal's Ctrl-C: every process of the job
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Stopped by SIGINT at step" in out, err[-2000:]
    assert "error:" not in err and "Traceback" not in err, err[-2000:]


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_in_one_line_and_the_run_resumes_bitwise(
    fork, tmp_path, reference
):
    root = tmp_path / "runs"
    stopped = crash(fork, "ctrl_c_twice", 5, "--root_dir", str(root), *ARGS)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    errors = [line for line in stopped.stderr.splitlines() if "error:" in line]
    assert errors == ["error: a second Ctrl-C: stopped at once; the checkpoints on disk stay"]
    assert "Traceback" not in stopped.stderr and "Stopped by" not in stopped.stdout
    run_dir = only_run_dir(root)
    assert fork.call("train.py", "--resume", str(run_dir)).returncode == 0
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_an_extension_killed_midway_resumes_from_its_own_newest_checkpoint_not_the_old_final(
    fork, tmp_path
):
    import shutil

    done = fork.train(tmp_path / "a", *ARGS, "--epochs", "2")
    copy = tmp_path / "b" / done.name
    shutil.copytree(done, copy)
    final_step = torch.load(done / "checkpoints" / "final.ckpt", weights_only=True)["global_step"]
    assert (
        fork.call("train.py", "--resume", str(done), "--epochs", "4").returncode == 0
    )  # the uninterrupted one

    killed = crash(
        fork, "before_prune", 3, "--resume", str(copy), "--epochs", "4"
    )  # its 3rd save is on disk
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    newest = max((copy / "checkpoints").glob("step-*.ckpt"))
    assert (
        int(newest.stem.split("-")[1]) > final_step
    )  # newer than the old final.ckpt, which is still there
    resumed = fork.call("train.py", "--root_dir", str(tmp_path / "b"), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming the newest unfinished run {copy}" in resumed.stdout
    assert f"Resuming from {newest}: " in resumed.stdout  # not from final.ckpt at step {final_step}
    assert_same_run(copy, done)


@pytest.mark.slow
def test_checkpoints_that_do_not_load_are_set_aside_and_never_make_rotation_delete_good_ones(
    fork, tmp_path
):
    run_dir = fork.train(tmp_path, *ARGS, "--epochs", "2")
    ckpt_dir = run_dir / "checkpoints"
    junk = {
        f"step-9999999{i}.ckpt": f"junk {i}".encode() for i in range(3)
    }  # newer by name than any real one
    for name, content in junk.items():
        (ckpt_dir / name).write_bytes(content)
    resumed = fork.call("train.py", "--resume", str(run_dir), "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr
    for name, content in junk.items():
        # One line for each: why it does not load, and where it went.
        (line,) = [x for x in resumed.stderr.splitlines() if f"{ckpt_dir / name}:" in x]
        assert line.startswith("warning: skipping an unloadable checkpoint: ") and line.endswith(
            f"; renamed {name}.damaged, out of the rotation"
        )
        assert (
            ckpt_dir / f"{name}.damaged"
        ).read_bytes() == content  # kept as it was, renamed in place
    kept = sorted(ckpt_dir.glob("step-*.ckpt"))
    assert len(kept) == 3 and all(
        torch.load(p, weights_only=True)["epoch"] >= 2 for p in kept
    )  # the newest three
    assert (
        max(kept).name
        == f"step-{torch.load(ckpt_dir / 'final.ckpt', weights_only=True)['global_step']:08d}.ckpt"
    )
    again = fork.call("train.py", "--resume", str(run_dir), "--epochs", "4")
    assert again.returncode == 0 and "warning" not in again.stderr, again.stderr


@pytest.mark.slow
def test_a_kill_between_best_ckpt_and_its_epoch_checkpoint_leaves_best_ckpt_right(
    fork, tmp_path, reference
):
    killed = crash(fork, "between_best_and_periodic", 2, "--root_dir", str(tmp_path), *ARGS)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = only_run_dir(tmp_path)
    resumed = fork.call("train.py", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert f"best val/mae {best['best']['value']:.4f} at epoch {best['epoch']}" in resumed.stdout
    assert bitwise_equal(
        run_dir / "checkpoints" / "best.ckpt", reference / "checkpoints" / "best.ckpt"
    )
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_a_kill_after_a_validation_logged_at_a_mid_epoch_checkpoint_step_logs_it_once(
    fork, tmp_path
):
    args = ["--epochs", "2", "--checkpoint_every_n_steps", "4", "--log_interval", "2"]
    reference = fork.train(tmp_path / "reference", *args)
    per_epoch = steps_per_epoch(reference)
    assert (
        per_epoch % 4 == 0
    )  # the last step of epoch 1 has a mid-epoch checkpoint, then the validation
    # Saves: step 4, the mid-epoch one at the epoch's last step, then the epoch's own, which the kill prevents.
    killed = crash(
        fork, "before_save", per_epoch // 4 + 1, "--root_dir", str(tmp_path / "runs"), *args
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    assert [r["step"] for r in logged_values(run_dir) if r["val/loss"]] == [
        str(per_epoch)
    ]  # logged, not saved
    assert fork.call("train.py", "--resume", str(run_dir)).returncode == 0
    assert_same_run(run_dir, reference)  # that validation once, as in the run that was never killed


@pytest.mark.slow
def test_a_cut_off_last_row_of_the_csv_log_does_not_stop_a_resume(fork, tmp_path, reference):
    run_dir = fork.train(tmp_path, *ARGS)
    (
        run_dir / "checkpoints" / "final.ckpt"
    ).unlink()  # as if killed at the end, in the middle of writing a row
    *_, resume_from = sorted((run_dir / "checkpoints").glob("step-*.ckpt"))
    log = run_dir / "logs" / "csv" / "metrics.csv"
    log.write_text(log.read_text() + "4,0.00")
    resumed = fork.call("train.py", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_a_checkpoint_with_one_flipped_bit_is_found_by_its_checksum_and_skipped(
    fork, tmp_path, reference
):
    from test_bad_inputs import flip_a_bit

    run_dir = fork.train(tmp_path, *ARGS)
    (run_dir / "checkpoints" / "final.ckpt").unlink()  # as if killed just before the end
    *_, previous, newest = sorted((run_dir / "checkpoints").glob("step-*.ckpt"))
    flip_a_bit(newest, newest)
    resumed = fork.call("train.py", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert (
        f"warning: skipping an unloadable checkpoint: cannot load checkpoint {newest}: it is damaged ("
        in resumed.stderr
        and "does not match its CRC-32 checksum)" in resumed.stderr
    )
    assert f"Resuming from {previous}: " in resumed.stdout
    assert (run_dir / "checkpoints" / f"{newest.name}.damaged").is_file()
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_a_requeued_command_line_with_a_config_file_and_resume_auto_resumes_with_the_same_config(
    fork, tmp_path
):
    config = tmp_path / "exp.yaml"
    config.write_text("epochs: 2\nlog_interval: 3\n")
    command = [
        "--root_dir",
        str(tmp_path / "runs"),
        "--config_path",
        str(config),
        "--resume",
        "auto",
    ]
    first = fork.call("train.py", *command)
    assert first.returncode == 0 and ": a new run" in first.stdout, first.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    (run_dir / "checkpoints" / "final.ckpt").unlink()  # as if preempted at the end
    (run_dir / "checkpoints" / ".step-00000001.ckpt.123.tmp").symlink_to(
        tmp_path
    )  # and a stray link: removed
    again = fork.call("train.py", *command)  # the same command line, as a requeued job runs it
    assert again.returncode == 0, again.stderr
    assert f"resuming the newest unfinished run {run_dir}" in again.stdout
    # The file says what config.yaml says: nothing was overridden.
    assert yaml.safe_load((run_dir / "provenance.yaml").read_text())[-1]["overrides"] == {}
    assert tmp_path.is_dir() and not list((run_dir / "checkpoints").glob(".*.tmp"))


@pytest.mark.slow
def test_fast_run_cannot_turn_a_resumed_real_run_into_a_smoke_test(fork, tmp_path):
    run_dir = fork.train(tmp_path, "--epochs", "2")
    result = fork.call("train.py", "--resume", str(run_dir), "--fast_run")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --resume cannot change --fast_run False -> True: start a new run instead"
    )


@pytest.mark.slow
def test_a_full_disk_stops_the_run_in_one_line_and_keeps_every_checkpoint_before_it(
    fork, tmp_path, reference
):
    failed = crash(fork, "disk_full", 4, "--root_dir", str(tmp_path), *ARGS)
    assert failed.returncode == 4 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    run_dir = only_run_dir(tmp_path)
    line = failed.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"error: No space left on device: {run_dir}/checkpoints/\.step-\d+\.ckpt\.\d+\.tmp", line
    )
    assert (
        len(list((run_dir / "checkpoints").glob("step-*.ckpt"))) == 3
    )  # the three saved before, and best.ckpt
    assert all(
        torch.load(p, weights_only=True)["model"] for p in (run_dir / "checkpoints").glob("*.ckpt")
    )
    resumed = fork.call("train.py", "--resume", str(run_dir))  # with room again
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_a_time_budget_saves_exits_75_and_resume_auto_ends_as_the_unbudgeted_run(
    fork, tmp_path, reference
):
    root = tmp_path / "runs"
    # A 1 s budget is spent before training starts (importing lightning alone takes longer): the run stops at its
    # first check, after step 1, as a job does whose scheduler limit is near.
    budgeted = fork.run("train.py", "--root_dir", str(root), *ARGS, "--max_time", "00:00:00:01")
    assert budgeted.returncode == 75, budgeted.stderr[-3000:]
    run_dir = only_run_dir(root)
    first = run_dir / "checkpoints" / "step-00000001.ckpt"
    assert (
        f"Stopped by the time budget (--max_time) at step 1: {first} saved. Continue with: python train.py "
        f"--resume {run_dir}" in budgeted.stdout
    )
    assert first.exists() and not (run_dir / "checkpoints" / "final.ckpt").exists()

    resumed = fork.call(
        "train.py", "--root_dir", str(root), "--resume", "auto", *ARGS, "--max_time", "01:00:00:00"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert only_run_dir(root) == run_dir
    assert_same_run(run_dir, reference)


@pytest.mark.slow
@pytest.mark.parametrize(("write_seconds", "expected"), [(0.0, 75), (3.0, 72)])
def test_the_time_budget_keeps_twice_the_longest_stretch_between_checks_the_longest_write_and_a_margin(
    monkeypatch, write_seconds, expected
):
    import signal as signals
    from types import SimpleNamespace

    from machinery import checkpoints
    from machinery import signals as stop_signals

    handlers = {signum: signals.getsignal(signum) for signum in stop_signals.SIGNALS}
    monkeypatch.setattr(stop_signals, "process_start_time", lambda: 0.0)
    monkeypatch.setattr(
        checkpoints, "longest_write_seconds", write_seconds
    )  # in the background; the exit waits
    now = [10.0]  # 10 s of start-up
    one_process = SimpleNamespace(world_size=1)
    # A margin of 5 s; every=1 as for one process (with several, only every `every` steps talk).
    with stop_signals.StopSignals(budget=100.0, every=1, clock=lambda: now[0]) as stop:
        assert all(signals.getsignal(signum) == stop.handle for signum in stop_signals.SIGNALS)
        for stopped_at in [
            *range(11, 51),
            *range(60, 100),
        ]:  # steps of 1 s, then a 10 s validation at 60
            now[0] = float(stopped_at)
            if stop.agreed(one_process, stopped_at):
                break
        agreed = stop.agreed(one_process)
    assert {signum: signals.getsignal(signum) for signum in handlers} == handlers  # put back
    assert (
        stopped_at == expected and agreed == stop_signals.OUT_OF_TIME
    )  # 75 + 2 x 10 + 5 = the budget


@pytest.mark.slow
def test_a_checkpoint_holds_its_steps_weights_though_written_after_training_moved_on_and_one_is_in_flight(
    tmp_path,
):
    import threading

    from machinery import checkpoints
    from machinery.launch import make_fabric

    fabric = make_fabric("cpu", "1")
    model = fabric.setup(torch.nn.Linear(4, 2))
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    writer_free, path = threading.Event(), tmp_path / "checkpoints" / "step-00000001.ckpt"
    checkpoints._publisher.submit(
        writer_free.wait
    )  # the writer thread is busy: the save can only be queued
    checkpoints.save_checkpoint(fabric, {"model": model, "global_step": 1}, path)
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on while the checkpoint waits to be written
    second = threading.Thread(
        target=checkpoints.save_checkpoint,
        args=(fabric, {"model": model, "global_step": 2}, path.with_name("step-00000002.ckpt")),
    )
    second.start()
    second.join(timeout=0.5)
    assert (
        second.is_alive() and not path.exists()
    )  # the next save waits for the one in flight: one snapshot held
    writer_free.set()
    second.join(timeout=30)
    checkpoints.wait_for_checkpoints()
    first = torch.load(path, weights_only=True)
    assert first["global_step"] == 1 and all(
        torch.equal(first["model"][k], saved[k]) for k in saved
    )
    later = torch.load(path.with_name("step-00000002.ckpt"), weights_only=True)["model"]["weight"]
    assert torch.equal(later, saved["weight"] + 1.0)
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "step-00000001.ckpt",
        "step-00000002.ckpt",
    ]
