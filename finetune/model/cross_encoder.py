"""The reranker: a Hugging Face encoder with a one-logit head that scores (query, document) pairs.

``CrossEncoderModel(input_ids (N, T), attention_mask (N, T), token_type_ids (N, T) | None) -> scores (N,)``.
It loads a cross-encoder (its head is kept) or any encoder checkpoint, bi-encoders of ours included (a new head,
initialised by transformers), and saves a folder that ``sentence_transformers.CrossEncoder(path)`` loads: the
Hugging Face sequence-classification model with one label, its tokenizer (``model_max_length``: the pair length
trained with) and the activation ``predict`` applies, recorded in config.json the way every sentence-transformers
release since 4.0 reads it.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from finetune.model.decoders import is_decoder
from finetune.model.embedding_model import ModelLoadError
from finetune.model.st_layout import read_sentence_transformer_config

logger = logging.getLogger("finetune.model.cross_encoder")

# What ``CrossEncoder.predict`` applies to the logit by default: the identity (the scores training ranks by) or
# the sigmoid (a probability, natural after the pointwise loss); both keep the order.
ACTIVATIONS = {"identity": "torch.nn.modules.linear.Identity", "sigmoid": "torch.nn.modules.activation.Sigmoid"}


class CrossEncoderModel(nn.Module):
    """A sequence-classification model with one logit per pair, plus what the saved folder needs.

    ``max_length``: tokens per (query, document) pair, cut longest first as ``CrossEncoder.predict`` does;
    ``activation``: a key of ``ACTIVATIONS``, what ``predict`` applies on top of the logit.
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                 activation: str = "identity"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}.")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.activation = activation

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, *, max_length: int, activation: str = "identity",
                        trust_remote_code: bool = False) -> "CrossEncoderModel":
        """Load a cross-encoder, or an encoder (a bi-encoder folder of ours included) under a new one-logit head."""
        subfolder = read_sentence_transformer_config(model_name_or_path).transformer_subfolder
        kwargs = {"subfolder": subfolder} if subfolder else {}
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                model_name_or_path, num_labels=1, trust_remote_code=trust_remote_code, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code, **kwargs)
        except (OSError, ValueError) as error:
            raise ModelLoadError(model_name_or_path, "no loadable sequence-classification model", error) from None
        if is_decoder(model.config):
            raise ModelLoadError(model_name_or_path, "a decoder LLM", ValueError(
                "decoder rerankers (a 'yes' token's logit) are not supported yet; use an encoder (BERT family)"))
        return cls(model, tokenizer, max_length=max_length, activation=activation)

    @property
    def config(self):
        """The HF config (the Trainer's DeepSpeed integration sizes its buckets from hidden_size)."""
        return self.model.config

    @property
    def _no_split_modules(self) -> list[str]:
        return sorted(getattr(self.model, "_no_split_modules", None) or [])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Shapes: (N, T) each -> (N,) logits."""
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits.squeeze(-1)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options) -> None:
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def tokenize_pairs(self, queries: list[str], documents: list[str]) -> dict[str, torch.Tensor]:
        """Padded (N, T) tensors of the pairs, as ``CrossEncoder.predict`` tokenizes them."""
        return self.tokenizer(queries, documents, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    @torch.no_grad()
    def score(self, queries: list[str], documents: list[str], *, batch_size: int = 64) -> torch.Tensor:
        """Logits of the pairs (queries[i], documents[i]): (N,) fp32 on CPU."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        scores = []
        for start in range(0, len(queries), batch_size):
            batch = self.tokenize_pairs(queries[start:start + batch_size], documents[start:start + batch_size])
            scores.append(self(**{key: value.to(device) for key, value in batch.items()}).float().cpu())
        self.train(was_training)
        return torch.cat(scores) if scores else torch.empty(0)

    def save_pretrained(self, output_dir: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """A folder ``CrossEncoder(output_dir)`` loads: weights (``state_dict``: keys as ``self.state_dict()``, e.g.
        gathered by ZeRO-3), tokenizer with the pair length, the activation in config.json."""
        import sentence_transformers

        state = self.state_dict() if state_dict is None else state_dict
        weights = {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
        self.model.config.sentence_transformers = {"activation_fn": ACTIVATIONS[self.activation],
                                                   "version": sentence_transformers.__version__}
        self.model.save_pretrained(output_dir, state_dict=weights)
        self.tokenizer.model_max_length = self.max_length
        self.tokenizer.save_pretrained(output_dir)

    def load_encoder_weights(self, folder: str) -> None:
        """Load weights saved by ``save_pretrained`` (single or sharded safetensors), strictly."""
        import safetensors.torch
        from transformers.trainer_utils import load_sharded_checkpoint

        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(single):
            self.model.load_state_dict(safetensors.torch.load_file(single), strict=True)
        else:
            load_sharded_checkpoint(self.model, folder, strict=True)


def saved_activation(folder: str) -> str | None:
    """The ``ACTIVATIONS`` key a saved cross-encoder folder declares, or None."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
            path = (json.load(handle).get("sentence_transformers") or {}).get("activation_fn")
    except (OSError, ValueError):
        return None
    return next((name for name, value in ACTIVATIONS.items() if value == path), None)
