"""Which vectors a retrieval compares: the similarity a model declares (cosine or dot product) as a transform of
its embeddings, so that every search is a dot product."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

SIMILARITIES = ("cosine", "dot")
logger = logging.getLogger("finetune.retrieval.similarity")


def ranking_similarity(similarity: str) -> str:
    """The similarity documents are ranked by: ``similarity`` when supported, else cosine (with a warning)."""
    if similarity not in SIMILARITIES:
        logger.warning("Similarity %r is not supported by the retrieval evaluation; ranking by cosine instead "
                       "(the same order as euclidean distance for normalised embeddings).", similarity)
        return "cosine"
    return similarity


def in_similarity_space(embeddings: torch.Tensor, similarity: str) -> torch.Tensor:
    """Embeddings whose dot products are the ``similarity`` scores: unit rows for cosine, unchanged for dot.

    Rows that are already unit vectors (normalising models) are left untouched, bit for bit. Other
    similarities (euclidean, manhattan) are ranked by cosine, with a warning.
    """
    if ranking_similarity(similarity) == "dot":
        return embeddings
    unit = ((embeddings.norm(dim=-1) - 1).abs() < 1e-5).unsqueeze(-1)  # (N, 1)
    return torch.where(unit, embeddings, F.normalize(embeddings, dim=-1))


def similarity_transform(similarity: str, dim: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """What is compared: embeddings cut to their first ``dim`` values (Matryoshka; None: whole), then put in the
    ``similarity``'s space (``in_similarity_space``). Shapes: (n, D) -> (n, dim)."""
    def transform(embeddings: torch.Tensor) -> torch.Tensor:
        return in_similarity_space(embeddings if dim is None else embeddings[:, :dim], similarity)
    return transform
