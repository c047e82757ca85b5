"""Training objectives: what the trainer minimises, given the embeddings of one batch.

The trainer encodes a batch, calls :func:`gather_batch` (the documents of every data-parallel
process, when global in-batch negatives are on) and hands the resulting :class:`EmbeddedBatch` to
the objective, which returns an :class:`ObjectiveOutput`: the loss to back-propagate plus named
components for the logs (``loss_ranking``...). The objective never encodes, so GradCache (which
differentiates the loss with respect to the embeddings) works for every objective unchanged.

An objective is any callable ``(EmbeddedBatch) -> ObjectiveOutput``; :func:`build_objective` turns
the training arguments into one (``finetune.objectives.builtin``). Pure scoring functions with shape
contracts live in ``finetune.objectives.losses``; objectives only choose and combine them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch

from finetune.training.distributed import gather_rows, world

@dataclass
class EmbeddedBatch:
    """One batch as an objective sees it (document layout of ``finetune.objectives.losses``).

    Shapes: query_emb (B, D), the local queries; doc_emb (S*B*(1+k), D), one block of B positives
    followed by B*k hard negatives per process (S = num_shards blocks, this process's block is
    ``shard_index``); doc_keys (S*B*(1+k),) int64 content hashes (duplicate masking); doc_scores
    (S*B*(1+k),) float teacher scores in the same order, or None when the data has none; all_query_emb
    (S*B, D) and query_keys (S*B,): the queries of every process in rank order, gathered only for
    objectives that score queries against each other (else all_query_emb is query_emb). guide_query_emb (B, D')
    and guide_doc_emb (S*B*(1+k), D'): a frozen guide model's embeddings of the same texts
    (``finetune.objectives.guide``), only for an objective that has a ``guide``; Matryoshka truncation keeps them.
    """

    query_emb: torch.Tensor
    doc_emb: torch.Tensor
    doc_keys: torch.Tensor | None = None
    doc_scores: torch.Tensor | None = None
    shard_index: int = 0
    num_shards: int = 1
    all_query_emb: torch.Tensor | None = None
    query_keys: torch.Tensor | None = None
    dataset_index: int | None = None  # which dataset of a blend the batch comes from (finetune.data.blend)
    guide_query_emb: torch.Tensor | None = None
    guide_doc_emb: torch.Tensor | None = None

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
    ``needs_scores``, the objective reads teacher scores (``doc_scores``); ``guide`` (default None), a
    ``finetune.objectives.guide.GuideEncoder`` whose embeddings of the batch the objective reads."""

    def __call__(self, batch: EmbeddedBatch) -> ObjectiveOutput: ...


def gather_batch(query_emb: torch.Tensor, doc_emb: torch.Tensor, doc_keys: torch.Tensor | None = None,
                 doc_scores: torch.Tensor | None = None, *, gather: bool, backprop: str = "global",
                 query_keys: torch.Tensor | None = None, gather_queries: bool = False,
                 gather_scores: bool = False, dataset_index: int | None = None,
                 guide_query_emb: torch.Tensor | None = None,
                 guide_doc_emb: torch.Tensor | None = None) -> EmbeddedBatch:
    """The local queries against the documents of every process (``gather`` and several processes), else the local ones.

    ``backprop``: 'global' or 'local' gradients through the gathered documents (and, with
    ``gather_queries``, queries) (``gather_rows``); keys, scores and a guide's documents (``guide_doc_emb``,
    gathered when given) carry no gradient. Teacher scores are
    gathered only with ``gather_scores`` (an objective that reads them; the data then has them on every
    process), else dropped, so that no process enters a gather the others skip. A no-op in a single process.
    """
    rank, size = world() if gather else (0, 1)
    all_query_emb = query_emb
    if size > 1:
        doc_emb = gather_rows(doc_emb, backprop)  # (S*B*(1+k), D)
        doc_keys = None if doc_keys is None else gather_rows(doc_keys, "local")
        doc_scores = gather_rows(doc_scores, "local") if gather_scores and doc_scores is not None else None
        guide_doc_emb = None if guide_doc_emb is None else gather_rows(guide_doc_emb, "local")
        if gather_queries:
            all_query_emb = gather_rows(query_emb, backprop)  # (S*B, D)
            query_keys = None if query_keys is None else gather_rows(query_keys, "local")
        else:  # local keys cannot index the global batch
            query_keys = None
    return EmbeddedBatch(query_emb, doc_emb, doc_keys, doc_scores, shard_index=rank, num_shards=size,
                         all_query_emb=all_query_emb, query_keys=query_keys, dataset_index=dataset_index,
                         guide_query_emb=guide_query_emb, guide_doc_emb=guide_doc_emb)


def batch_for_objective(objective: Objective, query_emb: torch.Tensor, doc_emb: torch.Tensor, inputs: dict, *,
                        gather: bool, backprop: str = "global") -> EmbeddedBatch:
    """:func:`gather_batch` of a TripletCollator batch (``inputs``), gathering what ``objective`` needs (and
    embedding the batch with its ``guide``, if it has one)."""
    dataset_index = inputs.get("dataset_index")
    guide = getattr(objective, "guide", None)
    guide_query_emb, guide_doc_emb = guide(inputs) if guide is not None else (None, None)
    return gather_batch(query_emb, doc_emb, inputs["doc_keys"], inputs.get("doc_scores"), gather=gather,
                        backprop=backprop, query_keys=inputs.get("query_keys"),
                        gather_queries=getattr(objective, "needs_all_queries", False),
                        gather_scores=getattr(objective, "needs_scores", False),
                        dataset_index=None if dataset_index is None else int(dataset_index),
                        guide_query_emb=guide_query_emb, guide_doc_emb=guide_doc_emb)
