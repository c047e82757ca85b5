"""Check seed-format files: every bad record with its file, line and field, plus counts, lengths and duplicates.

    python -m data_prep.validate FILE [FILE ...] [--output good.jsonl] [--rejects bad.jsonl]
                                 [--model_name_or_path MODEL]

Exit status 0 when every record is valid, 1 when any is not, 2 when the arguments are unusable (e.g. a
missing file). Lengths are whitespace words, or tokens (special tokens and prefixes included, as in
training) with --model_name_or_path. With --output the valid records are written, as they are, to a new
JSON Lines file; with --rejects every invalid one is written as {"file", "location", "problems", "raw"}
with its text as it was, so the two files together hold every record of the input.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import logging
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from data_prep.records import json_line, normalized_key, run_cli, setup_logging
from finetune.training.checkpointing import atomic_write
from finetune.data.schema import (EMPTY_FILE, NEG_DOC, POS_DOC, QUESTION, DataFormatError, RecordProblem,
                                  expand_data_files, iter_raw_records, record_problems, text_key)
from finetune.data.text import TextSide

logger = logging.getLogger("data_prep.validate")
LENGTH_FIELDS = (QUESTION, POS_DOC, NEG_DOC)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="Seed-format files or globs (JSON Lines or a JSON array, optionally .gz).")
    parser.add_argument("--output", default=None,
                        help="Write the valid records to this JSON Lines file (.gz to compress). Default: not written.")
    parser.add_argument("--rejects", default=None,
                        help="Write the invalid records, with their problems and raw text, to this JSON Lines file. "
                             "Default: not written.")
    parser.add_argument("--model_name_or_path", default=None,
                        help="Count lengths in tokens of this model's tokenizer (Hub id or folder). "
                             "Default: whitespace-separated words, no model needed.")
    parser.add_argument("--query_prefix", default="", help="Prefix put before each question when counting tokens "
                                                            "(as training's --query_prefix). Default: none.")
    parser.add_argument("--passage_prefix", default="", help="Prefix put before each document when counting tokens "
                                                              "(as training's --passage_prefix). Default: none.")
    parser.add_argument("--query_max_length", type=int, default=64,
                        help="With a tokenizer, count questions longer than this many tokens (training truncates them). "
                             "Default: 64, training's default.")
    parser.add_argument("--passage_max_length", type=int, default=256,
                        help="With a tokenizer, count documents longer than this many tokens. Default: 256, training's default.")
    parser.add_argument("--report_json", default=None, help="Also write the report as JSON to this file. Default: none.")
    return parser


class LengthCounter:
    """Lengths of texts in tokens (with a tokenizer) or whitespace words, counted in batches."""

    def __init__(self, tokenizer=None, query_prefix: str = "", document_prefix: str = "", batch_size: int = 512):
        self.tokenizer = tokenizer
        query, document = TextSide(query_prefix), TextSide(document_prefix)  # the text path of training (finetune.data.text)
        self.sides = {QUESTION: query, POS_DOC: document, NEG_DOC: document}
        self.batch_size = batch_size
        self.pending: dict[str, list[str]] = {name: [] for name in LENGTH_FIELDS}
        self.lengths: dict[str, list[int]] = {name: [] for name in LENGTH_FIELDS}

    def add(self, name: str, texts: list[str]) -> None:
        self.pending[name].extend(texts)
        if len(self.pending[name]) >= self.batch_size:
            self.flush(name)

    def flush(self, name: str) -> None:
        texts, self.pending[name] = self.pending[name], []
        if not texts:
            return
        if self.tokenizer is None:
            self.lengths[name].extend(len(text.split()) for text in texts)
        else:
            self.lengths[name].extend(self.sides[name].token_lengths(self.tokenizer, texts))

    def summary(self, limits: dict[str, int] | None) -> dict[str, dict]:
        result = {}
        for name in LENGTH_FIELDS:
            self.flush(name)
            values = np.asarray(self.lengths[name])
            if not len(values):
                result[name] = {"count": 0}
                continue
            stats = {"count": int(len(values)), "mean": float(values.mean()), "min": int(values.min()),
                     "p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95)),
                     "max": int(values.max())}
            if limits:
                stats["over_max_length"] = int((values > limits[name]).sum())
            result[name] = stats
        return result


@dataclass
class Report:
    files: dict[str, dict] = field(default_factory=dict)  # path -> {"records", "invalid"}
    problems: list[RecordProblem] = field(default_factory=list)
    records: int = 0
    invalid: int = 0
    negatives_per_record: list[int] = field(default_factory=list)
    duplicate_questions: int = 0  # records whose (normalised) question appeared in an earlier record
    identical_records: int = 0  # records equal to an earlier one in all three fields
    document_uses: dict[int, int] = field(default_factory=dict)  # normalised document key -> records using it
    negatives_equal_to_positive: int = 0  # a neg_doc whose normalised text is one of the record's pos_doc
    written: int = 0
    rejected: int = 0


def check_files(files: list[str], counter: LengthCounter, good_handle=None, rejects_handle=None) -> Report:
    """Read every record once: collect problems and statistics, and write good/rejected records as they come."""
    report = Report()
    seen_questions: set[int] = set()
    seen_records: set[int] = set()
    progress = tqdm(desc="Validating", unit=" records")
    for path in files:
        file_stats = report.files.setdefault(path, {"records": 0, "invalid": 0})
        try:
            for location, raw, record, json_error in iter_raw_records(path):
                progress.update()
                file_stats["records"] += 1
                report.records += 1
                problems = record_problems(path, location, record, json_error)
                if problems:
                    file_stats["invalid"] += 1
                    report.invalid += 1
                    report.problems.extend(problems)
                    if rejects_handle is not None:
                        rejects_handle.write(json_line({"file": path, "location": location,
                                                        "problems": [_problem_text(p) for p in problems], "raw": raw}))
                        report.rejected += 1
                    continue
                _add_record_stats(report, record, counter, seen_questions, seen_records)
                if good_handle is not None:
                    good_handle.write(json_line(record))
                    report.written += 1
        except DataFormatError as error:  # the file as a whole is unreadable (not UTF-8, corrupt gzip)
            report.problems.extend(error.problems)
            file_stats["invalid"] += 1
            report.invalid += 1
            if rejects_handle is not None:
                rejects_handle.write(json_line({"file": path, "location": "file",
                                                "problems": [_problem_text(p) for p in error.problems],
                                                "raw": _raw_file_text(path)}))
                report.rejected += 1
            continue
        if file_stats["records"] == 0:
            report.problems.append(RecordProblem(path, "file", None, EMPTY_FILE))
    progress.close()
    return report


def _problem_text(problem: RecordProblem) -> str:
    return f"field '{problem.field}': {problem.message}" if problem.field else problem.message


def _raw_file_text(path: str) -> str | None:
    """The undecodable file's text with bad bytes as backslash escapes, or None when it cannot be read at all."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as handle:
            return handle.read().decode("utf-8", errors="backslashreplace")
    except (OSError, EOFError):
        return None


def _add_record_stats(report: Report, record: dict, counter: LengthCounter, seen_questions: set[int],
                      seen_records: set[int]) -> None:
    positives, negatives = record[POS_DOC], record.get(NEG_DOC, [])
    counter.add(QUESTION, [record[QUESTION]])
    counter.add(POS_DOC, positives)
    counter.add(NEG_DOC, negatives)
    report.negatives_per_record.append(len(negatives))
    question_key = normalized_key(record[QUESTION])
    if question_key in seen_questions:
        report.duplicate_questions += 1
    seen_questions.add(question_key)
    record_key = text_key(json.dumps([record[QUESTION], positives, negatives], ensure_ascii=False))
    if record_key in seen_records:
        report.identical_records += 1
    seen_records.add(record_key)
    positive_keys = {normalized_key(text) for text in positives}
    for key in positive_keys | {normalized_key(text) for text in negatives}:
        report.document_uses[key] = report.document_uses.get(key, 0) + 1
    report.negatives_equal_to_positive += sum(normalized_key(text) in positive_keys for text in negatives)


def summarize(report: Report, counter: LengthCounter, limits: dict[str, int] | None, unit: str) -> dict:
    negatives = np.asarray(report.negatives_per_record)
    uses = np.fromiter(report.document_uses.values(), dtype=np.int64, count=len(report.document_uses))
    return {
        "records": report.records,
        "valid": report.records - report.invalid,
        "invalid": report.invalid,
        "problems": [str(problem) for problem in report.problems],
        "files": report.files,
        "length_unit": unit,
        "lengths": counter.summary(limits),
        "negatives_per_record": {
            "min": int(negatives.min()) if len(negatives) else 0,
            "mean": float(negatives.mean()) if len(negatives) else 0.0,
            "max": int(negatives.max()) if len(negatives) else 0,
            "records_without_negatives": int((negatives == 0).sum()),
        },
        "duplicates": {
            "questions_repeated": report.duplicate_questions,
            "identical_records": report.identical_records,
            "distinct_documents": int(len(uses)),
            "documents_in_several_records": int((uses > 1).sum()),
            "negatives_equal_to_a_positive": report.negatives_equal_to_positive,
        },
        "written": report.written,
        "rejected": report.rejected,
    }


def format_summary(summary: dict, limits: dict[str, int] | None) -> str:
    lines = [f"Checked {len(summary['files'])} file(s), {summary['records']:,} records: "
             f"{summary['valid']:,} valid, {summary['invalid']:,} invalid ({len(summary['problems']):,} problem(s))."]
    if summary["problems"]:
        lines.append("Problems:")
        lines.extend(f"  - {problem}" for problem in summary["problems"])
    if len(summary["files"]) > 1:
        lines.append("Per file:")
        lines.extend(f"  {path}: {stats['records']:,} records, {stats['invalid']:,} invalid"
                     for path, stats in summary["files"].items())
    header = f"Lengths in {summary['length_unit']} of the valid records:"
    columns = ["count", "mean", "min", "p50", "p95", "max"] + (["over_max_length"] if limits else [])
    lines += [header, "  " + f"{'field':<10}" + "".join(f"{c:>16}" for c in columns)]
    for name, stats in summary["lengths"].items():
        cells = [f"{stats[c]:,.1f}" if isinstance(stats.get(c), float) else f"{stats.get(c, '-')!s}" for c in columns]
        if limits and "over_max_length" in stats:
            cells[-1] = f"{stats['over_max_length']:,} (>{limits[name]})"
        lines.append("  " + f"{name:<10}" + "".join(f"{cell:>16}" for cell in cells))
    negatives, duplicates = summary["negatives_per_record"], summary["duplicates"]
    lines.append(f"Negatives per record: min {negatives['min']}, mean {negatives['mean']:.2f}, max {negatives['max']}; "
                 f"{negatives['records_without_negatives']:,} record(s) without negatives "
                 "(train them with --num_hard_negatives 0, or mine negatives: python -m data_prep.mine).")
    lines.append(f"Duplicates: {duplicates['questions_repeated']:,} record(s) repeat an earlier question "
                 f"(case and spacing ignored); {duplicates['identical_records']:,} identical record(s); "
                 f"{duplicates['distinct_documents']:,} distinct documents, {duplicates['documents_in_several_records']:,} "
                 "used by several records.")
    if duplicates["negatives_equal_to_a_positive"]:
        lines.append(f"Warning: {duplicates['negatives_equal_to_a_positive']:,} neg_doc text(s) equal a pos_doc of the "
                     "same record (false negatives); python -m data_prep.convert --format table merges and removes them.")
    return "\n".join(lines)


def load_tokenizer(model_name_or_path: str):
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from finetune.model.st_layout import read_sentence_transformer_config

    transformers_logging.set_verbosity_error()  # "sequence longer than the model's maximum" is what we measure
    subfolder = read_sentence_transformer_config(model_name_or_path).transformer_subfolder
    return AutoTokenizer.from_pretrained(model_name_or_path, **({"subfolder": subfolder} if subfolder else {}))


def main(argv: list[str] | None = None) -> int:
    """Returns the exit status: 0 all valid, 1 some records invalid."""
    args = build_parser().parse_args(argv)
    setup_logging()
    files = expand_data_files(args.files)
    tokenizer = load_tokenizer(args.model_name_or_path) if args.model_name_or_path else None
    counter = LengthCounter(tokenizer, args.query_prefix, args.passage_prefix)  # --passage_prefix: the document side
    limits = ({QUESTION: args.query_max_length, POS_DOC: args.passage_max_length, NEG_DOC: args.passage_max_length}
              if tokenizer is not None else None)
    unit = f"tokens ({args.model_name_or_path})" if tokenizer is not None else "whitespace words"
    with _maybe_output(args.output) as good_handle, _maybe_output(args.rejects) as rejects_handle:
        report = check_files(files, counter, good_handle, rejects_handle)
    summary = summarize(report, counter, limits, unit)
    print(format_summary(summary, limits))
    if args.output:
        print(f"Wrote {report.written:,} valid record(s) to {args.output}")
    if args.rejects:
        print(f"Wrote {report.rejected:,} rejected record(s) to {args.rejects}")
    if args.report_json:
        with atomic_write(args.report_json) as handle:
            json.dump(summary, handle, indent=2)
    return 1 if report.problems else 0


def _maybe_output(path: str | None):
    return atomic_write(path) if path else contextlib.nullcontext(None)


if __name__ == "__main__":
    run_cli(main)
