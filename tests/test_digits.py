"""The template's own task (task tier): digits and the torchvision datasets, the CNN and torchvision models,
classification metrics and test.py's report, and the task's flags. A fork replaces this file with tests of its
own task; the generic tier (see conftest.py) keeps checking the machinery.
"""

import csv
import json
import pickle
import struct
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import yaml
from conftest import bitwise_equal, only_run_dir, run_cli, run_script, train_in_process

from data import DataInfo, load_splits
from machinery.cli import flatten, parse_train_config
from machinery.errors import UsageError
from model import build_model
from task_config import ArchConfig, DataConfig

# --------------------------------------------------------------------------------------------------- flags

TASK_FLAGS = [
    ("--dataset", "mnist", "data.dataset", "mnist"),
    ("--data_dir", "d", "data.data_dir", "d"),
    ("--model", "resnet18", "arch.model", "resnet18"),
    ("--dropout", "0.3", "arch.dropout", 0.3),
]


@pytest.mark.parametrize(("flag", "value", "key", "expected"), TASK_FLAGS)
def test_fabric_demo_task_flags_are_spelled_the_same(flag, value, key, expected):
    assert flatten(parse_train_config([flag, value]))[key] == expected


def test_pretrained_belongs_to_torchvision_models():
    assert parse_train_config(["--model", "resnet18", "--pretrained"]).arch.pretrained
    assert ArchConfig(model="cnn", pretrained=True).problems() == [
        "--pretrained needs a torchvision --model, not cnn"
    ]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--dataset", "imagenet"],
            "--dataset 'imagenet' is not one of: digits, mnist, fashion_mnist, cifar10, "
            "synthetic_cifar10",
        ),
        (
            ["--model", "resnet9000"],
            "--model 'resnet9000' is not one of: cnn, resnet18_cifar, or a torchvision "
            "classification model",
        ),
        (["--dropout", "1.5"], "--dropout 1.5 must be in [0, 1)"),
        (["--pretrained"], "--pretrained needs a torchvision --model, not cnn"),
        (
            ["--dataset", "mnist", "--data_dir", "{tmp}"],
            "--dataset mnist: the files are not in {tmp}/MNIST/raw and could not be downloaded",
        ),
    ],
)
def test_bad_task_input_is_one_clear_line_and_creates_no_run(tmp_path, capsys, args, expected):
    args = [a.format(tmp=tmp_path / "data") for a in args]
    assert run_cli("train", "--root_dir", str(tmp_path / "runs"), *args) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(
        f"error: {expected.format(tmp=tmp_path / 'data')}"
    ), errors
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # a real process that imports torchvision to check --model
def test_bad_values_are_all_reported_at_once_through_a_real_process(tmp_path):
    result = run_script(
        "train.py",
        "--root_dir",
        str(tmp_path),
        "--lr",
        "-1",
        "--logger_name",
        "csv",
        "foo",
        "--dataset",
        "imagenet",
        "--model",
        "resnet9000",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert sorted(result.stderr.strip().splitlines()) == sorted(
        [
            "error: --logger_name 'foo' is not one of: csv, tensorboard, wandb",
            "error: --dataset 'imagenet' is not one of: digits, mnist, fashion_mnist, cifar10, synthetic_cifar10, streamed",
            "error: --model 'resnet9000' is not one of: cnn, resnet18_cifar, or a torchvision classification model (e.g. "
            "resnet18, vit_b_16)",
            "error: --lr -1.0 must be > 0",
        ]
    )
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no run dir was created


# ---------------------------------------------------------------------------------------------------- data


def test_digits_splits_are_disjoint_and_test_is_the_same_for_every_seed():
    def ids(dataset):  # identify samples by their pixels
        return {
            tuple(x.flatten().tolist()) + (int(y),)
            for x, y in zip(*dataset.__getitems__(range(len(dataset))))
        }

    train, val, test, info = load_splits(DataConfig(), seed=1)
    assert (len(train), len(val), len(test)) == (1295, 143, 359)
    assert (info.num_classes, info.in_channels) == (10, 1)
    train2, val2, test2, _ = load_splits(DataConfig(), seed=2)
    assert torch.equal(test.images, test2.images)  # the test split does not move with the seed
    assert not torch.equal(val.images, val2.images)  # the validation split does
    assert not (ids(train) | ids(val) | ids(train2) | ids(val2)) & ids(
        test
    )  # no test image is trained on
    x, y = train.__getitems__([0, 1, 2])
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(train.__getitems__(range(len(train)))[0].mean().item()) < 0.1  # normalised


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of the MNIST files: magic (0, 0, dtype 0x08, ndim), big-endian sizes, then bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_tiny_mnist(
    data_dir: Path, folder: str = "MNIST", num_train: int = 200, num_test: int = 50
) -> None:
    raw = data_dir / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in [("train", num_train), ("t10k", num_test)]:
        labels = np.arange(n) % 10
        images = rng.integers(0, 50, size=(n, 28, 28))
        images[np.arange(n), labels * 2, :] = 255  # a learnable signal: the label is a bright row
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.mark.parametrize(
    ("dataset", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_mnist_style_datasets_load_offline_through_torchvision(tmp_path, dataset, folder):
    write_tiny_mnist(tmp_path, folder)
    train, val, test, info = load_splits(
        DataConfig(dataset=dataset, data_dir=str(tmp_path)), seed=0
    )
    assert (len(train), len(val), len(test)) == (180, 20, 50)
    assert (info.num_classes, info.in_channels) == (10, 1)
    x, y = test.__getitems__([3])
    assert int(y) == 3 and x.shape == (1, 1, 28, 28)
    assert x[0, 0, 6].mean() > x[0, 0, 7].mean()  # row 2 * label is the bright one


def test_cifar10_loads_offline_through_torchvision(tmp_path, monkeypatch):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)

    def write(name, obj):
        (base / name).write_bytes(pickle.dumps(obj))

    for i in range(1, 6):
        write(
            f"data_batch_{i}",
            {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": list(range(10))},
        )
    write(
        "test_batch",
        {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": list(range(10)) * 2},
    )
    write("batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    import torchvision

    # The real files' checksums are hard-coded in torchvision; ours are tiny stand-ins.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    train, val, test, info = load_splits(
        DataConfig(dataset="cifar10", data_dir=str(tmp_path)), seed=0
    )
    assert (len(train), len(val), len(test)) == (45, 5, 20)
    assert (info.num_classes, info.in_channels) == (10, 3)
    assert info.class_names[3] == "class3"
    assert test.__getitems__([0])[0].shape == (1, 3, 32, 32)


def test_missing_dataset_files_offline_say_where_to_put_them(tmp_path):
    with pytest.raises(
        UsageError, match=rf"not in {tmp_path}/MNIST/raw and could not be downloaded"
    ):
        load_splits(DataConfig(dataset="mnist", data_dir=str(tmp_path)), seed=0)


# -------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (1, 28), (3, 32)])
def test_default_cnn_works_for_every_dataset_shape(channels, size):
    model = build_model(ArchConfig(dropout=0.0), DataInfo(10, channels, tuple("0123456789")))
    logits = model(torch.randn(4, channels, size, size))
    assert logits.shape == (4, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dropout_setting_reaches_the_cnn():
    model = build_model(ArchConfig(dropout=0.4), DataInfo(10, 1, ()))
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.4, 0.4]


def test_torchvision_model_by_name_gets_a_head_for_our_classes_and_grey_inputs():
    model = build_model(ArchConfig(model="resnet18", dropout=0.2), DataInfo(7, 1, ()))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert isinstance(model.net.fc[0], torch.nn.Dropout) and model.net.fc[1].out_features == 7


def test_vit_inputs_are_resized_to_the_size_it_needs():
    model = build_model(ArchConfig(model="vit_b_16"), DataInfo(10, 3, ())).eval()
    assert model.image_size == 224
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


# ---------------------------------------------------------------------------------------- the default run


@pytest.mark.slow
def test_default_run_trains_and_test_py_reports_accuracy(default_run):
    run_dir, result = default_run
    assert result.stdout.count(f"Run dir: {run_dir}") == 2  # at the start and at the end
    assert (
        "  best.ckpt: max val/acc" in result.stdout
    )  # the task's MONITOR; accuracy: higher is better
    ckpts = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert ckpts == {
        "best.ckpt",
        "final.ckpt",
        "step-00000160.ckpt",
        "step-00000180.ckpt",
        "step-00000200.ckpt",
    }
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["epochs"] == 10

    test = run_script("test.py", "--out_dir", str(run_dir))
    assert test.returncode == 0, test.stderr
    metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    assert metrics["acc"] >= 0.98
    assert metrics["num_samples"] == 359 and metrics["checkpoint"].endswith("best.ckpt")
    for name in ["loss", "acc", "macro_f1"]:
        assert f"  {name:<9} {metrics[name]:.4f}" in test.stdout
    # Per-class numbers (torchmetrics) agree with the confusion matrix and with the overall accuracy.
    matrix = torch.tensor(metrics["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 359
    assert matrix.trace().item() / 359 == pytest.approx(metrics["acc"])
    assert [c["support"] for c in metrics["per_class"].values()] == matrix.sum(1).tolist()
    for i in range(10):
        c = metrics["per_class"][str(i)]
        assert c["recall"] == pytest.approx(matrix[i, i].item() / matrix[i].sum().item())
        assert c["precision"] == pytest.approx(
            matrix[i, i].item() / max(1, matrix[:, i].sum().item())
        )
    assert f"{'3':>12}  {metrics['per_class']['3']['precision']:9.4f}" in test.stdout
    assert_real_png(run_dir / "test/confusion_matrix.png")

    # On two devices: every number is the same.
    two = run_script("test.py", "--out_dir", str(run_dir), "--accelerator", "cpu", "--devices", "2")
    assert two.returncode == 0, two.stderr
    on_two = json.loads((run_dir / "test" / "metrics.json").read_text())
    assert on_two.pop("loss") == pytest.approx(
        metrics.pop("loss"), rel=1e-6
    )  # float32 sums, in another order
    assert on_two == metrics


def assert_real_png(path):
    """A PNG that decodes to a picture with something in it, not a blank canvas."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels[..., :3].std() > 0.05, path


@pytest.mark.slow
def test_mnist_trains_end_to_end_on_tiny_offline_files(tmp_path):
    write_tiny_mnist(tmp_path / "data", num_train=700, num_test=100)
    run_dir = train_in_process(
        tmp_path / "runs",
        "--dataset",
        "mnist",
        "--data_dir",
        str(tmp_path / "data"),
        "--epochs",
        "3",
        "--eff_batch_size",
        "32",
    )
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert (
        ckpt["best"]["metric"] == "val/acc" and ckpt["best"]["value"] >= 0.9
    )  # the bright row must be learned


def test_a_dataset_of_any_kind_is_split_by_the_seed(monkeypatch):
    import data
    import task_config

    def ramp(cfg):
        """A TensorDataset, not the template's own in-memory image class."""
        fit = torch.utils.data.TensorDataset(torch.arange(100).float(), torch.arange(100))
        return (
            fit,
            torch.utils.data.TensorDataset(torch.zeros(5), torch.zeros(5)),
            DataInfo(2, 1, ("a", "b")),
        )

    monkeypatch.setitem(task_config.DATASETS, "ramp", "0..99")
    monkeypatch.setattr(data, "ramp", ramp, raising=False)
    train, val, test, _ = load_splits(DataConfig(dataset="ramp"), seed=3)
    ids = sorted(int(train[i][1]) for i in range(len(train))) + sorted(
        int(val[i][1]) for i in range(len(val))
    )
    assert (len(train), len(val), len(test)) == (90, 10, 5) and sorted(ids) == list(range(100))


def test_test_py_builds_a_pretrained_model_without_downloading_its_weights(monkeypatch):
    import torchvision

    def download(url, *args, **kwargs):
        raise RuntimeError(f"downloaded {url}")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", download)
    model = build_model(
        ArchConfig(model="resnet18", pretrained=True), DataInfo(10, 3, ()), pretrained=False
    )
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (
        1,
        10,
    )  # built, and nothing was fetched
    with pytest.raises(UsageError, match="--pretrained: could not download the resnet18 weights"):
        build_model(
            ArchConfig(model="resnet18", pretrained=True), DataInfo(10, 3, ())
        )  # what training fetches


@pytest.mark.slow
def test_overfit_batches_2_drives_the_loss_of_those_batches_to_about_zero(tmp_path, capsys):
    # 2 batches of 64 digits, 30 epochs of 2 steps. Chance is a loss of ln 10 = 2.30; below 0.1 the true class gets
    # about 90% of the probability (exp(-0.1)) on average: the model has learned those 128 samples by heart, as a
    # working model and loss must. (It reaches ~0.007 here.) A bug in the model, loss or optimizer stays near 2.3.
    run_dir = train_in_process(tmp_path, "--overfit_batches", "2", "--epochs", "30")
    assert (
        "--overfit_batches: the same 128 samples to train and validate on"
        in capsys.readouterr().out
    )
    rows = list(csv.DictReader((run_dir / "logs" / "csv" / "metrics.csv").open()))
    train_losses = [float(row["train/loss"]) for row in rows if row["train/loss"]]
    val = [(float(row["val/loss"]), float(row["val/acc"])) for row in rows if row["val/loss"]]
    assert train_losses[0] > 1.5 and train_losses[-1] < 0.1
    assert (
        len(val) == 30 and val[-1][0] < 0.1 and val[-1][1] == 1.0
    )  # validated on the same samples
    final = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True)
    assert final["global_step"] == 60


# ------------------------------------------------------------------------------ CIFAR augmentation (--augment)


def test_crop_flip_takes_each_image_from_its_padded_copy_at_a_seeded_offset_and_flips_half():
    from data import CropFlip

    n, pad = 2048, 4
    images = torch.arange(n * 2 * 12 * 12, dtype=torch.float64).view(
        n, 2, 12, 12
    )  # every pixel distinct
    augment = CropFlip(pad)
    torch.manual_seed(0)
    out = augment(images)
    torch.manual_seed(0)
    assert torch.equal(augment(images), out)  # the same seed, the same batch
    torch.manual_seed(1)
    assert not torch.equal(augment(images), out)
    padded = torch.nn.functional.pad(images, (pad,) * 4, mode="reflect")
    matched, offsets, flips = torch.zeros(n, dtype=torch.int64), set(), 0
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, :, dy : dy + 12, dx : dx + 12]
            for flipped, candidate in [(False, crop), (True, crop.flip(-1))]:
                hit = (candidate == out).flatten(1).all(1)
                matched += hit
                offsets |= {(dy, dx)} if hit.any() else set()
                flips += int(hit.sum()) if flipped else 0
    assert matched.eq(1).all()  # every image is exactly one crop of its padded copy, flipped or not
    assert (
        len(offsets) == (2 * pad + 1) ** 2 and abs(flips / n - 0.5) < 0.05
    )  # every offset occurs; half flip
    augment.eval()
    assert augment(images) is images  # evaluation sees the images as they are


def test_augment_false_gives_the_model_its_batches_unchanged_and_draws_no_random_numbers():
    from data import synthetic_cifar10

    seen = []
    for augment in (False, True):
        _, test_set, info = synthetic_cifar10(DataConfig(augment=augment, synthetic_size=50))
        model = build_model(ArchConfig(dropout=0.0), info).train()
        first_conv = model.features[0]
        first_conv.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        images, _ = test_set.__getitems__(list(range(8)))
        torch.manual_seed(0)
        model(images)
        seen.append(torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state()))
        seen.append(images)
    unaugmented, untouched_rng, batch, augmented, _, _ = seen
    assert torch.equal(unaugmented, batch) and untouched_rng  # as before --augment existed
    assert not torch.equal(augmented, batch)


@pytest.mark.slow
def test_augmented_cifar_training_is_seeded_and_resumes_bitwise(tmp_path):
    from machinery.signals import Preempted

    args = [
        "--dataset",
        "synthetic_cifar10",
        "--synthetic_size",
        "320",
        "--epochs",
        "2",
        "--dropout",
        "0",
        "--checkpoint_every_n_steps",
        "4",
    ]
    reference = train_in_process(tmp_path / "reference", *args)
    with pytest.raises(
        Preempted
    ):  # a 1 s budget is spent already: it stops at its first check, and saves
        train_in_process(tmp_path / "stopped", *args, "--max_time", "00:00:00:01")
    stopped = only_run_dir(tmp_path / "stopped")
    (saved,) = (stopped / "checkpoints").glob("*.ckpt")
    assert saved.name in ("step-00000001.ckpt", "step-00000002.ckpt")
    assert run_cli("train", "--resume", str(stopped), "--max_time", "") == 0
    final = "checkpoints/final.ckpt"
    assert (
        torch.load(reference / final, weights_only=True)["global_step"] == 8
    )  # 288 training images, 64 a step
    assert bitwise_equal(
        stopped / final, reference / final
    )  # the augmentation drew the same after the resume
    plain = train_in_process(tmp_path / "plain", *args, "--augment", "false")
    assert yaml.safe_load((plain / "config.yaml").read_text())["data"]["augment"] is False
    assert not bitwise_equal(
        plain / final, reference / final
    )  # the augmentation was in the training
