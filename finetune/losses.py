"""Multiple-negatives ranking loss over query and document embeddings (pure functions).

Batch layout used everywhere in this project: for B queries with k hard negatives each,
documents are ordered ``[pos_0 .. pos_{B-1}, neg_0_0 .. neg_0_{k-1}, neg_1_0 .., neg_{B-1}_{k-1}]``,
so query i's positive is document i and its own negatives are ``B + i*k .. B + i*k + k - 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEGATIVE_MODES = ("shared", "exclusive")


def ranking_scores(
    query_emb: torch.Tensor,
    doc_emb: torch.Tensor,
    doc_keys: torch.Tensor | None = None,
    *,
    num_negatives: int,
    scale: float = 20.0,
    mode: str = "shared",
) -> torch.Tensor:
    """Scaled cosine scores of each query against its candidate documents, in fp32.

    Shapes:
        query_emb: (B, D); doc_emb: (B*(1+k), D) in the layout of this module's docstring;
        doc_keys: optional (B*(1+k),) int64 content hashes of the document texts.
        returns scores: ``shared`` (B, B*(1+k)), every query against every document;
        ``exclusive`` (B, B+k), every in-batch positive plus only the query's own k negatives
        (NeMo's scoring). The query's positive is column i in both modes.

    scale = 1/temperature. A candidate whose key equals the key of the query's positive
    (the same text appearing twice in the batch) gets -inf: it is neither a negative nor
    the target.
    """
    if mode not in NEGATIVE_MODES:
        raise ValueError(f"Unknown hard-negative mode {mode!r}; expected one of {NEGATIVE_MODES}.")
    batch = query_emb.shape[0]
    if doc_emb.shape[0] != batch * (1 + num_negatives):
        raise ValueError(
            f"Expected {batch}*(1+{num_negatives}) = {batch * (1 + num_negatives)} documents "
            f"for {batch} queries, got {doc_emb.shape[0]}."
        )
    # fp32 whatever the autocast dtype: logits of scale 100 overflow fp16 softmax.
    query = F.normalize(query_emb.float(), dim=-1)  # (B, D)
    docs = F.normalize(doc_emb.float(), dim=-1)  # (B*(1+k), D)
    if mode == "shared" or num_negatives == 0:  # without hard negatives the two modes coincide
        scores = query @ docs.T  # (B, B*(1+k))
        candidate_keys = None if doc_keys is None else doc_keys.unsqueeze(0).expand(batch, -1)
    else:
        positives, negatives = docs[:batch], docs[batch:].view(batch, num_negatives, -1)
        in_batch = query @ positives.T  # (B, B)
        own = torch.einsum("bd,bkd->bk", query, negatives)  # (B, k)
        scores = torch.cat([in_batch, own], dim=1)  # (B, B+k)
        candidate_keys = None
        if doc_keys is not None:
            pos_keys, neg_keys = doc_keys[:batch], doc_keys[batch:].view(batch, num_negatives)
            candidate_keys = torch.cat([pos_keys.unsqueeze(0).expand(batch, -1), neg_keys], dim=1)
    scores = scores * scale
    if candidate_keys is not None:
        target_keys = doc_keys[:batch].unsqueeze(1)  # (B, 1)
        duplicate = candidate_keys == target_keys  # (B, C)
        duplicate[torch.arange(batch), torch.arange(batch)] = False  # the positive itself stays
        scores = scores.masked_fill(duplicate, float("-inf"))
    return scores


def ranking_loss(
    query_emb: torch.Tensor,
    doc_emb: torch.Tensor,
    doc_keys: torch.Tensor | None = None,
    *,
    num_negatives: int,
    scale: float = 20.0,
    mode: str = "shared",
) -> torch.Tensor:
    """Mean cross-entropy of each query against its positive among its candidates (fp32 scalar).

    Shapes and arguments as in :func:`ranking_scores`; labels are ``arange(B)``.
    """
    scores = ranking_scores(query_emb, doc_emb, doc_keys, num_negatives=num_negatives, scale=scale, mode=mode)
    labels = torch.arange(scores.shape[0], device=scores.device)
    return F.cross_entropy(scores, labels)
