"""Kolmogorov-Arnold layers (KAN, Fourier-KAN, S-KAN, GR-KAN) and ``kanify`` to swap them into any MLP."""

from lit_act.kan.fourier import FKANImage, FourierKANLinear, fit_image, load_sample_image, psnr
from lit_act.kan.grkan import GRKANLinear
from lit_act.kan.kan_linear import KANLinear, bspline_bases
from lit_act.kan.kanify import LAYERS, Replacement, kanify
from lit_act.kan.skan import SPACES, SKANLinear, SKANStageCallback

__all__ = ["LAYERS", "SPACES", "FKANImage", "FourierKANLinear", "GRKANLinear", "KANLinear", "Replacement", "SKANLinear",
           "SKANStageCallback", "bspline_bases", "fit_image", "kanify", "load_sample_image", "psnr"]
