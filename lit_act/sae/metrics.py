"""SAE quality metrics: FVU, L0, feature density, AFA error, decoder quasi-orthogonality, downstream loss recovered.

:class:`SAEMetrics` is a torchmetrics ``Metric`` with fixed-shape states (``d_in + d_latent + 7`` numbers, fp64,
summed over DDP ranks), fed ``(x, x_hat, z, b_pre)`` batch by batch:

* ``fvu``: fraction of variance unexplained, ``sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2`` (Gao et al.
  2024's normalised MSE, over all tokens seen since the last reset);
* ``l0``: mean number of active latents (``z != 0``) per token;
* ``density_hist``: histogram of ``log10`` feature density (fraction of tokens on which each latent fires) over
  :data:`DENSITY_BINS` fixed bins ``[-8, 0]`` (values below ``1e-8`` clipped into the first bin), plus
  ``never_fired_fraction`` (latents with density 0 over the window, which have no log);
* ``afa_error`` (Lee et al. 2025, Sec. 3, the approximate feature activation ``||z||_2 ~= ||x - b_pre||_2`` under a
  quasi-orthogonal decoder): ``E[(||z|| - ||x - b_pre||)^2] / E[||x - b_pre||^2]``, the relative squared error of
  the dense norm as a predictor of the sparse one (0 = exact; the reference code's ``afa_loss`` is the
  unnormalised numerator).

:func:`decoder_epsilon` gives the paper's quasi-orthogonality ``eps`` (max and mean ``|cos|`` between distinct decoder
directions; the reference logs ``epsilon_max``/``epsilon_mean`` of the signed off-diagonal Gram entries).
:func:`loss_recovered` splices the reconstruction into a model (a forward hook replacing the module's output).

Example::

    m = SAEMetrics(d_in=64, d_latent=256)
    out = sae(x); m.update(x, out.x_hat, out.z, sae.b_pre)
    m.compute()["fvu"]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from lit_act.sae.models import SparseAutoencoder

DENSITY_BINS = 32
DENSITY_RANGE = (-8.0, 0.0)


class SAEMetrics(Metric):
    """Streaming FVU, L0, feature-density histogram and AFA error (see the module docstring)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, d_in: int, d_latent: int, **kwargs) -> None:
        super().__init__(**kwargs)
        f64 = torch.float64
        self.add_state("n", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("sse", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_in, dtype=f64), dist_reduce_fx="sum")
        self.add_state("sum_sq", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("active", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("fired", torch.zeros(d_latent, dtype=f64), dist_reduce_fx="sum")
        self.add_state("afa_sq_err", torch.zeros((), dtype=f64), dist_reduce_fx="sum")
        self.add_state("afa_target_sq", torch.zeros((), dtype=f64), dist_reduce_fx="sum")

    def update(self, x: Tensor, x_hat: Tensor, z: Tensor, b_pre: Tensor) -> None:
        x, x_hat, z = x.detach().double(), x_hat.detach().double(), z.detach().double()
        self.n += x.shape[0]
        self.sse += (x - x_hat).square().sum()
        self.sum_x += x.sum(dim=0)
        self.sum_sq += x.square().sum()
        nonzero = z != 0
        self.active += nonzero.sum()
        self.fired += nonzero.sum(dim=0)
        target = (x - b_pre.detach().double()).norm(dim=1)
        self.afa_sq_err += (z.norm(dim=1) - target).square().sum()
        self.afa_target_sq += target.square().sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.n.clamp_min(1)
        total_var = self.sum_sq - self.sum_x.square().sum() / n
        density = self.fired / n
        live = density > 0
        log_density = density[live].log10().clamp(*DENSITY_RANGE)
        hist = torch.histc(log_density.float(), bins=DENSITY_BINS, min=DENSITY_RANGE[0], max=DENSITY_RANGE[1])
        return {"fvu": (self.sse / total_var.clamp_min(1e-30)).float(), "l0": (self.active / n).float(),
                "afa_error": (self.afa_sq_err / self.afa_target_sq.clamp_min(1e-30)).float(),
                "never_fired_fraction": (~live).float().mean(), "density_hist": hist}


def density_bin_edges() -> Tensor:
    """The ``DENSITY_BINS + 1`` edges (log10 density) of ``density_hist``."""
    return torch.linspace(*DENSITY_RANGE, DENSITY_BINS + 1)


@torch.no_grad()
def decoder_epsilon(sae: SparseAutoencoder, chunk: int = 4096) -> dict[str, Tensor]:
    """Quasi-orthogonality of the decoder (Lee et al. 2025, Def. of ``eps``): ``epsilon_max`` = max and
    ``epsilon_mean`` = mean of ``|cos(W_dec,i, W_dec,j)|`` over ``i != j``, computed ``chunk`` rows at a time
    (memory ``chunk * d_latent``)."""
    w = F.normalize(sae.W_dec.detach().float(), dim=1)
    m = w.shape[0]
    if m < 2:
        return {"epsilon_max": w.new_zeros(()), "epsilon_mean": w.new_zeros(())}
    best, total = w.new_zeros(()), w.new_zeros((), dtype=torch.float64)
    for start in range(0, m, chunk):
        gram = (w[start:start + chunk] @ w.t()).abs()
        rows = torch.arange(gram.shape[0], device=w.device)
        gram[rows, rows + start] = 0
        best = torch.maximum(best, gram.max())
        total += gram.double().sum()
    return {"epsilon_max": best, "epsilon_mean": (total / (m * (m - 1))).float()}


# ------------------------------------------------------------------------------------------------- loss recovered
def _replace_output(output: Any, new: Tensor) -> Any:
    if isinstance(output, Tensor):
        return new
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return type(output)([new, *output[1:]])
    raise TypeError(f"cannot splice into a module output of type {type(output).__name__}; select a module that "
                    "returns a Tensor (or a tuple starting with one)")


@contextmanager
def splice(module: nn.Module, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace ``module``'s output ``y`` by ``fn(y)`` (a forward hook, removed on exit also after an exception)."""
    handle = module.register_forward_hook(lambda mod, args, output: _replace_output(
        output, fn(output if isinstance(output, Tensor) else output[0])))
    try:
        yield
    finally:
        handle.remove()


def reconstruct_with(sae: SparseAutoencoder) -> Callable[[Tensor], Tensor]:
    """``y -> x_hat`` for an output ``(..., d_in)`` (neurons on the last dimension), in the output's dtype."""
    def fn(y: Tensor) -> Tensor:
        x_hat = sae(y.reshape(-1, y.shape[-1]).float()).x_hat
        return x_hat.reshape(y.shape).to(y.dtype)

    return fn


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """The model's loss on ``batch``: ``model.loss(model(inputs), targets)`` for lit-act's ``(inputs, targets)``
    batches, ``model(**batch).loss`` for Hugging Face dict batches with labels."""
    if isinstance(batch, Mapping):
        return model(**batch).loss
    inputs, targets = batch
    return model.loss(model(inputs), targets)


@torch.no_grad()
def loss_recovered(model: nn.Module, module: nn.Module, sae: SparseAutoencoder, batches: Iterable[Any],
                   loss_fn: Callable[[nn.Module, Any], Tensor] = default_loss) -> dict[str, Tensor]:
    """Downstream loss with the SAE reconstruction spliced in (Gao et al. 2024 Sec. 4.1; SAELens's
    ``ce_loss_score``): over ``batches``, the mean clean loss ``L_clean``, the loss with ``module``'s output replaced
    by its reconstruction ``L_sae`` and by zeros ``L_zero``, and ``loss_recovered = (L_zero - L_sae) / (L_zero -
    L_clean)`` (1 = perfect, 0 = no better than ablating the module). Call in ``eval`` mode; the caller handles
    train/eval flags and RNG."""
    clean, spliced, zero, count = 0.0, 0.0, 0.0, 0
    sae_was_training = sae.training
    sae.eval()
    try:
        for batch in batches:
            clean = clean + loss_fn(model, batch).float()
            with splice(module, reconstruct_with(sae)):
                spliced = spliced + loss_fn(model, batch).float()
            with splice(module, torch.zeros_like):
                zero = zero + loss_fn(model, batch).float()
            count += 1
    finally:
        sae.train(sae_was_training)
    if count == 0:
        raise ValueError("loss_recovered needs at least one batch")
    clean, spliced, zero = clean / count, spliced / count, zero / count
    return {"loss_clean": clean, "loss_sae": spliced, "loss_zero": zero,
            "loss_recovered": (zero - spliced) / (zero - clean)}
