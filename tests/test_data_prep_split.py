"""data_prep.split: deterministic, sized by ratio or count, groups never straddle the split, optional dedup."""

import json
import random

import pytest
from hypothesis import given, settings, strategies as st

from conftest import make_records, write_jsonl
from data_prep import split
from data_prep.records import normalize_text
from finetune.data.schema import normalize_record
from finetune.data.schema import read_records


def run(tmp_path, data, *argv, prefix="") -> tuple[list[dict], list[dict], dict]:
    train, validation = tmp_path / f"{prefix}train.jsonl", tmp_path / f"{prefix}val.jsonl"
    counts = split.main(["--input", str(data), "--train_output", str(train), "--validation_output", str(validation),
                         *map(str, argv)])
    return read(train), read(validation), counts


def read(path) -> list[dict]:
    return [normalize_record(record) for record in read_records(str(path))]  # without "source" (the file name)


def questions(records) -> list[str]:
    return [record["question"] for record in records]


@pytest.fixture
def grouped_records():
    """50 records; some questions repeat (also up to case and spacing), some positives are shared."""
    records = make_records(50, num_negatives=1, seed=7)
    for index in range(0, 12, 3):
        records[index + 1]["question"] = records[index]["question"].upper() + " "
        records[index + 2]["question"] = records[index]["question"]
    records[30]["pos_doc"].append(records[31]["pos_doc"][0])  # 30-31-32 share positives, transitively
    records[32]["pos_doc"] = [records[31]["pos_doc"][0].title(), records[32]["pos_doc"][0]]
    return records


def test_deterministic_and_sized_by_ratio(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", make_records(100, seed=1))
    train, validation, counts = run(tmp_path, data, "--validation_ratio", 0.1)
    again_train, again_validation, _ = run(tmp_path, data, "--validation_ratio", 0.1, prefix="again_")
    assert (train, validation) == (again_train, again_validation)
    assert len(validation) == 10 and len(train) == 90 and counts == {
        "records_in": 100, "duplicates_dropped": 0, "train": 90, "validation": 10, "target": 10}
    assert (tmp_path / "train.jsonl").read_bytes() == (tmp_path / "again_train.jsonl").read_bytes()
    _, other_validation, _ = run(tmp_path, data, "--validation_ratio", 0.1, "--seed", 1, prefix="seed1_")
    assert questions(other_validation) != questions(validation)
    source = questions(read_records(data))  # each file keeps the input order
    assert questions(train) == [q for q in source if q in set(questions(train))]


def test_default_ratio_is_nemo_val_ratio_and_count_is_exact(tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", make_records(100, seed=1))
    assert len(run(tmp_path, data)[1]) == 4  # 0.04
    train, validation, _ = run(tmp_path, data, "--validation_count", 17)
    assert len(validation) == 17 and len(train) == 83


def test_split_does_not_depend_on_input_order(tmp_path):
    records = make_records(60, seed=2)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    _, validation, _ = run(tmp_path, write_jsonl(tmp_path / "a.jsonl", records), "--validation_count", 9)
    _, shuffled_validation, _ = run(tmp_path, write_jsonl(tmp_path / "b.jsonl", shuffled), "--validation_count", 9,
                                    prefix="b_")
    assert sorted(questions(validation)) == sorted(questions(shuffled_validation))


@pytest.mark.parametrize("seed", range(4))
def test_same_question_never_straddles(tmp_path, grouped_records, seed):
    data = write_jsonl(tmp_path / "data.jsonl", grouped_records)
    train, validation, _ = run(tmp_path, data, "--validation_count", 10, "--seed", seed)
    assert len(validation) == 10 and len(train) + len(validation) == 50
    assert not {normalize_text(q) for q in questions(train)} & {normalize_text(q) for q in questions(validation)}


@pytest.mark.parametrize("seed", range(4))
def test_shared_positives_never_straddle(tmp_path, grouped_records, seed):
    data = write_jsonl(tmp_path / "data.jsonl", grouped_records)
    train, validation, _ = run(tmp_path, data, "--validation_count", 10, "--seed", seed, "--group_by", "pos_doc")
    train_docs = {normalize_text(text) for record in train for text in record["pos_doc"]}
    assert not train_docs & {normalize_text(text) for record in validation for text in record["pos_doc"]}
    sides = {record["question"]: side for side, records in (("t", train), ("v", validation)) for record in records}
    assert sides[grouped_records[30]["question"]] == sides[grouped_records[32]["question"]]


def test_dedupe_drops_identical_records_only(tmp_path):
    records = make_records(20, seed=3)
    near_copy = {**records[1], "neg_doc": records[1]["neg_doc"][:1]}
    data = write_jsonl(tmp_path / "data.jsonl", records + [records[0], records[5], near_copy])
    train, validation, counts = run(tmp_path, data, "--validation_count", 5, "--dedupe")
    assert counts["duplicates_dropped"] == 2 and len(train) + len(validation) == 21
    kept = [json.dumps(r, sort_keys=True) for r in train + validation]
    assert len(set(kept)) == len(kept)
    assert len(run(tmp_path, data, "--validation_count", 5, prefix="all_")[0]) == 18


@pytest.mark.parametrize("argv, message", [
    (["--validation_ratio", "1.5"], "between 0 and 1"),
    (["--validation_count", "20"], "between 1 and 19"),
])
def test_bad_sizes(tmp_path, argv, message):
    data = write_jsonl(tmp_path / "data.jsonl", make_records(20))
    with pytest.raises(ValueError, match=message):
        run(tmp_path, data, *argv)


def test_ratio_and_count_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        split.main(["--input", "x", "--train_output", "a", "--validation_output", "b", "--validation_ratio", "0.1",
                    "--validation_count", "3"])
    assert "not allowed with argument" in capsys.readouterr().err


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(st.integers(min_value=0, max_value=12), min_size=2, max_size=40),
       target=st.integers(min_value=1, max_value=39), seed=st.integers(min_value=0, max_value=3))
def test_groups_stay_whole_and_validation_never_exceeds_the_target(groups, target, seed):
    records = [{"question": f"Question {group}" + " " * (i % 2), "pos_doc": [f"doc {i}"], "neg_doc": []}
               for i, group in enumerate(groups)]
    train, validation = split.split_records(records, validation_count=target, seed=seed)
    assert len(train) + len(validation) == len(records)
    assert not {normalize_text(q) for q in questions(train)} & {normalize_text(q) for q in questions(validation)}
    assert len(validation) <= target
    if len(set(groups)) == len(groups):  # singleton groups fill the target exactly
        assert len(validation) == min(target, len(records))
