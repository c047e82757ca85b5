"""Multiple-negatives ranking loss over query and document embeddings (pure functions).

Batch layout used everywhere in this project: for B queries with k hard negatives each,
documents are ordered ``[pos_0 .. pos_{B-1}, neg_0_0 .. neg_0_{k-1}, neg_1_0 .., neg_{B-1}_{k-1}]``,
so query i's positive is document i and its own negatives are ``B + i*k .. B + i*k + k - 1``.

With several data-parallel processes the documents of all of them are concatenated, one such
block per process (``num_shards`` blocks); the local queries belong to block ``shard_index``.
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
    shard_index: int = 0,
    num_shards: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled cosine scores of each query against its candidate documents, in fp32, and the target columns.

    Shapes:
        query_emb: (B, D); doc_emb: (S*B*(1+k), D), S = num_shards blocks in the layout above;
        doc_keys: optional (S*B*(1+k),) int64 content hashes of the document texts.
        returns scores and labels (B,):
        ``shared`` (B, S*B*(1+k)): every query against every document of every block (sentence-transformers);
        ``exclusive`` (B, S*B + k): every positive of every block plus only the query's own k negatives (NeMo).

    scale = 1/temperature. A candidate whose key equals the key of the query's positive (the same
    text appearing twice in the global batch) gets -inf: it is neither a negative nor the target.
    """
    if mode not in NEGATIVE_MODES:
        raise ValueError(f"Unknown hard-negative mode {mode!r}; expected one of {NEGATIVE_MODES}.")
    batch = query_emb.shape[0]
    block = batch * (1 + num_negatives)
    if doc_emb.shape[0] != num_shards * block:
        raise ValueError(
            f"Expected {num_shards}*{batch}*(1+{num_negatives}) = {num_shards * block} documents "
            f"for {batch} queries, got {doc_emb.shape[0]}.")
    rows = torch.arange(batch, device=query_emb.device)
    # fp32 whatever the autocast dtype: logits of scale 100 overflow fp16 softmax.
    query = F.normalize(query_emb.float(), dim=-1)  # (B, D)
    docs = F.normalize(doc_emb.float(), dim=-1)  # (S*B*(1+k), D)
    keys = None if doc_keys is None else doc_keys.view(num_shards, block)
    if mode == "shared" or num_negatives == 0:  # without hard negatives the two modes coincide
        scores = query @ docs.T  # (B, S*block)
        labels = shard_index * block + rows
        candidate_keys = None if keys is None else keys.reshape(1, -1).expand(batch, -1)
    else:
        blocks = docs.view(num_shards, block, -1)
        positives = blocks[:, :batch].reshape(num_shards * batch, -1)  # (S*B, D)
        negatives = blocks[shard_index, batch:].view(batch, num_negatives, -1)  # (B, k, D)
        scores = torch.cat([query @ positives.T, torch.einsum("bd,bkd->bk", query, negatives)], dim=1)  # (B, S*B+k)
        labels = shard_index * batch + rows
        candidate_keys = None
        if keys is not None:
            positive_keys = keys[:, :batch].reshape(1, -1).expand(batch, -1)  # (B, S*B)
            own_negative_keys = keys[shard_index, batch:].view(batch, num_negatives)  # (B, k)
            candidate_keys = torch.cat([positive_keys, own_negative_keys], dim=1)
    scores = scores * scale
    if candidate_keys is not None:
        target_keys = candidate_keys.gather(1, labels.unsqueeze(1))  # (B, 1)
        duplicate = candidate_keys == target_keys  # (B, C)
        duplicate[rows, labels] = False  # the positive itself stays
        scores = scores.masked_fill(duplicate, float("-inf"))
    return scores, labels


def ranking_loss(
    query_emb: torch.Tensor,
    doc_emb: torch.Tensor,
    doc_keys: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """Mean cross-entropy of each query against its positive among its candidates (fp32 scalar).

    Shapes and options (num_negatives, scale, mode, shard_index, num_shards) as in :func:`ranking_scores`.
    """
    scores, labels = ranking_scores(query_emb, doc_emb, doc_keys, **options)
    return F.cross_entropy(scores, labels)
