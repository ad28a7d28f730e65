"""Sparse autoencoders: TopK, BatchTopK, ReLU + L1 and top-AFA, and a registry that builds them by name.

Shared parameterisation (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", Sec. 2.1-2.3)::

    u    = s * x                                      # input normalisation by a fixed scalar s (buffer input_scale)
    pre  = (u - b_pre) @ W_enc + b_enc                # encoder pre-activations, (N, d_latent)
    z    = sigma(pre)                                 # the sparsifying activation of each model
    x_hat = (z @ W_dec + b_pre) / s                   # decoder, (N, d_in), back in the input's scale

``s`` (``input_scale``, 1 for a fresh SAE) is set by :class:`lit_act.sae.training.SAETrainer` from the first batch so
that ``E||s x||^2 = d_in`` (``SAEConfig.normalize_inputs``). Gao et al. Sec. 2.1 normalise every input to unit norm
after subtracting its mean over ``d_model``; one dataset-level scalar (as Anthropic's April 2024 update and
SAELens's ``expected_average_only_in``) keeps the SAE a linear map of ``x`` up to the TopK, so the reconstruction
splices back into the model without per-token statistics, and gives every model width the same loss scale.

``W_dec`` is ``(d_latent, d_in)``: row ``i`` is latent ``i``'s decoder direction (the paper's column of its
``W_dec``), unit-norm. ``W_enc`` is ``(d_in, d_latent)``. Initialisation (Gao et al. Appendix A.1): uniformly random
directions, each latent's encoder direction parallel to its decoder direction (not tied afterwards), decoder rows
unit-norm; encoder *magnitudes* from torch's default ``nn.Linear`` init (the paper's choice for its baselines): the
encoder is a ``U(-1/sqrt(d_in), 1/sqrt(d_in))`` draw (column norms ~ ``1/sqrt(3)``) and the decoder its transpose
with unit rows, exactly the reference ``openai/sparse_autoencoder`` ``FastAutoencoder.__init__`` (tied init, then
``unit_norm_decoder_``). For TopK models the paper also rescales the encoder so reconstructions match the input
norm, which its ablation (Fig. 16) finds to have "no effect or a weak negative effect":
``SAEConfig(calibrate_encoder=True)``, the reference's ``init_from_data_``.
The decoder-norm constraint (renormalise after every step, remove the gradient component parallel to each
direction before it) is :meth:`SparseAutoencoder.project_decoder_grad` / :meth:`SparseAutoencoder.normalize_decoder`,
called by :class:`lit_act.sae.training.SAETrainer`.

Example::

    sae = build_sae("topk", d_in=64, d_latent=256, k=4)
    out = sae(x)                 # SAEOutput(x_hat, z, pre)
    z = sae.encode(x); x_hat = sae.decode(z)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SAEOutput(NamedTuple):
    """``x_hat`` (reconstruction), ``z`` (sparse codes, dense tensor with zeros), ``pre`` (encoder pre-activations)."""

    x_hat: Tensor
    z: Tensor
    pre: Tensor


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class SparseAutoencoder(nn.Module):
    """Base class: parameters, decoder constraint, ``encode``/``decode``/``forward``. Subclasses define
    :meth:`activate` (pre-activations -> sparse codes).

    Args:
        d_in: input (activation) width.
        d_latent: number of latents (dictionary size).
        generator: optional ``torch.Generator`` for the initialisation (the global RNG is never drawn from when given).
    """

    name: str = "base"
    #: train with the AuxK loss on dead latents (Gao et al. Sec. 2.4, TopK-family models)
    uses_auxk: bool = True

    def __init__(self, d_in: int, d_latent: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.d_in = _positive_int("d_in", d_in)
        self.d_latent = _positive_int("d_latent", d_latent)
        # nn.Linear(d_in, d_latent)'s default init: U(-1/sqrt(d_in), 1/sqrt(d_in)), row norms ~ 1/sqrt(3)
        bound = 1.0 / math.sqrt(d_in)
        w = torch.empty(d_latent, d_in).uniform_(-bound, bound, generator=generator)
        self.W_dec = nn.Parameter(w / w.norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.W_enc = nn.Parameter(w.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(d_latent))
        self.b_pre = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_scale", torch.ones(()))

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_latent={self.d_latent}"

    def pre_activations(self, u: Tensor) -> Tensor:
        """``(u - b_pre) @ W_enc + b_enc`` of a normalised input ``u = input_scale * x`` (Gao et al. Eq. 3 before the
        TopK)."""
        return torch.addmm(self.b_enc, u - self.b_pre, self.W_enc)

    def activate(self, pre: Tensor, u: Tensor) -> Tensor:
        """Sparse codes from the pre-activations (``u`` is the normalised input, for input-dependent sparsity such
        as AFA)."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Sparse codes ``z`` of ``x`` ``(N, d_in)`` -> ``(N, d_latent)``."""
        u = x * self.input_scale
        return self.activate(self.pre_activations(u), u)

    def decode(self, z: Tensor) -> Tensor:
        """``(z @ W_dec + b_pre) / input_scale``."""
        return torch.addmm(self.b_pre, z, self.W_dec) / self.input_scale

    def forward(self, x: Tensor) -> SAEOutput:
        u = x * self.input_scale
        pre = self.pre_activations(u)
        z = self.activate(pre, u)
        return SAEOutput(self.decode(z), z, pre)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder direction to unit norm (Gao et al. Sec. 2.4, after every step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from ``W_dec.grad`` the component parallel to each (unit) decoder direction (Gao et al. Sec. 2.4),
        so the step moves each direction along the unit sphere's tangent."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad.sub_(parallel * self.W_dec)


def keep_topk(pre: Tensor, k: int) -> Tensor:
    """``ReLU`` of the ``k`` largest entries of each row of ``pre``, zeros elsewhere (dense codes)."""
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, F.relu(values))


def sparse_decode(indices: Tensor, values: Tensor, w_dec: Tensor) -> Tensor:
    """``sum_j values[n, j] * w_dec[indices[n, j]]`` per row, without the dense ``(N, d_latent)`` code: one
    ``embedding_bag`` (forward and backward cost ``N * k * d_in`` instead of ``N * d_latent * d_in``)."""
    return F.embedding_bag(indices, w_dec, per_sample_weights=values, mode="sum")


class TopKSAE(SparseAutoencoder):
    """TopK SAE (Gao et al. 2024, Eq. 3): ``z = ReLU(TopK_k(W_enc (x - b_pre) + b_enc))``, ``x_hat = W_dec z + b_pre``.

    Only the ``k`` largest pre-activations per input are kept (the ReLU on them, as in the reference
    ``openai/sparse_autoencoder`` ``TopK(postact_fn=ReLU)``, zeroes the rare negative ones). Trained on the MSE plus
    the AuxK loss (:func:`lit_act.sae.training.auxk_loss`).

    Args:
        k: active latents per input, ``1 <= k <= d_latent``.
    """

    name = "topk"

    def __init__(self, d_in: int, d_latent: int, k: int = 32, generator: torch.Generator | None = None) -> None:
        super().__init__(d_in, d_latent, generator)
        self.k = _positive_int("k", k)
        if k > d_latent:
            raise ValueError(f"k ({k}) must be <= d_latent ({d_latent}): at most every latent can be active")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"

    def activate(self, pre: Tensor, u: Tensor) -> Tensor:
        return keep_topk(pre, self.k)

    def forward(self, x: Tensor) -> SAEOutput:
        """As :meth:`encode` + :meth:`decode`, decoding only the ``k`` active latents (:func:`sparse_decode`)."""
        pre = self.pre_activations(x * self.input_scale)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        values = F.relu(values)
        x_hat = (sparse_decode(indices, values, self.W_dec) + self.b_pre) / self.input_scale
        return SAEOutput(x_hat, torch.zeros_like(pre).scatter(-1, indices, values), pre)


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders", Sec. 3).

    In training the ``B * k`` largest ReLU'd pre-activations over the whole batch of ``B`` inputs are kept (``k`` on
    average per input, adaptively allocated). At inference a single global threshold ``theta`` replaces the batch
    dependency: ``z = pre * 1[pre > theta]``. ``theta`` is estimated during training as a running (EMA, ``momentum``)
    average of the smallest kept activation per batch (the paper's estimate: the mean over batches of the minimum
    positive kept activation). ``forward`` in ``train()`` mode uses the batch rule and updates ``theta``; in
    ``eval()`` mode the threshold.
    """

    name = "batchtopk"

    def __init__(self, d_in: int, d_latent: int, k: int = 32, momentum: float = 0.01,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(d_in, d_latent, k, generator)
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.register_buffer("threshold", torch.tensor(-1.0))  # < 0: not estimated yet

    forward = SparseAutoencoder.forward  # a variable number of active latents per row: dense decode

    def activate(self, pre: Tensor, u: Tensor) -> Tensor:
        acts = F.relu(pre)
        if not self.training:
            theta = self.threshold.clamp_min(0)
            return acts * (acts > theta)
        flat = acts.flatten()
        values, indices = flat.topk(min(self.k * acts.shape[0], flat.numel()), sorted=False)
        z = torch.zeros_like(flat).scatter_(0, indices, values).view_as(acts)
        with torch.no_grad():
            positive = values[values > 0]
            if positive.numel():
                smallest = positive.min()
                new = smallest if self.threshold < 0 else torch.lerp(self.threshold, smallest, self.momentum)
                self.threshold.copy_(new)
        return z


class ReLUSAE(SparseAutoencoder):
    """ReLU SAE with an L1 penalty (Bricken et al. 2023, "Towards Monosemanticity", Problem setup): ``z =
    ReLU(W_enc (x - b_pre) + b_enc)``; loss ``||x - x_hat||^2 + l1_coefficient * sum_i |z_i| ||W_dec,i||`` (the
    decoder-norm-weighted L1 of the paper's later update; with unit decoder rows, as kept here, the plain L1).

    Args:
        l1_coefficient: weight of the L1 penalty (used by :class:`lit_act.sae.training.SAETrainer`).
    """

    name = "relu"
    uses_auxk = False

    def __init__(self, d_in: int, d_latent: int, l1_coefficient: float = 1e-3,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(d_in, d_latent, generator)
        if l1_coefficient < 0:
            raise ValueError(f"l1_coefficient must be >= 0, got {l1_coefficient}")
        self.l1_coefficient = float(l1_coefficient)

    def activate(self, pre: Tensor, u: Tensor) -> Tensor:
        return F.relu(pre)


class TopAFASAE(SparseAutoencoder):
    """top-AFA SAE (Lee et al. 2025, "Evaluating and Designing Sparse Autoencoders by Approximating
    Quasi-Orthogonality", Sec. 4; reference ``SewoongLee/top-afa-sae`` ``TopAFASAE``).

    Under a quasi-orthogonal decoder (``|<w_i, w_j>| <= eps`` for unit rows), the *approximate feature activation*
    (AFA) predicts the norm of the code from the dense input: ``||z||_2 ~= ||x - b_pre||_2`` (the paper's Theorem /
    ZF relation). top-AFA keeps, per input, the largest ReLU'd activations (ranked by ``|z_i| ||W_dec,i||``) and
    chooses their number ``k(x)`` so that the norm of the kept ones is closest to the AFA target::

        c_j = sqrt(sum_{m <= j} (z_(m) ||W_dec,(m)||)^2),   k(x) = argmin_j |c_j - ||x - b_pre|||  (+1)

    as in the reference code (which also sets the last cumulative norm to a large value so ``k <= d_latent - 1``
    unless the target is exceeded; here ``k(x)`` ranges over ``1..d_latent``). No fixed ``k``. The ``eps``
    (max/mean off-diagonal decoder cosine) and the AFA error are metrics in :mod:`lit_act.sae.metrics`.
    """

    name = "topafa"

    def activate(self, pre: Tensor, u: Tensor) -> Tensor:
        acts = F.relu(pre)
        target = (u - self.b_pre).detach().norm(dim=-1, keepdim=True)
        scaled = (acts.detach() * self.W_dec.detach().norm(dim=1)).square()
        ordered, order = scaled.sort(dim=-1, descending=True)
        cumulative = ordered.cumsum(dim=-1).sqrt()
        k = (cumulative - target).abs().argmin(dim=-1, keepdim=True) + 1  # (N, 1) active count per input
        keep_sorted = torch.arange(acts.shape[-1], device=acts.device).unsqueeze(0) < k
        keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
        return acts * keep


_REGISTRY: dict[str, type[SparseAutoencoder]] = {
    cls.name: cls for cls in (TopKSAE, BatchTopKSAE, ReLUSAE, TopAFASAE)}


def available_saes() -> list[str]:
    """Registered SAE names."""
    return sorted(_REGISTRY)


def register_sae(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
    """Register a :class:`SparseAutoencoder` subclass under ``cls.name`` (usable as a decorator)."""
    _REGISTRY[cls.name] = cls
    return cls


def sae_class(name: str) -> type[SparseAutoencoder]:
    """The class registered as ``name`` (ValueError listing the valid names otherwise)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown SAE {name!r}; valid names: {', '.join(available_saes())}")
    return _REGISTRY[name]


def build_sae(name: str | Callable[..., SparseAutoencoder], d_in: int, d_latent: int, **kwargs) -> SparseAutoencoder:
    """Build an SAE by registered name (``topk``, ``batchtopk``, ``relu``, ``topafa``) or from a class/factory.

    Example::

        build_sae("batchtopk", 512, 4096, k=16)

    Raises:
        ValueError: unknown name (the message lists the valid ones), or a bad argument (named in the message).
        TypeError: an argument the chosen SAE does not take.
    """
    if isinstance(name, str):
        return sae_class(name)(d_in, d_latent, **kwargs)
    return name(d_in, d_latent, **kwargs)
