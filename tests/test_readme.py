"""The README and the docs pages cannot drift from the code: their commands run, and their flag
tables are the config's docstrings."""

import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO, run_cli, run_script

from config import TestConfig, TrainConfig
from machinery.cli import make_parser
from tests.flags import flag_reference
from tests.test_digits import write_tiny_mnist

pytestmark = pytest.mark.slow
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]  # the order the commands run in
CONFIGURATION = REPO / "docs" / "configuration.md"  # the page with the flag tables
COMMAND = re.compile(r"python (train\.py|test\.py|tools/stream\.py)\b")
RUN_DIR_PLACEHOLDER = re.compile(r"^(RUN_DIR|runs/\d{8}-\d{6}-run)$")
CHECKPOINT_PLACEHOLDER = re.compile(r"^(RUN_DIR|runs/\d{8}-\d{6}-run)/checkpoints/step-\d+\.ckpt$")


def page_commands(page: Path) -> list[str]:
    """Every `python train.py|test.py|tools/stream.py ...` line of a page's bash blocks, except
    those marked `# not run here`."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if "# not run here" in line:
                continue
            line = line.split("&&")[-1].split("#")[0].strip()  # "... && python train.py  # comment"
            line = re.sub(r"^(\w+=\S+\s+)+", "", line)  # WANDB_MODE=offline python ...
            if COMMAND.match(line):
                commands.append(line)
    return commands


def test_every_command_of_the_readme_and_docs_runs(tmp_path, capsys):
    commands = [command for page in PAGES for command in page_commands(page)]
    assert len(commands) >= 12, commands
    write_tiny_mnist(tmp_path / "data", "MNIST", num_train=300, num_test=50)
    write_tiny_mnist(tmp_path / "data", "FashionMNIST", num_train=300, num_test=50)
    runs = tmp_path / "runs"
    run_dir = None
    for command in commands:
        script, *args = shlex.split(command)[1:]
        args = [str(run_dir) if RUN_DIR_PLACEHOLDER.match(a) else a for a in args]
        args = [
            str(min((run_dir / "checkpoints").glob("step-*.ckpt")))
            if CHECKPOINT_PLACEHOLDER.match(a)
            else a
            for a in args
        ]
        streamed = script == "tools/stream.py" or "streamed" in args
        if streamed:  # converted chunks: in tmp_path
            args = [str(tmp_path / a) if a.startswith("data/") else a for a in args]
        if script == "train.py":
            args += ["--root_dir", str(runs), "--fast_run"]  # later flags win
            if "--dataset" in args and not streamed:
                args += ["--data_dir", str(tmp_path / "data")]
        # Several processes, wandb's service process or the converter: a real command. The rest in
        # this process.
        if "--devices" in args or "wandb" in args or script == "tools/stream.py":
            result = run_script(script, *args)
            assert result.returncode == 0, (command, result.stderr[-2000:])
        else:
            assert run_cli(script[:-3], *args) == 0, (command, capsys.readouterr())
        if script == "train.py":
            run_dir = max(runs.iterdir())  # the newest run: what the pages' RUN_DIR stands for next
        if script == "test.py":
            tested = Path(args[args.index("--out_dir") + 1])
            assert (tested / "test" / "metrics.json").is_file(), command


def test_flag_tables_are_generated_from_the_config():
    page = CONFIGURATION.read_text()
    block = page.split("<!-- flags:begin")[1].split("-->", 1)[1].split("<!-- flags:end -->")[0]
    assert block.strip() == flag_reference(), "regenerate with: python tests/flags.py"


@pytest.mark.parametrize("config_class", [TrainConfig, TestConfig])
def test_flag_tables_match_help(config_class):
    parser = make_parser(config_class)
    parser.parse_known_args([])  # simple_parsing adds arguments on its first parse (a no-op after)
    help_text = " ".join(parser.format_help().split())
    table = flag_reference().split("**test.py**")[config_class is TestConfig]
    rows = re.findall(r"^\| `(--\w+)` \| [^|]* \| (.*) \|$", table, re.MULTILINE)
    assert len(rows) >= (30 if config_class is TrainConfig else 5)
    for flag, doc in rows:
        assert flag in help_text and doc in help_text, flag
