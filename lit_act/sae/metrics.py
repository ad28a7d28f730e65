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
  quasi-orthogonal decoder, with ``x`` in the SAE's normalised space ``input_scale * x``):
  ``E[(||z|| - ||x - b_pre||)^2] / E[||x - b_pre||^2]``, the relative squared error of
  the dense norm as a predictor of the sparse one (0 = exact; the reference code's ``afa_loss`` is the
  unnormalised numerator).

:func:`decoder_epsilon` gives the paper's quasi-orthogonality ``eps`` (max and mean ``|cos|`` between distinct decoder
directions; the reference logs ``epsilon_max``/``epsilon_mean`` of the signed off-diagonal Gram entries).
:func:`loss_recovered` splices the reconstruction into a model (a forward hook replacing the module's output).

Example::

    m = SAEMetrics(d_in=64, d_latent=256)
    out = sae(x); m.update(x, out.x_hat, out.z, sae.b_pre, sae.input_scale)
    m.compute()["fvu"]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from lit_act.batch import DEFAULT_ADAPTER, BatchAdapter
from lit_act.sae.models import SparseAutoencoder
from lit_act.stats.tap import site_of

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

    def update(self, x: Tensor, x_hat: Tensor, z: Tensor, b_pre: Tensor, input_scale: Tensor | float = 1.0) -> None:
        """One batch: inputs ``x``, reconstructions ``x_hat`` (input scale), codes ``z``, and the SAE's ``b_pre`` and
        ``input_scale`` (the AFA target is ``||input_scale * x - b_pre||``, in the SAE's normalised space)."""
        x, x_hat, z = x.detach().double(), x_hat.detach().double(), z.detach().double()
        self.n += x.shape[0]
        self.sse += (x - x_hat).square().sum()
        self.sum_x += x.sum(dim=0)
        self.sum_sq += x.square().sum()
        nonzero = z != 0
        self.active += nonzero.sum()
        self.fired += nonzero.sum(dim=0)
        target = (x * torch.as_tensor(input_scale).detach().double() - b_pre.detach().double()).norm(dim=1)
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


def _replace_input(args: tuple, kwargs: dict, fn: Callable[[Tensor], Tensor]) -> tuple[tuple, dict]:
    for i, value in enumerate(args):
        if isinstance(value, Tensor):
            return (*args[:i], fn(value), *args[i + 1:]), kwargs
    for key, value in kwargs.items():
        if isinstance(value, Tensor):
            return args, {**kwargs, key: fn(value)}
    raise TypeError("cannot splice into a module input that holds no Tensor; select its output instead")


@contextmanager
def splice(target: nn.Module | Any, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace the tensor observed at ``target`` by ``fn(tensor)`` while open: a module's output ``y`` (an
    ``nn.Module`` or an output :class:`~lit_act.selection.Site`), or a module's first Tensor input for an input-port
    Site (e.g. the input of LLaMA's ``down_proj``). The hook is removed on exit, also after an exception."""
    module, port = site_of(target)
    if port == "output":
        handle = module.register_forward_hook(lambda mod, args, output: _replace_output(
            output, fn(output if isinstance(output, Tensor) else output[0])))
    else:
        handle = module.register_forward_pre_hook(lambda mod, args, kwargs: _replace_input(args, kwargs, fn),
                                                  with_kwargs=True)
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


@dataclass(frozen=True)
class AdapterLoss:
    """``(model, batch) -> loss`` read through ``adapter`` (:class:`lit_act.batch.BatchAdapter`): the output's own
    loss (Hugging Face models given ``labels``), else ``model.loss(logits, targets)`` when the model defines ``loss``
    (lit-act's models), else the cross-entropy of the logits against integer targets. Picklable (``ddp_spawn``).

    Raises:
        TypeError: the batch carries no targets / the output no logits, so no loss can be formed (pass
            ``loss_fn=``).
    """

    adapter: BatchAdapter = DEFAULT_ADAPTER

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        output = self.adapter.forward(model, batch)
        value = self.adapter.loss(output)
        if value is not None:
            return value
        logits, targets = self.adapter.logits(output), self.adapter.targets(batch)
        if logits is None or targets is None:
            raise TypeError("the model output has no loss and the batch/output no (logits, targets) to form one")
        if callable(getattr(model, "loss", None)):
            return model.loss(logits, targets)
        if targets.is_floating_point():
            raise TypeError("the batch has floating-point targets and the model no loss(logits, targets) method")
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


#: the model's loss on a batch read with the default adapter (:class:`AdapterLoss`)
default_loss = AdapterLoss()


@torch.no_grad()
def loss_recovered(model: nn.Module, module: nn.Module | Any, sae: SparseAutoencoder, batches: Iterable[Any],
                   loss_fn: Callable[[nn.Module, Any], Tensor] = default_loss) -> dict[str, Tensor]:
    """Downstream loss with the SAE reconstruction spliced in (Gao et al. 2024 Sec. 4.1; SAELens's
    ``ce_loss_score``): over ``batches``, the mean clean loss ``L_clean``, the loss with the tensor at ``module`` (a
    module's output, or a :class:`~lit_act.selection.Site`'s port, :func:`splice`) replaced by its reconstruction
    ``L_sae`` and by zeros ``L_zero``, and ``loss_recovered = (L_zero - L_sae) / (L_zero - L_clean)`` (1 = perfect,
    0 = no better than ablating the module). Call in ``eval`` mode; the caller handles train/eval flags, RNG and
    other callbacks' taps (:meth:`lit_act.callbacks.core.LitActCallback.quiet_pass`)."""
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
