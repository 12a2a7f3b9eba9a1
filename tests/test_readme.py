"""The README cannot drift from the code: its commands run, and its flag tables are the config's docstrings."""

import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO, run_cli, run_script

from config import TestConfig, TrainConfig, _Parser, flag_reference
from tests.test_digits import write_tiny_mnist

pytestmark = pytest.mark.slow
README = (REPO / "README.md").read_text()
RUN_DIR_PLACEHOLDER = re.compile(r"^(RUN_DIR|runs/\d{8}-\d{6}-run)$")
CHECKPOINT_PLACEHOLDER = re.compile(r"^(RUN_DIR|runs/\d{8}-\d{6}-run)/checkpoints/step-\d+\.ckpt$")


def readme_commands() -> list[str]:
    """Every `python train.py|test.py|plots.py ...` line of the README's bash blocks, without `# not run here`."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if "# not run here" in line:
                continue
            line = line.split("&&")[-1].split("#")[0].strip()  # "pip install ... && python train.py  # comment"
            line = re.sub(r"^(\w+=\S+\s+)+", "", line)  # WANDB_MODE=offline python ...
            if re.match(r"python (train|test|plots)\.py\b", line):
                commands.append(line)
    return commands


def test_every_readme_command_runs(tmp_path, capsys):
    commands = readme_commands()
    assert len(commands) >= 12, commands
    write_tiny_mnist(tmp_path / "data", "MNIST", num_train=300, num_test=50)
    write_tiny_mnist(tmp_path / "data", "FashionMNIST", num_train=300, num_test=50)
    runs = tmp_path / "runs"
    run_dir = None
    for command in commands:
        script, *args = shlex.split(command)[1:]
        args = [str(run_dir) if RUN_DIR_PLACEHOLDER.match(a) else a for a in args]
        args = [str(min((run_dir / "checkpoints").glob("step-*.ckpt"))) if CHECKPOINT_PLACEHOLDER.match(a) else a
                for a in args]
        if script == "train.py":
            args += ["--root_dir", str(runs), "--fast_run"]  # later flags win
            if "--dataset" in args:
                args += ["--data_dir", str(tmp_path / "data")]
        if script == "plots.py":  # runs/*-seeds: the runs the README made so far; the figure goes to tmp_path
            args = [str(p) for a in args for p in (sorted(runs.glob(a.removeprefix("runs/"))) if "*" in a else [a])]
            args = [str(tmp_path / a) if a.endswith(".png") else a for a in args]
            assert run_cli("plots", *args) == 0, command
            assert all(Path(a).is_file() for a in args if a.endswith(".png")), command
            continue
        # Several processes, or wandb's service process: as a real command. The rest in this process (faster).
        if "--devices" in args or "wandb" in args:
            result = run_script(script, *args)
            assert result.returncode == 0, (command, result.stderr[-2000:])
        else:
            assert run_cli(script[:-3], *args) == 0, (command, capsys.readouterr())
        if script == "train.py":
            run_dir = max(runs.iterdir())  # the newest run: what the README's RUN_DIR stands for next
    assert (run_dir / "test" / "metrics.json").is_file()


def test_readme_flag_tables_are_generated_from_the_config():
    block = README.split("<!-- flags:begin")[1].split("-->", 1)[1].split("<!-- flags:end -->")[0].strip()
    assert block == flag_reference(), "regenerate with: python config.py"


@pytest.mark.parametrize("config_class", [TrainConfig, TestConfig])
def test_flag_tables_match_help(config_class):
    parser = _Parser()
    parser.add_arguments(config_class, dest="cfg")
    parser.parse_known_args([])  # simple_parsing adds the arguments when it first parses
    help_text = " ".join(parser.format_help().split())
    table = flag_reference().split("**test.py**")[config_class is TestConfig]
    rows = re.findall(r"^\| `(--\w+)` \| [^|]* \| (.*) \|$", table, re.M)
    assert len(rows) >= (30 if config_class is TrainConfig else 5)
    for flag, doc in rows:
        if flag not in ("--config_path", "--debug"):
            assert flag in help_text and doc in help_text, flag
