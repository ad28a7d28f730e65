"""KANLinear and FourierKANLinear against their papers' formulas written out plainly, plus fits and bad input."""

import math

import pytest
import torch

from lit_act.kan import (
    FKANImage,
    FourierKANLinear,
    GRKANLinear,
    KANLinear,
    SKANLinear,
    fit_image,
    load_sample_image,
    psnr,
)
from lit_act.kan.kan_linear import bspline_bases


def cox_de_boor(t: list[float], i: int, p: int, x: float) -> float:
    """Textbook recursion for B_{i,p}(x) on knots t (half-open support [t_i, t_{i+p+1}))."""
    if p == 0:
        return 1.0 if t[i] <= x < t[i + 1] else 0.0
    left = (x - t[i]) / (t[i + p] - t[i]) * cox_de_boor(t, i, p - 1, x)
    right = (t[i + p + 1] - x) / (t[i + p + 1] - t[i + 1]) * cox_de_boor(t, i + 1, p - 1, x)
    return left + right


def efficient_kan_reference(layer: KANLinear, x: torch.Tensor) -> torch.Tensor:
    """y_j = sum_i W_base[j,i] silu(x_i) + sum_i sum_k spline_weight[j,i,k] scaler[j,i] B_k(x_i), element by element."""
    n, d_in = x.shape
    k_bases = layer.grid_size + layer.spline_order
    y = torch.zeros(n, layer.out_features, dtype=torch.float64)
    for b in range(n):
        for i in range(d_in):
            xi = float(x[b, i])
            silu = xi / (1 + math.exp(-xi))
            knots = layer.grid[i].tolist()
            bases = [cox_de_boor(knots, k, layer.spline_order, xi) for k in range(k_bases)]
            for j in range(layer.out_features):
                spline = sum(float(layer.spline_weight[j, i, k].detach()) * bases[k] for k in range(k_bases))
                y[b, j] += float(layer.base_weight[j, i].detach()) * silu + float(layer.spline_scaler[j, i].detach()) * spline
    return y


def test_kan_linear_equals_plain_efficient_kan_formula():
    layer = KANLinear(3, 2, grid_size=4).double()
    x = torch.tensor([[-0.9, 0.0, 0.55], [0.3, -0.31, 0.99], [1.2, -1.6, 2.5]], dtype=torch.float64)  # incl. outside
    torch.testing.assert_close(layer(x), efficient_kan_reference(layer, x), rtol=1e-10, atol=1e-12)


def test_kan_linear_batches_any_leading_shape():
    layer = KANLinear(4, 3)
    x = torch.rand(2, 5, 4) * 2 - 1
    torch.testing.assert_close(layer(x), layer(x.reshape(10, 4)).reshape(2, 5, 3))


@pytest.mark.parametrize("order", [1, 2, 3])
def test_bspline_partition_of_unity_inside_grid(order):
    layer = KANLinear(2, 1, grid_size=6, spline_order=order, grid_range=(-2.0, 3.0))
    x = torch.linspace(-2, 2.999, 401).unsqueeze(1).expand(-1, 2)
    bases = bspline_bases(x.double(), layer.grid.double(), order)
    torch.testing.assert_close(bases.sum(-1), torch.ones(401, 2, dtype=torch.float64))
    assert (bases >= 0).all()


def test_extrapolation_is_the_base_term_beyond_extended_grid():
    layer = KANLinear(2, 3)
    x = torch.tensor([[5.0, -7.0], [1e4, -1e4]])  # extended grid of the default layer is [-2.2, 2.2]
    expected = torch.nn.functional.silu(x) @ layer.base_weight.T
    torch.testing.assert_close(layer(x), expected)
    assert torch.isfinite(layer(x)).all()


def test_update_grid_preserves_function_and_fits_samples():
    layer = KANLinear(3, 2).double()
    with torch.no_grad():
        layer.spline_scaler.uniform_(0.5, 2.0)  # efficient-kan double-applies the scaler here; we must not
    x = torch.rand(400, 3, dtype=torch.float64) * 1.6 - 0.8
    before = layer(x)
    layer.update_grid(x)
    k = layer.spline_order
    assert torch.allclose(layer.grid[:, k], x.min(0).values - 0.01 * 0.02, atol=0.02)
    assert torch.allclose(layer.grid[:, -1 - k], x.max(0).values, atol=0.02)
    assert (before - layer(x)).abs().max() < 0.02 * before.abs().max()


def test_update_grid_warns_outside_and_rejects_bad_samples():
    layer = KANLinear(2, 2)
    with pytest.warns(UserWarning, match="outside the current grid"):
        layer.update_grid(torch.randn(200, 2) * 3)
    with pytest.raises(ValueError, match="at least grid_size"):
        layer.update_grid(torch.randn(3, 2))
    with pytest.raises(ValueError, match="NaN"):
        layer.update_grid(torch.full((50, 2), float("nan")))


def test_regularization_loss_matches_l1_plus_entropy():
    layer = KANLinear(3, 2)
    l1 = layer.spline_weight.detach().abs().mean(-1)
    p = l1 / l1.sum()
    expected = 0.5 * l1.sum() - 2.0 * (p * p.log()).sum()
    torch.testing.assert_close(layer.regularization_loss(0.5, 2.0), expected)


def test_variance_init_preserves_unit_variance():
    layer = KANLinear(256, 256, init="variance", backend="eager")
    with torch.no_grad():
        y = layer(torch.randn(4096, 256))
    assert 0.8 < y.var().item() < 1.25


@pytest.mark.parametrize("kwargs, match", [
    ({"grid_size": 0}, "grid_size"), ({"grid_size": 2.5}, "grid_size"), ({"grid_range": (1, -1)}, "grid_range"),
    ({"init": "xavier"}, "valid"), ({"spline_order": -1}, "spline_order")])
def test_kan_linear_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KANLinear(2, 2, **kwargs)


@pytest.mark.parametrize("cls", [KANLinear, FourierKANLinear])
def test_in_features_mismatch_is_a_clear_error(cls):
    with pytest.raises(ValueError, match="in_features=4"):
        cls(4, 2)(torch.randn(3, 5))


def test_fourier_equals_naive_broadcast_formula():
    layer = FourierKANLinear(5, 3, grid_size=4).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(7, 5, dtype=torch.float64)
    k = torch.arange(1, 5, dtype=torch.float64)
    kx = x[:, None, :, None] * k  # (batch, 1, in, G) -- GistNoesis' naive broadcast
    a, b = layer.fouriercoeffs
    naive = (torch.cos(kx) * a).sum((-2, -1)) + (torch.sin(kx) * b).sum((-2, -1)) + layer.bias
    torch.testing.assert_close(layer(x), naive)


@pytest.mark.parametrize("smooth", [False, True])
def test_fourier_init_scale(smooth):
    layer = FourierKANLinear(200, 100, grid_size=8, smooth_initialization=smooth)
    c = layer.fouriercoeffs.detach()
    if smooth:
        expected = 1 / (math.sqrt(200) * torch.arange(1, 9, dtype=torch.float32) ** 2)
        torch.testing.assert_close(c.std(dim=(0, 1, 2)), expected, rtol=0.05, atol=0)
    else:
        assert abs(c.std().item() - 1 / math.sqrt(200 * 8)) < 0.01 / math.sqrt(200 * 8) * 5
    with pytest.raises(ValueError, match="grid_size"):
        FourierKANLinear(2, 2, grid_size=0)


TARGETS = {"sin": lambda x: torch.sin(math.pi * x), "exp": torch.exp, "step": lambda x: (x > 0).float()}
# MSE bounds after 300 Adam steps on 256 points of [-1, 1]. A jump cannot be fitted by smooth edges (the bound is
# the blur's MSE; predicting the mean would give 0.25); Fourier-KAN's harmonics are 2pi-periodic, so the
# non-periodic exp costs it a boundary error.
LAYER_FITS = {
    "kan": (lambda: KANLinear(1, 1, grid_size=10), {"sin": 1e-5, "exp": 1e-5, "step": 0.03}),
    "fourier_kan": (lambda: FourierKANLinear(1, 1, 8), {"sin": 1e-3, "exp": 5e-3, "step": 0.03}),
    "skan": (lambda: SKANLinear(1, 1, num_bases=10), {"sin": 1e-4, "exp": 1e-3, "step": 0.03}),
    "grkan": (lambda: torch.nn.Sequential(torch.nn.Linear(1, 8), GRKANLinear(8, 1, num_groups=8)),
              {"sin": 1e-4, "exp": 1e-4, "step": 0.01}),
}


def fit_1d(layer: torch.nn.Module, target, steps: int = 300, lr: float = 0.05) -> float:
    x = torch.linspace(-1, 1, 256).unsqueeze(1)
    y = target(x)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(x), y)
        loss.backward()
        opt.step()
    return torch.nn.functional.mse_loss(layer(x), y).item()


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("layer", sorted(LAYER_FITS))
def test_layers_fit_1d_targets(layer, target):
    factory, bounds = LAYER_FITS[layer]
    assert fit_1d(factory(), TARGETS[target]) < bounds[target]


@pytest.mark.parametrize("cls", [KANLinear, FourierKANLinear])
def test_compiled_backend_matches_eager(cls):
    torch.manual_seed(0)
    eager = cls(6, 4, backend="eager")
    compiled = cls(6, 4, backend="compiled")
    compiled.load_state_dict(eager.state_dict())
    x1 = (torch.rand(33, 6) * 2.4 - 1.2).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = eager(x1), compiled(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)
    for p1, p2 in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls, kwargs", [(KANLinear, {"grid_size": 3}), (FourierKANLinear, {"grid_size": 3}),
                                         (KANLinear, {"grid_size": 2, "spline_order": 2})])
def test_gradcheck_float64(cls, kwargs):
    layer = cls(3, 2, **kwargs).double()
    x = (torch.rand(4, 3, dtype=torch.float64) * 1.8 - 0.9).requires_grad_()
    params = tuple(layer.parameters())

    def fn(inp, *ps):
        return torch.func.functional_call(layer, dict(zip([n for n, _ in layer.named_parameters()], ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_fkan_fits_bundled_image():
    image = load_sample_image(size=24)
    assert image.shape == (24, 24, 3) and 0 <= image.min() and image.max() <= 1
    baseline = psnr(image.reshape(-1, 3).mean(0).expand(24 * 24, 3), image.reshape(-1, 3))
    torch.manual_seed(0)
    result = fit_image(FKANImage(hidden=64, depth=2, grid_size=12), image, steps=150, lr=3e-3)
    assert result > baseline + 8  # far better than the mean colour
