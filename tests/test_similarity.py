"""Retrieval evaluation ranks by the similarity the model declares (cosine), also for --normalize false models."""

import pytest
import torch

from conftest import make_records
from finetune.retrieval.evaluation import RetrievalEvaluator, evaluate_model, evaluate_retrieval
from finetune.retrieval.sets import RetrievalSet, retrieval_set_from_records
from finetune.model.embedding_model import EmbeddingModel
from finetune.data.text import TextSide

# One query; "good" points the query's way (cosine 1, dot 1); "long" is a longer vector at 45 degrees
# (cosine 0.71, dot 3): cosine ranks "good" first, a raw dot product "long".
VECTORS = {"query": [1.0, 0.0], "good": [1.0, 0.0], "long": [3.0, 3.0]}
DATASET = RetrievalSet(queries={"q": "query"}, corpus={"d1": "good", "d2": "long"}, qrels={"q": {"d1": 1}},
                       groups=[("q", ["d2"])])


def encode(texts):
    return torch.tensor([VECTORS[text] for text in texts])


def test_cosine_ranking_for_unnormalised_embeddings():
    cosine = evaluate_retrieval(encode, encode, DATASET)
    assert cosine["ndcg@10"] == pytest.approx(1.0) and cosine["recall@1"] == 1.0
    assert cosine["ingroup_accuracy"] == 1.0
    dot = evaluate_retrieval(encode, encode, DATASET, similarity="dot")
    assert dot["recall@1"] == 0.0 and dot["ingroup_accuracy"] == 0.0
    assert evaluate_retrieval(encode, encode, DATASET, similarity="manhattan") == cosine  # with a warning


def test_unnormalised_model_is_evaluated_like_its_normalised_twin(tiny_bert, tmp_path):
    """Same encoder with and without the Normalize module: cosine similarity makes their rankings identical."""
    dataset = retrieval_set_from_records(make_records(10, seed=21))
    sides = dict(query=TextSide(max_length=32), document=TextSide(max_length=64))
    evaluator = RetrievalEvaluator(dataset, **sides, batch_size=4)
    raw = EmbeddingModel.from_pretrained(tiny_bert, normalize=False)
    unit = EmbeddingModel.from_pretrained(tiny_bert, normalize=True)
    norms = raw.encode(list(dataset.corpus.values())).norm(dim=-1)
    assert (norms.max() - norms.min()) > 1e-3  # the raw embeddings really differ in length
    ours_raw, ours_unit = evaluator(raw), evaluator(unit)
    for name in ("ndcg@10", "mrr@10", "recall@1", "ingroup_mrr"):
        assert ours_raw[name] == pytest.approx(ours_unit[name], abs=1e-6), name
    raw.save_pretrained(str(tmp_path / "raw"))
    unit.save_pretrained(str(tmp_path / "unit"))
    theirs_raw = evaluate_model(str(tmp_path / "raw"), dataset, batch_size=4, max_seq_length=None)
    theirs_unit = evaluate_model(str(tmp_path / "unit"), dataset, batch_size=4, max_seq_length=None)
    for name in ("ndcg@10", "mrr@10", "recall@1", "ingroup_mrr"):
        assert theirs_raw[name] == pytest.approx(theirs_unit[name], abs=1e-6), name
