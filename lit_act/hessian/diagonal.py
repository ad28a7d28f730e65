"""Exact Hessian and GGN diagonals in one extended backward pass.

Becker & LeCun (1988) backpropagate second derivatives through a layered network; BackPACK's ``DiagHessian`` and
``DiagGGNExact`` (Dangel, Kunstner & Hennig, "BackPACK: Packing more into backprop", ICLR 2020, Sec. 2 and App. A)
make it exact by backpropagating a symmetric factorisation of the Hessian w.r.t. each layer's output instead of its
diagonal. For one row ``r`` (an example, or a position of a sequence model) and a chain ``f = m_L o ... o m_1``:

* at the outputs, ``d2L/df_r^2 = S_r S_r^T`` (:func:`lit_act.hessian.losses.output_hessian_factor`; for
  cross-entropy the exact square root of ``diag(p) - p p^T``);
* through ``z = a W^T + b``: ``diag_W += sum_r (sum_k S_r[:,k]^2) (a_r^2)^T``, ``diag_b += sum_r sum_k S_r[:,k]^2``,
  and ``S <- W^T S``;
* through an elementwise ``a = phi(h)``: ``S <- phi'(h) S``, and for the Hessian (not the GGN) the residual
  ``diag(phi''(h) * dL/da)`` joins as two more (diagonal) factors, ``+sqrt(max(res, 0))`` and ``-sqrt(max(-res, 0))``,
  which the earlier layers propagate like the others (signed factors).

So ``diag(H)`` (and the GGN's) for every parameter of the chain costs one forward and roughly one backward per
factor column (``C`` columns for ``C`` classes, plus ``d`` per hidden width with curved activations). For ReLU
(``phi'' = 0``) there is no residual and the Hessian diagonal is the GGN's.

The chain is found from the modules, not assumed: one forward with hooks on the leaf modules records their calls, then
walking back from the model's output, each call must have produced exactly the tensor the next one consumed. The
covered modules are ``nn.Linear``, parameter-free elementwise activations (:data:`ELEMENTWISE`), ``nn.Identity``,
``nn.Dropout`` in eval mode and a shape-preserving ``nn.Flatten``. The walk stops at the first module outside these
rules or the first functional op / residual connection; parameters before it are "uncovered".
:func:`exact_diagonal` raises naming that module, or (``on_uncovered="partial"``) returns the covered blocks only,
which :func:`lit_act.hessian.trace.trace` uses as a control variate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lit_act.hessian.losses import (
    output_gradient,
    output_hessian_factor,
    output_loss,
    resolve_output_loss,
    split_batch,
)
from lit_act.hessian.operator import LossFn, batch_size, math_attention, select_parameters
from lit_act.hessian.results import DiagonalResult

ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Softplus, nn.ELU, nn.CELU, nn.SELU,
               nn.Mish, nn.Hardtanh, nn.ReLU6, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Hardswish,
               nn.Hardsigmoid)
DIAGONAL_CURVATURES = ("hessian", "ggn")
ON_UNCOVERED = ("error", "partial")
COVERED = "nn.Linear, parameter-free elementwise activations, nn.Identity, nn.Dropout in eval mode, nn.Flatten"


class UncoveredModuleError(ValueError):
    """The exact diagonal rules do not cover a module that owns chosen parameters."""


@dataclass
class _Call:
    name: str
    module: nn.Module
    input: Tensor
    output: Tensor


@dataclass(frozen=True)
class Chain:
    """The covered tail of the network: calls in forward order, the parameter names they own, and why the walk
    stopped (``None`` when it reached the input)."""

    calls: list[_Call]
    covered: list[str]
    stop: str | None


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, ELEMENTWISE) and not any(True for _ in module.parameters()):
        return "elementwise"
    if isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and (not module.training or module.p == 0)):
        return "identity"
    if isinstance(module, nn.Flatten):
        return "flatten"
    return None


def trace_chain(model: nn.Module, inputs: Tensor) -> tuple[Chain, Tensor]:
    """Run ``model(inputs)`` once (no grad) with hooks on the leaf modules and return the covered tail (module
    docstring) and the outputs."""
    calls: list[_Call] = []
    counts: dict[int, int] = {}

    def record(name: str, module: nn.Module, args: tuple, output: Any) -> None:
        counts[id(module)] = counts.get(id(module), 0) + 1
        if len(args) == 1 and isinstance(args[0], Tensor) and isinstance(output, Tensor):
            calls.append(_Call(name, module, args[0], output))
        else:
            calls.append(_Call(name, module, None, None))  # type: ignore[arg-type]

    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: record(n, mod, args, out)) for n, m in leaves]
    try:
        with torch.no_grad(), math_attention():
            outputs = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{module_name}.{pname}" if module_name else pname)
    tail: list[_Call] = []
    current, stop = outputs, None
    for call in reversed(calls):
        if call.output is None or call.output is not current:
            if tail:
                stop = (f"the input of {tail[-1].name!r} is not the output of the module called before it "
                        f"({call.name!r}, {type(call.module).__name__}): a functional op, a residual connection or "
                        "a container's own computation sits between them")
            else:
                stop = ("the model's output is not the output of its last leaf module "
                        f"({call.name!r}, {type(call.module).__name__})")
            break
        kind = _kind(call.module)
        shared = any(len(owners.get(id(p), [])) > 1 for p in call.module.parameters())
        if kind is None or counts[id(call.module)] > 1 or shared or (
                kind == "flatten" and call.input.shape != call.output.shape):
            why = ("is called more than once" if counts[id(call.module)] > 1 else "shares a parameter (tied weights)"
                   if shared else "changes the shape" if kind == "flatten" else "is not covered")
            stop = (f"module {call.name!r} ({type(call.module).__name__}) {why}; the exact rules cover {COVERED}")
            break
        tail.append(call)
        current = call.input
    tail.reverse()
    covered = [f"{c.name}.{n}" if c.name else n for c in tail for n, _ in c.module.named_parameters(recurse=False)]
    return Chain(tail, covered, stop), outputs


def _elementwise_derivatives(module: nn.Module, h: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """``(phi'(h), phi''(h))``: closed forms for ReLU/tanh/sigmoid from the recorded output ``a``; for every other
    elementwise module its exact derivatives by double backward of ``sum(phi(x))`` (elementwise, so the gradient of the
    sum is the derivative at each entry; forward-mode AD is not used: e.g. ``aten::silu_backward`` has none)."""
    if isinstance(module, nn.ReLU):
        return (h > 0).to(h.dtype), torch.zeros_like(h)
    if isinstance(module, nn.Tanh):
        d1 = 1 - a.square()
        return d1, -2 * a * d1
    if isinstance(module, nn.Sigmoid):
        d1 = a * (1 - a)
        return d1, d1 * (1 - 2 * a)
    with torch.enable_grad():
        x = h.detach().requires_grad_(True)
        (d1,) = torch.autograd.grad(module(x).sum(), x, create_graph=True)
        d2 = torch.autograd.grad(d1.sum(), x)[0] if d1.requires_grad else torch.zeros_like(h)
    return d1.detach(), d2


@dataclass
class _Factor:
    """A signed factor ``sign * S S^T`` of the per-row Hessian w.r.t. the current layer's output, with
    ``S[r, k, i]`` stored in one of three forms: ``dense`` ``(R, K, d)``; ``diag`` ``(R, d)`` for ``diag(D)`` (a
    residual term); or ``D[r, k] M[k, i] E[r, i]`` (``diag``, ``scale`` ``(K, d)`` = a weight, ``gain`` ``(R, d)``):
    a residual term after one Linear layer, kept unexpanded until another Linear layer needs it."""

    sign: float
    dense: Tensor | None = None
    diag: Tensor | None = None
    scale: Tensor | None = None
    gain: Tensor | None = None

    def squares(self) -> Tensor:
        """``sum_k S[r, k, i]^2``, ``(R, d)``."""
        if self.dense is not None:
            return self.dense.square().sum(1)
        if self.scale is None:
            return self.diag.square()
        out = self.diag.square() @ self.scale.square()
        return out if self.gain is None else out.mul_(self.gain.square())

    def expanded(self) -> Tensor:
        if self.dense is not None:
            return self.dense
        out = self.diag[:, :, None] * self.scale
        return out if self.gain is None else out.mul_(self.gain[:, None, :])

    def through_linear(self, weight: Tensor) -> _Factor:
        if self.dense is None and self.scale is None:
            return _Factor(self.sign, diag=self.diag, scale=weight)
        f = self.expanded()
        return _Factor(self.sign, dense=(f.reshape(-1, f.shape[-1]) @ weight).reshape(f.shape[0], f.shape[1], -1))

    def through_elementwise(self, d1: Tensor) -> _Factor:
        if self.dense is not None:
            return _Factor(self.sign, dense=self.dense * d1[:, None, :])
        if self.scale is None:
            return _Factor(self.sign, diag=self.diag * d1)
        return _Factor(self.sign, diag=self.diag, scale=self.scale, gain=d1 if self.gain is None else self.gain * d1)


def _batch_diagonal(chain: Chain, outputs: Tensor, targets: Tensor, loss: str,
                    curvature: str) -> dict[str, Tensor]:
    """``{parameter name: diagonal}`` of one batch's mean loss for the covered parameters.

    Dense factors are stored as ``(R, K, d)`` (columns first) so that propagating through a Linear layer is one GEMM
    ``(R K, d_out) @ W``; residual factors stay diagonal or unexpanded (:class:`_Factor`) while they can."""
    width = outputs.shape[-1] if outputs.ndim > 1 else 1
    grad = output_gradient(loss, outputs, targets).reshape(-1, width)
    factors = [_Factor(1.0, dense=output_hessian_factor(loss, outputs).transpose(1, 2))]
    needs_factor = [any(_kind(c.module) == "linear" for c in chain.calls[:i]) for i in range(len(chain.calls))]
    result: dict[str, Tensor] = {}
    for index in range(len(chain.calls) - 1, -1, -1):
        call = chain.calls[index]
        kind = _kind(call.module)
        if kind == "linear":
            a = call.input.reshape(-1, call.input.shape[-1])
            sq = factors[0].squares().mul_(factors[0].sign)
            for factor in factors[1:]:
                sq.add_(factor.squares(), alpha=factor.sign)
            prefix = f"{call.name}." if call.name else ""
            result[prefix + "weight"] = sq.T @ a.square()
            if call.module.bias is not None:
                result[prefix + "bias"] = sq.sum(0)
            if needs_factor[index]:
                factors = [f.through_linear(call.module.weight) for f in factors]
                grad = grad @ call.module.weight
        elif kind == "elementwise" and needs_factor[index]:
            h, out = call.input.reshape(-1, call.input.shape[-1]), call.output.reshape(-1, call.input.shape[-1])
            d1, d2 = _elementwise_derivatives(call.module, h, out)
            factors = [f.through_elementwise(d1) for f in factors]
            if curvature == "hessian" and not isinstance(call.module, nn.ReLU):
                residual = d2 * grad
                if bool(residual.ne(0).any()):
                    factors += [_Factor(1.0, diag=residual.clamp_min(0).sqrt()),
                                _Factor(-1.0, diag=(-residual).clamp_min(0).sqrt())]
            grad = grad * d1
    return result


def exact_diagonal(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None = None, loss: str | None = None,
                   curvature: str = "hessian", params: Sequence[str] | None = None, on_uncovered: str = "error",
                   all_reduce: Callable[[Tensor], Tensor] | None = None) -> DiagonalResult:
    """Exact diagonal of the Hessian (or GGN) of the example-weighted mean loss over ``batches``.

    Args:
        model: the network (eval mode for dropout; its chain is detected, see the module docstring).
        batches: ``(inputs, targets)`` batches.
        loss_fn: the training loss; it must equal the named ``loss`` on ``model(inputs)`` (checked on the first batch).
        loss: ``"cross_entropy"`` or ``"mse"`` (default: detected for lit-act models).
        curvature: ``"hessian"`` or ``"ggn"``.
        params: parameter names or patterns (``None`` = all trainable).
        on_uncovered: ``"error"`` raises :class:`UncoveredModuleError` naming the first uncovered module;
            ``"partial"`` returns the covered blocks (``result.covered``; uncovered entries are NaN).
        all_reduce: sums over processes (DDP).

    Example::

        res = exact_diagonal(model, [(x, y)], loss="cross_entropy")
        res.trace, res.blocks["0"]
    """
    if curvature not in DIAGONAL_CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r} for an exact diagonal; valid: {list(DIAGONAL_CURVATURES)}")
    if on_uncovered not in ON_UNCOVERED:
        raise ValueError(f"unknown on_uncovered {on_uncovered!r}; valid: {list(ON_UNCOVERED)}")
    batches = list(batches)
    if not batches:
        raise ValueError("exact_diagonal needs at least one batch, got an empty batch list")
    name = resolve_output_loss(model, loss_fn, loss)
    start = time.perf_counter()
    chosen = select_parameters(model, params)
    first = next(iter(chosen.values()))
    sums = {n: torch.zeros_like(p, dtype=p.dtype) for n, p in chosen.items()}
    weights = [float(batch_size(b)) for b in batches]
    chain = None
    for index, (batch, weight) in enumerate(zip(batches, weights)):
        inputs, targets = split_batch(batch)
        chain, outputs = trace_chain(model, inputs)
        if index == 0:
            _check_loss_matches(model, loss_fn, batch, name, outputs, targets)
            missing = [n for n in chosen if n not in chain.covered]
            if missing and on_uncovered == "error":
                raise UncoveredModuleError(
                    f"no exact diagonal for {missing[:4]}{' ...' if len(missing) > 4 else ''}: {chain.stop}. Pass "
                    "on_uncovered='partial' (or trace(..., on_uncovered='control_variate')) to compute the covered "
                    "blocks exactly and estimate the rest")
        with torch.no_grad():
            for pname, value in _batch_diagonal(chain, outputs, targets, name, curvature).items():
                if pname in sums:
                    sums[pname].add_(value.reshape(sums[pname].shape), alpha=weight)
    total = torch.tensor(sum(weights), dtype=torch.float64, device=first.device)
    parts = list(sums.values())
    if all_reduce is not None:  # DDP: every rank sums its examples; one reduction per tensor
        total, parts = all_reduce(total), [all_reduce(t) for t in parts]
    parts = [t / float(total) for t in parts]
    covered = [n for n in chosen if n in chain.covered]
    blocks: dict[str, float] = {}
    for pname, part in zip(chosen, parts):
        if pname in chain.covered:
            if not torch.isfinite(part.sum()):
                raise FloatingPointError(f"NaN/Inf in the exact diagonal of {pname}: the loss or its curvature is "
                                         "not finite at the current parameters")
            owner = pname.rpartition(".")[0] or "<root>"
            blocks[owner] = blocks.get(owner, 0.0) + float(part.double().sum())
        else:
            part.fill_(float("nan"))
    flat = torch.cat([t.reshape(-1) for t in parts])
    return DiagonalResult(diagonal=flat, names=list(chosen), covered=covered,
                          trace=sum(blocks.values()), blocks=blocks, curvature=curvature,
                          passes=len(batches), seconds=time.perf_counter() - start,
                          uncovered_reason=None if len(covered) == len(chosen) else chain.stop)


def _check_loss_matches(model: nn.Module, loss_fn: LossFn | None, batch: Any, name: str, outputs: Tensor,
                        targets: Tensor) -> None:
    """A custom ``loss_fn`` must be the named loss of ``model(inputs)`` (otherwise the diagonal is another
    function's)."""
    from lit_act.hessian.operator import default_loss_fn

    if loss_fn in (None, default_loss_fn):
        return
    with torch.no_grad(), math_attention():
        given, ours = float(loss_fn(model, batch)), float(output_loss(name, outputs, targets))
    if abs(given - ours) > 1e-5 * max(1.0, abs(ours)):
        raise ValueError(f"loss_fn(model, batch) = {given:.6g} differs from {name}(model(inputs), targets) = "
                         f"{ours:.6g}; the curvature needs the loss named by `loss` (one of cross_entropy, mse) "
                         "applied to model(inputs)")
