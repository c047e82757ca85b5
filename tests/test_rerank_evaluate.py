"""`python -m finetune.evaluate --reranker`: a bi-encoder's top k per query reranked by a cross-encoder, checked
against reranking by hand, a perfect stand-in reranker, the rule for the documents below k, and refused options."""

import json
import sys

import pytest
import torch

from conftest import make_records, write_jsonl
from finetune.metrics.retrieval.retrieval import METRIC_NAMES
from finetune.retrieval.evaluation import compute_metrics, evaluate_model, rank
from finetune.retrieval.rerank_candidates import rerank_top_k
from finetune.retrieval.sets import load_retrieval_set, retrieval_set_from_records

RECORDS = make_records(12, num_negatives=3, seed=21)  # 12 queries, 48 documents: all within the search's top 100


@pytest.fixture(scope="module")
def folders(tiny_bert, tmp_path_factory) -> dict[str, str]:
    """A tiny cross-encoder (random head), two tiny bi-encoders (mean and CLS pooling) and the data file."""
    from sentence_transformers import CrossEncoder

    from finetune.model.embedding_model import EmbeddingModel

    root = tmp_path_factory.mktemp("rerank")
    torch.manual_seed(0)
    CrossEncoder(tiny_bert, num_labels=1).save(str(root / "cross-encoder"))
    CrossEncoder(tiny_bert, num_labels=2).save(str(root / "two-labels"))
    EmbeddingModel.from_pretrained(tiny_bert, pooling="mean").save_pretrained(str(root / "mean"))
    EmbeddingModel.from_pretrained(tiny_bert, pooling="cls").save_pretrained(str(root / "cls"))
    return {"cross_encoder": str(root / "cross-encoder"), "two_labels": str(root / "two-labels"),
            "mean": str(root / "mean"), "cls": str(root / "cls"), "data": write_jsonl(root / "val.jsonl", RECORDS)}


def test_the_tiny_cross_encoder_loads_back_with_its_scores(folders, tiny_bert):
    from sentence_transformers import CrossEncoder

    from finetune.retrieval.rerank_candidates import load_cross_encoder

    pairs = [(record["question"], record["pos_doc"][0]) for record in RECORDS]
    loaded = load_cross_encoder(folders["cross_encoder"])
    assert isinstance(loaded, CrossEncoder) and loaded.num_labels == 1
    scores = loaded.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_tensor=True)
    assert scores.shape == (len(pairs),) and scores.std() > 0
    fresh = CrossEncoder(tiny_bert, num_labels=1)  # another random head: other scores
    assert not torch.allclose(fresh.predict(pairs, activation_fn=torch.nn.Identity(), convert_to_tensor=True), scores)


# --- the rule, on hand-made runs -----------------------------------------------------------------------------------

def hand_made_set():
    records = [{"question": "q a", "pos_doc": ["a1"], "neg_doc": ["a2", "a3", "a4", "a5", "a6"]},
               {"question": "q b", "pos_doc": ["b1"], "neg_doc": ["b2"]}]
    dataset = retrieval_set_from_records(records)
    ids = {text: doc for doc, text in dataset.corpus.items()}
    # The search's order: a6 a5 a4 a3 a2 a1 for "q a" (its positive last), b2 b1 for "q b".
    run = {"q0": {ids[f"a{n}"]: float(n) for n in range(1, 7)}, "q1": {ids["b2"]: 0.9, ids["b1"]: 0.1}}
    return dataset, run, ids


def test_the_top_k_is_reordered_by_the_scorer_and_the_rest_keeps_the_search_order():
    dataset, run, ids = hand_made_set()
    seen = []

    def prefers_low_numbers(queries, documents):  # a2 > a3 > ... ; counts the pairs it sees
        seen.extend(zip(queries, documents))
        return torch.tensor([-float(doc[-1]) for doc in documents])

    reranked = rerank_top_k(prefers_low_numbers, dataset, run, 3, batch_size=2)
    text = {qid: [dataset.corpus[doc] for doc in rank(scores)] for qid, scores in reranked.items()}
    assert text == {"q0": ["a4", "a5", "a6", "a3", "a2", "a1"], "q1": ["b1", "b2"]}
    assert len(seen) == 3 + 2  # top 3 of "q a", both documents of "q b"
    assert reranked["q0"].keys() == run["q0"].keys()
    assert compute_metrics(reranked, dataset.qrels)["ndcg@10"] != compute_metrics(run, dataset.qrels)["ndcg@10"]


def test_k_1_changes_no_order_and_equal_scores_are_ordered_by_document_id():
    dataset, run, ids = hand_made_set()
    one = rerank_top_k(lambda queries, documents: torch.zeros(len(documents)), dataset, run, 1)
    assert {qid: rank(scores) for qid, scores in one.items()} == {qid: rank(scores) for qid, scores in run.items()}
    tied = rerank_top_k(lambda queries, documents: torch.zeros(len(documents)), dataset, run, 6)
    assert rank(tied["q0"]) == sorted(run["q0"], reverse=True)  # trec_eval's tie order: doc id descending
    with pytest.raises(ValueError, match="k must be >= 1"):
        rerank_top_k(lambda queries, documents: torch.zeros(len(documents)), dataset, run, 0)


def test_prefixes_reach_the_scorer_and_the_bi_encoder_prompts_do_not():
    from finetune.data.text import TextSide

    dataset, run, _ = hand_made_set()
    seen = []
    rerank_top_k(lambda queries, documents: seen.extend(zip(queries, documents)) or torch.zeros(len(documents)),
                 dataset, run, 2, query=TextSide("Q: "), document=TextSide("D: "))
    assert seen == [("Q: q a", "D: a6"), ("Q: q a", "D: a5"), ("Q: q b", "D: b2"), ("Q: q b", "D: b1")]


# --- the command ---------------------------------------------------------------------------------------------------

def test_evaluate_model_returns_the_run_only_when_asked(folders):
    dataset = load_retrieval_set([folders["data"]])
    plain = evaluate_model(folders["mean"], dataset, batch_size=8)
    with_run = evaluate_model(folders["mean"], dataset, batch_size=8, return_run=True)
    assert "run" not in plain and with_run.keys() == {*plain, "run"}
    run = with_run.pop("run")
    assert set(run) == set(dataset.queries) and all(len(docs) == len(dataset.corpus) for docs in run.values())
    assert {name: plain[name] for name in METRIC_NAMES} == {name: with_run[name] for name in METRIC_NAMES}
    assert compute_metrics(run, dataset.qrels) == {name: plain[name] for name in METRIC_NAMES}


def hand_reranked_metrics(bi_encoder: str, cross_encoder: str, data: str, k: int) -> dict:
    """Reference, by hand: the bi-encoder's searched ranking (``evaluate_model``'s run, in the order its metrics rank
    it), every (query, candidate) pair of its top k scored in one ``CrossEncoder.predict`` call and sorted by score
    (equal scores: document id descending, trec_eval's order), then the rest as searched."""
    from sentence_transformers import CrossEncoder

    dataset = load_retrieval_set([data])
    run = evaluate_model(bi_encoder, dataset, return_run=True)["run"]
    searched = {qid: sorted(scores, key=lambda doc: (scores[doc], doc), reverse=True) for qid, scores in run.items()}
    pairs = [(qid, doc) for qid in dataset.queries for doc in searched[qid][:k]]
    scores = CrossEncoder(cross_encoder).predict([(dataset.queries[q], dataset.corpus[d]) for q, d in pairs],
                                                 batch_size=len(pairs), activation_fn=torch.nn.Identity()).tolist()
    score_of = dict(zip(pairs, scores))
    orders = {qid: sorted(docs[:k], key=lambda doc: (score_of[qid, doc], doc), reverse=True) + docs[k:]
              for qid, docs in searched.items()}
    return compute_metrics({qid: {doc: -float(position) for position, doc in enumerate(order)}
                            for qid, order in orders.items()}, dataset.qrels)


def test_command_reports_both_and_the_reranked_metrics_equal_reranking_by_hand(folders, tmp_path, capsys):
    from finetune.evaluate import __main__ as evaluate

    output_json = tmp_path / "metrics.json"
    output = evaluate.main(["--model_name_or_path", folders["mean"], folders["cls"], "--data", folders["data"],
                            "--reranker", folders["cross_encoder"], "--rerank_top_k", "5",
                            "--reranker_batch_size", "1000", "--output_json", str(output_json),
                            "--bootstrap_samples", "100", "--permutations", "100"])
    printed = capsys.readouterr().out
    assert json.loads(output_json.read_text()) == output
    assert output.keys() == {folders["mean"], folders["cls"], "comparisons"}
    for model in (folders["mean"], folders["cls"]):
        metrics = output[model]
        assert metrics.keys() == {*METRIC_NAMES, "ingroup_accuracy", "ingroup_mrr", "seconds", "reranked"}
        reranked = metrics["reranked"]
        assert reranked.keys() == {*METRIC_NAMES, "top_k", "pairs", "seconds"}
        assert reranked["top_k"] == 5 and reranked["pairs"] == 12 * 5
        expected = hand_reranked_metrics(model, folders["cross_encoder"], folders["data"], k=5)
        for name in METRIC_NAMES:
            assert reranked[name] == pytest.approx(expected[name], abs=1e-9), name
        assert any(reranked[name] != metrics[name] for name in METRIC_NAMES)  # the reranker did move documents
        assert reranked["recall@100"] == metrics["recall@100"]  # the same documents, reordered
        assert f"{model} reranked by {folders['cross_encoder']} (top 5 per query)" in printed
    assert "| metric     | bi-encoder | reranked | difference |" in printed
    assert f"| ndcg@10    | {output[folders['mean']]['ndcg@10']:.4f}     |" in printed


def test_k_1_reports_the_bi_encoder_metrics_unchanged(folders):
    from finetune.evaluate import __main__ as evaluate

    output = evaluate.main(["--model_name_or_path", folders["mean"], "--data", folders["data"],
                            "--reranker", folders["cross_encoder"], "--rerank_top_k", "1"])
    metrics = output[folders["mean"]]
    assert {name: metrics["reranked"][name] for name in METRIC_NAMES} == {name: metrics[name] for name in METRIC_NAMES}


@pytest.fixture
def perfect_reranker(monkeypatch):
    """CrossEncoder.predict replaced by a scorer that knows the answers: 1 for a relevant (query, document) pair,
    0 otherwise (prefixes "Q: " / "D: " expected); records every call's pairs and batch size."""
    from sentence_transformers import CrossEncoder

    relevant = {(record["question"], doc) for record in RECORDS for doc in record["pos_doc"]}
    calls = []

    def predict(self, pairs, batch_size=32, activation_fn=None, convert_to_tensor=False, **kwargs):
        calls.append((list(pairs), batch_size))
        assert all(query.startswith("Q: ") and doc.startswith("D: ") for query, doc in pairs)
        return torch.tensor([float((query[3:], doc[3:]) in relevant) for query, doc in pairs])

    monkeypatch.setattr(CrossEncoder, "predict", predict)
    return calls


@pytest.mark.parametrize("k", [100, 2])
def test_a_perfect_reranker_puts_every_positive_within_k_first(folders, perfect_reranker, k):
    from finetune.evaluate import __main__ as evaluate

    output = evaluate.main(["--model_name_or_path", folders["cls"], "--data", folders["data"],
                            "--reranker", folders["cross_encoder"], "--rerank_top_k", str(k),
                            "--reranker_batch_size", "7", "--reranker_query_prefix", "Q: ",
                            "--reranker_passage_prefix", "D: "])
    reranked = output[folders["cls"]]["reranked"]
    assert all(len(pairs) <= 7 and batch_size == 7 for pairs, batch_size in perfect_reranker)
    assert sum(len(pairs) for pairs, _ in perfect_reranker) == reranked["pairs"] == 12 * min(k, 48)
    # Each query's one positive: at rank 1 when the bi-encoder had it within k, else where the bi-encoder had it.
    dataset = load_retrieval_set([folders["data"]])
    run = evaluate_model(folders["cls"], dataset, return_run=True)["run"]
    searched_rank = {qid: 1 + rank(run[qid]).index(next(iter(dataset.qrels[qid]))) for qid in dataset.qrels}
    new_rank = {qid: 1 if position <= k else position for qid, position in searched_rank.items()}
    assert reranked["mrr@10"] == pytest.approx(sum(1 / r for r in new_rank.values() if r <= 10) / 12, abs=1e-12)
    assert reranked["recall@1"] == pytest.approx(sum(r == 1 for r in new_rank.values()) / 12, abs=1e-12)
    if k == 100:  # every positive is within the top 100 (48 documents)
        assert reranked["ndcg@10"] == reranked["mrr@10"] == reranked["map@100"] == 1.0
    else:  # the case is not vacuous: some positives were moved up, some stayed below k
        assert any(1 < r <= k for r in searched_rank.values()) and any(r > k for r in searched_rank.values())
        assert reranked["ndcg@10"] < 1.0


@pytest.mark.parametrize("options, message", [
    (["--rerank_top_k", "0"], "--rerank_top_k must be between 1 and 100 (the depth of the search), got 0."),
    (["--rerank_top_k", "101"], "--rerank_top_k must be between 1 and 100 (the depth of the search), got 101."),
    (["--reranker_batch_size", "0"], "--reranker_batch_size must be >= 1, got 0."),
    (["--reranker", "MISSING"], "--reranker 'MISSING' does not load as a CrossEncoder: Path MISSING not found"),
    (["--reranker", "TWO_LABELS"], "--reranker 'TWO_LABELS' gives 2 scores per pair; reranking needs one"),
])
def test_bad_reranking_options_end_in_one_line_before_any_encoding(folders, tmp_path, monkeypatch, capsys, options,
                                                                    message):
    from finetune.evaluate import __main__ as evaluate

    def no_encoding(*args, **kwargs):
        raise AssertionError("the bi-encoder was evaluated before the options were refused")

    monkeypatch.setattr(evaluate, "evaluate_model", no_encoding)
    message_template = message
    names = {"MISSING": str(tmp_path / "no-such-folder"), "TWO_LABELS": folders["two_labels"]}
    options = [names.get(option, option) for option in options]
    message = message.replace("MISSING", names["MISSING"]).replace("TWO_LABELS", names["TWO_LABELS"])
    if "--reranker" not in options:
        options += ["--reranker", folders["cross_encoder"]]
    monkeypatch.setattr(sys, "argv", ["finetune.evaluate", "--model_name_or_path", folders["mean"],
                                      "--data", folders["data"], *options])
    with pytest.raises(SystemExit) as exited:
        evaluate.cli()
    lines = capsys.readouterr().err.splitlines()
    if "TWO_LABELS" not in message_template:  # refused before loading anything: the error is all that is printed
        assert len(lines) == 1
    assert exited.value.code == 2 and lines[-1].startswith(f"error: {message}")
    assert sum(line.startswith("error:") for line in lines) == 1


def test_the_model_card_reads_past_a_reranked_entry(tmp_path):
    """--output_json OUT/retrieval_metrics.json with --reranker: the card shows the bi-encoder's numbers as before."""
    from finetune.publishing.model_card import _evaluations, _model_index

    plain = {"base": {"ndcg@10": 0.5, "seconds": 1.0}, str(tmp_path): {"ndcg@10": 0.75, "seconds": 1.0}}
    cards = []
    for content in (plain, {name: {**metrics, "reranked": {"ndcg@10": 0.9, "top_k": 100}}
                            for name, metrics in plain.items()}):
        (tmp_path / "retrieval_metrics.json").write_text(json.dumps(content))
        evaluations = _evaluations(tmp_path, [], "base")
        cards.append((evaluations, _model_index("m", evaluations["final_retrieval"], "val")))
    assert cards[1] == cards[0]
    assert cards[0][0]["final_retrieval"] == {"ndcg@10": 0.75}
