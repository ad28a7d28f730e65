"""Zoo tests: every lit-act callback on the architectures researchers study, each number checked against a direct
computation from the test's own forward hooks (issue 13, item 6).

Architectures (tiny configs, random weights, offline): Hugging Face GPT-2, LLaMA (gated MLP), BERT with padded dict
batches, ViT and ResNet; ``nn.Transformer`` (encoder + decoder), Lightning's ``demos.Transformer`` and ``BoringModel``.
Each is wrapped in a small LightningModule and trained for a few real steps (never ``fast_dev_run``).

The reference numbers come from :class:`Recorder`: plain ``register_forward_hook`` / ``register_forward_pre_hook``
hooks on the same modules, recording only during the LightningModule's own training / validation forwards, and the
statistics are written out below with plain torch (no lit-act code).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos import Transformer as DemoTransformer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lit_act.batch import BatchAdapter
from lit_act.callbacks.dead import DeadNeurons
from lit_act.callbacks.histograms import ActivationHistograms
from lit_act.callbacks.massive import MassiveActivations
from lit_act.callbacks.sparsity import ActivationSparsity
from tests.dense import hessian_of

transformers = pytest.importorskip("transformers")

VOCAB, T, B, N_TRAIN, N_VAL, STEPS = 61, 10, 4, 12, 8, 3
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")


# ------------------------------------------------------------------------------------------------------ data
class ListDataset(Dataset):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def _lengths(n: int, g: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(T // 2, T + 1, (n,), generator=g)
    lengths[0] = T  # at least one full sequence
    return lengths


def lm_items(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded causal-LM samples: input_ids, attention_mask (30-50% padding), labels (-100 at padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    mask = (torch.arange(T) < _lengths(n, g)[:, None]).long()
    ids = ids * mask
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i].masked_fill(mask[i] == 0, -100)}
            for i in range(n)]


def cls_items(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded sequence-classification samples (3 classes)."""
    g = torch.Generator().manual_seed(seed)
    items = lm_items(n, seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": it["input_ids"], "attention_mask": it["attention_mask"], "labels": labels[i]}
            for i, it in enumerate(items)]


def image_items(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 16, 16, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"pixel_values": pixels[i], "labels": labels[i]} for i in range(n)]


def seq2seq_items(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(source, target)`` token pairs (unpadded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, 2, T), generator=g)
    return [(ids[i, 0], ids[i, 1]) for i in range(n)]


# ------------------------------------------------------------------------------------------------------ models
class Seq2Seq(nn.Module):
    """``nn.Transformer`` (2 encoder + 2 decoder layers) with token embeddings and a vocabulary head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.transformer = nn.Transformer(d_model=32, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
                                          dim_feedforward=48, dropout=0.1, batch_first=True)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.head(self.transformer(self.embed(src), self.embed(tgt), tgt_mask=causal))


class Wrapped(L.LightningModule):
    """A LightningModule around a model: ``self.model(**batch).loss`` for HF dict batches, token cross-entropy of
    ``self.model(src, tgt)`` for ``(src, tgt)`` tuples."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def loss_of(self, batch) -> torch.Tensor:
        if isinstance(batch, dict):
            return self.model(**batch).loss
        src, tgt = batch
        logits = self.model(src, tgt)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Token cross-entropy (``pl_module.loss``: HessianSpectrum's default loss for outputs without ``.loss``)."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def training_step(self, batch, batch_idx):
        return self.loss_of(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss_of(batch), batch_size=B)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class DemoModule(Wrapped):
    """Lightning's ``demos.Transformer`` (its ``forward(inputs, target)`` returns ``(B*T, vocab)`` log-probs)."""

    def loss_of(self, batch) -> torch.Tensor:
        src, tgt = batch
        return F.nll_loss(self.model(src, tgt), tgt.reshape(-1))


class Boring(BoringModel):
    """``BoringModel`` with its own train/val loaders shrunk to a few steps."""

    def train_dataloader(self):
        return DataLoader(ListDataset(list(torch.randn(N_TRAIN, 32, generator=torch.Generator().manual_seed(0)))),
                          batch_size=B)

    def val_dataloader(self):
        return DataLoader(ListDataset(list(torch.randn(N_VAL, 32, generator=torch.Generator().manual_seed(1)))),
                          batch_size=B)


@dataclass
class Arch:
    """One zoo entry: how to build it, its data, and the sites lit-act's defaults should observe (names in the
    LightningModule; port ``"input"`` = the module's first input)."""

    name: str
    build: Any
    items: Any = None
    sparsity_sites: dict[str, str] = field(default_factory=dict)
    residual: list[str] = field(default_factory=list)
    adapter: BatchAdapter | None = None  # needed for internal passes on tuple batches (probe, NAC, Hessian)


def _hf(cls_name: str, config_name: str, **config) -> Any:
    def build() -> nn.Module:
        torch.manual_seed(0)
        cfg = getattr(transformers, config_name)(**config)
        return Wrapped(getattr(transformers, cls_name)(cfg))

    return build


_TXT = {"vocab_size": VOCAB}
_SEQ2SEQ_ADAPTER = BatchAdapter(forward_fn=lambda m, b: m(b[0], b[1]))

ARCHS = {
    "gpt2": Arch("gpt2", _hf("GPT2LMHeadModel", "GPT2Config", n_layer=2, n_embd=32, n_head=2, n_positions=32,
                             bos_token_id=0, eos_token_id=0, **_TXT), lm_items,
                 {f"model.transformer.h.{i}.mlp.act": "output" for i in range(2)},
                 [f"model.transformer.h.{i}" for i in range(2)]),
    "llama": Arch("llama", _hf("LlamaForCausalLM", "LlamaConfig", hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                               max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0, **_TXT),
                  lm_items, {f"model.model.layers.{i}.mlp.down_proj": "input" for i in range(2)},
                  [f"model.model.layers.{i}" for i in range(2)]),
    "bert": Arch("bert", _hf("BertForSequenceClassification", "BertConfig", hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=48, max_position_embeddings=32, num_labels=3,
                             **_TXT), cls_items,
                 {f"model.bert.encoder.layer.{i}.intermediate.intermediate_act_fn": "output" for i in range(2)},
                 [f"model.bert.encoder.layer.{i}" for i in range(2)]),
    "vit": Arch("vit", _hf("ViTForImageClassification", "ViTConfig", image_size=16, patch_size=4, hidden_size=32,
                           num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, num_labels=3),
                image_items, {}, []),  # names filled in below (ViT's module names differ between versions)
    "resnet": Arch("resnet", _hf("ResNetForImageClassification", "ResNetConfig", embedding_size=8,
                                 hidden_sizes=[8, 16], depths=[1, 1], num_labels=3), image_items,
                   {}, [f"model.resnet.encoder.stages.{i}" for i in range(2)]),
    "nn_transformer": Arch("nn_transformer", lambda: (torch.manual_seed(0), Wrapped(Seq2Seq()))[1], seq2seq_items,
                           {f"model.transformer.{part}.layers.{i}.linear2": "input"
                            for part in ("encoder", "decoder") for i in range(2)},
                           [f"model.transformer.{part}.layers.{i}" for part in ("encoder", "decoder")
                            for i in range(2)], _SEQ2SEQ_ADAPTER),
    "demo_transformer": Arch("demo_transformer",
                             lambda: (torch.manual_seed(0),
                                      DemoModule(DemoTransformer(vocab_size=VOCAB, ninp=32, nhead=2, nhid=48,
                                                                 nlayers=2)))[1],
                             seq2seq_items,
                             {f"model.transformer.{part}.layers.{i}.linear2": "input"
                              for part in ("encoder", "decoder") for i in range(2)},
                             [f"model.transformer.{part}.layers.{i}" for part in ("encoder", "decoder")
                              for i in range(2)], _SEQ2SEQ_ADAPTER),
    "boring": Arch("boring", lambda: (torch.manual_seed(0), Boring())[1], None, {"layer": "output"}, []),
}


def _vit_and_resnet_sites(module: nn.Module, arch: Arch) -> None:
    """ViT's and ResNet's MLP activations / blocks, found by class (module names changed across transformers
    versions): every activation module of ``transformers.activations`` / torch.nn inside the model."""
    if arch.name == "vit":
        arch.sparsity_sites = {n: "output" for n, m in module.named_modules()
                               if type(m).__module__ == "transformers.activations"}
        arch.residual = [n for n, m in module.named_modules() if type(m).__name__ == "ViTLayer"]
    elif arch.name == "resnet":
        arch.sparsity_sites = {n: "output" for n, m in module.named_modules() if isinstance(m, nn.ReLU)
                               or type(m).__module__ == "transformers.activations"}


# ------------------------------------------------------------------------------------------------------ recording
class Recorder(Callback):
    """Own forward hooks on ``sites``, recording the observed tensor (detached copies) during the LightningModule's
    own training and validation forwards only: ``train[step][name]`` (with the batch's mask) and ``val[name]``."""

    def __init__(self, sites: dict[str, str]) -> None:
        self.sites = sites
        self.train: dict[int, dict[str, torch.Tensor]] = {}
        self.train_masks: dict[int, torch.Tensor | None] = {}
        self.val: dict[str, list[torch.Tensor]] = {n: [] for n in sites}
        self.val_masks: list[torch.Tensor | None] = []
        self.stage: str | None = None
        self.step = 0
        self.handles: list[Any] = []

    def _store(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().clone()
        if self.stage == "train":
            self.train.setdefault(self.step, {})[name] = x
        elif self.stage == "val":
            self.val[name].append(x)

    def setup(self, trainer, pl_module, stage):
        if self.handles:
            return
        for name, port in self.sites.items():
            module = pl_module.get_submodule(name)
            if port == "input":
                self.handles.append(module.register_forward_pre_hook(
                    lambda m, args, name=name: self._store(name, args[0])))
            else:
                self.handles.append(module.register_forward_hook(
                    lambda m, args, out, name=name: self._store(name, out[0] if isinstance(out, tuple) else out)))

    def teardown(self, trainer, pl_module, stage):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @staticmethod
    def _mask(batch) -> torch.Tensor | None:
        return batch["attention_mask"].bool() if isinstance(batch, dict) and "attention_mask" in batch else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.stage, self.step = "train", trainer.global_step
        self.train_masks[self.step] = self._mask(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.stage = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.stage = "val"
            self.val_masks.append(self._mask(batch))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.stage = None


class MemoryLogger(Logger):
    """Every ``log_metrics`` call, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def at(self, key: str, step: int) -> float:
        values = [m[key] for s, m in self.rows if s == step and key in m]
        assert values, f"{key} not logged at step {step}"
        return values[-1]


# ------------------------------------------------------------------------------------------------------ references
def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(tokens, features)``: real tokens of a (B, T, ...) output; every position for unmasked outputs (conv maps:
    positions x channels)."""
    if mask is not None:
        return x[mask]
    if x.dim() == 4:  # (B, C, H, W): channels are the neurons
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def ref_sparsity(x: torch.Tensor, mask: torch.Tensor | None, threshold: float) -> dict[str, float]:
    a = real_tokens(x, mask)
    active = a.abs() > threshold
    per_token = active.float().mean(1)
    return {"sparsity": 1 - active.float().mean().item(), "token_activation_ratio": per_token.mean().item(),
            "token_activation_ratio_min": per_token.min().item(),
            "token_activation_ratio_max": per_token.max().item()}


def ref_massive(xs: list[torch.Tensor], masks: list[torch.Tensor | None], k: int = 3) -> dict[str, float]:
    """Sun et al.: per sequence the top-k and the (lower) median of |h| over its real (token, dim) entries, averaged
    over sequences."""
    tops, medians = [], []
    for x, mask in zip(xs, masks, strict=True):
        for b in range(x.shape[0]):
            h = x[b] if mask is None else x[b][mask[b]]
            values = h.abs().flatten()
            tops.append(values.sort(descending=True).values[:k])
            medians.append(values.sort().values[(values.numel() - 1) // 2])
    k = min(len(t) for t in tops)  # BoringModel's Linear has 2 outputs: top1, top2 only
    top = torch.stack([t[:k] for t in tops]).double().mean(0)
    median = torch.stack(medians).double().mean()
    out = {f"massive_top{i + 1}": top[i].item() for i in range(k)}
    return out | {"massive_median": median.item(), "massive_ratio": (top[0] / median).item()}


def ref_histogram(x: torch.Tensor, mask: torch.Tensor | None, bins: int = 64, low: float = -5.0,
                  high: float = 5.0) -> tuple[torch.Tensor, float, int]:
    """``(counts per bin [e_k, e_{k+1}) of the float64 edges, fraction outside [low, high), entries within 1e-5 of a
    bin edge)`` -- the last: entries an fp32 bin computation may legitimately put in the neighbouring bin."""
    values = (x[mask] if mask is not None else x).flatten().double()
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    inside = (values >= low) & (values < high)
    index = torch.bucketize(values[inside], edges, right=True) - 1
    counts = torch.zeros(bins, dtype=torch.long).index_add_(0, index, torch.ones_like(index))
    position = (values - low) / (high - low) * bins
    on_edge = int(((position - position.round()).abs() < 1e-5).sum())
    return counts, 1 - inside.double().mean().item(), on_edge


def ref_dead(xs: list[torch.Tensor], masks: list[torch.Tensor | None]) -> dict[str, float]:
    a = torch.cat([real_tokens(x, m) for x, m in zip(xs, masks, strict=True)])
    fires = a > 0
    ever = fires.any(0)
    return {"dead_fraction": 1 - ever.float().mean().item(),
            "living_activation_frequency": fires.float().mean(0)[ever].mean().item()}


# ------------------------------------------------------------------------------------------------------ running
def loaders(arch: Arch):
    if arch.items is None:
        return None, None
    train = DataLoader(ListDataset(arch.items(N_TRAIN, 0)), batch_size=B)
    val = DataLoader(ListDataset(arch.items(N_VAL, 1)), batch_size=B)
    return train, val


def fit(module: L.LightningModule, arch: Arch, callbacks: list[Callback], tmp_path, steps: int = STEPS,
        val_batches: int = 2) -> MemoryLogger:
    logger = MemoryLogger()
    trainer = L.Trainer(max_steps=steps, limit_train_batches=steps, limit_val_batches=val_batches,
                        num_sanity_val_steps=0, callbacks=callbacks, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        default_root_dir=str(tmp_path))
    train, val = loaders(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train, val)
    return logger


def close(actual: float, expected: float, rel: float = 1e-4, abs_: float = 1e-6) -> bool:
    return actual == pytest.approx(expected, rel=rel, abs=abs_)


# ------------------------------------------------------------------------------------------------------ tests
STAT_ARCHS = ["gpt2", "llama", "bert", "vit", "resnet", "nn_transformer", "demo_transformer", "boring"]


@pytest.mark.parametrize("arch_name", STAT_ARCHS)
def test_statistics_callbacks(arch_name: str, tmp_path) -> None:
    """ActivationSparsity, DeadNeurons, MassiveActivations and ActivationHistograms together in one fit (they must
    not observe each other's passes), default selections -- "mlp_hidden" (GPT-2/BERT/ViT activation outputs, LLaMA's
    and nn.Transformer's down-projection inputs), "activations" on ResNet, the residual stream (encoder and decoder
    blocks) -- with ``modules="layer"`` on BoringModel (no activation, no blocks) and ``modules="mlp_hidden"`` for
    ActivationHistograms. Every training step (``every_n_steps=1``; ``threshold=0.05`` so GELU/SiLU outputs are not
    trivially dense), the validation epoch (sparsity) and DeadNeurons' default probe pass are checked against the
    test's own hooks, padding excluded."""
    arch = ARCHS[arch_name]
    module = arch.build()
    _vit_and_resnet_sites(module, arch)
    boring = arch_name == "boring"
    modules = "layer" if boring else None
    sparsity = ActivationSparsity(modules=modules, every_n_steps=1, threshold=0.05, cett_target=None, figures=False)
    dead = DeadNeurons(modules=modules, figures=False, adapter=arch.adapter)
    # ActivationHistograms defaults to the "activations" preset (BERT's pooler included; none on nn.Transformer's
    # functional ReLUs): the documented argument modules="mlp_hidden" observes the same MLP neurons as the others
    hist_modules = modules if boring or arch_name == "resnet" else "mlp_hidden"
    histograms = ActivationHistograms(modules=hist_modules, every_n_steps=1, figures=False)
    callbacks: list[Callback] = [sparsity, dead, histograms]
    # BoringModel has no blocks: the documented fix modules= (its Linear output, one token per sample)
    massive = MassiveActivations(modules=modules, every_n_steps=1, fit_emergence=False, figures=False)
    callbacks.append(massive)
    residual = ["layer"] if boring else arch.residual
    sites = dict(arch.sparsity_sites) | {name: "output" for name in residual}
    recorder = Recorder(sites)
    logger = fit(module, arch, [recorder, *callbacks], tmp_path)

    assert list(sparsity.selected) == list(arch.sparsity_sites), "default selection"
    assert list(dead.selected) == list(arch.sparsity_sites)
    assert list(histograms.selected) == list(arch.sparsity_sites)
    assert list(massive.selected) == residual

    steps = sorted(recorder.train)
    assert steps == list(range(STEPS))
    for step in steps:
        mask = recorder.train_masks[step]
        for name in arch.sparsity_sites:
            x = recorder.train[step][name]
            for stat, value in ref_sparsity(x, mask, 0.05).items():
                assert close(logger.at(f"train/{stat}/{name}", step), value), (step, name, stat)
            _, outside, _ = ref_histogram(x, mask)
            assert close(logger.at(f"train/hist_outside/{name}", step), outside), (step, name)
        for name in residual:
            for stat, value in ref_massive([recorder.train[step][name]], [mask]).items():
                assert close(logger.at(f"train/{stat}/{name}", step), value), (step, name, stat)
    last = steps[-1]
    for name in arch.sparsity_sites:
        counts, _, on_edge = ref_histogram(recorder.train[last][name], recorder.train_masks[last])
        logged = torch.as_tensor(histograms.last_histograms["train"][name]).long()
        assert logged.sum() == counts.sum(), name
        assert (logged - counts).abs().sum() <= 2 * on_edge, name  # fp32 rounding at bin edges only

    # validation epoch (ActivationSparsity's on_validation default): all real tokens of both batches
    for name in arch.sparsity_sites:
        x = torch.cat([real_tokens(v, m) for v, m in zip(recorder.val[name], recorder.val_masks, strict=True)])
        for stat, value in ref_sparsity(x, None, 0.05).items():
            assert close(logger.at(f"val/{stat}/{name}", STEPS), value), (name, stat)

    # DeadNeurons' default probe pass: the final model in eval mode over the training samples, padding excluded
    ref = probe_reference(module, arch, arch.sparsity_sites)
    for name, stats in ref.items():
        for stat, value in stats.items():
            assert close(logger.at(f"probe/{stat}/{name}", STEPS), value), (name, stat)


def own_forward(module: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return module(**batch)
    if isinstance(batch, list | tuple):
        return module(batch[0], batch[1])
    return module(batch)


def probe_reference(module: L.LightningModule, arch: Arch, sites: dict[str, str]) -> dict[str, dict[str, float]]:
    """Dead-neuron statistics of the final model (eval mode) over every training sample, from own hooks."""
    recorder = Recorder(sites)
    recorder.setup(None, module, "fit")
    recorder.stage = "val"
    masks = []
    module.eval()
    with torch.no_grad():
        if arch.items is None:
            batches = list(module.train_dataloader())
        else:
            batches = list(DataLoader(ListDataset(arch.items(N_TRAIN, 0)), batch_size=B))
        for batch in batches:
            masks.append(Recorder._mask(batch))
            own_forward(module, batch)
    recorder.teardown(None, module, "fit")
    return {name: ref_dead(recorder.val[name], masks) for name in sites}


@pytest.mark.parametrize("callback", [ActivationSparsity, DeadNeurons, ActivationHistograms, MassiveActivations])
def test_defaults_on_boring_model_raise_with_the_fix(callback, tmp_path) -> None:
    """BoringModel (one Linear, no activation, no blocks): the default selection fails at setup, listing what there
    is and how to choose it (``modules=``)."""
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback(figures=False)], default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="modules=") as err:
        trainer.fit(Boring())
    assert "layer" in str(err.value) or "repeated-block" in str(err.value)


# ------------------------------------------------------------------------------------------------------ NAC
ME_BINS, ME_GAIN, ME_QUANTILE = 100, 1.0, 0.9  # NAC-ME probe rule: M linear bins, alpha = gain / quantile(|p|)


def ref_nac_me(module: L.LightningModule, batches: list[Any], sites: dict[str, str]) -> dict[str, float]:
    """NAC-ME (Liu et al. 2024, Eq. 3-5) written out: per sample and neuron the product ``p = pool(z) * pool(g)``
    with ``g = dKL(u || softmax(logits)) / dz`` and ``pool`` the sum over real tokens / positions; states
    ``sigmoid(alpha p)`` with lit-act's probe rule ``alpha = 1 / quantile_0.9(|p|)`` over all probe samples of the
    layer; states of the correctly classified samples in ``M = 100`` linear bins; ``O = max(1, 2 S / M)`` for ``S``
    probe samples; coverage ``mean_n sum_k min(c_kn / O, 1) / M``."""
    products: dict[str, list[torch.Tensor]] = {}
    corrects = []
    module.eval()
    for batch in batches:
        captured: dict[str, torch.Tensor] = {}
        handles = [module.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name, into=captured: into.__setitem__(name, out)) for name in sites]
        with torch.enable_grad():
            logits = own_forward(module, batch).logits
            kl = -torch.log_softmax(logits, -1).mean(-1) - torch.log(torch.tensor(float(logits.shape[-1])))
            grads = torch.autograd.grad(kl.sum(), [captured[n] for n in sites])
        for handle in handles:
            handle.remove()
        corrects.append(logits.argmax(-1) == batch["labels"])
        mask = batch.get("attention_mask")
        for (name, z), g in zip(captured.items(), grads, strict=True):
            z, g = z.detach(), g.detach()
            if z.dim() == 4:  # conv maps: channels are neurons, pooled over H x W
                pz, pg = z.sum((2, 3)), g.sum((2, 3))
            else:
                w = mask[..., None].float() if mask is not None else torch.ones(*z.shape[:-1], 1)
                pz, pg = (z * w).sum(1), (g * w).sum(1)
            products.setdefault(name, []).append(pz * pg)
    correct = torch.cat(corrects)
    saturation = max(1.0, 2.0 * len(correct) / ME_BINS)
    out = {}
    for name, chunks in products.items():
        p = torch.cat(chunks)
        alpha = ME_GAIN / torch.quantile(p.abs().double().flatten(), ME_QUANTILE).item()
        states = torch.sigmoid(alpha * p)[correct]
        index = (states * ME_BINS).floor().long().clamp(max=ME_BINS - 1)
        counts = torch.stack([(index == k).sum(0) for k in range(ME_BINS)]).double()
        out[name] = ((counts / saturation).clamp(max=1).sum(0) / ME_BINS).mean().item()
    return out


@pytest.mark.parametrize("arch_name", ["bert", "vit", "resnet"])
def test_nac_me_probe_on_classifiers(arch_name: str, tmp_path) -> None:
    """NeuronActivationCoverage's default NAC-ME probe (every epoch end, training samples, correct ones only) on the
    classifiers, ``evaluate_on=None`` (no OOD sets here); ``modules="mlp_hidden"`` on BERT, whose default
    activation selection includes the pooler's (B, D) Tanh that the token mask cannot pool."""
    from lit_act.callbacks.nac import NeuronActivationCoverage

    arch = ARCHS[arch_name]
    module = arch.build()
    _vit_and_resnet_sites(module, arch)
    cb = NeuronActivationCoverage(modules="mlp_hidden" if arch_name == "bert" else None, evaluate_on=None,
                                  figures=False)
    logger = fit(module, arch, [cb], tmp_path)
    assert list(cb.selected) == list(arch.sparsity_sites)
    batches = list(DataLoader(ListDataset(arch.items(N_TRAIN, 0)), batch_size=B))
    ref = ref_nac_me(module, batches, arch.sparsity_sites)
    for name, value in ref.items():
        assert close(logger.at(f"probe/nac_me/{name}", STEPS), value), name
    assert close(logger.at("probe/nac_me/mean", STEPS), sum(ref.values()) / len(ref))


def test_nac_default_on_bert_includes_the_pooler(tmp_path) -> None:
    """BERT's default NAC selection ("activations") holds the MLP GELUs and the pooler's per-sequence ``(B, D)`` Tanh:
    the token mask applies to the first, and the pooler (no token axis, so no padding) is taken as it is."""
    from lit_act.callbacks.nac import NeuronActivationCoverage

    arch = ARCHS["bert"]
    module = arch.build()
    cb = NeuronActivationCoverage(evaluate_on=None, figures=False)
    logger = fit(module, arch, [cb], tmp_path)
    assert list(cb.selected) == [*arch.sparsity_sites, "model.bert.pooler.activation"]
    assert 0.0 < logger.at("probe/nac_me/model.bert.pooler.activation", STEPS) <= 1.0


@pytest.mark.parametrize("arch_name", ["gpt2", "llama", "nn_transformer", "demo_transformer"])
def test_nac_on_sequence_models_fails_at_setup_with_the_fix(arch_name: str, tmp_path) -> None:
    """Language models give per-token logits, not class logits: the dry run says so before the first step."""
    from lit_act.callbacks.nac import NeuronActivationCoverage

    arch = ARCHS[arch_name]
    cb = NeuronActivationCoverage(modules="mlp_hidden", evaluate_on=None, figures=False, adapter=arch.adapter)
    steps = []
    spy = Callback()
    spy.on_train_batch_start = lambda *a: steps.append(1)
    with pytest.raises(ValueError, match=r"logits.*Fix: pass adapter=BatchAdapter"):
        fit(arch.build(), arch, [cb, spy], tmp_path)
    assert not steps


def test_nac_on_boring_model(tmp_path) -> None:
    """BoringModel's batches carry no targets: the dry run asks for ``targets_fn``; with it (and ``modules=``, it
    has no activation) NAC-ME of its own Linear, the logits layer, checked by the formula written out."""
    from lit_act.callbacks.nac import NeuronActivationCoverage

    arch = ARCHS["boring"]
    with pytest.raises(ValueError, match="targets_fn"):
        fit(arch.build(), arch, [NeuronActivationCoverage(modules="layer", evaluate_on=None, figures=False)],
            tmp_path)
    module = arch.build()
    targets = BatchAdapter(targets_fn=lambda batch: torch.zeros(len(batch), dtype=torch.long))
    cb = NeuronActivationCoverage(modules="layer", evaluate_on=None, figures=False, adapter=targets)
    logger = fit(module, arch, [cb], tmp_path)
    # the Linear is the logits layer: p = z * (softmax(z) - 1/C) (a hook on it gives exactly that)
    module.eval()
    with torch.no_grad():
        z = torch.cat([module(x) for x in module.train_dataloader()])
    p = z * (torch.softmax(z, -1) - 0.5)
    alpha = ME_GAIN / torch.quantile(p.abs().double().flatten(), ME_QUANTILE).item()
    index = (torch.sigmoid(alpha * p)[z.argmax(-1) == 0] * ME_BINS).floor().long().clamp(max=ME_BINS - 1)
    saturation = max(1.0, 2.0 * len(z) / ME_BINS)
    counts = torch.stack([(index == k).sum(0) for k in range(ME_BINS)]).double()
    expected = ((counts / saturation).clamp(max=1).sum(0) / ME_BINS).mean().item()
    assert close(logger.at("probe/nac_me/layer", STEPS), expected)


# ------------------------------------------------------------------------------------------------------ Hessian
HESSIAN_PARAMS = {"gpt2": "model.transformer.ln_f.bias", "llama": "model.model.norm.weight",
                  "bert": "model.classifier.bias", "vit": "model.classifier.bias", "resnet": "model.classifier.1.bias",
                  "nn_transformer": "model.transformer.decoder.norm.bias",
                  "demo_transformer": "model.transformer.decoder.norm.bias", "boring": None}


def dense_hessian(module: L.LightningModule, arch: Arch, batch: Any, name: str | None) -> torch.Tensor:
    """The loss Hessian with respect to parameter ``name`` (all parameters when ``None``) by
    ``torch.autograd.functional.hessian``, model in eval mode."""
    module.eval()

    def loss(m) -> torch.Tensor:
        if isinstance(batch, dict):
            return m(**batch).loss
        if isinstance(batch, list | tuple):
            logits = m(batch[0], batch[1])
            if arch.name == "demo_transformer":
                return F.cross_entropy(logits, batch[1].reshape(-1))
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))
        preds = m(batch)
        return F.mse_loss(preds, torch.ones_like(preds))  # BoringModel.loss

    return hessian_of(module, loss, None if name is None else [name])


@pytest.mark.parametrize("arch_name", STAT_ARCHS)
def test_hessian_spectrum(arch_name: str, tmp_path) -> None:
    """HessianSpectrum at epoch end with tiny budgets: top-3 / smallest eigenvalues and the trace equal the dense
    Hessian's (``params=`` one small tensor; BoringModel: all 66 parameters). Default loss: HF ``.loss``,
    ``pl_module.loss(logits, targets)`` otherwise (tuple batches also need ``adapter=``)."""
    from lit_act.callbacks import HessianSpectrum

    arch = ARCHS[arch_name]
    module = arch.build()
    param = HESSIAN_PARAMS[arch_name]
    budgets = {"config": {"top_k": 3, "max_iter": 40, "trace_budget": 30, "slq_iter": 0,
                          "params": [param] if param else None},
               "save_density_figure": False, "progress": False}
    loss_fn = None
    if arch_name == "boring":  # BoringModel batches carry no targets: the dry run asks for loss_fn before training
        with pytest.raises(TypeError, match=r"dry run.*loss_fn=lambda module, batch"):
            fit(arch.build(), arch, [HessianSpectrum(**budgets)], tmp_path)
        loss_fn = lambda m, batch: m.loss(m(batch))  # noqa: E731
    cb = HessianSpectrum(adapter=arch.adapter, loss_fn=loss_fn, **budgets)
    logger = fit(module, arch, [cb], tmp_path)
    eig = torch.linalg.eigvalsh(dense_hessian(module, arch, cb.cached_batches[0], param).double())
    hess_trace = eig.sum().item()
    # Lanczos finds each distinct eigenvalue once: BoringModel's MSE Hessian (X^T X) (x) I_2 has every eigenvalue
    # twice, and eig_2 is then the second *distinct* one
    distinct = [eig[-1].item()]
    for value in eig.flip(0).tolist():
        if abs(value - distinct[-1]) > 1e-6 * abs(distinct[0]):
            distinct.append(value)
    for i in range(3):
        assert close(logger.at(f"train/hessian/eig_{i + 1}", STEPS), distinct[i], rel=1e-3, abs_=1e-6), i
    assert close(logger.at("train/hessian/lambda_min", STEPS), eig[0].item(), rel=1e-3, abs_=1e-5)
    trace, se = logger.at("train/hessian/trace", STEPS), logger.at("train/hessian/trace_se", STEPS)
    assert abs(trace - hess_trace) <= 4 * se + 1e-4 * abs(hess_trace) + 1e-6, (trace, se, hess_trace)


# ------------------------------------------------------------------------------------------------------ shapes, SAE
@pytest.mark.parametrize("arch_name", STAT_ARCHS)
def test_learned_activation_shapes(arch_name: str, tmp_path, caplog) -> None:
    """LearnedActivationShapes: no learnable activation in any zoo model, so the default says there is nothing to
    plot (and writes nothing); with ``modules=`` naming activation modules it draws their curves."""
    from lit_act.callbacks.shapes import LearnedActivationShapes

    arch = ARCHS[arch_name]
    module = arch.build()
    with caplog.at_level("INFO"):
        fit(module, arch, [LearnedActivationShapes()], tmp_path / "default")
    assert "nothing to plot" in caplog.text
    assert not (tmp_path / "default" / "figures").exists()
    activations = [n for n, m in module.named_modules() if isinstance(m, nn.GELU | nn.SiLU | nn.ReLU | nn.Tanh)
                   or type(m).__module__ == "transformers.activations"]
    if activations:
        fit(module, arch, [LearnedActivationShapes(modules=activations[:2])], tmp_path / "explicit")
        assert (tmp_path / "explicit" / "figures" / "learned_shapes.png").stat().st_size > 0


@pytest.mark.parametrize("arch_name", STAT_ARCHS)
def test_sparse_autoencoder_trainer(arch_name: str, tmp_path) -> None:
    """SparseAutoencoderTrainer (``batch_size=8`` so a few tiny steps train it) on its default sites (the same
    "mlp_hidden" / "activations" sites as the statistics callbacks): the validation FVU and L0 equal the trained
    SAE's on the test's own hooked validation activations (real tokens only)."""
    from lit_act.callbacks.sae import SparseAutoencoderTrainer

    arch = ARCHS[arch_name]
    module = arch.build()
    _vit_and_resnet_sites(module, arch)
    modules = "layer" if arch_name == "boring" else None  # default: "mlp_hidden" / "activations" (ResNet)
    cb = SparseAutoencoderTrainer(modules=modules, d_latent=64, k=4, batch_size=8, buffer_tokens=256,
                                  loss_recovered_batches=0, figures=False)
    recorder = Recorder({})
    logger = fit(module, arch, [recorder, cb], tmp_path)
    assert cb.saes, "no SAE was created"
    assert set(cb.saes) == set(arch.sparsity_sites if arch_name != "boring" else ["layer"])
    recorder.sites = {name: getattr(cb.selected[name], "port", "output") for name in cb.saes}
    recorder.val = {name: [] for name in cb.saes}
    recorder.val_masks = []
    # the validation activations of the final model, from own hooks on a plain validation pass
    fit_val = L.Trainer(limit_val_batches=2, callbacks=[recorder], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    fit_val.validate(module, loaders(arch)[1] if arch.items else module.val_dataloader(), verbose=False)
    for name, sae in cb.saes.items():
        rows = []
        for x, mask in zip(recorder.val[name], recorder.val_masks, strict=True):
            rows.append(real_tokens(x, mask if x.dim() >= 3 else None))
        x = torch.cat(rows)
        sae.eval()
        with torch.no_grad():
            out = sae(x)
        fvu = ((x - out.x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
        l0 = (out.z != 0).float().sum(1).mean()
        assert close(logger.at(f"val/sae/fvu/{name}", STEPS), fvu.item(), rel=1e-3), name
        assert close(logger.at(f"val/sae/l0/{name}", STEPS), l0.item(), rel=1e-4), name


# ------------------------------------------------------------------------------------------------------ docs
def _doc_recipes() -> list[tuple[str, str]]:
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "any_model.md").read_text()
    recipes, title = [], ""
    for match in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```", text, flags=re.M | re.S):
        if match.group(1):
            title = match.group(1)
        else:
            recipes.append((title, match.group(2)))
    return recipes


@pytest.mark.parametrize(("title", "code"), _doc_recipes(), ids=[t for t, _ in _doc_recipes()])
def test_any_model_recipes(title: str, code: str, tmp_path, monkeypatch) -> None:
    """Every recipe of ``docs/any_model.md`` runs as written (in a scratch directory)."""
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, f"any_model.md: {title}", "exec"), {"__name__": "__doc_recipe__"})
