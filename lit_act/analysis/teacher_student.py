"""Does each student neuron copy one teacher neuron or average several?

Setting (Şimşek, Bendjeddou, Gerstner, Brea, "Should Under-parameterized Student Networks Copy or Average Teacher
Weights?", NeurIPS 2023, arXiv:2311.01644): a two-layer teacher with k neurons and incoming vectors ``v_1..v_k`` is
fitted by a student with n < k neurons and incoming vectors ``w_1..w_n``. In a *copy-average* configuration (their
Sec. 3, proved critical for erf with orthonormal teacher vectors and unit outgoing weights) each student neuron either

* **copies** one teacher neuron: ``w_i`` parallel to ``v_j``, or
* **averages** a group ``S`` of teacher neurons (|S| >= 2): ``w_i`` parallel to ``sum_{j in S} v_j`` (teacher
  vectors taken at unit norm, as in the paper);

the optimum has n - 1 copies and one neuron averaging the remaining k - n + 1 teachers. The rule below measures
directions only (the student's norm and outgoing weight are left out, as the averaging neuron's norm depends on the
activation):

1. cosine matrix ``C[i, j] = <w_i, v_j> / (|w_i| |v_j|)`` (shape ``(n, k)``);
2. with ``sign_symmetric`` (odd activations such as erf, where ``(-w, -a)`` computes the same as ``(w, a)``) the
   signs are folded: ``C -> |C|`` and teacher ``j`` enters sums as ``sign(C[i, j]) v_j``;
3. **copy** if the largest cosine ``c_1 >= copy_threshold`` and ``c_1 - c_2 >= copy_margin`` (``c_2`` the second
   largest): the matched teacher is the argmax;
4. else **average** if some group of m >= 2 teachers has ``cos(w_i, sum_{j in S} v_j / |v_j|) >= average_threshold``. For each
   m the candidate group is the m teachers with the largest cosines to ``w_i`` -- the best group of size m exactly
   when the teacher vectors are orthogonal (the paper's setting: then the cosine is ``sum_{j in S} C[i, j] / sqrt(m)``),
   a greedy choice otherwise; the group with the largest cosine wins;
5. else **other** (neither, e.g. not converged or a mixture the rule does not describe).

The cosine with the matched direction (``v_j`` for a copy, the group sum for an average; NaN for other) is reported as
the neuron's ``match_cosine``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KINDS = ("other", "copy", "average")


@dataclass(frozen=True)
class NeuronMatch:
    """Classification of one student neuron: ``kind`` in :data:`KINDS`, the matched teacher indices (one for a copy,
    two or more for an average, none for other), the cosine with the matched direction, and the two largest cosines to
    single teacher vectors."""

    kind: str
    teachers: tuple[int, ...]
    match_cosine: float
    max_cosine: float
    second_cosine: float


@dataclass(frozen=True)
class CopyAverageResult:
    """``cosine`` is the ``(n, k)`` matrix used by the rule (folded with ``sign_symmetric``); ``neurons`` the per
    student neuron classification."""

    cosine: Tensor
    neurons: tuple[NeuronMatch, ...]

    def fraction(self, kind: str) -> float:
        """Fraction of student neurons of ``kind``."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; valid: {list(KINDS)}")
        return sum(n.kind == kind for n in self.neurons) / len(self.neurons)


def cosine_matrix(student: Tensor, teacher: Tensor) -> Tensor:
    """``C[i, j] = cos(student[i], teacher[j])`` for student rows ``(n, d)`` and teacher rows ``(k, d)``."""
    if student.ndim != 2 or teacher.ndim != 2 or student.shape[1] != teacher.shape[1]:
        raise ValueError(f"expected student (n, d) and teacher (k, d) incoming vectors with the same d, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    s = student.detach().double()
    t = teacher.detach().double().to(s.device)
    norms_s, norms_t = s.norm(dim=1), t.norm(dim=1)
    if (norms_s == 0).any() or (norms_t == 0).any():
        raise ValueError("a student or teacher incoming vector is zero: its direction (cosine) is undefined")
    return (s / norms_s[:, None]) @ (t / norms_t[:, None]).T


def check_rule(copy_threshold: float, copy_margin: float, average_threshold: float) -> None:
    """Raise unless the thresholds are cosines in [-1, 1] and the margin is >= 0."""
    for name, value in (("copy_threshold", copy_threshold), ("average_threshold", average_threshold)):
        if not -1.0 <= value <= 1.0:
            raise ValueError(f"{name} is a cosine and must lie in [-1, 1], got {value}")
    if copy_margin < 0:
        raise ValueError(f"copy_margin must be >= 0, got {copy_margin}")


def classify_students(student: Tensor, teacher: Tensor, copy_threshold: float = 0.9, copy_margin: float = 0.2,
                      average_threshold: float = 0.9, sign_symmetric: bool = False) -> CopyAverageResult:
    """Classify every student incoming vector (rows of ``student``, ``(n, d)``) as copy / average / other of the
    teacher incoming vectors (rows of ``teacher``, ``(k, d)``) by the rule in the module docstring."""
    check_rule(copy_threshold, copy_margin, average_threshold)
    signed = cosine_matrix(student, teacher)
    cosine = signed.abs() if sign_symmetric else signed
    t = teacher.detach().double().to(signed.device)
    t_unit = t / t.norm(dim=1, keepdim=True)
    s_unit = student.detach().double().to(signed.device)
    s_unit = s_unit / s_unit.norm(dim=1, keepdim=True)
    neurons = []
    for i in range(cosine.shape[0]):
        order = torch.argsort(cosine[i], descending=True)
        c1 = float(cosine[i, order[0]])
        c2 = float(cosine[i, order[1]]) if len(order) > 1 else -1.0
        if c1 >= copy_threshold and c1 - c2 >= copy_margin:
            neurons.append(NeuronMatch("copy", (int(order[0]),), c1, c1, c2))
            continue
        signs = torch.sign(signed[i]) if sign_symmetric else torch.ones_like(signed[i])
        best_cos, best_group = -2.0, ()
        for m in range(2, len(order) + 1):
            group = order[:m]
            direction = (signs[group, None] * t_unit[group]).sum(0)
            norm = direction.norm()
            if norm == 0:
                continue
            cos = float(s_unit[i] @ direction / norm)
            if cos > best_cos:
                best_cos, best_group = cos, tuple(sorted(int(j) for j in group))
        if best_group and best_cos >= average_threshold:
            neurons.append(NeuronMatch("average", best_group, best_cos, c1, c2))
        else:
            neurons.append(NeuronMatch("other", (), float("nan"), c1, c2))
    return CopyAverageResult(cosine=cosine.float(), neurons=tuple(neurons))
