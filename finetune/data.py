"""Seed-format JSON -> ``datasets.Dataset`` -> tokenized columns -> sampled, padded batches.

Pipeline: ``load_raw_dataset`` (validated, cached by file contents) -> ``tokenize_dataset``
(``datasets.map`` through ``finetune.text``, cached by tokenizer and settings) -> ``TripletDataset``
(samples one positive and k negatives per query, seeded by (seed, epoch, index); optional fields
such as teacher scores follow the sampled documents) -> ``TripletCollator`` (dynamic padding,
document layout of ``finetune.losses``). The samplers that feed it and ``build_train_sampler``
live here too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from transformers import PreTrainedTokenizerBase, TrainerCallback

from finetune.blend import BlendedEpochSampler, BlendedEvalSampler, BlendedTripletDataset
from finetune.schema import (NEG_DOC, NEG_SCORES, OPTIONAL_FIELDS, POS_DOC, POS_SCORES, QUESTION, SOURCE,
                             DataFormatError, RecordProblem, expand_data_files, read_records, text_key)
from finetune.text import TextSide

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


def _tokenize_batch(batch: dict, tokenizer, query: TextSide, document: TextSide) -> dict:
    def tokenize_lists(lists: list[list[str]]) -> list[list[list[int]]]:
        flat = document.input_ids(tokenizer, [text for texts in lists for text in texts])
        out, start = [], 0
        for texts in lists:
            out.append(flat[start:start + len(texts)])
            start += len(texts)
        return out

    return {
        "query_input_ids": query.input_ids(tokenizer, batch[QUESTION]),
        "query_key": [text_key(text) for text in batch[QUESTION]],
        "pos_input_ids": tokenize_lists(batch[POS_DOC]),
        "neg_input_ids": tokenize_lists(batch[NEG_DOC]),
        "pos_keys": [[text_key(text) for text in texts] for texts in batch[POS_DOC]],
        "neg_keys": [[text_key(text) for text in texts] for texts in batch[NEG_DOC]],
        **{key: batch[key] for key in OPTIONAL_FIELDS},
        SOURCE: batch[SOURCE],
    }


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
                     num_proc: int | None = None) -> datasets.Dataset:
    """Tokenize every query and document once, each side with its prompt and length (``finetune.text``).

    Columns: query_input_ids (T,), query_key (content hash), pos_input_ids / neg_input_ids (n, T), pos_keys / neg_keys (n,)
    content hashes, the optional fields (None when absent), source. Cached: the fingerprint covers
    the raw data, the tokenizer's full definition and both sides' settings.
    """
    settings = {"query": dataclasses.asdict(query), "document": dataclasses.asdict(document)}
    fingerprint = hashlib.sha256(json.dumps(
        [raw._fingerprint, _tokenizer_fingerprint(tokenizer), settings, "v3"], sort_keys=True).encode()).hexdigest()[:32]
    return raw.map(_tokenize_batch, batched=True, fn_kwargs={"tokenizer": tokenizer, "query": query, "document": document},
                   remove_columns=raw.column_names, features=TOKENIZED_FEATURES, new_fingerprint=fingerprint,
                   num_proc=tokenizer_processes(len(raw), num_proc), desc="Tokenizing")


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


class TripletDataset(Dataset):
    """Per query: one positive (sampled from pos_doc) and k negatives (from neg_doc), deterministically.

    ``dataset[i]`` uses epoch 0; ``dataset[(epoch, i)]`` (what EpochShuffleSampler yields) makes the
    draw change with the epoch. Negatives are drawn without replacement when the record has at
    least k, with replacement otherwise (NeMo's ``hard_negatives_to_train``). The draw depends
    only on (seed, epoch, i), so a resumed run sees the same examples. Records with teacher scores
    also give ``doc_scores``, aligned with ``doc_input_ids``.
    """

    def __init__(self, tokenized: datasets.Dataset, num_hard_negatives: int, seed: int = 42):
        self.tokenized = tokenized
        self.num_hard_negatives = num_hard_negatives
        self.seed = seed

    def __len__(self) -> int:
        return len(self.tokenized)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        row = self.tokenized[int(index)]
        rng = np.random.default_rng((self.seed, epoch, int(index)))
        k = self.num_hard_negatives
        positive = int(rng.integers(len(row["pos_keys"])))
        available = len(row["neg_keys"])
        negatives = rng.choice(available, size=k, replace=available < k).tolist() if k else []
        example = {
            "query_input_ids": row["query_input_ids"],
            "query_key": row["query_key"],
            "doc_input_ids": [row["pos_input_ids"][positive]] + [row["neg_input_ids"][n] for n in negatives],
            "doc_keys": [row["pos_keys"][positive]] + [row["neg_keys"][n] for n in negatives],
        }
        if row[POS_SCORES] is not None and row[NEG_SCORES] is not None:  # teacher scores of the sampled documents
            example["doc_scores"] = [row[POS_SCORES][positive]] + [row[NEG_SCORES][n] for n in negatives]
        return example


class EpochShuffleSampler(Sampler):
    """A seeded random permutation per epoch that yields ``(epoch, index)`` keys for TripletDataset.

    Accelerate and the Trainer call ``set_epoch`` (it reaches samplers through their wrappers,
    unlike ``Dataset.set_epoch``), and the order depends only on (seed, epoch), so resuming
    mid-epoch with skipped batches reproduces the same stream.
    """

    def __init__(self, num_samples: int, seed: int = 42, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist() if self.shuffle else range(self.num_samples)
        for index in order:
            yield (self.epoch, index)


class LengthGroupedEpochSampler(EpochShuffleSampler):
    """Like EpochShuffleSampler, but consecutive batches hold examples of similar length.

    Per epoch: a seeded permutation is cut into mega-batches of ``batch_size * mega_batches``
    examples; each is sorted by length (longest first) and its batches are then shuffled among
    themselves. Batches stay random in content, yet each is padded to a similar length. In-batch
    negatives then come from examples of similar length, a mild bias the README discusses;
    padding-free encoding (the default) already removes most of what this saves.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 42, mega_batches: int = 50):
        super().__init__(len(lengths), seed)
        self.lengths = lengths
        self.batch_size = batch_size
        self.mega_batches = mega_batches

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        size = self.batch_size * self.mega_batches
        for start in range(0, len(order), size):
            mega = sorted(order[start:start + size], key=lambda index: -self.lengths[index])
            batches = [mega[i:i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
            for batch_index in torch.randperm(len(batches), generator=generator).tolist():
                for index in batches[batch_index]:
                    yield (self.epoch, index)


def epoch_sampler_of(dataloader) -> Sampler | None:
    """Our epoch sampler under the wrappers of a prepared DataLoader (accelerate's ``BatchSamplerShard`` and, on
    resume, ``SkipBatchSampler``), or None."""
    seen, stack = set(), [dataloader]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, (EpochShuffleSampler, BlendedEpochSampler)):
            return node
        stack.extend(getattr(node, name, None) for name in ("batch_sampler", "sampler", "base_dataloader"))
    return None


class SamplerEpochCallback(TrainerCallback):
    """Sets the training sampler's epoch at the start of every epoch, the resumed one included.

    The Trainer's own ``set_epoch`` does not reach the sampler under several processes once the dataloader is
    wrapped for skipping the batches a resumed epoch already trained (``SkipBatchSampler`` around
    ``BatchSamplerShard``): the resumed epoch would then replay epoch 0's order and negatives. ``state.epoch`` is
    ``epoch + fraction done``, so its integer part is the epoch that begins.
    """

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        sampler = epoch_sampler_of(train_dataloader)
        if sampler is not None:
            sampler.set_epoch(int(state.epoch))


def build_train_sampler(dataset: "TripletDataset", strategy: str, batch_size: int, seed: int,
                        world_size: int = 1) -> Sampler:
    """The sampler of ``--train_sampling_strategy``: random, group_by_length or sequential (validated by the arguments).

    Every sampler yields ``(epoch, index)`` keys for TripletDataset; a blend of datasets gets its own
    schedule (``finetune.blend.BlendedEpochSampler``: blocks of world_size x batch_size keys of one dataset).
    """
    if isinstance(dataset, BlendedTripletDataset):
        return BlendedEpochSampler(dataset, block=world_size * batch_size, seed=seed)
    if strategy == "group_by_length":
        return LengthGroupedEpochSampler(example_lengths(dataset.tokenized), batch_size, seed=seed)
    return EpochShuffleSampler(len(dataset), seed=seed, shuffle=strategy != "sequential")


def build_eval_sampler(dataset, batch_size: int, world_size: int = 1) -> Sampler | None:
    """A blend of validation datasets: batches that each hold one dataset; None (the Trainer's own) otherwise."""
    return BlendedEvalSampler(dataset, world_size * batch_size) if isinstance(dataset, BlendedTripletDataset) else None


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


def pad_sequences(sequences: list[list[int]], pad_token_id: int, padding_side: str = "right",
                  pad_to_multiple_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists to the longest: -> input_ids (N, T) and attention_mask (N, T), int64."""
    length = max(len(sequence) for sequence in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(length - len(sequence), length) if padding_side == "left" else slice(0, len(sequence))
        input_ids[row, span] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, span] = 1
    return input_ids, attention_mask


class TripletCollator:
    """Examples of TripletDataset -> one batch with dynamic padding.

    Output: query_input_ids / query_attention_mask (B, Tq); doc_input_ids / doc_attention_mask
    (B*(1+k), Td) ordered [positives..., negatives of query 0, of query 1, ...]; doc_keys (B*(1+k),) and
    query_keys (B,) content hashes;
    doc_scores (B*(1+k),) float32 teacher scores in the same order, only when every example has them.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None = None):
        if tokenizer.pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token).")
        self.pad_token_id = tokenizer.pad_token_id
        self.padding_side = tokenizer.padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        positives = [feature["doc_input_ids"][0] for feature in features]
        negatives = [ids for feature in features for ids in feature["doc_input_ids"][1:]]
        keys = [feature["doc_keys"][0] for feature in features] + [key for f in features for key in f["doc_keys"][1:]]
        query_ids, query_mask = pad_sequences([f["query_input_ids"] for f in features], self.pad_token_id,
                                              self.padding_side, self.pad_to_multiple_of)
        doc_ids, doc_mask = pad_sequences(positives + negatives, self.pad_token_id, self.padding_side,
                                          self.pad_to_multiple_of)
        batch = {"query_input_ids": query_ids, "query_attention_mask": query_mask,
                 "doc_input_ids": doc_ids, "doc_attention_mask": doc_mask,
                 "doc_keys": torch.tensor(keys, dtype=torch.long),
                 "query_keys": torch.tensor([f["query_key"] for f in features], dtype=torch.long)}
        if "dataset_index" in features[0]:  # blended training: every batch holds one dataset (finetune.blend)
            batch["dataset_index"] = torch.tensor(features[0]["dataset_index"])
        if all("doc_scores" in feature for feature in features):
            scores = [f["doc_scores"][0] for f in features] + [s for f in features for s in f["doc_scores"][1:]]
            batch["doc_scores"] = torch.tensor(scores, dtype=torch.float32)
        return batch
