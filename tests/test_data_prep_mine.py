"""Hard-negative mining: exact chunked search, the false-negative filters checked against a brute-force full
score matrix, and the ``data_prep.mine`` command on the tiny model."""

import json

import numpy as np
import pytest
import torch

from conftest import make_records, write_jsonl
from data_prep import mine
from data_prep.mining import MiningSettings, mine_negatives
from data_prep.records import normalize_text
from finetune.data.schema import read_records
from finetune.retrieval.topk import chunked_topk


def random_unit(rows: int, dim: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=1).to(dtype)


@pytest.mark.parametrize("k", [1, 10, 101, 500])
@pytest.mark.parametrize("query_chunk, corpus_chunk", [(1, 1), (4, 7), (1000, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_chunked_topk_equals_the_full_matrix(k, query_chunk, corpus_chunk, dtype):
    query_emb, corpus_emb = random_unit(37, 16, seed=0), random_unit(101, 16, seed=1, dtype=dtype)
    full = query_emb @ corpus_emb.float().T  # (Q, N): the reference
    expected_scores, expected_indices = full.topk(min(k, 101), dim=1)
    scores, indices = chunked_topk(query_emb, corpus_emb, k, query_chunk=query_chunk, corpus_chunk=corpus_chunk)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-6)


def test_faiss_exact_search_equals_the_full_matrix():
    query_emb, corpus_emb = random_unit(37, 16, seed=2), random_unit(101, 16, seed=3, dtype=torch.float16)
    expected_scores, expected_indices = (query_emb @ corpus_emb.float().T).topk(20, dim=1)
    scores, indices = chunked_topk(query_emb, corpus_emb, 20, query_chunk=8, corpus_chunk=30, use_faiss=True)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5)


def brute_force(query_emb, corpus_emb, positives, corpus_texts, settings):
    """Per query: (kept indices, {dropped index: reason}) from the full (Q, N) score matrix, plain loops."""
    full = (query_emb.double() @ corpus_emb.double().T).numpy()
    results = []
    for q, positive_rows in enumerate(positives):
        positive_texts = {normalize_text(corpus_texts[p]) for p in positive_rows}
        positive_score = min(full[q, p] for p in positive_rows)
        ratio_threshold = positive_score - abs(positive_score) * (1 - settings.max_score_ratio)
        ranking = sorted(range(len(corpus_texts)), key=lambda c: -full[q, c])[settings.range_min:settings.range_max]
        dropped, passing = {}, []
        for c in ranking:
            if normalize_text(corpus_texts[c]) in positive_texts:
                dropped[c] = "positive"
            elif full[q, c] > ratio_threshold:
                dropped[c] = "max_score_ratio"
            elif settings.margin is not None and full[q, c] > positive_score - settings.margin:
                dropped[c] = "margin"
            elif any(normalize_text(corpus_texts[c]) == normalize_text(corpus_texts[p]) for p in passing):
                dropped[c] = "duplicate"  # the same text as a better candidate
            else:
                passing.append(c)
        results.append((passing[:settings.num_negatives], dropped))
    return results


@pytest.mark.parametrize("range_min, range_max, margin", [(0, 200, None), (3, 40, None), (0, 200, 0.02)])
def test_filters_drop_exactly_what_a_full_matrix_says(range_min, range_max, margin):
    corpus_texts = [f"document {i}" for i in range(150)]
    positives = [[q, (q * 7) % 150] for q in range(30)]
    for q in range(0, 30, 3):  # copies of a positive (case and spacing differ) must be dropped as positives
        corpus_texts[100 + q] = "  " + corpus_texts[positives[q][0]].upper()
    query_emb = random_unit(30, 8, seed=4)
    corpus_emb = random_unit(150, 8, seed=5, dtype=torch.float16)
    corpus_emb[:30] = (0.6 * query_emb + 0.4 * corpus_emb[:30].float()).half()  # positives score high
    settings = MiningSettings(num_negatives=4, range_min=range_min, range_max=range_max, max_score_ratio=0.8,
                              margin=margin)
    results = mine_negatives(query_emb, corpus_emb, positives, corpus_texts, settings, corpus_chunk=16, query_chunk=7)
    expected = brute_force(query_emb, corpus_emb, positives, corpus_texts, settings)
    reasons = {"positive": 0, "max_score_ratio": 0, "margin": 0, "duplicate": 0}
    for result, (expected_kept, expected_dropped) in zip(results, expected):
        assert [index for index, _ in result.kept] == expected_kept
        assert {index: reason for index, _, reason in result.dropped} == expected_dropped
        for reason in expected_dropped.values():
            reasons[reason] += 1
    assert reasons["positive"] > 0 and reasons["max_score_ratio"] > 0 and (margin is None or reasons["margin"] > 0)
    assert reasons["duplicate"] > 0 or range_max < 150
    assert any(len(result.kept) == 4 for result in results)


def test_threshold_stays_below_a_negative_positive_score():
    settings = MiningSettings(max_score_ratio=0.9, margin=0.1)
    assert settings.thresholds(0.5) == pytest.approx({"max_score_ratio": 0.45, "margin": 0.4})
    assert settings.thresholds(-0.5) == pytest.approx({"max_score_ratio": -0.55, "margin": -0.6})


@pytest.mark.parametrize("kwargs, message", [
    ({"num_negatives": 0}, "num_negatives must be at least 1"),
    ({"range_min": 5, "range_max": 5}, "range_min < range_max"),
    ({"max_score_ratio": 0}, "max_score_ratio must be > 0"),
    ({"sampling": "best"}, "sampling must be one of"),
])
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MiningSettings(**kwargs)


def test_random_sampling_is_a_seeded_choice_among_passing_candidates_whatever_the_blocks():
    query_emb, corpus_emb = random_unit(20, 8, seed=6), random_unit(80, 8, seed=7)
    texts = [f"d{i}" for i in range(80)]
    positives = [[q] for q in range(20)]
    settings = MiningSettings(num_negatives=3, range_max=30, max_score_ratio=0.9, sampling="random", seed=1)
    whole = mine_negatives(query_emb, corpus_emb, positives, texts, settings)
    blocks = (mine_negatives(query_emb[:7], corpus_emb, positives[:7], texts, settings)
              + mine_negatives(query_emb[7:], corpus_emb, positives[7:], texts, settings, query_offset=7))
    assert [r.kept for r in whole] == [r.kept for r in blocks]
    top = mine_negatives(query_emb, corpus_emb, positives, texts, MiningSettings(num_negatives=30, range_max=30,
                                                                                 max_score_ratio=0.9))
    assert any(r.kept != t.kept[:3] for r, t in zip(whole, top))  # not simply the best ones
    for r, t in zip(whole, top):
        assert set(r.kept) <= set(t.kept) and r.kept == sorted(r.kept, key=lambda item: -item[1])


# ------------------------------------------------------------------------------------- the command, tiny model


@pytest.fixture
def mining_data(tmp_path):
    """Records where positives reappear elsewhere: as another record's negative, as a case/space variant in the
    extra corpus, and through a second record with the same question."""
    records = make_records(14, num_negatives=3, seed=5)
    records[1]["neg_doc"].append(records[0]["pos_doc"][0])
    records[4]["question"] = records[3]["question"]
    extra = [records[2]["pos_doc"][0].upper() + "  ", "an extra document about rivers and mountains",
             "another one on python sockets and threads"]
    (tmp_path / "extra.txt").write_text("\n".join(extra) + "\n")
    return records, write_jsonl(tmp_path / "data.jsonl", records), str(tmp_path / "extra.txt"), extra


def run_mine(tmp_path, model, data, *argv, name="mined.jsonl") -> dict:
    return mine.main(["--model_name_or_path", model, "--input", data, "--output", str(tmp_path / name),
                      "--batch_size", "8", *map(str, argv)])


def test_command_matches_a_brute_force_full_matrix(tmp_path, tiny_bert, mining_data):
    from finetune.model.embedding_model import EmbeddingModel

    records, data, extra_path, extra = mining_data
    corpus_texts = list(dict.fromkeys([t for r in records for t in r["pos_doc"] + r["neg_doc"]] + extra))
    model = EmbeddingModel.from_pretrained(tiny_bert)
    corpus_emb = model.encode(corpus_texts, max_length=256, batch_size=8).half().double()  # mine keeps fp16
    query_emb = model.encode([r["question"] for r in records], max_length=64, batch_size=8).double()
    full = (query_emb @ corpus_emb.T).numpy()  # (Q, N), the whole matrix
    positives_of = {}
    for r in records:
        positives_of.setdefault(r["question"], []).extend(corpus_texts.index(t) for t in r["pos_doc"])
    positive_keys = [{normalize_text(corpus_texts[p]) for p in positives_of[r["question"]]} for r in records]
    positive_scores = np.array([min(full[q, p] for p in positives_of[r["question"]]) for q, r in enumerate(records)])
    candidates = [(q, c) for q in range(len(records)) for c in range(len(corpus_texts))
                  if normalize_text(corpus_texts[c]) not in positive_keys[q]]
    # A ratio in the widest gap near the middle of the candidate/positive ratios: about half the candidates are
    # dropped, and none sits within rounding error of its threshold.
    ratios = np.sort([full[q, c] / positive_scores[q] for q, c in candidates])
    middle = np.arange(len(ratios) // 4, 3 * len(ratios) // 4)
    widest = middle[np.argmax(ratios[middle + 1] - ratios[middle])]
    ratio = float((ratios[widest] + ratios[widest + 1]) / 2)
    assert positive_scores.min() > 0 and ratios[widest + 1] - ratios[widest] > 1e-5

    report = run_mine(tmp_path, tiny_bert, data, "--num_negatives", 3, "--range_max", 1000,
                      "--max_score_ratio", ratio, "--extra_corpus", extra_path, "--min_negatives", 0)
    above = {(q, c) for q, c in candidates if full[q, c] > ratio * positive_scores[q]}
    passing, below = [], []  # per query, best first; a text equal (up to case and spacing) to a better one is a duplicate
    for q in range(len(records)):
        below.append(sorted((c for qq, c in candidates if qq == q and (q, c) not in above), key=lambda c: -full[q, c]))
        passing.append(list({normalize_text(corpus_texts[c]): c for c in reversed(below[-1])}.values())[::-1])
    assert report["dropped_by_reason"]["max_score_ratio"] == len(above) > 0
    assert report["counts"]["candidates_passed"] == sum(map(len, passing)) > 0
    assert report["dropped_by_reason"]["duplicate"] == len(candidates) - len(above) - sum(map(len, passing))
    assert report["dropped_by_reason"]["positive"] == len(records) * len(corpus_texts) - len(candidates)
    mined = list(read_records(str(tmp_path / "mined.jsonl")))
    assert [r["question"] for r in mined] == [r["question"] for r in records]
    for q, record in enumerate(mined):
        # The best three that pass, compared by score: texts with equal embeddings (the tokenizer lower-cases)
        # tie, and fp32 may order near-ties differently from this fp64 matrix.
        chosen = [corpus_texts.index(text) for text in record["neg_doc"]]
        assert set(chosen) <= set(below[q]) and len({normalize_text(record["neg_doc"][i]) for i in range(len(chosen))}) == len(chosen)
        np.testing.assert_allclose([full[q, c] for c in chosen], [full[q, c] for c in passing[q][:3]], atol=1e-6)
        assert record["pos_doc"] == records[q]["pos_doc"]
    for item in report["most_suspicious_dropped"]:
        assert item["candidate_score"] > ratio * item["positive_score"] - 1e-6


def test_positives_and_their_duplicates_are_never_negatives(tmp_path, tiny_bert, mining_data):
    records, data, extra_path, _ = mining_data
    report = run_mine(tmp_path, tiny_bert, data, "--num_negatives", 40, "--range_max", 1000, "--max_score_ratio", "none",
                      "--extra_corpus", extra_path)
    positives_of = {}
    for r in records:
        positives_of.setdefault(r["question"], set()).update(normalize_text(t) for t in r["pos_doc"])
    mined = list(read_records(str(tmp_path / "mined.jsonl")))
    assert len(mined) == len(records)
    for record in mined:
        assert record["neg_doc"] and not {normalize_text(t) for t in record["neg_doc"]} & positives_of[record["question"]]
        assert len({normalize_text(t) for t in record["neg_doc"]}) == len(record["neg_doc"])
    # With no score filter, everything else of the corpus is a negative: only positives were dropped.
    assert report["fraction_dropped"] == 0.0 and report["dropped_by_reason"]["positive"] >= len(records) + 3
    # Corpus: exact texts once (record 1's copy of record 0's positive is one document); the upper-case copy in
    # the extra corpus is another text, caught when mining.
    assert report["corpus"] == {"documents": 14 * 4 + 3, "from_data": 14 * 4, "extra": 3, "distinct_questions": 13}
    assert (tmp_path / "mined.report.json").is_file() and (tmp_path / "mined.report.png").stat().st_size > 1000
    assert not (tmp_path / "mined.jsonl.parts").exists()  # the shards are removed after success
    assert json.loads((tmp_path / "mined.report.json").read_text())["counts"] == report["counts"]


def test_existing_negatives_kept_or_replaced_and_faiss_gives_the_same_result(tmp_path, tiny_bert, mining_data):
    records, data, _, _ = mining_data
    replaced = run_mine(tmp_path, tiny_bert, data, "--num_negatives", 2, "--max_score_ratio", "none")
    torch_output = (tmp_path / "mined.jsonl").read_text()
    run_mine(tmp_path, tiny_bert, data, "--num_negatives", 2, "--max_score_ratio", "none", "--use_faiss", name="faiss.jsonl")
    assert (tmp_path / "faiss.jsonl").read_text() == torch_output
    assert replaced["counts"]["negatives_written"] == 2 * len(records)

    records[5]["neg_doc"].append(" " + records[5]["pos_doc"][0].upper())  # a false negative among the existing
    data = write_jsonl(tmp_path / "with_false_negative.jsonl", records)
    kept = run_mine(tmp_path, tiny_bert, data, "--num_negatives", 2, "--max_score_ratio", "none",
                    "--keep_existing_negatives", name="kept.jsonl")
    for index, (original, record) in enumerate(zip(records, read_records(str(tmp_path / "kept.jsonl")))):
        existing = original["neg_doc"][:-1] if index == 5 else original["neg_doc"]
        assert record["neg_doc"][:len(existing)] == existing  # kept first, as they were
        assert len(record["neg_doc"]) == len(existing) + 2  # then two new ones, not repeats of the existing
        assert len(set(record["neg_doc"])) == len(record["neg_doc"])
    assert kept["counts"]["existing_negatives_removed_as_positive"] == 1
    assert kept["dropped_by_reason"]["existing"] > 0


def test_records_left_without_enough_negatives_are_counted(tmp_path, tiny_bert, mining_data):
    _, data, _, _ = mining_data
    report = run_mine(tmp_path, tiny_bert, data, "--num_negatives", 2, "--min_negatives", 3)
    assert report["counts"]["records_out"] == 0 and report["counts"]["records_left_out_too_few_negatives"] == 14
    with pytest.raises(ValueError, match="range_min < range_max"):
        run_mine(tmp_path, tiny_bert, data, "--range_min", 60, "--range_max", 50)


def test_extra_corpus_as_json_lines(tmp_path, tiny_bert, mining_data):
    _, data, _, _ = mining_data
    extra = tmp_path / "corpus.jsonl"
    extra.write_text(json.dumps({"_id": "1", "title": "Rivers", "text": "a document about rivers"}) + "\n"
                     + json.dumps({"_id": "2", "text": "a document about sockets"}) + "\n")
    report = run_mine(tmp_path, tiny_bert, data, "--num_negatives", 60, "--max_score_ratio", "none", "--range_max", 1000,
                      "--extra_corpus", extra, "--min_negatives", 0)
    assert report["corpus"]["extra"] == 2
    negatives = {text for record in read_records(str(tmp_path / "mined.jsonl")) for text in record["neg_doc"]}
    assert {"Rivers a document about rivers", "a document about sockets"} <= negatives


def test_a_decoder_mines_what_sentence_transformers_ranks_highest(tmp_path, tiny_qwen3, mining_data):
    """A decoder embedder (last-token pooling, EOS, left padding, an instruction; encoded padding-free here) picks the
    negatives that sentence-transformers' own encode of the same saved model scores highest."""
    from sentence_transformers import SentenceTransformer

    from finetune.model.embedding_model import EmbeddingModel

    records, data, _, _ = mining_data
    instruction = "Instruct: find the passage\nQuery: "
    folder = str(tmp_path / "decoder")
    EmbeddingModel.from_pretrained(tiny_qwen3, query_prefix=instruction).save_pretrained(folder)
    run_mine(tmp_path, folder, data, "--num_negatives", 3, "--range_max", 1000, "--max_score_ratio", "none",
             "--min_negatives", 0, "--query_prefix", instruction)
    st = SentenceTransformer(folder, device="cpu")
    corpus = list(dict.fromkeys(t for r in records for t in r["pos_doc"] + r["neg_doc"]))
    scores = (st.encode([r["question"] for r in records], prompt_name="query", convert_to_tensor=True)
              @ st.encode(corpus, convert_to_tensor=True).T)  # (Q, N) cosine: unit vectors
    for q, record in enumerate(read_records(str(tmp_path / "mined.jsonl"))):
        positives = {normalize_text(t) for r in records if r["question"] == records[q]["question"] for t in r["pos_doc"]}
        ranked = [c for c in scores[q].argsort(descending=True).tolist() if normalize_text(corpus[c]) not in positives]
        best = scores[q, ranked[:3]]
        chosen = scores[q, [corpus.index(text) for text in record["neg_doc"]]]
        torch.testing.assert_close(chosen, best, atol=1e-3, rtol=0)  # mine keeps the corpus in fp16


# ---------------------------------------------------- several processes, and a rerun after a kill (sharded corpus)


def sharded_mine_args(tmp_path, tiny_bert) -> list[str]:
    """20 records, 80 documents: 5 shards of 16, 4 question blocks of 6."""
    data = write_jsonl(tmp_path / "data.jsonl", make_records(20, num_negatives=3, seed=8))
    return ["--model_name_or_path", tiny_bert, "--input", data, "--num_negatives", "3", "--batch_size", "4",
            "--shard_size", "16", "--query_block_size", "6", "--corpus_chunk_size", "10", "--keep_shards"]


def comparable(report: dict) -> dict:
    return {key: value for key, value in report.items() if key not in ("seconds", "output", "plot", "settings")}


def test_two_processes_write_what_one_process_writes(tmp_path, tiny_bert):
    from conftest import launch_two_processes

    common = sharded_mine_args(tmp_path, tiny_bert)
    one = mine.main([*common, "--output", str(tmp_path / "one.jsonl")])
    result = launch_two_processes(["-m", "data_prep.mine", *common, "--output", str(tmp_path / "two.jsonl")])
    logs = result.stdout + result.stderr
    for expected in ("Process 0 of 2: 80 texts in 5 shards of 16, 0 already encoded; encoding 3 shards here",
                     "Process 1 of 2: 80 texts in 5 shards of 16, 0 already encoded; encoding 2 shards here",
                     "Process 0 of 2: 20 queries in 4 blocks of 6, 0 already searched; searching 2 blocks here",
                     "Process 1 of 2: 20 queries in 4 blocks of 6, 0 already searched; searching 2 blocks here"):
        assert expected in logs
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    two = json.loads((tmp_path / "two.report.json").read_text())
    assert comparable(two) == json.loads(json.dumps(comparable(one)))
    shards = sorted(path.name for path in (tmp_path / "one.jsonl.parts" / "corpus").glob("shard-*.npy"))
    assert len(shards) == 5
    for name in shards:  # the embeddings themselves, not only what was chosen from them
        assert ((tmp_path / "two.jsonl.parts" / "corpus" / name).read_bytes()
                == (tmp_path / "one.jsonl.parts" / "corpus" / name).read_bytes())


def test_a_rerun_after_a_kill_encodes_only_the_missing_shards(tmp_path, tiny_bert, caplog):
    import logging
    import os
    import signal
    import sys

    from conftest import ROOT, kill_when

    common = sharded_mine_args(tmp_path, tiny_bert)
    argv = [*common, "--output", str(tmp_path / "killed.jsonl")]
    corpus = tmp_path / "killed.jsonl.parts" / "corpus"
    # Each shard takes 0.5 s more, so that the kill lands between the second and the third shard.
    slow = ("import sys, time; import finetune.retrieval.embeddings as s; encode = s.encode_in_batches; "
            "s.encode_in_batches = lambda *a, **k: (time.sleep(0.5), encode(*a, **k))[1]; "
            "from data_prep import mine, records; sys.argv[0] = 'mine'; records.run_cli(mine.main)")
    returncode = kill_when([sys.executable, "-c", slow, *argv], corpus / "shard-0000001.npy",
                           {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert returncode == -signal.SIGKILL, "the run ended before it could be killed"
    finished = sorted(corpus.glob("shard-*.npy"))
    assert [path.name for path in finished] == ["shard-0000000.npy", "shard-0000001.npy"]
    assert not (tmp_path / "killed.jsonl").exists()
    written = {path.name: path.stat().st_mtime_ns for path in finished}

    caplog.set_level(logging.INFO, logger="finetune.retrieval.embeddings")
    mine.main(argv)
    assert "80 texts in 5 shards of 16, 2 already encoded; encoding 3 shards here" in caplog.text
    assert {name: (corpus / name).stat().st_mtime_ns for name in written} == written  # not encoded again
    mine.main([*common, "--output", str(tmp_path / "straight.jsonl")])
    assert (tmp_path / "killed.jsonl").read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    for name in written:
        assert (corpus / name).read_bytes() == (tmp_path / "straight.jsonl.parts" / "corpus" / name).read_bytes()


def test_old_option_name_num_negatives_still_works_with_a_warning(tmp_path, tiny_bert, mining_data, capsys):
    """One vocabulary across the tools: mine's --num_negatives is now --num_hard_negatives (as in training); the old
    name is a deprecated alias that gives the same output."""
    _, data, _, _ = mining_data
    run_mine(tmp_path, tiny_bert, data, "--num_hard_negatives", 2, "--max_score_ratio", "none", name="new.jsonl")
    assert "deprecated" not in capsys.readouterr().err
    run_mine(tmp_path, tiny_bert, data, "--num_negatives", 2, "--max_score_ratio", "none", name="old.jsonl")
    assert "warning: --num_negatives is deprecated; use --num_hard_negatives" in capsys.readouterr().err
    assert (tmp_path / "old.jsonl").read_text() == (tmp_path / "new.jsonl").read_text()
