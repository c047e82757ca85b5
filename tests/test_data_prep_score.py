"""data_prep.score: teacher scores equal an independent computation, reruns resume, 2 processes == 1 process."""

import json
from pathlib import Path

import pytest
import torch

from conftest import launch_two_processes, make_records, write_jsonl
from data_prep import score
from finetune.data.schema import read_records

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_cross_encoder(tiny_bert, tmp_path_factory) -> str:
    """A BERT with a one-logit classification head (random weights) and the tiny tokenizer: a CrossEncoder folder."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = str(tmp_path_factory.mktemp("tiny_cross_encoder"))
    config = BertConfig.from_pretrained(tiny_bert, num_labels=1)
    torch.manual_seed(1)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def spread_cross_encoder(tiny_bert, tmp_path_factory) -> str:
    """As tiny_cross_encoder, initialised 10x wider: its logits differ between documents by about 0.1 (the default
    initialisation gives nearly the same logit, within 1e-5, for every pair, so scores could swap unnoticed)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = str(tmp_path_factory.mktemp("spread_cross_encoder"))
    config = BertConfig.from_pretrained(tiny_bert, num_labels=1, initializer_range=0.2)
    torch.manual_seed(1)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return folder


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_cross_encoder_scores_are_the_raw_logits(tiny_cross_encoder, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    records = make_records(5, num_negatives=2, seed=11)
    output = tmp_path / "scored.jsonl"
    score.main(["--teacher", tiny_cross_encoder, "--input", write_jsonl(tmp_path / "in.jsonl", records),
                "--output", str(output), "--query_prefix", "q: ", "--block_size", "2"])
    scored = read_jsonl(output)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_cross_encoder).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_cross_encoder)
    for record, result in zip(records, scored):
        assert {key: result[key] for key in ("question", "pos_doc", "neg_doc")} == record
        documents = record["pos_doc"] + record["neg_doc"]
        with torch.no_grad():
            encoded = tokenizer(["q: " + record["question"]] * len(documents), documents, padding=True,
                                truncation=True, max_length=256, return_tensors="pt")
            logits = model(**encoded).logits[:, 0].tolist()
        assert result["pos_scores"] + result["neg_scores"] == pytest.approx(logits, abs=1e-5)
    assert len(list(read_records(str(output)))) == 5  # the output passes validation
    assert not (tmp_path / "scored.jsonl.parts").exists()


def test_bi_encoder_scores_are_sentence_transformers_cosines(tiny_bert, tmp_path):
    from sentence_transformers import SentenceTransformer

    from finetune.model.embedding_model import EmbeddingModel

    folder = str(tmp_path / "teacher")
    EmbeddingModel.from_pretrained(tiny_bert, query_prefix="query: ", document_prefix="passage: ").save_pretrained(folder)
    records = make_records(4, num_negatives=3, seed=12)
    output = tmp_path / "scored.jsonl.gz"
    score.main(["--teacher", folder, "--teacher_type", "bi-encoder", "--input", write_jsonl(tmp_path / "in.jsonl", records),
                "--output", str(output), "--query_prefix", "query: ", "--passage_prefix", "passage: "])
    st = SentenceTransformer(folder, device="cpu")
    for record, result in zip(records, read_records(str(output))):
        query = st.encode_query([record["question"]], convert_to_tensor=True)
        documents = st.encode_document(record["pos_doc"] + record["neg_doc"], convert_to_tensor=True)
        expected = torch.nn.functional.cosine_similarity(query, documents).tolist()
        assert result["pos_scores"] + result["neg_scores"] == pytest.approx(expected, abs=1e-5)


def test_a_rerun_after_a_kill_scores_only_the_missing_blocks(tiny_cross_encoder, tmp_path, monkeypatch):
    records = make_records(7, num_negatives=1, seed=13)
    argv = ["--teacher", tiny_cross_encoder, "--input", write_jsonl(tmp_path / "in.jsonl", records),
            "--output", str(tmp_path / "out.jsonl"), "--block_size", "2"]
    score.main(argv[:-4] + ["--output", str(tmp_path / "reference.jsonl"), "--block_size", "2"])
    real_score_block, calls = score.score_block, []

    def killed_at_third_block(block, teacher):
        calls.append(block[0]["question"])
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill: nothing after this point is written
        return real_score_block(block, teacher)

    monkeypatch.setattr(score, "score_block", killed_at_third_block)
    with pytest.raises(KeyboardInterrupt):
        score.main(argv)
    assert not (tmp_path / "out.jsonl").exists()
    assert sorted(p.name for p in (tmp_path / "out.jsonl.parts").glob("block-*")) == ["block-0000000.jsonl",
                                                                                        "block-0000001.jsonl"]
    calls.clear()
    monkeypatch.setattr(score, "score_block", lambda block, teacher: calls.append(1) or real_score_block(block, teacher))
    score.main(argv)
    assert len(calls) == 2  # blocks 2 and 3 of 4
    assert (tmp_path / "out.jsonl").read_text() == (tmp_path / "reference.jsonl").read_text()


def test_two_processes_write_what_one_process_writes(tiny_cross_encoder, tmp_path):
    records = make_records(9, num_negatives=2, seed=14)
    source = write_jsonl(tmp_path / "in.jsonl", records)
    common = ["--teacher", tiny_cross_encoder, "--input", source, "--block_size", "2"]
    score.main([*common, "--output", str(tmp_path / "one.jsonl")])
    result = launch_two_processes(["-m", "data_prep.score", *common, "--output", str(tmp_path / "two.jsonl")])
    assert "this process: 3 blocks" in result.stdout + result.stderr and "this process: 2 blocks" in result.stdout + result.stderr
    one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "two.jsonl")
    assert [r["question"] for r in two] == [r["question"] for r in one]
    for a, b in zip(one, two):
        assert a["pos_scores"] + a["neg_scores"] == pytest.approx(b["pos_scores"] + b["neg_scores"], abs=1e-6)


def test_bad_input_is_one_clear_error_before_the_teacher_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "pos_doc": []}\n')
    from finetune.data.schema import DataFormatError

    with pytest.raises(DataFormatError, match="bad.jsonl, line 1, field 'pos_doc'"):
        score.main(["--teacher", str(tmp_path / "no-such-teacher"), "--input", str(bad), "--output", str(tmp_path / "o")])


def cross_encoder_logits(folder, question, documents, query_prefix=""):
    """The teacher's raw logit of each (question, document) pair, computed with transformers alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        encoded = tokenizer([query_prefix + question] * len(documents), documents, padding=True, truncation=True,
                            max_length=256, return_tensors="pt")
        return model(**encoded).logits[:, 0].tolist()


def test_every_positive_gets_its_own_score(spread_cross_encoder, tmp_path):
    """Records with several positives (and different counts of them): pos_scores[i] is the teacher's score of
    pos_doc[i], in order, and the negatives' scores follow their own documents."""
    records = make_records(5, num_negatives=2, seed=15)
    for index, record in enumerate(records):  # 1, 2, 3, 1, 2 positives: each a different text
        record["pos_doc"] += [f"{record['question']} extra passage {n} of {index}" for n in range(index % 3)]
    output = tmp_path / "scored.jsonl"
    score.main(["--teacher", spread_cross_encoder, "--input", write_jsonl(tmp_path / "in.jsonl", records),
                "--output", str(output), "--block_size", "2"])
    for record, result in zip(records, read_jsonl(output), strict=True):
        assert len(result["pos_scores"]) == len(record["pos_doc"]) and len(result["neg_scores"]) == 2
        assert result["pos_scores"] == pytest.approx(
            cross_encoder_logits(spread_cross_encoder, record["question"], record["pos_doc"]), abs=1e-5)
        assert result["neg_scores"] == pytest.approx(
            cross_encoder_logits(spread_cross_encoder, record["question"], record["neg_doc"]), abs=1e-5)
        if len(record["pos_doc"]) > 1:  # the positives' scores differ: a score reused for all could not pass
            assert max(result["pos_scores"]) - min(result["pos_scores"]) > 1e-3


@pytest.mark.parametrize("changed", [["--block_size", "3"], ["--query_prefix", "q: "]], ids=["block_size", "prefix"])
def test_a_rerun_with_other_settings_does_not_mix_in_old_blocks(spread_cross_encoder, tmp_path, monkeypatch, changed):
    """A run killed after 2 blocks, then rerun with another block size (or prompt): the output is that of a fresh run
    with the new settings, with every record once, in input order."""
    records = make_records(7, num_negatives=1, seed=16)
    source = write_jsonl(tmp_path / "in.jsonl", records)
    first = ["--teacher", spread_cross_encoder, "--input", source, "--output", str(tmp_path / "out.jsonl"),
             "--block_size", "2"]
    rerun = [*first, *changed]  # the last value of an option wins
    score.main([*rerun[:rerun.index("--output")], "--output", str(tmp_path / "fresh.jsonl"),
                *rerun[rerun.index("--output") + 2:]])
    real_score_block, calls = score.score_block, []

    def killed_at_third_block(block, teacher):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_score_block(block, teacher)

    monkeypatch.setattr(score, "score_block", killed_at_third_block)
    with pytest.raises(KeyboardInterrupt):
        score.main(first)
    assert len(list((tmp_path / "out.jsonl.parts").glob("block-*"))) == 2  # two blocks of 2 records left behind
    monkeypatch.setattr(score, "score_block", real_score_block)
    score.main(rerun)
    resumed, fresh = read_jsonl(tmp_path / "out.jsonl"), read_jsonl(tmp_path / "fresh.jsonl")
    assert [r["question"] for r in resumed] == [r["question"] for r in records]
    for a, b in zip(resumed, fresh, strict=True):
        assert a["pos_scores"] + a["neg_scores"] == pytest.approx(b["pos_scores"] + b["neg_scores"], abs=1e-6)
    prefix = "q: " if "--query_prefix" in changed else ""
    assert resumed[0]["pos_scores"] == pytest.approx(  # the new settings' scores, computed independently
        cross_encoder_logits(spread_cross_encoder, records[0]["question"], records[0]["pos_doc"], prefix), abs=1e-5)
