"""lit-act callbacks: add them to any ``Trainer(callbacks=[...])``.

============================  ======================================================================
callback                      records
============================  ======================================================================
``ActivationSparsity``        Lazy-Neuron zero fraction, per-token activation ratio, Sparsing-Law CETT
``MassiveActivations``        top-k / median / criterion counts on the residual stream, emergence fit
``DeadNeurons``               neurons that never fire on a fixed probe set (or over a window)
``NeuronActivationCoverage``  NAC-ME on probe passes, NAC-UE OOD AUROC at test time
``HessianSpectrum``           top eigenvalues, lambda_min, trace, spectral density, LLA criteria
``TeacherStudentMatch``       copy / average classification of student neurons
``ActivationHistograms``      fixed-bin activation histograms (W&B histograms, PNG)
``LearnedActivationShapes``   figures of learned activation shapes and KAN edge functions
``SparseAutoencoderTrainer``  sparse autoencoders trained online on the tapped activations (FVU, L0, ...)
============================  ======================================================================

Every callback is built on :class:`lit_act.callbacks.core.LitActCallback` (adapters, emitter, quiet passes, resume);
the statistics callbacks on its collector :class:`lit_act.callbacks.base.ActivationStatisticCallback`.
"""

from lit_act.callbacks.base import ActivationStatisticCallback
from lit_act.callbacks.core import LitActCallback
from lit_act.callbacks.dead import DeadNeurons
from lit_act.callbacks.hessian import HessianSpectrum
from lit_act.callbacks.hessian_config import HessianConfig
from lit_act.callbacks.histograms import ActivationHistograms
from lit_act.callbacks.massive import MassiveActivations
from lit_act.callbacks.nac import NeuronActivationCoverage
from lit_act.callbacks.sae import SparseAutoencoderTrainer
from lit_act.callbacks.shapes import LearnedActivationShapes
from lit_act.callbacks.sparsity import ActivationSparsity
from lit_act.callbacks.teacher_student import TeacherStudentMatch

__all__ = ["ActivationHistograms", "ActivationSparsity", "ActivationStatisticCallback", "DeadNeurons", "HessianConfig",
           "HessianSpectrum", "LearnedActivationShapes", "LitActCallback", "MassiveActivations", "NeuronActivationCoverage",
           "SparseAutoencoderTrainer", "TeacherStudentMatch"]
