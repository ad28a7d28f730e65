"""Reference models: logits shapes, activation swapping by name, and the loss goes down on bundled data."""

import pytest
import torch
from torch import nn

from lit_act.data import DigitsDataModule, PySourceDataModule, TeacherStudentDataModule
from lit_act.models import CNNClassifier, MLPClassifier, StudentNetwork, TransformerLM


def _train_steps(model, loader, steps: int) -> tuple[float, float]:
    """Loss on a fixed batch before and after ``steps`` optimiser steps on ``loader``."""
    optimizer = model.configure_optimizers()
    fixed = next(iter(loader))
    with torch.no_grad():
        before = model.loss(model(fixed[0]), fixed[1]).item()
    batches = iter(loader)
    for _ in range(steps):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        optimizer.zero_grad()
        model.loss(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        after = model.loss(model(fixed[0]), fixed[1]).item()
    return before, after


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    return dm


@pytest.mark.parametrize("cls", [MLPClassifier, CNNClassifier])
def test_classifiers_learn_digits(cls, digits):
    hints = digits.shape_hints
    kwargs = {"in_features": hints["in_features"]} if cls is MLPClassifier else {"in_channels": hints["in_channels"]}
    model = cls(num_classes=10, activation="gelu", **kwargs)
    assert sum(isinstance(m, nn.GELU) for m in model.modules()) == 2
    x, _ = next(iter(digits.train_dataloader()))
    assert model(x).shape == (64, 10)
    before, after = _train_steps(model, digits.train_dataloader(), 60)
    assert after < 0.6 * before


def test_transformer_names_shapes_and_learning(tmp_path):
    model = TransformerLM(vocab_size=128, block_size=32, d_model=32, n_layer=2, n_head=4, activation="relu")
    names = dict(model.named_modules())
    for n in ("blocks.0", "blocks.1.mlp.act", "blocks.0.mlp.fc_in", "blocks.0.mlp.fc_out", "lm_head"):
        assert n in names
    assert isinstance(names["blocks.1.mlp.act"], nn.ReLU)
    dm = PySourceDataModule(block_size=32, batch_size=16, max_chars=200_000)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert model(x).shape == (16, 32, 128)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    before, after = _train_steps(model, dm.train_dataloader(), 40)
    assert after < 0.75 * before


def test_transformer_is_causal():
    model = TransformerLM(vocab_size=16, block_size=8, d_model=16, n_layer=1, n_head=2).eval()
    idx = torch.randint(0, 16, (1, 8))
    changed = idx.clone()
    changed[0, 5] = (idx[0, 5] + 1) % 16
    torch.testing.assert_close(model(idx)[:, :5], model(changed)[:, :5])


def test_student_learns_teacher():
    dm = TeacherStudentDataModule(input_dim=10, teacher_neurons=2, n_train=1024, batch_size=64)
    dm.setup()
    model = StudentNetwork(in_features=10, hidden_neurons=2, activation="erf", lr=0.05)
    before, after = _train_steps(model, dm.train_dataloader(), 150)
    assert after < 0.5 * before


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match="valid names:.*gelu"):
        MLPClassifier(64, 10, activation="foo")
