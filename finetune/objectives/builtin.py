"""The objectives this project ships (ranking, distillation, their weighted sum, Matryoshka, per-dataset dispatch)
and :func:`build_objective`, which turns the training arguments into one. The interface: ``finetune.objectives.base``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from finetune.objectives.base import EmbeddedBatch, Objective, ObjectiveOutput
from finetune.objectives.losses import (false_negative_mask, kl_distillation_loss, margin_mse_loss,
                                        own_candidate_scores, own_teacher_scores, ranking_loss, ranking_scores,
                                        teacher_guide_scores)

@dataclass
class RankingObjective:
    """Multiple-negatives ranking loss (in-batch + hard negatives), ``finetune.objectives.losses.ranking_loss``.

    ``scale`` = 1/temperature; ``mode``: 'shared' or 'exclusive' hard negatives (for ``query_to_doc``);
    ``directions``: ``query_to_doc`` (default, sentence-transformers' and NeMo's loss) plus any of
    ``doc_to_query``, ``query_to_query``, ``doc_to_doc`` in one joint softmax (GTE's improved contrastive loss).

    ``false_negative_margin`` (None = off): the ``query_to_doc`` candidates (in-batch and hard negatives, over
    the global batch) that ``false_negative_guide`` scores above the positive's score minus the margin are
    dropped from the softmax (``losses.false_negative_mask``); their number is the ``false_negatives_masked``
    component. Guides: 'self' (this model's cosine, detached), 'teacher' (the batch's ``doc_scores``; only each
    query's own candidates have one, so in-batch candidates are kept; no masking for a batch without scores),
    'model' (``guide``'s cosine, a ``finetune.objectives.guide.GuideEncoder``). ``hardness_weighting`` alpha > 0:
    negatives weighted by exp(alpha x cosine) in the softmax (``losses.hardness_weighted_scores``).
    """

    scale: float = 20.0
    mode: str = "shared"
    directions: tuple[str, ...] = ("query_to_doc",)
    name: str = "ranking"
    false_negative_margin: float | None = None
    false_negative_guide: str = "self"
    guide: object | None = None
    hardness_weighting: float = 0.0

    @property
    def needs_all_queries(self) -> bool:
        return any(direction in self.directions for direction in ("doc_to_query", "query_to_query"))

    @property
    def needs_scores(self) -> bool:
        return self.false_negative_margin is not None and self.false_negative_guide == "teacher"

    def __call__(self, batch: EmbeddedBatch) -> ObjectiveOutput:
        false_negatives = None if self.false_negative_margin is None else self.likely_false_negatives(batch)
        loss = ranking_loss(batch.query_emb, batch.doc_emb, batch.doc_keys, num_negatives=batch.num_negatives,
                            scale=self.scale, mode=self.mode, shard_index=batch.shard_index,
                            num_shards=batch.num_shards, directions=self.directions,
                            all_query_emb=batch.all_query_emb, query_keys=batch.query_keys,
                            false_negatives=false_negatives, hardness_weighting=self.hardness_weighting)
        components = {f"loss_{self.name}": loss}
        if self.false_negative_margin is not None:
            components["false_negatives_masked"] = (loss.new_zeros(()) if false_negatives is None
                                                    else false_negatives.sum().float())
        return ObjectiveOutput(loss, components)

    def likely_false_negatives(self, batch: EmbeddedBatch) -> torch.Tensor | None:
        """(B, C) bool over the candidates of ``losses.ranking_scores``: True = dropped; None when the guide has no
        scores for this batch (teacher scores missing)."""
        where = dict(num_negatives=batch.num_negatives, mode=self.mode, shard_index=batch.shard_index,
                     num_shards=batch.num_shards)
        if self.false_negative_guide == "teacher":
            if batch.doc_scores is None:
                return None
            guide, labels = teacher_guide_scores(batch.doc_scores, batch=batch.query_emb.shape[0],
                                                 doc_keys=batch.doc_keys, **where)
        else:
            query_emb, doc_emb = ((batch.guide_query_emb, batch.guide_doc_emb) if self.false_negative_guide == "model"
                                  else (batch.query_emb, batch.doc_emb))
            if query_emb is None:
                raise ValueError("--false_negative_guide model: the batch has no guide embeddings (the objective "
                                 "needs its guide, finetune.objectives.guide.GuideEncoder).")
            guide, labels = ranking_scores(query_emb.detach(), doc_emb.detach(), batch.doc_keys, scale=1.0, **where)
        return false_negative_mask(guide, labels, margin=self.false_negative_margin)


@dataclass
class DistillationObjective:
    """Distillation from teacher scores (``doc_scores``) over each query's own positive and hard negatives.

    ``kind``: 'kl' (listwise KL divergence of the softmaxes) or 'margin_mse' (positive-minus-negative margins).
    Both compare logits: the student's are ``scale`` x cosine (the ranking loss's), the teacher's its score
    / ``teacher_temperature``.
    """

    kind: str = "kl"
    scale: float = 20.0
    teacher_temperature: float = 1.0
    name: str = "distillation"
    needs_scores = True

    def __call__(self, batch: EmbeddedBatch) -> ObjectiveOutput:
        if batch.doc_scores is None:  # validation data without scores (training data must have them: training/inputs.py checks)
            return ObjectiveOutput(batch.query_emb.sum() * 0.0)
        if batch.num_negatives < 1:
            raise ValueError("Distillation needs hard negatives (--num_hard_negatives >= 1) to compare candidates.")
        where = dict(num_negatives=batch.num_negatives, shard_index=batch.shard_index, num_shards=batch.num_shards)
        student = own_candidate_scores(batch.query_emb, batch.doc_emb, **where)  # (B, 1+k)
        teacher = own_teacher_scores(batch.doc_scores, batch=batch.query_emb.shape[0], **where)  # (B, 1+k)
        if self.kind == "kl":
            loss = kl_distillation_loss(student, teacher, scale=self.scale, teacher_temperature=self.teacher_temperature)
        else:
            loss = margin_mse_loss(student, teacher, scale=self.scale, teacher_temperature=self.teacher_temperature)
        return ObjectiveOutput(loss, {f"loss_{self.name}_{self.kind}": loss})


@dataclass
class WeightedSum:
    """``sum(weight x objective)``; components of every term are kept."""

    terms: list[tuple[float, Objective]]

    @property
    def needs_all_queries(self) -> bool:
        return any(getattr(objective, "needs_all_queries", False) for _, objective in self.terms)

    @property
    def needs_scores(self) -> bool:
        return any(getattr(objective, "needs_scores", False) for _, objective in self.terms)

    @property
    def guide(self):
        return first_guide(objective for _, objective in self.terms)

    def __call__(self, batch: EmbeddedBatch) -> ObjectiveOutput:
        outputs = [(weight, objective(batch)) for weight, objective in self.terms]
        loss = sum(weight * output.loss for weight, output in outputs)
        return ObjectiveOutput(loss, {name: value for _, output in outputs for name, value in output.components.items()})


@dataclass
class MatryoshkaObjective:
    """The inner objective on the embeddings truncated to each of ``dims`` (re-normalised), weighted and summed.

    Components: the inner ones per dimension (``loss_ranking_dim64``...). The full dimension is one of ``dims``
    when the user lists it (as sentence-transformers' MatryoshkaLoss).
    """

    inner: Objective
    dims: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def needs_all_queries(self) -> bool:
        return getattr(self.inner, "needs_all_queries", False)

    @property
    def needs_scores(self) -> bool:
        return getattr(self.inner, "needs_scores", False)

    @property
    def guide(self):
        return getattr(self.inner, "guide", None)

    def __call__(self, batch: EmbeddedBatch) -> ObjectiveOutput:
        loss, components = 0.0, {}
        for dim, weight in zip(self.dims, self.weights):
            output = self.inner(batch.truncated(dim))
            loss = loss + weight * output.loss
            components.update({f"{name}_dim{dim}": value for name, value in output.components.items()})
        return ObjectiveOutput(loss, components)


@dataclass
class DatasetDispatch:
    """Blended training: the objective of the batch's dataset, and a ``dataset_<name>`` component per training
    dataset (1 for the batch's, 0 for the others: the logs show the share of batches each dataset had).

    ``objectives[i]`` serves the dataset named ``names[i]`` (ids shared by training and validation datasets,
    ``BlendedTripletDataset.ids``); a batch of another dataset, or of none, gets ``default``.
    """

    objectives: dict[int, Objective]
    names: list[str]
    default: Objective
    logged: list[int] = field(default_factory=list)  # the training datasets' ids, whose shares are logged

    @property
    def needs_all_queries(self) -> bool:
        return any(getattr(objective, "needs_all_queries", False) for objective in self.objectives.values())

    @property
    def needs_scores(self) -> bool:
        return any(getattr(objective, "needs_scores", False) for objective in self.objectives.values())

    @property
    def guide(self):
        return first_guide(self.objectives.values())

    def __call__(self, batch: EmbeddedBatch) -> ObjectiveOutput:
        output = self.objectives.get(batch.dataset_index, self.default)(batch)
        shares = {f"dataset_{self.names[i]}": output.loss.new_tensor(float(i == batch.dataset_index))
                  for i in self.logged}
        return ObjectiveOutput(output.loss, {**output.components, **shares})


def first_guide(objectives):
    """The guide model of the first of ``objectives`` that has one (they share it), else None."""
    return next((guide for objective in objectives if (guide := getattr(objective, "guide", None)) is not None), None)


def build_objective(training_args, hard_negatives_mode: str | None = None, guide=None) -> Objective:
    """The objective the training arguments ask for.

    Ranking (``--ranking_weight``, --temperature, --hard_negatives_mode, --ranking_directions, with
    --false_negative_margin / --false_negative_guide and --hardness_weighting) plus distillation
    (``--distillation``, ``--distillation_weight``, --teacher_temperature), wrapped in Matryoshka dimensions
    (``--matryoshka_dims``) when given. The defaults give the ranking loss alone. ``guide``: the loaded
    ``--guide_model`` (``finetune.training.inputs.load_guide``), needed with ``--false_negative_guide model``.
    """
    args = training_args
    filtering = args.false_negative_margin is not None
    if filtering and args.false_negative_guide == "model" and guide is None:
        raise ValueError("--false_negative_guide model: build_objective needs the loaded --guide_model (guide=; "
                         "finetune.training.inputs.load_guide loads it).")
    ranking = RankingObjective(scale=args.scale, mode=hard_negatives_mode or args.hard_negatives_mode,
                               directions=tuple(args.ranking_directions),
                               false_negative_margin=args.false_negative_margin,
                               false_negative_guide=args.false_negative_guide,
                               guide=guide if filtering and args.false_negative_guide == "model" else None,
                               hardness_weighting=args.hardness_weighting)
    terms: list[tuple[float, Objective]] = []
    if args.ranking_weight > 0:
        terms.append((args.ranking_weight, ranking))
    if args.distillation != "none":
        terms.append((args.distillation_weight, DistillationObjective(args.distillation, scale=args.scale,
                                                                      teacher_temperature=args.teacher_temperature)))
    objective = terms[0][1] if len(terms) == 1 and terms[0][0] == 1.0 else WeightedSum(terms)
    if args.matryoshka_dims:
        objective = MatryoshkaObjective(objective, tuple(args.matryoshka_dims), tuple(args.matryoshka_weights))
    return objective
