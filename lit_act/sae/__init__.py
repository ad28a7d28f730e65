"""Sparse autoencoders trained on the activations lit-act taps: models (:mod:`.models`), the bounded activation
buffer (:mod:`.buffer`), the training step (:mod:`.training`), metrics (:mod:`.metrics`), the sweep figure
(:mod:`.figures`); the online callback is
:class:`lit_act.callbacks.sae.SparseAutoencoderTrainer`, the offline job ``lit-act sae`` (:mod:`.cli`).

Example::

    from lit_act.sae import SAEConfig, SAETrainer
    trainer = SAETrainer(d_in=64, config=SAEConfig(sae="topk", d_latent=256, k=4, lr=1e-3))
    trainer.step(x)
"""

from lit_act.sae.buffer import ActivationBuffer
from lit_act.sae.metrics import AdapterLoss, SAEMetrics, decoder_epsilon, loss_recovered, splice
from lit_act.sae.models import (
    BatchTopKSAE,
    ReLUSAE,
    SAEOutput,
    SparseAutoencoder,
    TopAFASAE,
    TopKSAE,
    available_saes,
    build_sae,
    register_sae,
    sae_class,
)
from lit_act.sae.training import SAEConfig, SAETrainer

__all__ = ["ActivationBuffer", "AdapterLoss", "BatchTopKSAE", "ReLUSAE", "SAEConfig", "SAEMetrics", "SAEOutput", "SAETrainer",
           "SparseAutoencoder", "TopAFASAE", "TopKSAE", "available_saes", "build_sae", "decoder_epsilon",
           "loss_recovered", "register_sae", "sae_class", "splice"]
