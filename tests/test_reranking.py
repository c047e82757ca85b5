"""Reranking a candidate list: candidates from the records, pairs scored in batches, ranked by score."""

import torch

from finetune.data.text import TextSide
from finetune.retrieval.evaluation import compute_metrics
from finetune.retrieval.reranking import group_candidates, rerank_run
from finetune.retrieval.sets import retrieval_set_from_records

RECORDS = [{"question": "q one", "pos_doc": ["p1"], "neg_doc": ["n1", "n2"]},
           {"question": "q two", "pos_doc": ["p2", "p3"], "neg_doc": ["n1", "p1"]},
           {"question": "q one", "pos_doc": ["p1"], "neg_doc": ["n3", "n1"]}]


def test_group_candidates_are_positives_then_own_negatives_without_repeats():
    dataset = retrieval_set_from_records(RECORDS)
    text = {qid: [dataset.corpus[doc] for doc in docs] for qid, docs in group_candidates(dataset).items()}
    assert text == {"q0": ["p1", "n1", "n2", "n3"], "q1": ["p2", "p3", "n1", "p1"]}


def test_rerank_run_scores_prompted_pairs_in_batches_and_ranks_by_score():
    dataset = retrieval_set_from_records(RECORDS)
    seen = []

    def score(queries, documents):  # a "reranker" that likes documents starting with p, and counts its calls
        seen.append(list(zip(queries, documents)))
        return torch.tensor([1.0 if doc.startswith("d: p") else -float(len(doc)) for doc in documents])

    run = rerank_run(score, dataset, group_candidates(dataset), query=TextSide("q: "), document=TextSide("d: "),
                     batch_size=3)
    assert [len(batch) for batch in seen] == [3, 3, 2]  # 8 pairs in batches of 3
    assert seen[0][0] == ("q: q one", "d: p1")
    assert compute_metrics(run, dataset.qrels)["ndcg@10"] == 1.0  # every positive ranked first
    inverted = rerank_run(lambda q, d: -score(q, d), dataset, group_candidates(dataset), query=TextSide("q: "),
                          document=TextSide("d: "))
    assert compute_metrics(inverted, dataset.qrels)["ndcg@10"] < 1.0
