"""Dense float64 reference matrices for the curvature tests, by ``torch.autograd.functional`` (independent of
``lit_act.hessian``): the Hessian and the GGN of the example-weighted mean loss over ``(x, y)`` batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
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


class Substituted(nn.Module):
    """``model`` called with substituted parameter values (``functional_call``); ``.loss`` is the model's, so a loss
    written as ``module.loss(module(x), y)`` runs on it."""

    def __init__(self, model: nn.Module, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.inner, self.values = model, values

    def forward(self, *args, **kwargs):
        return functional_call(self.inner, self.values, args, kwargs)

    def loss(self, *args, **kwargs):
        return self.inner.loss(*args, **kwargs)


def weighted_loss(loss_fn, batches):
    """``module -> sum_b n_b loss_fn(module, b) / sum_b n_b`` (``n_b`` the batch's leading size)."""
    total = sum(b[0].shape[0] for b in batches)
    return lambda module: sum(b[0].shape[0] * loss_fn(module, b) for b in batches) / total


def hessian_of(model, objective, names=None, vectorize=False):
    """Hessian of ``objective(module)`` w.r.t. the flattened parameters ``names`` (default: all, in
    ``named_parameters`` order), ``module`` being ``model`` with those parameters substituted; math attention (the
    fused kernels have no double backward)."""
    params = flat_params(model)
    chosen = {n: p for n, p in params.items() if names is None or n in names}
    flat0 = torch.cat([p.reshape(-1) for p in chosen.values()])

    def f(flat):
        return objective(Substituted(model, {**params, **unflatten(chosen, flat)}))

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(f, flat0, vectorize=vectorize)


def dense_hessian(model, batches, loss, names=None):
    """``sum_b n_b Hess L_b / sum_b n_b`` w.r.t. the flattened parameters ``names`` (default all, in
    ``named_parameters`` order), ``L_b`` the :data:`LOSSES` ``loss`` of ``model(x_b)``."""
    return hessian_of(model, weighted_loss(loss_fn_of(loss), batches), names, vectorize=True)  # vmapped rows


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


def lm_batches(vocab=5, t=4, sizes=(3,)):
    """``(idx, targets)`` token batches of ``sizes`` sequences of length ``t`` (a seeded generator)."""
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(0, vocab, (n, t), generator=gen), torch.randint(0, vocab, (n, t), generator=gen))
            for n in sizes]


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
