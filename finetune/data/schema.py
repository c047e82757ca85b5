"""The NeMo SBERT record schema and a streaming reader that validates every record.

A record is ``{"question": str, "pos_doc": [str, ...], "neg_doc": [str, ...]}``: ``question``
a non-empty string, ``pos_doc`` a non-empty list of non-empty strings, ``neg_doc`` a list of
non-empty strings (may be empty, may be absent = empty). Files are JSON Lines or one JSON array,
optionally gzip-compressed (``.gz``). Shared by ``finetune.data.columns`` and ``data_prep``.

Optional fields (``OPTIONAL_FIELDS``) are validated when present and carried through the
pipeline; any other key is ignored. Today: teacher scores aligned with the document lists,
``"pos_scores": [7.1]`` and ``"neg_scores": [2.3, -0.4]`` (finite numbers, one per document).
A new optional field is one entry in ``OPTIONAL_FIELDS`` plus its check.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

QUESTION, POS_DOC, NEG_DOC = "question", "pos_doc", "neg_doc"
POS_SCORES, NEG_SCORES = "pos_scores", "neg_scores"
# Teacher scores: each list is aligned with the document list it scores.
SCORED_LISTS = {POS_SCORES: POS_DOC, NEG_SCORES: NEG_DOC}
OPTIONAL_FIELDS = tuple(SCORED_LISTS)
SOURCE = "source"  # where a record came from, added by read_records


@dataclass(frozen=True)
class RecordProblem:
    """One problem with one record: where it is, which field, and what was expected."""

    file: str
    location: str  # "line 12" (JSON Lines) or "record 12" (JSON array), 1-based
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}, {self.location}"
        return f"{where}, field '{self.field}': {self.message}" if self.field else f"{where}: {self.message}"


def text_key(text: str) -> int:
    """A 64-bit content hash of a text: equal texts get equal keys (duplicate masking in training, duplicate records
    in data_prep). Here, with no heavy import, so that the data tools need neither torch nor datasets."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


class DataFormatError(ValueError):
    """Raised when input data is unusable; ``problems`` lists every bad record found."""

    def __init__(self, problems: list[RecordProblem], max_shown: int = 20):
        self.problems = problems
        shown = "\n".join(f"  - {problem}" for problem in problems[:max_shown])
        more = f"\n  ... and {len(problems) - max_shown} more" if len(problems) > max_shown else ""
        super().__init__(
            f"{len(problems)} problem(s) in the training data:\n{shown}{more}\n"
            'Each record must look like {"question": "...", "pos_doc": ["..."], "neg_doc": ["...", ...]}; '
            "run `python -m data_prep.validate FILE` for a full report."
        )


def _describe(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, (bytes, bytearray)) else repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _check_text_list(record: dict, key: str, allow_empty: bool) -> list[tuple[str, str]]:
    value = record[key]
    if isinstance(value, str):
        return [(key, f"expected a list of strings, got a single string; wrap it: [{json.dumps(value[:40])}...]")]
    if not isinstance(value, list):
        return [(key, f"expected a list of strings, got {_describe(value)}")]
    if not value and not allow_empty:
        return [(key, "expected a non-empty list of strings, got []")]
    problems = []
    for position, item in enumerate(value):
        if not isinstance(item, str):
            problems.append((f"{key}[{position}]", f"expected a string, got {_describe(item)}"))
        elif not item.strip():
            problems.append((f"{key}[{position}]", "expected a non-empty string, got an empty one"))
    return problems


def check_record(record) -> list[tuple[str | None, str]]:
    """The problems of one parsed record as ``(field, message)`` pairs; empty when it is valid."""
    if not isinstance(record, dict):
        return [(None, f"expected a JSON object, got {_describe(record)}")]
    problems: list[tuple[str | None, str]] = []
    if QUESTION not in record:
        problems.append((QUESTION, "missing; expected a non-empty string"))
    elif not isinstance(record[QUESTION], str):
        problems.append((QUESTION, f"expected a string, got {_describe(record[QUESTION])}"))
    elif not record[QUESTION].strip():
        problems.append((QUESTION, "expected a non-empty string, got an empty one"))
    if POS_DOC not in record:
        problems.append((POS_DOC, "missing; expected a non-empty list of strings"))
    else:
        problems.extend(_check_text_list(record, POS_DOC, allow_empty=False))
    if NEG_DOC in record:
        problems.extend(_check_text_list(record, NEG_DOC, allow_empty=True))
    for scores_key, docs_key in SCORED_LISTS.items():
        if scores_key in record:
            problems.extend(_check_scores(record, scores_key, docs_key))
    if POS_SCORES in record and record.get(NEG_DOC) and NEG_SCORES not in record:
        problems.append((NEG_SCORES, f"missing while '{POS_SCORES}' is given; teacher scores must cover every document "
                                     f"(one number per {NEG_DOC} entry)"))
    if NEG_SCORES in record and POS_SCORES not in record:
        problems.append((POS_SCORES, f"missing while '{NEG_SCORES}' is given; teacher scores must cover every document "
                                     f"(one number per {POS_DOC} entry)"))
    return problems


def _check_scores(record: dict, scores_key: str, docs_key: str) -> list[tuple[str, str]]:
    """A list of finite numbers, one per entry of ``record[docs_key]``."""
    value = record[scores_key]
    if not isinstance(value, list):
        return [(scores_key, f"expected a list of numbers (one per {docs_key} entry), got {_describe(value)}")]
    problems = []
    documents = record.get(docs_key, [])
    if isinstance(documents, list) and len(value) != len(documents):
        problems.append((scores_key, f"has {len(value)} score(s) but {docs_key} has {len(documents)} document(s); "
                                     "expected one score per document, in the same order"))
    for position, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            problems.append((f"{scores_key}[{position}]", f"expected a number, got {_describe(item)}"))
        elif not math.isfinite(item):
            problems.append((f"{scores_key}[{position}]", f"expected a finite number, got {item}"))
    return problems


def normalize_record(record: dict) -> dict:
    """The record reduced to the schema's fields: the three seed fields (absent ``neg_doc`` becomes []) and
    the optional fields it carries (``OPTIONAL_FIELDS``); other keys (``source`` included) are dropped.

    The one normaliser of the project: the training reader and every data_prep tool use it.
    """
    normalized = {QUESTION: record[QUESTION], POS_DOC: list(record[POS_DOC]), NEG_DOC: list(record.get(NEG_DOC, []))}
    for key in OPTIONAL_FIELDS:
        if key in record:
            normalized[key] = [float(value) for value in record[key]]
    if POS_SCORES in normalized and not normalized[NEG_DOC]:
        normalized.setdefault(NEG_SCORES, [])
    return normalized


def expand_data_files(patterns: str | list[str]) -> list[str]:
    """Files named by paths or glob patterns, in a stable order; a pattern matching nothing is an error."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.isfile(path) for path in matches):
            raise FileNotFoundError(f"Data file not found: {pattern!r} (give a file path or a glob such as 'data/*.jsonl').")
        files.extend(matches)
    return files


def _open_text(path: str):
    opener = gzip.open if path.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8", errors="strict")


def _read_text(path: str) -> str:
    try:
        with _open_text(path) as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise DataFormatError([RecordProblem(path, f"byte {error.start}", None,
                                             f"not valid UTF-8 ({error.reason}); re-encode the file as UTF-8")]) from None
    except (OSError, EOFError) as error:  # e.g. a corrupt gzip stream
        raise DataFormatError([RecordProblem(path, "file", None, f"cannot be read: {error}")]) from None


def iter_raw_records(path: str) -> Iterator[tuple[str, str, object, str | None]]:
    """Yield ``(location, raw_text, parsed_record_or_None, json_error_or_None)`` for every record of one file.

    The format is detected from the first non-blank character: ``[`` means a JSON array,
    anything else JSON Lines. Blank lines of JSON Lines are skipped. ``raw_text`` is the line as
    written (JSON Lines), the record re-serialised (JSON array), or the whole file when a JSON
    array does not parse. Lines end at ``\n`` only: JSON strings may hold raw U+2028 or U+0085,
    which ``str.splitlines`` would treat as line breaks.
    """
    text = _read_text(path)
    stripped = text.lstrip()
    if not stripped:
        return
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            hint = " (the file starts with '[' but is not one JSON array; JSON Lines files hold one object per line)"
            yield f"line {error.lineno}", text, None, f"invalid JSON: {error.msg} at column {error.colno}{hint}"
            return
        for index, record in enumerate(records, start=1):
            yield f"record {index}", json.dumps(record, ensure_ascii=False), record, None
        return
    for line_number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            yield f"line {line_number}", line, json.loads(line), None
        except json.JSONDecodeError as error:
            hint = " (a pretty-printed JSON object? JSON Lines needs one object per line)" if line.strip() in "{[" else ""
            yield f"line {line_number}", line, None, f"invalid JSON: {error.msg} at column {error.colno}{hint}"


def iter_file_records(path: str) -> Iterator[tuple[str, object, str | None]]:
    """Yield ``(location, parsed_record_or_None, json_error_or_None)`` for every record of one file (see iter_raw_records)."""
    for location, _, record, json_error in iter_raw_records(path):
        yield location, record, json_error


def record_problems(path: str, location: str, record, json_error: str | None) -> list[RecordProblem]:
    """The problems of one record as yielded by ``iter_file_records`` / ``iter_raw_records``."""
    if json_error:
        return [RecordProblem(path, location, None, json_error)]
    return [RecordProblem(path, location, field_name, message) for field_name, message in check_record(record)]


EMPTY_FILE = "holds no records (empty file)"


def find_problems(files: list[str]) -> list[RecordProblem]:
    """Every problem of every record of ``files`` (an empty file is one problem)."""
    problems: list[RecordProblem] = []
    for path in files:
        count = 0
        try:
            for location, record, json_error in iter_file_records(path):
                count += 1
                problems.extend(record_problems(path, location, record, json_error))
        except DataFormatError as unreadable:  # not UTF-8, corrupt gzip: the whole file is one problem
            problems.extend(unreadable.problems)
            continue
        if count == 0:
            problems.append(RecordProblem(path, "file", None, EMPTY_FILE))
    return problems


def read_records(patterns: str | list[str]) -> Iterator[dict]:
    """Validate every record of every file first, then yield them normalised, in file order.

    Each yielded record also carries ``SOURCE`` ("file, line N"), for later error messages.

    Raises DataFormatError listing all problems (before anything is yielded) when any record
    is bad or a file holds no record.
    """
    files = expand_data_files(patterns)
    problems = find_problems(files)
    if problems:
        raise DataFormatError(problems)
    for path in files:
        for location, record, _ in iter_file_records(path):
            yield {**normalize_record(record), SOURCE: f"{path}, {location}"}
