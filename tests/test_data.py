"""DataModules: shapes, deterministic splits, no network."""

import socket

import numpy as np
import pytest
import torch

from lit_act.data import DigitsDataModule, PySourceDataModule, TeacherStudentDataModule, TorchvisionDataModule
from lit_act.data.pysource import VOCAB_SIZE, decode, encode, stdlib_sources
from lit_act.data.splits import split_indices


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_digits_shapes_split_and_determinism(no_network):
    a, b = DigitsDataModule(batch_size=32), DigitsDataModule(batch_size=32)
    a.setup(), b.setup()
    sizes = [len(s) for s in (a.train_set, a.val_set, a.test_set)]
    assert sum(sizes) == 1797 and sizes[1] == sizes[2] == round(1797 * 0.15)
    for s1, s2 in zip((a.train_set, a.val_set, a.test_set), (b.train_set, b.val_set, b.test_set)):
        assert torch.equal(s1.tensors[0], s2.tensors[0]) and torch.equal(s1.tensors[1], s2.tensors[1])
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,) and y.dtype == torch.long
    # standardised with training statistics
    assert abs(a.train_set.tensors[0].mean().item()) < 1e-5
    assert abs(a.train_set.tensors[0].std().item() - 1) < 1e-3
    # the split covers every image exactly once
    train, val, test = split_indices(1797, 0.15, 0.15, seed=0)
    assert torch.equal(torch.cat([train, val, test]).sort().values, torch.arange(1797))


def test_digits_held_out_classes():
    dm = DigitsDataModule(classes=[0, 1, 2])
    dm.setup()
    assert set(dm.train_set.tensors[1].unique().tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="subset of 0..9"):
        DigitsDataModule(classes=[11])


def test_pysource_encoding_and_splits(no_network):
    text = "def f(x):\n    return 'é'\n"
    codes = encode(text)
    assert codes.max() < VOCAB_SIZE and decode(codes) == text.replace("é", "?")
    files = stdlib_sources()
    assert len(files) > 100 and all(p.suffix == ".py" for p in files)
    a = PySourceDataModule(block_size=32, batch_size=4, max_chars=300_000, val_fraction=0.1, test_fraction=0.1)
    b = PySourceDataModule(block_size=32, batch_size=4, max_chars=300_000, val_fraction=0.1, test_fraction=0.1)
    sa, sb = a.read_splits(), b.read_splits()
    for k in ("train", "val", "test"):
        assert len(sa[k]) > 1000 and np.array_equal(sa[k], sb[k])
    a.setup()
    x, y = next(iter(a.train_dataloader()))
    assert x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1])
    assert a.shape_hints == {"vocab_size": 128, "block_size": 32}


def test_pysource_split_is_by_file(tmp_path):
    for i in range(40):
        (tmp_path / f"mod{i}.py").write_text(f"# module {i}\n" + "x = 1\n" * 20)
    dm = PySourceDataModule(root=str(tmp_path), block_size=8, val_fraction=0.2, test_fraction=0.2)
    splits = dm.read_splits()
    texts = {k: decode(v) for k, v in splits.items()}
    for i in range(40):
        owners = [k for k, t in texts.items() if f"# module {i}\n" in t]
        assert len(owners) == 1, f"module {i} in {owners}"


def test_teacher_student_labels_match_formula():
    dm = TeacherStudentDataModule(input_dim=8, teacher_neurons=3, teacher_activation="relu", n_train=64, n_val=8,
                                  n_test=8, seed=3)
    dm.setup()
    x, y = dm.datasets["train"].tensors
    w, v = dm.teacher.w, dm.teacher.v
    expected = sum(v[j] * torch.relu(x @ w[j] / 8 ** 0.5) for j in range(3))
    torch.testing.assert_close(y, expected)
    ortho = TeacherStudentDataModule(input_dim=8, teacher_neurons=3, orthonormal=True).teacher.w
    torch.testing.assert_close(ortho @ ortho.T / 8, torch.eye(3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="valid"):
        TeacherStudentDataModule(teacher_activation="tanh")


def test_vision_needs_extra_or_valid_name():
    with pytest.raises(ValueError, match="valid"):
        TorchvisionDataModule(dataset="imagenet")
    try:
        import torchvision  # noqa: F401
    except Exception:
        with pytest.raises(ImportError, match=r"\[vision\]"):
            TorchvisionDataModule(dataset="mnist").setup()
