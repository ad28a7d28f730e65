"""Losses for second-order statistics of models with fused attention.

PyTorch's fused CPU/GPU scaled-dot-product-attention kernels have no double backward (``derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``) and no forward-mode AD, so a
Hessian-vector product through ``F.scaled_dot_product_attention`` fails. :func:`math_attention_loss` runs the forward
with the plain "math" SDPA kernel (the same attention written with matmul and softmax), whose graph is twice
differentiable; the loss value is the same up to floating-point rounding.

Example (conf/callbacks/lm.yaml)::

    hessian:
      loss_fn: {_target_: lit_act.utils.losses.math_attention_loss, _partial_: true}
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lit_act.hessian.operator import default_loss_fn


def math_attention_loss(module: nn.Module, batch: Any) -> Tensor:
    """lit-act's default loss (``module.loss(module(inputs), targets)``) with attention on the math SDPA kernel."""
    with sdpa_kernel(SDPBackend.MATH):
        return default_loss_fn(module, batch)
