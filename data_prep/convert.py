"""Convert retrieval data into the seed format: {"question": str, "pos_doc": [str], "neg_doc": [str]} JSON Lines.

    python -m data_prep.convert --format beir    --input BEIR_FOLDER --output train.jsonl [--split train]
    python -m data_prep.convert --format msmarco --input triples.tsv --output train.jsonl
    python -m data_prep.convert --format table   --input data.parquet --output train.jsonl \\
        [--question_column anchor --positive_column positive --negative_columns negative_1 negative_2]

beir:    corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/<split>.tsv; documents with
         relevance > 0 are positives ("title text", as the evaluation reads them).
msmarco: tab-separated query, positive, negative(s) per line (MS MARCO's triples.train.small.tsv layout).
table:   anything `datasets` loads: a .json/.jsonl/.csv/.tsv/.parquet file, or a folder saved with
         save_to_disk. Columns hold a string or a list of strings. Without a mapping the columns are
         detected: seed format (question/pos_doc/neg_doc), sentence-transformers (anchor/positive/negative
         or negative_1..negative_n), query/positive/negative, or the first two columns as question, positive.

Records with the same question are merged: positives and negatives united in order, duplicates removed, and a
text that is a positive (case and spacing ignored) never kept as a negative. Rows without a question or a
positive are skipped and counted.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import logging
import os
import re
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

from data_prep.records import merge_records, run_cli, setup_logging, write_jsonl
from finetune.data.schema import NEG_DOC, POS_DOC, QUESTION

logger = logging.getLogger("data_prep.convert")
FORMATS = ("beir", "msmarco", "table")
QUESTION_COLUMNS = ("question", "anchor", "query", "queries")
POSITIVE_COLUMNS = ("pos_doc", "positive", "positives", "pos", "answer", "document", "passage")
NEGATIVE_COLUMNS = ("neg_doc", "negative", "negatives", "neg", "hard_negative", "hard_negatives")
TABLE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
                  ".arrow": "arrow"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=FORMATS, help="Layout of --input: beir, msmarco or table.")
    parser.add_argument("--input", required=True,
                        help="A BEIR folder (beir), a TSV file, optionally .gz (msmarco), or a table file or saved "
                             "dataset folder (table).")
    parser.add_argument("--output", required=True, help="Seed-format JSON Lines file to write (.gz to compress).")
    parser.add_argument("--split", default="train",
                        help="beir: the qrels file qrels/<split>.tsv; table: the split of a saved DatasetDict or of the "
                             "loaded files. Default: train.")
    parser.add_argument("--judged_negatives", action="store_true",
                        help="beir: also use documents judged with relevance <= 0 in the qrels as negatives. "
                             "Default: off (only relevance > 0 is used, as positives).")
    parser.add_argument("--question_column", default=None,
                        help="table: column holding the question. Default: detected (question, anchor, query, ..., "
                             "else the first column).")
    parser.add_argument("--positive_column", default=None,
                        help="table: column holding the positive (a string or a list of strings). Default: detected "
                             "(pos_doc, positive, answer, ..., else the second column).")
    parser.add_argument("--negative_columns", nargs="*", default=None,
                        help="table: columns holding negatives (strings or lists). Default: detected (neg_doc, "
                             "negative, negative_1..negative_n, ...; none when there is no such column). Pass the flag "
                             "with no column to ignore negatives.")
    return parser


# ---------------------------------------------------------------- readers: each yields seed-format records


def read_beir(folder: str, split: str, judged_negatives: bool) -> Iterator[dict]:
    """One record per query with at least one relevant document (relevance > 0), in qrels order."""
    from finetune.retrieval.sets import load_beir_folder

    if not os.path.isdir(folder):
        raise NotADirectoryError(f"--format beir expects a folder with corpus.jsonl, queries.jsonl and qrels/, got {folder!r}.")
    dataset = load_beir_folder(folder, split)
    missing = 0
    for qid, relevance in tqdm(dataset.qrels.items(), desc="Queries", unit=" queries"):
        known = {doc_id: rel for doc_id, rel in relevance.items() if doc_id in dataset.corpus}
        missing += len(relevance) - len(known)
        positives = [dataset.corpus[doc_id] for doc_id, rel in known.items() if rel > 0]
        negatives = [dataset.corpus[doc_id] for doc_id, rel in known.items() if rel <= 0] if judged_negatives else []
        yield {QUESTION: dataset.queries[qid], POS_DOC: positives, NEG_DOC: negatives}
    if missing:
        logger.warning("%d qrels name documents missing from corpus.jsonl; they were ignored.", missing)


def read_msmarco(path: str) -> Iterator[dict]:
    """query <TAB> positive [<TAB> negative ...] per line; a line with fewer than two fields is an error."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as handle:
        for line_number, line in enumerate(tqdm(handle, desc="Lines", unit=" lines"), start=1):
            fields = line.rstrip("\r\n").split("\t")
            if not line.strip():
                continue
            if len(fields) < 2:
                raise ValueError(f"{path}, line {line_number}: expected 'query<TAB>positive<TAB>negative', "
                                 f"got {len(fields)} field(s).")
            yield {QUESTION: fields[0], POS_DOC: [fields[1]], NEG_DOC: fields[2:]}


def load_table(path: str, split: str):
    """A ``datasets.Dataset`` from a file (by extension, optionally .gz) or a folder (save_to_disk, else data files)."""
    import datasets

    if os.path.isdir(path):
        try:
            loaded = datasets.load_from_disk(path)
        except FileNotFoundError:
            loaded = datasets.load_dataset(path, split=split)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path} holds the splits {sorted(loaded)}; choose one with --split.")
            loaded = loaded[split]
        return loaded
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Input not found: {path!r}.")
    extension = os.path.splitext(path.removesuffix(".gz"))[1].lower()
    if extension not in TABLE_BUILDERS:
        raise ValueError(f"Cannot tell the table format of {path!r}; use one of {sorted(TABLE_BUILDERS)} (optionally .gz) "
                         "or a folder saved with Dataset.save_to_disk.")
    kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if extension == ".tsv" else {}
    return datasets.load_dataset(TABLE_BUILDERS[extension], data_files={split: path}, split=split, **kwargs)


def _numbered(columns: Iterable[str], stem: str) -> list[str]:
    pattern = re.compile(rf"{stem}_?(\d+)$")
    matches = [(int(match.group(1)), column) for column in columns if (match := pattern.match(column))]
    return [column for _, column in sorted(matches)]


def detect_columns(columns: list[str], question: str | None, positive: str | None,
                   negatives: list[str] | None) -> tuple[str, str, list[str]]:
    """The (question, positive, negatives) columns: given ones are checked, missing ones detected."""
    lowered = {column.lower(): column for column in columns}

    def first_of(names: tuple[str, ...]) -> str | None:
        return next((lowered[name] for name in names if name in lowered), None)

    question = question or first_of(QUESTION_COLUMNS) or columns[0]
    positive = positive or first_of(POSITIVE_COLUMNS) or next((c for c in columns if c != question), None)
    if negatives is None:
        single = first_of(NEGATIVE_COLUMNS)
        negatives = ([single] if single else []) + [c for c in _numbered(columns, "negative") if c != single]
        if not negatives:
            negatives = _numbered(columns, "neg")
    for role, names in (("--question_column", [question]), ("--positive_column", [positive]),
                        ("--negative_columns", negatives)):
        unknown = [name for name in names if name not in columns]
        if unknown:
            raise ValueError(f"{role}: no column {unknown} in the table; its columns are {columns}.")
    if question == positive or question in negatives or positive in negatives:
        raise ValueError(f"A column has two roles: question {question!r}, positive {positive!r}, negatives {negatives}.")
    return question, positive, negatives


def _texts(value) -> list[str]:
    """A cell as a list of non-empty strings (a string, a list of strings, or null)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, (list, tuple)):
        return [item for item in value if isinstance(item, str) and item.strip()]
    raise ValueError(f"Expected a string or a list of strings in a text column, got {type(value).__name__} {value!r:.60}.")


def read_table(path: str, split: str, question_column: str | None, positive_column: str | None,
               negative_columns: list[str] | None) -> Iterator[dict]:
    table = load_table(path, split)
    question_column, positive_column, negative_columns = detect_columns(
        table.column_names, question_column, positive_column, negative_columns)
    logger.info("Columns: question=%r, positive=%r, negatives=%s", question_column, positive_column, negative_columns)
    for row in tqdm(table.select_columns([question_column, positive_column, *negative_columns]), desc="Rows",
                    unit=" rows"):
        question = row[question_column]
        yield {QUESTION: question if isinstance(question, str) else "", POS_DOC: _texts(row[positive_column]),
               NEG_DOC: [text for column in negative_columns for text in _texts(row[column])]}


# ---------------------------------------------------------------- the command


def usable(records: Iterable[dict], counts: dict[str, int]) -> Iterator[dict]:
    """Records with a question and a positive; the others are counted as skipped."""
    for record in records:
        counts["rows"] += 1
        if not record[QUESTION].strip():
            counts["skipped_without_question"] += 1
        elif not any(text.strip() for text in record[POS_DOC]):
            counts["skipped_without_positive"] += 1
        else:
            yield {QUESTION: record[QUESTION], POS_DOC: [t for t in record[POS_DOC] if t.strip()],
                   NEG_DOC: [t for t in record[NEG_DOC] if t.strip()]}


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Returns the counts that are also printed: rows read, records written, merged, skipped, negatives removed."""
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.format == "beir":
        source = read_beir(args.input, args.split, args.judged_negatives)
    elif args.format == "msmarco":
        if not os.path.isfile(args.input):
            raise FileNotFoundError(f"Input not found: {args.input!r}.")
        source = read_msmarco(args.input)
    else:
        source = read_table(args.input, args.split, args.question_column, args.positive_column, args.negative_columns)
    counts = {"rows": 0, "skipped_without_question": 0, "skipped_without_positive": 0}
    records, merge_counts = merge_records(usable(source, counts))
    counts.update(merge_counts)
    if not records:
        raise ValueError(f"No usable record in {args.input!r} (every row lacks a question or a positive).")
    counts["written"] = write_jsonl(args.output, records)
    counts["negatives"] = sum(len(record[NEG_DOC]) for record in records)
    print(f"Read {counts['rows']:,} rows; wrote {counts['written']:,} records with {counts['negatives']:,} negatives to "
          f"{args.output}. Merged {counts['merged']:,} rows into records with the same question; removed "
          f"{counts['negatives_removed_as_positive']:,} negatives equal to a positive; skipped "
          f"{counts['skipped_without_question']:,} rows without a question and {counts['skipped_without_positive']:,} "
          "without a positive.")
    return counts


if __name__ == "__main__":
    run_cli(main)
