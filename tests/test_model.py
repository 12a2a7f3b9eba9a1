"""The default CNN fits every dataset's image shape; torchvision models get a head for our classes."""

import pytest
import torch

from config import ArchConfig
from data import DataInfo
from model import build_model


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (1, 28), (3, 32)])
def test_default_cnn_works_for_every_dataset_shape(channels, size):
    model = build_model(ArchConfig(dropout=0.0), DataInfo(10, channels, size, tuple("0123456789")))
    logits = model(torch.randn(4, channels, size, size))
    assert logits.shape == (4, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dropout_setting_reaches_the_cnn():
    model = build_model(ArchConfig(dropout=0.4), DataInfo(10, 1, 8, ()))
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.4, 0.4]


def test_torchvision_model_by_name_gets_a_head_for_our_classes_and_grey_inputs():
    model = build_model(ArchConfig(model="resnet18", dropout=0.2), DataInfo(7, 1, 28, ()))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert isinstance(model.net.fc[0], torch.nn.Dropout) and model.net.fc[1].out_features == 7


def test_vit_inputs_are_resized_to_the_size_it_needs():
    model = build_model(ArchConfig(model="vit_b_16"), DataInfo(10, 3, 32, ())).eval()
    assert model.image_size == 224
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
