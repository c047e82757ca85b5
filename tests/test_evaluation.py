"""Retrieval metrics equal ir_measures (pytrec_eval underneath) on random and hand-made runs."""

import json
import random

import ir_measures
import pytest
import torch
from ir_measures import AP, R, RR, nDCG

from finetune.retrieval.evaluation import compute_metrics, search
from finetune.retrieval.sets import retrieval_set_from_records

REFERENCE = {"ndcg@10": nDCG @ 10, "mrr@10": RR @ 10, "recall@1": R @ 1, "recall@10": R @ 10,
             "recall@100": R @ 100, "map@100": AP @ 100}


def reference_metrics(run, qrels, with_ties):
    """pytrec_eval (trec_eval's tie order) for all; MRR@10 from the MS MARCO provider, since
    pytrec_eval ignores RR's cutoff. The MS MARCO provider orders ties differently, so it is
    only consulted on runs without ties."""
    providers = ir_measures.providers.registry
    values = providers["pytrec_eval"].calc_aggregate(list(REFERENCE.values()), qrels, run)
    reference = {name: values[measure] for name, measure in REFERENCE.items() if name != "mrr@10"}
    if not with_ties:
        reference["mrr@10"] = providers["msmarco"].calc_aggregate([RR @ 10], qrels, run)[RR @ 10]
    return reference


def assert_same(run, qrels, with_ties=True):
    ours, theirs = compute_metrics(run, qrels), reference_metrics(run, qrels, with_ties)
    for name in theirs:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name


@pytest.mark.parametrize("seed", range(5))
def test_random_runs(seed):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(150)]
    qrels = {f"q{q}": {d: rng.choice([1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 6))} for q in range(30)}
    run = {qid: {d: rng.random() for d in rng.sample(docs, 120)} for qid in qrels}
    assert_same(run, qrels, with_ties=False)
    tied = {qid: {d: round(score, 2) for d, score in scores.items()} for qid, scores in run.items()}
    assert_same(tied, qrels, with_ties=True)


def test_per_query_metrics_equal_pytrec_eval_query_by_query_and_average_to_compute_metrics_bit_for_bit():
    from finetune.metrics.retrieval.retrieval import mean_metrics, query_metrics
    from finetune.retrieval.evaluation import per_query_metrics, rank

    rng = random.Random(11)
    docs = [f"d{i}" for i in range(150)]
    qrels = {f"q{q}": {d: rng.choice([1, 1, 2]) for d in rng.sample(docs, rng.randint(1, 5))} for q in range(40)}
    qrels["q_none"] = {"d0": 0}
    run = {qid: {d: rng.random() for d in rng.sample(docs, 120)} for qid in qrels}
    ours = per_query_metrics(run, qrels)
    assert list(ours) == sorted(qrels)
    providers = ir_measures.providers.registry
    theirs = {(m.query_id, m.measure): m.value for provider, names in
              ((providers["pytrec_eval"], [n for n in REFERENCE if n != "mrr@10"]), (providers["msmarco"], ["mrr@10"]))
              for m in provider.iter_calc([REFERENCE[n] for n in names], qrels, run)}
    for qid, values in ours.items():
        for name, value in values.items():
            assert value == pytest.approx(theirs.get((qid, REFERENCE[name]), 0.0), abs=1e-9), (qid, name)
    del run["q3"]  # a query missing from the run found nothing
    assert per_query_metrics(run, qrels)["q3"] == {name: 0.0 for name in REFERENCE}
    # compute_metrics is their mean in the same order: every float bit of the formula it had before.
    before = mean_metrics([query_metrics(rank(run.get(qid, {})), relevant) for qid, relevant in sorted(qrels.items())])
    assert compute_metrics(run, qrels) == before
    assert compute_metrics(run, qrels) == mean_metrics(list(per_query_metrics(run, qrels).values()))


def test_hand_made_edge_cases():
    qrels = {
        "tied": {"a": 1},  # relevant doc tied with others: trec_eval breaks ties by doc id, descending
        "several": {"x": 1, "y": 2, "z": 1},
        "none": {"a": 0},  # judged but nothing relevant: counts as 0 in both
        "missing_from_run": {"b": 1},
    }
    run = {
        "tied": {"a": 0.5, "b": 0.5, "c": 0.5, "d": 0.1},
        "several": {"y": 0.9, "q": 0.8, "x": 0.7, "r": 0.6},
        "none": {"a": 1.0},
    }
    assert_same(run, qrels)
    ours = compute_metrics(run, qrels)
    # "tied": order c, b, a -> RR 1/3; "several": y@1; "none" and "missing": 0.
    assert ours["mrr@10"] == pytest.approx((1 / 3 + 1 + 0 + 0) / 4)


def test_perfect_and_empty():
    qrels = {"q": {"a": 1, "b": 1}}
    assert compute_metrics({"q": {"a": 2.0, "b": 1.0, "c": 0.0}}, qrels) == pytest.approx(
        {"ndcg@10": 1.0, "mrr@10": 1.0, "recall@1": 0.5, "recall@10": 1.0, "recall@100": 1.0, "map@100": 1.0})
    assert compute_metrics({}, qrels)["ndcg@10"] == 0.0


def test_retrieval_set_from_records_dedupes_and_merges():
    records = [{"question": "q1", "pos_doc": ["A"], "neg_doc": ["B", "C"]},
               {"question": "q2", "pos_doc": ["B"], "neg_doc": ["A"]},
               {"question": "q1", "pos_doc": ["C"], "neg_doc": []}]
    dataset = retrieval_set_from_records(records)
    assert sorted(dataset.corpus.values()) == ["A", "B", "C"] and sorted(dataset.queries.values()) == ["q1", "q2"]
    ids = {text: did for did, text in dataset.corpus.items()}
    qids = {text: qid for qid, text in dataset.queries.items()}
    assert dataset.qrels[qids["q1"]] == {ids["A"]: 1, ids["C"]: 1}
    assert dataset.qrels[qids["q2"]] == {ids["B"]: 1}


def test_search_matches_full_matrix():
    torch.manual_seed(0)
    queries, corpus = torch.randn(7, 8), torch.randn(50, 8)
    run = search(queries, corpus, [f"q{i}" for i in range(7)], [f"d{i}" for i in range(50)], top_k=5)
    full = queries @ corpus.T
    for i in range(7):
        expected = full[i].topk(5).indices.tolist()
        assert [int(d[1:]) for d in sorted(run[f"q{i}"], key=run[f"q{i}"].get, reverse=True)] == expected


def write_beir(folder, records):
    """The same retrieval set as ``records`` in BEIR layout."""
    dataset = retrieval_set_from_records(records)
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": d, "title": "", "text": t}) + "\n"
                                                 for d, t in dataset.corpus.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": t}) + "\n"
                                                  for q, t in dataset.queries.items()))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{r}\n" for q, rels in dataset.qrels.items() for d, r in rels.items()))


def test_standalone_command_on_seed_file_and_beir_folder(tiny_bert, tmp_path, capsys):
    from conftest import make_records, write_jsonl
    from finetune.evaluate import __main__ as evaluate
    from finetune.model.embedding_model import EmbeddingModel

    records = make_records(12, seed=5)
    seed_file = write_jsonl(tmp_path / "val.jsonl", records)
    write_beir(tmp_path / "beir", records)
    model_a, model_b = tmp_path / "a", tmp_path / "b"
    EmbeddingModel.from_pretrained(tiny_bert, pooling="mean").save_pretrained(str(model_a))
    EmbeddingModel.from_pretrained(tiny_bert, pooling="cls").save_pretrained(str(model_b))
    output = tmp_path / "metrics.json"
    from_seed = evaluate.main(["--model_name_or_path", str(model_a), str(model_b), "--data", seed_file,
                               "--output_json", str(output)])
    printed = capsys.readouterr().out
    assert "| ndcg@10" in printed and "difference" in printed
    assert json.loads(output.read_text()).keys() == {str(model_a), str(model_b), "comparisons"}
    from_beir = evaluate.main(["--model_name_or_path", str(model_a), "--data", str(tmp_path / "beir")])
    for name in ("ndcg@10", "mrr@10", "recall@10"):
        assert from_beir[str(model_a)][name] == pytest.approx(from_seed[str(model_a)][name], abs=1e-6)
    # Independent check: our in-process encoder + pytrec_eval give the same nDCG@10.
    model = EmbeddingModel.from_pretrained(str(model_a))
    dataset = retrieval_set_from_records(records)
    qids, dids = list(dataset.queries), list(dataset.corpus)
    run = search(model.encode([dataset.queries[q] for q in qids]), model.encode([dataset.corpus[d] for d in dids]),
                 qids, dids)
    assert reference_metrics(run, dataset.qrels, with_ties=True)["ndcg@10"] == pytest.approx(
        from_seed[str(model_a)]["ndcg@10"], abs=1e-5)


def test_evaluate_module_loaded_from_its_folder_gives_the_same_numbers():
    from finetune.retrieval.evaluation import rank
    from finetune.metrics import load_retrieval_metric

    rng = random.Random(3)
    docs = [f"d{i}" for i in range(80)]
    qrels = {f"q{q}": {d: 1 for d in rng.sample(docs, rng.randint(1, 4))} for q in range(20)}
    run = {qid: {d: rng.random() for d in rng.sample(docs, 60)} for qid in qrels}
    metric = load_retrieval_metric()
    qids = sorted(qrels)
    values = metric.compute(predictions=[rank(run[q]) for q in qids], references=[list(qrels[q]) for q in qids])
    assert values == pytest.approx(compute_metrics(run, qrels), abs=1e-12)
    assert values == pytest.approx(reference_metrics(run, qrels, with_ties=False), abs=1e-6)


def test_in_group_metrics_by_hand():
    from finetune.retrieval.sets import RetrievalSet
    from finetune.retrieval.evaluation import in_group_metrics

    dataset = RetrievalSet(queries={"q0": "a", "q1": "b"}, corpus={"p0": "", "p1": "", "n0": "", "n1": ""},
                           qrels={"q0": {"p0": 1}, "q1": {"p1": 1}}, groups=[("q0", ["n0", "n1"]), ("q1", ["n0", "n1"])])
    query_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    corpus_emb = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.1, 0.95]])  # p0, p1, n0, n1
    metrics = in_group_metrics(query_emb, corpus_emb, {"q0": 0, "q1": 1}, {"p0": 0, "p1": 1, "n0": 2, "n1": 3}, dataset)
    # q0: p0 (0.9) beats n0 (0.2), n1 (0.1) -> 1; q1: p1 (0.5) below n0 (0.8) and n1 (0.95) -> 1/3.
    assert metrics == pytest.approx({"ingroup_accuracy": 0.5, "ingroup_mrr": (1 + 1 / 3) / 2})


def direct_in_group_metrics(query_emb, corpus_emb, query_index, doc_index, dataset) -> dict[str, float]:
    """An independent reference: each group's best positive against its negatives, scored in memory."""
    reciprocal_ranks = []
    for qid, negatives in dataset.groups:
        query = query_emb[query_index[qid]]
        positive_rows = [doc_index[d] for d, rel in dataset.qrels[qid].items() if rel > 0]
        best_positive = (corpus_emb[positive_rows] @ query).max()
        above = int(((corpus_emb[[doc_index[d] for d in negatives]] @ query) > best_positive).sum())
        reciprocal_ranks.append(1.0 / (1 + above))
    return {"ingroup_accuracy": sum(r == 1.0 for r in reciprocal_ranks) / len(reciprocal_ranks),
            "ingroup_mrr": sum(reciprocal_ranks) / len(reciprocal_ranks)}


def test_in_group_metrics_from_scored_rows_equal_the_in_memory_ones():
    """The stack scores each grouped query's rows while searching; the same metrics as a direct in-memory count."""
    from finetune.retrieval.sets import RetrievalSet
    from finetune.retrieval.evaluation import in_group_metrics_from_rows, in_group_rows

    corpus = {f"d{i}": "" for i in range(12)}
    dataset = RetrievalSet(queries={"q0": "", "q1": "", "q2": ""}, corpus=corpus,
                           qrels={"q0": {"d0": 1, "d1": 1, "d9": 0}, "q1": {"d2": 1}, "q2": {"d3": 1}},
                           groups=[("q0", ["d4", "d5"]), ("q1", ["d6", "d7", "d8"]), ("q0", ["d10", "d11", "d2"])])
    generator = torch.Generator().manual_seed(4)
    query_emb, corpus_emb = torch.randn(3, 5, generator=generator), torch.randn(12, 5, generator=generator)
    query_index, doc_index = {f"q{i}": i for i in range(3)}, {d: i for i, d in enumerate(corpus)}
    rows = in_group_rows(dataset, doc_index)
    assert rows == {"q0": [0, 1, 4, 5, 10, 11, 2], "q1": [2, 6, 7, 8]}
    row_scores = {qid: (corpus_emb[r] @ query_emb[query_index[qid]]).numpy() for qid, r in rows.items()}
    expected = direct_in_group_metrics(query_emb, corpus_emb, query_index, doc_index, dataset)
    assert 0 < expected["ingroup_mrr"] < 1
    assert in_group_metrics_from_rows(dataset, row_scores) == pytest.approx(expected, abs=1e-12)


class TableModel:
    """A stand-in for the model being trained: a fixed embedding per text and the similarity it declares. Under
    cosine the full embeddings are unit vectors (a normalising model) whose prefixes have very different lengths."""

    def __init__(self, texts, similarity, dim=16, seed=0):
        generator = torch.Generator().manual_seed(seed)
        embeddings = torch.randn(len(texts), dim, generator=generator)
        embeddings[:, :dim // 2] *= 0.2 + 3 * torch.rand(len(texts), 1, generator=generator)  # prefix lengths vary
        if similarity == "cosine":
            embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
        self.table = dict(zip(texts, embeddings))
        self.similarity = similarity

    def encode(self, texts, side=None, batch_size=32):
        return torch.stack([self.table[text] for text in texts])

    def parameters(self):
        yield torch.zeros(1)


def metrics_by_hand(query_emb, corpus_emb, dataset, similarity):
    """pytrec_eval's metrics (and the in-group ones, by loops) of ranking every document by ``similarity``, with the
    embeddings explicitly re-normalised for cosine."""
    if similarity == "cosine":
        query_emb, corpus_emb = (torch.nn.functional.normalize(e.double(), dim=-1) for e in (query_emb, corpus_emb))
    qids, dids = list(dataset.queries), list(dataset.corpus)
    scores = (query_emb.double() @ corpus_emb.double().T).tolist()
    run = {qid: dict(zip(dids, row)) for qid, row in zip(qids, scores)}
    metrics = reference_metrics(run, dataset.qrels, with_ties=False)
    reciprocal_ranks = []
    for qid, negatives in dataset.groups:
        best = max(run[qid][d] for d, relevance in dataset.qrels[qid].items() if relevance > 0)
        reciprocal_ranks.append(1 / (1 + sum(run[qid][d] > best for d in negatives)))
    metrics["ingroup_accuracy"] = sum(r == 1 for r in reciprocal_ranks) / len(reciprocal_ranks)
    metrics["ingroup_mrr"] = sum(reciprocal_ranks) / len(reciprocal_ranks)
    return metrics


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_matryoshka_metrics_rank_prefixes_by_the_model_similarity(similarity):
    """Metrics at a truncated size (``ndcg@10_dim4``...) are those of the embeddings' prefixes ranked by the model's
    similarity: re-normalised prefixes for cosine, the raw prefixes for dot."""
    from conftest import make_records
    from finetune.retrieval.evaluation import RetrievalEvaluator
    from finetune.data.text import TextSide

    dataset = retrieval_set_from_records(make_records(30, num_negatives=3, seed=21))
    model = TableModel(list(dataset.queries.values()) + list(dataset.corpus.values()), similarity)
    evaluator = RetrievalEvaluator(dataset, query=TextSide(), document=TextSide(), truncate_dims=(8, 4))
    metrics = evaluator(model, device=torch.device("cpu"))
    query_emb = model.encode([dataset.queries[q] for q in dataset.queries])
    corpus_emb = model.encode([dataset.corpus[d] for d in dataset.corpus])
    for dim in (16, 8, 4):
        expected = metrics_by_hand(query_emb[:, :dim], corpus_emb[:, :dim], dataset, similarity)
        suffix = "" if dim == 16 else f"_dim{dim}"
        for name, value in expected.items():
            assert metrics[f"{name}{suffix}"] == pytest.approx(value, abs=1e-6), (dim, name)
    if similarity == "cosine":  # re-normalising changes the ranking of these prefixes: skipping it could not pass
        raw = metrics_by_hand(query_emb[:, :4], corpus_emb[:, :4], dataset, "dot")
        assert any(abs(raw[name] - metrics[f"{name}_dim4"]) > 1e-3 for name in raw)
