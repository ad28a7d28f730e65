"""Curvature operators beside the Hessian: the generalised Gauss-Newton, the Fisher and the empirical Fisher.

For a batch with outputs ``f = model(inputs)`` and a mean loss ``L(f)`` whose output Hessian is known
(:mod:`lit_act.hessian.losses`), with ``J = df/dtheta``:

* ``"ggn"``: ``G = J^T (d2L/df^2) J`` (Schraudolph 2002; Martens 2020, "New insights and perspectives on the natural
  gradient method", Sec. 8). Exact and matrix-free: ``G v = J^T (H_f (J v))``, with ``J v`` by the double-vjp trick
  (the derivative of ``u -> J^T u`` w.r.t. ``u`` applied to ``v``) and ``J^T w`` by one vjp, both on a graph cached
  per batch. ``H = G + sum_k (dL/df_k) d2f_k/dtheta2``; ``G`` is positive semi-definite.
* ``"fisher"``: the Fisher information of the model's predictive distribution, ``E_{y ~ p(y|f)}[g g^T]`` with
  ``p = softmax(f)`` for cross-entropy (Gaussian with the loss's scale for MSE). For these (canonical-link exponential
  families) it equals the GGN exactly (Martens 2020, Sec. 9.2), so it is computed as the GGN, not by Monte Carlo.
* ``"empirical_fisher"``: ``F_emp = (1/N) sum_n g_n g_n^T`` with the per-example gradients ``g_n`` of the per-example
  losses ``l_n`` (``L = mean_n l_n``; Kunstner, Hennig & Balles, NeurIPS 2019, eq. 3). Matrix-free as a GGN of the
  vector ``l = (l_1..l_N)`` with output Hessian ``I / N``: ``F_emp v = J_l^T (J_l v) / N``.

All three are weighted over batches like :class:`HessianOperator` (``sum_b n_b C_b / sum_b n_b``) and share its
interface, so Lanczos, the trace estimators and SLQ take them unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_act.hessian.losses import (
    output_hessian_product,
    per_sample_losses,
    resolve_output_loss,
    split_batch,
)
from lit_act.hessian.operator import HessianOperator, LossFn

CURVATURES = ("hessian", "ggn", "fisher", "empirical_fisher")


class GGNOperator(HessianOperator):
    """``v -> C v`` for ``C`` the GGN, Fisher or empirical Fisher (module docstring) of the mean loss over
    ``batches``.

    Args:
        model, loss_fn, batches, params, all_reduce, on_matvec: as :class:`HessianOperator`.
        curvature: ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
        loss: ``"cross_entropy"`` or ``"mse"`` (default: detected for lit-act models; other losses raise, naming the
            supported ones). A custom ``loss_fn`` must equal this loss on ``model(inputs)`` (checked).

    Example::

        op = GGNOperator(model, None, [(x, y)], curvature="ggn", loss="cross_entropy")
        lanczos(op, k=3).eigenvalues
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, batches: Sequence[Any],
                 params: Sequence[str] | None = None, curvature: str = "ggn", loss: str | None = None,
                 **kwargs: Any) -> None:
        if curvature not in CURVATURES[1:]:
            raise ValueError(f"unknown curvature {curvature!r} for GGNOperator; valid: {list(CURVATURES[1:])}")
        self.curvature = curvature
        self.loss = resolve_output_loss(model, loss_fn, loss)
        kwargs.pop("backend", None)
        if kwargs.get("memory_budget") is not None or kwargs.get("chunk_plans") is not None:
            raise ValueError(f"memory_budget / chunk_plans plan the Hessian's products; for curvature={curvature!r} "
                             "bound the memory with chunk_size (each chunk's graph is rebuilt per product)")
        super().__init__(model, loss_fn, batches, params=params, backend="cached", **kwargs)
        self.backend = "ggn"

    def _check_loss(self) -> None:
        from lit_act.hessian.diagonal import _check_loss_matches

        inputs, targets = split_batch(self.batches[0])
        with torch.no_grad():
            outputs = self.model(inputs)
        _check_loss_matches(self.model, self.loss_fn, self.batches[0], self.loss, outputs, targets)
        graph = self._graph(self.batches[0])
        if self.keep_graph[0]:
            self._graphs[0] = graph
        if all(g is None for g in graph[2]):
            raise ValueError(f"the outputs do not depend on any chosen parameter: {self.names}")

    def first_order(self, index: int) -> tuple[Tensor | None, ...]:
        """The loss gradient of batch ``index`` with its graph, built now (the cached graphs here are the GGN's)."""
        return self._first_order(self.batches[index], list(self._params.values()))

    def _graph(self, batch: Any) -> tuple[Tensor, Tensor, tuple[Tensor | None, ...]]:
        """``(vector, dummy, J^T dummy)``: the vector whose Jacobian ``J`` enters (outputs, or per-example losses),
        and the graph of ``u -> J^T u`` kept for ``J v``."""
        inputs, targets = split_batch(batch)
        params = list(self._params.values())
        with torch.enable_grad():
            outputs = self.model(inputs)
            vector = per_sample_losses(self.loss, outputs, targets) if self.curvature == "empirical_fisher" \
                else outputs
            dummy = torch.zeros_like(vector, requires_grad=True)
            jt = torch.autograd.grad(vector, params, dummy, create_graph=True, allow_unused=True)
        return vector, dummy, jt

    def _batch_products(self, index: int, batch: Any, rows: Tensor) -> Tensor:
        graph = self._graphs.get(index) or self._graph(batch)  # kept only where keep_graph says (chunk_size)
        if self.keep_graph[index]:
            self._graphs[index] = graph
        vector, dummy, jt = graph
        params = list(self._params.values())
        keep = [i for i, g in enumerate(jt) if g is not None]
        out = []
        for v in rows:
            parts = list(self.split(v).values())
            jv = torch.autograd.grad([jt[i] for i in keep], dummy, [parts[i] for i in keep], retain_graph=True)[0]
            if self.curvature == "empirical_fisher":
                w = jv / vector.shape[0]
            else:
                w = output_hessian_product(self.loss, vector.detach(), jv)
            cv = torch.autograd.grad(vector, params, w, retain_graph=True, allow_unused=True)
            out.append(self.flatten(cv))
        return torch.stack(out)


def curvature_operator(model: nn.Module, loss_fn: LossFn | None, batches: Sequence[Any], curvature: str = "hessian",
                       loss: str | None = None, **kwargs: Any) -> HessianOperator:
    """The operator of ``curvature`` (``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``); keyword
    arguments go to :class:`HessianOperator` / :class:`GGNOperator`."""
    if curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r}; valid: {list(CURVATURES)}")
    if curvature == "hessian":
        return HessianOperator(model, loss_fn, batches, **kwargs)
    return GGNOperator(model, loss_fn, batches, curvature=curvature, loss=loss, **kwargs)



def empirical_fisher_diagonal(model: nn.Module, batches: Sequence[Any], loss: str | None = None,
                              params: Sequence[str] | None = None, chunk: int = 64) -> Tensor:
    """Exact ``diag(F_emp) = sum_b sum_n g_n^2 / sum_b n_b`` from per-example gradients
    (``torch.func.vmap(grad)``, ``chunk`` examples at a time), flattened like the operators. Needs examples that do not
    interact in the forward pass (eval-mode BatchNorm, no batch statistics)."""
    from torch.func import functional_call, grad, vmap

    from lit_act.hessian.operator import select_parameters

    name = resolve_output_loss(model, None, loss)
    chosen = select_parameters(model, params)
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
    total, count = None, 0
    for batch in batches:
        inputs, targets = split_batch(batch)

        def example_loss(values: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            out = functional_call(model, {**values, **frozen}, (x[None],))
            return per_sample_losses(name, out, y[None])[0]

        per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
        values = {n: p.detach() for n, p in chosen.items()}
        for start in range(0, inputs.shape[0], chunk):
            grads = per_example(values, inputs[start:start + chunk], targets[start:start + chunk])
            sq = torch.cat([grads[n].reshape(grads[n].shape[0], -1).square().sum(0) for n in chosen])
            total = sq if total is None else total + sq
        count += inputs.shape[0]
    return total / count
