"""Exact nearest-neighbour search in bounded memory: chunked torch matrix products, or a faiss exact index per chunk.

Shapes: query_emb (Q, D), corpus (N, D) -> scores (Q, k), indices (Q, k), best first.
Never materialises the full (Q, N) matrix: at most (query_chunk, corpus_chunk) scores at once.
Order: score descending, then corpus row ascending, so equal scores (equal texts, equal embeddings)
come out the same way however the corpus is cut into chunks or shards. With torch this holds
exactly; faiss picks among equal scores at the k-th place of a chunk by its own rule.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def best_k(scores: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best entries of each row by (score descending, index ascending), in that order. Shapes: (Q, M) -> (Q, k)."""
    by_index = indices.argsort(dim=1, stable=True)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    by_score = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, by_score), indices.gather(1, by_score)


def chunk_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``best_k`` of a (Q, C) score matrix whose indices are its columns: ``torch.topk``, with exact tie order.

    topk chooses arbitrarily among scores equal to the k-th; only rows where such ties straddle the
    cut are sorted in full (stable, lowest column first).
    """
    k = min(k, scores.shape[1])
    values, columns = scores.topk(k, dim=1)
    if k:
        straddle = ((scores >= values[:, -1:]).sum(dim=1) > k).nonzero().squeeze(1)
        if len(straddle):
            order = scores[straddle].argsort(dim=1, descending=True, stable=True)[:, :k]
            columns[straddle] = order
            values[straddle] = scores[straddle].gather(1, order)
    return best_k(values, columns, k)


def _faiss_index(chunk: torch.Tensor, device: torch.device):
    """A faiss exact inner-product index over ``chunk`` (c, D): on the GPU of ``device`` when faiss has GPU support."""
    import faiss

    index = faiss.IndexFlatIP(chunk.shape[1])
    if device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        global _FAISS_GPU_RESOURCES
        _FAISS_GPU_RESOURCES = _FAISS_GPU_RESOURCES or faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(_FAISS_GPU_RESOURCES, device.index or 0, index)
    index.add(chunk.float().cpu().contiguous().numpy())
    return index


_FAISS_GPU_RESOURCES = None


def topk_over_chunks(query_emb: torch.Tensor, chunks: Iterable[tuple[int, torch.Tensor]], k: int, *,
                     query_chunk: int = 1024, use_faiss: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k dot-product scores of every query over a corpus given as (first row, (c, D) chunk) pairs.

    Each chunk is read once (fp16 chunks are scored in fp32) and scored against the queries
    ``query_chunk`` at a time; the running best k per query is merged with ``best_k``. Results are
    on the queries' device.
    """
    device = query_emb.device
    starts = range(0, query_emb.shape[0], query_chunk)
    best = [(torch.empty((len(query_emb[s:s + query_chunk]), 0), device=device),
             torch.empty((len(query_emb[s:s + query_chunk]), 0), dtype=torch.long, device=device)) for s in starts]
    for offset, chunk in chunks:
        if use_faiss:
            index = _faiss_index(chunk, device)
        else:
            chunk = chunk.to(device).float()  # (c, D)
        for slot, start in enumerate(starts):
            queries = query_emb[start:start + query_chunk].float()  # (q, D)
            if use_faiss:
                found_scores, found_indices = index.search(queries.cpu().contiguous().numpy(), min(k, index.ntotal))
                scores, columns = torch.from_numpy(found_scores).to(device), torch.from_numpy(found_indices).to(device)
            else:
                scores, columns = chunk_topk(queries @ chunk.T, k)  # (q, c) -> (q, k)
            best_scores, best_indices = best[slot]
            best[slot] = best_k(torch.cat([best_scores, scores], dim=1), torch.cat([best_indices, columns + offset], dim=1), k)
    if not best:
        return torch.empty((0, k), device=device), torch.empty((0, k), dtype=torch.long, device=device)
    return torch.cat([scores for scores, _ in best]), torch.cat([indices for _, indices in best])


def chunked_topk(query_emb: torch.Tensor, corpus_emb: torch.Tensor, k: int, *, query_chunk: int = 1024,
                 corpus_chunk: int = 65536, use_faiss: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k dot-product scores of every query over an in-memory corpus (cosine for normalised embeddings).

    The corpus may be stored in fp16 to halve memory; each chunk is scored in fp32 (``use_faiss``:
    by a faiss ``IndexFlatIP`` holding an fp32 copy of that chunk only). Works on any device.
    """
    chunks = ((start, corpus_emb[start:start + corpus_chunk]) for start in range(0, corpus_emb.shape[0], corpus_chunk))
    return topk_over_chunks(query_emb, chunks, k, query_chunk=query_chunk, use_faiss=use_faiss)
