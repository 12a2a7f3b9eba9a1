"""The runtime code uses the public APIs of Lightning, litdata, torch and tqdm, but for the private symbols
listed in ALLOWED, each with the reason no public API serves at its place of use. (Generic tier.)"""

import ast
import importlib
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

LIBRARIES = ("lightning", "lightning_utilities", "litdata", "torch", "tqdm")
# (file, private name): read_sharded rebuilds a sharded checkpoint's nesting from its .metadata, which
# torch's public DCP loader only does into a state dict of known structure.
ALLOWED = {("machinery/checkpoints.py", "_load_distributed_checkpoint")}


def runtime_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True)
    names = {
        *listed.stdout.split(),
        *(str(p.relative_to(REPO)) for p in REPO.glob("machinery/*.py")),
    }
    return [REPO / n for n in sorted(names) if not n.startswith(("tests/", "benchmarks/"))]


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses() -> set[tuple[str, str]]:
    """(file, name) for each private name taken from a library: imported, or read as an attribute of
    anything but our own code's objects (names our own code defines are ours)."""
    trees = {str(f.relative_to(REPO)): ast.parse(f.read_text()) for f in runtime_files()}
    own = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
            ):
                own.add(node.attr)
    found = set()
    for file, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(LIBRARIES):
                parts = node.module.split(".") + [alias.name for alias in node.names]
                found |= {(file, part) for part in parts if private(part)}
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(LIBRARIES):
                        found |= {(file, p) for p in alias.name.split(".") if private(p)}
            elif isinstance(node, ast.Attribute) and private(node.attr) and node.attr not in own:
                found.add((file, node.attr))
    return found


def test_the_runtime_code_takes_no_private_name_from_its_libraries_but_the_allowed_ones():
    assert runtime_files(), "no runtime files found"
    unexpected = sorted(private_uses() - ALLOWED)
    assert not unexpected, f"private names of {LIBRARIES} used (file, name): {unexpected}"


@pytest.mark.parametrize(
    ("module", "name"), [("lightning.fabric.utilities.load", "_load_distributed_checkpoint")]
)
def test_each_allowed_private_symbol_still_exists_in_the_installed_libraries(module, name):
    assert hasattr(importlib.import_module(module), name), (
        f"{module}.{name} is gone (a Lightning upgrade?): machinery/checkpoints.py read_sharded "
        "needs another way to read a sharded checkpoint whole"
    )
