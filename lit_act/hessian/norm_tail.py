"""Exact Hessian and GGN diagonals of a pre-norm network's tail, in closed form.

The tail of a pre-norm Transformer (GPT-2, nanoGPT, lit-act's ``TransformerLM``) after its last attention layer is
position-wise: the last block's MLP branch, a residual connection, the final normalisation and the head,

    u = W_1 h + b_1,   a = phi(u),   z = W_2 a + b_2,   r = s + z,   n = gamma * xhat(r) + beta,   f = W_h n + b_h,

with ``s`` (the residual stream, or zero) independent of these parameters and ``xhat`` LayerNorm's
``(r - mean(r)) / sigma`` or RMSNorm's ``r / sigma`` over the last dimension (``sigma = sqrt(var(r) + eps)``, the
variance biased, or ``sqrt(mean(r^2) + eps)``). Each row (a position of a sequence, an example of a flat batch) is
its own block of ``d2L/df^2``, so the rows can be treated one at a time. Write ``d`` for ``r``'s width,
``C = I - 1 1^T / d`` (``I`` for RMSNorm), ``Q = C - xhat xhat^T / d``, ``B = W_h diag(gamma)`` and, per row,
``d2L/df^2 = diag(w) - rho rho^T`` (cross-entropy: ``w = p / R``, ``rho = p / sqrt(R)``; MSE: ``w = 2 / M``,
``rho = 0``; :mod:`lit_act.hessian.losses`) and ``g = dL/dxhat = gamma * (W_h^T dL/df)``. Then

* ``dxhat/dr = Q / sigma`` (the ``eps`` inside ``sigma`` included), so ``dL/dr = Q g / sigma`` and
  ``d2L/dr2 = Q B^T (diag(w) - rho rho^T) B Q / sigma^2 + N(g)``, where the normalisation's own curvature,
  ``N(g) = d2(g^T xhat)/dr2``, is (by differentiating ``g^T C r / sigma`` twice; checked against autograd)

      N(g) = [ -(C g xhat^T + xhat g^T C) / d - (g^T xhat) C / d + 3 (g^T xhat) xhat xhat^T / d^2 ] / sigma^2;

* ``z`` is linear in ``W_2, b_2`` and ``dr/dz = I``: ``diag_W2[i, j] = sum_rows (d2L/dr2)_ii a_j^2``,
  ``diag_b2[i] = sum_rows (d2L/dr2)_ii``;
* ``d2L/du2 = diag(phi') W_2^T (d2L/dr2) W_2 diag(phi') + diag(phi'' * (W_2^T dL/dr))`` (Becker & LeCun 1988),
  and ``u`` is linear in ``W_1, b_1``: ``diag_W1[k, j] = sum_rows (d2L/du2)_kk h_j^2``;
* ``n`` is linear in ``gamma, beta``: ``diag_gamma[i] = sum_rows (W_h^T d2L/df2 W_h)_ii xhat_i^2``.

The GGN drops ``N(g)`` and the ``phi''`` term. Nothing above is formed as a ``d x d`` matrix per row: ``Q`` is a
fixed matrix plus a rank-one correction per row, so with ``K = B C W_2`` (fixed, ``V x d_ff``), ``v = B xhat`` and
``q = W_2^T xhat`` (per row),

    (W_2^T Q B^T diag(w) B Q W_2)_kk = sum_c w_c (K_ck - v_c q_k / d)^2
                                     = (w K^2)_k - 2 q_k ((w v) K)_k / d + q_k^2 (w . v^2) / d^2,

and likewise for ``r``'s own diagonal (``B C`` instead of ``K``): ``O(V d_ff)`` per row, a few matrix products the
size of the head's, instead of ``O(V d d_ff)`` for a factor backpropagated BackPACK-style (Dangel, Kunstner & Hennig,
ICLR 2020), which has no rule for normalisation layers or residual connections. Rows and the vocabulary are processed
in blocks of :data:`_BLOCK_ELEMENTS` entries; ``K`` is formed once when it fits in one block, else one vocabulary
block at a time for every block of rows (``O(V d d_ff)`` more per block of rows: large vocabularies and ``d_ff``).

Not visible to the rule (it reads values, not the autograd graph): a stop-gradient on the residual's branch side
(``norm(h + z.detach())``) passes its checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_act.hessian.losses import output_gradient, output_hessian_parts

NORMS = (nn.LayerNorm, nn.RMSNorm)
_BLOCK_ELEMENTS = 1 << 24  # largest (vocabulary block, d_ff) slice of K


@dataclass(frozen=True)
class NormTail:
    """One batch's recorded tail (module docstring): ``h`` the input of ``fc_in``, ``u`` its output, ``a = phi(u)``,
    ``r`` the input of ``norm``; ``d1, d2 = phi'(u), phi''(u)``; the modules' names for the result's keys."""

    fc_in: tuple[str, nn.Linear]
    fc_out: tuple[str, nn.Linear]
    norm: tuple[str, nn.Module]
    head: nn.Linear
    h: Tensor
    a: Tensor
    r: Tensor
    d1: Tensor
    d2: Tensor


def _normalised(norm: nn.Module, r: Tensor) -> tuple[Tensor, Tensor]:
    """``(xhat, sigma)`` over the rows of ``r`` ``(R, d)`` as ``norm`` computes them."""
    c = r - r.mean(-1, keepdim=True) if isinstance(norm, nn.LayerNorm) else r
    eps = norm.eps if norm.eps is not None else torch.finfo(torch.promote_types(r.dtype, torch.float32)).eps
    sigma = (c.square().mean(-1, keepdim=True) + eps).sqrt()
    return c / sigma, sigma


def _quadratic_diagonal(m: Tensor, right: Tensor | None, w: Tensor, rho: Tensor | None, v: Tensor, q: Tensor,
                        d: int) -> Tensor:
    """``diag((M - v q^T / d)^T (diag(w) - rho rho^T) (M - v q^T / d))`` per row, ``M = m @ right`` (``right``
    ``None``: ``M = m``) ``(V, k)`` fixed, ``w``, ``rho``, ``v`` ``(R, V)`` (``w`` may be one broadcast row), ``q``
    ``(R, k)``; the vocabulary in blocks of ``M``'s rows, formed one block at a time."""
    k = q.shape[1]
    step = max(1, _BLOCK_ELEMENTS // max(1, k))
    wm2 = wvm = rm = 0
    wv = w * v
    for lo in range(0, m.shape[0], step):
        block = m[lo:lo + step] if right is None else m[lo:lo + step] @ right
        wm2 = wm2 + w[:, lo:lo + step] @ block.square()
        wvm = wvm + wv[:, lo:lo + step] @ block
        if rho is not None:
            rm = rm + rho[:, lo:lo + step] @ block
    out = wm2.expand_as(q) - 2 * q * wvm / d + q.square() * (wv * v).sum(-1, keepdim=True) / d ** 2
    if rho is not None:
        out = out - (rm - q * (rho * v).sum(-1, keepdim=True) / d).square()
    return out


def norm_tail_diagonal(tail: NormTail, outputs: Tensor, targets: Tensor, loss: str,
                       curvature: str) -> dict[str, Tensor]:
    """``{parameter name: diagonal}`` of the mean loss of one batch for ``fc_in``, ``fc_out`` and ``norm``
    (module docstring); ``curvature`` ``"hessian"`` or ``"ggn"``. Rows are processed in blocks of at most
    :data:`_BLOCK_ELEMENTS` entries per ``(rows, V)`` or ``(rows, d_ff)`` tensor."""
    (in_name, fc_in), (out_name, fc_out), (norm_name, norm) = tail.fc_in, tail.fc_out, tail.norm
    d, d_ff, vocab = tail.r.shape[-1], tail.a.shape[-1], outputs.shape[-1]
    rows = {"r": tail.r.reshape(-1, d), "h": tail.h.reshape(-1, tail.h.shape[-1]), "a": tail.a.reshape(-1, d_ff),
            "d1": tail.d1.reshape(-1, d_ff), "d2": tail.d2.reshape(-1, d_ff), "f": outputs.reshape(-1, vocab)}
    if curvature == "hessian":
        rows["g"] = output_gradient(loss, outputs, targets).reshape(-1, vocab)
    centred = isinstance(norm, nn.LayerNorm)
    gamma = norm.weight if norm.weight is not None else torch.ones(d, dtype=tail.r.dtype, device=tail.r.device)
    w_head, w2 = tail.head.weight, fc_out.weight
    b = w_head * gamma
    bc = b - b.mean(1, keepdim=True) if centred else b  # B C
    # K = B C W_2 (V, d_ff): formed once when it fits in a block, else per vocabulary block of each row block
    k, k_right = (bc @ w2, None) if vocab * d_ff <= _BLOCK_ELEMENTS else (bc, w2)
    w2c_norms = (w2 - w2.mean(0, keepdim=True) if centred else w2).square().sum(0)  # diag(W_2^T C W_2)
    sums = {"a_r": 0, "a_u": 0, "a_n": 0, "W2": 0, "W1": 0, "gamma": 0}
    step = max(1, _BLOCK_ELEMENTS // max(vocab, d_ff))
    for lo in range(0, rows["r"].shape[0], step):
        block = {key: t[lo:lo + step] for key, t in rows.items()}
        xhat, sigma = _normalised(norm, block["r"])
        w, rho = output_hessian_parts(loss, block["f"], outputs.numel())
        v, q, s2 = xhat @ bc.T, xhat @ w2, sigma.square()
        a_r = _quadratic_diagonal(bc, None, w, rho, v, xhat, d) / s2  # diag d2L/dr2, Gauss-Newton part
        a_z = _quadratic_diagonal(k, k_right, w, rho, v, q, d) / s2  # diag W_2^T (d2L/dr2) W_2, Gauss-Newton part
        a_n = w @ w_head.square() - (0 if rho is None else (rho @ w_head).square())  # diag d2L/dn2
        a_u = block["d1"].square() * a_z
        if curvature == "hessian":
            g = (block["g"] @ w_head) * gamma
            gc = g - g.mean(-1, keepdim=True) if centred else g
            gx = (g * xhat).sum(-1, keepdim=True)
            diag_c = 1 - 1 / d if centred else 1.0
            a_r = a_r + (-2 * gc * xhat / d - gx * diag_c / d + 3 * gx * xhat.square() / d ** 2) / s2
            norm_z = (-2 * (gc @ w2) * q / d - gx * w2c_norms / d + 3 * gx * q.square() / d ** 2) / s2
            a_u = a_u + block["d1"].square() * norm_z + block["d2"] * (((gc - xhat * gx / d) / sigma) @ w2)
        a_n = a_n.expand_as(xhat)
        sums["a_r"] = sums["a_r"] + a_r.sum(0)
        sums["a_u"] = sums["a_u"] + a_u.sum(0)
        sums["a_n"] = sums["a_n"] + a_n.sum(0)
        sums["W2"] = sums["W2"] + a_r.T @ block["a"].square()
        sums["W1"] = sums["W1"] + a_u.T @ block["h"].square()
        sums["gamma"] = sums["gamma"] + (a_n * xhat.square()).sum(0)
    out = {f"{out_name}.weight": sums["W2"], f"{in_name}.weight": sums["W1"]}
    if fc_out.bias is not None:
        out[f"{out_name}.bias"] = sums["a_r"]
    if fc_in.bias is not None:
        out[f"{in_name}.bias"] = sums["a_u"]
    if norm.weight is not None:
        out[f"{norm_name}.weight"] = sums["gamma"]
    if getattr(norm, "bias", None) is not None:
        out[f"{norm_name}.bias"] = sums["a_n"]
    return out
