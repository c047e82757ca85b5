"""What the data_prep tools share: text normalisation, merging records, atomic JSON Lines output, CLI plumbing.

The record schema and the reader live in ``finetune.data.schema``; this module only adds what the tools
need on top of it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import unicodedata
from collections.abc import Callable, Iterable

from finetune.training.checkpointing import atomic_write
from finetune.data.schema import POS_DOC, NEG_DOC, QUESTION, SCORED_LISTS, DataFormatError, normalize_record, text_key

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
    (a text that is a positive is never kept as a negative). Teacher scores stay aligned with their
    documents (a repeated text keeps its first score); they are kept only when every merged record has them.

    Returns the merged records (in order of each question's first appearance) and counts:
    ``merged`` (records folded into an earlier one) and ``negatives_removed_as_positive``.
    """
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(record[QUESTION], []).append(normalize_record(record))
    counts = {"merged": sum(len(group) - 1 for group in groups.values()), "negatives_removed_as_positive": 0}
    merged = []
    for question, group in groups.items():
        record = {QUESTION: question}
        for scores_key, docs_key in SCORED_LISTS.items():
            scored = all(scores_key in part for part in group)
            documents: dict[str, float | None] = {}  # text -> its first score; dicts keep first-seen order
            for part in group:
                for position, text in enumerate(part[docs_key]):
                    documents.setdefault(text, part[scores_key][position] if scored else None)
            if docs_key == NEG_DOC:
                positive_keys = {normalized_key(text) for text in record[POS_DOC]}
                kept = {text: score for text, score in documents.items() if normalized_key(text) not in positive_keys}
                counts["negatives_removed_as_positive"] += len(documents) - len(kept)
                documents = kept
            record[docs_key] = list(documents)
            if scored:
                record[scores_key] = list(documents.values())
        merged.append(normalize_record(record))
    return merged, counts


def json_line(record) -> str:
    # ensure_ascii=False keeps text readable; U+2028/U+2029 stay raw, which our reader handles (lines end at "\n" only).
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_jsonl(path: str, records: Iterable[dict]) -> int:
    """Write records as JSON Lines atomically (``finetune.training.checkpointing.atomic_write``); returns how many were written."""
    count = 0
    with atomic_write(path) as handle:
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
    code = result if isinstance(result, int) and not isinstance(result, bool) else 0
    if "torch.distributed" in sys.modules:  # only a tool that loaded torch can have a process group to end
        from finetune.training.distributed import end_process_group

        end_process_group(code)  # under accelerate launch: all done, then the groups go before the interpreter does
    sys.exit(code)


class DeprecatedAlias(argparse.Action):
    """An old option name that still works, with a warning naming the new one, so scripts and recipes keep running."""

    def __init__(self, option_strings, dest, new_name: str, **kwargs):
        self.new_name = new_name
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use {self.new_name} (same meaning).", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs) -> None:
    """``old`` as a deprecated spelling of the option ``new`` (same destination; a warning when used)."""
    parser.add_argument(old, dest=new.lstrip("-"), action=DeprecatedAlias, new_name=new,
                        help=f"Deprecated name of {new}.", **kwargs)
