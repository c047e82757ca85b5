"""Seed-format JSON -> ``datasets.Dataset`` -> tokenized columns, cached, with the checks the training data needs.

``load_raw_dataset`` (validated, cached by file contents) -> ``tokenize_dataset`` (``datasets.map`` through
``finetune.data.text``, cached by tokenizer and settings). ``example_lengths``: the grouping key of the
length-grouped sampler, read from the columns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator

import datasets
from transformers import PreTrainedTokenizerBase

from finetune.data.schema import (NEG_DOC, NEG_SCORES, OPTIONAL_FIELDS, POS_DOC, POS_SCORES, QUESTION, SOURCE,
                                  DataFormatError, RecordProblem, expand_data_files, read_records, text_key)
from finetune.data.text import TextSide

# Optional record fields travel as nullable columns: None where a record does not carry them.
OPTIONAL_FEATURES = {POS_SCORES: datasets.List(datasets.Value("float32")),
                     NEG_SCORES: datasets.List(datasets.Value("float32"))}

assert set(OPTIONAL_FEATURES) == set(OPTIONAL_FIELDS), "every optional schema field needs a column type"

RAW_FEATURES = datasets.Features({
    QUESTION: datasets.Value("string"),
    POS_DOC: datasets.List(datasets.Value("string")),
    NEG_DOC: datasets.List(datasets.Value("string")),
    **OPTIONAL_FEATURES,
    SOURCE: datasets.Value("string"),
})

TOKENIZED_FEATURES = datasets.Features({
    "query_input_ids": datasets.List(datasets.Value("int32")),
    "query_key": datasets.Value("int64"),
    "pos_input_ids": datasets.List(datasets.List(datasets.Value("int32"))),
    "neg_input_ids": datasets.List(datasets.List(datasets.Value("int32"))),
    "pos_keys": datasets.List(datasets.Value("int64")),
    "neg_keys": datasets.List(datasets.Value("int64")),
    **OPTIONAL_FEATURES,
    SOURCE: datasets.Value("string"),
})
# Cross-encoder training: pos_input_ids / neg_input_ids hold (question, document) pairs, with their segment ids.
PAIR_FEATURES = datasets.Features({**TOKENIZED_FEATURES,
                                   "pos_token_type_ids": datasets.List(datasets.List(datasets.Value("int8"))),
                                   "neg_token_type_ids": datasets.List(datasets.List(datasets.Value("int8")))})


def _generate_records(files: list[str], stamps: list) -> Iterator[dict]:
    # ``stamps`` is unused here; it is part of gen_kwargs so that the datasets cache key changes with the files.
    absent = dict.fromkeys(OPTIONAL_FIELDS)
    for record in read_records(files):
        yield {**absent, **record}


def load_raw_dataset(patterns: str | list[str]) -> datasets.Dataset:
    """Validated records of all files as a Dataset (columns question, pos_doc, neg_doc, the optional fields
    (None where a record has none), source).

    Cached by the datasets library, keyed on file paths, sizes and modification times, so an
    unchanged file is not parsed again. Raises DataFormatError naming every bad record.
    """
    files = [os.path.abspath(path) for path in expand_data_files(patterns)]
    stamps = [(os.path.getsize(path), os.stat(path).st_mtime_ns) for path in files]
    try:
        return datasets.Dataset.from_generator(_generate_records, features=RAW_FEATURES,
                                               gen_kwargs={"files": files, "stamps": stamps})
    except datasets.exceptions.DatasetGenerationError as error:
        # datasets wraps exceptions of the generator; show ours as they are, without its traceback.
        cause = error.__cause__ or error.__context__
        if isinstance(cause, DataFormatError):
            raise cause from None
        raise


def _per_record(flat: list, lists: list[list[str]]) -> list[list]:
    """``flat`` (one item per text of ``lists``, in order) cut back into one list per record."""
    out, start = [], 0
    for texts in lists:
        out.append(flat[start:start + len(texts)])
        start += len(texts)
    return out


def _record_columns(batch: dict, tokenizer, query: TextSide) -> dict:
    """The columns every model gets: tokenized queries, content keys of queries and documents, optional fields."""
    return {
        "query_input_ids": query.input_ids(tokenizer, batch[QUESTION]),
        "query_key": [text_key(text) for text in batch[QUESTION]],
        "pos_keys": [[text_key(text) for text in texts] for texts in batch[POS_DOC]],
        "neg_keys": [[text_key(text) for text in texts] for texts in batch[NEG_DOC]],
        **{key: batch[key] for key in OPTIONAL_FIELDS},
        SOURCE: batch[SOURCE],
    }


def _tokenize_batch(batch: dict, tokenizer, query: TextSide, document: TextSide) -> dict:
    def tokenize_lists(lists: list[list[str]]) -> list[list[list[int]]]:
        return _per_record(document.input_ids(tokenizer, [text for texts in lists for text in texts]), lists)

    return {**_record_columns(batch, tokenizer, query),
            "pos_input_ids": tokenize_lists(batch[POS_DOC]), "neg_input_ids": tokenize_lists(batch[NEG_DOC])}


def _tokenize_pair_batch(batch: dict, tokenizer, query: TextSide, document: TextSide, max_length: int) -> dict:
    """``_tokenize_batch``'s columns, with each document tokenized together with its question as one pair (cut to
    ``max_length`` longest first, as ``CrossEncoder.predict`` does), plus the pairs' segment ids."""
    out = _record_columns(batch, tokenizer, query)
    questions = query.prompted(batch[QUESTION])
    for field, prefix in ((POS_DOC, "pos"), (NEG_DOC, "neg")):
        lists = batch[field]
        pairs = [(question, text) for question, texts in zip(questions, lists) for text in document.prompted(texts)]
        encoded = tokenizer([q for q, _ in pairs], [d for _, d in pairs], truncation=True,
                            max_length=max_length) if pairs else {"input_ids": []}
        types = encoded.get("token_type_ids") or [[0] * len(ids) for ids in encoded["input_ids"]]
        out[f"{prefix}_input_ids"] = _per_record(encoded["input_ids"], lists)
        out[f"{prefix}_token_type_ids"] = _per_record(types, lists)
    return out


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what the tokenizer does to text (vocabulary, normalizer, special tokens...).

    The backend's truncation/padding state is left out: it changes with every call's arguments.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
    else:
        definition = tokenizer.get_vocab()
    description = json.dumps([definition, tokenizer.padding_side, type(tokenizer).__name__], sort_keys=True)
    return hashlib.sha256(description.encode("utf-8")).hexdigest()


RECORDS_PER_TOKENIZER_PROCESS = 20_000  # below this a process's start-up costs more than it saves


def tokenizer_processes(num_records: int, requested: int | None = None) -> int | None:
    """``--preprocessing_num_workers``, else one process per 20,000 records up to the cores this process may use
    (a 200,000-record file took 6 min 19 s on one core); None (one, no worker processes) for small data."""
    if requested is not None:
        return requested if requested > 1 else None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = min(cores, num_records // RECORDS_PER_TOKENIZER_PROCESS)
    return processes if processes > 1 else None


def tokenize_dataset(raw: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, *,
                     query: TextSide = TextSide(max_length=64), document: TextSide = TextSide(max_length=256),
                     num_proc: int | None = None, pair_max_length: int | None = None) -> datasets.Dataset:
    """Tokenize every query and document once, each side with its prompt and length (``finetune.data.text``).

    Columns: query_input_ids (T,), query_key (content hash), pos_input_ids / neg_input_ids (n, T), pos_keys / neg_keys (n,)
    content hashes, the optional fields (None when absent), source. Cached: the fingerprint covers
    the raw data, the tokenizer's full definition and both sides' settings. ``pair_max_length`` (cross-encoders):
    the documents' columns hold (question, document) pairs of at most that many tokens, and their segment ids
    (pos_token_type_ids / neg_token_type_ids).
    """
    settings = {"query": dataclasses.asdict(query), "document": dataclasses.asdict(document)}
    version = "v3" if pair_max_length is None else ["pairs-v1", pair_max_length]
    fingerprint = hashlib.sha256(json.dumps(
        [raw._fingerprint, _tokenizer_fingerprint(tokenizer), settings, version], sort_keys=True).encode()).hexdigest()[:32]
    function, kwargs = _tokenize_batch, {"tokenizer": tokenizer, "query": query, "document": document}
    if pair_max_length is not None:
        function, kwargs = _tokenize_pair_batch, {**kwargs, "max_length": pair_max_length}
    return raw.map(function, batched=True, fn_kwargs=kwargs, remove_columns=raw.column_names,
                   features=TOKENIZED_FEATURES if pair_max_length is None else PAIR_FEATURES,
                   new_fingerprint=fingerprint, num_proc=tokenizer_processes(len(raw), num_proc), desc="Tokenizing")


def check_enough_negatives(tokenized: datasets.Dataset, num_hard_negatives: int) -> None:
    """With k > 0 every record needs at least one negative to sample from (with replacement)."""
    if num_hard_negatives == 0:
        return
    counts = tokenized.map(lambda batch: {"n": [len(keys) for keys in batch["neg_keys"]]}, batched=True,
                           remove_columns=tokenized.column_names, desc="Counting negatives")["n"]
    empty = [index for index, count in enumerate(counts) if count == 0]
    if empty:
        message = (f"empty, but --num_hard_negatives={num_hard_negatives} needs at least one negative to sample "
                   "(use --num_hard_negatives 0 for in-batch negatives only, or mine negatives with "
                   "`python -m data_prep.mine`)")
        raise DataFormatError([RecordProblem(*source.rsplit(", ", 1), NEG_DOC, message)
                               for source in tokenized.select(empty)[SOURCE]])


def check_teacher_scores(raw: datasets.Dataset, needed_by: str) -> None:
    """Every record must carry teacher scores (pos_scores and neg_scores) for ``needed_by`` (e.g. distillation)."""
    missing = [index for index, scores in enumerate(raw[POS_SCORES]) if scores is None]
    if missing:
        message = (f"missing, but {needed_by} needs teacher scores for every document (pos_scores and neg_scores); "
                   "add them with `python -m data_prep.score --teacher MODEL --input FILE --output FILE`")
        raise DataFormatError([RecordProblem(*source.rsplit(", ", 1), POS_SCORES, message)
                               for source in raw.select(missing)[SOURCE]])


def example_lengths(tokenized: datasets.Dataset) -> list[int]:
    """Per record, the token count of its longest document (positives and negatives): what pads a document batch.

    The grouping key of ``LengthGroupedEpochSampler``; documents dominate a batch's padding (queries are short).
    """
    import numpy as np
    import pyarrow.compute as pc

    table = tokenized.with_format("arrow")[:]  # a pyarrow Table (zero-copy unless the dataset is a selection)
    longest = np.zeros(len(table), dtype=np.int64)
    for column in ("pos_input_ids", "neg_input_ids"):
        documents = table.column(column).combine_chunks()  # list<list<int>>: documents of each record
        lengths = pc.list_value_length(pc.list_flatten(documents)).to_numpy(zero_copy_only=False)
        np.maximum.at(longest, pc.list_parent_indices(documents).to_numpy(zero_copy_only=False), lengths)
    return longest.tolist()
