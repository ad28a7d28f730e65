"""Exact curvature diagonals of per-example affine modules, from second derivatives in activation space.

A module whose parameters enter its output affinely, applied once to one row per example,

* ``nn.Linear``: ``z_n = W a_n + b``;
* ``nn.LayerNorm`` over the last dimension: ``z_n = gamma * xhat_n + beta`` with ``xhat_n = (a_n - mean) / std``,

has, for a loss ``L = sum_n l_n(z_n)`` whose examples do not interact (``l_n`` depends on ``z`` only through
``z_n``), the exact diagonal (``A_n = d2 l_n / dz_n^2``, whatever the network computes after the module: residual
connections, LayerNorm, attention over other tokens of the same example, any activation)

    diag_W[i, j] = sum_n (A_n)_ii a_nj^2,    diag_b[i] = sum_n (A_n)_ii,
    diag_gamma[i] = sum_n (A_n)_ii xhat_ni^2,  diag_beta[i] = sum_n (A_n)_ii

because ``z`` is linear in the parameters (no ``dL/dz . d2z/dtheta2`` term) and the cross-example blocks of
``d2L/dz^2`` vanish. This is Becker & LeCun's (1988) diagonal rule for one layer, with the activation Hessian's
diagonal taken exactly instead of backpropagated through a chain (BackPACK's ``DiagHessian`` needs every module
downstream to have a rule; here none does). ``(A_n)_ii`` for all ``n`` at once is one Hessian-vector product in
activation space: the gradient of ``sum_n l_n`` w.r.t. a perturbation ``delta`` added to the module's output holds the
rows ``dl_n/dz_n``, and its forward-mode derivative along ``e_i`` in every row holds the rows ``A_n e_i``
(forward-over-reverse, Pearlmutter 1994); ``d`` directions per module, vmapped, no parameter-sized tangents. For the
GGN, ``(A_n)_ii = u_n^T H_f u_n`` with ``u = J e_i`` from one forward-mode product.
Forward-over-forward (a second directional derivative of ``l_n``, Griewank & Walther, *Evaluating Derivatives*, Ch.
13) would skip the backward pass, but torch's LayerNorm forward derivative treats its saved mean and ``rstd`` as
constants, so the nested ``jvp`` is wrong through LayerNorm: measured trace 26.44 against the dense 29.28.

Measured on the residual MLP of ``benchmarks/bench_hessian.py`` (3,690 parameters, width 32, batch 256; every
parameter is a Linear or LayerNorm one): the whole diagonal in 202 directions (Hessian 0.19 s, GGN 0.06 s, one CPU
thread), within 9e-8 (relative, float32) of the dense diagonal, so the trace is exact
(:func:`lit_act.hessian.trace.trace` uses it).

Not covered (left to the stochastic estimator): modules called more than once or with shared parameters, sequence
inputs ``(N, T, d)`` (the rule needs the cross-position blocks of ``A_n``: ``T^2`` entries per channel), other module
types, and models whose examples interact (train-mode BatchNorm, dropout; checked by re-running the first example
alone).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from lit_act.hessian.losses import output_hessian_product, per_sample_losses, split_batch
from lit_act.hessian.operator import batch_size, example_mean, math_attention, select_parameters

RULE_CURVATURES = ("hessian", "ggn")


@dataclass(frozen=True)
class ExampleDiagonal:
    """Exact diagonals of the covered parameters (example-weighted mean over batches).

    Attributes:
        values: ``{parameter name: diagonal}`` (parameter shapes) for the covered parameters.
        modules: the covered modules' names.
        reason: why a chosen parameter is not covered (the first reason met), ``None`` when all are.
        directions: second directional derivatives computed (per batch).
        seconds: wall time.
    """

    values: dict[str, Tensor]
    modules: list[str]
    reason: str | None
    directions: int
    seconds: float


def _per_example_quadratic(loss: str, outputs: Tensor, tangent: Tensor) -> Tensor:
    """``(N,)``: ``u_n^T (d2L/df_n^2) u_n`` of the mean loss (:mod:`lit_act.hessian.losses`) for ``u = tangent``."""
    curvature = tangent * output_hessian_product(loss, outputs, tangent)
    return curvature.reshape(outputs.shape[0], -1).sum(1)


def _candidates(model: nn.Module, inputs: Tensor, chosen: dict[str, nn.Parameter]
                ) -> tuple[dict[str, tuple[nn.Module, Tensor]], Tensor, str | None]:
    """Modules the rule covers, with their recorded inputs, plus the outputs and the first reason for skipping one."""
    owners: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    wanted = {}
    for name, module in model.named_modules():
        own = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if any(n in chosen for n in own):
            wanted[name] = module
    seen: dict[str, list[Tensor]] = {name: [] for name in wanted}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: seen[n].append(args[0] if args else None))
               for n, m in wanted.items()]
    try:
        with torch.no_grad(), math_attention():
            outputs = model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    n, covered, reason = inputs.shape[0], {}, None
    for name, module in wanted.items():
        calls = seen[name]
        a = calls[0] if len(calls) == 1 else None
        why = None
        if not isinstance(module, (nn.Linear, nn.LayerNorm)):
            why = f"module {name!r} ({type(module).__name__}) has no per-example rule (Linear, LayerNorm)"
        elif len(calls) != 1:
            why = f"module {name!r} is called {len(calls)} times per forward pass"
        elif any(owners[id(p)] > 1 for p in module.parameters(recurse=False)):
            why = f"module {name!r} shares a parameter (tied weights)"
        elif not isinstance(a, Tensor) or a.ndim != 2 or a.shape[0] != n:
            why = (f"module {name!r} does not see one row per example (input shape "
                   f"{tuple(a.shape) if isinstance(a, Tensor) else None}; sequence inputs are not covered)")
        elif isinstance(module, nn.LayerNorm) and (len(module.normalized_shape) != 1 or not module.elementwise_affine):
            why = f"LayerNorm {name!r} normalises more than the last dimension or has no affine parameters"
        if why is None:
            covered[name] = (module, a)
        elif reason is None:
            reason = why
    return covered, outputs, reason


def _examples_independent(model: nn.Module, inputs: Tensor, outputs: Tensor) -> bool:
    """The first example alone gives the same outputs as in the batch (no batch statistics, no dropout)."""
    try:
        with torch.no_grad(), math_attention():
            alone = model(inputs[:1])
    except (RuntimeError, ValueError):  # e.g. train-mode BatchNorm refuses a batch of one
        return False
    scale = float(outputs[:1].abs().max()) + 1e-12
    return alone.shape == outputs[:1].shape and float((alone - outputs[:1]).abs().max()) <= 1e-5 * scale


def _activation_diagonal(model: nn.Module, module: nn.Module, inputs: Tensor, targets: Tensor, loss: str,
                         curvature: str, width: int, chunk: int) -> Tensor:
    """``(N, width)``: ``(A_n)_ii`` of the mean loss w.r.t. ``module``'s output rows (module docstring)."""
    current: dict[str, Tensor] = {}
    handle = module.register_forward_hook(lambda mod, args, out: out + current["delta"])
    n = inputs.shape[0]

    def outputs_at(delta: Tensor) -> Tensor:
        current["delta"] = delta
        return model(inputs)

    def losses_at(delta: Tensor) -> Tensor:
        return per_sample_losses(loss, outputs_at(delta), targets) / n

    zero = torch.zeros(n, width, dtype=inputs.dtype if inputs.is_floating_point() else module.weight.dtype,
                       device=module.weight.device)

    def second(v: Tensor) -> Tensor:
        if curvature == "ggn":
            out, tangent = jvp(outputs_at, (zero,), (v,))
            return _per_example_quadratic(loss, out, tangent)
        rows = jvp(grad(lambda d: losses_at(d).sum()), (zero,), (v,))[1]  # rows (A_n v_n)
        return (rows * v).sum(1)

    eye = torch.eye(width, dtype=zero.dtype, device=zero.device)
    parts = []
    try:
        with math_attention():
            for start in range(0, width, chunk):
                directions = eye[start:start + chunk, None, :].expand(-1, n, -1)
                parts.append(vmap(second)(directions).detach())
    finally:
        handle.remove()
    return torch.cat(parts).T


def _parameter_diagonals(name: str, module: nn.Module, a: Tensor, d: Tensor) -> dict[str, Tensor]:
    prefix = f"{name}." if name else ""
    if isinstance(module, nn.Linear):
        out = {prefix + "weight": d.T @ a.square()}
    else:
        xhat = F.layer_norm(a, module.normalized_shape, eps=module.eps)
        out = {prefix + "weight": (d * xhat.square()).sum(0)}
    if module.bias is not None:
        out[prefix + "bias"] = d.sum(0)
    return out


def example_diagonal(model: nn.Module, batches: Sequence[Any], loss: str, curvature: str = "hessian",
                     params: Sequence[str] | None = None, chunk: int = 64,
                     all_reduce: Callable[[Tensor], Tensor] | None = None) -> ExampleDiagonal:
    """Exact diagonals of the chosen parameters that the per-example rule covers (module docstring).

    Args:
        model: the network (eval mode: dropout or train-mode BatchNorm make examples interact, nothing is covered).
        batches: ``(inputs, targets)`` batches; the loss is ``loss`` (``"cross_entropy"`` or ``"mse"``, see
            :mod:`lit_act.hessian.losses`) of ``model(inputs)``.
        curvature: ``"hessian"`` or ``"ggn"``.
        params: parameter names or patterns (``None`` = all trainable).
        chunk: directions per ``vmap`` call (memory: ``chunk`` forward passes at once).
        all_reduce: sums over processes (DDP).

    Example::

        res = example_diagonal(model, [(x, y)], loss="cross_entropy")
        sum(float(v.sum()) for v in res.values.values())  # the trace of the covered blocks
    """
    if curvature not in RULE_CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r} for the per-example rule; valid: {list(RULE_CURVATURES)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    batches = list(batches)
    if not batches:
        raise ValueError("example_diagonal needs at least one batch, got an empty batch list")
    start = time.perf_counter()
    chosen = select_parameters(model, params)
    inputs, targets = split_batch(batches[0])
    covered, outputs, reason = _candidates(model, inputs, chosen)
    if covered and not _examples_independent(model, inputs, outputs):
        covered, reason = {}, ("the examples of a batch interact (the first example alone gives other outputs: "
                               "train-mode BatchNorm or dropout?)")
    sums: dict[str, Tensor] = {}
    directions = 0
    weights = [float(batch_size(b)) for b in batches]
    for index, (batch, weight) in enumerate(zip(batches, weights)):
        if not covered:
            break
        inputs, targets = split_batch(batch)
        if index > 0:
            covered_now, _, _ = _candidates(model, inputs, chosen)
            if covered_now.keys() != covered.keys():
                raise ValueError("the modules covered by the per-example rule differ between batches")
            covered = covered_now
        for name, (module, a) in covered.items():
            width = module.weight.shape[0]
            d = _activation_diagonal(model, module, inputs, targets, loss, curvature, width, chunk)
            directions += width
            for pname, value in _parameter_diagonals(name, module, a, d).items():
                if pname in chosen:
                    sums[pname] = value.mul(weight) if pname not in sums else sums[pname].add_(value, alpha=weight)
    parts = example_mean(list(sums.values()), sum(weights), all_reduce)
    values = {n: t.reshape(chosen[n].shape) for n, t in zip(sums, parts)}
    missing = [n for n in chosen if n not in values]
    return ExampleDiagonal(values, list(covered), reason if missing else None, directions,
                           time.perf_counter() - start)
