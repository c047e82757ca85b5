"""The frozen guide model of false-negative filtering (GISTEmbed: Solatorio, 2024, arXiv:2402.16829).

``--false_negative_guide model`` drops the candidates that a second embedding model, frozen, scores too close
to the query's positive. The guide embeds the batch the trainer embeds: the same token ids (so it must use the
same tokenizer: :func:`tokenizer_mismatch`), without gradients, in eval mode; its embeddings are gathered
across processes like the documents (``finetune.objectives.base.gather_batch``). It is not part of the
trained model: it is neither saved nor wrapped by DDP/DeepSpeed, and every process holds a full copy.
"""

from __future__ import annotations

import torch

# Texts whose token ids must agree between the two tokenizers: case, punctuation, digits, accents, code.
PROBE_TEXTS = ("Return the members of the archive as a list of their names.",
               "tarfile.TarFile.getnames: It has the same ORDER as getmembers() -- 42 naïve cafés, 3.14!")


def tokenizer_mismatch(guide_tokenizer, tokenizer) -> str | None:
    """Why ``guide_tokenizer`` would read the batch's token ids differently from ``tokenizer``, or None when it
    would not: the same vocabulary (token -> id) and the same ids for probe texts (normalisation, special tokens)."""
    if guide_tokenizer.get_vocab() != tokenizer.get_vocab():
        return (f"another vocabulary: {len(guide_tokenizer.get_vocab())} tokens against {len(tokenizer.get_vocab())}, "
                "or the same tokens with other ids")
    for text in PROBE_TEXTS:
        if guide_tokenizer(text)["input_ids"] != tokenizer(text)["input_ids"]:
            return f"other token ids for {text!r}"
    return None


class GuideEncoder:
    """``(inputs) -> (query_emb (B, D'), doc_emb (B*(1+k), D'))``: a frozen embedding model applied to a
    TripletCollator batch's token ids, without gradients, in mini-batches of ``mini_batch_size`` texts (all at
    once when None; the trainer passes --gradcache_mini_batch_size). Moved to the batch's device on first use."""

    def __init__(self, model: torch.nn.Module, mini_batch_size: int | None = None):
        self.model = model.eval().requires_grad_(False)
        self.mini_batch_size = mini_batch_size

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        size = self.mini_batch_size or max(input_ids.shape[0], 1)
        return torch.cat([self.model(input_ids[start:start + size], attention_mask[start:start + size])
                          for start in range(0, input_ids.shape[0], size)])

    @torch.no_grad()
    def __call__(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = inputs["query_input_ids"].device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        return (self.embed(inputs["query_input_ids"], inputs["query_attention_mask"]),
                self.embed(inputs["doc_input_ids"], inputs["doc_attention_mask"]))
