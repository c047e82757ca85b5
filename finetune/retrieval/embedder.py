"""The one model loader of the retrieval tools: a folder or Hub id -> :class:`Embedder` (texts of a side ->
embeddings), through ``EmbeddingModel`` (the training code) wherever it represents the model."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from finetune.retrieval.similarity import ranking_similarity
from finetune.retrieval.work_parts import path_identity
from finetune.data.text import TextSide

logger = logging.getLogger("finetune.retrieval.embedder")


@dataclass
class Embedder:
    """A model ready for retrieval: ``encode(texts, side)`` -> (n, D) fp32 on CPU, for side "query" or "document"."""

    encode: Callable[[list[str], str], torch.Tensor]
    similarity: str  # the similarity the model declares: cosine or dot
    batch_size: int  # texts per forward pass
    identity: list  # JSON: changes when the model or how it encodes changes (for resuming shards)


def _training_run(model_name_or_path: str) -> dict:
    """The ``training_run.json`` a training of ours left in the model folder, or {}."""
    path = os.path.join(model_name_or_path, "training_run.json")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def load_embedder(model_name_or_path: str, *, device: torch.device, max_seq_length: int | None = None,
                  batch_size: int | None = None) -> Embedder:
    """The one loader of the retrieval tools: ``EmbeddingModel`` (padding-free, the training code) for every model it
    represents (a HF encoder or decoder with Transformer + Pooling (+ Normalize) modules: ours and most Hub models),
    ``SentenceTransformer`` itself for the rest (other modules, an adapter-only folder).

    Texts get the model's saved ``query``/``document`` prompts; lengths: ``max_seq_length`` when given, else the
    query and passage lengths the model was trained with (its ``training_run.json``), else its max_seq_length.
    ``batch_size``: default the training's evaluation batch size (so the metrics equal the training's final
    evaluation to float precision), else 64.
    """
    from finetune.model.embedding_model import EmbeddingModel, ModelLoadError
    from finetune.model.st_layout import read_sentence_transformer_config

    run = _training_run(model_name_or_path)
    if batch_size is None and run:
        from finetune.training.arguments import EmbeddingTrainingArguments

        batch_size = run.get("per_device_eval_batch_size") or run.get("non_default_options", {}).get(
            "per_device_eval_batch_size") or EmbeddingTrainingArguments.__dataclass_fields__[
            "per_device_eval_batch_size"].default
    batch_size = batch_size or 64
    st = read_sentence_transformer_config(model_name_or_path)
    if not st.unsupported_modules:
        try:
            model = EmbeddingModel.from_pretrained(model_name_or_path, padding_free=True).to(device)
        except ModelLoadError as error:
            logger.info("Loading %s with sentence-transformers (%s).", model_name_or_path, error)
        else:
            limit = min(model.tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512) or 512)
            lengths = {"query": max_seq_length or run.get("query_max_length") or st.max_seq_length or limit,
                       "document": max_seq_length or run.get("passage_max_length") or st.max_seq_length or limit}
            sides = {name: TextSide(st.prompts.get(name, ""), lengths[name]) for name in lengths}
            logger.info("%s: query %s, document %s, batches of %d.", model_name_or_path, sides["query"],
                        sides["document"], batch_size)
            return Embedder(lambda texts, side: model.encode(texts, sides[side], batch_size=len(texts)),
                            model.similarity if st.similarity is None else ranking_similarity(st.similarity),
                            batch_size, [path_identity(model_name_or_path), "ours",
                                         {name: [side.prompt, side.max_length] for name, side in sides.items()}])
    model = load_sentence_transformer(model_name_or_path, device=str(device))
    if max_seq_length:
        model.max_seq_length = max_seq_length

    def encode(texts: list[str], side: str) -> torch.Tensor:
        emb = model.encode(texts, prompt_name=side if side in model.prompts else None, batch_size=len(texts),
                           convert_to_tensor=True, show_progress_bar=False)
        return emb.float().cpu()
    similarity = ranking_similarity(getattr(model.similarity_fn_name, "value", model.similarity_fn_name) or "cosine")
    return Embedder(encode, similarity, batch_size,
                    [path_identity(model_name_or_path), "sentence-transformers", model.max_seq_length])


def load_sentence_transformer(model_name_or_path: str, truncate_dim: int | None = None, device: str | None = None):
    """``SentenceTransformer(model_name_or_path)`` on ``device`` (default: cuda when available); a raw decoder LLM
    folder or id (no SentenceTransformer files) gets what training gives it (``finetune.model.decoders``: EOS appended,
    left padding, last-token pooling, normalised) instead of sentence-transformers' default mean pooling."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoConfig

    from finetune.model.decoders import is_decoder, prepare_decoder_tokenizer
    from finetune.model.st_layout import read_sentence_transformer_config

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if read_sentence_transformer_config(model_name_or_path).pooling is None:
        try:
            decoder = is_decoder(AutoConfig.from_pretrained(model_name_or_path))
        except (OSError, ValueError):
            decoder = False
        if decoder:
            from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

            transformer = Transformer(model_name_or_path)
            prepare_decoder_tokenizer(transformer.tokenizer)
            pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="lasttoken")
            return SentenceTransformer(modules=[transformer, pooling, Normalize()], device=device,
                                       truncate_dim=truncate_dim)
    return SentenceTransformer(model_name_or_path, device=device, truncate_dim=truncate_dim)
