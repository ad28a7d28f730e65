"""Small pre-LayerNorm decoder-only Transformer language model (GPT-style).

Module names (targets for callbacks and swaps)::

    tok_emb, pos_emb
    blocks.N            # residual stream after block N (massive-activation site, Sun et al. 2024)
    blocks.N.ln1, blocks.N.attn (attn.qkv, attn.proj), blocks.N.ln2
    blocks.N.mlp        # fc_in -> act -> fc_out
    blocks.N.mlp.fc_in, blocks.N.mlp.act, blocks.N.mlp.fc_out
    ln_f, lm_head

``forward(idx)`` with ``idx`` of shape ``(B, T)`` returns logits ``(B, T, vocab_size)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_act.models.base import ActivationSpec, LitActModule, MLPSpec
from lit_act.utils import validate as v


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (``scaled_dot_product_attention`` with ``is_causal=True``)."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    """Feed-forward block ``fc_out(act(fc_in(x)))``."""

    def __init__(self, d_model: int, d_ff: int, act: nn.Module) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, d_ff)
        self.act = act
        self.fc_out = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    """Pre-LN block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``; its output is the residual stream."""

    def __init__(self, d_model: int, n_head: int, d_ff: int, act: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff, act)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TransformerLM(LitActModule):
    """Character/token language model; batches are ``(idx, targets)`` with next-token targets, both ``(B, T)``.

    Args:
        vocab_size: vocabulary size (filled from the datamodule when ``None``).
        block_size: maximum context length (filled from the datamodule when ``None``).
        d_model, n_layer, n_head: width, depth and heads.
        d_ff: MLP hidden width (default ``4 * d_model``).
        activation: MLP activation name, class or factory.
        mlp: ``kanify`` arguments applied to the model at the end of ``__init__`` (``mlp=kan`` etc., see
            :func:`~lit_act.models.base.mlp_spec`); recorded in the hyperparameters so checkpoints reload alone.
    """

    log_accuracy = False

    def __init__(self, vocab_size: int, block_size: int, d_model: int = 128, n_layer: int = 2, n_head: int = 4,
                 d_ff: int | None = None, activation: ActivationSpec = "gelu", dropout: float = 0.0,
                 lr: float = 3e-3, weight_decay: float = 0.01, cosine_schedule: bool = False,
                 mlp: MLPSpec = None) -> None:
        for name, value in {"vocab_size": vocab_size, "block_size": block_size, "d_model": d_model,
                            "n_layer": n_layer, "n_head": n_head}.items():
            v.positive_int(name, value)
        v.optional(v.positive_int, "d_ff", d_ff), v.finite_float("dropout", dropout, low=0.0, high=1.0, high_open=True)
        super().__init__(lr=lr, weight_decay=weight_decay, cosine_schedule=cosine_schedule)
        mlp = self.record_hyperparameters(activation, mlp)
        self.block_size = block_size
        d_ff = d_ff or 4 * d_model
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, n_head, d_ff, self.activation_factory(), dropout) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply_mlp(mlp)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.block_size}")
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def _shared_step(self, batch, stage: str) -> Tensor:
        loss = super()._shared_step(batch, stage)
        if stage != "train":
            self.log(f"{stage}/ppl", loss.detach().exp(), on_step=False, on_epoch=True, batch_size=batch[1].shape[0],
                     sync_dist=True)
        return loss
