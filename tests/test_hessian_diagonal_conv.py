"""Exact Hessian and GGN diagonals of convolutional nets against dense float64 autograd matrices."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_act.hessian import HessianOperator, UncoveredModuleError, exact_diagonal, trace
from lit_act.hessian import diagonal as diagonal_module
from tests.dense import LOSSES, dense_ggn, dense_hessian, make_batches

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def batches_for(shape, sizes=(5, 3), classes=3, loss="cross_entropy", out_shape=None, seed=1):
    return make_batches(loss, sizes, seed, shape, classes, out_shape)


def assert_matches(model, batches, loss, curvature="hessian", reference=None):
    reference = (dense_hessian(model, batches, loss).diagonal() if curvature == "hessian"
                 else dense_ggn(model, batches, loss).diagonal()) if reference is None else reference
    res = exact_diagonal(model, batches, loss=loss, curvature=curvature)
    assert res.covered == res.names and res.uncovered_reason is None
    assert float((res.diagonal - reference).abs().max()) <= 1e-8 * float(reference.abs().max())
    assert math.isclose(res.trace, float(reference.sum()), rel_tol=1e-8)
    return res, reference


def small_cnn(act, pool, seed=0):
    """conv-act-pool-conv-act-pool-flatten-linear-act-linear on 2x8x8 inputs (226 parameters)."""
    torch.manual_seed(seed)
    pool_layer = {"max": lambda: nn.MaxPool2d(2), "avg": lambda: nn.AvgPool2d(2)}[pool]
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), act(), pool_layer(), nn.Conv2d(3, 4, 3), act(), pool_layer(),
                         nn.Flatten(), nn.Linear(4, 5), act(), nn.Dropout(0.5), nn.Linear(5, 3)).double().eval()


CASES = [(a, p) for a in ACTIVATIONS for p in ("max", "avg")]


@pytest.mark.parametrize(("activation", "pool"), CASES, ids=[f"{a}-{p}" for a, p in CASES])
def test_cnn_hessian_and_ggn_diagonals_match_dense(activation, pool):
    model = small_cnn(ACTIVATIONS[activation], pool)
    batches = batches_for((2, 8, 8))
    _, hess = assert_matches(model, batches, "cross_entropy")
    ggn_res, ggn = assert_matches(model, batches, "cross_entropy", "ggn")
    blocks = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    offset = 0
    for name, size in blocks.items():  # per-layer traces are the blocks of the diagonal
        if size:
            assert math.isclose(ggn_res.blocks[name], float(ggn[offset:offset + size].sum()), rel_tol=1e-8)
            offset += size
    if activation == "relu":  # piecewise linear in each parameter: the residual term has a zero diagonal
        torch.testing.assert_close(hess, ggn, rtol=1e-9, atol=1e-12)
    else:  # the two differ, so the checks above tell them apart
        assert float((hess - ggn).abs().max()) > 1e-3 * float(hess.abs().max())


def test_conv_geometries_stride_padding_dilation_groups():
    """Strided, dilated, grouped and 'same'-padded (odd total: the extra zero on the right) convolutions, no bias,
    overlapping max pooling with padding, eval-mode Dropout2d, adaptive average pooling, tanh residuals through all."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.Tanh(), nn.Dropout2d(0.3),
        nn.Conv2d(4, 4, (2, 3), dilation=(2, 1), padding="same", groups=2, bias=False), nn.Sigmoid(),
        nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(4, 2, 2, stride=(1, 2), padding=(1, 0)), nn.Tanh(),
        nn.AdaptiveAvgPool2d((2, 1)), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    batches = batches_for((2, 9, 10))
    assert_matches(model, batches, "cross_entropy")
    assert_matches(model, batches, "cross_entropy", "ggn")


def test_pooled_columns_gathered_or_scattered_agree(monkeypatch):
    """After max pooling the next convolution either gathers its patches at the max positions or scatters the
    columns (whichever is smaller): both give the dense-checked diagonal, with groups and overlapping windows."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Tanh(), nn.MaxPool2d(3, stride=2, padding=1),
                          nn.Conv2d(4, 4, 2, groups=2), nn.Sigmoid(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4, 3)).double().eval()
    batches = batches_for((2, 9, 9), sizes=(4,))
    _, reference = assert_matches(model, batches, "cross_entropy")
    for gather in (True, False):
        monkeypatch.setattr(diagonal_module._Backprop, "_gathers", lambda self, i, f, g=gather: g)
        res = exact_diagonal(model, batches, loss="cross_entropy")
        assert float((res.diagonal - reference).abs().max()) <= 1e-8 * float(reference.abs().max())


def test_conv1d_adaptive_max_pool_and_mse_on_conv_outputs():
    """Conv1d with stride and padding, adaptive max pooling, and an MSE loss on convolutional outputs (the output
    Hessian's row blocks become one block per example)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=2), nn.GELU(), nn.AdaptiveMaxPool1d(4),
                          nn.Conv1d(3, 3, 2, dilation=2, groups=3), nn.Tanh(), nn.AvgPool1d(2, count_include_pad=False),
                          nn.Conv1d(3, 2, 1)).double().eval()
    batches = batches_for((2, 11), loss="mse", out_shape=(2, 1))
    assert_matches(model, batches, "mse")
    assert_matches(model, batches, "mse", "ggn")


def test_column_chunks_give_the_same_diagonal(monkeypatch):
    model = small_cnn(nn.Tanh, "avg", seed=5)  # residual columns go through the second conv and avg pooling
    batches = batches_for((2, 8, 8), sizes=(4,))
    whole = exact_diagonal(model, batches, loss="cross_entropy").diagonal
    runs = []
    run = diagonal_module._Backprop.run
    monkeypatch.setattr(diagonal_module._Backprop, "run", lambda self, *a: runs.append(a[0]) or run(self, *a))
    monkeypatch.setattr(diagonal_module, "_BLOCK_ELEMENTS", 700)  # a few columns per block
    chunked = exact_diagonal(model, batches, loss="cross_entropy").diagonal
    assert len(runs) > 10  # the pass and many chunks drained on their own
    torch.testing.assert_close(chunked, whole, rtol=1e-10, atol=1e-14)


def test_max_pool_indices_from_the_traced_forward_or_recomputed():
    model = small_cnn(nn.Tanh, "max", seed=5)
    batches = batches_for((2, 8, 8), sizes=(4,))
    whole = exact_diagonal(model, batches, loss="cross_entropy").diagonal
    assert not model[2].return_indices and not model[5].return_indices  # the flag is restored
    seen = []  # a pooling layer with a hook of its own keeps its output type; its indices are recomputed
    model[2].register_forward_hook(lambda m, a, out: seen.append(type(out)))
    with_hook = exact_diagonal(model, batches, loss="cross_entropy").diagonal
    assert seen == [torch.Tensor]
    torch.testing.assert_close(with_hook, whole, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("pool", [True, False], ids=["max-pool", "no-pool"])
def test_residuals_reach_the_first_conv_without_dense_columns(monkeypatch, pool):
    """A curved activation after the second convolution: its residual reaches the first convolution's parameters
    through the unfolded gains and patches (no dense columns); strided/dilated/padded geometry, bias on and off."""
    torch.manual_seed(8)
    middle = [nn.Tanh(), nn.MaxPool2d(2), nn.Sigmoid()] if pool else [nn.Sigmoid()]
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2 if not pool else 1, padding=1), *middle,
                          nn.Conv2d(3, 4, 3, padding=2, dilation=2, bias=not pool), nn.Tanh(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 3)).double().eval()
    taken = []
    direct = diagonal_module._Backprop._into_first_conv
    monkeypatch.setattr(diagonal_module._Backprop, "_into_first_conv",
                        lambda self, i, f: taken.append(direct(self, i, f)) or taken[-1])
    assert_matches(model, batches_for((2, 8, 8)), "cross_entropy")
    assert taken and all(taken)


def test_auto_trace_of_cnn_is_exact():
    model = small_cnn(nn.Tanh, "avg", seed=6)
    batches = batches_for((2, 8, 8), sizes=(6,))
    res = trace(HessianOperator(model, lambda m, b: LOSSES["cross_entropy"](m(b[0]), b[1]), batches), 30,
                method="auto", loss="cross_entropy")
    assert res.method == "exact" and res.std_error == 0.0
    assert math.isclose(res.estimate, float(dense_hessian(model, batches, "cross_entropy").diagonal().sum()),
                        rel_tol=1e-8)


class ResidualCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.block = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.Tanh()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))

    def forward(self, x):
        h = self.stem(x)
        return self.head(h + self.act(self.block(h)))


def test_uncovered_modules_are_named():
    torch.manual_seed(7)
    batches = batches_for((2, 6, 6), sizes=(4,))
    with_bn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                            nn.Linear(48, 3)).double().train()
    with pytest.raises(UncoveredModuleError, match=r"'1' \(BatchNorm2d\) is not covered"):
        exact_diagonal(with_bn, batches, loss="cross_entropy")
    residual = ResidualCNN().double()
    with pytest.raises(UncoveredModuleError, match=r"input of 'head\.0' is not the output .*'act'.*residual"):
        exact_diagonal(residual, batches, loss="cross_entropy")
    partial = exact_diagonal(residual, batches, loss="cross_entropy", on_uncovered="partial")
    assert partial.covered == ["head.2.weight", "head.2.bias"]
    head = dense_hessian(residual, batches, "cross_entropy").diagonal()[-12:]
    torch.testing.assert_close(partial.diagonal[-12:], head, rtol=1e-9, atol=1e-12)
    assert torch.isnan(partial.diagonal[:-12]).all()
    per_position = nn.Sequential(nn.Linear(6, 6), nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(48, 3)).double()
    with pytest.raises(UncoveredModuleError, match=r"'0' \(Linear\) acts on a 4-D input before a convolution"):
        exact_diagonal(per_position, batches, loss="cross_entropy")
    reflect = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                            nn.Linear(108, 3)).double()
    with pytest.raises(UncoveredModuleError, match=r"'0' \(Conv2d\) is not covered.*zero padding"):
        exact_diagonal(reflect, batches, loss="cross_entropy")
