"""Cross-encoder (reranker) objectives: what training minimises, given the scores of each query's candidates.

A reranker scores (query, document) pairs; a batch holds each query's positive and its k hard negatives in the
collator's document layout (positives first, then the negatives query by query), so the scores regroup into
(B, 1+k) with the positive in column 0 (:func:`group_scores`). The losses:

- ``listwise``: softmax cross-entropy over each group, the positive the target (NeMo's and FlagEmbedding's
  rerankers); no in-batch negatives, a pair's score does not depend on other queries.
- ``pointwise``: binary cross-entropy of every pair (positive 1, negatives 0).
- distillation (``--distillation kl|margin_mse``): the student's group logits against the teacher scores the
  records carry (``pos_scores``/``neg_scores``), with the bi-encoder's distillation losses at scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from finetune.objectives.base import ObjectiveOutput
from finetune.objectives.losses import kl_distillation_loss, margin_mse_loss, own_teacher_scores

RERANKER_LOSSES = ("listwise", "pointwise")


def group_scores(scores: torch.Tensor, batch: int) -> torch.Tensor:
    """Scores in the collator's document layout (B*(1+k),) -> (B, 1+k), column 0 the positive."""
    num_negatives = scores.shape[0] // batch - 1
    return torch.cat([scores[:batch, None], scores[batch:].view(batch, num_negatives)], dim=1)


def listwise_loss(groups: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the positive (column 0) among its group. Shapes: (B, 1+k) logits -> scalar (fp32)."""
    return F.cross_entropy(groups.float(), torch.zeros(groups.shape[0], dtype=torch.long, device=groups.device))


def pointwise_loss(groups: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of every pair: the positive (column 0) 1, the negatives 0. (B, 1+k) -> scalar (fp32)."""
    labels = torch.zeros_like(groups, dtype=torch.float32)
    labels[:, 0] = 1.0
    return F.binary_cross_entropy_with_logits(groups.float(), labels)


@dataclass
class RerankerObjective:
    """``loss`` (a name of RERANKER_LOSSES) x ``ranking_weight`` + ``distillation`` x ``distillation_weight``.

    Called with the pair scores (B*(1+k),) and the teacher scores in the same layout (or None).
    """

    loss: str = "listwise"
    ranking_weight: float = 1.0
    distillation: str = "none"
    distillation_weight: float = 1.0
    teacher_temperature: float = 1.0

    def __post_init__(self):
        if self.loss not in RERANKER_LOSSES:
            raise ValueError(f"--reranker_loss must be one of {RERANKER_LOSSES}, got {self.loss!r}.")

    @property
    def needs_scores(self) -> bool:
        return self.distillation != "none"

    def __call__(self, scores: torch.Tensor, batch: int, doc_scores: torch.Tensor | None = None) -> ObjectiveOutput:
        groups = group_scores(scores, batch)
        ranking = listwise_loss(groups) if self.loss == "listwise" else pointwise_loss(groups)
        components = {self.loss: ranking.detach()}
        total = self.ranking_weight * ranking
        if self.needs_scores and doc_scores is not None:
            teacher = own_teacher_scores(doc_scores, batch=batch, num_negatives=groups.shape[1] - 1)
            distill = (kl_distillation_loss if self.distillation == "kl" else margin_mse_loss)(
                groups, teacher, scale=1.0, teacher_temperature=self.teacher_temperature)
            components[self.distillation] = distill.detach()
            total = total + self.distillation_weight * distill
        return ObjectiveOutput(total, components)


def build_reranker_objective(training_args) -> RerankerObjective:
    """The objective of ``--reranker_loss``, ``--ranking_weight`` and ``--distillation`` (+ its weight, temperature)."""
    return RerankerObjective(loss=training_args.reranker_loss, ranking_weight=training_args.ranking_weight,
                             distillation=training_args.distillation,
                             distillation_weight=training_args.distillation_weight,
                             teacher_temperature=training_args.teacher_temperature)
