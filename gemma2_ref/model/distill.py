"""Knowledge distillation, as the Gemma 2 report trains its 2B and 9B models: from a larger teacher.

Instead of the one-hot next token, the student learns the teacher's whole next-token distribution.
The report (arXiv 2408.00118, section 3.2) writes the objective as

    min_{P_S}  sum_x  -P_T(x | x_c) log P_S(x | x_c)                                         (1)

for each context x_c: the cross-entropy from the teacher's distribution P_T to the student's P_S.
Since  sum_x -P_T log P_S  =  KL(P_T || P_S)  +  H(P_T)  and the teacher's entropy H(P_T) does not depend
on the student, minimising (1) is minimising the KL divergence to the teacher; (1) is never below
H(P_T), and equals it exactly when P_S = P_T.

Inputs are the models' output logits, i.e. *after* Gemma 2's final soft-cap (what `Model.logits`
returns and what the bundled checkpoints were trained on); P = softmax(logits), temperature 1.
Shapes: (..., V) with any leading positions axes, e.g. (S, V) or (B, S, V); per-position results are
(...). Computation in float64, whatever the input dtype, so that the identities above hold to ~1e-12.
"""

from __future__ import annotations

import numpy as np

from . import gemma2


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log P(x) = logits_x - log sum_y exp(logits_y) (gemma2.log_softmax), in float64. (..., V)"""
    return gemma2.log_softmax(np.asarray(logits, dtype=np.float64))


def entropy(teacher_logits: np.ndarray) -> np.ndarray:
    """H(P_T) = sum_x -P_T(x) log P_T(x) per position, in nats. (..., V) -> (...)"""
    log_p = log_softmax(teacher_logits)
    return -(np.exp(log_p) * log_p).sum(axis=-1)


def distillation_per_token(teacher_logits: np.ndarray, student_logits: np.ndarray) -> np.ndarray:
    """Equation (1) at each position: sum_x -P_T(x|x_c) log P_S(x|x_c), in nats. (..., V) x2 -> (...)"""
    teacher_logits, student_logits = np.asarray(teacher_logits), np.asarray(student_logits)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {teacher_logits.shape} and student logits {student_logits.shape} "
            f"must have the same shape (..., vocab): same tokens, same vocabulary"
        )
    p_teacher = np.exp(log_softmax(teacher_logits))  # (..., V), sums to 1 over V
    return -(p_teacher * log_softmax(student_logits)).sum(axis=-1)


def kl_per_token(teacher_logits: np.ndarray, student_logits: np.ndarray) -> np.ndarray:
    """KL(P_T || P_S) = equation (1) - H(P_T) per position: >= 0, and 0 only where P_S = P_T. (...)"""
    return distillation_per_token(teacher_logits, student_logits) - entropy(teacher_logits)


def _masked_mean(values: np.ndarray, mask: np.ndarray | None) -> float:
    if mask is None:
        return float(values.mean())
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != values.shape:
        raise ValueError(f"mask {mask.shape} must have the logits' positions shape {values.shape}")
    if not mask.any():
        raise ValueError("mask selects no position: the mean over zero tokens is undefined")
    return float(values[mask].mean())


def distillation_loss(teacher_logits: np.ndarray, student_logits: np.ndarray, mask: np.ndarray | None = None) -> float:
    """The training loss: equation (1) averaged over positions (nats per token).

    Reduction: the *mean over positions* of the per-token sum over the vocabulary; `mask` (the
    positions shape (...), True = counted) restricts the mean to some positions, e.g. to leave out
    padding. With a one-hot teacher this is the ordinary next-token cross-entropy."""
    return _masked_mean(distillation_per_token(teacher_logits, student_logits), mask)


def kl_loss(teacher_logits: np.ndarray, student_logits: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean KL(P_T || P_S) over positions: `distillation_loss` minus the teacher's mean entropy."""
    return _masked_mean(kl_per_token(teacher_logits, student_logits), mask)
