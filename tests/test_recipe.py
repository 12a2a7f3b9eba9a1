"""The recipe stays one screen and the template stays small: the limits the README and issue 20 set, and
the README's "Make it yours" diffs applying to today's train.py exactly as shown."""

import ast
import shutil

import pytest
from conftest import REPO, apply_readme_diff

RUNTIME_BUDGET = 120 * 1024  # bytes of Python outside tests/ and benchmarks/ (issue 20)


def test_train_py_is_one_screen_of_recipe():
    source = (REPO / "train.py").read_text()
    lines = source.splitlines()
    assert len(lines) <= 250 and max(map(len, lines)) <= 100
    (main,) = [n for n in ast.parse(source).body if getattr(n, "name", "") == "main"]
    assert main.end_lineno - main.lineno + 1 <= 100
    (epoch_loop,) = [
        n for n in ast.walk(main) if isinstance(n, ast.For) and ast.unparse(n.target) == "epoch"
    ]
    assert epoch_loop.end_lineno - epoch_loop.lineno + 1 <= 45


def test_runtime_python_stays_within_its_budget():
    files = [
        p
        for p in REPO.rglob("*.py")
        if not {"tests", "benchmarks", ".venv"} & set(p.relative_to(REPO).parts)
    ]
    size = sum(p.stat().st_size for p in files)
    assert size <= RUNTIME_BUDGET, f"{size:,} bytes of runtime Python > {RUNTIME_BUDGET:,}"


@pytest.mark.parametrize("name", ["grad_norm", "gan", "schedule"])
def test_each_make_it_yours_diff_in_the_readme_applies_to_train_py_as_shown(tmp_path, name):
    shutil.copy(REPO / "train.py", tmp_path / "train.py")
    applied = apply_readme_diff(name, tmp_path, "--dry-run")
    # Exactly: no fuzz and no offset, so the line numbers and context the README shows are today's.
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert "offset" not in applied.stdout and "fuzz" not in applied.stdout, applied.stdout
