"""Exact nearest-neighbour search in bounded memory (torch, chunked; or a faiss exact inner-product index).

Shapes: query_emb (Q, D), corpus_emb (N, D) -> scores (Q, k), indices (Q, k), best first.
Never materialises the full (Q, N) matrix: at most (query_chunk, corpus_chunk) scores at once.
"""

from __future__ import annotations

import torch


def chunked_topk(query_emb: torch.Tensor, corpus_emb: torch.Tensor, k: int, *, query_chunk: int = 1024,
                 corpus_chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k dot-product scores of every query over the corpus (cosine for normalised embeddings).

    The corpus may be stored in fp16 to halve memory; each chunk is scored in fp32. Works on any
    device; the results are on the queries' device.
    """
    k = min(k, corpus_emb.shape[0])
    device = query_emb.device
    all_scores, all_indices = [], []
    for q_start in range(0, query_emb.shape[0], query_chunk):
        queries = query_emb[q_start:q_start + query_chunk].float()  # (q, D)
        best_scores = torch.full((queries.shape[0], 0), float("-inf"), device=device)
        best_indices = torch.zeros((queries.shape[0], 0), dtype=torch.long, device=device)
        for c_start in range(0, corpus_emb.shape[0], corpus_chunk):
            scores = queries @ corpus_emb[c_start:c_start + corpus_chunk].to(device).float().T  # (q, c)
            chunk_scores, chunk_indices = scores.topk(min(k, scores.shape[1]), dim=1)
            merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
            merged_indices = torch.cat([best_indices, chunk_indices + c_start], dim=1)
            best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
            best_indices = merged_indices.gather(1, order)
        all_scores.append(best_scores)
        all_indices.append(best_indices)
    if not all_scores:
        return torch.empty((0, k), device=device), torch.empty((0, k), dtype=torch.long, device=device)
    return torch.cat(all_scores), torch.cat(all_indices)


class FaissExactSearch:
    """Exact inner-product search with a faiss ``IndexFlatIP`` (no approximation: same top-k as ``chunked_topk``).

    faiss keeps its own fp32 copy of the corpus (4 bytes x N x D), added chunk by chunk so that no
    second full-size temporary exists. Use ``topk`` as a drop-in for ``chunked_topk``.
    """

    def __init__(self, corpus_emb: torch.Tensor, *, corpus_chunk: int = 65536):
        import faiss

        self.index = faiss.IndexFlatIP(corpus_emb.shape[1])
        for start in range(0, corpus_emb.shape[0], corpus_chunk):
            self.index.add(corpus_emb[start:start + corpus_chunk].float().cpu().contiguous().numpy())

    def topk(self, query_emb: torch.Tensor, k: int, *, query_chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, self.index.ntotal)
        scores, indices = [], []
        for start in range(0, query_emb.shape[0], query_chunk):
            chunk_scores, chunk_indices = self.index.search(query_emb[start:start + query_chunk].float().cpu().contiguous().numpy(), k)
            scores.append(torch.from_numpy(chunk_scores))
            indices.append(torch.from_numpy(chunk_indices))
        if not scores:
            return torch.empty((0, k)), torch.empty((0, k), dtype=torch.long)
        return torch.cat(scores), torch.cat(indices)
