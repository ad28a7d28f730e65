"""Batch chunking of the Hessian operator and the one-pass Lanczos + trace, against dense Hessians."""

from __future__ import annotations

import dataclasses
import math
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_act.hessian.curvature import GGNOperator
from lit_act.hessian.krylov_trace import lanczos_trace
from lit_act.hessian.operator import HessianOperator, batch_size, chunk_batch
from lit_act.models import TransformerLM
from tests.dense import dense_ggn, dense_hessian

torch.set_num_threads(1)


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def data(n: int = 10, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


@dataclasses.dataclass
class Batch:
    inputs: torch.Tensor
    labels: torch.Tensor
    tag: str = "train"


Pair = namedtuple("Pair", ["inputs", "labels"])


def tuple_loss(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


def dict_loss(module, batch):
    return F.cross_entropy(module(batch["inputs"]), batch["labels"])


def dataclass_loss(module, batch):
    assert batch.tag == "train"  # non-tensor fields are shared by every chunk
    return F.cross_entropy(module(batch.inputs), batch.labels)


@pytest.mark.parametrize(("kind", "backend"), [("tuple", "cached"), ("tuple", "reverse"), ("tuple", "forward"),
                                               ("dict", "cached"), ("dataclass", "cached"), ("namedtuple", "reverse")])
def test_chunked_operator_equals_dense_hessian(backend, kind):
    model = small_mlp()
    x, y = data(10)
    batch, loss_fn = {
        "tuple": ((x, y), tuple_loss),
        "dict": ({"inputs": x, "labels": y}, dict_loss),
        "dataclass": (Batch(x, y), dataclass_loss),
        "namedtuple": (Pair(x, y), tuple_loss),
    }[kind]
    dense = dense_hessian(model, [(x, y)], "cross_entropy")
    op = HessianOperator(model, loss_fn, [batch], backend=backend, chunk_size=4)  # chunks of 4, 4 and 2 examples
    assert len(op.batches) == 3 and [batch_size(b) for b in op.batches] == [4, 4, 2]
    assert not op.caching
    torch.testing.assert_close(op.matmat(torch.eye(op.dim, dtype=torch.float64)), dense, rtol=1e-10, atol=1e-12)


def test_chunked_ggn_operator_keeps_no_chunk_graph_and_equals_dense_ggn():
    """``chunk_size`` bounds a GGN product's memory as a Hessian one's: each chunk's Jacobian graph is rebuilt per
    product, none kept; ``memory_budget`` (planned from Hessian costs) is refused with the fix."""
    model = small_mlp()
    x, y = data(10)
    op = GGNOperator(model, tuple_loss, [(x, y)], curvature="ggn", loss="cross_entropy", chunk_size=4)
    products = op.matmat(torch.eye(op.dim, dtype=torch.float64))
    assert [batch_size(b) for b in op.batches] == [4, 4, 2] and op._graphs == {}
    torch.testing.assert_close(products, dense_ggn(model, [(x, y)], "cross_entropy"), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="bound the memory with chunk_size"):
        GGNOperator(model, tuple_loss, [(x, y)], curvature="ggn", loss="cross_entropy", memory_budget=3.0)


def test_chunks_across_several_batches_weight_by_examples():
    """Two batches of 7 and 3 examples, chunks of 3 (3, 3, 1 and 3): still the mean over all 10 examples."""
    model = small_mlp()
    x, y = data(10)
    dense = dense_hessian(model, [(x, y)], "cross_entropy")
    op = HessianOperator(model, tuple_loss, [(x[:7], y[:7]), (x[7:], y[7:])], chunk_size=3)
    assert [batch_size(b) for b in op.batches] == [3, 3, 1, 3]
    torch.testing.assert_close(op.matmat(torch.eye(op.dim, dtype=torch.float64)), dense, rtol=1e-10, atol=1e-12)


def test_a_single_chunk_keeps_the_cached_graph():
    model = small_mlp()
    x, y = data(6)
    op = HessianOperator(model, tuple_loss, [(x, y)], chunk_size=8)
    assert op.caching and len(op.batches) == 1
    torch.testing.assert_close(op.matmat(torch.eye(op.dim, dtype=torch.float64)),
                               dense_hessian(model, [(x, y)], "cross_entropy"),
                               rtol=1e-10, atol=1e-12)


def test_batch_size_and_chunk_batch_containers():
    x, y = data(5)
    assert batch_size(Batch(x, y)) == 5
    assert batch_size({"meta": [], "inputs": x}) == 5
    assert batch_size((torch.tensor(3.0), x)) == 5  # a 0-d tensor carries no example dimension
    mask = torch.ones(7)  # a tensor without the example dimension is shared, not sliced
    chunks = chunk_batch({"inputs": x, "labels": y, "mask": mask, "name": "a"}, 2)
    assert [c["inputs"].shape[0] for c in chunks] == [2, 2, 1]
    assert all(c["mask"] is mask and c["name"] == "a" for c in chunks)
    torch.testing.assert_close(torch.cat([c["labels"] for c in chunks]), y)
    parts = chunk_batch(Batch(x, y, tag="t"), 3)
    assert [type(p) for p in parts] == [Batch, Batch] and parts[1].tag == "t" and parts[1].inputs.shape[0] == 2
    assert isinstance(chunk_batch(Pair(x, y), 2)[0], Pair)
    assert chunk_batch((x, y), 5) == [(x, y)]
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        chunk_batch((x, y), 0)
    with pytest.raises(TypeError, match="cannot infer the batch size"):
        batch_size({"name": "no tensor"})


def test_chunked_callback_batches_through_the_batch_adapter():
    """A dict batch as the HessianSpectrum callback passes it (AdaptedLoss: module(**batch), then .loss)."""
    from lit_act.batch import BatchAdapter
    from lit_act.callbacks.hessian import AdaptedLoss

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_mlp()

        def forward(self, inputs, labels):
            return {"loss": F.cross_entropy(self.net(inputs), labels)}

    model = WithLoss()
    x, y = data(9)
    op = HessianOperator(model, AdaptedLoss(BatchAdapter()), [{"inputs": x, "labels": y}], chunk_size=4)
    torch.testing.assert_close(op.matmat(torch.eye(op.dim, dtype=torch.float64)),
                               dense_hessian(model.net, [(x, y)], "cross_entropy"),
                               rtol=1e-10, atol=1e-12)


def tiny_lm(seed: int = 0) -> tuple[TransformerLM, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(seed)
    model = TransformerLM(vocab_size=7, block_size=6, d_model=8, n_layer=1, n_head=2).double().eval()
    gen = torch.Generator().manual_seed(seed)
    return model, (torch.randint(0, 7, (5, 6), generator=gen), torch.randint(0, 7, (5, 6), generator=gen))


def test_transformer_lm_chunked_products_equal_unchunked():
    """lit-act TransformerLM (SDPA attention, math backend under the operator): the mean token loss with equal
    lengths per example, so chunking is exact (in float64: ``TransformerLM.loss`` computes in float32)."""
    model, batch = tiny_lm()

    def loss_fn(module, b):
        return F.cross_entropy(module(b[0]).reshape(-1, 7), b[1].reshape(-1))

    whole = HessianOperator(model, loss_fn, [batch])
    chunked = HessianOperator(model, loss_fn, [batch], chunk_size=2)
    vs = torch.randn(whole.dim, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(chunked.matmat(vs), whole.matmat(vs), rtol=1e-9, atol=1e-11)


def test_transformer_encoder_layer_dict_batch_chunked_equals_unchunked():
    """nn.TransformerEncoderLayer (fused fast path off in training-free eval: SDPA under the math backend), dict
    batches, uneven chunks (2, 2, 1); the unchunked operator is itself checked against dense Hessians above."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=4, nhead=2, dim_feedforward=6, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(12, 2)).double().eval()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64), torch.randint(0, 2, (5,), generator=gen)

    def loss_fn(module, batch):
        return F.cross_entropy(module(batch["src"]), batch["y"])

    whole = HessianOperator(model, loss_fn, [{"src": x, "y": y}])
    chunked = HessianOperator(model, loss_fn, [{"src": x, "y": y}], chunk_size=2)
    vs = torch.randn(whole.dim, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(chunked.matmat(vs), whole.matmat(vs), rtol=1e-9, atol=1e-12)
    # and the chunk weights by hand: (2 H_1 + 2 H_2 + 1 H_3) / 5 from three single-chunk operators
    parts = [HessianOperator(model, loss_fn, [c]).matmat(vs) * batch_size(c) for c in chunked.batches]
    torch.testing.assert_close(chunked.matmat(vs), sum(parts) / 5, rtol=1e-9, atol=1e-12)


def test_lanczos_trace_against_dense_eigenvalues_and_trace():
    model = small_mlp()
    x, y = data(40)
    dense = dense_hessian(model, [(x, y)], "cross_entropy")
    eigs = torch.linalg.eigvalsh(dense)
    op = HessianOperator(model, tuple_loss, [(x, y)])
    res = lanczos_trace(op, k=3, tol=1e-8, max_iter=45, probes=16, smallest=True, seed=3)
    assert res.top.matvecs + res.trace.matvecs == res.matvecs == op.matvecs
    assert res.top.iterations < op.dim  # stopped by the convergence test, not by spanning everything
    torch.testing.assert_close(res.top.eigenvalues, eigs.flip(0)[:3], rtol=1e-6, atol=1e-9)
    assert bool(res.top.converged.all()) and bool(res.smallest.converged.all())
    torch.testing.assert_close(res.smallest.eigenvalues, eigs[:1], rtol=1e-6, atol=1e-9)
    # the top eigenvectors satisfy H v = lambda v
    vec = res.top.eigenvectors[:, 0]
    torch.testing.assert_close(dense @ vec, res.top.eigenvalues[0] * vec, rtol=0, atol=1e-5 * float(eigs.abs().max()))
    exact = float(dense.trace())
    assert res.trace.std_error > 0 and res.trace.matvecs == 16
    # a z-test at 4 standard errors (fixed seed): the deflated Hutchinson remainder is unbiased given the basis
    assert abs(res.trace.estimate - exact) <= 4 * res.trace.std_error
    # the Krylov part alone is tr(Q^T H Q) = tr(T), computed independently from the dense Hessian would need Q;
    # the per-block traces add up to the estimate
    assert sum(res.trace.blocks.values()) == pytest.approx(res.trace.estimate, rel=1e-9)


def test_lanczos_trace_standard_error_is_calibrated():
    """Over seeds, the z-scores (estimate - exact) / SE have a spread of about one (Student t with 7 dof)."""
    model = small_mlp()
    x, y = data(40)
    exact = float(dense_hessian(model, [(x, y)], "cross_entropy").trace())
    op = HessianOperator(model, tuple_loss, [(x, y)])
    z = torch.tensor([(r.trace.estimate - exact) / r.trace.std_error
                      for r in (lanczos_trace(op, k=1, tol=1e-2, max_iter=6, probes=8, seed=s) for s in range(30))])
    assert abs(float(z.mean())) < 3 / 30 ** 0.5 * 1.2  # the mean z of an unbiased estimator, 3 sigma
    assert 0.6 < float(z.std()) < 1.6


def test_lanczos_trace_exact_when_the_basis_spans_everything_and_slq_weights():
    model = small_mlp()
    x, y = data(12)
    dense = dense_hessian(model, [(x, y)], "cross_entropy")
    op = HessianOperator(model, tuple_loss, [(x, y)])
    # the Krylov space becomes invariant (the Hessian of 12 examples is rank deficient): P H P = 0, an exact trace
    res = lanczos_trace(op, k=2, tol=1e-300, max_iter=op.dim, probes=5)
    assert res.trace.std_error <= 1e-12 * abs(float(dense.trace()))
    assert res.trace.estimate == pytest.approx(float(dense.trace()), rel=1e-9)
    assert res.random_start and float(res.weights.sum()) == pytest.approx(1.0, rel=1e-9)
    warm = lanczos_trace(op, k=1, probes=4, v0=res.top.eigenvectors[:, 0])
    assert not warm.random_start and warm.top.iterations <= 3
    with pytest.raises(ValueError, match="probes must be an integer >= 0"):
        lanczos_trace(op, probes=-1)


def test_callback_default_evaluation_on_a_tiny_lm_chunked_and_not():
    """HessianSpectrum's one-pass evaluation on a TransformerLM: chunked batches give the same metrics (one pass from
    the same seed on the same operator), the top eigenvalues match a separate tight Lanczos run, and the trace agrees
    with Hutchinson within the reported standard errors."""
    from lit_act.callbacks import HessianConfig, HessianSpectrum
    from lit_act.hessian import hutchinson, lanczos

    model, batch = tiny_lm()
    model = model.float()
    whole, _ = HessianSpectrum(progress=False, save_density_figure=False,
                               config=HessianConfig(trace_budget=20)).compute(model, [batch])
    chunked, _ = HessianSpectrum(progress=False, save_density_figure=False,
                                 config=HessianConfig(trace_budget=20, chunk_size=2)).compute(model, [batch])
    keys = [k for k in whole if not k.endswith(("seconds", "matvecs"))]
    for key in keys:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-3, abs=1e-5), key
    op = HessianOperator(model, None, [batch])
    ref = lanczos(op, k=3, tol=1e-8, max_iter=200, return_vectors=False).eigenvalues
    for i in range(3):
        assert whole[f"train/hessian/eig_{i + 1}"] == pytest.approx(float(ref[i]), rel=1e-3)
    check = hutchinson(op, 60, seed=7)
    gap = abs(whole["train/hessian/trace"] - check.estimate)
    assert gap <= 4 * (whole["train/hessian/trace_se"] ** 2 + check.std_error ** 2) ** 0.5


@pytest.mark.parametrize("curvature", ["ggn", "empirical_fisher"])
def test_chunked_ggn_and_empirical_fisher_equal_unchunked(curvature):
    from lit_act.hessian import curvature_operator

    model = small_mlp()
    x, y = data(10)
    whole = curvature_operator(model, tuple_loss, [(x, y)], curvature=curvature, loss="cross_entropy")
    chunked = curvature_operator(model, tuple_loss, [(x, y)], curvature=curvature, loss="cross_entropy",
                                 chunk_size=4)
    eye = torch.eye(whole.dim, dtype=torch.float64)
    torch.testing.assert_close(chunked.matmat(eye), whole.matmat(eye), rtol=1e-10, atol=1e-13)


def test_auto_trace_on_an_uncovered_model(monkeypatch):
    """``trace_method="auto"`` on a Transformer (attention is outside the exact rules): the Hessian's trace is the
    covered LM head exactly plus the interleaved estimator on the rest (one ``trace(method="auto")`` per evaluation,
    the same numbers as calling it directly); for the GGN the exact rules are tried once per fit, then the pass's
    Krylov trace is used."""
    import lit_act.callbacks.hessian as module
    from lit_act.callbacks import HessianConfig, HessianSpectrum
    from lit_act.hessian import trace

    calls = []
    real_trace = module.trace

    def counting_trace(*args, **kwargs):
        calls.append(args[2] if len(args) > 2 else kwargs.get("method"))
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(module, "trace", counting_trace)
    model, batch = tiny_lm()
    model = model.float()
    callback = HessianSpectrum(progress=False, save_density_figure=False, config=HessianConfig(trace_budget=8,
                               slq_iter=0))
    first, _ = callback.compute(model, [batch])
    second, _ = callback.compute(model, [batch])
    assert calls == ["auto", "auto"]
    direct = trace(HessianOperator(model, None, [batch]), 8, method="auto", seed=callback.config.seed + 2)
    assert direct.method == "control_variate+interleaved" and direct.std_error > 0
    for metrics in (first, second):
        assert metrics["train/hessian/trace"] == pytest.approx(direct.estimate, rel=1e-6)
        assert metrics["train/hessian/trace_se"] == pytest.approx(direct.std_error, rel=1e-6)
    calls.clear()
    ggn = HessianSpectrum(progress=False, save_density_figure=False, config=HessianConfig(trace_budget=4,
                          slq_iter=0, curvature="ggn"))
    for _ in range(2):
        metrics, _ = ggn.compute(model, [batch])
        assert math.isfinite(metrics["train/hessian/trace"]) and metrics["train/hessian/trace_se"] > 0  # Krylov
    assert calls == ["exact"]  # one attempt, which raised; no retry at the second evaluation
