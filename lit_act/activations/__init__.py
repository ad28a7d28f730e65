"""Activation functions and their registry: ``build(name_or_class, **kwargs)``, ``available()``, ``register``.

Fixed activations (:mod:`.fixed`), rational / PAU and Group-Rational (:mod:`.rational`), PolyCom (:mod:`.polycom`),
TopK (:mod:`.topk`), APA / AGLU (:mod:`.apa`), CRReLU (:mod:`.crrelu`); :func:`swap_activations` (:mod:`.swap`).
"""

from lit_act.activations import apa, crrelu, fixed, polycom, rational, topk  # noqa: F401  (register themselves)
from lit_act.activations.apa import APA
from lit_act.activations.crrelu import CRReLU
from lit_act.activations.polycom import PolyNorm, PolyReLU
from lit_act.activations.rational import GroupRational, Rational
from lit_act.activations.registry import available, build, get, register
from lit_act.activations.swap import swap_activations
from lit_act.activations.topk import TopK

__all__ = ["APA", "CRReLU", "GroupRational", "PolyNorm", "PolyReLU", "Rational", "TopK", "available", "build", "get",
           "register", "swap_activations"]
