"""lit_act.hessian vs PyHessian 0.1 (PyPI) on a 784-256-256-10 ReLU MLP, one random batch of 256, CPU, 1 thread.

Run: ``.venv/bin/python -m benchmarks.bench_hessian`` (PyHessian: ``.venv/bin/pip install --no-deps pyhessian``;
its side is skipped with a message when it cannot be imported).

1. Top-1 eigenvalue: PyHessian's default power iteration (tol 1e-3, maxIter 100) vs our Lanczos (tol 1e-4), 10
   seeds. Reference: Lanczos in float64 run to a residual below 1e-9 relative. Ratios of median wall time and
   median relative error; also PyHessian tightened to tol 1e-6 (what it needs to approach our accuracy).
2. Trace at an equal matvec budget: for each of 10 seeds, PyHessian's Hutchinson runs with its stop rule and our
   Hutch++ gets exactly as many matvecs. Exact reference: for a network that is piecewise linear in every single
   parameter (ReLU MLP), the second derivative of the logits w.r.t. any one parameter is 0 almost everywhere, so
   diag(H) = diag(GGN) and tr(H) = (1/B) sum_n sum_c p_nc ||J_n^T (e_c - p_n)||^2 with per-example Jacobian-vector
   products (checked against the dense Hessian of a small ReLU MLP below).
3. Density: our SLQ (2 runs x 64 steps) runs; PyHessian's ``density`` outcome is printed.
"""

from __future__ import annotations

import importlib
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from lit_act.hessian import HessianOperator, hutchinson, hutchpp, lanczos, slq

SEEDS = range(10)


def mlp(widths=(784, 256, 256, 10), seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def ce_loss(module: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


def exact_relu_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 32) -> float:
    """tr(H) = tr(GGN) for piecewise-linear networks (module docstring), in float64."""
    model = model.double()
    params = {n: p.detach() for n, p in model.named_parameters()}
    probs = F.softmax(model(x.double()), dim=-1).detach()

    def contracted(p, xi, ui):
        return (functional_call(model, p, (xi[None],))[0] * ui).sum()

    per_example = vmap(grad(contracted), in_dims=(None, 0, 0))
    total = 0.0
    eye = torch.eye(probs.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        xs, ps = x[start:start + chunk].double(), probs[start:start + chunk]
        for c in range(probs.shape[1]):
            g = per_example(params, xs, eye[c] - ps)
            sq = sum(t.reshape(t.shape[0], -1).square().sum(1) for t in g.values())
            total += float((ps[:, c] * sq).sum())
    model.float()
    return total / x.shape[0]


def check_trace_identity() -> tuple[float, float]:
    """Relative gap between the GGN-diagonal trace and the dense Hessian trace on a small ReLU MLP, and on the same
    MLP with tanh (a negative control: there the identity must fail)."""
    gaps = []
    for activation in (nn.ReLU, nn.Tanh):
        model = mlp((12, 9, 7, 4), seed=3)
        model[1], model[3] = activation(), activation()
        x, y = torch.randn(40, 12), torch.randint(0, 4, (40,))
        dense = HessianOperator(model.double(), ce_loss, [(x.double(), y)], backend="reverse")
        exact = float(dense.matmat(torch.eye(dense.dim, dtype=torch.float64)).trace())
        gaps.append(abs(exact_relu_trace(model.float(), x, y) - exact) / abs(exact))
    return gaps[0], gaps[1]


def median(values) -> float:
    return statistics.median(values)


def load_pyhessian():
    try:  # `pyhessian.hessian` the attribute is the class (package __init__ re-exports it): fetch the module
        module = importlib.import_module("pyhessian.hessian")
    except Exception as err:  # noqa: BLE001 -- any import failure skips its side
        print(f"PyHessian unavailable ({type(err).__name__}: {err}); install with "
              "`.venv/bin/pip install --no-deps pyhessian`. Reporting our side only.")
        return None
    calls = {"n": 0}
    original = module.hessian_vector_product

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    module.hessian_vector_product = counted
    return module, calls


def main() -> None:
    torch.set_num_threads(1)
    model = mlp()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 784, generator=gen), torch.randint(0, 10, (256,), generator=gen)
    batch = [(x, y)]
    print(f"784-256-256-10 ReLU MLP ({sum(p.numel() for p in model.parameters()):,} params), batch 256, "
          "CPU, 1 thread")

    # reference top eigenvalue: float64 Lanczos to a tiny residual
    ref_model = mlp().double()
    ref_op = HessianOperator(ref_model, ce_loss, [(x.double(), y)], backend="cached")
    ref = lanczos(ref_op, k=1, tol=1e-9, max_iter=200, return_vectors=False)
    lam = float(ref.eigenvalues[0])
    print(f"reference lambda_max = {lam:.8f} (float64 Lanczos, {ref.iterations} steps, converged="
          f"{bool(ref.converged.all())}, residual/lambda = {float(ref.residuals[0]) / lam:.1e})")
    del ref_op, ref_model

    # ---------------------------------------------------------------- (1) top-1 eigenvalue
    py = load_pyhessian()

    def ours_top1(seed, backend):
        start = time.perf_counter()
        op = HessianOperator(model, ce_loss, batch, backend=backend)
        res = lanczos(op, k=1, tol=1e-4, seed=seed, return_vectors=False)
        return (time.perf_counter() - start, abs(float(res.eigenvalues[0]) - lam) / lam, res.matvecs,
                bool(res.converged.all()))

    def pyhessian_top1(seed, **kwargs):
        module, calls = py
        model.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        calls["n"] = 0
        start = time.perf_counter()
        values, _ = module.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False).eigenvalues(**kwargs)
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return elapsed, abs(values[0] - lam) / lam, calls["n"], None

    runners = {"ours (cached)": lambda s: ours_top1(s, "cached"), "ours (forward)": lambda s: ours_top1(s, "forward")}
    if py is not None:
        runners["PyHessian (default)"] = pyhessian_top1
        runners["PyHessian (tol=1e-6)"] = lambda s: pyhessian_top1(s, tol=1e-6, maxIter=1000)
    rows: dict[str, list] = {label: [] for label in runners}
    for seed in SEEDS:  # interleaved, so machine noise hits every method alike
        for label, run in runners.items():
            rows[label].append(run(seed))
    summary = {label: (median(r[0] for r in rs), median(r[1] for r in rs)) for label, rs in rows.items()}
    for label, rs in rows.items():
        converged = "" if rs[0][3] is None else f", converged {sum(r[3] for r in rs)}/{len(rs)}"
        print(f"{label:21s} top-1: median {summary[label][0]:.3f} s, median rel err {summary[label][1]:.1e}, "
              f"max rel err {max(r[1] for r in rs):.1e}, median {median(r[2] for r in rs)} HVPs{converged}")
    for py_label in [label for label in runners if label.startswith("PyHessian")]:
        for ours_label in ("ours (cached)", "ours (forward)"):
            (t_py, e_py), (t_ours, e_ours) = summary[py_label], summary[ours_label]
            print(f"  RATIO {py_label} / {ours_label}: wall time {t_py / t_ours:.2f}x (goal >= 3), "
                  f"error {e_py / e_ours:.0f}x (goal >= 100)")

    # ---------------------------------------------------------------- (2) trace at equal budget
    relu_gap, tanh_gap = check_trace_identity()
    print(f"trace identity tr(H) = tr(GGN) on a small MLP: relative gap {relu_gap:.1e} with ReLU, "
          f"{tanh_gap:.1e} with tanh (control: must be clearly non-zero)")
    start = time.perf_counter()
    exact_trace = exact_relu_trace(model, x, y)
    print(f"exact trace = {exact_trace:.6f} ({time.perf_counter() - start:.1f} s)")
    op = HessianOperator(model, ce_loss, batch, backend="cached")
    estimators = {"hutchpp": hutchpp, "hutchinson": hutchinson}
    if py is not None:
        module, _ = py
        trace_rows = []
        for seed in SEEDS:
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            vhv = module.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False).trace()
            model.zero_grad(set_to_none=True)
            budget = len(vhv)
            errors = {"PyHessian": abs(sum(vhv) / budget - exact_trace) / exact_trace}
            for name, estimator in estimators.items():
                est = estimator(op, budget, seed=seed) if budget >= 3 else hutchinson(op, budget, seed=seed)
                errors[name] = abs(est.estimate - exact_trace) / exact_trace
            trace_rows.append((budget, errors))
        print(f"trace at per-seed equal budgets (PyHessian's stop rule picks them): {[r[0] for r in trace_rows]}")
        for name in ("PyHessian", *estimators):
            errs = [r[1][name] for r in trace_rows]
            print(f"  {name:10s}: median rel err {median(errs):.2%}, max {max(errs):.2%}, "
                  f"rms {statistics.fmean(e * e for e in errs) ** 0.5:.2%}")
        for name in estimators:
            ratio = median(r[1][name] for r in trace_rows) / median(r[1]["PyHessian"] for r in trace_rows)
            print(f"  RATIO median error ours ({name}) / PyHessian = {ratio:.2f} (goal <= 0.5)")
        fixed = round(median(r[0] for r in trace_rows))
    else:
        fixed = 40
    for budget in sorted({fixed, 100}):
        for name, estimator in estimators.items():
            results = [estimator(op, budget, seed=seed) for seed in SEEDS]
            errs = [abs(r.estimate - exact_trace) / exact_trace for r in results]
            covered = sum(abs(r.estimate - exact_trace) <= 2 * r.std_error for r in results)
            print(f"ours {name:10s} at a fixed budget of {budget}: median rel err {median(errs):.2%}, median "
                  f"relative SE {median(r.std_error for r in results) / exact_trace:.2%}, "
                  f"|err| <= 2 SE in {covered}/{len(results)}")

    # ---------------------------------------------------------------- (3) density
    start = time.perf_counter()
    density = slq(op, num_iter=64, runs=2)
    print(f"ours SLQ density: 2 runs x 64 steps in {time.perf_counter() - start:.2f} s, node range "
          f"[{float(density.nodes.min()):.4f}, {float(density.nodes.max()):.4f}]")
    if py is not None:
        module, _ = py
        model.zero_grad(set_to_none=True)
        try:
            module.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False).density(iter=64, n_v=1)
            print("PyHessian density: ran")
        except Exception as err:  # noqa: BLE001 -- report whatever PyHessian raises
            print(f"PyHessian density: crashed with {type(err).__name__}: {err}")
        model.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
