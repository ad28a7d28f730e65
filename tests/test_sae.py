"""Sparse autoencoders: models, decoder constraint, AuxK, buffer, metrics (each against a direct computation)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_act.sae import (
    ActivationBuffer,
    BatchTopKSAE,
    SAEConfig,
    SAEMetrics,
    SAETrainer,
    TopAFASAE,
    TopKSAE,
    available_saes,
    build_sae,
    decoder_epsilon,
    loss_recovered,
)
from lit_act.sae.metrics import DENSITY_BINS, density_bin_edges
from lit_act.sae.training import auxk_loss, normalized_mse


def planted(n: int, d: int = 64, m: int = 256, active: int = 4, seed: int = 0):
    """``n`` samples, each a non-negative combination of ``active`` of ``m`` random unit atoms in ``d`` dims."""
    g = torch.Generator().manual_seed(seed)
    atoms = F.normalize(torch.randn(m, d, generator=g), dim=1)
    idx = torch.rand(n, m, generator=g).argsort(dim=1)[:, :active]
    coef = torch.zeros(n, m).scatter_(1, idx, torch.rand(n, active, generator=g) + 0.5)
    return coef @ atoms, atoms


# ------------------------------------------------------------------------------------------------------- models
def test_registry_builds_every_sae_and_lists_valid_names():
    x = torch.randn(5, 8)
    for name in available_saes():
        sae = build_sae(name, 8, 16, **({"k": 3} if name in ("topk", "batchtopk") else {}))
        out = sae(x)
        assert out.x_hat.shape == (5, 8) and out.z.shape == (5, 16)
        torch.testing.assert_close(sae.encode(x), out.z)
        torch.testing.assert_close(sae.decode(out.z), out.x_hat)
    assert set(available_saes()) == {"topk", "batchtopk", "relu", "topafa"}
    with pytest.raises(ValueError, match="valid names: batchtopk, relu, topafa, topk"):
        build_sae("jumprelu", 8, 16)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"k \(17\) must be <= d_latent \(16\)"):
        build_sae("topk", 8, 16, k=17)
    with pytest.raises(ValueError, match="d_latent must be a positive integer"):
        build_sae("topk", 8, 0, k=1)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        build_sae("topk", 8, 16, k=0)
    with pytest.raises(ValueError, match=r"k \(40\) must be <= d_latent"):
        SAEConfig(d_latent=32, k=40)
    with pytest.raises(ValueError, match="unknown SAE 'nope'; valid names"):
        SAEConfig(sae="nope")
    with pytest.raises(ValueError, match="b_pre_init must be one of"):
        SAEConfig(b_pre_init="median")


def test_topk_matches_the_paper_formula_and_init():
    sae = TopKSAE(6, 20, k=3, generator=torch.Generator().manual_seed(1))
    # Gao et al. A.1 / openai/sparse_autoencoder: nn.Linear's default encoder init, the decoder its unit-row transpose
    w = torch.empty(20, 6).uniform_(-1 / math.sqrt(6), 1 / math.sqrt(6), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sae.W_enc, w.t())
    torch.testing.assert_close(sae.W_dec, w / w.norm(dim=1, keepdim=True))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(20))
    torch.manual_seed(1)
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.b_enc.normal_()
    x = torch.randn(7, 6)
    pre = (x - sae.b_pre) @ sae.W_enc + sae.b_enc
    expected = torch.zeros(7, 20)
    for i in range(7):
        top = pre[i].argsort(descending=True)[:3]
        expected[i, top] = pre[i, top].clamp_min(0)
    out = sae(x)
    torch.testing.assert_close(out.z, expected)
    torch.testing.assert_close(out.x_hat, expected @ sae.W_dec + sae.b_pre)


def test_batchtopk_keeps_batch_budget_and_thresholds_at_inference():
    torch.manual_seed(2)
    sae = BatchTopKSAE(6, 20, k=2, momentum=1.0)
    x = torch.randn(5, 6)
    z = sae(x).z
    relu_pre = F.relu(sae.pre_activations(x)).detach()
    kept = relu_pre.flatten().sort(descending=True).values[:10]
    assert int((z > 0).sum()) == 10
    torch.testing.assert_close(z.flatten().sort(descending=True).values[:10], kept)
    assert sae.threshold.item() == pytest.approx(kept.min().item())  # momentum 1: the last batch's minimum
    sae.eval()
    z_eval = sae(x).z
    torch.testing.assert_close(z_eval, relu_pre * (relu_pre > kept.min()))


def test_topafa_keeps_the_count_whose_norm_matches_the_afa_target():
    torch.manual_seed(3)
    sae = TopAFASAE(6, 24)
    x = torch.randn(9, 6) * 2
    z = sae(x).z.detach()
    acts = F.relu(sae.pre_activations(x)).detach()
    for i in range(9):
        target = (x[i] - sae.b_pre).norm()
        ordered = acts[i].sort(descending=True).values  # unit decoder rows: scaled activations = activations
        cumulative = ordered.square().cumsum(0).sqrt()
        k = int((cumulative - target).abs().argmin()) + 1
        assert int((z[i] > 0).sum()) == min(k, int((acts[i] > 0).sum()))
        torch.testing.assert_close(z[i].sort(descending=True).values[:k], ordered[:k])


# ------------------------------------------------------------------------------------------- training + constraint
def test_decoder_stays_unit_norm_and_grad_parallel_component_removed():
    x, _ = planted(512, d=16, m=32)
    for name in available_saes():
        trainer = SAETrainer(16, SAEConfig(sae=name, d_latent=48, k=4, lr=1e-2, batch_size=128))
        for i in range(4):
            trainer.step(x[i * 128:(i + 1) * 128])
            torch.testing.assert_close(trainer.sae.W_dec.norm(dim=1), torch.ones(48))
        trainer.optimizer.zero_grad()
        trainer.loss(x[:128])[0].backward()
        trainer.sae.project_decoder_grad()
        parallel = (trainer.sae.W_dec.grad * trainer.sae.W_dec).sum(dim=1)
        assert parallel.abs().max() < 1e-6


def test_auxk_loss_is_the_normalised_mse_of_the_top_dead_latents():
    torch.manual_seed(4)
    sae = TopKSAE(5, 12, k=2)
    pre = torch.randn(6, 12)
    residual = torch.randn(6, 5)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[1, 4, 7, 9]] = True
    z_aux = torch.zeros(6, 12)
    for i in range(6):
        cand = [j for j in (1, 4, 7, 9)]
        top = sorted(cand, key=lambda j: -pre[i, j].item())[:3]
        z_aux[i, top] = pre[i, top].clamp_min(0)
    e_hat = z_aux @ sae.W_dec
    expected = ((e_hat - residual) ** 2).sum() / ((residual - residual.mean(0)) ** 2).sum()
    torch.testing.assert_close(auxk_loss(sae, pre, residual, dead, k_aux=3), expected)
    assert auxk_loss(sae, pre, residual, torch.zeros(12, dtype=torch.bool), 3).item() == 0.0


def _planted_dead_run(auxk_coefficient: float) -> float:
    x, _ = planted(60 * 256, d=32, m=64, seed=5)
    trainer = SAETrainer(32, SAEConfig(sae="topk", d_latent=128, k=4, lr=3e-3, batch_size=256, dead_tokens=512,
                                       auxk_coefficient=auxk_coefficient, seed=5))
    planted_dead = torch.arange(96, 128)
    with torch.no_grad():  # latents 96.. start with tiny encoder weights: they never make the top k on their own
        trainer.sae.W_enc[:, planted_dead] *= 0.01
    for i in range(60):
        trainer.step(x[i * 256:(i + 1) * 256])
    return trainer.dead[planted_dead].float().mean().item()


def test_auxk_revives_latents_planted_dead():
    without = _planted_dead_run(0.0)
    with_auxk = _planted_dead_run(1 / 32)
    assert without == 1.0
    assert with_auxk <= 0.5


def test_topk_recovers_planted_features():
    """256 unit atoms in 64 dims, 4 active per sample: >= 90% of the atoms have a decoder row at cosine >= 0.9."""
    steps, batch = 200, 512
    x, atoms = planted(steps * batch)
    trainer = SAETrainer(64, SAEConfig(sae="topk", d_latent=512, k=4, lr=4e-3, batch_size=batch,
                                       dead_tokens=50 * batch))
    for i in range(steps):
        trainer.step(x[i * batch:(i + 1) * batch])
    cosine = atoms @ trainer.sae.W_dec.detach().t()
    assert (cosine.max(dim=1).values >= 0.9).float().mean() >= 0.9


def test_trainer_state_dict_resumes_exactly():
    x, _ = planted(1024, d=16, m=32)
    config = SAEConfig(d_latent=40, k=3, lr=1e-2, batch_size=128, dead_tokens=256)
    a = SAETrainer(16, config)
    for i in range(4):
        a.step(x[i * 128:(i + 1) * 128])
    b = SAETrainer(16, config)
    b.load_state_dict(a.state_dict())
    for i in range(4, 8):
        a.step(x[i * 128:(i + 1) * 128])
        b.step(x[i * 128:(i + 1) * 128])
    for (name, pa), pb in zip(a.sae.named_parameters(), b.sae.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, msg=name)
    assert torch.equal(a.tokens_since_fired, b.tokens_since_fired)


def test_dead_counter_counts_tokens_since_last_firing():
    trainer = SAETrainer(4, SAEConfig(d_latent=6, k=1, batch_size=3, dead_tokens=6))
    z = torch.zeros(3, 6)
    z[0, 2] = 1.0
    trainer._update_dead(z, 3, 1)
    trainer._update_dead(torch.zeros(3, 6), 3, 1)
    assert trainer.tokens_since_fired.tolist() == [6, 6, 3, 6, 6, 6]
    assert trainer.dead.tolist() == [True, True, False, True, True, True]


# ----------------------------------------------------------------------------------------------------- buffer
def test_buffer_is_bounded_drops_nonfinite_and_samples_stored_rows():
    buf = ActivationBuffer(d_in=3, buffer_tokens=8, batch_size=4, seed=0)
    rows = torch.arange(30, dtype=torch.float32).reshape(10, 3)
    rows[2, 1] = float("nan")
    rows[5, 0] = float("inf")
    assert buf.add(rows[:6]) == 4
    assert buf.nonfinite_rows == 2 and buf.size == 4 and buf.ready
    buf.add(rows[6:])  # 4 more: the ring is full (8)
    buf.add(rows[:1])  # overwrites the oldest
    assert buf.size == 8 and buf.data.shape == (8, 3)
    stored = {tuple(r) for r in buf.data.tolist()}
    assert stored == {tuple(r) for r in rows[[0, 1, 3, 4, 6, 7, 8, 9]].tolist()}
    sample = buf.sample()
    assert sample.shape == (4, 3) and len({tuple(r) for r in sample.tolist()}) == 4
    assert {tuple(r) for r in sample.tolist()} <= stored


def test_buffer_smaller_than_a_batch_is_an_error():
    with pytest.raises(ValueError, match=r"buffer_tokens \(100\) must be >= batch_size \(128\)"):
        ActivationBuffer(d_in=3, buffer_tokens=100, batch_size=128)


# ---------------------------------------------------------------------------------------------------- metrics
def test_sae_metrics_match_direct_computation():
    torch.manual_seed(6)
    sae = TopKSAE(8, 32, k=3)
    with torch.no_grad():
        sae.b_pre.normal_()
    x = torch.randn(50, 8) * 3 + 1
    metric = SAEMetrics(8, 32)
    for chunk in x.split(17):
        out = sae(chunk)
        metric.update(chunk, out.x_hat, out.z, sae.b_pre)
    got = metric.compute()
    out = sae(x)
    x_hat, z = out.x_hat.detach(), out.z.detach()
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    l0 = (z != 0).float().sum(1).mean()
    target = (x - sae.b_pre.detach()).norm(dim=1)
    afa = ((z.norm(dim=1) - target) ** 2).mean() / (target ** 2).mean()
    density = (z != 0).float().mean(0)
    edges = density_bin_edges()
    hist = torch.zeros(DENSITY_BINS)
    for d in density[density > 0].tolist():
        b = min(int((max(math.log10(d), -8.0) - edges[0]) / (edges[1] - edges[0])), DENSITY_BINS - 1)
        hist[b] += 1
    assert got["fvu"].item() == pytest.approx(fvu.item(), rel=1e-5)
    assert got["l0"].item() == pytest.approx(l0.item(), rel=1e-6)
    assert got["afa_error"].item() == pytest.approx(afa.item(), rel=1e-5)
    assert got["never_fired_fraction"].item() == pytest.approx((density == 0).float().mean().item())
    torch.testing.assert_close(got["density_hist"], hist)


def test_normalized_mse_is_fvu():
    x = torch.randn(20, 4)
    x_hat = x + 0.1 * torch.randn(20, 4)
    expected = sum(((x[i] - x_hat[i]) ** 2).sum() for i in range(20)) / sum(
        ((x[i] - x.mean(0)) ** 2).sum() for i in range(20))
    torch.testing.assert_close(normalized_mse(x_hat, x), expected)


def test_decoder_epsilon_matches_dense_gram():
    torch.manual_seed(7)
    sae = TopKSAE(5, 11, k=2)
    w = sae.W_dec.detach()
    cos = [abs(float(w[i] @ w[j])) for i in range(11) for j in range(11) if i != j]
    got = decoder_epsilon(sae, chunk=4)
    assert got["epsilon_max"].item() == pytest.approx(max(cos), rel=1e-5)
    assert got["epsilon_mean"].item() == pytest.approx(sum(cos) / len(cos), rel=1e-5)


class _TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))

    def loss(self, logits, targets):
        return F.cross_entropy(logits, targets)


def test_loss_recovered_against_manual_splicing():
    torch.manual_seed(8)
    model = _TwoLayer()
    sae = TopKSAE(8, 16, k=2)
    batches = [(torch.randn(10, 6), torch.randint(0, 3, (10,))) for _ in range(2)]
    got = loss_recovered(model, model.act, sae, batches)
    clean = sae_loss = zero = 0.0
    with torch.no_grad():
        for x, y in batches:
            h = torch.relu(model.fc1(x))
            clean += F.cross_entropy(model.fc2(h), y).item() / 2
            sae_loss += F.cross_entropy(model.fc2(sae(h).x_hat), y).item() / 2
            zero += F.cross_entropy(model.fc2(torch.zeros_like(h)), y).item() / 2
    assert got["loss_clean"].item() == pytest.approx(clean, rel=1e-5)
    assert got["loss_sae"].item() == pytest.approx(sae_loss, rel=1e-5)
    assert got["loss_zero"].item() == pytest.approx(zero, rel=1e-5)
    assert got["loss_recovered"].item() == pytest.approx((zero - sae_loss) / (zero - clean), rel=1e-4)
    assert not model.act._forward_hooks  # the splicing hooks are gone


def test_input_normalisation_scales_to_d_in_and_matches_the_formula():
    """normalize_inputs: s = sqrt(d_in / mean ||x||^2) from the first batch; x_hat = (W_dec z + b_pre) / s with
    z = ReLU(TopK((s x - b_pre) W_enc + b_enc)) (Gao et al. Eq. 3 on the normalised input)."""
    x, _ = planted(256, d=16, m=32)
    x = 7.0 * x + 0.3
    trainer = SAETrainer(16, SAEConfig(d_latent=40, k=3, batch_size=256, b_pre_init="mean"))
    trainer.initialize(x)
    sae = trainer.sae
    s = math.sqrt(16 / float(x.square().sum(dim=1).mean()))
    assert float(sae.input_scale) == pytest.approx(s, rel=1e-5)
    assert float((s * x).square().sum(dim=1).mean()) == pytest.approx(16, rel=1e-5)
    torch.testing.assert_close(sae.b_pre.detach(), (s * x).mean(dim=0))
    with torch.no_grad():
        sae.b_enc.normal_()
        pre = (s * x - sae.b_pre) @ sae.W_enc + sae.b_enc
        top = pre.topk(3, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        out = sae(x)
    torch.testing.assert_close(out.z, z)
    torch.testing.assert_close(out.x_hat, (z @ sae.W_dec + sae.b_pre) / s)
    torch.testing.assert_close(sae.decode(sae.encode(x)), out.x_hat)


def test_calibrated_encoder_preserves_the_norm_of_random_inputs():
    x, _ = planted(512, d=32, m=64)
    trainer = SAETrainer(32, SAEConfig(d_latent=128, k=8, batch_size=512, calibrate_encoder=True))
    trainer.initialize(x)
    sae = trainer.sae
    directions = F.normalize(torch.randn(4096, 32, generator=torch.Generator().manual_seed(5)), dim=1)
    with torch.no_grad():
        pre = directions @ sae.W_enc  # b_enc = 0 at initialisation; u - b_pre = the direction
        top = pre.topk(8, dim=1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        gain = (z @ sae.W_dec).norm(dim=1).mean()
    assert float(gain) == pytest.approx(1.0, abs=0.05)  # calibrated on 256 other random directions
    untouched = SAETrainer(32, SAEConfig(d_latent=128, k=8, batch_size=512))
    untouched.initialize(x)
    torch.testing.assert_close(F.normalize(untouched.sae.W_enc.t(), dim=1), untouched.sae.W_dec)  # parallel
    # default: nn.Linear's magnitudes, ~1/sqrt(3) per latent
    assert float(untouched.sae.W_enc.detach().norm(dim=0).mean()) == pytest.approx(1 / math.sqrt(3), rel=0.05)
