"""Records carry optional fields (teacher scores): validated when present, carried through the columns, the
sampled examples and the batch, aligned with the documents; one normaliser for every tool."""

import json

import pytest
import torch

from conftest import make_records, write_jsonl
from data_prep.records import merge_records
from finetune.data.examples import TripletCollator, TripletDataset
from finetune.data.columns import load_raw_dataset, tokenize_dataset
from finetune.data.schema import DataFormatError, check_record, normalize_record, read_records

GOOD = {"question": "q", "pos_doc": ["p"], "neg_doc": ["n1", "n2"], "pos_scores": [7.1], "neg_scores": [2.3, -0.4]}


@pytest.mark.parametrize("change, field, message", [
    ({"neg_scores": [2.3]}, "neg_scores", "has 1 score\\(s\\) but neg_doc has 2 document"),
    ({"pos_scores": [1.0, 2.0]}, "pos_scores", "has 2 score\\(s\\) but pos_doc has 1 document"),
    ({"neg_scores": [2.3, "high"]}, "neg_scores\\[1\\]", "expected a number, got str"),
    ({"neg_scores": [2.3, True]}, "neg_scores\\[1\\]", "expected a number, got bool"),
    ({"pos_scores": [float("nan")]}, "pos_scores\\[0\\]", "expected a finite number, got nan"),
    ({"neg_scores": [float("inf"), 1.0]}, "neg_scores\\[0\\]", "expected a finite number, got inf"),
    ({"pos_scores": 7.1}, "pos_scores", "expected a list of numbers"),
    ({"neg_scores": None}, "neg_scores", "expected a list of numbers"),
])
def test_bad_scores_name_file_line_and_field(tmp_path, change, field, message):
    path = write_jsonl(tmp_path / "scores.jsonl", [GOOD, {**GOOD, **change}])
    with pytest.raises(DataFormatError, match=f"scores.jsonl, line 2, field '{field}': {message}"):
        list(read_records(path))


def test_scores_must_cover_both_lists():
    without_negative_scores = {key: value for key, value in GOOD.items() if key != "neg_scores"}
    assert check_record(without_negative_scores) == [
        ("neg_scores", "missing while 'pos_scores' is given; teacher scores must cover every document "
                       "(one number per neg_doc entry)")]
    assert [field for field, _ in check_record({**GOOD, "pos_scores": None} | {})][:1] == ["pos_scores"]
    no_negatives = {"question": "q", "pos_doc": ["p"], "pos_scores": [1]}
    assert check_record(no_negatives) == []
    assert normalize_record(no_negatives) == {"question": "q", "pos_doc": ["p"], "neg_doc": [], "pos_scores": [1.0],
                                              "neg_scores": []}


def test_normaliser_keeps_known_fields_and_drops_the_rest():
    record = {**GOOD, "source": "x", "id": 7, "pos_scores": [7]}
    assert normalize_record(record) == {"question": "q", "pos_doc": ["p"], "neg_doc": ["n1", "n2"],
                                        "pos_scores": [7.0], "neg_scores": [2.3, -0.4]}
    assert normalize_record({"question": "q", "pos_doc": ["p"]}) == {"question": "q", "pos_doc": ["p"], "neg_doc": []}


def test_scores_follow_the_sampled_documents_into_the_batch(tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    records = make_records(6, num_negatives=5, seed=8)
    for index, record in enumerate(records):  # score = a unique number that names the document
        record["pos_scores"] = [100.0 * index]
        record["neg_scores"] = [100.0 * index + 1 + n for n in range(5)]
    unscored = make_records(2, num_negatives=5, seed=9)
    path = write_jsonl(tmp_path / "d.jsonl", records + unscored)
    dataset = TripletDataset(tokenize_dataset(load_raw_dataset(path), tokenizer), num_hard_negatives=3, seed=5)
    for index, record in enumerate(records):
        example = dataset[(2, index)]
        texts = record["pos_doc"] + record["neg_doc"]
        scores = record["pos_scores"] + record["neg_scores"]
        expected = [scores[[tokenizer(t, truncation=True, max_length=256)["input_ids"] for t in texts].index(ids)]
                    for ids in example["doc_input_ids"]]
        assert example["doc_scores"] == pytest.approx(expected)
    assert "doc_scores" not in dataset[6]  # a record without scores
    collator = TripletCollator(tokenizer)
    batch = collator([dataset[i] for i in range(3)])
    examples = [dataset[i] for i in range(3)]
    expected = [e["doc_scores"][0] for e in examples] + [s for e in examples for s in e["doc_scores"][1:]]
    assert torch.equal(batch["doc_scores"], torch.tensor(expected, dtype=torch.float32))
    assert "doc_scores" not in collator([dataset[5], dataset[6]])  # mixed: no partial scores


def test_unknown_keys_are_still_ignored(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{**GOOD, "instruction_of_the_future": 1, "meta": {"a": 1}}])
    (record,) = read_records(path)
    assert "meta" not in record and record["neg_scores"] == [2.3, -0.4]


def test_merge_keeps_scores_aligned():
    first = {"question": "q", "pos_doc": ["a"], "neg_doc": ["x", "y"], "pos_scores": [1.0], "neg_scores": [0.1, 0.2]}
    second = {"question": "q", "pos_doc": ["b", "a"], "neg_doc": ["y", "z", "b"], "pos_scores": [2.0, 9.0],
              "neg_scores": [0.9, 0.3, 0.5]}
    (merged,), counts = merge_records([first, second])
    assert merged == {"question": "q", "pos_doc": ["a", "b"], "neg_doc": ["x", "y", "z"], "pos_scores": [1.0, 2.0],
                      "neg_scores": [0.1, 0.2, 0.3]}  # "b" is a positive, so it is no negative
    assert counts == {"merged": 1, "negatives_removed_as_positive": 1}
    (unscored,), _ = merge_records([first, {"question": "q", "pos_doc": ["c"]}])
    assert "pos_scores" not in unscored and unscored["pos_doc"] == ["a", "c"]


def test_validate_tool_accepts_and_reports_scores(tmp_path, capsys):
    from data_prep import validate

    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    assert validate.main([good]) == 0
    bad = write_jsonl(tmp_path / "bad.jsonl", [{**GOOD, "neg_scores": [1.0]}])
    assert validate.main([bad, "--report_json", str(tmp_path / "r.json")]) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert "neg_scores" in json.dumps(report)
