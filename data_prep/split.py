"""Split seed-format data into training and validation files, deterministically and by group.

    python -m data_prep.split --input data.jsonl --train_output train.jsonl --validation_output val.jsonl \\
        [--validation_ratio 0.04 | --validation_count N] [--seed 0] [--group_by question|pos_doc] [--dedupe]

Records that share a group key never straddle the split: with --group_by question, records with the same
question (case, spacing and Unicode form ignored); with --group_by pos_doc, records that share any positive
document, transitively (so no validation positive was seen in training). Groups are ordered by a hash of
(seed, group key), independent of the input order, and taken into validation while they fit the target
(ratio x records, rounded, or --validation_count); each file keeps the input order. --dedupe drops records
identical to an earlier one (same question, pos_doc and neg_doc) first. Both files are written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging

from tqdm.auto import tqdm

from data_prep.records import normalize_text, run_cli, setup_logging, write_jsonl
from finetune.data.schema import POS_DOC, QUESTION, normalize_record, read_records

logger = logging.getLogger("data_prep.split")
GROUP_BY = (QUESTION, POS_DOC)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.split", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+", help="Seed-format files or globs (validated first).")
    parser.add_argument("--train_output", required=True, help="Training records go here (JSON Lines, .gz to compress).")
    parser.add_argument("--validation_output", required=True, help="Validation records go here (JSON Lines, .gz to compress).")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--validation_ratio", type=float, default=None,
                      help="Share of the records for validation, 0 < ratio < 1. Default 0.04 (NeMo's val_ratio) "
                           "when --validation_count is not given.")
    size.add_argument("--validation_count", type=int, default=None,
                      help="Number of records for validation instead of a ratio. Default: use --validation_ratio.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the group order; another seed, another split. Default 0.")
    parser.add_argument("--group_by", choices=GROUP_BY, default=QUESTION,
                        help="Keep records sharing a question, or any positive document, on one side. Default question.")
    parser.add_argument("--dedupe", action="store_true",
                        help="Drop records identical to an earlier one before splitting. Default: off (keep all).")
    return parser


def group_records(records: list[dict], group_by: str) -> list[int]:
    """The group of each record (the index of its group's first record): records sharing a normalised key,
    directly or through other records (union-find), are in one group."""
    parent = list(range(len(records)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for index, record in enumerate(records):
        keys = [record[QUESTION]] if group_by == QUESTION else record[POS_DOC]
        for key in {normalize_text(text) for text in keys}:
            if key in owner:
                a, b = find(owner[key]), find(index)
                parent[max(a, b)] = min(a, b)  # the root is the group's first record
            else:
                owner[key] = index
    return [find(index) for index in range(len(records))]


def _group_order_key(seed: int, record: dict, group_by: str) -> bytes:
    keys = [record[QUESTION]] if group_by == QUESTION else record[POS_DOC]
    canonical = min(normalize_text(text) for text in keys)
    return hashlib.blake2b(f"{seed}\0{canonical}".encode("utf-8"), digest_size=16).digest()


def split_records(records: list[dict], *, validation_count: int, seed: int = 0,
                  group_by: str = QUESTION) -> tuple[list[dict], list[dict]]:
    """(train, validation): whole groups, in hashed order, go to validation while they fit ``validation_count``."""
    groups = group_records(records, group_by)
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    # A group's order key is the smallest key hash among its members: it does not depend on the input order.
    order = sorted(members, key=lambda group: min(_group_order_key(seed, records[i], group_by) for i in members[group]))
    remaining, in_validation = validation_count, set()
    for group in order:
        if remaining == 0:
            break
        if len(members[group]) <= remaining:
            in_validation.update(members[group])
            remaining -= len(members[group])
    train = [record for index, record in enumerate(records) if index not in in_validation]
    validation = [record for index, record in enumerate(records) if index in in_validation]
    return train, validation


def dedupe(records: list[dict]) -> list[dict]:
    """Records without exact repeats (every field equal, teacher scores included), first occurrence kept."""
    seen, result = set(), []
    for record in records:
        key = json.dumps(record, ensure_ascii=False)  # normalised records: the same keys in the same order
        if key not in seen:
            seen.add(key)
            result.append(record)
    return result


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Returns the counts that are also printed."""
    args = build_parser().parse_args(argv)
    setup_logging()
    records = [normalize_record(record) for record in tqdm(read_records(args.input), desc="Reading", unit=" records")]
    counts = {"records_in": len(records), "duplicates_dropped": 0}
    if args.dedupe:
        unique_records = dedupe(records)
        counts["duplicates_dropped"] = len(records) - len(unique_records)
        records = unique_records
    if args.validation_count is not None:
        if not 0 < args.validation_count < len(records):
            raise ValueError(f"--validation_count must be between 1 and {len(records) - 1} (the records less one), "
                             f"got {args.validation_count}.")
        target = args.validation_count
    else:
        ratio = 0.04 if args.validation_ratio is None else args.validation_ratio
        if not 0 < ratio < 1:
            raise ValueError(f"--validation_ratio must be between 0 and 1 (exclusive), got {ratio}.")
        target = max(1, min(len(records) - 1, round(ratio * len(records))))
    train, validation = split_records(records, validation_count=target, seed=args.seed, group_by=args.group_by)
    if not validation or not train:
        raise ValueError(f"Cannot split {len(records)} records by {args.group_by}: a single group holds them all.")
    counts.update(train=write_jsonl(args.train_output, train), validation=write_jsonl(args.validation_output, validation),
                  target=target)
    shortfall = f" (target {target}: the next groups were larger than what was left)" if len(validation) != target else ""
    print(f"Split {len(records):,} records by {args.group_by}: {len(train):,} to {args.train_output}, "
          f"{len(validation):,} to {args.validation_output}{shortfall}"
          + (f"; dropped {counts['duplicates_dropped']:,} duplicate record(s)" if args.dedupe else "") + ".")
    return counts


if __name__ == "__main__":
    run_cli(main)
