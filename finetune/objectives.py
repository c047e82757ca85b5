"""Training objectives: what the trainer minimises, given the embeddings of one batch.

The trainer encodes a batch, calls :func:`gather_batch` (the documents of every data-parallel
process, when global in-batch negatives are on) and hands the resulting :class:`EmbeddedBatch` to
the objective, which returns an :class:`ObjectiveOutput`: the loss to back-propagate plus named
components for the logs (``loss_ranking``...). The objective never encodes, so GradCache (which
differentiates the loss with respect to the embeddings) works for every objective unchanged.

An objective is any callable ``(EmbeddedBatch) -> ObjectiveOutput``; :func:`build_objective` turns
the training arguments into one. Pure scoring functions with shape contracts live in
``finetune.losses``; objectives only choose and combine them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch

from finetune.distributed import gather_rows, world
from finetune.losses import (kl_distillation_loss, margin_mse_loss, own_candidate_scores, own_teacher_scores,
                             ranking_loss)


@dataclass
class EmbeddedBatch:
    """One batch as an objective sees it (document layout of ``finetune.losses``).

    Shapes: query_emb (B, D), the local queries; doc_emb (S*B*(1+k), D), one block of B positives
    followed by B*k hard negatives per process (S = num_shards blocks, this process's block is
    ``shard_index``); doc_keys (S*B*(1+k),) int64 content hashes (duplicate masking); doc_scores
    (S*B*(1+k),) float teacher scores in the same order, or None when the data has none; all_query_emb
    (S*B, D) and query_keys (S*B,): the queries of every process in rank order, gathered only for
    objectives that score queries against each other (else all_query_emb is query_emb).
    """

    query_emb: torch.Tensor
    doc_emb: torch.Tensor
    doc_keys: torch.Tensor | None = None
    doc_scores: torch.Tensor | None = None
    shard_index: int = 0
    num_shards: int = 1
    all_query_emb: torch.Tensor | None = None
    query_keys: torch.Tensor | None = None
    dataset_index: int | None = None  # which dataset of a blend the batch comes from (finetune.blend)

    def __post_init__(self):
        if self.all_query_emb is None:
            self.all_query_emb = self.query_emb

    def truncated(self, dim: int) -> "EmbeddedBatch":
        """The same batch with embeddings cut to their first ``dim`` coordinates (Matryoshka); scores re-normalise."""
        return dataclasses.replace(self, query_emb=self.query_emb[:, :dim], doc_emb=self.doc_emb[:, :dim],
                                   all_query_emb=self.all_query_emb[:, :dim])

    @property
    def num_negatives(self) -> int:
        """k, the hard negatives per query."""
        return self.doc_emb.shape[0] // self.num_shards // self.query_emb.shape[0] - 1


@dataclass
class ObjectiveOutput:
    """``loss``: the scalar to back-propagate. ``components``: named scalars for the logs (``loss_<name>``)."""

    loss: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(Protocol):
    """Optional attributes (default False): ``needs_all_queries``, gather every process's queries too;
    ``needs_scores``, the objective reads teacher scores (``doc_scores``)."""

    def __call__(self, batch: EmbeddedBatch) -> ObjectiveOutput: ...


def gather_batch(query_emb: torch.Tensor, doc_emb: torch.Tensor, doc_keys: torch.Tensor | None = None,
                 doc_scores: torch.Tensor | None = None, *, gather: bool, backprop: str = "global",
                 query_keys: torch.Tensor | None = None, gather_queries: bool = False,
                 gather_scores: bool = False, dataset_index: int | None = None) -> EmbeddedBatch:
    """The local queries against the documents of every process (``gather`` and several processes), else the local ones.

    ``backprop``: 'global' or 'local' gradients through the gathered documents (and, with
    ``gather_queries``, queries) (``gather_rows``); keys and scores carry no gradient. Teacher scores are
    gathered only with ``gather_scores`` (an objective that reads them; the data then has them on every
    process), else dropped, so that no process enters a gather the others skip. A no-op in a single process.
    """
    rank, size = world() if gather else (0, 1)
    all_query_emb = query_emb
    if size > 1:
        doc_emb = gather_rows(doc_emb, backprop)  # (S*B*(1+k), D)
        doc_keys = None if doc_keys is None else gather_rows(doc_keys, "local")
        doc_scores = gather_rows(doc_scores, "local") if gather_scores and doc_scores is not None else None
        if gather_queries:
            all_query_emb = gather_rows(query_emb, backprop)  # (S*B, D)
            query_keys = None if query_keys is None else gather_rows(query_keys, "local")
        else:  # local keys cannot index the global batch
            query_keys = None
    return EmbeddedBatch(query_emb, doc_emb, doc_keys, doc_scores, shard_index=rank, num_shards=size,
                         all_query_emb=all_query_emb, query_keys=query_keys, dataset_index=dataset_index)


def batch_for_objective(objective: Objective, query_emb: torch.Tensor, doc_emb: torch.Tensor, inputs: dict, *,
                        gather: bool, backprop: str = "global") -> EmbeddedBatch:
    """:func:`gather_batch` of a TripletCollator batch (``inputs``), gathering what ``objective`` needs."""
    dataset_index = inputs.get("dataset_index")
    return gather_batch(query_emb, doc_emb, inputs["doc_keys"], inputs.get("doc_scores"), gather=gather,
                        backprop=backprop, query_keys=inputs.get("query_keys"),
                        gather_queries=getattr(objective, "needs_all_queries", False),
                        gather_scores=getattr(objective, "needs_scores", False),
                        dataset_index=None if dataset_index is None else int(dataset_index))


@dataclass
class RankingObjective:
    """Multiple-negatives ranking loss (in-batch + hard negatives), ``finetune.losses.ranking_loss``.

    ``scale`` = 1/temperature; ``mode``: 'shared' or 'exclusive' hard negatives (for ``query_to_doc``);
    ``directions``: ``query_to_doc`` (default, sentence-transformers' and NeMo's loss) plus any of
    ``doc_to_query``, ``query_to_query``, ``doc_to_doc`` in one joint softmax (GTE's improved contrastive loss).
    """

    scale: float = 20.0
    mode: str = "shared"
    directions: tuple[str, ...] = ("query_to_doc",)
    name: str = "ranking"

    @property
    def needs_all_queries(self) -> bool:
        return any(direction in self.directions for direction in ("doc_to_query", "query_to_query"))

    def __call__(self, batch: EmbeddedBatch) -> ObjectiveOutput:
        loss = ranking_loss(batch.query_emb, batch.doc_emb, batch.doc_keys, num_negatives=batch.num_negatives,
                            scale=self.scale, mode=self.mode, shard_index=batch.shard_index,
                            num_shards=batch.num_shards, directions=self.directions,
                            all_query_emb=batch.all_query_emb, query_keys=batch.query_keys)
        return ObjectiveOutput(loss, {f"loss_{self.name}": loss})


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
        if batch.doc_scores is None:  # validation data without scores (training data must have them: training_data.py checks)
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

    def __call__(self, batch: EmbeddedBatch) -> ObjectiveOutput:
        output = self.objectives.get(batch.dataset_index, self.default)(batch)
        shares = {f"dataset_{self.names[i]}": output.loss.new_tensor(float(i == batch.dataset_index))
                  for i in self.logged}
        return ObjectiveOutput(output.loss, {**output.components, **shares})


def build_objective(training_args, hard_negatives_mode: str | None = None) -> Objective:
    """The objective the training arguments ask for.

    Ranking (``--ranking_weight``, --temperature, --hard_negatives_mode, --ranking_directions) plus
    distillation (``--distillation``, ``--distillation_weight``, --teacher_temperature), wrapped in
    Matryoshka dimensions (``--matryoshka_dims``) when given. The defaults give the ranking loss alone.
    """
    args = training_args
    ranking = RankingObjective(scale=args.scale, mode=hard_negatives_mode or args.hard_negatives_mode,
                               directions=tuple(args.ranking_directions))
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
