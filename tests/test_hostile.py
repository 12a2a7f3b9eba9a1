"""Hostile files: a checkpoint handed over by someone else, or files planted in a run dir, never run code,
never make the template write outside the run, and never hang; each problem is one line. (Generic tier: the
toy fork.) Every test here reproduces an attack that worked before issue 21."""

import json
import os
import pickle
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from conftest import only_run_dir, snapshot

pytestmark = pytest.mark.slow

# A sharded (torch.distributed.checkpoint) checkpoint from one process: FSDP2 on one CPU device.
SHARDED = ["--strategy", "fsdp", "--accelerator", "cpu", "--devices", "1", "--epochs", "2"]


@pytest.fixture(scope="module")
def sharded_run(fork, tmp_path_factory) -> Path:
    return fork.train(tmp_path_factory.mktemp("sharded"), *SHARDED)


class Payload:
    """A pickle that runs `touch MARKER`, then returns what `genuine` unpickles to."""

    def __init__(self, marker: Path, genuine: bytes) -> None:
        self.marker, self.genuine = marker, genuine

    def __reduce__(self):
        code = f"(__import__('os').system('touch {self.marker}'), __import__('pickle').loads({self.genuine!r}))[1]"
        return (eval, (code,))


def reseal(ckpt: Path) -> None:
    """Recompute a sharded checkpoint's checksums, as someone handing over a doctored one would."""
    files = sorted(p for p in ckpt.iterdir() if p.name != "checksums.json")
    sums = {p.name: [p.stat().st_size, zlib.crc32(p.read_bytes())] for p in files}
    (ckpt / "checksums.json").write_text(json.dumps(sums))


def plant(ckpt: Path, marker: Path) -> None:
    """Replace the .metadata of a sharded checkpoint (and of its hard-linked copies) with the payload."""
    metadata = ckpt / ".metadata"
    evil = pickle.dumps(Payload(marker, metadata.read_bytes()))
    with open(metadata, "r+b") as f:  # in place: best.ckpt and final.ckpt share the inode
        f.write(evil)
        f.truncate()
    reseal(ckpt)


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def copy_run(run_dir: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run_dir, to / run_dir.name, copy_function=shutil.copy2)
    return to / run_dir.name


def test_a_sharded_checkpoint_whose_metadata_carries_code_is_refused_at_all_four_ways_in(
    fork, sharded_run, tmp_path
):
    run_dir = copy_run(sharded_run, tmp_path)
    marker = tmp_path / "MARKER"
    for ckpt in (run_dir / "checkpoints").iterdir():
        plant(ckpt, marker)
    refused = "loading it could run code: refused"

    tested = fork.run("test.py", "--out_dir", str(run_dir), "--checkpoint", "final")
    assert tested.returncode == 2 and refused in tested.stderr, tested.stderr
    assert len(errors(tested)) == 1 and not marker.exists()

    for devices in (["--devices", "1", "--strategy", "auto"], ["--devices", "2"]):
        resumed = fork.run("train.py", "--resume", str(run_dir), "--epochs", "3", *devices)
        assert resumed.returncode == 2, resumed.stderr
        assert refused in resumed.stderr and "no loadable checkpoint" in resumed.stderr
        assert "Traceback" not in resumed.stderr and not marker.exists()

    final = run_dir / "checkpoints" / "final.ckpt"
    started = fork.run("train.py", "--root_dir", str(tmp_path / "new"), "--init_from", str(final))
    assert started.returncode == 2 and refused in started.stderr, started.stderr
    assert len(errors(started)) == 1 and not marker.exists()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_shard_is_set_aside_and_the_resume_falls_back_to_the_previous_checkpoint(
    fork, sharded_run, tmp_path, damage
):
    run_dir = copy_run(sharded_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    (ckpts / "final.ckpt").rename(tmp_path / "final.ckpt")  # the run stopped before its end
    newest, older = sorted(ckpts.glob("step-*"))[-2:][::-1]
    shard = newest / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        data = data[: len(data) // 2]
    shard.unlink()  # a new inode: best.ckpt's hard links keep the good bytes
    shard.write_bytes(bytes(data))

    resumed = fork.run("train.py", "--resume", str(run_dir), "--devices", "1", "--strategy", "auto")
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{newest.name}.damaged" in warnings[0], resumed.stderr
    assert "__0_0.distcp" in warnings[0]
    assert f"Resuming from {older}" in resumed.stdout
    assert (ckpts / f"{newest.name}.damaged").is_dir() and (ckpts / "final.ckpt").exists()


def test_writes_never_follow_a_symlink_planted_in_a_run_dir(fork, tmp_path):
    run_dir = fork.train(tmp_path / "runs", "--epochs", "2")
    victims = tmp_path / "victims"
    victims.mkdir()
    planted = [".lock", ".provenance.yaml.tmp", "test/metrics.json"]
    for name in planted:
        victim = victims / name.replace("/", "_")
        victim.write_text("precious\n")
        link = run_dir / name
        link.parent.mkdir(exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(victim)

    resumed = fork.call("train.py", "--resume", str(run_dir), "--epochs", "3")
    tested = fork.run("test.py", "--out_dir", str(run_dir))
    for result in (resumed, tested):
        assert "Traceback" not in result.stderr, result.stderr
    assert all(v.read_text() == "precious\n" for v in victims.iterdir())
    assert resumed.returncode == tested.returncode == 0
    for name in ("test/metrics.json", "provenance.yaml"):
        assert not (run_dir / name).is_symlink()


def test_a_linked_folder_of_a_run_dir_is_never_written_through(fork, tmp_path):
    run_dir = fork.train(tmp_path / "runs", "--epochs", "2")
    outside = tmp_path / "outside"
    (run_dir / "logs").rename(outside)
    (run_dir / "logs").symlink_to(outside)
    before = snapshot(outside)

    resumed = fork.call("train.py", "--resume", str(run_dir), "--epochs", "3")
    assert resumed.returncode == 4 and "Traceback" not in resumed.stderr
    assert errors(resumed) == [
        f"error: {run_dir / 'logs'} is a symbolic link: the template writes only inside the run "
        "directory, never through a link; replace it with a folder"
    ]
    assert snapshot(outside) == before


def test_a_checkpoint_link_leading_out_of_the_run_is_never_loaded_counted_or_rotated(
    fork, tmp_path
):
    other = fork.train(tmp_path / "other", "--epochs", "3")
    run_dir = fork.train(tmp_path / "runs", "--epochs", "2", "--num_checkpoint_keep", "2")
    ckpts = run_dir / "checkpoints"
    (ckpts / "final.ckpt").unlink()  # stopped before its end
    genuine = sorted(p.name for p in ckpts.glob("step-*.ckpt"))
    (ckpts / "step-00000999.ckpt").symlink_to(other / "checkpoints" / "final.ckpt")

    resumed = fork.call("train.py", "--resume", str(run_dir), "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from {ckpts / genuine[-1]}" in resumed.stdout
    assert "step-00000999.ckpt" in resumed.stderr  # named once, as ignored
    assert (ckpts / "step-00000999.ckpt").is_symlink()  # neither loaded nor deleted
    assert {p.name for p in ckpts.glob("step-0*.ckpt") if not p.is_symlink()} == set(genuine)


def test_a_deleted_lock_does_not_let_a_second_process_train_the_same_run(fork, tmp_path):
    import subprocess
    import sys
    import time

    root = tmp_path / "runs"
    cmd = [sys.executable, "train.py", "--root_dir", str(root), "--num_samples", "20000"]
    cmd += ["--checkpoint_every_n_steps", "5"]
    first = subprocess.Popen(cmd, cwd=fork.path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not list(root.glob("*/checkpoints/step-*.ckpt")) and first.poll() is None:
            time.sleep(0.5)
        run_dir = only_run_dir(root)
        (run_dir / ".lock").unlink()
        second = fork.call("train.py", "--resume", str(run_dir))
        assert second.returncode == 2, second.stderr
        assert "is being trained by" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.communicate()


@pytest.mark.parametrize(("field", "value"), [("seed", 7), ("eff_batch_size", 32)])
def test_a_hand_edited_locked_field_of_config_yaml_is_refused(fork, tmp_path, field, value):
    run_dir = fork.train(tmp_path / "runs", "--epochs", "2")
    (run_dir / "checkpoints" / "final.ckpt").unlink()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    group = config if field in config else config["optim"]
    saved, group[field] = group[field], value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = snapshot(run_dir)

    resumed = fork.call("train.py", "--resume", str(run_dir))
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr, resumed.stderr
    (error,) = errors(resumed)
    assert error.startswith(
        f"error: {run_dir / 'config.yaml'} says {field} {value}, its checkpoints {saved}"
    )
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if not k.startswith(".")} == {
        k: v for k, v in before.items() if not k.startswith(".")
    }


def test_a_fifo_for_a_checkpoint_is_refused_not_waited_on(fork, tmp_path):
    run_dir = fork.train(tmp_path / "runs", "--epochs", "2")
    final = run_dir / "checkpoints" / "final.ckpt"
    final.unlink()
    os.mkfifo(final)
    for resume in (str(run_dir), "auto"):
        resumed = fork.call("train.py", "--resume", resume, "--root_dir", str(tmp_path / "runs"))
        assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
        assert "final.ckpt: not a regular file" in resumed.stderr
        final.unlink()
        os.mkfifo(final)


def test_a_damaged_final_ckpt_is_set_aside_with_a_warning(fork, tmp_path):
    run_dir = fork.train(tmp_path / "runs", "--epochs", "2")
    final = run_dir / "checkpoints" / "final.ckpt"
    data = final.read_bytes()
    final.unlink()
    final.write_bytes(data[: len(data) // 2])
    resumed = fork.call("train.py", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "final.ckpt.damaged" in resumed.stderr
    assert (run_dir / "checkpoints" / "final.ckpt.damaged").read_bytes() == data[: len(data) // 2]
    assert torch.load(final, weights_only=True)["epoch"] == 2
