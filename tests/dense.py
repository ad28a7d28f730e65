"""Dense float64 reference matrices for the curvature tests, by ``torch.autograd.functional`` (independent of
``lit_act.hessian``): the Hessian and the GGN of the example-weighted mean loss over ``(x, y)`` batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

LOSSES = {"cross_entropy": lambda f, y: F.cross_entropy(f.reshape(-1, f.shape[-1]), y.reshape(-1)),
          "mse": F.mse_loss}


def loss_fn_of(name):
    """``loss_fn(module, batch)`` for the operators, from a :data:`LOSSES` name."""
    return lambda module, batch: LOSSES[name](module(batch[0]), batch[1])


def flat_params(model):
    return {n: p.detach() for n, p in model.named_parameters()}


def unflatten(params, flat):
    values, offset = {}, 0
    for n, p in params.items():
        values[n] = flat[offset:offset + p.numel()].reshape(p.shape)
        offset += p.numel()
    return values


def dense_hessian(model, batches, loss):
    """``sum_b n_b Hess L_b / sum_b n_b`` w.r.t. the flattened parameters (``named_parameters`` order)."""
    params = flat_params(model)
    flat0 = torch.cat([p.reshape(-1) for p in params.values()])
    total = sum(x.shape[0] for x, _ in batches)

    def objective(flat):
        values = unflatten(params, flat)
        return sum(x.shape[0] * LOSSES[loss](functional_call(model, values, (x,)), y) for x, y in batches) / total

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(objective, flat0, vectorize=True)  # vmapped rows, same matrix


def dense_ggn(model, batches, loss):
    """``sum_b n_b J_b^T (d2 L_b / df^2) J_b / sum_b n_b`` from dense Jacobians and output Hessians."""
    params = flat_params(model)
    flat0 = torch.cat([p.reshape(-1) for p in params.values()])
    total = sum(x.shape[0] for x, _ in batches)
    ggn = torch.zeros(flat0.numel(), flat0.numel(), dtype=flat0.dtype)
    with sdpa_kernel(SDPBackend.MATH):
        for x, y in batches:
            outputs = functional_call(model, params, (x,)).detach()
            jac = torch.autograd.functional.jacobian(
                lambda flat, x=x: functional_call(model, unflatten(params, flat), (x,)).reshape(-1), flat0)
            h_out = torch.autograd.functional.hessian(lambda f, y=y, s=outputs.shape: LOSSES[loss](f.reshape(s), y),
                                                      outputs.reshape(-1))
            ggn += x.shape[0] * jac.T @ h_out @ jac
    return ggn / total


def make_batches(loss, sizes=(20, 12), seed=1, shape=(6,), classes=3, out_shape=(3,)):
    """Float64 ``(x, y)`` batches of ``sizes`` examples: class labels for cross-entropy, Gaussian targets for MSE."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
        y = (torch.randint(0, classes, (n,), generator=gen) if loss == "cross_entropy"
             else torch.randn(n, *out_shape, generator=gen, dtype=torch.float64))
        out.append((x, y))
    return out
