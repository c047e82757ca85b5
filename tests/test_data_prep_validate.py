"""data_prep.validate: every problem named with file, location and field; good + rejects lose nothing; statistics."""

import gzip
import json
import os

import pytest

from conftest import make_records, write_jsonl
from data_prep import validate
from finetune.training.checkpointing import atomic_write as atomic_output
from finetune.data.schema import read_records

GOOD = {"question": "q", "pos_doc": ["p"], "neg_doc": ["n1", "n2"]}


def write_lines(path, lines) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def read_jsonl(path) -> list:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def run(capsys, *argv) -> tuple[int, str]:
    status = validate.main([str(arg) for arg in argv])
    return status, capsys.readouterr().out


@pytest.mark.parametrize("line, field, expected", [
    (json.dumps({"pos_doc": ["p"], "neg_doc": []}), "question", "missing"),
    (json.dumps({"question": 3, "pos_doc": ["p"]}), "question", "expected a string, got int 3"),
    (json.dumps({"question": "  ", "pos_doc": ["p"]}), "question", "non-empty string"),
    (json.dumps({"question": "q"}), "pos_doc", "missing"),
    (json.dumps({"question": "q", "pos_doc": []}), "pos_doc", "non-empty list"),
    (json.dumps({"question": "q", "pos_doc": "p"}), "pos_doc", "single string; wrap it"),
    (json.dumps({"question": "q", "pos_doc": ["p", 5]}), "pos_doc[1]", "expected a string, got int 5"),
    (json.dumps({"question": "q", "pos_doc": ["p"], "neg_doc": None}), "neg_doc", "expected a list of strings"),
    (json.dumps({"question": "q", "pos_doc": ["p"], "neg_doc": ["ok", ""]}), "neg_doc[1]", "non-empty string"),
    ('{"question": "q", "pos_doc": [', None, "invalid JSON"),
    ('["q", "p"]', None, "expected a JSON object"),
])
def test_each_error_kind_is_reported_and_rejected_with_its_raw_line(tmp_path, capsys, line, field, expected):
    good_lines = [json.dumps(GOOD), json.dumps({**GOOD, "question": "q2", "extra": 1})]
    path = write_lines(tmp_path / "data.jsonl", [good_lines[0], line, good_lines[1]])
    status, out = run(capsys, path, "--output", tmp_path / "good.jsonl", "--rejects", tmp_path / "bad.jsonl")
    assert status == 1
    where = f"{path}, line 2, field '{field}'" if field else f"{path}, line 2:"
    assert where in out and expected in out
    assert "3 records: 2 valid, 1 invalid" in out
    # Nothing lost: good records as they were (other keys kept), the bad one with its raw text and reason.
    assert read_jsonl(tmp_path / "good.jsonl") == [json.loads(text) for text in good_lines]
    (reject,) = read_jsonl(tmp_path / "bad.jsonl")
    assert reject["file"] == path and reject["location"] == "line 2" and reject["raw"] == line
    assert expected in reject["problems"][0]


def test_every_bad_record_of_every_file_is_reported_and_nothing_is_lost(tmp_path, capsys):
    records = make_records(6)
    first = write_jsonl(tmp_path / "a.jsonl", records[:3])
    broken = [json.dumps(records[3]), "{not json", json.dumps({"question": "", "pos_doc": [], "neg_doc": [1]})]
    second = write_lines(tmp_path / "b.jsonl", broken)
    array = tmp_path / "c.json"
    array.write_text(json.dumps([records[4], {"question": "q"}, records[5]]), encoding="utf-8")
    status, out = run(capsys, first, second, array, "--output", tmp_path / "good.jsonl.gz",
                      "--rejects", tmp_path / "bad.jsonl")
    assert status == 1
    for location in (f"{second}, line 2:", f"{second}, line 3, field 'question'", f"{second}, line 3, field 'pos_doc'",
                     f"{second}, line 3, field 'neg_doc[0]'", f"{array}, record 2, field 'pos_doc'"):
        assert location in out
    assert "9 records: 6 valid, 3 invalid (5 problem(s))" in out
    assert list(read_records(str(tmp_path / "good.jsonl.gz"))) and \
        [r["question"] for r in read_records(str(tmp_path / "good.jsonl.gz"))] == [r["question"] for r in records]
    rejects = read_jsonl(tmp_path / "bad.jsonl")
    assert [(r["file"], r["location"]) for r in rejects] == [(second, "line 2"), (second, "line 3"), (str(array), "record 2")]
    assert [r["raw"] for r in rejects[:2]] == broken[1:] and json.loads(rejects[2]["raw"]) == {"question": "q"}
    assert len(rejects[1]["problems"]) == 3


def test_empty_and_undecodable_files_are_errors(tmp_path, capsys):
    empty = write_lines(tmp_path / "empty.jsonl", [""])
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(GOOD).encode() + b"\n" + '{"question": "caf\xe9", "pos_doc": ["p"]}\n'.encode("latin-1"))
    status, out = run(capsys, empty, latin, "--rejects", tmp_path / "bad.jsonl")
    assert status == 1
    assert f"{empty}, file: holds no records" in out and f"{latin}, byte" in out and "not valid UTF-8" in out
    (reject,) = read_jsonl(tmp_path / "bad.jsonl")
    assert reject["file"] == str(latin) and "caf\\xe9" in reject["raw"]  # the bytes, escaped, not lost


def test_valid_files_exit_zero_with_word_statistics_and_duplicates(tmp_path, capsys):
    records = make_records(4)
    records[1]["question"] = records[0]["question"].upper() + "  "  # same question up to case and spacing
    records[2]["neg_doc"].append(records[2]["pos_doc"][0])  # a false negative
    records.append(dict(records[3]))  # an identical record
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    report_path = tmp_path / "report.json"
    status, out = run(capsys, path, "--report_json", report_path)
    assert status == 0 and "5 records: 5 valid, 0 invalid" in out
    summary = json.loads(report_path.read_text())
    assert summary["length_unit"] == "whitespace words"
    assert summary["lengths"]["question"]["max"] == max(len(r["question"].split()) for r in records)
    assert summary["lengths"]["neg_doc"]["count"] == sum(len(r["neg_doc"]) for r in records)
    assert summary["negatives_per_record"] == {"min": 3, "mean": 3.2, "max": 4, "records_without_negatives": 0}
    assert summary["duplicates"]["questions_repeated"] == 2  # records[1] and the identical copy
    assert summary["duplicates"]["identical_records"] == 1
    assert summary["duplicates"]["negatives_equal_to_a_positive"] == 1
    assert "equal a pos_doc of the same record" in out


def test_token_statistics_use_the_model_tokenizer(tmp_path, capsys, tiny_bert):
    from transformers import AutoTokenizer

    records = make_records(5)
    path = write_jsonl(tmp_path / "data.jsonl", records)
    report_path = tmp_path / "report.json"
    status, out = run(capsys, path, "--model_name_or_path", tiny_bert, "--query_prefix", "query: ",
                      "--query_max_length", "6", "--report_json", report_path)
    assert status == 0 and "tokens" in out
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    lengths = [len(tokenizer("query: " + r["question"])["input_ids"]) for r in records]
    question = json.loads(report_path.read_text())["lengths"]["question"]
    assert (question["min"], question["max"]) == (min(lengths), max(lengths))
    assert question["over_max_length"] == sum(length > 6 for length in lengths)


def test_line_separators_inside_strings_do_not_split_records(tmp_path, capsys):
    record = {"question": "a\u2028b", "pos_doc": ["c\u0085d"], "neg_doc": []}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n" + json.dumps(GOOD) + "\n", encoding="utf-8")
    status, out = run(capsys, path)
    assert status == 0 and "2 records: 2 valid" in out
    assert [r["question"] for r in read_records(str(path))] == ["a\u2028b", "q"]


def test_outputs_are_replaced_atomically(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_output(str(target)) as handle:
            handle.write("half a file")
            raise RuntimeError("crash")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["out.jsonl"]
    with atomic_output(str(target)) as handle:
        handle.write("new\n")
        assert target.read_text() == "old\n"  # not visible before the block ends
    assert target.read_text() == "new\n" and os.listdir(tmp_path) == ["out.jsonl"]
