"""Tokenized columns -> training examples -> padded batches.

``TripletDataset`` samples one positive and k negatives per query, seeded by (seed, epoch, index); optional fields
such as teacher scores follow the sampled documents. ``TripletCollator`` pads dynamically, in the document layout
of ``finetune.objectives.losses``.
"""

from __future__ import annotations

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from finetune.data.schema import NEG_SCORES, POS_SCORES

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
        if "pos_token_type_ids" in row:  # (question, document) pairs of a cross-encoder: their segment ids
            example["doc_token_type_ids"] = ([row["pos_token_type_ids"][positive]]
                                             + [row["neg_token_type_ids"][n] for n in negatives])
        if row[POS_SCORES] is not None and row[NEG_SCORES] is not None:  # teacher scores of the sampled documents
            example["doc_scores"] = [row[POS_SCORES][positive]] + [row[NEG_SCORES][n] for n in negatives]
        return example


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
    (B*(1+k), Td) ordered [positives..., negatives of query 0, of query 1, ...] (cross-encoders: the
    (question, document) pairs in that order, with doc_token_type_ids); doc_keys (B*(1+k),) and
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
        if "doc_token_type_ids" in features[0]:  # cross-encoder pairs: segment ids, padded with 0
            types = ([f["doc_token_type_ids"][0] for f in features]
                     + [types for f in features for types in f["doc_token_type_ids"][1:]])
            batch["doc_token_type_ids"] = pad_sequences(types, 0, self.padding_side, self.pad_to_multiple_of)[0]
        if "dataset_index" in features[0]:  # blended training: every batch holds one dataset (finetune.data.blend)
            batch["dataset_index"] = torch.tensor(features[0]["dataset_index"])
        if all("doc_scores" in feature for feature in features):
            scores = [f["doc_scores"][0] for f in features] + [s for f in features for s in f["doc_scores"][1:]]
            batch["doc_scores"] = torch.tensor(scores, dtype=torch.float32)
        return batch
