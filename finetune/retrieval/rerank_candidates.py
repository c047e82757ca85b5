"""A search's top candidates reranked by a cross-encoder: ``python -m finetune.evaluate --reranker``.

    run = evaluate_model(model, dataset, return_run=True)["run"]         # the bi-encoder's top 100 per query
    score = cross_encoder_scorer(load_cross_encoder(path), batch_size=64)
    reranked = rerank_top_k(score, dataset, run, k=20)                    # a run: metrics as for any other

The rule: each query's first ``k`` documents of the search (in the order its metrics rank them) are reordered by
the cross-encoder's score; the documents below ``k`` follow them in the search's own order. So ``k = 1`` changes
nothing, and a metric that looks deeper than ``k`` (recall@100 with ``k < 100``) mixes both orders.
"""

from __future__ import annotations

import torch

from finetune.data.text import TextSide
from finetune.retrieval.evaluation import Run, rank
from finetune.retrieval.reranking import ScorePairs, rerank_run
from finetune.retrieval.sets import RetrievalSet


def rerank_top_k(score_pairs: ScorePairs, dataset: RetrievalSet, run: Run, k: int, *,
                 query: TextSide = TextSide(), document: TextSide = TextSide(), batch_size: int = 64) -> Run:
    """``run`` with each query's top ``k`` documents reordered by ``score_pairs`` (see the module's rule).

    Shapes: ``score_pairs`` gets ``batch_size`` (or fewer) queries and as many documents, the prompted texts of
    (query, candidate) pairs, and returns their (n,) scores, higher = more relevant. For each query of ``run`` with
    m documents, min(k, m) pairs are scored. The returned run holds the same documents per query; its scores are
    the new ranks turned into numbers (m for the first document down to 1 for the last), so ``rank`` gives the
    reranked order back. Equal cross-encoder scores are ordered as ``rank`` orders them: by document id, descending.
    The pairs are scored by ``rerank_run``, ``batch_size`` at a time (a progress bar over the batches).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    searched = {qid: rank(scores) for qid, scores in run.items()}
    scored = rerank_run(score_pairs, dataset, {qid: docs[:k] for qid, docs in searched.items()}, query=query,
                        document=document, batch_size=batch_size)
    reranked: Run = {}
    for qid, docs in searched.items():
        order = rank(scored.get(qid, {})) + docs[k:]
        reranked[qid] = {doc: float(len(order) - position) for position, doc in enumerate(order)}
    return reranked


def load_cross_encoder(name_or_path: str, *, device: str | torch.device | None = None):
    """A ``sentence_transformers.CrossEncoder`` (a folder or a Hub id) that gives one score per pair; a model that
    cannot be loaded, or gives several scores per pair, is a one-line ``ValueError``."""
    from sentence_transformers import CrossEncoder

    try:
        model = CrossEncoder(name_or_path, device=None if device is None else str(device))
    except (OSError, ValueError) as error:  # a missing folder, an unknown Hub id offline, a folder of another kind
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--reranker {name_or_path!r} does not load as a CrossEncoder: {first_line}") from error
    if model.num_labels != 1:
        raise ValueError(f"--reranker {name_or_path!r} gives {model.num_labels} scores per pair; reranking needs "
                         "one (num_labels=1).")
    return model


def cross_encoder_scorer(model, *, batch_size: int = 64) -> ScorePairs:
    """(queries, documents) -> (n,) fp32 raw scores (logits) of a CrossEncoder; its saved activation (a sigmoid,
    say) is skipped: monotone, it would rank alike, and squeezing large logits towards 1 only makes ties."""
    identity = torch.nn.Identity()

    def score(queries: list[str], documents: list[str]) -> torch.Tensor:
        return model.predict(list(zip(queries, documents)), batch_size=batch_size, activation_fn=identity,
                             convert_to_tensor=True, show_progress_bar=False).float().cpu()

    return score
