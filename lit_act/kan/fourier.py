"""Fourier Kolmogorov-Arnold layer and an FKAN implicit neural representation for image fitting.

GistNoesis/FourierKAN (``NaiveFourierKANLayer``) and Mehrabian et al., "Implicit Neural Representations with Fourier
Kolmogorov-Arnold Networks" (FKAN, 2024, eq. 3)::

    y_j = b_j + sum_i sum_{k=1..G} A_jik cos(k x_i) + B_jik sin(k x_i)

The reference builds a ``(batch, out, in, G)`` broadcast and sums it; :class:`FourierKANLinear` builds the features
``[cos(k x_i), sin(k x_i)]`` once, ``(batch, 2 in G)``, and applies one matmul, so memory is ``O(batch x in x G)``.
The coefficient tensor keeps GistNoesis' layout ``fouriercoeffs`` ``(2, out, in, G)`` (so their state dicts load).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_act.activations.fused import CompiledKernel, check_backend
from lit_act.kan.kan_linear import MAX_GRID, check_in_features, use_compiled
from lit_act.utils import validate as v

__all__ = ["FKANImage", "FourierKANLinear", "fit_image", "image_coordinates", "load_sample_image", "psnr"]


def _fourier_math(x: Tensor, frequencies: Tensor) -> Tensor:
    """``(N, in)`` -> ``(N, 2, in, G)``: ``cos(k x_i)`` then ``sin(k x_i)``."""
    kx = x.unsqueeze(-1) * frequencies
    return torch.stack([torch.cos(kx), torch.sin(kx)], dim=1)


def _fourier_grad_math(grad: Tensor, feats: Tensor, frequencies: Tensor) -> Tensor:
    """``dL/dx_i = sum_k k (cos(k x_i) dL/dsin_ik - sin(k x_i) dL/dcos_ik)``."""
    return ((feats[:, 0] * grad[:, 1] - feats[:, 1] * grad[:, 0]) * frequencies).sum(-1)


_FOURIER_FWD = CompiledKernel(_fourier_math)
_FOURIER_BWD = CompiledKernel(_fourier_grad_math)


class _FourierFeatures(torch.autograd.Function):
    """Features with an analytic input gradient reusing the saved ``cos``/``sin`` (no trig in the backward)."""

    @staticmethod
    def forward(ctx, x: Tensor, frequencies: Tensor, compiled: bool) -> Tensor:
        feats = _FOURIER_FWD(compiled, x, frequencies)
        ctx.save_for_backward(feats, frequencies)
        ctx.compiled = compiled
        return feats

    @staticmethod
    def backward(ctx, grad: Tensor):
        feats, frequencies = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return _FOURIER_BWD(ctx.compiled, grad.contiguous(), feats, frequencies), None, None


class FourierKANLinear(nn.Module):
    """Fourier-KAN layer ``in_features -> out_features`` with ``G`` harmonics per edge.

    Args:
        grid_size: number of harmonics ``G`` (>= 1).
        bias: learn ``b_j`` (zeros at init, as GistNoesis).
        smooth_initialization: GistNoesis' option: coefficients ``N(0, 1) / (sqrt(in) k^2)`` (energy decaying like
            ``1/k^2``) instead of the default ``N(0, 1) / sqrt(in G)``.
        backend: ``"auto"`` (``torch.compile``-fused feature kernels when the features hold >= 2^16 values),
            ``"compiled"`` or ``"eager"``. The input gradient is analytic and reuses the saved features.
    """

    def __init__(self, in_features: int, out_features: int, grid_size: int = 8, bias: bool = True,
                 smooth_initialization: bool = False, backend: str = "auto") -> None:
        super().__init__()
        grid_size = v.positive_int("grid_size", grid_size, high=MAX_GRID)
        in_features, out_features = v.positive_int("in_features", in_features), v.positive_int("out_features",
                                                                                                out_features)
        bias, smooth_initialization = v.boolean("bias", bias), v.boolean("smooth_initialization", smooth_initialization)
        self.in_features, self.out_features, self.grid_size = in_features, out_features, int(grid_size)
        self.smooth_initialization = smooth_initialization
        self.backend = check_backend(backend)
        self.register_buffer("frequencies", torch.arange(1, self.grid_size + 1, dtype=torch.float32),
                             persistent=False)
        self.fouriercoeffs = nn.Parameter(torch.empty(2, out_features, in_features, self.grid_size))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.smooth_initialization:
            norm = math.sqrt(self.in_features) * self.frequencies.pow(2)
        else:
            norm = torch.full_like(self.frequencies, math.sqrt(self.in_features * self.grid_size))
        self.fouriercoeffs.normal_().div_(norm)
        if self.bias is not None:
            self.bias.zero_()

    def features(self, x: Tensor) -> Tensor:
        """``[cos(k x_i)]_{i,k}`` then ``[sin(k x_i)]_{i,k}``: ``(N, in)`` -> ``(N, 2 in G)``."""
        compiled = use_compiled(self.backend, x, 2 * self.grid_size)
        feats = _FourierFeatures.apply(x, self.frequencies.to(x.dtype), compiled)  # (N, 2, in, G)
        return feats.reshape(x.shape[0], -1)

    def flat_weight(self) -> Tensor:
        """Coefficients as one ``(out, 2 in G)`` matrix matching :meth:`features`."""
        return self.fouriercoeffs.permute(1, 0, 2, 3).reshape(self.out_features, -1)

    def forward(self, x: Tensor) -> Tensor:
        check_in_features(x, self.in_features, type(self).__name__)
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        y = F.linear(self.features(x), self.flat_weight(), self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, grid_size={self.grid_size}"


class FKANImage(nn.Module):
    """FKAN implicit neural representation (Mehrabian et al. 2024): a Fourier-KAN first layer, then an MLP.

    ``(x, y)`` pixel coordinates in ``[-pi, pi]`` (see :func:`image_coordinates`; the harmonics ``k = 1..G`` are then
    periodic over the image) -> ``FourierKANLinear(2, hidden, G)`` -> ``depth - 1`` x ``(Linear, ReLU)`` ->
    ``Linear(hidden, out)``. FKAN's paper uses a Fourier-KAN first layer followed by ReLU MLP layers; the number of
    layers and the coordinate scaling are our choices.
    """

    def __init__(self, in_features: int = 2, out_features: int = 3, hidden: int = 128, depth: int = 3,
                 grid_size: int = 32) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        layers: list[nn.Module] = [FourierKANLinear(in_features, hidden, grid_size)]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        layers.append(nn.Linear(hidden, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, coords: Tensor) -> Tensor:
        return self.net(coords)


def load_sample_image(name: str = "china.jpg", size: int = 64) -> Tensor:
    """A scikit-learn bundled sample image (no network), centre-cropped square, resized to ``size``: ``(H, W, 3)``
    float in ``[0, 1]``."""
    from PIL import Image
    from sklearn.datasets import load_sample_image as sk_load

    img = sk_load(name)
    h, w = img.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    pil = Image.fromarray(img[top: top + s, left: left + s]).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)


def image_coordinates(height: int, width: int) -> Tensor:
    """Pixel-centre coordinates ``(H * W, 2)`` in ``[-pi, pi]``, row-major to match ``image.reshape(-1, C)``."""
    ys = (torch.arange(height) + 0.5) / height * 2 * math.pi - math.pi
    xs = (torch.arange(width) + 0.5) / width * 2 * math.pi - math.pi
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gy, gx], -1).reshape(-1, 2)


def psnr(prediction: Tensor, target: Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio ``10 log10(range^2 / MSE)`` in dB (prediction clamped to ``[0, range]``)."""
    mse = F.mse_loss(prediction.clamp(0, data_range), target).item()
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)


def fit_image(model: nn.Module, image: Tensor, steps: int = 500, lr: float = 1e-3) -> float:
    """Fit ``model`` (coordinates -> colour) to ``image`` ``(H, W, C)`` with full-batch Adam on the MSE; returns PSNR."""
    h, w, c = image.shape
    coords, target = image_coordinates(h, w), image.reshape(-1, c)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(coords), target).backward()
        opt.step()
    with torch.no_grad():
        return psnr(model(coords), target)
