"""Top eigenvalues of every diagonal block ``H_BB`` of the Hessian (per-layer Hessians) in one pass.

A block ``B`` is the set of parameters directly owned by one module (``HessianOperator.blocks`` and the per-block
traces of :mod:`lit_act.hessian.trace` use the same names: the module name, ``"<root>"`` for the model's own
parameters). The top eigenvalue of ``H_BB`` is the layer-wise sharpness of Sankar et al., "A deeper look at the Hessian
eigenspectrum of deep neural networks and its applications to regularization" (AAAI 2021, arXiv:2012.03801: the
Hessian of the loss w.r.t. one layer's parameters, the others fixed) and the per-block sensitivity of HAWQ (Dong et
al., ICCV 2019, top eigenvalue of each block's Hessian by power iteration). Those run one solver per block; PyHessian
has no per-block routine. Here every block runs its own Lanczos recurrence (:mod:`lit_act.hessian.lanczos`:
reorthogonalisation whenever semi-orthogonality would be lost, invariant-subspace restarts, the Ritz residual / Kato-Temple convergence test) and all recurrences
advance in lockstep on ONE cached first-order graph ``g(theta) = dL/dtheta`` per batch. A block leaves the lockstep as
soon as its own top-``k`` pass the test, so its iterations and products are exactly those of ``lanczos`` on the block
operator with the same seed.

The block products ``H_BB v_B = d(g_B . v_B)/dtheta_B`` of one lockstep iteration come from

* ``products="per_block"`` (default): one double backward per block, ``grad(g_B, theta_B, v_B)``. Autograd prunes
  the graph to what reaches ``theta_B`` (for a layer ``l`` of a sequential network: the backward pass above ``l`` and
  back), so the blocks together cost a few full Hessian-vector products at most (measured: about 1 on the
  784-256-256-10 MLP, whose first layer dominates; about 5.6 on the benchmark TransformerLM's 16 blocks);
* ``products="batched"``: ONE vmapped double backward for all blocks, ``grad(g, theta, V, is_grads_batched=True)``
  with row ``B`` of ``V`` non-zero only on block ``B``, keeping block ``B``'s part of row ``B``. Each row is a full
  Hessian-vector product (no row can be pruned), so it does ``#blocks`` full products' work in one call.

Measured (``python -m benchmarks.bench_hessian --only blocks``, CPU, 1 thread, top-1 per block, setup included,
ratio = the naive loop of one ``lanczos`` per ``HessianOperator.blocks`` operator / ours, two runs):
``"per_block"`` 1.04-1.05x on the 784-256-256-10 MLP (3 blocks) and 1.09-1.26x on the benchmark TransformerLM (16
blocks); ``"batched"`` 0.50x and 0.34-0.37x (the work of ``#blocks`` full products per iteration against the few
above; vmapping buys no speed at 1 thread). So ``"per_block"`` is the default: the naive loop's products from one
first-order graph instead of one per block (its setup and the memory of the other graphs saved). ``"batched"`` is for
accelerators, where one wide call may beat many small ones; it has not been measured on a GPU.

Example::

    op = HessianOperator(model, None, [(x, y)])
    result = block_eigenvalues(op, k=2)
    result["0"].eigenvalues  # top-2 eigenvalues of the Hessian block of module "0"
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lit_act.hessian.lanczos import (
    WHICH,
    LanczosRecurrence,
    default_max_iter,
    make_generator,
    rademacher,
    ritz_test,
    select_ritz,
    tridiagonal_eigh,
)
from lit_act.hessian.operator import HessianOperator, math_attention, select_parameters
from lit_act.hessian.results import EigenResult, block_of

PRODUCTS = ("per_block", "batched")


def parameter_blocks(names: Sequence[str]) -> dict[str, list[str]]:
    """Group parameter names by the module owning them (``"<root>"`` for the model's own parameters), in order of
    first appearance: the block names of ``HessianOperator.blocks`` and of ``TraceResult.blocks``."""
    blocks: dict[str, list[str]] = {}
    for name in names:
        blocks.setdefault(block_of(name), []).append(name)
    return blocks


def block_sizes(model: nn.Module, params: Sequence[str] | None = None) -> dict[str, int]:
    """``{block: number of parameters}`` of the trainable parameters chosen by ``params`` (names or ``fnmatch``
    patterns, ``None`` = all), grouped as :func:`parameter_blocks`."""
    chosen = select_parameters(model, params)
    return {b: sum(chosen[n].numel() for n in names) for b, names in parameter_blocks(list(chosen)).items()}


def check_block_k(sizes: dict[str, int], k: int) -> None:
    """Raise ``ValueError`` naming the blocks of ``sizes`` (``{block: size}``) with fewer than ``k`` parameters."""
    small = {b: d for b, d in sizes.items() if d < k}
    if small:
        raise ValueError(f"k={k} is larger than block(s) {small} ({{block: number of parameters}}); k must be at most "
                         f"the smallest block's size ({min(sizes.values())}), or choose params without these blocks")


class _BlockLanczos:
    """One block's Lanczos run (the :class:`~lit_act.hessian.lanczos.LanczosRecurrence` of ``lanczos_steps`` and the
    stopping test of ``lanczos``), advanced from outside one product at a time."""

    def __init__(self, dim: int, k: int, which: str, max_iter: int, tol: float, seed: int,
                 op: HessianOperator) -> None:
        self.dim, self.k, self.which, self.tol, self.max_iter = dim, k, which, tol, max_iter
        generator = make_generator(seed)
        self.rec = LanczosRecurrence(rademacher((dim,), generator, op), max_iter, generator)
        self.done = False
        self.theta = self.s = self.chosen = self.residuals = self.converged = None

    @property
    def q(self) -> Tensor:
        return self.rec.q

    @property
    def j(self) -> int:
        return self.rec.j

    def advance(self, w: Tensor) -> None:
        """Take the step whose product ``w = H_BB q`` was computed; test convergence; prepare the next ``q``."""
        norm = self.rec.advance(w)
        if self.j >= self.k:
            self._test(norm)
        if self.done or self.j == self.max_iter:
            self.done = True
            return
        self.rec.next_vector()

    def _test(self, beta_next: float) -> None:
        """``min(r_i, r_i^2 / gap_i) <= tol |theta_i|`` for the chosen Ritz values, as in ``lanczos``."""
        j, k = self.j, self.k
        theta, s = tridiagonal_eigh(*self.rec.tridiagonal())
        chosen = select_ritz(theta, k, self.which)
        residuals, converged = ritz_test(theta, s, beta_next, chosen, self.tol)
        self.done = bool(converged.all()) or j == self.dim
        self.theta, self.s, self.chosen, self.residuals = theta, s, chosen, residuals
        self.converged = converged | (j == self.dim)

    def result(self, return_vectors: bool, seconds: float) -> EigenResult:
        vectors = None
        if return_vectors:
            vectors = (self.rec.basis[: self.j].T @ self.s[:, self.chosen].to(self.rec.basis.dtype)).contiguous()
        return EigenResult(eigenvalues=self.theta[self.chosen].clone(), eigenvectors=vectors,
                           residuals=self.residuals, converged=self.converged, iterations=self.j, matvecs=self.j,
                           seconds=seconds, which=self.which)


class BlockProducts:
    """``{block: v_B} -> {block: H_BB v_B}`` from the first-order graph of each batch of ``op``, kept for the object's
    life (rebuilt per call for the chunks a memory-bounded operator recomputes); batch-size weighted and summed over
    processes by ``op.all_reduce`` like :class:`HessianOperator`."""

    def __init__(self, op: HessianOperator, blocks: dict[str, list[str]], products: str) -> None:
        self.op, self.products = op, products
        self.params = select_parameters(op.model, op.names)
        self.blocks = blocks
        self.shapes = {n: p.shape for n, p in self.params.items()}
        self.weights = op.batch_weights
        # every batch's graph is kept for the whole pass, except chunks the operator recomputes to bound memory
        # (``chunk_size`` / ``memory_budget``): those are rebuilt once per lockstep iteration
        bounded = op.chunk_size is not None or op.chunk_plans is not None
        self.graphs = [self._graph(i) if op.keep_graph[i] or not bounded else None for i in range(len(op.batches))]

    def _graph(self, index: int) -> dict[str, Tensor]:
        return {n: g for n, g in zip(self.params, self.op.first_order(index)) if g is not None and g.requires_grad}

    def __call__(self, vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {b: torch.zeros_like(v) for b, v in vectors.items()}
        for index, (graph, weight) in enumerate(zip(self.graphs, self.weights)):
            graph = self._graph(index) if graph is None else graph
            part = self._batched(graph, vectors) if self.products == "batched" else self._per_block(graph, vectors)
            for b, t in part.items():
                out[b].add_(t, alpha=weight)
        if self.op.all_reduce is not None:
            flat = self.op.all_reduce(torch.cat(list(out.values())))
            out = dict(zip(out, flat.split([v.numel() for v in out.values()])))
        sums = torch.stack([t.sum() for t in out.values()])  # one sync per call; entries only if a sum is not finite
        if not bool(torch.isfinite(sums).all()) and not all(bool(torch.isfinite(t).all()) for t in out.values()):
            raise FloatingPointError("NaN/Inf in a block Hessian-vector product: the loss or its curvature is not "
                                     "finite at the current parameters (check for diverged training or NaN inputs)")
        for _ in out:
            self.op.matvecs += 1
            if self.op.on_matvec is not None:
                self.op.on_matvec(self.op.matvecs)
        return out

    def _pieces(self, block: str, v: Tensor) -> dict[str, Tensor]:
        names = self.blocks[block]
        return {n: t.view(self.shapes[n]) for n, t in zip(names, v.split([self.shapes[n].numel() for n in names]))}

    def _per_block(self, graph: dict[str, Tensor], vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for block, v in vectors.items():
            pieces = {n: t for n, t in self._pieces(block, v).items() if n in graph}
            names = self.blocks[block]
            hv: Sequence[Tensor | None] = [None] * len(names)
            if pieces:
                hv = torch.autograd.grad([graph[n] for n in pieces], [self.params[n] for n in names],
                                         list(pieces.values()), retain_graph=True, allow_unused=True)
            out[block] = torch.cat([torch.zeros(self.shapes[n].numel(), dtype=v.dtype, device=v.device)
                                    if h is None else h.reshape(-1) for n, h in zip(names, hv)])
        return out

    def _batched(self, graph: dict[str, Tensor], vectors: dict[str, Tensor]) -> dict[str, Tensor]:
        order = list(vectors)
        rows = {n: row for row, block in enumerate(order) for n in self.blocks[block]}
        pieces = {n: t for block, v in vectors.items() for n, t in self._pieces(block, v).items()}
        outputs, grad_outputs = [], []
        for name, piece in pieces.items():
            if name in graph:
                stacked = torch.zeros(len(vectors), *piece.shape, dtype=piece.dtype, device=piece.device)
                stacked[rows[name]] = piece
                outputs.append(graph[name])
                grad_outputs.append(stacked)
        hv: Sequence[Tensor | None] = [None] * len(pieces)
        if outputs:
            hv = torch.autograd.grad(outputs, [self.params[n] for n in pieces], grad_outputs, retain_graph=True,
                                     allow_unused=True, is_grads_batched=True)
        parts: dict[str, list[Tensor]] = {block: [] for block in vectors}
        for (name, piece), h in zip(pieces.items(), hv):
            row = rows[name]
            parts[order[row]].append(torch.zeros_like(piece).reshape(-1) if h is None else h[row].reshape(-1))
        return {block: torch.cat(p) for block, p in parts.items()}


def block_eigenvalues(op: HessianOperator, k: int = 1, which: str = "largest", max_iter: int | None = None,
                      tol: float = 1e-4, seed: int = 0, products: str = "per_block",
                      return_vectors: bool = False) -> dict[str, EigenResult]:
    """Top-``k`` eigenpairs of every diagonal block ``H_BB`` of ``op`` (one block per module owning chosen
    parameters), all Lanczos recurrences in lockstep on one cached first-order graph per batch (module docstring).

    Args:
        op: the Hessian operator (its model, batches, loss, chosen parameters and ``all_reduce``; the products
            always use cached graphs held for the duration of the call, whatever ``op.backend``).
        k: eigenpairs per block (``<=`` every block's size).
        which: ``"largest"`` (algebraic, default), ``"smallest"`` or ``"magnitude"``.
        max_iter: Lanczos steps at most per block; default ``min(dim_B, max(2k + 20, 60))`` as in ``lanczos``.
        tol: relative tolerance of the convergence test of ``lanczos``; each block stops once its own ``k`` pass.
        seed: seed of each block's private generator (start vector and restarts; the same for every block, so a
            block's recurrence is that of ``lanczos(block_operator, seed=seed)``).
        products: ``"per_block"`` (default, fastest measured on CPU) or ``"batched"`` (one vmapped double backward
            for all active blocks).
        return_vectors: also return each block's ``(dim_B, k)`` Ritz vectors.

    Returns:
        ``{block: EigenResult}`` in parameter order; ``matvecs``/``iterations`` count the block's own products,
        ``seconds`` is the wall time of the whole pass. ``op.matvecs`` grows by the number of block products.
    """
    if not isinstance(op, HessianOperator) or getattr(op, "curvature", "hessian") != "hessian":
        curvature = getattr(op, "curvature", type(op).__name__)
        raise ValueError(f"block_eigenvalues needs the Hessian (a HessianOperator), got curvature {curvature!r}; "
                         "valid: ['hessian']")
    if which not in WHICH:
        raise ValueError(f"unknown which={which!r}; valid: {list(WHICH)}")
    if products not in PRODUCTS:
        raise ValueError(f"unknown products={products!r}; valid: {list(PRODUCTS)}")
    if tol <= 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if max_iter is not None and max_iter < k:
        raise ValueError(f"max_iter ({max_iter}) must be >= k ({k})")
    blocks = parameter_blocks(op.names)
    dims = block_sizes(op.model, op.names)
    check_block_k(dims, k)
    steps = {b: default_max_iter(d, k) if max_iter is None else min(d, max_iter) for b, d in dims.items()}
    start = time.perf_counter()
    with math_attention():
        engine = BlockProducts(op, blocks, products)
        runs = {b: _BlockLanczos(dims[b], k, which, steps[b], tol, seed, op) for b in blocks}
        active = list(runs)
        while active:
            images = engine({b: runs[b].q for b in active})
            for b in active:
                runs[b].advance(images[b])
            active = [b for b in active if not runs[b].done]
    seconds = time.perf_counter() - start
    return {b: run.result(return_vectors, seconds) for b, run in runs.items()}
