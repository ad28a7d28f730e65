"""Losses whose Hessian w.r.t. the model outputs is known in closed form (needed by the GGN, the Fisher and the exact
diagonals).

Convention (lit-act's ``LitActModule.loss`` and ``F.mse_loss``): a batch ``(inputs, targets)``, outputs
``f = model(inputs)``, and

* ``"cross_entropy"``: ``L = (1/R) sum_r CE(f_r, y_r)`` over the ``R`` rows of ``f.reshape(-1, C)`` (every position
  of a sequence model is a row). With ``p_r = softmax(f_r)``: ``dL/df_r = (p_r - e_{y_r}) / R`` and
  ``d2L/df_r^2 = (diag(p_r) - p_r p_r^T) / R = S_r S_r^T`` with the exact square-root factor
  ``S_r = (diag(sqrt p_r) - p_r sqrt(p_r)^T) / sqrt(R)`` (``sum_c p_rc = 1`` makes the cross terms cancel).
* ``"mse"``: ``L = (1/M) sum (f - y)^2`` over all ``M`` entries (``F.mse_loss``'s mean): ``dL/df = 2 (f - y) / M``,
  ``d2L/df^2 = (2/M) I``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OUTPUT_LOSSES = ("cross_entropy", "mse")


def resolve_output_loss(model: nn.Module, loss_fn: Any, loss: str | None) -> str:
    """The output loss: ``loss`` when given (validated), else ``"cross_entropy"`` for lit-act models that keep the
    default ``LitActModule.loss`` and the default ``loss_fn``; anything else raises, naming the supported losses."""
    if loss is not None:
        if loss not in OUTPUT_LOSSES:
            raise ValueError(f"unknown output loss {loss!r}; supported losses (known output Hessian): "
                             f"{list(OUTPUT_LOSSES)}")
        return loss
    from lit_act.hessian.operator import default_loss_fn
    from lit_act.models.base import LitActModule

    if loss_fn in (None, default_loss_fn) and getattr(type(model), "loss", None) is LitActModule.loss:
        return "cross_entropy"
    raise ValueError(f"the output Hessian of this loss is unknown ({type(model).__name__} with "
                     f"loss_fn={getattr(loss_fn, '__name__', loss_fn)!r}); pass loss=... naming one of the supported "
                     f"losses {list(OUTPUT_LOSSES)} (with batches `(inputs, targets)` and outputs `model(inputs)`)")


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError("curvatures with a known output loss expect batches `(inputs, targets)`, got "
                        f"{type(batch).__name__}")
    return batch[0], batch[1]


def class_targets(targets: Tensor, classes: int) -> Tensor:
    """``targets`` flattened, checked to be class indices: ``ignore_index`` rows (``-100``, padding) would leave
    ``F.cross_entropy``'s mean over fewer rows than the ``R`` of the module docstring."""
    flat = targets.reshape(-1)
    low, high = (int(t) for t in torch.aminmax(flat)) if flat.numel() else (0, 0)
    if low < 0 or high >= classes:
        raise ValueError(f"cross_entropy targets must be class indices in [0, {classes}); got values in "
                         f"[{low}, {high}]. Rows with ignore_index (-100, padding) have no "
                         "output-loss rule: drop them from the batches, or use a stochastic trace with your loss_fn")
    return flat


def output_loss(name: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """The mean loss of the module docstring."""
    if name == "cross_entropy":
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), class_targets(targets, outputs.shape[-1]))
    return F.mse_loss(outputs, targets.reshape(outputs.shape).to(outputs.dtype))


def per_sample_losses(name: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """``(N,)`` losses of the ``N`` examples (leading dimension) whose mean is :func:`output_loss`."""
    n = outputs.shape[0]
    if name == "cross_entropy":
        rows = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), reduction="none")
        return rows.reshape(n, -1).mean(dim=1)
    sq = (outputs - targets.reshape(outputs.shape).to(outputs.dtype)).square()
    return sq.reshape(n, -1).mean(dim=1)


def output_gradient(name: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """``dL/df`` (same shape as ``outputs``)."""
    if name == "cross_entropy":
        classes = outputs.shape[-1]
        rows = outputs.reshape(-1, classes)
        grad = torch.softmax(rows, dim=-1)
        grad[torch.arange(rows.shape[0], device=rows.device), class_targets(targets, classes)] -= 1
        return (grad / rows.shape[0]).reshape(outputs.shape)
    return 2 * (outputs - targets.reshape(outputs.shape).to(outputs.dtype)) / outputs.numel()


def output_hessian_product(name: str, outputs: Tensor, u: Tensor) -> Tensor:
    """``(d2L/df^2) u`` for ``u`` shaped like ``outputs``."""
    if name == "cross_entropy":
        classes = outputs.shape[-1]
        p = torch.softmax(outputs.reshape(-1, classes), dim=-1)
        u2 = u.reshape(-1, classes)
        return ((p * u2 - p * (p * u2).sum(-1, keepdim=True)) / p.shape[0]).reshape(outputs.shape)
    return u * (2.0 / outputs.numel())


def output_hessian_factor(name: str, outputs: Tensor, columns: slice = slice(None)) -> Tensor:
    """``(R, C, K)`` factors with ``d2L/df_r^2 = S_r S_r^T`` over the rows ``f.reshape(-1, C)`` (``K = C``), or only
    the ``columns`` of ``S_r`` (so a large ``C`` can be drained in blocks: ``R C^2`` entries in all)."""
    classes = outputs.shape[-1] if outputs.ndim > 1 else 1
    rows = outputs.reshape(-1, classes)
    index = torch.arange(classes, device=rows.device)[columns]
    eye = (torch.arange(classes, device=rows.device)[:, None] == index).to(rows.dtype)  # (C, K): only these columns
    if name == "cross_entropy":  # S_r[:, k] = sqrt(p_k) (e_k - p)
        p = torch.softmax(rows, dim=-1)
        factor = (eye[None] - p[:, :, None]) * p[:, None, columns].sqrt()
        return factor / math.sqrt(rows.shape[0])
    return eye.expand(rows.shape[0], *eye.shape) * math.sqrt(2.0 / outputs.numel())


def output_hessian_parts(name: str, rows: Tensor, total: int) -> tuple[Tensor, Tensor | None]:
    """``(w, rho)`` with ``d2L/df_r^2 = diag(w_r) - rho_r rho_r^T`` for ``rows`` ``(R_b, C)`` of outputs with ``total``
    entries in all (the mean's denominator: ``R C`` for cross-entropy, ``M`` for MSE): ``w = p / R``,
    ``rho = p / sqrt(R)``; for MSE one broadcast row ``w = 2 / M`` and ``rho = None``."""
    if name == "cross_entropy":
        p = torch.softmax(rows, dim=-1)
        count = total // rows.shape[-1]
        return p / count, p / math.sqrt(count)
    return torch.full((1, rows.shape[-1]), 2.0 / total, dtype=rows.dtype, device=rows.device), None


def output_hessian_diagonal(name: str, outputs: Tensor) -> Tensor:
    """``diag(d2L/df_r^2)`` for every row, shaped like ``outputs`` (``p (1 - p) / R`` for cross-entropy)."""
    if name == "cross_entropy":
        classes = outputs.shape[-1]
        p = torch.softmax(outputs.reshape(-1, classes), dim=-1)
        return (p * (1 - p) / p.shape[0]).reshape(outputs.shape)
    return torch.full_like(outputs, 2.0 / outputs.numel())
