"""Bad input through real processes: one `error:` line per problem, exit code 2, no traceback, no file written.
(tests/test_bad_inputs.py covers every kind of bad input in-process, through the same cli() functions.)"""

import pytest
from conftest import run_script

pytestmark = pytest.mark.slow


def assert_usage_error(result, *expected_lines):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(expected_lines), lines
    for line, expected in zip(lines, expected_lines):
        assert line.startswith("error: ") and expected in line, (line, expected)


def test_bad_values_are_all_reported_at_once(tmp_path):
    result = run_script("train.py", "--root_dir", str(tmp_path), "--lr", "-1", "--logger_name", "csv", "foo",
                        "--dataset", "imagenet", "--model", "resnet9000")
    assert_usage_error(result,
                       "--logger_name 'foo' is not one of: csv, tensorboard, wandb",
                       "--dataset 'imagenet' is not one of: digits, mnist, fashion_mnist, cifar10",
                       "--model 'resnet9000' is not cnn or a torchvision classification model",
                       "--lr -1.0 must be > 0")
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no run dir was created


def test_test_py_bad_run_dir(tmp_path):
    assert_usage_error(run_script("test.py", "--out_dir", str(tmp_path / "nope")), "no such run directory")
