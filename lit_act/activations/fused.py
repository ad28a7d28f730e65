"""Fused autograd Functions for the rational (PAU / Group-Rational) and PolyCom activations.

Each Function saves only its input (and the few coefficients): the forward evaluates the polynomials by Horner's
rule, the backward recomputes them (with their derivatives, again by Horner) and forms the analytic gradients.
No ``(N x degree)`` power matrix is ever built or saved -- the reference ``rational_activations`` pure-PyTorch path
saves a Vandermonde matrix per call. Half-precision inputs are computed, and coefficient gradients accumulated, in
float32; the input gradient is returned in the input's dtype and the coefficient gradients in the coefficients'.

Every Function has two interchangeable implementations of its forward/backward math: plain eager PyTorch and a
``torch.compile``'d one (Inductor fuses each into one or two loops, C++/OpenMP on CPU, Triton on GPU). ``backend``
selects: ``"eager"``, ``"compiled"`` or ``"auto"`` (compiled when the input has at least :data:`COMPILE_MIN_NUMEL`
elements, where the one-off compile cost pays off, and never while an outer ``torch.compile`` is tracing). If
compilation is unavailable (no C++ compiler, unsupported device) the compiled path warns once and falls back to
eager.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

BACKENDS = ("auto", "compiled", "eager")
COMPILE_MIN_NUMEL = 1 << 16
RATIONAL_VERSIONS = ("A", "B", "C", "D", "N")
C_OFFSET = 0.1  # version C: Q = 0.1 + |sum_{k=0..n} b_k x^k| (rational_activations)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return backend


def check_floating(x: Tensor, who: str) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        kind = x.dtype if torch.is_tensor(x) else type(x).__name__
        raise TypeError(f"{who} needs a floating-point tensor, got {kind}; cast the input with .float() first")


class CompiledKernel:
    """A math function with an eager and a lazily ``torch.compile``'d variant (falls back to eager once on failure)."""

    def __init__(self, fn: Callable[..., object]) -> None:
        self.fn = fn
        self._compiled: Callable[..., object] | None = None
        self._broken = False

    def __call__(self, compiled: bool, *args):
        if compiled and not self._broken:
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, dynamic=None)
            try:
                return self._compiled(*args)
            except Exception as err:  # noqa: BLE001 - compiler missing / unsupported device: use eager below
                self._broken = True
                warnings.warn(f"torch.compile of {self.fn.__name__} failed ({type(err).__name__}: {err}); "
                              "using the eager implementation", RuntimeWarning, stacklevel=3)
        return self.fn(*args)


def use_compiled(backend: str, x: Tensor) -> bool:
    if backend == "eager" or torch.compiler.is_compiling():
        return False
    if backend == "compiled":
        return True
    return x.numel() >= COMPILE_MIN_NUMEL and x.device.type in ("cpu", "cuda")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _col(c: Tensor, j: int) -> Tensor:
    """Coefficient column ``j`` of a ``(groups, degree+1)`` table, shaped ``(groups, 1)`` to broadcast over
    ``(M, groups, K)`` inputs."""
    return c[:, j : j + 1]


def _sum_to(grad_cols: list[Tensor], like: Tensor) -> Tensor:
    """Stack per-power ``(groups,)`` sums into ``like``'s ``(g, degree+1)`` shape (``g`` = 1 sums over groups)."""
    g = torch.stack(grad_cols, dim=-1)
    if like.shape[0] == 1 and g.shape[0] != 1:
        g = g.sum(0, keepdim=True)
    return g.to(like.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Rational P(x) / Q(x)
# ----------------------------------------------------------------------------------------------------------------


def _rational_parts(x: Tensor, num: Tensor, den: Tensor, version: str, with_grad: bool):
    """P, Q and (when ``with_grad``) P', Q', the "sign" factor of Q and the denominator's power base.

    Inputs are ``x: (M, G, K)`` and coefficient tables ``num: (g, m+1)``, ``den: (g, n')`` with ``g`` 1 or ``G``.
    """
    m = num.shape[1] - 1
    p = _col(num, m).expand(num.shape[0], 1)
    dp = torch.zeros_like(p)
    for j in range(m - 1, -1, -1):
        if with_grad:
            dp = dp * x + p
        p = p * x + _col(num, j)
    n = den.shape[1]
    if version == "A":  # Q = 1 + sum_k |b_k| |x|^k
        base = x.abs()
        coef = den.abs()
    else:
        base = x
        coef = den
    lowest = 0 if version == "C" else 1
    s = torch.zeros_like(x[:1, :1, :1])
    ds = torch.zeros_like(s)
    if n:
        s = _col(coef, n - 1).expand(coef.shape[0], 1)
        for k in range(n - 2, -1, -1):  # column k holds the coefficient of power k + lowest
            if with_grad:
                ds = ds * base + s
            s = s * base + _col(coef, k)
        if lowest == 1:
            if with_grad:
                ds = ds * base + s
            s = s * base
    if version == "A":
        q = 1.0 + s
        sign = x.sign()  # dQ/dx = sign(x) S'(|x|)
    elif version == "N":
        q = 1.0 + s
        sign = torch.ones_like(s)
    else:
        q = (C_OFFSET if version == "C" else 1.0) + s.abs()
        sign = s.sign()  # dQ/dx = sign(S) S'(x), dQ/db_k = sign(S) x^k
    return p, q, dp, ds, sign, base


def rational_forward_math(x: Tensor, num: Tensor, den: Tensor, version: str) -> Tensor:
    xc = x.to(_compute_dtype(x))
    p, q, *_ = _rational_parts(xc, num.to(xc.dtype), den.to(xc.dtype), version, with_grad=False)
    return (p / q).to(x.dtype)


def rational_backward_math(grad: Tensor, x: Tensor, num: Tensor, den: Tensor, version: str):
    xc = x.to(_compute_dtype(x))
    g = grad.to(xc.dtype)
    numc, denc = num.to(xc.dtype), den.to(xc.dtype)
    p, q, dp, ds, sign, base = _rational_parts(xc, numc, denc, version, with_grad=True)
    inv_q = 1.0 / q
    y = p * inv_q
    grad_x = g * (dp - y * sign * ds) * inv_q
    u = g * inv_q  # dF/da_j = x^j / Q
    w = -(g * y * inv_q)  # dF/dQ
    if version != "A":
        w = w * sign
    grads_num = []
    t = u
    for _ in range(num.shape[1]):
        grads_num.append(t.sum((0, 2)))
        t = t * xc
    grads_den = []
    t = w if version == "C" else w * base
    for _ in range(den.shape[1]):
        grads_den.append(t.sum((0, 2)))
        t = t * base
    grad_den = _sum_to(grads_den, den) if grads_den else torch.zeros_like(den)
    if version == "A":
        grad_den = grad_den * den.sign()
    return grad_x.to(x.dtype), _sum_to(grads_num, num), grad_den


_RATIONAL_FWD = CompiledKernel(rational_forward_math)
_RATIONAL_BWD = CompiledKernel(rational_backward_math)


class RationalFunction(torch.autograd.Function):
    """``F(x) = P(x) / Q(x)`` on ``x: (M, G, K)`` with per-group coefficient tables (see :func:`rational`)."""

    @staticmethod
    def forward(ctx, x: Tensor, num: Tensor, den: Tensor, version: str, compiled: bool) -> Tensor:
        ctx.save_for_backward(x, num, den)
        ctx.version, ctx.compiled = version, compiled
        return _RATIONAL_FWD(compiled, x, num, den, version)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, num, den = ctx.saved_tensors
        grad_x, grad_num, grad_den = _RATIONAL_BWD(ctx.compiled, grad.contiguous(), x, num, den, ctx.version)
        return (grad_x if ctx.needs_input_grad[0] else None, grad_num if ctx.needs_input_grad[1] else None,
                grad_den if ctx.needs_input_grad[2] else None, None, None)


def rational(x: Tensor, numerator: Tensor, denominator: Tensor, version: str, backend: str = "auto") -> Tensor:
    """Fused rational function on ``x`` of shape ``(M, G, K)``.

    ``numerator``: ``(g, m+1)``, ascending powers; ``denominator``: ``(g, n)`` for powers ``1..n`` (versions A, B,
    D, N) or ``(g, n+1)`` for powers ``0..n`` (version C); ``g`` is 1 (shared) or ``G`` (one row per group).
    Version D is evaluated as B here (its training noise is applied to the coefficients by the caller).
    """
    if version not in RATIONAL_VERSIONS:
        raise ValueError(f"unknown rational version {version!r}; valid: {', '.join(RATIONAL_VERSIONS)}")
    check_floating(x, "rational")
    form = "B" if version == "D" else version
    return RationalFunction.apply(x, numerator, denominator, form, use_compiled(check_backend(backend), x))


# ----------------------------------------------------------------------------------------------------------------
# PolyReLU: sum_i a_i ReLU(x)^i
# ----------------------------------------------------------------------------------------------------------------


def _descending_poly(r: Tensor, weight: Tensor, bias: Tensor, with_grad: bool):
    """``sum_{i} weight[i] r^(order - i) + bias`` (PolyCom's descending order) and its derivative in ``r``."""
    y = weight[0].expand(1)
    dy = torch.zeros_like(y)
    for i in range(1, weight.shape[0]):
        if with_grad:
            dy = dy * r + y
        y = y * r + weight[i]
    if with_grad:
        dy = dy * r + y
    return y * r + bias, dy


def polyrelu_forward_math(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    xc = x.to(_compute_dtype(x))
    y, _ = _descending_poly(xc.clamp_min(0), weight.to(xc.dtype), bias.to(xc.dtype), with_grad=False)
    return y.to(x.dtype)


def polyrelu_backward_math(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor):
    xc = x.to(_compute_dtype(x))
    g = grad.to(xc.dtype)
    r = xc.clamp_min(0)
    _, dy = _descending_poly(r, weight.to(xc.dtype), bias.to(xc.dtype), with_grad=True)
    grad_x = torch.where(xc > 0, g * dy, torch.zeros_like(g))
    sums = []
    t = g * r
    for _ in range(weight.shape[0]):
        sums.append(t.sum())
        t = t * r
    grad_w = torch.stack(sums[::-1]).to(weight.dtype)
    return grad_x.to(x.dtype), grad_w, g.sum().reshape(bias.shape).to(bias.dtype)


_POLYRELU_FWD = CompiledKernel(polyrelu_forward_math)
_POLYRELU_BWD = CompiledKernel(polyrelu_backward_math)


class PolyReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, compiled: bool) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.compiled = compiled
        return _POLYRELU_FWD(compiled, x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, bias = ctx.saved_tensors
        gx, gw, gb = _POLYRELU_BWD(ctx.compiled, grad.contiguous(), x, weight, bias)
        return gx, gw, gb, None


def polyrelu(x: Tensor, weight: Tensor, bias: Tensor, backend: str = "auto") -> Tensor:
    """Fused ``sum_i weight[i] ReLU(x)^(r - i) + bias`` (weights in PolyCom's descending order)."""
    check_floating(x, "polyrelu")
    return PolyReLUFunction.apply(x, weight, bias, use_compiled(check_backend(backend), x))


# ----------------------------------------------------------------------------------------------------------------
# PolyNorm: sum_i a_i N(x^i) + a_0, N(z) = z / sqrt(mean_lastdim(z^2) + eps)
# ----------------------------------------------------------------------------------------------------------------


def _rms_normed(z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    scale = torch.rsqrt(z.square().mean(-1, keepdim=True) + eps)
    return z * scale, scale


def polynorm_forward_math(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    xc = x.to(_compute_dtype(x))
    w = weight.to(xc.dtype)
    order = weight.shape[0]
    out = bias.to(xc.dtype).expand(1)
    z = xc
    for power in range(1, order + 1):
        out = out + w[order - power] * _rms_normed(z, eps)[0]
        z = z * xc
    return out.to(x.dtype)


def polynorm_backward_math(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor, eps: float):
    xc = x.to(_compute_dtype(x))
    g = grad.to(xc.dtype)
    w = weight.to(xc.dtype)
    order = weight.shape[0]
    grad_x = torch.zeros_like(xc)
    grad_w = []
    z_prev = torch.ones_like(xc)  # x^(power - 1)
    for power in range(1, order + 1):
        z = z_prev * xc
        zn, scale = _rms_normed(z, eps)
        grad_w.append((g * zn).sum())
        gz = w[order - power] * g
        # d N(z) / dz applied to gz: scale * (gz - zn * mean(gz * zn))
        dz = scale * (gz - zn * (gz * zn).mean(-1, keepdim=True))
        grad_x = grad_x + dz * (power * z_prev)
        z_prev = z
    grad_weight = torch.stack(grad_w[::-1]).to(weight.dtype)
    return grad_x.to(x.dtype), grad_weight, g.sum().reshape(bias.shape).to(bias.dtype)


_POLYNORM_FWD = CompiledKernel(polynorm_forward_math)
_POLYNORM_BWD = CompiledKernel(polynorm_backward_math)


class PolyNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, compiled: bool) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.eps, ctx.compiled = eps, compiled
        return _POLYNORM_FWD(compiled, x, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, bias = ctx.saved_tensors
        gx, gw, gb = _POLYNORM_BWD(ctx.compiled, grad.contiguous(), x, weight, bias, ctx.eps)
        return gx, gw, gb, None, None


def polynorm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6, backend: str = "auto") -> Tensor:
    """Fused ``sum_i weight[r - i] N(x^i) + bias`` with N the RMS normalisation over the last dim."""
    check_floating(x, "polynorm")
    return PolyNormFunction.apply(x, weight, bias, eps, use_compiled(check_backend(backend), x))
