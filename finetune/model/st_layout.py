"""Read and write the SentenceTransformer folder layout (the files around the HF weights).

We write the classic layout (``sentence_transformers.models.*`` module types, legacy pooling
keys) because every sentence-transformers release from 2.x to 6.x loads it, so a model trained
here loads wherever a user's ``SentenceTransformer(path)`` runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import hf_hub_download

from finetune.model.pooling import POOLING_MODES

QUERY_PROMPT_NAME = "query"
DOCUMENT_PROMPT_NAME = "document"

_LEGACY_POOLING_KEYS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


@dataclass
class SentenceTransformerConfig:
    """What a SentenceTransformer folder says beyond the HF weights.

    ``transformer_subfolder`` is where the HF encoder lives ("" for the root, as we write it).
    ``unsupported_modules``: what ``EmbeddingModel`` cannot reproduce (other module types, a pooling mode it lacks,
    pooling without the prompt's tokens, lower-casing), for the loaders that then use sentence-transformers itself.
    """

    pooling: str | None = None
    normalize: bool | None = None
    max_seq_length: int | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    transformer_subfolder: str = ""
    similarity: str | None = None  # similarity_fn_name, when the folder declares one
    unsupported_modules: list[str] = field(default_factory=list)


def _read_json(model_name_or_path: str, filename: str) -> dict | list | None:
    """A JSON file of a local folder or Hub repo, or None when it is absent."""
    if os.path.isdir(model_name_or_path):
        path = Path(model_name_or_path, filename)
        if not path.is_file():
            return None
    else:
        try:
            path = hf_hub_download(model_name_or_path, filename)
        except Exception:  # absent file, offline, or not a repo: the caller falls back to defaults
            return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _pooling_mode_from_config(config: dict) -> str | None:
    """The pooling mode of a legacy (``pooling_mode_*_tokens`` booleans) or v6 Pooling config."""
    if config.get("pooling_mode") in POOLING_MODES:
        return config["pooling_mode"]
    for mode, key in _LEGACY_POOLING_KEYS.items():
        if config.get(key):
            return mode
    return None


def read_sentence_transformer_config(model_name_or_path: str) -> SentenceTransformerConfig:
    """Pooling, normalisation, length and prompts of a SentenceTransformer model; empty for a plain HF model."""
    modules = _read_json(model_name_or_path, "modules.json")
    if not modules:
        return SentenceTransformerConfig()
    st = SentenceTransformerConfig(normalize=False)
    for module in modules:
        kind = module["type"].rsplit(".", 1)[-1]
        if kind == "Transformer":
            st.transformer_subfolder = module.get("path", "")
            bert_config = _read_json(model_name_or_path, os.path.join(st.transformer_subfolder, "sentence_bert_config.json")) or {}
            st.max_seq_length = bert_config.get("max_seq_length")
            if bert_config.get("do_lower_case"):
                st.unsupported_modules.append("Transformer(do_lower_case)")
        elif kind == "Pooling":
            pooling_config = _read_json(model_name_or_path, f"{module['path']}/config.json") or {}
            st.pooling = _pooling_mode_from_config(pooling_config)
            if st.pooling is None or pooling_config.get("include_prompt") is False:
                st.unsupported_modules.append(f"Pooling({st.pooling or 'other mode'}, include_prompt="
                                              f"{pooling_config.get('include_prompt', True)})")
        elif kind == "Normalize":
            st.normalize = True
        else:
            st.unsupported_modules.append(kind)
    st_config = _read_json(model_name_or_path, "config_sentence_transformers.json") or {}
    st.prompts = {name: text for name, text in (st_config.get("prompts") or {}).items() if text}
    st.similarity = st_config.get("similarity_fn_name")
    return st


def write_sentence_transformer_files(
    output_dir: str,
    *,
    embedding_dimension: int,
    pooling: str,
    normalize: bool,
    max_seq_length: int,
    query_prefix: str,
    document_prefix: str,
    versions: dict[str, str],
) -> None:
    """Write modules.json, the pooling/normalize folders, sentence_bert_config.json and the prompts.

    The HF encoder and tokenizer must be saved at the root of ``output_dir`` by the caller.
    Prompts are saved under the names ``query`` and ``document`` (sentence-transformers'
    ``encode_query`` / ``encode_document`` use them), so ``encode(text, prompt_name="query")``
    reproduces what training saw.
    """
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    pooling_config = {"word_embedding_dimension": embedding_dimension, "pooling_mode_max_tokens": False,
                      "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
                      "include_prompt": True}
    pooling_config.update({key: mode == pooling for mode, key in _LEGACY_POOLING_KEYS.items()})
    st_config = {
        "__version__": versions,
        "prompts": {QUERY_PROMPT_NAME: query_prefix, DOCUMENT_PROMPT_NAME: document_prefix},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    files = {
        "modules.json": modules,
        "sentence_bert_config.json": {"max_seq_length": max_seq_length, "do_lower_case": False},
        "1_Pooling/config.json": pooling_config,
        "config_sentence_transformers.json": st_config,
    }
    if normalize:
        files["2_Normalize/config.json"] = {}
    for relative, content in files.items():
        path = Path(output_dir, relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
