"""What the data_prep tools share: text normalisation, merging records, atomic JSON Lines output, CLI plumbing.

The record schema and the reader live in ``finetune.schema``; this module only adds what the tools
need on top of it.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import re
import sys
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator

from finetune.data import text_key
from finetune.schema import NEG_DOC, POS_DOC, QUESTION, DataFormatError

_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Text as compared for duplicates: Unicode NFKC, case-folded, whitespace collapsed and stripped.

    "Foo  bar" and "foo bar\\n" are the same document for retrieval; a false negative that differs
    from its positive only in case or spacing is still a false negative.
    """
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def normalized_key(text: str) -> int:
    """64-bit hash of ``normalize_text(text)``: equal for texts that differ only in case, spacing or Unicode form."""
    return text_key(normalize_text(text))


def unique(texts: Iterable[str]) -> list[str]:
    """Texts in first-seen order without exact repeats."""
    return list(dict.fromkeys(texts))


def merge_records(records: Iterable[dict]) -> tuple[list[dict], dict[str, int]]:
    """Records with the same question merged into one: positives and negatives united in first-seen order,
    exact duplicates removed, and a negative whose normalised text equals one of the positives removed
    (a text that is a positive is never kept as a negative).

    Returns the merged records (in order of each question's first appearance) and counts:
    ``merged`` (records folded into an earlier one) and ``negatives_removed_as_positive``.
    """
    merged: dict[str, dict] = {}
    counts = {"merged": 0, "negatives_removed_as_positive": 0}
    for record in records:
        target = merged.get(record[QUESTION])
        if target is None:
            merged[record[QUESTION]] = {QUESTION: record[QUESTION], POS_DOC: list(record[POS_DOC]),
                                        NEG_DOC: list(record.get(NEG_DOC, []))}
        else:
            counts["merged"] += 1
            target[POS_DOC].extend(record[POS_DOC])
            target[NEG_DOC].extend(record.get(NEG_DOC, []))
    for record in merged.values():
        record[POS_DOC] = unique(record[POS_DOC])
        positive_keys = {normalized_key(text) for text in record[POS_DOC]}
        negatives = unique(record[NEG_DOC])
        record[NEG_DOC] = [text for text in negatives if normalized_key(text) not in positive_keys]
        counts["negatives_removed_as_positive"] += len(negatives) - len(record[NEG_DOC])
    return list(merged.values()), counts


def seed_record(record: dict) -> dict:
    """The three seed-format fields of a record, in their usual order (drops ``source`` and other keys)."""
    return {QUESTION: record[QUESTION], POS_DOC: list(record[POS_DOC]), NEG_DOC: list(record.get(NEG_DOC, []))}


@contextlib.contextmanager
def atomic_output(path: str, *, binary: bool = False) -> Iterator:
    """A handle (text, or binary with ``binary=True``) whose content replaces ``path`` only when the block
    ends without an error.

    Written to a temporary file in the same folder (same file system), then ``os.replace``d, so a
    reader never sees half a file and a crash leaves the old file intact. Text written to ``.gz``
    paths is gzip-compressed with mtime 0 (byte-identical output for identical input).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    descriptor, tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as raw:
            if binary:
                yield raw
            elif path.endswith(".gz"):
                with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as compressed, open_text(compressed) as handle:
                    yield handle
            else:
                with open_text(raw) as handle:
                    yield handle
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise


def open_text(binary) -> io.TextIOWrapper:
    return io.TextIOWrapper(binary, encoding="utf-8", newline="\n")


def json_line(record) -> str:
    # ensure_ascii=False keeps text readable; U+2028/U+2029 stay raw, which our reader handles (lines end at "\n" only).
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl(path: str, records: Iterable[dict]) -> int:
    """Write records as JSON Lines atomically (see ``atomic_output``); returns how many were written."""
    count = 0
    with atomic_output(path) as handle:
        for record in records:
            handle.write(json_line(record))
            count += 1
    return count


def optional_float(value: str) -> float | None:
    """argparse type: a float, or "none"/"off" for no value."""
    return None if value.strip().lower() in ("none", "off", "") else float(value)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_cli(main: Callable[[], object]) -> None:
    """Run a tool's ``main`` as a command: its exit status when it returns an int (else 0); expected input
    errors print one clear message and exit 2."""
    try:
        result = main()
    except (FileNotFoundError, NotADirectoryError, DataFormatError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.exit(result if isinstance(result, int) and not isinstance(result, bool) else 0)
