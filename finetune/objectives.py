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

from dataclasses import dataclass, field
from typing import Protocol

import torch

from finetune.distributed import gather_rows, world
from finetune.losses import ranking_loss


@dataclass
class EmbeddedBatch:
    """One batch as an objective sees it (document layout of ``finetune.losses``).

    Shapes: query_emb (B, D), the local queries; doc_emb (S*B*(1+k), D), one block of B positives
    followed by B*k hard negatives per process (S = num_shards blocks, this process's block is
    ``shard_index``); doc_keys (S*B*(1+k),) int64 content hashes (duplicate masking); doc_scores
    (S*B*(1+k),) float teacher scores in the same order, or None when the data has none.
    """

    query_emb: torch.Tensor
    doc_emb: torch.Tensor
    doc_keys: torch.Tensor | None = None
    doc_scores: torch.Tensor | None = None
    shard_index: int = 0
    num_shards: int = 1

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
    def __call__(self, batch: EmbeddedBatch) -> ObjectiveOutput: ...


def gather_batch(query_emb: torch.Tensor, doc_emb: torch.Tensor, doc_keys: torch.Tensor | None = None,
                 doc_scores: torch.Tensor | None = None, *, gather: bool, backprop: str = "global") -> EmbeddedBatch:
    """The local queries against the documents of every process (``gather`` and several processes), else the local ones.

    ``backprop``: 'global' or 'local' gradients through the gathered documents (``gather_rows``);
    keys and scores carry no gradient. A no-op in a single process.
    """
    rank, size = world() if gather else (0, 1)
    if size > 1:
        doc_emb = gather_rows(doc_emb, backprop)  # (S*B*(1+k), D)
        doc_keys = None if doc_keys is None else gather_rows(doc_keys, "local")
        doc_scores = None if doc_scores is None else gather_rows(doc_scores, "local")
    return EmbeddedBatch(query_emb, doc_emb, doc_keys, doc_scores, shard_index=rank, num_shards=size)


@dataclass
class RankingObjective:
    """Multiple-negatives ranking loss (in-batch + hard negatives), ``finetune.losses.ranking_loss``.

    ``scale`` = 1/temperature; ``mode``: 'shared' or 'exclusive' hard negatives.
    """

    scale: float = 20.0
    mode: str = "shared"
    name: str = "ranking"

    def __call__(self, batch: EmbeddedBatch) -> ObjectiveOutput:
        loss = ranking_loss(batch.query_emb, batch.doc_emb, batch.doc_keys, num_negatives=batch.num_negatives,
                            scale=self.scale, mode=self.mode, shard_index=batch.shard_index,
                            num_shards=batch.num_shards)
        return ObjectiveOutput(loss, {f"loss_{self.name}": loss})


def build_objective(training_args) -> Objective:
    """The objective the training arguments ask for (today: the ranking loss of --temperature and --hard_negatives_mode)."""
    return RankingObjective(scale=training_args.scale, mode=training_args.hard_negatives_mode)
