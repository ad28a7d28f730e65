"""Trace of a curvature operator: exact where the modules allow it, else stochastic at a fixed matvec budget with a
standard error, optionally with the exactly computable blocks as a control variate.

* Hutchinson (1990): ``tr(H) ~= (1/m) sum_i z_i^T H z_i`` with Rademacher ``z_i``; standard error
  ``std(z_i^T H z_i, ddof=1) / sqrt(m)``.
* Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021, Algorithm 1): with ``s = budget // 3`` sketch vectors,
  ``Q = orth(H S)``, ``tr(H) ~= tr(Q^T H Q) + (1/g) sum_i z_i^T (I - QQ^T) H (I - QQ^T) z_i`` using the remaining
  ``g = budget - 2s`` Rademacher probes. The standard error is that of the Hutchinson part (the first term is exact
  given ``Q``). When ``budget >= 2 dim`` the sketch spans the whole space and the trace is exact (``std_error = 0``).
* XTrace (Epperly, Tropp & Webber, "XTrace: making the most of every sample in stochastic trace estimation", SIMAX
  2024, Alg. 1.2 with Rademacher test vectors): ``s = budget // 2`` vectors ``Omega``, ``Q = orth(H Omega)``; for each
  ``i``, the Hutch++ estimate with the basis ``Q_i = orth(H Omega_{-i})`` and the probe ``omega_i``, averaged over
  ``i`` (exchangeable: every sample serves both as sketch and probe). ``Q_i Q_i^T = Q (I - s_i s_i^T) Q^T`` with
  ``s_i`` the normalised ``i``-th column of ``R^{-T}`` makes all ``s`` estimates cost ``O(dim s^2)`` flops on top of
  the ``2s`` products. Standard error ``std(estimates) / sqrt(s)`` (the paper's ``err``).
* ``"exact"``: the diagonal by backpropagation (:mod:`lit_act.hessian.diagonal`: the sequential tail of the network,
  and a pre-norm Transformer's last MLP and final norm in closed form, :mod:`lit_act.hessian.norm_tail`), then, for the parameters left, the per-example rule (:mod:`lit_act.hessian.example_diagonal`: any Linear or
  LayerNorm applied to one row per example, whatever follows it, residual connections and normalisation included).
  Zero error. On the residual MLP with LayerNorm of ``benchmarks/bench_hessian.py`` this covers every parameter, so
  ``method="auto"`` is exact there (the head-only control variate had a median error of 4.5% at the anchors' time).
* Control variate (``on_uncovered="control_variate"``): ``tr(H) = tr(H_CC) + tr(H_UU)`` over the covered parameters
  ``C`` (exact diagonal) and the uncovered ``U``; the estimator runs on the ``U`` block only (probes zero on ``C``), so
  the variance of the ``C``-``C`` and ``C``-``U`` off-diagonal entries (``2 sum_{i != j} H_ij^2`` for Hutchinson) is
  gone. A diagonal control variate alone would not help Hutchinson: its Rademacher variance does not involve the
  diagonal at all. On the benchmark's TransformerLM the head, ``ln_f`` and the last block's MLP are covered (the
  other Linear layers see sequences that attention couples); with the head alone covered (99.5% of the trace but
  little of the variance), the per-probe standard deviation on the rest with Hutchinson (600 probes) was 3.4, about
  that of plain Hutchinson; the interleaved estimator (next) removes most of it, and the tail rule 43% of what is
  left (``benchmarks/bench_hessian.py --only transformer-trace``).
* Interleaved block-diagonal Hutchinson (``"interleaved"``, the default estimator of the uncovered remainder for the
  Hessian): Rademacher variance ``2 sum_{i != j} H_ij^2`` depends on which pairs of parameters a probe couples. On
  the reference TransformerLM it comes almost entirely from pairs in *different* modules: per-module quadratic forms
  ``z_B^T H_BB z_B`` summed over the 15 modules below the head had a standard deviation of 0.9 against 5.2 for
  ``z^T H z``, while grouping a whole Transformer layer (or its attention / MLP sub-blocks) kept 3.1: the heavy pairs
  are adjacent modules (``fc_in``-``fc_out``, ``qkv``-``proj``). ``tr(H) = sum_g tr(H_gg)`` over any partition of
  the parameters, so modules are dealt into ``groups`` interleaved groups (module ``i`` into group ``i mod groups``:
  adjacent modules never share one) and each round draws one Rademacher vector per group and adds
  ``z_g^T H_gg z_g``, the products ``H_gg z_g`` from one autograd-pruned double backward per group (together ~2.7
  full products for 4 groups there; at most ``groups`` full products whatever the depth). Unbiased, with the standard
  error of the rounds. This is stochastic probing (Tang & Saad, "A probing method for computing the diagonal of a
  matrix inverse", NLAA 2012; Stathopoulos, Laeuchli & Orginos, "Hierarchical probing for estimating the trace of the
  matrix inverse on toroidal lattices", SISC 2013): Rademacher vectors restricted to the colours of a distance-1
  colouring, which annihilate the off-diagonal entries between neighbours; here the "graph" is the chain of modules
  and each colour's quadratic form comes from a pruned block product instead of a full one. Measured there (head excluded, 60 rounds, variance x time relative to ``z^T H z`` on the whole
  network): 2 groups 0.11, **4 groups 0.06**, 5 groups 0.10, 6 groups 0.14; one module per group 0.13 (16 pruned
  products per round).
* The GGN as a control variate (:func:`lit_act.hessian.ggn_diagonal.ggn_control_variate`: ``tr(G)`` exact, Hutchinson
  on ``H - G``) is not used by default: measured per-probe variance of ``H - G`` against ``H``: 158 against 202 on the
  residual MLP, and no lower on the TransformerLM's uncovered block (standard deviation 3.1 against 2.9; there
  ``tr(G_UU) = 15.6`` and ``tr((H - G)_UU) = -14.8`` nearly cancel), while the exact ``tr(G)`` costs ``T x V``
  Jacobian columns per sequence.

Per-block traces come from the same products: ``z^T H z = sum_B z_B^T (H z)_B`` and each block sum is an unbiased
estimate of ``tr(H_BB)`` (blocks = the modules owning the parameters).

PyHessian runs Hutchinson until the running mean changes by less than ``1e-3`` relative; when the running mean is
negative its test ``|mean - trace| / (|trace| + 1e-6)`` can pass after two probes. Here the budget is fixed up front and
probes come from a private seeded ``torch.Generator`` (the global RNG is untouched).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch
from torch import Tensor

from lit_act.hessian.lanczos import make_generator, probe_block, rademacher
from lit_act.hessian.operator import HessianOperator, math_attention
from lit_act.hessian.results import DiagonalResult, TraceResult, block_of

ESTIMATORS = ("hutchpp", "hutchinson", "xtrace", "interleaved")
TRACE_METHODS = ("auto", "exact", *ESTIMATORS)
ON_UNCOVERED = ("error", "control_variate")


def _mean_and_se(samples: Tensor) -> tuple[float, float]:
    samples = samples.double()
    mean = float(samples.mean())
    se = float(samples.std(unbiased=True) / math.sqrt(samples.numel())) if samples.numel() > 1 else float("nan")
    return mean, se


class _Blocks:
    """Sums over the flat index range of each owning module (float64 accumulation, no float64 copy of the input)."""

    def __init__(self, op: HessianOperator) -> None:
        owners = [block_of(n) for n in op.names]
        self.names = list(dict.fromkeys(owners))
        self.index = [self.names.index(o) for o in owners]
        self.numels = op._numels

    def sums(self, values: Tensor) -> Tensor:
        """``(dim, m)`` -> ``(blocks, m)`` (float64)."""
        out = torch.zeros(len(self.names), values.shape[1], dtype=torch.float64, device=values.device)
        for i, part in zip(self.index, values.split(self.numels)):
            out[i] += part.sum(0).double()  # torch's cascade summation keeps float32 sums accurate
        return out

    def as_dict(self, totals: Tensor) -> dict[str, float]:
        return {n: float(t) for n, t in zip(self.names, totals)}


def _masked(probes: Tensor, mask: Tensor | None) -> Tensor:
    return probes if mask is None else probes * mask[:, None].to(probes.dtype)


def hutchinson(op: HessianOperator, budget: int, seed: int = 0, mask: Tensor | None = None) -> TraceResult:
    """Hutchinson's estimator with ``budget`` Rademacher probes (``budget >= 2`` for a standard error); ``mask``
    restricts it to the block of the ``True`` entries."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    start, matvecs0 = time.perf_counter(), op.matvecs
    probes = _masked(probe_block(op, budget, make_generator(seed)), mask)
    forms = probes * op.matmat(probes)
    blocks = _Blocks(op)
    per_block = blocks.sums(forms)
    estimate, se = _mean_and_se(per_block.sum(0))
    return TraceResult(estimate, se, op.matvecs - matvecs0, time.perf_counter() - start, "hutchinson",
                       blocks.as_dict(per_block.mean(1)))


def hutchpp(op: HessianOperator, budget: int, seed: int = 0, mask: Tensor | None = None) -> TraceResult:
    """Hutch++ with exactly ``budget`` matvecs (``min(budget, 2 dim)``; ``budget >= 3``)."""
    if budget < 3:
        raise ValueError(f"Hutch++ needs a budget of at least 3 matvecs, got {budget}")
    start, matvecs0 = time.perf_counter(), op.matvecs
    generator = make_generator(seed)
    dim = op.dim if mask is None else int(mask.sum())
    sketch = min(budget // 3, dim)
    if 2 * dim <= budget:
        sketch = dim
    blocks = _Blocks(op)
    images = _masked(op.matmat(_masked(probe_block(op, sketch, generator), mask)), mask)
    basis, _ = torch.linalg.qr(images)  # column-major in and out (a transposed row-major block): no copies
    basis = basis[:, : min(sketch, dim)]
    low_rank = blocks.sums(basis * op.matmat(basis)).sum(1)
    probes_left = 0 if sketch == dim else budget - 2 * sketch
    if probes_left == 0:
        return TraceResult(float(low_rank.sum()), 0.0, op.matvecs - matvecs0, time.perf_counter() - start,
                           "hutchpp", blocks.as_dict(low_rank))
    z = _masked(probe_block(op, probes_left, generator), mask)
    z = torch.addmm(z, basis, basis.T @ z, alpha=-1)
    residual = blocks.sums(z * op.matmat(z))
    mean, se = _mean_and_se(residual.sum(0))
    return TraceResult(float(low_rank.sum()) + mean, se, op.matvecs - matvecs0, time.perf_counter() - start,
                       "hutchpp", blocks.as_dict(low_rank + residual.mean(1)))


def xtrace(op: HessianOperator, budget: int, seed: int = 0, mask: Tensor | None = None) -> TraceResult:
    """XTrace (module docstring) with ``2 (budget // 2)`` matvecs (``budget >= 4``); no per-block split."""
    if budget < 4:
        raise ValueError(f"XTrace needs a budget of at least 4 matvecs, got {budget}")
    start, matvecs0 = time.perf_counter(), op.matvecs
    dim = op.dim if mask is None else int(mask.sum())
    s = min(budget // 2, dim - 1)
    omega = _masked(probe_block(op, s, make_generator(seed)), mask)
    y = _masked(op.matmat(omega), mask).double()
    q, r = torch.linalg.qr(y)
    z = op.matmat(q.T.to(op.dtype).contiguous().T).double()
    om = omega.double()
    h = q.T @ z  # Q^T H Q
    w = q.T @ om  # Q^T Omega
    rt_inv = torch.linalg.inv(r.T)
    sv = rt_inv / rt_inv.norm(dim=0, keepdim=True)  # columns s_i
    t = z.T @ om  # (HQ)^T Omega
    deflated = w - sv * (sv * w).sum(0)  # (I - s_i s_i^T) Q^T omega_i, column i
    inner = r - h @ deflated  # Q^T (H omega_i - HQ deflated_i)
    inner = inner - sv * (sv * inner).sum(0)
    tr_w = (om * y).sum(0) - (t * deflated).sum(0) - (w * inner).sum(0)
    estimates = torch.trace(h) - (sv * (h @ sv)).sum(0) + tr_w
    mean, se = _mean_and_se(estimates)
    return TraceResult(mean, se, op.matvecs - matvecs0, time.perf_counter() - start, "xtrace")


def interleaved(op: HessianOperator, budget: int, seed: int = 0, mask: Tensor | None = None,
                groups: int = 4) -> TraceResult:
    """Hutchinson on the block-diagonal part of ``H`` over ``groups`` interleaved groups of modules (module
    docstring): module ``i`` (in parameter order, the modules owning a chosen, unmasked parameter) joins group
    ``i mod groups``; each round draws a Rademacher vector ``z_g`` per group and adds ``z_g^T H_gg z_g`` over the
    groups, from one autograd-pruned double backward per group (the block products of
    :func:`lit_act.hessian.block_eigenvalues`). ``budget`` counts group products: ``budget // groups`` rounds, with
    fewer groups when the budget would not allow two rounds (``budget >= 2``). Hessian operators only."""
    from lit_act.hessian.blocks import BlockProducts, parameter_blocks

    if getattr(op, "curvature", "hessian") != "hessian":
        raise ValueError(f"the interleaved estimator uses Hessian block products; got a {op.curvature!r} operator "
                         "(use 'hutchinson')")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    start, matvecs0 = time.perf_counter(), op.matvecs
    chosen = op.names if mask is None else [n for n, m in zip(op.names, mask.split(op._numels)) if bool(m.any())]
    modules = parameter_blocks(chosen)
    if budget < 2:
        raise ValueError(f"the interleaved estimator needs a budget of at least 2 group products (2 rounds of one "
                         f"group) for a standard error, got {budget}")
    count = max(1, min(groups, len(modules), budget // 2))
    rounds = budget // count
    order = list(modules)
    numels = dict(zip(op.names, op._numels))
    grouped = {f"group{g}": order[g::count] for g in range(count)}  # module names per group, in order
    members = {g: [n for module in mods for n in modules[module]] for g, mods in grouped.items()}
    sizes = {g: [sum(numels[n] for n in modules[module]) for module in mods] for g, mods in grouped.items()}
    columns = {g: torch.tensor([order.index(module) for module in mods], device=op.device)
               for g, mods in grouped.items()}
    generator = make_generator(seed)
    forms = torch.zeros(rounds, len(order), dtype=torch.float64, device=op.device)  # z_B^T (H_gg z_g)_B per module
    with math_attention():  # graphs built here (chunks the operator does not keep) need a double backward
        products = BlockProducts(op, members, "per_block")
        for r in range(rounds):
            vectors = {g: rademacher((sum(sizes[g]),), generator, op) for g in members}
            out = products(vectors)
            for g in members:  # one split by modules per group, no host sync
                per_module = torch.stack([t.sum() for t in (vectors[g] * out[g]).double().split(sizes[g])])
                forms[r].index_add_(0, columns[g], per_module)
    estimate, se = _mean_and_se(forms.sum(1))
    return TraceResult(estimate, se, op.matvecs - matvecs0, time.perf_counter() - start, "interleaved",
                       dict(zip(order, forms.mean(0).tolist())))


ESTIMATOR_FUNCTIONS = {"hutchpp": hutchpp, "hutchinson": hutchinson, "xtrace": xtrace, "interleaved": interleaved}


def trace(op: HessianOperator, budget: int, method: str = "hutchpp", seed: int = 0,
          on_uncovered: str = "error", estimator: str | None = None, per_example: bool = True,
          **diagonal_kwargs: Any) -> TraceResult:
    """Trace by ``method``.

    Args:
        op: the curvature operator (its model, batches, loss_fn and parameters are reused by the exact diagonal).
        budget: matvecs of the stochastic part.
        method: ``"hutchpp"``, ``"hutchinson"``, ``"xtrace"``; ``"exact"`` (diagonal by backpropagation; for an
            uncovered network ``on_uncovered`` decides); ``"auto"``: exact when every parameter is covered, else the
            control variate with ``estimator``.
        seed: seed of the private generator.
        on_uncovered: ``"error"`` (raise, naming the module) or ``"control_variate"`` (warn, then exact covered blocks
            plus ``estimator`` on the rest).
        estimator: the stochastic estimator of the uncovered remainder; default ``"interleaved"`` for the Hessian
            (module docstring: on the reference TransformerLM its variance x time was 1/16 of Hutchinson's),
            ``"hutchinson"`` for the GGN and Fishers. Not Hutch++: the exact blocks include the network's tail,
            which holds the outlier eigenvalues (the logit layer), so the remainder is flat and Hutch++'s sketch
            wastes two thirds of the budget (4.8% against 6.3% median error at equal wall time on a residual MLP
            with LayerNorm, head-only control variate).
        per_example: after the chain rules of :func:`lit_act.hessian.diagonal.exact_diagonal`, cover the remaining
            Linear and LayerNorm parameters of per-example networks exactly
            (:func:`lit_act.hessian.example_diagonal.example_diagonal`: residual connections and normalisation
            included). On the residual MLP of the benchmark this makes the trace exact, in about the time of 20
            products.
        diagonal_kwargs: ``loss=...`` for :func:`lit_act.hessian.diagonal.exact_diagonal`.
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"unknown trace method {method!r}; valid: {list(TRACE_METHODS)}")
    if on_uncovered not in ON_UNCOVERED:
        raise ValueError(f"unknown on_uncovered {on_uncovered!r}; valid: {list(ON_UNCOVERED)}")
    if estimator is None:
        estimator = "interleaved" if getattr(op, "curvature", "hessian") == "hessian" else "hutchinson"
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {list(ESTIMATORS)}")
    if method in ESTIMATORS:
        return ESTIMATOR_FUNCTIONS[method](op, budget, seed)
    return exact_or_control_variate(op, budget, seed, "control_variate" if method == "auto" else on_uncovered,
                                    estimator, warn=method == "exact", per_example=per_example, **diagonal_kwargs)


def _add_example_rules(op: HessianOperator, diag: DiagonalResult, curvature: str, loss: str) -> DiagonalResult:
    """``diag`` with its uncovered parameters filled in by the per-example rule where it applies."""
    from lit_act.hessian.example_diagonal import example_diagonal

    missing = [n for n in op.names if n not in diag.covered]
    try:
        extra = example_diagonal(op.model, op.batches, loss, curvature=curvature, params=missing,
                                 all_reduce=op.all_reduce)
    except (RuntimeError, NotImplementedError) as err:  # an op without forward-mode AD or a vmap rule
        warnings.warn(f"per-example diagonal rule failed ({err}); those parameters are estimated", stacklevel=4)
        return diag
    if not extra.values:
        return diag
    parts = dict(zip(op.names, diag.diagonal.split(op._numels)))
    blocks = dict(diag.blocks)
    for name, value in extra.values.items():
        parts[name] = value.reshape(-1).to(diag.diagonal.dtype)
        owner = block_of(name)
        blocks[owner] = blocks.get(owner, 0.0) + float(value.double().sum())
    covered = [n for n in op.names if n in diag.covered or n in extra.values]
    reason = None if len(covered) == len(op.names) else (extra.reason or diag.uncovered_reason)
    return DiagonalResult(torch.cat([parts[n] for n in op.names]), diag.names, covered, sum(blocks.values()), blocks,
                          diag.curvature, diag.passes, diag.seconds + extra.seconds, reason)


def exact_or_control_variate(op: HessianOperator, budget: int, seed: int = 0, on_uncovered: str = "error",
                             estimator: str = "hutchinson", warn: bool = True, per_example: bool = True,
                             **diagonal_kwargs: Any) -> TraceResult:
    """Exact trace from the diagonal, or covered blocks exactly plus ``estimator`` on the uncovered block."""
    from lit_act.hessian.diagonal import UncoveredModuleError, exact_diagonal
    from lit_act.hessian.losses import resolve_output_loss

    start, matvecs0 = time.perf_counter(), op.matvecs
    curvature = getattr(op, "curvature", "hessian")
    if curvature == "fisher":
        curvature = "ggn"
    if curvature not in ("hessian", "ggn"):
        if on_uncovered == "error":
            raise ValueError(f"no exact diagonal rule for curvature {curvature!r}; use a stochastic method "
                             f"{list(ESTIMATORS)}")
        res = ESTIMATOR_FUNCTIONS[estimator](op, budget, seed)
        return TraceResult(res.estimate, res.std_error, res.matvecs, time.perf_counter() - start, res.method,
                           res.blocks)
    kwargs = {"loss": getattr(op, "loss", None), **diagonal_kwargs}
    try:
        diag = exact_diagonal(op.model, op.batches, op.loss_fn, curvature=curvature, params=op.names,
                              on_uncovered="partial", all_reduce=op.all_reduce, **kwargs)
        if per_example and len(diag.covered) < len(op.names):
            diag = _add_example_rules(op, diag, curvature, resolve_output_loss(op.model, op.loss_fn, kwargs["loss"]))
    except (ValueError, TypeError) as err:  # unknown loss or batch convention: nothing is covered
        if on_uncovered == "error":
            raise
        diag = None
        reason = str(err)
    if diag is not None and len(diag.covered) == len(op.names):
        return TraceResult(diag.trace, 0.0, 0, time.perf_counter() - start, "exact", diag.blocks, diag.trace)
    if diag is not None:
        reason = diag.uncovered_reason
        if on_uncovered == "error":
            missing = [n for n in op.names if n not in diag.covered]
            raise UncoveredModuleError(
                f"no exact diagonal for {missing[:4]}{' ...' if len(missing) > 4 else ''}: {reason}. Pass "
                "on_uncovered='control_variate' (or method='auto') to compute the covered blocks exactly and "
                "estimate the rest")
    if warn:
        warnings.warn(f"exact trace not available for every parameter ({reason}); using the exact covered blocks as "
                      f"a control variate and {estimator} on the rest", stacklevel=3)
    if diag is None or not diag.covered:
        res = ESTIMATOR_FUNCTIONS[estimator](op, budget, seed)
        return TraceResult(res.estimate, res.std_error, res.matvecs, time.perf_counter() - start,
                           f"control_variate+{estimator}", res.blocks, 0.0)
    mask = torch.isnan(diag.diagonal).to(op.device)
    rest = ESTIMATOR_FUNCTIONS[estimator](op, budget, seed, mask=mask)
    blocks = {**{k: v for k, v in rest.blocks.items() if k not in diag.blocks}, **diag.blocks}
    return TraceResult(diag.trace + rest.estimate, rest.std_error, op.matvecs - matvecs0,
                       time.perf_counter() - start, f"control_variate+{estimator}", blocks, diag.trace)
