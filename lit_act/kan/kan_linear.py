"""B-spline Kolmogorov-Arnold layer in the efficient-kan formulation.

Liu et al., "KAN: Kolmogorov-Arnold Networks" (2024), eq. 2.10: every edge carries
``phi(x) = w_b b(x) + w_s spline(x)`` with ``b = silu`` and ``spline = sum_k c_k B_k(x)``.
Blealtan/efficient-kan rewrites the layer as two matmuls, which is what :class:`KANLinear` computes::

    y = W_base @ silu(x) + (W_spline * scaler[..., None]).reshape(out, in * K) @ vec(B(x)),   K = G + k

where ``B(x)`` is ``(batch, in, K)`` (order-``k`` B-spline bases on ``G`` intervals, Cox-de Boor recursion on a grid
extended by ``k`` knots on each side). Memory is ``O(batch x in x K)``; nothing of size ``batch x in x out`` is built.

Extrapolation (documented behaviour, identical to efficient-kan and pykan): outside ``grid_range`` the ``k`` extra
knots on each side let the spline decay smoothly to zero; beyond the extended grid (``grid_range`` widened by
``k * h``, ``h = (hi - lo) / G``) every basis is exactly 0, so the edge function reduces to its ``silu`` base term.
Outputs stay finite for any finite input. :meth:`KANLinear.update_grid` moves the grid onto observed samples and
warns when samples fall outside the current grid (their old spline values are the decayed extrapolation).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_act.activations.fused import COMPILE_MIN_NUMEL, CompiledKernel, check_backend
from lit_act.utils import validate as v

MAX_GRID = 1024  # grid intervals / bases per edge: the spline weights are (out, in, grid_size + spline_order)
MAX_SPLINE_ORDER = 10

__all__ = ["KANLinear", "bspline_bases", "check_in_features", "uniform_grid"]


def use_compiled(backend: str, x: Tensor, width: int) -> bool:
    """Whether to run the ``torch.compile``'d kernels for ``x`` expanded to ``width`` values per input."""
    if backend == "eager" or torch.compiler.is_compiling():
        return False
    if backend == "compiled":
        return True
    return x.numel() * width >= COMPILE_MIN_NUMEL and x.device.type in ("cpu", "cuda")


def check_in_features(x: Tensor, in_features: int, layer: str) -> None:
    """Raise a clear error when the last dimension of ``x`` is not ``in_features``."""
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{layer} expects inputs with last dimension in_features={in_features}, "
                         f"got shape {tuple(x.shape)}")


def uniform_grid(in_features: int, grid_size: int, spline_order: int, grid_range: Sequence[float]) -> Tensor:
    """Extended knot vector ``(in, G + 2k + 1)``: ``lo + h * (-k, ..., G + k)`` with ``h = (hi - lo) / G``."""
    grid_size = v.positive_int("grid_size", grid_size, high=MAX_GRID)
    spline_order = v.non_negative_int("spline_order", spline_order, high=MAX_SPLINE_ORDER)
    lo, hi = v.float_pair("grid_range", grid_range)
    h = (hi - lo) / grid_size
    knots = torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float32) * h + lo
    return knots.expand(in_features, -1).contiguous()


def _bspline_math(x: Tensor, grid: Tensor, spline_order: int) -> tuple[Tensor, Tensor]:
    """Cox-de Boor bases of order ``k`` and of order ``k - 1`` (kept for the derivative)."""
    x = x.unsqueeze(-1)
    grid = grid.to(x.dtype)
    bases = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)
    lower = bases
    for p in range(1, spline_order + 1):
        lower = bases
        inv_left = 1.0 / (grid[:, p:-1] - grid[:, : -(p + 1)])
        inv_right = 1.0 / (grid[:, p + 1:] - grid[:, 1:-p])
        bases = ((x - grid[:, : -(p + 1)]) * inv_left * bases[..., :-1]
                 + (grid[:, p + 1:] - x) * inv_right * bases[..., 1:])
    return bases, lower


def _bspline_grad_math(grad: Tensor, lower: Tensor, grid: Tensor, spline_order: int) -> Tensor:
    """``dL/dx = sum_m g_m dB_{m,k}/dx`` with ``dB_{m,k}/dx = k B_{m,k-1} / (t_{m+k} - t_m)
    - k B_{m+1,k-1} / (t_{m+k+1} - t_{m+1})``."""
    grid = grid.to(lower.dtype)
    d = lower * (spline_order / (grid[:, spline_order:] - grid[:, :-spline_order]))
    return (grad * (d[..., :-1] - d[..., 1:])).sum(-1)


_BSPLINE_FWD = CompiledKernel(_bspline_math)
_BSPLINE_BWD = CompiledKernel(_bspline_grad_math)


class _BSplineBases(torch.autograd.Function):
    """Bases with an analytic input gradient: saves only the order ``k - 1`` bases ``(N, in, K + 1)``."""

    @staticmethod
    def forward(ctx, x: Tensor, grid: Tensor, spline_order: int, compiled: bool) -> Tensor:
        bases, lower = _BSPLINE_FWD(compiled, x, grid, spline_order)
        ctx.save_for_backward(lower, grid)
        ctx.spline_order, ctx.compiled = spline_order, compiled
        return bases

    @staticmethod
    def backward(ctx, grad: Tensor):
        lower, grid = ctx.saved_tensors
        if ctx.spline_order == 0 or not ctx.needs_input_grad[0]:
            return None, None, None, None
        return _BSPLINE_BWD(ctx.compiled, grad.contiguous(), lower, grid, ctx.spline_order), None, None, None


def bspline_bases(x: Tensor, grid: Tensor, spline_order: int, backend: str = "eager") -> Tensor:
    """Order-``k`` B-spline bases of ``x`` ``(N, in)`` on per-input knots ``grid`` ``(in, M)`` -> ``(N, in, M-1-k)``.

    Cox-de Boor: ``B_{i,0} = [t_i <= x < t_{i+1}]``,
    ``B_{i,p} = (x - t_i) / (t_{i+p} - t_i) B_{i,p-1} + (t_{i+p+1} - x) / (t_{i+p+1} - t_{i+1}) B_{i+1,p-1}``.
    Differentiable in ``x`` (analytic derivative, not in ``grid``). ``backend``: ``"eager"``, ``"compiled"``
    (``torch.compile``-fused loops) or ``"auto"`` (compiled when the bases hold >= ``COMPILE_MIN_NUMEL`` values).
    """
    compiled = use_compiled(check_backend(backend), x, grid.shape[1])
    return _BSplineBases.apply(x, grid, spline_order, compiled)


class KANLinear(nn.Module):
    """KAN layer ``in_features -> out_features`` with learnable cubic B-spline edges (efficient-kan formulation).

    ``y = W_base silu(x) + (W_spline * scaler) vec(B(x))`` (see module docstring). Inputs of any shape ``(..., in)``.

    Args:
        grid_size: number of grid intervals ``G`` (>= 1); efficient-kan default 5.
        spline_order: B-spline order ``k`` (3 = cubic).
        grid_range: initial grid ``[lo, hi]``.
        scale_noise, scale_base, scale_spline: efficient-kan init scales (used by ``init="efficient_kan"``).
        standalone_scale_spline: learn a separate ``scaler`` ``(out, in)`` multiplying the spline coefficients.
        base_activation: the residual basis function ``b`` (class or instance; ``nn.SiLU`` as in the paper).
        grid_eps: blend of :meth:`update_grid`: ``eps * uniform + (1 - eps) * percentile`` knots (efficient-kan 0.02).
        init: ``"efficient_kan"`` reproduces efficient-kan's ``reset_parameters`` (kaiming-uniform base weight and
            scaler, spline fitted to uniform noise ``(U - 1/2) * scale_noise / G``). ``"variance"`` is a
            Glorot-style variance-aware init (our derivation): for ``x ~ N(0, 1)`` the output variance is
            ``in * (Var(w_b) E[b(x)^2] + Var(c) E[sum_k B_k(x)^2])`` with ``scaler = 1``; each term is set to 1/2,
            i.e. ``w_b ~ N(0, 1 / (2 in E[b^2]))`` and ``c ~ N(0, 1 / (2 in E[sum_k B_k^2]))``, the expectations
            taken over 2048 normal quantiles, so ``Var(y) ~= 1`` for unit-variance inputs.
        backend: ``"auto"`` (default), ``"compiled"`` or ``"eager"`` evaluation of the bases (see
            :func:`bspline_bases`); the bases' input gradient is analytic either way, so autograd keeps only the
            order ``k - 1`` bases ``(N, in, K + 1)`` instead of every step of the recursion.
    """

    def __init__(self, in_features: int, out_features: int, grid_size: int = 5, spline_order: int = 3,
                 grid_range: Sequence[float] = (-1.0, 1.0), scale_noise: float = 0.1, scale_base: float = 1.0,
                 scale_spline: float = 1.0, standalone_scale_spline: bool = True,
                 base_activation: type[nn.Module] | nn.Module = nn.SiLU, grid_eps: float = 0.02,
                 init: str = "efficient_kan", backend: str = "auto") -> None:
        super().__init__()
        in_features, out_features = v.positive_int("in_features", in_features), v.positive_int("out_features",
                                                                                                out_features)
        grid_eps = v.finite_float("grid_eps", grid_eps, low=0.0, high=1.0)
        v.choice("init", init, ("efficient_kan", "variance"))
        scale_noise = v.finite_float("scale_noise", scale_noise, low=0.0)
        scale_base = v.finite_float("scale_base", scale_base)
        scale_spline = v.finite_float("scale_spline", scale_spline)
        standalone_scale_spline = v.boolean("standalone_scale_spline", standalone_scale_spline)
        grid_size = v.positive_int("grid_size", grid_size, high=MAX_GRID)
        spline_order = v.non_negative_int("spline_order", spline_order, high=MAX_SPLINE_ORDER)
        self.in_features, self.out_features = in_features, out_features
        self.grid_size, self.spline_order = int(grid_size), int(spline_order)
        self.register_buffer("grid", uniform_grid(in_features, grid_size, spline_order, grid_range))
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, self.num_bases))
        self.spline_scaler = nn.Parameter(torch.empty(out_features, in_features)) if standalone_scale_spline else None
        self.scale_noise, self.scale_base, self.scale_spline = scale_noise, scale_base, scale_spline
        self.base_activation = base_activation() if isinstance(base_activation, type) else base_activation
        self.grid_eps = grid_eps
        self.init = init
        self.backend = check_backend(backend)
        self.reset_parameters()

    @property
    def num_bases(self) -> int:
        """``K = G + k`` spline coefficients per edge."""
        return self.grid_size + self.spline_order

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init == "variance":
            self._variance_init()
            return
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5) * self.scale_base)
        noise = (torch.rand(self.grid_size + 1, self.in_features, self.out_features) - 0.5) * (
            self.scale_noise / self.grid_size)
        knots = self.grid.T[self.spline_order: -self.spline_order] if self.spline_order else self.grid.T
        scale = 1.0 if self.spline_scaler is not None else self.scale_spline
        self.spline_weight.copy_(scale * self.curve2coeff(knots, noise))
        if self.spline_scaler is not None:
            nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5) * self.scale_spline)

    def _variance_init(self) -> None:
        q = torch.linspace(0.5 / 2048, 1 - 0.5 / 2048, 2048, dtype=torch.float64)
        z = (math.sqrt(2.0) * torch.erfinv(2 * q - 1)).to(self.grid.dtype)  # normal quantiles
        base_sq = self.base_activation(z).pow(2).mean().item()
        bases = bspline_bases(z.unsqueeze(1).expand(-1, self.in_features), self.grid, self.spline_order)
        spline_sq = bases.pow(2).sum(-1).mean(0).clamp_min(1e-12)  # (in,)
        nn.init.normal_(self.base_weight, std=1.0 / math.sqrt(2 * self.in_features * max(base_sq, 1e-12)))
        self.spline_weight.normal_().mul_((1.0 / (2 * self.in_features * spline_sq)).sqrt()[None, :, None])
        if self.spline_scaler is not None:
            self.spline_scaler.fill_(1.0)

    def b_splines(self, x: Tensor) -> Tensor:
        """B-spline bases ``(N, in, K)`` of ``x`` ``(N, in)`` on this layer's grid."""
        return bspline_bases(x, self.grid, self.spline_order, self.backend)

    def curve2coeff(self, x: Tensor, y: Tensor) -> Tensor:
        """Least-squares coefficients ``(out, in, K)`` so that ``sum_k c[j,i,k] B_k(x[:, i]) ~= y[:, i, j]``."""
        a = self.b_splines(x).transpose(0, 1)  # (in, N, K)
        sol = torch.linalg.lstsq(a, y.transpose(0, 1).to(a.dtype)).solution  # (in, K, out)
        return sol.permute(2, 0, 1).contiguous()

    @property
    def scaled_spline_weight(self) -> Tensor:
        """Effective spline coefficients ``W_spline * scaler`` ``(out, in, K)``."""
        if self.spline_scaler is None:
            return self.spline_weight
        return self.spline_weight * self.spline_scaler.unsqueeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        check_in_features(x, self.in_features, type(self).__name__)
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        base = F.linear(self.base_activation(x), self.base_weight)
        spline = F.linear(self.b_splines(x).reshape(x.shape[0], -1),
                          self.scaled_spline_weight.reshape(self.out_features, -1))
        return (base + spline).reshape(*shape[:-1], self.out_features)

    @torch.no_grad()
    def update_grid(self, x: Tensor, margin: float = 0.01) -> None:
        """Refit the grid to samples ``x`` ``(..., in)`` keeping the spline functions (efficient-kan ``update_grid``).

        New interior knots: ``grid_eps * uniform + (1 - grid_eps) * percentile`` of the sorted samples (``G + 1``
        knots per input, uniform over ``[min - margin, max + margin]``), extended by ``k`` uniform steps on each
        side; coefficients are refit by least squares to the old spline evaluated on the samples.

        Deviation from efficient-kan: efficient-kan writes the refit *scaled* coefficients into ``spline_weight``
        and so multiplies them by ``spline_scaler`` a second time; we divide the scaler out, so the function is
        preserved. The refit runs one input chunk at a time to keep memory ``O(N x in x K)``.
        """
        check_in_features(x, self.in_features, "update_grid")
        x = x.reshape(-1, self.in_features).to(self.grid.dtype)
        n = x.shape[0]
        if n < self.grid_size + 1:
            raise ValueError(f"update_grid needs at least grid_size + 1 = {self.grid_size + 1} samples, got {n}")
        if not torch.isfinite(x).all():
            raise ValueError("update_grid received NaN/Inf samples")
        k = self.spline_order
        lo, hi = self.grid[:, k], self.grid[:, -1 - k]
        outside = ((x < lo) | (x > hi)).float().mean().item()
        if outside > 0:
            warnings.warn(f"update_grid: {outside:.1%} of the samples lie outside the current grid range; the "
                          "spline there is the decaying extrapolation (zero beyond the extended grid), and the "
                          "refit reproduces that", stacklevel=3)
        coeff = self.scaled_spline_weight  # (out, in, K)
        x_sorted = torch.sort(x, dim=0).values
        idx = torch.linspace(0, n - 1, self.grid_size + 1, dtype=torch.int64, device=x.device)
        adaptive = x_sorted[idx]
        step = (x_sorted[-1] - x_sorted[0] + 2 * margin) / self.grid_size
        steps = torch.arange(self.grid_size + 1, dtype=x.dtype, device=x.device).unsqueeze(1)
        uniform = steps * step + x_sorted[0] - margin
        interior = self.grid_eps * uniform + (1 - self.grid_eps) * adaptive
        ext = torch.arange(1, k + 1, dtype=x.dtype, device=x.device).unsqueeze(1)
        new_grid = torch.cat([interior[:1] - step * ext.flip(0), interior, interior[-1:] + step * ext], 0).T
        chunk = max(1, (self.in_features * self.num_bases) // self.out_features)
        new_coeff = torch.empty_like(coeff)
        for s in range(0, self.in_features, chunk):
            sl = slice(s, s + chunk)
            old_bases = bspline_bases(x[:, sl], self.grid[sl], k)  # (N, c, K)
            values = torch.einsum("nik,jik->nij", old_bases, coeff[:, sl])  # (N, c, out)
            new_bases = bspline_bases(x[:, sl], new_grid[sl], k).transpose(0, 1)  # (c, N, K)
            sol = torch.linalg.lstsq(new_bases, values.transpose(0, 1)).solution  # (c, K, out)
            new_coeff[:, sl] = sol.permute(2, 0, 1)
        self.grid.copy_(new_grid)
        if self.spline_scaler is not None:
            scaler = self.spline_scaler.unsqueeze(-1)
            safe = torch.where(scaler.abs() > 1e-8, scaler, torch.ones_like(scaler))
            new_coeff = new_coeff / safe
        self.spline_weight.copy_(new_coeff)

    def regularization_loss(self, regularize_activation: float = 1.0, regularize_entropy: float = 1.0) -> Tensor:
        """KAN sparsification (Liu et al. eq. 2.17-2.19) in efficient-kan's cheap form.

        ``|phi_ij|_1`` is approximated by ``mean_k |c_ijk|`` (no sample pass), ``L1 = sum_ij |phi_ij|_1`` and
        ``S = -sum_ij p_ij log p_ij`` with ``p_ij = |phi_ij|_1 / L1``; returns ``mu_1 L1 + mu_2 S``.
        """
        l1 = self.spline_weight.abs().mean(-1)
        total = l1.sum()
        p = l1 / total.clamp_min(1e-12)
        entropy = -(p * p.clamp_min(1e-12).log()).sum()
        return regularize_activation * total + regularize_entropy * entropy

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, grid_size={self.grid_size}, "
                f"spline_order={self.spline_order}")
