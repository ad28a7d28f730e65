"""``HessianConfig``: what one :class:`~lit_act.callbacks.hessian.HessianSpectrum` evaluation computes, and how."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lit_act.hessian.curvature import CURVATURES
from lit_act.hessian.lanczos import default_steps
from lit_act.hessian.losses import OUTPUT_LOSSES
from lit_act.hessian.operator import BACKENDS
from lit_act.hessian.trace import ON_UNCOVERED, TRACE_METHODS
from lit_act.utils import validate as v

TRACE_CHOICES = (*TRACE_METHODS, "krylov")
_HYDRA_KEYS = ("_target_", "_convert_", "_recursive_", "_partial_", "_args_")


@dataclass(frozen=True)
class HessianConfig:
    """Settings of one Hessian evaluation, validated (and strings from the command line converted) on creation.

    Example::

        HessianSpectrum(every_n_steps=100, config=HessianConfig(top_k=5, slq_iter=0))

    Args:
        top_k: number of top eigenvalues.
        max_iter: Lanczos steps at most of the pass (default ``max(2 top_k + 20, 60, slq_iter)``).
        tol: Lanczos relative tolerance. On the reference TransformerLM the top-3 Ritz values were within 8e-7
            (relative) of a tol=1e-10 solve at the default 1e-4, within 1.3e-5 at ``tol=1e-3``, which saved only 2 of
            41 products.
        lambda_min: also converge the smallest eigenvalue in the same pass.
        trace_budget: matvecs of the trace beyond the pass (0 disables the trace): the group products of the
            interleaved estimator, the deflated probes of ``"krylov"`` (Hutchinson on ``(I - QQ^T) H (I - QQ^T)``,
            ``Q`` the pass's basis), or the budget of the other estimators.
        trace_method: ``"auto"`` (default: exact by backpropagation when every parameter is covered, see
            :mod:`lit_act.hessian.diagonal`; else, for the Hessian, the covered blocks exactly plus the interleaved
            block-diagonal estimator on the rest, :func:`lit_act.hessian.trace.interleaved`, and for the GGN /
            Fishers ``"krylov"``), ``"krylov"`` (``tr(T)`` of the pass plus deflated probes,
            :mod:`lit_act.hessian.krylov_trace`), ``"exact"`` (``on_uncovered`` decides for uncovered networks),
            ``"hutchpp"``, ``"hutchinson"``, ``"xtrace"`` or ``"interleaved"`` (separate products). On the reference
            TransformerLM (``auto``, default budget) the standard error was 0.3-1.2 (2 rounds) against 1.1-1.5 for
            ``"krylov"`` with 10 deflated probes (0.92x the evaluation time); with the default ``trace_budget=16``
            (4 rounds of 4 groups) 0.5 in 0.97x the time.
        on_uncovered: for ``trace_method="exact"`` on a network outside the exact rules: ``"error"`` (raise, naming
            the module) or ``"control_variate"`` (warn and fall back).
        slq_iter: SLQ nodes at least (0 disables the density, ``re`` and ``kh``): the pass runs at least this many
            steps and is the first SLQ run; further runs have ``slq_iter`` steps.
        slq_runs: SLQ runs, the pass included.
        kh_power: the power ``n`` of ``Kh_n``.
        per_block_top_k: top eigenvalues of every per-module Hessian block (0 disables; ``curvature="hessian"``;
            at most the smallest block's size, checked at setup).
        curvature: ``"hessian"`` (default), ``"ggn"`` (generalised Gauss-Newton), ``"fisher"`` (the model's
            predictive-distribution Fisher, equal to the GGN for cross-entropy and MSE) or ``"empirical_fisher"``
            (see :mod:`lit_act.hessian.curvature`).
        loss: the output loss for the GGN/Fisher and the exact diagonals, ``"cross_entropy"`` or ``"mse"``
            (``None``: detected for lit-act models with the default loss).
        params: parameter names or ``fnmatch`` patterns (``None`` = all trainable parameters; one string is one
            pattern).
        backend: Hessian-vector product backend (``"cached"``, ``"forward"``, ``"reverse"``; see
            :mod:`lit_act.hessian.operator`). ``"cached"`` (default) keeps the first-order graph of the cached
            batches for the duration of one evaluation and is the fastest (2x ``"forward"`` on the benchmark MLP,
            ~10x on tiny models, CPU); ``"forward"`` recomputes per product and holds one batch at a time.
        eval_mode: compute in eval mode (BatchNorm/dropout); ``False`` keeps the current modes.
        chunk_size: split each cached batch into sub-batches of this many examples (the same operator: see
            :class:`lit_act.hessian.operator.HessianOperator`); bounds the memory of a Hessian-vector product by one
            chunk's instead of the cached batches' graphs, at the price of recomputing each chunk's graph per
            product. On the reference TransformerLM one cached HVP peaks at ~4x one backward pass; half-batch
            chunks at ~2x (``python -m benchmarks.bench_hessian --only transformer``). ``None``: whole batches
            (or ``memory_budget``'s plan).
        memory_budget: instead of ``chunk_size``, the most memory one Hessian-vector product may take, as a
            multiple of one backward pass of the cached batches (e.g. 3.0; ``None``, the default: no limit). At the
            first evaluation of a fit the memory is measured and the batches split so that the graph of as many
            examples as fit is kept and the rest recomputed per product
            (:func:`lit_act.hessian.memory.plan_chunks`); the plan is reused while the cached batches stay the same.
            On the reference TransformerLM (batch 16) a product then peaks at 2.8x one backward instead of 4.4x and
            costs ~1.2x as much. Chunking only shrinks what grows with the examples: on models whose memory is
            mostly parameter-sized buffers (small MLPs) a tight budget means many small recomputed chunks (slow) or
            cannot be met (a warning says so), hence no default. Only with ``curvature="hessian"``,
            ``backend="cached"`` and no ``chunk_size``.
        seed: seed of the private generator for start vectors and probes.
        warm_start: start the pass from the previous top eigenvectors (summed) when the density is off
            (``slq_iter=0``; a warm-started pass is no SLQ sample). Off by default, as the density is on by
            default. Run to convergence at ``tol`` the gain was mixed on the reference TransformerLM (evaluations
            10 training steps apart: after 1 step, 30 Lanczos steps cold and 19 warm; after 30 steps, 21 cold and
            23 warm); with a small ``max_iter`` it can be large: at ``max_iter=8``, top-3 within 6e-5 to 1.2e-3 (warm)
            against 8e-3 to 5e-2 (cold) for evaluations 1 to 50 steps apart on a TransformerLM trained on Python
            source, but 3.3e-2 against 6.0e-2 for evaluations 200 steps apart
            (``python -m benchmarks.bench_hessian --only warm``).
    """

    top_k: int = 3
    max_iter: int | None = None
    tol: float = 1e-4
    lambda_min: bool = True
    trace_budget: int = 16
    trace_method: str = "auto"
    on_uncovered: str = "error"
    slq_iter: int = 30
    slq_runs: int = 1
    kh_power: float = 0.5
    per_block_top_k: int = 0
    curvature: str = "hessian"
    loss: str | None = None
    params: tuple[str, ...] | None = None
    backend: str = "cached"
    eval_mode: bool = True
    chunk_size: int | None = None
    memory_budget: float | None = None
    seed: int = 0
    warm_start: bool = False

    def __post_init__(self) -> None:
        for name, value in _arg_validation(self).items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_fields(cls, **fields: Any) -> HessianConfig:
        """``HessianConfig(**fields)``, with a misspelt field named and the valid ones listed (the ``_target_`` of
        ``conf/callbacks/hessian.yaml``'s ``config`` node, so a typo on the command line gets the list too)."""
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(fields) - set(valid))
        if unknown:
            raise v.ConfigError(f"config: unknown HessianConfig field(s) {unknown}; valid: {valid}")
        return cls(**fields)

    @classmethod
    def of(cls, config: HessianConfig | Mapping[str, Any] | None) -> HessianConfig:
        """``config`` as a :class:`HessianConfig`: itself, built from a mapping of its fields (a Hydra node; Hydra's
        own keys such as ``_target_`` are ignored), or the defaults for ``None``."""
        if config is None or isinstance(config, cls):
            return config or cls()
        if isinstance(config, Mapping):
            return cls.from_fields(**{k: val for k, val in config.items() if k not in _HYDRA_KEYS})
        raise v.ConfigError(f"config={config!r}: expected a HessianConfig, a mapping of its fields or None")

    def pass_steps(self) -> int:
        """Lanczos steps at most of the shared pass."""
        return self.max_iter or max(default_steps(self.top_k), self.slq_iter)


def _arg_validation(c: HessianConfig) -> dict[str, Any]:
    """The validated (converted) values of ``c``'s fields; raises ``ValueError`` / ``TypeError`` naming the field
    and, for choices, the valid ones."""
    out = {
        "top_k": v.positive_int("top_k", c.top_k), "tol": v.positive_float("tol", c.tol),
        "max_iter": v.optional(v.positive_int, "max_iter", c.max_iter),
        "lambda_min": v.boolean("lambda_min", c.lambda_min),
        "trace_budget": v.non_negative_int("trace_budget", c.trace_budget),
        "trace_method": v.choice("trace_method", c.trace_method, TRACE_CHOICES),
        "on_uncovered": v.choice("on_uncovered", c.on_uncovered, ON_UNCOVERED),
        "slq_iter": v.non_negative_int("slq_iter", c.slq_iter), "slq_runs": v.positive_int("slq_runs", c.slq_runs),
        "kh_power": v.positive_float("kh_power", c.kh_power),
        "per_block_top_k": v.non_negative_int("per_block_top_k", c.per_block_top_k),
        "curvature": v.choice("curvature", c.curvature, CURVATURES),
        "loss": v.optional(v.choice, "loss", c.loss, OUTPUT_LOSSES),
        "params": v.optional(v.str_sequence, "params", c.params),
        "backend": v.choice("backend", c.backend, BACKENDS), "eval_mode": v.boolean("eval_mode", c.eval_mode),
        "chunk_size": v.optional(v.positive_int, "chunk_size", c.chunk_size),
        "memory_budget": v.optional(v.positive_float, "memory_budget", c.memory_budget),
        "seed": v.integer("seed", c.seed), "warm_start": v.boolean("warm_start", c.warm_start),
    }
    if out["max_iter"] is not None and out["max_iter"] < out["top_k"]:
        raise ValueError(f"max_iter ({out['max_iter']}) must be >= top_k ({out['top_k']})")
    if out["trace_method"] in ("auto", "exact", "hutchpp", "xtrace") and 0 < out["trace_budget"] < 4:
        raise ValueError(f"{out['trace_method']} needs trace_budget >= 4 (or 0 to disable), got {out['trace_budget']}")
    block_k, max_iter = out["per_block_top_k"], out["max_iter"]
    if block_k and (out["curvature"] != "hessian" or (max_iter is not None and max_iter < block_k)):
        raise ValueError(f"per_block_top_k={block_k} needs curvature='hessian' (got {out['curvature']!r}) and "
                         f"max_iter >= per_block_top_k (got {max_iter})")
    if out["memory_budget"] is not None and (out["chunk_size"] is not None or out["curvature"] != "hessian"
                                             or out["backend"] != "cached"):
        raise ValueError(f"memory_budget plans the chunks of the 'cached' Hessian products; got chunk_size="
                         f"{out['chunk_size']}, curvature={out['curvature']!r}, backend={out['backend']!r} (drop "
                         "memory_budget, or use chunk_size alone)")
    return out
