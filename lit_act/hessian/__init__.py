"""Curvature of training losses: Hessian/GGN/Fisher operators, Lanczos eigenvalues, exact diagonals by
backpropagation, Hutchinson/Hutch++/XTrace traces, SLQ density, LLA criteria."""

from lit_act.hessian.blocks import block_eigenvalues, block_sizes, parameter_blocks
from lit_act.hessian.curvature import CURVATURES, GGNOperator, curvature_operator, empirical_fisher_diagonal
from lit_act.hessian.density import gaussian_density, lla_criteria, slq
from lit_act.hessian.diagonal import UncoveredModuleError, exact_diagonal
from lit_act.hessian.example_diagonal import example_diagonal
from lit_act.hessian.ggn_diagonal import ggn_control_variate, ggn_diagonal
from lit_act.hessian.krylov_trace import KrylovSpectrumResult, lanczos_trace
from lit_act.hessian.lanczos import lanczos
from lit_act.hessian.losses import OUTPUT_LOSSES
from lit_act.hessian.operator import HessianOperator, default_loss_fn
from lit_act.hessian.results import (
    DiagonalResult,
    EigenResult,
    LLACriteria,
    SpectralDensityResult,
    TraceResult,
)
from lit_act.hessian.trace import hutchinson, hutchpp, trace, xtrace

__all__ = [
    "CURVATURES",
    "OUTPUT_LOSSES",
    "DiagonalResult",
    "EigenResult",
    "GGNOperator",
    "HessianOperator",
    "KrylovSpectrumResult",
    "LLACriteria",
    "SpectralDensityResult",
    "TraceResult",
    "UncoveredModuleError",
    "block_eigenvalues",
    "block_sizes",
    "curvature_operator",
    "default_loss_fn",
    "empirical_fisher_diagonal",
    "exact_diagonal",
    "example_diagonal",
    "gaussian_density",
    "ggn_control_variate",
    "ggn_diagonal",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "lanczos_trace",
    "lla_criteria",
    "parameter_blocks",
    "slq",
    "trace",
    "xtrace",
]
