"""The one text path: how a query or a document becomes tokens (prompt, truncation, tokenization).

Training tokenization (``finetune.data.columns``), ``EmbeddingModel.encode`` (evaluation during training,
``data_prep.mine``) and ``data_prep.validate``'s token counts all go through :class:`TextSide`, so
a text is cut and prefixed the same way everywhere. The two sides of a retrieval pair are the
``query`` and the ``document`` (the CLI keeps NeMo's word for the latter: ``--passage_prefix``,
``--passage_max_length``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the data tools import this module without loading transformers
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class TextSide:
    """How the texts of one side are tokenized.

    ``prompt``: put before every text (an instruction such as ``"query: "``); it counts towards
    ``max_length``. ``max_length``: tokens kept (special tokens and prompt included), cut from the
    right; ``None`` = the tokenizer's own limit.
    """

    prompt: str = ""
    max_length: int | None = None

    def prompted(self, texts: list[str]) -> list[str]:
        return [self.prompt + text for text in texts]

    def tokenize(self, tokenizer: PreTrainedTokenizerBase, texts: list[str], *, padding: bool = False,
                 return_tensors: str | None = None):
        """``tokenizer`` output for the prompted, truncated texts (``input_ids`` lists, or (N, T) tensors when padded)."""
        return tokenizer(self.prompted(texts), padding=padding, truncation=True, max_length=self.max_length,
                         return_tensors=return_tensors)

    def input_ids(self, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, unpadded (what the training columns store)."""
        return self.tokenize(tokenizer, texts)["input_ids"] if texts else []

    def token_lengths(self, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
        """Untruncated token counts (prompt and special tokens included): what ``max_length`` would cut."""
        encoded = tokenizer(self.prompted(texts), truncation=False, verbose=False)["input_ids"]
        return [len(ids) for ids in encoded]
