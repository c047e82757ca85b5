"""Reading, validation errors, tokenized columns, sampling and the collator."""

import gzip
import json
import os

import pytest
import torch
from transformers import AutoTokenizer

from conftest import make_records, write_jsonl
from finetune.data import columns as data_module
from finetune.data.samplers import EpochShuffleSampler
from finetune.data.examples import TripletCollator, TripletDataset
from finetune.data.columns import check_enough_negatives, load_raw_dataset, tokenize_dataset
from finetune.data.schema import DataFormatError
from finetune.data.text import TextSide

GOOD = {"question": "q", "pos_doc": ["p"], "neg_doc": ["n1", "n2"]}


def write_lines(path, lines) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def problems_of(path):
    with pytest.raises(DataFormatError) as info:
        load_raw_dataset(path)
    return info.value


@pytest.mark.parametrize("record, field, expected", [
    ({"pos_doc": ["p"], "neg_doc": []}, "question", "missing"),
    ({"question": 3, "pos_doc": ["p"]}, "question", "expected a string, got int 3"),
    ({"question": "  ", "pos_doc": ["p"]}, "question", "non-empty string"),
    ({"question": "q"}, "pos_doc", "missing"),
    ({"question": "q", "pos_doc": []}, "pos_doc", "non-empty list"),
    ({"question": "q", "pos_doc": "p"}, "pos_doc", "single string; wrap it"),
    ({"question": "q", "pos_doc": ["p", 5]}, "pos_doc[1]", "expected a string, got int 5"),
    ({"question": "q", "pos_doc": ["p"], "neg_doc": None}, "neg_doc", "expected a list of strings, got NoneType"),
    ({"question": "q", "pos_doc": ["p"], "neg_doc": ["ok", ""]}, "neg_doc[1]", "non-empty string"),
])
def test_each_field_error_names_file_line_and_field(tmp_path, record, field, expected):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), json.dumps(GOOD), json.dumps(record)])
    error = problems_of(path)
    assert len(error.problems) == 1
    problem = error.problems[0]
    assert (problem.file, problem.location, problem.field) == (path, "line 3", field)
    assert expected in problem.message
    assert f"{path}, line 3, field '{field}'" in str(error)


def test_invalid_json_names_the_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), '{"question": "q", "pos_doc": [', json.dumps(GOOD)])
    error = problems_of(path)
    assert [(p.location, p.field) for p in error.problems] == [("line 2", None)]
    assert "invalid JSON" in error.problems[0].message


def test_not_an_object(tmp_path):
    error = problems_of(write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), '["q", "p"]']))
    assert "expected a JSON object" in error.problems[0].message


def test_all_problems_are_reported_at_once(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"question": "q"}), json.dumps(GOOD), "nope"])
    assert [p.location for p in problems_of(path).problems] == ["line 1", "line 3"]


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    error = problems_of(str(path))
    assert "holds no records" in str(error)


def test_json_array_errors_name_the_record(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, {"question": "q", "pos_doc": []}]), encoding="utf-8")
    error = problems_of(str(path))
    assert (error.problems[0].location, error.problems[0].field) == ("record 2", "pos_doc")


def test_non_utf8(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"question": "caf\xe9", "pos_doc": ["p"]}\n')
    assert "not valid UTF-8" in str(problems_of(str(path)))


def test_missing_file_and_empty_glob(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        load_raw_dataset(str(tmp_path / "nothing.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"\*.jsonl"):
        load_raw_dataset(str(tmp_path / "*.jsonl"))


def test_jsonl_json_array_gzip_and_glob_read_the_same(tmp_path):
    records = make_records(5)
    write_jsonl(tmp_path / "a.jsonl", records[:3])
    (tmp_path / "b.json").write_text(json.dumps(records[3:], indent=2), encoding="utf-8")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write(json.dumps(records[0]) + "\n")
    raw = load_raw_dataset([str(tmp_path / "*.json*")])
    assert raw["question"] == [r["question"] for r in records] + [records[0]["question"]]
    assert raw[3]["neg_doc"] == records[3]["neg_doc"]
    assert raw[0]["source"] == f"{tmp_path / 'a.jsonl'}, line 1"


def test_missing_neg_doc_reads_as_empty(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps({"question": "q", "pos_doc": ["p"]})])
    assert load_raw_dataset(path)[0]["neg_doc"] == []


def test_changed_file_is_read_again(tmp_path):
    path = tmp_path / "data.jsonl"
    write_jsonl(path, make_records(3, seed=1))
    first = load_raw_dataset(str(path))["question"]
    write_jsonl(path, make_records(4, seed=2))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    assert load_raw_dataset(str(path))["question"] != first


@pytest.fixture
def tokenizer(tiny_bert):
    return AutoTokenizer.from_pretrained(tiny_bert)


def test_tokenized_columns_apply_prefixes_and_lengths(tmp_path, tokenizer):
    records = make_records(4, num_negatives=2)
    raw = load_raw_dataset(write_jsonl(tmp_path / "d.jsonl", records))
    tokenized = tokenize_dataset(raw, tokenizer, query=TextSide("query: ", 6), document=TextSide("passage: ", 9))
    row = tokenized[0]
    assert row["query_input_ids"] == tokenizer("query: " + records[0]["question"], truncation=True, max_length=6)["input_ids"]
    assert row["pos_input_ids"][0] == tokenizer("passage: " + records[0]["pos_doc"][0], truncation=True, max_length=9)["input_ids"]
    assert len(row["neg_input_ids"]) == 2 and all(len(ids) <= 9 for ids in row["neg_input_ids"])
    assert row["pos_keys"][0] == data_module.text_key(records[0]["pos_doc"][0])


def test_tokenization_is_cached(tmp_path, tokenizer, monkeypatch):
    raw = load_raw_dataset(write_jsonl(tmp_path / "d.jsonl", make_records(4)))
    first = tokenize_dataset(raw, tokenizer)
    calls = []
    original = data_module._tokenize_batch
    monkeypatch.setattr(data_module, "_tokenize_batch", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = tokenize_dataset(load_raw_dataset(str(tmp_path / "d.jsonl")), tokenizer)
    assert calls == [] and again.cache_files == first.cache_files
    tokenize_dataset(raw, tokenizer, query=TextSide("query: ", 64))  # other settings: tokenized anew
    assert calls


def test_empty_negatives_with_k_is_an_error(tmp_path, tokenizer):
    records = make_records(3)
    records[1]["neg_doc"] = []
    path = write_jsonl(tmp_path / "d.jsonl", records)
    tokenized = tokenize_dataset(load_raw_dataset(path), tokenizer)
    check_enough_negatives(tokenized, 0)
    with pytest.raises(DataFormatError) as info:
        check_enough_negatives(tokenized, 2)
    assert (info.value.problems[0].file, info.value.problems[0].location) == (path, "line 2")


def dataset_with_negatives(tmp_path, tokenizer, negatives_per_record, k, seed=0):
    records = make_records(len(negatives_per_record), num_negatives=max(negatives_per_record))
    for record, count in zip(records, negatives_per_record):
        record["neg_doc"] = record["neg_doc"][:count]
    raw = load_raw_dataset(write_jsonl(tmp_path / f"d{seed}.jsonl", records))
    return TripletDataset(tokenize_dataset(raw, tokenizer), k, seed=seed)


def test_sampling_without_replacement_when_enough(tmp_path, tokenizer):
    dataset = dataset_with_negatives(tmp_path, tokenizer, [5], k=5)
    keys = dataset.tokenized[0]["neg_keys"]
    for epoch in range(5):
        sampled = dataset[(epoch, 0)]["doc_keys"][1:]
        assert sorted(sampled) == sorted(keys)  # all 5 distinct negatives, each once


def test_sampling_with_replacement_when_too_few(tmp_path, tokenizer):
    dataset = dataset_with_negatives(tmp_path, tokenizer, [2], k=6)
    sampled = dataset[0]["doc_keys"][1:]
    assert len(sampled) == 6 and set(sampled) <= set(dataset.tokenized[0]["neg_keys"])


def test_sampling_is_seeded_and_changes_with_epoch(tmp_path, tokenizer):
    dataset = dataset_with_negatives(tmp_path, tokenizer, [8] * 4, k=2)
    assert dataset[(0, 1)] == dataset[(0, 1)] == dataset[1]
    draws = {tuple(dataset[(epoch, 1)]["doc_keys"]) for epoch in range(6)}
    assert len(draws) > 1


def test_positive_is_sampled_among_several(tmp_path, tokenizer):
    record = {"question": "q", "pos_doc": ["p one", "p two", "p three"], "neg_doc": ["n"]}
    raw = load_raw_dataset(write_jsonl(tmp_path / "d.jsonl", [record]))
    dataset = TripletDataset(tokenize_dataset(raw, tokenizer), 1)
    positives = {dataset[(epoch, 0)]["doc_keys"][0] for epoch in range(20)}
    assert len(positives) == 3


def test_epoch_sampler_is_a_seeded_permutation():
    sampler = EpochShuffleSampler(10, seed=3)
    first = list(sampler)
    assert sorted(index for _, index in first) == list(range(10)) and {e for e, _ in first} == {0}
    assert list(EpochShuffleSampler(10, seed=3)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert {e for e, _ in second} == {1} and [i for _, i in second] != [i for _, i in first]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collator_shapes_layout_and_padding(tmp_path, tokenizer, padding_side):
    tokenizer.padding_side = padding_side
    dataset = dataset_with_negatives(tmp_path, tokenizer, [3, 3, 3], k=2)
    features = [dataset[i] for i in range(3)]
    batch = TripletCollator(tokenizer)(features)
    assert batch["query_input_ids"].shape[0] == 3 and batch["doc_input_ids"].shape[0] == 3 * (1 + 2)
    assert batch["doc_keys"].tolist() == ([f["doc_keys"][0] for f in features]
                                          + [k for f in features for k in f["doc_keys"][1:]])
    # Positive of example 1 is row 1; its second negative is row 3 + 1*2 + 1.
    for row, ids in [(1, features[1]["doc_input_ids"][0]), (3 + 2 + 1, features[1]["doc_input_ids"][2])]:
        mask = batch["doc_attention_mask"][row].bool()
        assert batch["doc_input_ids"][row][mask].tolist() == ids
        assert mask.sum() == len(ids)
        real_at_end = bool(mask[-1]) if padding_side == "left" else bool(mask[0])
        assert real_at_end
    longest = max(len(ids) for f in features for ids in f["doc_input_ids"])
    assert batch["doc_input_ids"].shape[1] == longest
    assert (batch["doc_input_ids"][~batch["doc_attention_mask"].bool()] == tokenizer.pad_token_id).all()
    assert batch["doc_input_ids"].dtype == torch.long


def test_collator_pads_to_multiple(tmp_path, tokenizer):
    dataset = dataset_with_negatives(tmp_path, tokenizer, [1, 1], k=1)
    batch = TripletCollator(tokenizer, pad_to_multiple_of=8)([dataset[0], dataset[1]])
    assert batch["doc_input_ids"].shape[1] % 8 == 0 and batch["query_input_ids"].shape[1] % 8 == 0


def test_length_grouped_sampler_groups_lengths_and_keeps_every_example_once():
    import random

    from finetune.data.samplers import EpochShuffleSampler, LengthGroupedEpochSampler

    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(1000)]
    sampler = LengthGroupedEpochSampler(lengths, batch_size=10, seed=3, mega_batches=20)
    keys = list(sampler)
    assert sorted(index for _, index in keys) == list(range(1000))
    assert {epoch for epoch, _ in keys} == {0}
    def mean_spread(order):  # average (max - min) length inside consecutive batches of 10
        batches = [order[i:i + 10] for i in range(0, len(order), 10)]
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    grouped = mean_spread([index for _, index in keys])
    shuffled = mean_spread([index for _, index in EpochShuffleSampler(1000, seed=3)])
    assert grouped < shuffled / 5
    sampler.set_epoch(1)
    assert [index for _, index in sampler] != [index for _, index in keys]  # a new order each epoch
    assert list(LengthGroupedEpochSampler(lengths, 10, seed=3, mega_batches=20)) == keys  # deterministic


def test_example_lengths_are_the_longest_document(tokenizer, train_file):
    from finetune.data.columns import example_lengths, load_raw_dataset, tokenize_dataset

    tokenized = tokenize_dataset(load_raw_dataset([train_file]), tokenizer, query=TextSide(max_length=32),
                                 document=TextSide(max_length=64))
    expected = [max(len(doc) for doc in row["pos_input_ids"] + row["neg_input_ids"]) for row in tokenized]
    assert len(set(expected)) > 3
    assert example_lengths(tokenized) == expected
    subset = tokenized.select([3, 1])
    assert example_lengths(subset) == [expected[3], expected[1]]


def test_the_epoch_reaches_the_sampler_under_accelerates_wrappers_of_a_resumed_multi_process_epoch():
    """SkipBatchSampler(BatchSamplerShard(BatchSampler(ours))): the Trainer's set_epoch does not get through, our
    callback does (else a resumed epoch under several processes replays epoch 0's order)."""
    from types import SimpleNamespace

    from accelerate.data_loader import BatchSamplerShard, SkipBatchSampler
    from torch.utils.data import BatchSampler

    from finetune.data.samplers import EpochShuffleSampler, SamplerEpochCallback, epoch_sampler_of

    sampler = EpochShuffleSampler(24, seed=7)
    wrapped = SkipBatchSampler(BatchSamplerShard(BatchSampler(sampler, 4, False), num_processes=2, process_index=1), 1)
    dataloader = SimpleNamespace(batch_sampler=wrapped)
    assert epoch_sampler_of(dataloader) is sampler
    SamplerEpochCallback().on_epoch_begin(None, SimpleNamespace(epoch=3 + 1 / 3), None, train_dataloader=dataloader)
    assert sampler.epoch == 3 and next(iter(sampler))[0] == 3


def test_tokenization_uses_several_processes_for_large_data_only(monkeypatch, tmp_path, tiny_bert):
    """One process per 20,000 records up to the cores; the columns are the same with two processes as with one."""
    from transformers import AutoTokenizer

    from conftest import make_records, write_jsonl
    from finetune.data.columns import load_raw_dataset, tokenize_dataset, tokenizer_processes

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert tokenizer_processes(2_025) is None and tokenizer_processes(39_999) is None
    assert tokenizer_processes(200_000) == 10 and tokenizer_processes(2_000_000) == 16
    assert tokenizer_processes(100, requested=4) == 4 and tokenizer_processes(10**6, requested=1) is None
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    one = tokenize_dataset(load_raw_dataset(write_jsonl(tmp_path / "a.jsonl", make_records(30, seed=4))), tokenizer)
    two = tokenize_dataset(load_raw_dataset(write_jsonl(tmp_path / "b.jsonl", make_records(30, seed=4))), tokenizer,
                           num_proc=2)
    one, two = one.to_dict(), two.to_dict()  # two files (a cached result would prove nothing): sources differ by name
    two["source"] = [source.replace("b.jsonl", "a.jsonl") for source in two["source"]]
    assert one == two
