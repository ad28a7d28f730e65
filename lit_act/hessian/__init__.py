"""Hessian spectra of training losses: operator, Lanczos eigenvalues, Hutch++ trace, SLQ density, LLA criteria."""

from lit_act.hessian.density import gaussian_density, lla_criteria, slq
from lit_act.hessian.lanczos import lanczos
from lit_act.hessian.operator import HessianOperator, default_loss_fn
from lit_act.hessian.results import EigenResult, LLACriteria, SpectralDensityResult, TraceResult
from lit_act.hessian.trace import hutchinson, hutchpp, trace

__all__ = [
    "EigenResult",
    "HessianOperator",
    "LLACriteria",
    "SpectralDensityResult",
    "TraceResult",
    "default_loss_fn",
    "gaussian_density",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "lla_criteria",
    "slq",
    "trace",
]
