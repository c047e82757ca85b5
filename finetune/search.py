"""Exact nearest-neighbour search in bounded memory (torch, chunked).

Shapes: query_emb (Q, D), corpus_emb (N, D) -> scores (Q, k), indices (Q, k), best first.
Never materialises the full (Q, N) matrix: at most (query_chunk, corpus_chunk) scores at once.
"""

from __future__ import annotations

import torch


def chunked_topk(query_emb: torch.Tensor, corpus_emb: torch.Tensor, k: int, *, query_chunk: int = 1024,
                 corpus_chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k dot-product scores of every query over the corpus (cosine for normalised embeddings).

    The corpus may be stored in fp16 to halve memory; each chunk is scored in fp32.
    """
    k = min(k, corpus_emb.shape[0])
    all_scores, all_indices = [], []
    for q_start in range(0, query_emb.shape[0], query_chunk):
        queries = query_emb[q_start:q_start + query_chunk].float()  # (q, D)
        best_scores = torch.full((queries.shape[0], 0), float("-inf"))
        best_indices = torch.zeros((queries.shape[0], 0), dtype=torch.long)
        for c_start in range(0, corpus_emb.shape[0], corpus_chunk):
            scores = queries @ corpus_emb[c_start:c_start + corpus_chunk].float().T  # (q, c)
            chunk_scores, chunk_indices = scores.topk(min(k, scores.shape[1]), dim=1)
            merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
            merged_indices = torch.cat([best_indices, chunk_indices + c_start], dim=1)
            best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            best_indices = merged_indices.gather(1, order)
        all_scores.append(best_scores)
        all_indices.append(best_indices)
    return torch.cat(all_scores), torch.cat(all_indices)
