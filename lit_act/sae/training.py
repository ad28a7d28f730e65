"""One SAE, its own Adam optimiser and the training step (decoder constraint, AuxK, dead-latent tracking).

Losses (per SAE batch of ``N`` rows):

* **TopK family** (``topk``, ``batchtopk``, ``topafa``; Gao et al. 2024 Sec. 2.3-2.4): the normalised MSE
  ``||x - x_hat||^2 / ||x - mean(x)||^2`` plus ``auxk_coefficient`` (paper: 1/32) times the AuxK loss
  (:func:`auxk_loss`).
* **ReLU** (Bricken et al. 2023): ``mean_n ||x - x_hat||^2 + l1_coefficient * mean_n sum_i z_i ||W_dec,i||``.

Under DDP (an initialised process group) each rank computes its share of the loss of the all-rank batch
(normalisers summed over ranks) and the gradients are summed, which equals one process training on the concatenated
batch (exactly for ``topk``, ``relu`` and ``topafa``; ``batchtopk`` keeps its ``B * k`` budget per rank's batch and
averages its threshold); ``b_pre`` is initialised from every rank's first batch, so every rank holds an identical
SAE. After ``backward`` the component of ``W_dec``'s gradient
parallel to each decoder direction is removed, Adam steps, and the decoder rows are renormalised (Gao et al.
Sec. 2.4).

**Optimiser** (Gao et al. Appendix A.3): Adam with betas (0.9, 0.999), a constant learning rate, eps 6.25e-10
(A.3.1), no gradient clipping (the paper needed it only to stabilise its large GPT-4 runs; the reference's
``clip_grad`` defaults to off). Not reproduced: the EMA of the weights (A.5), and the MSE normaliser computed once at
the start of training (A.6): here it is the batch's own variance (the same in expectation; exact under DDP with the
all-rank batch); AuxK is normalised by the batch's residual variance, not per token (A.6: a per-token denominator
``||e_n||^2`` blows up on tokens the top-k latents already reconstruct; the reference divides by ``||e_n + b_pre||^2``).

**Dead latents.** A latent is dead when it has not fired (``z > 0``) in the last ``dead_tokens`` training tokens
(Gao et al. use 10M tokens; the default here, 1M, is scaled to the few-hundred-step runs lit-act targets, set
``dead_tokens=10_000_000`` for paper-scale training). Counted at SAE-batch granularity (exact to within one batch),
summed over DDP ranks. The same window defines the AuxK dead set and the logged ``dead_fraction``.

Example::

    trainer = SAETrainer(d_in=64, config=SAEConfig(sae="topk", d_latent=256, k=4))
    for x in batches:
        losses = trainer.step(x)
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lit_act.sae.models import (
    SAEOutput,
    SparseAutoencoder,
    TopKSAE,
    available_saes,
    build_sae,
    keep_topk,
    sae_class,
    sparse_decode,
)

_B_PRE_INITS = ("geometric_median", "mean", "zeros")


@dataclass(frozen=True)
class SAEConfig:
    """Settings of one SAE and its training.

    Args:
        sae: registered SAE name (:func:`lit_act.sae.models.available_saes`).
        d_latent: number of latents.
        k: active latents per input (TopK / BatchTopK; ignored by ``relu`` and ``topafa``).
        lr: Adam learning rate.
        batch_size: rows per SAE step.
        auxk_coefficient: AuxK weight (paper: 1/32).
        k_aux: dead latents used by AuxK (``None``: ``d_in // 2``, the paper's default).
        dead_tokens: the dead-latent window in training tokens (see module docstring).
        l1_coefficient: L1 weight of the ``relu`` SAE.
        adam_eps: Adam's epsilon (Gao et al.'s reference ``openai/sparse_autoencoder``: 6.25e-10).
        b_pre_init: ``geometric_median`` (Gao et al. Sec. 2.4), ``mean`` or ``zeros`` of the first batch.
        calibrate_encoder: TopK / BatchTopK: rescale the encoder at initialisation so the SAE preserves the norm of
            random inputs around ``b_pre`` (Gao et al. Appendix A.1's TopK init, the reference's ``init_from_data_``,
            :meth:`SAETrainer.initialize`). The paper's ablation (Fig. 16) finds "no effect or a weak negative
            effect" and the reference code keeps it only "to ensure exact match with internal codebase"; off by
            default, so the encoder keeps torch's default magnitudes (the paper's baseline init,
            :mod:`lit_act.sae.models`): FVU 1.05x vs 1.00x SAELens's in ``benchmarks/bench_sae.py``; on short LM
            runs at small k it leaves fewer dead latents at a higher FVU (``docs/sae.md``, Experiment).
        normalize_inputs: scale the inputs by one scalar so that ``E||x||^2 = d_in`` on the first batch (the SAE's
            ``input_scale`` buffer, :mod:`lit_act.sae.models`); ``False``: scale 1.
        seed: seed of the SAE initialisation (private generator; the global RNG is never used).
        sae_kwargs: extra constructor arguments (e.g. ``{"momentum": 0.01}`` for ``batchtopk``).
    """

    sae: str = "topk"
    d_latent: int = 1024
    k: int = 32
    lr: float = 3e-4
    batch_size: int = 1024
    auxk_coefficient: float = 1 / 32
    k_aux: int | None = None
    dead_tokens: int = 1_000_000
    l1_coefficient: float = 1e-3
    adam_eps: float = 6.25e-10
    b_pre_init: str = "geometric_median"
    normalize_inputs: bool = True
    calibrate_encoder: bool = False
    seed: int = 0
    sae_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sae not in available_saes():
            raise ValueError(f"unknown SAE {self.sae!r}; valid names: {', '.join(available_saes())}")
        for name in ("d_latent", "k", "batch_size", "dead_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.k > self.d_latent and self.sae in ("topk", "batchtopk"):
            raise ValueError(f"k ({self.k}) must be <= d_latent ({self.d_latent})")
        if self.k_aux is not None and self.k_aux < 1:
            raise ValueError(f"k_aux must be a positive integer or None, got {self.k_aux!r}")
        for name in ("lr", "adam_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.b_pre_init not in _B_PRE_INITS:
            raise ValueError(f"b_pre_init must be one of {', '.join(_B_PRE_INITS)}, got {self.b_pre_init!r}")

    def build(self, d_in: int) -> SparseAutoencoder:
        """The SAE for inputs of width ``d_in`` (``k``/``l1_coefficient`` passed to the models that take them)."""
        accepted = inspect.signature(sae_class(self.sae)).parameters
        kwargs = {name: getattr(self, name) for name in ("k", "l1_coefficient") if name in accepted}
        generator = torch.Generator().manual_seed(self.seed)
        return build_sae(self.sae, d_in, self.d_latent, generator=generator, **kwargs, **self.sae_kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _all_sum(t: Tensor) -> Tensor:
    """``t`` summed over DDP ranks (``t`` itself outside DDP); detached."""
    t = t.detach()
    if _world() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def total_variance(x: Tensor) -> Tensor:
    """``sum_n ||x_n - mean(x)||^2`` over the rows of ``x`` on every DDP rank together (detached)."""
    stats = _all_sum(torch.cat([x.sum(dim=0), x.square().sum().reshape(1), x.new_tensor([x.shape[0]])]))
    sum_x, sum_sq, n = stats[:-2], stats[-2], stats[-1]
    return (sum_sq - sum_x.square().sum() / n).clamp_min(1e-12)


def normalized_mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the batch (Gao et al.'s normalised MSE = FVU). Under DDP
    the denominator is the whole (all-rank) batch's and the numerator this rank's share, so the rank losses (and
    gradients) sum to the single-process loss on the concatenated batch."""
    return (x_hat - x).square().sum() / total_variance(x)


def auxk_loss(sae: SparseAutoencoder, pre: Tensor, residual: Tensor, dead: Tensor, k_aux: int) -> Tensor:
    """AuxK (Gao et al. 2024 Sec. 2.4): reconstruct the main model's (detached) residual ``e = x - x_hat`` from the
    top-``k_aux`` *dead* latents, ``e_hat = W_dec z_aux``; loss = normalised MSE of ``e_hat`` against ``e``.
    Zero when no latent is dead."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    values, indices = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=-1, sorted=False)
    return normalized_mse(sparse_decode(indices, values.relu(), sae.W_dec), residual)


def geometric_median(x: Tensor, iterations: int = 20) -> Tensor:
    """Weiszfeld iterations for the geometric median of the rows of ``x`` (Gao et al. initialise ``b_pre`` to it)."""
    median = x.mean(dim=0)
    for _ in range(iterations):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(1e-8)
        median = (weights.unsqueeze(1) * x).sum(dim=0) / weights.sum()
    return median


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SAETrainer:
    """An SAE with its own Adam optimiser, trained one batch at a time (:meth:`step`).

    Args:
        d_in: activation width.
        config: :class:`SAEConfig`.
        device: where the SAE lives and steps (the model's device for the online callback).

    Attributes: ``sae``, ``optimizer``, ``tokens_since_fired`` (per-latent dead counter), ``tokens_trained``.
    """

    def __init__(self, d_in: int, config: SAEConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.d_in = d_in
        self.sae = config.build(d_in).to(device)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=config.lr, eps=config.adam_eps)
        self.k_aux = config.k_aux if config.k_aux is not None else max(1, d_in // 2)
        self.tokens_since_fired = torch.zeros(config.d_latent, dtype=torch.long, device=device)
        self.tokens_trained = 0
        self.initialized = False
        self.last_output: SAEOutput | None = None  # the last step's (pre-update) output, detached

    @property
    def dead(self) -> Tensor:
        """Boolean mask of latents that have not fired in the last ``dead_tokens`` training tokens."""
        return self.tokens_since_fired >= self.config.dead_tokens

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Initialise from a first batch (under DDP every rank's rows together), as Gao et al.'s reference
        ``init_from_data_``: ``input_scale`` (``config.normalize_inputs``: ``sqrt(d_in / mean ||x||^2)``), ``b_pre``
        (``config.b_pre_init`` of the normalised rows) and, with ``config.calibrate_encoder`` (TopK family), the
        encoder divided by the mean norm of the reconstructions ``x_hat - b_pre`` of 256 random unit inputs around
        ``b_pre`` (the SAE then starts norm-preserving; drawn from a private generator seeded with ``config.seed``)."""
        if _world() > 1:
            gathered = [torch.empty_like(x) for _ in range(_world())]
            dist.all_gather(gathered, x.contiguous())
            x = torch.cat(gathered)
        x = x.float()
        if self.config.normalize_inputs:
            mean_sq = x.square().sum(dim=1).mean()
            self.sae.input_scale.copy_((self.d_in / mean_sq).sqrt() if mean_sq > 0 else torch.ones(()))
        x = x * self.sae.input_scale
        if self.config.b_pre_init == "geometric_median":
            b_pre = geometric_median(x.float())
        elif self.config.b_pre_init == "mean":
            b_pre = x.float().mean(dim=0)
        else:
            b_pre = torch.zeros_like(self.sae.b_pre)
        self.sae.b_pre.copy_(b_pre)
        if self.config.calibrate_encoder and isinstance(self.sae, TopKSAE):
            self._calibrate_encoder()
        self.initialized = True

    @torch.no_grad()
    def _calibrate_encoder(self, samples: int = 256) -> None:
        sae = self.sae
        generator = torch.Generator().manual_seed(self.config.seed + 1)
        directions = torch.randn(samples, self.d_in, generator=generator).to(sae.b_pre.device)
        u = directions / directions.norm(dim=1, keepdim=True) + sae.b_pre
        pre = sae.pre_activations(u)
        z = keep_topk(pre, sae.k)  # per row, also for BatchTopK (its batch budget is k per row on average)
        norm = (z @ sae.W_dec).norm(dim=1).mean()
        if norm > 0:
            sae.W_enc.div_(norm)

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor], SAEOutput]:
        """``(loss, {part: detached value}, SAE output)`` of one batch; under DDP this rank's share of the all-rank loss (the
        shares sum to the loss of the concatenated batch)."""
        out = self.sae(x)
        scale = self.sae.input_scale
        if self.sae.uses_auxk:
            mse = normalized_mse(out.x_hat, x)
            aux = auxk_loss(self.sae, out.pre, ((x - out.x_hat) * scale).detach(), self.dead, self.k_aux)
            total = mse + self.config.auxk_coefficient * aux
            parts = {"mse": mse.detach(), "auxk": aux.detach()}
        else:  # in the normalised space, where l1_coefficient is comparable across models
            n = _all_sum(x.new_tensor(float(x.shape[0])))
            mse = ((out.x_hat - x) * scale).square().sum() / n
            l1 = (out.z * self.sae.W_dec.norm(dim=1)).sum() / n
            total = mse + self.sae.l1_coefficient * l1
            parts = {"mse": mse.detach(), "l1": l1.detach()}
        return total, parts, out

    def step(self, x: Tensor) -> dict[str, Tensor]:
        """One optimiser step on ``x`` ``(N, d_in)``; returns the detached loss parts (no host sync)."""
        x = x.detach().float()
        if not self.initialized:
            self.initialize(x)
        self.sae.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            total, parts, out = self.loss(x)
            total.backward()
        self.last_output = SAEOutput(out.x_hat.detach(), out.z.detach(), out.pre.detach())
        world = _world()
        if world > 1:  # the rank losses are shares of one loss: their gradients add up
            for p in self.sae.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
            for buffer in self.sae.buffers():  # BatchTopK's threshold estimate: the rank average
                dist.all_reduce(buffer)
                buffer /= world
        self.sae.project_decoder_grad()
        self.optimizer.step()
        self.sae.normalize_decoder()
        self._update_dead(self.last_output.z, x.shape[0], world)
        return parts | {"loss": total.detach()}

    @torch.no_grad()
    def _update_dead(self, z: Tensor, n_tokens: int, world: int) -> None:
        fired = (z > 0).sum(dim=0)
        if world > 1:
            counts = torch.cat([fired, fired.new_tensor([n_tokens])])
            dist.all_reduce(counts)
            fired, n_tokens = counts[:-1], int(counts[-1])
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired > 0, 0)
        self.tokens_trained += n_tokens

    def state_dict(self) -> dict[str, Any]:
        """A detached copy (later steps do not change it): SAE weights, Adam state, dead counters, config."""
        return copy.deepcopy({
            "sae": self.sae.state_dict(), "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tokens_since_fired, "tokens_trained": self.tokens_trained,
            "initialized": self.initialized, "config": self.config.to_dict(), "d_in": self.d_in})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.tokens_trained = int(state["tokens_trained"])
        self.initialized = bool(state["initialized"])
