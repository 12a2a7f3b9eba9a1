"""The flag tables of docs/configuration.md, made from the config's docstrings (the --help text).

python tools/flags.py    # prints them; tests/test_readme.py checks the page against them
"""

import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the template's root, from anywhere

from simple_parsing.docstring import get_attribute_docstring  # noqa: E402

from config import TestConfig, TrainConfig  # noqa: E402
from machinery.cli import registries  # noqa: E402


def rows(cls: type, instance: Any) -> list[str]:
    out = []
    for f in fields(cls):
        value = getattr(instance, f.name)
        if is_dataclass(value):
            out += rows(type(value), value)
            continue
        doc = " ".join(get_attribute_docstring(cls, f.name).docstring_below.split())
        shown = " ".join(value) if isinstance(value, list) else ('""' if value == "" else value)
        out.append(f"| `--{f.name}` | `{shown}` | {doc} |")
    return out


def flag_reference() -> str:
    header = ["| flag | default | what it does |", "|---|---|---|"]
    extra = [
        "| `--config_path` | | Path to a config file containing default values to use. |",
        "| `--debug` | | On an error, show the traceback. |",
    ]
    return "\n".join(
        [
            "**train.py**",
            "",
            *header,
            *rows(TrainConfig, TrainConfig()),
            *extra,
            "",
            "The names `--dataset` and `--model` take (the end of `train.py --help`):",
            "",
            "```",
            registries(),
            "```",
            "",
            "**test.py**",
            "",
            *header,
            *rows(TestConfig, TestConfig()),
        ]
    )


if __name__ == "__main__":
    print(flag_reference())
