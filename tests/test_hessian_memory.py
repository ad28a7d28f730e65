"""Memory-bounded Hessian-vector products: the tensor-memory meter, the chunk planner, and operators that keep some
chunks' graphs and recompute the others, against dense Hessians and independently measured peaks."""

from __future__ import annotations

import pytest
import torch
from lightning import Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_act.callbacks.hessian import HessianSpectrum
from lit_act.callbacks.hessian_config import HessianConfig
from lit_act.hessian import block_eigenvalues
from lit_act.hessian.memory import ChunkPlan, LinearCost, ProductCosts, TensorMemory, plan_chunks
from lit_act.hessian.operator import HessianOperator, math_attention
from lit_act.models import TransformerLM
from tests.dense import dense_hessian, loss_fn_of
from tests.test_hessian_transformer import small_mlp

torch.set_num_threads(1)
F32 = 4  # bytes


def test_tensor_memory_counts_allocations_not_views_and_frees():
    a = torch.ones(1000)  # allocated outside the mode: not counted
    with TensorMemory() as mem:
        b = a * 2  # 4000 bytes
        view = b[10:20].view(2, 5)  # shares b's storage
        b.add_(1)  # in place
        assert mem.current == 1000 * F32
        c = torch.empty(500)  # 2000 more
        assert mem.current == mem.peak == 1500 * F32
        del b
        assert mem.current == 1500 * F32  # b's storage lives on in the view
        del view, c
        assert mem.current == 0
        d = (a + 1) * 3  # a temporary of 4000 bytes and d: peak 8000 above zero
    assert mem.peak == 2000 * F32 and mem.current == 1000 * F32 and d.numel() == 1000


def test_tensor_memory_sees_the_backward_pass():
    """y = (W x).square().sum() for W (64, 32), x (32, 8): the backward allocates at least the weight gradient."""
    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(32, 8)
    with TensorMemory() as forward:
        y = (w @ x).square().sum()
    assert forward.current == (64 * 8 + 1) * F32  # w @ x, saved for square's backward, and y
    with TensorMemory() as backward:
        (g,) = torch.autograd.grad(y, [w])
    assert forward.current == F32  # the backward freed the saved product; y remains
    assert backward.current == g.numel() * F32 and backward.peak >= g.numel() * F32 + 64 * 8 * F32


def costs(n: int, backward: float = 1.0, graph: float = 2.5, cached: float = 4.4, fresh: float = 3.5,
          intercept: float = 0.0) -> ProductCosts:
    line = lambda slope: LinearCost(intercept, slope)  # noqa: E731
    return ProductCosts(n, intercept + backward * n, line(graph), line(cached), line(fresh))


def test_plan_keeps_what_fits_and_recomputes_the_rest():
    """Per example: backward 1, kept graph 2.5, cached product 4.4 (transient 1.9), recomputed product 3.5; batch 16,
    budget 3 -> limit 48. Whole and cached: 40 + 30.4 > 48. Head h: 2.5 h + max(3.5, 1.9 h) <= 48 -> h = 10 (44;
    h = 11 gives 48.4). Rest 6: 25 + 3.5 c <= 48 -> c <= 6.57, one chunk of 6. Peak 25 + max(19, 21) = 46."""
    (plan,) = plan_chunks([costs(16)], 3.0)
    assert plan.sizes == (10, 6) and plan.cached == (True, False)
    assert plan.limit == 48.0 and plan.peak == pytest.approx(46.0)


def test_plan_keeps_a_batch_whole_when_it_fits_and_splits_evenly():
    (whole,) = plan_chunks([costs(16)], 4.5)  # 40 + 30.4 = 70.4 <= 72
    assert whole.sizes == (16,) and whole.cached == (True,) and whole.peak == pytest.approx(70.4)
    (tight,) = plan_chunks([costs(16)], 2.0)  # limit 32: h = 7 (17.5 + 13.3 = 30.8), 9 left: 17.5 + 3.5c <= 32, c = 4
    assert tight.sizes == (7, 3, 3, 3) and tight.cached == (True, False, False, False)


def test_plan_over_two_batches_counts_every_kept_graph():
    """Batch A (16) keeps h_A = 10 (graph 25); batch B (8): 25 + 2.5 h + max(3.5, 19, 1.9 h) <= 48 -> h = 1 (27.5 +
    19 = 46.5; h = 2: 49); B's 7 others beside 27.5 kept: 27.5 + 3.5 c <= 48 -> c = 5, chunks 4 and 3; A's 6 others:
    chunks of at most 5 -> 3 and 3."""
    plan_a, plan_b = plan_chunks([costs(16), costs(8)], 3.0)
    assert plan_a.sizes == (10, 3, 3) and plan_b.sizes == (1, 4, 3)
    assert plan_a.cached == (True, False, False) and plan_b.cached == (True, False, False)
    assert plan_a.peak == plan_b.peak == pytest.approx(27.5 + max(19, 1.9, 3.5 * 4))


def test_plan_where_parameter_sized_buffers_dominate():
    """Intercept 40 everywhere, batch 4: backward 44. Budget 1.0 (limit 44): no graph fits beside a recomputed
    example (40 + 2.5 + 43.5), recomputed chunks of 1 do (43.5). Budget 0.9 (limit 39.6): nothing fits, one-example
    chunks, and the plan's peak says by how much it misses."""
    (plan,) = plan_chunks([costs(4, intercept=40.0)], 1.0)
    assert plan.sizes == (1, 1, 1, 1) and plan.cached == (False,) * 4 and plan.peak == pytest.approx(43.5)
    (plan,) = plan_chunks([costs(4, intercept=40.0)], 0.9)
    assert plan.sizes == (1, 1, 1, 1) and plan.peak == pytest.approx(43.5) and plan.limit == pytest.approx(39.6)
    with pytest.raises(ValueError, match="memory_budget must be a positive"):
        plan_chunks([costs(4)], 0.0)


def test_partly_cached_operator_equals_the_dense_hessian():
    """The first 4 examples' graph kept, the other 6 recomputed in chunks of 3, over three products."""
    model = small_mlp()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (10,), generator=gen)
    loss = loss_fn_of("cross_entropy")
    plan = ChunkPlan((4, 3, 3), (True, False, False), 0.0, 0.0)
    op = HessianOperator(model, loss, [(x, y)], chunk_plans=[plan])
    assert op.keep_graph == [True, False, False] and not op.caching
    dense = dense_hessian(model, [(x, y)], "cross_entropy")
    for _ in range(3):
        torch.testing.assert_close(op.matmat(torch.eye(op.dim, dtype=torch.float64)), dense, rtol=1e-10,
                                   atol=1e-12)
    assert list(op._graphs) == [0]  # only the kept chunk's graph is held
    blocks = block_eigenvalues(op, k=1, tol=1e-10)
    for name, result in blocks.items():
        owners = [n.rsplit(".", 1)[0] for n, p in model.named_parameters() for _ in range(p.numel())]
        index = [i for i, owner in enumerate(owners) if owner == name]
        block = dense[index][:, index]
        assert float(result.eigenvalues[0]) == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-6)


def tiny_lm() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=17, block_size=32, d_model=16, n_layer=1, n_head=2).eval()  # fit() trains it
    gen = torch.Generator().manual_seed(1)
    return model, (torch.randint(0, 17, (16, 32), generator=gen), torch.randint(0, 17, (16, 32), generator=gen))


def test_memory_budget_on_a_transformer_lm_bounds_the_measured_peak_and_keeps_the_operator():
    model, batch = tiny_lm()
    with TensorMemory() as backward:
        torch.autograd.grad(model.loss(model(batch[0]), batch[1]), list(model.parameters()))
    dim = sum(p.numel() for p in model.parameters())
    v = torch.randn(dim, generator=torch.Generator().manual_seed(2))
    with TensorMemory() as default:
        HessianOperator(model, None, [batch]).matvec(v)
    assert default.peak > 3.5 * backward.peak  # the whole cached batch: over the budget below

    op = HessianOperator(model, None, [batch], memory_budget=3.0)
    (plan,) = op.chunk_plans
    assert len(plan.sizes) > 1 and plan.cached[0] and not any(plan.cached[1:]) and sum(plan.sizes) == 16
    with TensorMemory() as bounded:
        planned = HessianOperator(model, None, [batch], chunk_plans=op.chunk_plans)
        first = planned.matvec(v)
        second = planned.matvec(v)
    assert bounded.peak <= 3.0 * backward.peak
    assert plan.peak == pytest.approx(bounded.peak, rel=0.02)  # the plan records the peak it measured

    loss = model.loss  # the same operator: against autograd's own Hessian-vector product of the whole batch
    params = dict(model.named_parameters())

    def whole(*values):
        out = torch.func.functional_call(model, dict(zip(params, values)), (batch[0],))
        return loss(out, batch[1])

    with math_attention():
        _, reference = torch.autograd.functional.hvp(whole, tuple(p.detach() for p in params.values()),
                                                     tuple(planned.split(v).values()))
    expected = torch.cat([r.reshape(-1) for r in reference])
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(second, first)


def test_memory_budget_errors_and_the_warning_when_it_cannot_be_met():
    model, batch = tiny_lm()
    with pytest.raises(ValueError, match="give one of chunk_size, memory_budget and chunk_plans"):
        HessianOperator(model, None, [batch], chunk_size=4, memory_budget=3.0)
    with pytest.raises(ValueError, match="backend='reverse'"):
        HessianOperator(model, None, [batch], backend="reverse", memory_budget=3.0)
    with pytest.raises(ValueError, match="do not fit batches of \\[16\\]"):
        HessianOperator(model, None, [batch], chunk_plans=[ChunkPlan((4, 4), (True, False), 0.0, 0.0)])
    with pytest.warns(UserWarning, match="memory_budget=0.5 cannot be met"):
        op = HessianOperator(model, None, [(batch[0][:4], batch[1][:4])], memory_budget=0.5)
    assert op.chunk_plans[0].peak > op.chunk_plans[0].limit


class LMData(TensorDataset):
    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        super().__init__(torch.randint(0, 17, (32, 32), generator=gen), torch.randint(0, 17, (32, 32), generator=gen))


def fit(tmp_path, **config) -> tuple[HessianSpectrum, dict[str, float]]:
    seed_everything(0)
    model, _ = tiny_lm()
    model.train()
    callback = HessianSpectrum(every_n_steps=1, every_n_epochs=None, progress=False, save_density_figure=False,
                               config=HessianConfig(top_k=2, trace_budget=0, slq_iter=0, lambda_min=False, **config))
    trainer = Trainer(default_root_dir=tmp_path, max_steps=2, limit_train_batches=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[callback])
    trainer.fit(model, DataLoader(LMData(), batch_size=16))
    return callback, dict(callback.last_metrics)


def test_callback_plans_once_per_fit_and_logs_the_same_eigenvalues(tmp_path, monkeypatch):
    plain, plain_metrics = fit(tmp_path / "plain")
    plans_made = []
    plan = HessianOperator._plan
    monkeypatch.setattr(HessianOperator, "_plan", lambda self, *args: plans_made.append(1) or plan(self, *args))
    bounded, bounded_metrics = fit(tmp_path / "bounded", memory_budget=3.0)
    assert bounded.evaluations == plain.evaluations == 2 and len(plans_made) == 1
    plans = bounded._chunk_plans
    assert sum(plans[0].sizes) == 16 and len(plans[0].sizes) > 1 and plans[0].peak <= plans[0].limit
    for key in ("train/hessian/eig_1", "train/hessian/eig_2"):
        assert bounded_metrics[key] == pytest.approx(plain_metrics[key], rel=1e-4)
    with pytest.raises(ValueError, match="memory_budget"):
        HessianSpectrum(config=HessianConfig(memory_budget=-1.0))
    for conflict in ({"chunk_size": 4}, {"curvature": "ggn"}, {"backend": "forward"}):
        with pytest.raises(ValueError, match="memory_budget plans the chunks of the 'cached' Hessian products"):
            HessianConfig(memory_budget=3.0, **conflict)


def test_memory_budget_on_a_hugging_face_lm_with_padded_dict_batches():
    """GPT-2 from a small config (random weights), right-padded dict batches with ``labels=-100`` at padding, loss
    ``model(**batch).loss``: the plan splits the batch (the whole cached batch peaks above 3x a backward), the
    measured peak stays within the budget, and the products equal the size-weighted mean of the chunks' Hessians
    (the chunked operator's definition with padding), each from ``torch.autograd.functional.hvp``."""
    from torch.utils.data import default_collate

    from tests.test_zoo import ARCHS, lm_items

    model = ARCHS["gpt2"].build().model.eval()
    batch = default_collate(lm_items(8, seed=0))

    def loss_fn(module, b):
        return module(**b).loss

    with TensorMemory() as backward:
        torch.autograd.grad(loss_fn(model, batch), list(model.parameters()))
    op = HessianOperator(model, loss_fn, [batch], memory_budget=3.0)
    (plan,) = op.chunk_plans
    assert sum(plan.sizes) == 8 and len(plan.sizes) > 1 and plan.cached[0]
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0))
    with TensorMemory() as bounded:
        product = HessianOperator(model, loss_fn, [batch], chunk_plans=op.chunk_plans).matvec(v)
    assert bounded.peak <= 3.0 * backward.peak

    params = dict(model.named_parameters())
    expected = torch.zeros(op.dim)
    start = 0
    for size in plan.sizes:
        chunk = {k: t[start:start + size] for k, t in batch.items()}
        start += size

        def chunk_loss(*values, chunk=chunk):
            return torch.func.functional_call(model, dict(zip(params, values)), args=(), kwargs=chunk).loss

        with math_attention():
            _, hv = torch.autograd.functional.hvp(chunk_loss, tuple(p.detach() for p in params.values()),
                                                  tuple(op.split(v).values()))
        expected += size / 8 * torch.cat([h.reshape(-1) for h in hv])
    torch.testing.assert_close(product, expected, rtol=1e-4, atol=1e-6)
