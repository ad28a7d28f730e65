"""Reference LightningModules. See :mod:`lit_act.models.base` for the batch/logits conventions."""

from lit_act.models.base import LitActModule, activation_factory
from lit_act.models.cnn import CNNClassifier
from lit_act.models.mlp import MLPClassifier
from lit_act.models.student import StudentNetwork
from lit_act.models.transformer import TransformerLM

__all__ = ["CNNClassifier", "LitActModule", "MLPClassifier", "StudentNetwork", "TransformerLM", "activation_factory"]
