"""Per-block top eigenvalues (``block_eigenvalues``) against the eigenvalues of the dense Hessian's diagonal blocks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from lightning import seed_everything
from torch import nn
from torch.utils.data import DataLoader

from lit_act.callbacks.hessian import HessianSpectrum
from lit_act.callbacks.hessian_config import HessianConfig
from lit_act.hessian import GGNOperator, HessianOperator, block_eigenvalues, block_sizes, hutchinson, lanczos
from lit_act.models import TransformerLM
from tests.dense import hessian_of, weighted_loss
from tests.test_hessian_callback import dense_hessian, make_data, make_model, make_trainer

PRODUCTS = ["per_block", "batched"]


def ce_loss(module: nn.Module, batch) -> torch.Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


def lm_loss(module: nn.Module, batch) -> torch.Tensor:
    return module.loss(module(batch[0]), batch[1])


def dense_blocks(model: nn.Module, loss_fn, batches) -> dict[str, torch.Tensor]:
    """Eigenvalues (ascending) of each module's diagonal block of the batch-size-weighted Hessian."""
    dense = hessian_of(model, weighted_loss(loss_fn, batches))
    index: dict[str, list[int]] = {}
    offset = 0
    for n, p in model.named_parameters():
        index.setdefault(n.rpartition(".")[0] or "<root>", []).extend(range(offset, offset + p.numel()))
        offset += p.numel()
    return {owner: torch.linalg.eigvalsh(dense[torch.tensor(idx)][:, torch.tensor(idx)]) for owner, idx in index.items()}


def small_mlp() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen))
               for n in (12, 7)]  # unequal sizes: the batch-size weighting matters
    return model, batches


def tiny_lm() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = TransformerLM(vocab_size=7, block_size=4, d_model=4, n_layer=1, n_head=2, d_ff=8).double().eval()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 7, (3, 4), generator=gen), torch.randint(0, 7, (3, 4), generator=gen))]
    return model, batches


@pytest.mark.parametrize("products", PRODUCTS)
def test_mlp_blocks_match_dense_and_the_per_block_lanczos(products):
    model, batches = small_mlp()
    exact = dense_blocks(model, ce_loss, batches)
    op = HessianOperator(model, ce_loss, batches)
    result = block_eigenvalues(op, k=3, tol=1e-8, products=products)
    smallest = block_eigenvalues(op, k=1, which="smallest", tol=1e-8, products=products)
    # the names of HessianOperator.blocks and of the per-block traces
    assert list(result) == list(HessianOperator.blocks(model, ce_loss, batches)) == list(hutchinson(op, 2).blocks)
    assert list(result) == list(exact) == ["0", "2", "4"]
    for name, res in result.items():
        top = exact[name].flip(0)[:3]
        assert torch.allclose(res.eigenvalues, top, rtol=1e-6, atol=1e-9), (name, res.eigenvalues, top)
        scale = float(exact[name].abs().max())  # the smallest eigenvalue may be ~0: error relative to the block norm
        assert abs(float(smallest[name].eigenvalues[0]) - float(exact[name][0])) <= 1e-6 * scale
        assert bool(res.converged.all()) and res.which == "largest"
        # lockstep = one lanczos per block operator with the same seed: same Krylov sequence, same stopping step
        single = lanczos(HessianOperator(model, ce_loss, batches, params=[f"{name}.*"]), k=3, tol=1e-8,
                         start="random")  # block_eigenvalues starts from the seed's Rademacher vector
        assert res.iterations == res.matvecs == single.iterations
        assert torch.allclose(res.eigenvalues, single.eigenvalues, rtol=1e-10)
    assert op.matvecs == sum(r.matvecs for r in result.values()) + sum(r.matvecs for r in smallest.values()) + 2


@pytest.mark.parametrize("products", PRODUCTS)
def test_transformer_layer_blocks_match_dense(products):
    model, batches = tiny_lm()
    exact = dense_blocks(model, lm_loss, batches)
    result = block_eigenvalues(HessianOperator(model, None, batches), k=2, tol=1e-8, products=products,
                               return_vectors=True)
    assert list(result) == list(exact)
    assert {"tok_emb", "blocks.0.ln1", "blocks.0.attn.qkv", "blocks.0.mlp.fc_out", "lm_head"} <= set(result)
    sizes = block_sizes(model)
    for name, res in result.items():
        assert torch.allclose(res.eigenvalues, exact[name].flip(0)[:2], rtol=1e-6, atol=1e-9), name
        assert bool(res.converged.all())
        assert res.eigenvectors.shape == (sizes[name], 2)
        assert torch.allclose(res.eigenvectors.T @ res.eigenvectors, torch.eye(2, dtype=torch.float64), atol=1e-8)


def test_convergence_flags_per_block():
    model, batches = small_mlp()
    op = HessianOperator(model, ce_loss, batches)
    capped = block_eigenvalues(op, k=1, max_iter=2, tol=1e-10)
    assert all(r.iterations == 2 for r in capped.values())
    assert not any(bool(r.converged[0]) for r in capped.values())  # 2 steps cannot reach 1e-10 on 18+ dims
    full = block_eigenvalues(op, k=1, tol=1e-6)
    assert all(bool(r.converged[0]) for r in full.values())
    # each block stops on its own test: the blocks need different numbers of steps
    assert len({r.iterations for r in full.values()}) > 1
    # two identical "ranks": numerator and batch weight both summed, the same operator
    doubled = block_eigenvalues(HessianOperator(model, ce_loss, batches, all_reduce=lambda t: 2 * t), k=1, tol=1e-6)
    for name, res in doubled.items():
        assert torch.allclose(res.eigenvalues, full[name].eigenvalues, rtol=1e-10)
    only_head = block_eigenvalues(HessianOperator(model, ce_loss, batches, params=["4.*"]), k=1, tol=1e-6)
    assert list(only_head) == ["4"] and only_head["4"].iterations == full["4"].iterations


def test_bad_input_names_the_block_and_the_choices():
    model, batches = small_mlp()
    op = HessianOperator(model, ce_loss, batches)
    with pytest.raises(ValueError, match=r"k=22 is larger than block\(s\) \{'4': 21\}"):
        block_eigenvalues(op, k=22)
    with pytest.raises(ValueError, match="k must be >= 1"):
        block_eigenvalues(op, k=0)
    with pytest.raises(ValueError, match=r"unknown products='vmap'; valid: \['per_block', 'batched'\]"):
        block_eigenvalues(op, products="vmap")
    with pytest.raises(ValueError, match=r"unknown which='top'; valid"):
        block_eigenvalues(op, which="top")
    with pytest.raises(ValueError, match=r"max_iter \(1\) must be >= k \(2\)"):
        block_eigenvalues(op, k=2, max_iter=1)
    ggn = GGNOperator(model, ce_loss, batches, curvature="ggn", loss="cross_entropy")
    with pytest.raises(ValueError, match=r"needs the Hessian.*curvature 'ggn'; valid: \['hessian'\]"):
        block_eigenvalues(ggn)
    with pytest.raises(ValueError, match="per_block_top_k=2 needs curvature='hessian'"):
        HessianSpectrum(config=HessianConfig(per_block_top_k=2, curvature="ggn"))
    with pytest.raises(ValueError, match="per_block_top_k=-1: expected a non-negative integer"):
        HessianSpectrum(config=HessianConfig(per_block_top_k=-1))


def test_callback_too_large_k_fails_at_setup_naming_the_block(tmp_path):
    hessian = HessianSpectrum(every_n_epochs=1, config=HessianConfig(per_block_top_k=19), progress=False,
                              save_density_figure=False)
    trainer = make_trainer(tmp_path, [hessian], limit_train_batches=2)
    with pytest.raises(ValueError, match=r"k=19 is larger than block\(s\) \{'head': 18\}"):
        trainer.fit(make_model(batch_norm=False, dropout=0.0), DataLoader(make_data(), batch_size=16))


def test_callback_logs_block_eigenvalues_matching_a_direct_computation(tmp_path):
    seed_everything(0)
    model = make_model(batch_norm=True, dropout=0.2)
    hessian = HessianSpectrum(every_n_epochs=1, num_batches=2, config=HessianConfig(top_k=1, lambda_min=False,
                              trace_budget=0, slq_iter=0, per_block_top_k=2), progress=False,
                              save_density_figure=False)
    trainer = make_trainer(tmp_path, [hessian], limit_train_batches=4)
    trainer.fit(model, DataLoader(make_data(), batch_size=16))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/hessian/")}
    blocks = ["hidden.0.linear", "hidden.0.act.0", "hidden.1.linear", "hidden.1.act.0", "head"]
    keys = {f"train/hessian/block_top{i}/{b}" for b in blocks for i in (1, 2)}
    assert keys | {"train/hessian/block_converged"} <= set(logged)
    assert set(logged) == set(hessian.metric_names())
    assert logged["train/hessian/block_converged"] == 1.0
    reference = copy.deepcopy(model).eval()  # the callback evaluates in eval mode
    direct = block_eigenvalues(HessianOperator(reference, None, hessian.cached_batches), k=2, seed=hessian.config.seed + 4)
    dense = torch.linalg.eigvalsh(dense_hessian(model, hessian.cached_batches))
    assert math.isclose(logged["train/hessian/eig_1"], float(dense[-1]), rel_tol=1e-4)
    owners = [n.rpartition(".")[0] for n, _ in model.named_parameters()]
    exact = dense_blocks(copy.deepcopy(model).double().eval(), lambda m, b: m.loss(m(b[0].double()), b[1]),
                         hessian.cached_batches)
    for b in blocks:
        assert b in owners
        for i in (1, 2):
            value = logged[f"train/hessian/block_top{i}/{b}"]
            assert math.isclose(value, float(direct[b].eigenvalues[i - 1]), rel_tol=1e-6)
            assert math.isclose(value, float(exact[b][-i]), rel_tol=1e-3)


def test_non_finite_block_product_raises_floating_point_error():
    model, batches = small_mlp()
    op = HessianOperator(model, lambda m, b: ce_loss(m, b) * float("nan"), batches)
    with pytest.raises(FloatingPointError, match="NaN/Inf in a block Hessian-vector product"):
        block_eigenvalues(op)


@pytest.mark.slow
def test_ddp_block_eigenvalues_match_single_process(tmp_path):
    from lightning import Trainer

    from tests.test_hessian_callback import TinyClassifier, _Record

    data = make_data(64)
    seed_everything(0)
    model = TinyClassifier()
    settings = dict(config=HessianConfig(top_k=1, lambda_min=False, trace_budget=0, slq_iter=0, per_block_top_k=2),
                    progress=False)
    cb = HessianSpectrum(every_n_epochs=1, num_batches=2, **settings)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, callbacks=[cb, _Record(tmp_path)])
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=False))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    keys = [k for k in rank0 if "/block_top" in k]
    assert len(keys) == 2 * 3  # net.0, net.1 (BatchNorm), net.3
    assert all(rank0[k] == rank1[k] for k in keys)  # identical on every rank
    x, y = data.tensors  # DistributedSampler without shuffle: rank r gets samples r::2
    batches = [(x[r::2][i * 16:(i + 1) * 16], y[r::2][i * 16:(i + 1) * 16]) for r in (0, 1) for i in range(2)]
    single, _ = HessianSpectrum(num_batches=4, **settings).compute(model, batches)
    for key in keys:
        assert math.isclose(rank0[key], single[key], rel_tol=1e-5, abs_tol=1e-7), key
