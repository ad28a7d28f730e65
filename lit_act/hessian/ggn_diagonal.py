"""Exact GGN diagonal of any per-example network from per-example Jacobians, and the GGN as a control variate for the
Hessian trace.

For a mean loss over output rows with ``d2L/df_r^2 = S_r S_r^T`` (:func:`lit_act.hessian.losses.output_hessian_factor`;
for cross-entropy over ``C`` classes ``S_r`` is ``C x C``), the GGN ``G = sum_n J_n^T (sum_{r in n} S_r S_r^T) J_n``
(``J_n = df_n/dtheta``, examples that do not interact) has the diagonal

    diag(G) = sum_n sum_{r in n} sum_k (J_n^T S_r e_k)^2,

one vector-Jacobian product per example, row and factor column (Dangel, Kunstner & Hennig, "BackPACK", ICLR 2020,
``DiagGGNExact``, there restricted to sequential networks). Here the products are ``torch.func.vjp`` vmapped over the
columns and over the examples (chunked for memory), so any architecture works (residual connections, LayerNorm,
attention). The cost is ``rows per example x C`` backward passes per example: 10 for a 10-class classifier, but
``T x V`` for a sequence model with ``T`` positions and ``V`` tokens (4,160 for the benchmark's TransformerLM, far
more than a stochastic estimate needs).

Control variate (:func:`ggn_control_variate`): ``tr(H) = tr(G) + tr(H - G)`` with ``tr(G)`` exact and Hutchinson on
``H - G = sum_k (dL/df_k) d2f_k/dtheta2``, whose products are Hessian-vector products of the scalar
``<stop_grad(dL/df), f(theta)>`` (one product each, not an ``Hv`` and a ``Gv``). Its variance per probe is
``2 sum_{i != j} (H - G)_ij^2`` instead of ``2 sum_{i != j} H_ij^2``. Measured on the residual MLP of
``benchmarks/bench_hessian.py`` (tanh and LayerNorm, untrained): 158 against 202 (``||H - G||_F = 8.95``,
``||G||_F = 5.90``, ``||H||_F = 10.2``), a 22% lower variance, but the Jacobians cost ~20 products: at the anchors'
time 9 products are left and the median error is 8.2% against curvlinops Hutchinson's 6.7% (20 seeds), so it does not
pay there and :func:`lit_act.hessian.trace.trace` does not use it by default (the per-example rule of
:mod:`lit_act.hessian.example_diagonal` makes that model's trace exact anyway). It can only pay where the Gauss-Newton
part carries most of the variance (small ``dL/df``: near a minimum); not measured here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from lit_act.hessian.losses import output_gradient, output_hessian_factor, split_batch
from lit_act.hessian.operator import (
    HessianOperator,
    batch_size,
    example_mean,
    math_attention,
    select_parameters,
)
from lit_act.hessian.results import TraceResult
from lit_act.hessian.trace import hutchinson


def _batch_ggn_diagonal(model: nn.Module, chosen: dict[str, nn.Parameter], inputs: Tensor, targets: Tensor,
                        loss: str, max_elements: int) -> dict[str, Tensor]:
    """One batch's ``sum_n sum_{r in n} sum_k (J_n^T S_r e_k)^2``: vmapped vector-Jacobian products over chunks of
    examples and, within an example, of its ``rows x K`` cotangent columns, each chunk's per-column gradients at most
    ``max_elements`` numbers (one column at least); the cotangents are built per chunk."""
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
    values = {n: p.detach() for n, p in chosen.items()}
    with torch.no_grad(), math_attention():
        outputs = model(inputs)
    n = outputs.shape[0]
    classes = outputs.shape[-1] if outputs.ndim > 1 else 1
    rows = outputs.reshape(-1, classes).shape[0] // n
    k = classes  # factor columns per row (S_r is C x C)

    def cotangents(examples: slice, lo: int, hi: int) -> Tensor:
        """Columns ``lo:hi`` of the ``(j, r)``-ordered cotangents ``S_r e_j`` on row ``r`` of each example; only the
        factor columns ``j`` they use are built."""
        index = torch.arange(lo, hi, device=outputs.device)
        j_idx, r_idx = index // rows, index % rows
        j0, j1 = int(j_idx[0]), int(j_idx[-1]) + 1
        factor = output_hessian_factor(loss, outputs, slice(j0, j1))  # (R, C, j1 - j0), the mean over all R rows
        block = factor.reshape(n, rows, classes, j1 - j0)[examples]
        cot = torch.zeros(block.shape[0], hi - lo, rows, classes, dtype=factor.dtype, device=factor.device)
        cot[:, torch.arange(hi - lo), r_idx, :] = block[:, r_idx, :, j_idx - j0].transpose(0, 1)
        return cot.reshape(block.shape[0], hi - lo, *outputs.shape[1:])

    def squares(x: Tensor, cot: Tensor) -> dict[str, Tensor]:
        def out(v: dict[str, Tensor]) -> Tensor:
            return functional_call(model, {**v, **frozen}, (x[None],))[0]

        _, pullback = vjp(out, values)
        grads = vmap(pullback)(cot)[0]
        return {name: g.square().sum(0) for name, g in grads.items()}

    dim = sum(p.numel() for p in chosen.values())
    columns = rows * k
    width = max(1, min(columns, max_elements // max(1, dim)))  # cotangent columns per chunk
    step = max(1, max_elements // max(1, columns * dim)) if width == columns else 1  # examples per chunk
    total = {name: torch.zeros_like(p) for name, p in values.items()}
    with math_attention():
        for start in range(0, n, step):
            examples = slice(start, start + step)
            for lo in range(0, columns, width):
                part = vmap(squares)(inputs[examples], cotangents(examples, lo, min(lo + width, columns)))
                for name in total:
                    total[name] += part[name].sum(0)
    return total


def ggn_diagonal(model: nn.Module, batches: Sequence[Any], loss: str, params: Sequence[str] | None = None,
                 max_elements: int = 2**25, all_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Exact GGN diagonal of the example-weighted mean loss over ``batches`` (module docstring), flattened in
    ``named_parameters`` order like the operators.

    Args:
        model: a network whose examples do not interact (eval mode).
        batches: ``(inputs, targets)`` batches; ``loss`` (``"cross_entropy"`` or ``"mse"``) of ``model(inputs)``.
        params: parameter names or patterns (``None`` = all trainable).
        max_elements: memory bound: examples, and an example's cotangent columns when one example's exceed it, are
            processed in chunks whose per-column gradients hold at most this many numbers (one column at least).
        all_reduce: sums a tensor over processes (DDP): the example-weighted sums and the example count are
            reduced, so every rank returns the diagonal over all ranks' batches.

    Example::

        diag = ggn_diagonal(model, [(x, y)], loss="cross_entropy")
        float(diag.sum())  # tr(G)
    """
    from lit_act.hessian.losses import OUTPUT_LOSSES

    if loss not in OUTPUT_LOSSES:
        raise ValueError(f"unknown output loss {loss!r}; supported losses (known output Hessian): "
                         f"{list(OUTPUT_LOSSES)}")
    if max_elements < 1:
        raise ValueError(f"max_elements must be >= 1, got {max_elements}")
    batches = list(batches)
    if not batches:
        raise ValueError("ggn_diagonal needs at least one batch, got an empty batch list")
    chosen = select_parameters(model, params)
    total, count = None, 0.0
    for batch in batches:
        inputs, targets = split_batch(batch)
        part = _batch_ggn_diagonal(model, chosen, inputs, targets, loss, max_elements)
        flat = torch.cat([part[name].reshape(-1) for name in chosen]) * batch_size(batch)
        total = flat if total is None else total + flat
        count += batch_size(batch)
    return example_mean([total], count, all_reduce)[0]


class _ResidualCurvatureLoss:
    """``(model, (inputs, g)) -> <g, model(inputs)>``: its Hessian is ``sum_k g_k d2f_k/dtheta2`` (``= H - G`` for
    ``g = dL/df``)."""

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        inputs, weights = batch
        return (model(inputs) * weights).sum()


def ggn_control_variate(op: HessianOperator, budget: int, loss: str, seed: int = 0) -> TraceResult:
    """``tr(H) = tr(G)`` (exact, :func:`ggn_diagonal`) ``+`` Hutchinson on ``H - G`` with ``budget`` probes.

    ``op`` is the Hessian operator (its model, batches and parameters are used; its loss must be ``loss`` of
    ``model(inputs)``). Example::

        res = ggn_control_variate(HessianOperator(model, None, [(x, y)]), 30, loss="cross_entropy")
    """
    if budget < 2:
        raise ValueError(f"budget must be >= 2 (a standard error needs two probes), got {budget}")
    if getattr(op, "curvature", "hessian") != "hessian":
        raise ValueError(f"the GGN control variate estimates the Hessian's trace; got a {op.curvature!r} operator")
    start = time.perf_counter()
    diag = ggn_diagonal(op.model, op.batches, loss, params=op.names, all_reduce=op.all_reduce)
    batches = []
    for batch in op.batches:
        inputs, targets = split_batch(batch)
        with torch.no_grad(), math_attention():
            batches.append((inputs, output_gradient(loss, op.model(inputs), targets)))
    residual = HessianOperator(op.model, _ResidualCurvatureLoss(), batches, params=op.names,
                               backend="cached" if op.caching else "reverse",  # chunked: no chunk graph kept
                               vmap_size=op.vmap_size, all_reduce=op.all_reduce)
    rest = hutchinson(residual, budget, seed)
    exact = float(diag.double().sum())
    op.matvecs += residual.matvecs
    return TraceResult(exact + rest.estimate, rest.std_error, residual.matvecs, time.perf_counter() - start,
                       "ggn_control_variate", exact_part=exact)
