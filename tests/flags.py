"""python tests/flags.py: docs/configuration.md's flag tables, from --help (test_readme.py)."""

import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the template's root, from anywhere

from simple_parsing.docstring import get_attribute_docstring  # noqa: E402

from config import TestConfig, TrainConfig  # noqa: E402
from machinery.cli import registries  # noqa: E402


def rows(cfg: Any) -> list[str]:
    out = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        doc = " ".join(get_attribute_docstring(type(cfg), f.name).docstring_below.split())
        out += rows(value) if is_dataclass(value) else [f"| `--{f.name}` | `{value!r}` | {doc} |"]
    return out


def flag_reference() -> str:
    header = ["| flag | default | what it does |", "|---|---|---|"]
    train = [*header, *rows(TrainConfig())]
    train += ["| `--config_path` | | Path to a config file containing default values to use. |"]
    train += ["| `--debug` | | On an error, show the traceback. |"]
    names = "The names `--dataset` and `--model` take (the end of `train.py --help`):"
    blocks = ["**train.py**", "\n".join(train), names, f"```\n{registries()}\n```", "**test.py**"]
    return "\n\n".join([*blocks, "\n".join([*header, *rows(TestConfig())])])


if __name__ == "__main__":
    print(flag_reference())
