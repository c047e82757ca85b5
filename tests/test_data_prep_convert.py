"""data_prep.convert: BEIR, MS MARCO triples and datasets tables round-trip to the seed format; merging rules."""

import csv
import gzip
import json

import datasets
import pytest

from conftest import make_records
from data_prep import convert
from data_prep.records import merge_records
from finetune.data.schema import read_records


def converted(tmp_path, *argv) -> list[dict]:
    output = tmp_path / "out.jsonl"
    convert.main([*map(str, argv), "--output", str(output)])
    return [{key: record[key] for key in ("question", "pos_doc", "neg_doc")} for record in read_records(str(output))]


@pytest.fixture
def records():
    """Seed records with two positives on some, no negatives on one."""
    records = make_records(5, num_negatives=3, seed=3)
    records[1]["pos_doc"].append("a second positive of record one")
    records[4]["neg_doc"] = []
    return records


def write_beir(folder, records, negative_relevance=0):
    """A BEIR folder holding ``records``: documents get ids and titles, positives relevance 1 or 2."""
    (folder / "qrels").mkdir(parents=True)
    doc_ids, lines = {}, []
    for record in records:
        for text in record["pos_doc"] + record["neg_doc"]:
            doc_ids.setdefault(text, f"doc{len(doc_ids)}")
    with open(folder / "corpus.jsonl", "w") as handle:
        for text, doc_id in doc_ids.items():
            title, _, body = text.partition(" ")  # "title text" is read back as the text
            handle.write(json.dumps({"_id": doc_id, "title": title, "text": body}) + "\n")
    with open(folder / "queries.jsonl", "w") as handle:
        for index, record in enumerate(records):
            handle.write(json.dumps({"_id": f"q{index}", "text": record["question"]}) + "\n")
            lines += [f"q{index}\t{doc_ids[text]}\t{1 + rank % 2}" for rank, text in enumerate(record["pos_doc"])]
            lines += [f"q{index}\t{doc_ids[text]}\t{negative_relevance}" for text in record["neg_doc"]]
        handle.write(json.dumps({"_id": "unjudged", "text": "a query without qrels"}) + "\n")
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(lines) + "\n")


def test_beir_round_trip(tmp_path, records):
    write_beir(tmp_path / "beir", records)
    assert converted(tmp_path, "--format", "beir", "--input", tmp_path / "beir", "--judged_negatives") == records
    without_negatives = converted(tmp_path, "--format", "beir", "--input", tmp_path / "beir")
    assert without_negatives == [{**record, "neg_doc": []} for record in records]


def test_beir_query_without_a_relevant_document_is_skipped(tmp_path, records):
    write_beir(tmp_path / "beir", records)
    with open(tmp_path / "beir" / "qrels" / "train.tsv", "a") as handle:
        handle.write("q0\tdoc0\t1\nq9\tdoc1\t0\n")
    with open(tmp_path / "beir" / "queries.jsonl", "a") as handle:
        handle.write(json.dumps({"_id": "q9", "text": "only judged irrelevant"}) + "\n")
    counts = convert.main(["--format", "beir", "--input", str(tmp_path / "beir"), "--output", str(tmp_path / "o.jsonl")])
    assert counts["skipped_without_positive"] == 1 and counts["written"] == len(records)
    with pytest.raises(FileNotFoundError, match="qrels/dev.tsv"):
        convert.main(["--format", "beir", "--input", str(tmp_path / "beir"), "--split", "dev", "--output", "x.jsonl"])


def test_msmarco_triples_round_trip(tmp_path, records):
    # One line per (positive, negative) pair, as in triples.train.small.tsv; a record without negatives has
    # a line with only two fields.
    lines = []
    for record in records:
        for positive in record["pos_doc"]:
            lines += [f"{record['question']}\t{positive}\t{negative}" for negative in record["neg_doc"]]
            lines += [] if record["neg_doc"] else [f"{record['question']}\t{positive}"]
    path = tmp_path / "triples.tsv.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    assert converted(tmp_path, "--format", "msmarco", "--input", path) == records


def test_msmarco_line_without_a_positive_names_the_line(tmp_path):
    path = tmp_path / "triples.tsv"
    path.write_text("q\tp\tn\nlonely query\n")
    with pytest.raises(ValueError, match=r"triples.tsv, line 2: expected 'query<TAB>positive<TAB>negative'"):
        converted(tmp_path, "--format", "msmarco", "--input", path)


def rows_anchor_positive_negative(records):
    """sentence-transformers' triplet layout: one (anchor, positive, negative) row per combination."""
    rows = []
    for record in records:
        for positive in record["pos_doc"]:
            for negative in record["neg_doc"] or [None]:
                rows.append({"anchor": record["question"], "positive": positive, "negative": negative})
    return rows


def rows_numbered_negatives(records):
    """sentence-transformers' n-tuple layout: anchor, positive, negative_1..negative_n (None where missing)."""
    width = max(len(record["neg_doc"]) for record in records)
    return [{"anchor": record["question"], "positive": positive,
             **{f"negative_{i + 1}": (record["neg_doc"][i] if i < len(record["neg_doc"]) else None) for i in range(width)}}
            for record in records for positive in record["pos_doc"]]


@pytest.mark.parametrize("layout", ["jsonl", "csv", "parquet", "saved_dataset", "saved_dataset_dict"])
def test_table_triplets_round_trip(tmp_path, records, layout):
    rows = rows_anchor_positive_negative(records)
    table = datasets.Dataset.from_list(rows)
    if layout == "jsonl":
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif layout == "csv":
        path = tmp_path / "rows.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["anchor", "positive", "negative"])
            writer.writeheader()
            writer.writerows(rows)
    elif layout == "parquet":
        path = tmp_path / "rows.parquet"
        table.to_parquet(str(path))
    elif layout == "saved_dataset":
        path = tmp_path / "saved"
        table.save_to_disk(str(path))
    else:
        path = tmp_path / "saved_dict"
        datasets.DatasetDict({"train": table.select(range(1)), "test": table}).save_to_disk(str(path))
    extra = ["--split", "test"] if layout == "saved_dataset_dict" else []
    assert converted(tmp_path, "--format", "table", "--input", path, *extra) == records


def test_table_numbered_negatives_are_detected(tmp_path, records):
    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_list(rows_numbered_negatives(records)).to_parquet(str(path))
    assert converted(tmp_path, "--format", "table", "--input", path) == records


def test_table_with_explicit_columns_and_list_cells(tmp_path, records):
    rows = [{"id": i, "text": r["question"], "answers": r["pos_doc"], "hard": r["neg_doc"][:1], "more": r["neg_doc"][1:]}
            for i, r in enumerate(records)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = converted(tmp_path, "--format", "table", "--input", path, "--question_column", "text",
                       "--positive_column", "answers", "--negative_columns", "hard", "more")
    assert result == records
    no_negatives = converted(tmp_path, "--format", "table", "--input", path, "--question_column", "text",
                             "--positive_column", "answers", "--negative_columns")
    assert no_negatives == [{**record, "neg_doc": []} for record in records]
    with pytest.raises(ValueError, match=r"--positive_column: no column \['answer'\]"):
        converted(tmp_path, "--format", "table", "--input", path, "--question_column", "text", "--positive_column", "answer")


def test_table_rows_without_question_or_positive_are_counted_not_written(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"query": "q", "positive": "p", "negative": "n"}, {"query": None, "positive": "p2", "negative": "n"},
            {"query": "q3", "positive": "", "negative": "n"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    counts = convert.main(["--format", "table", "--input", str(path), "--output", str(tmp_path / "o.jsonl")])
    assert (counts["written"], counts["skipped_without_question"], counts["skipped_without_positive"]) == (1, 1, 1)


def test_merging_unites_in_order_without_duplicates_and_never_keeps_a_positive_as_negative():
    merged, counts = merge_records([
        {"question": "q", "pos_doc": ["p1"], "neg_doc": ["n1", "P2 ", "n2"]},
        {"question": "other", "pos_doc": ["x"], "neg_doc": []},
        {"question": "q", "pos_doc": ["p2", "p1"], "neg_doc": ["n2", "n3", "p1"]},
    ])
    assert merged == [{"question": "q", "pos_doc": ["p1", "p2"], "neg_doc": ["n1", "n2", "n3"]},
                      {"question": "other", "pos_doc": ["x"], "neg_doc": []}]
    assert counts == {"merged": 1, "negatives_removed_as_positive": 2}  # "P2 " (case/space variant) and "p1"
