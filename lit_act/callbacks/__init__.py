"""lit-act callbacks: add them to any ``Trainer(callbacks=[...])``.

============================  ======================================================================
callback                      records
============================  ======================================================================
``ActivationSparsity``        Lazy-Neuron zero fraction, per-token activation ratio, Sparsing-Law CETT
``MassiveActivations``        top-k / median / criterion counts on the residual stream, emergence fit
``DeadNeurons``               neurons that never fire over a window
``NeuronActivationCoverage``  NAC-ME coverage while training, NAC-UE OOD AUROC at test time
``HessianSpectrum``           top eigenvalues, lambda_min, trace, spectral density, LLA criteria
``TeacherStudentMatch``       copy / average classification of student neurons
``ActivationHistograms``      fixed-bin activation histograms (W&B histograms, PNG)
``LearnedActivationShapes``   figures of learned activation shapes and KAN edge functions
============================  ======================================================================
"""

from lit_act.callbacks.dead import DeadNeurons
from lit_act.callbacks.hessian import HessianSpectrum
from lit_act.callbacks.histograms import ActivationHistograms
from lit_act.callbacks.massive import MassiveActivations
from lit_act.callbacks.nac import NeuronActivationCoverage
from lit_act.callbacks.shapes import LearnedActivationShapes
from lit_act.callbacks.sparsity import ActivationSparsity
from lit_act.callbacks.teacher_student import TeacherStudentMatch

__all__ = ["ActivationHistograms", "ActivationSparsity", "DeadNeurons", "HessianSpectrum", "LearnedActivationShapes",
           "MassiveActivations", "NeuronActivationCoverage", "TeacherStudentMatch"]
