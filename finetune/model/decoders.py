"""Decoder LLMs as embedders (Qwen2/Qwen3, Llama, Mistral, Gemma, Phi-3 families): what they need of the tokenizer.

An embedding from a causal decoder is the hidden state of the last token, which has seen the whole text.
So every text ends with EOS, batches are padded on the left (the last position is a real token), and a
decoder without a pad token pads with EOS. The EOS is appended by the tokenizer's own post-processor, so
the saved tokenizer does it too and ``SentenceTransformer(path)`` reproduces our embeddings; a tokenizer
that already ends every text with a special token (Qwen3-Embedding's appends ``<|endoftext|>``) is left as
it is.
"""

from __future__ import annotations

import logging

from tokenizers import processors
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger("finetune.model.decoders")

DECODER_TYPES = ("qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text", "phi3")


def is_decoder(config) -> bool:
    """A decoder-only LLM family that this project embeds with last-token pooling."""
    return getattr(config, "model_type", None) in DECODER_TYPES


def appends_eos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer already ends every text with a special token of its own (EOS, or e.g. Qwen3-Embedding's
    ``<|endoftext|>``, which is not its ``eos_token``): then that token is the one the model was trained to pool."""
    ids = tokenizer("an example")["input_ids"]
    plain = tokenizer("an example", add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return bool(ids) and (ids[-1] == tokenizer.eos_token_id or (len(ids) > len(plain) and ids[-1] in special))


def prepare_decoder_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """EOS appended to every text, a pad token (EOS when there is none), left padding. Idempotent."""
    if tokenizer.eos_token is None:
        raise ValueError("A decoder used as an embedder needs an EOS token in its tokenizer (its last-token vector "
                         "is the embedding); this tokenizer has none.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("The tokenizer has no pad token: padding with EOS (%r).", tokenizer.eos_token)
    tokenizer.padding_side = "left"
    if appends_eos(tokenizer):
        return
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("Appending EOS needs a fast tokenizer (tokenizer.json); this one is a slow tokenizer.")
    eos = tokenizer.eos_token
    append = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                           special_tokens=[(eos, tokenizer.eos_token_id)])
    backend.post_processor = (append if backend.post_processor is None
                              else processors.Sequence([backend.post_processor, append]))
    if not appends_eos(tokenizer):
        raise ValueError("Could not make the tokenizer append EOS to every text.")
    logger.info("Decoder: EOS (%r) is appended to every text; left padding; last-token pooling.", eos)


ATTENTION_MODES = ("causal", "bidirectional")


def set_attention(config, attention: str | None) -> None:
    """Make a decoder's attention causal or bidirectional (``None``: leave the checkpoint's own).

    Bidirectional is ``config.is_causal = False``, which transformers' decoders honour in their masks
    and attention kernels; it is saved in config.json, so ``SentenceTransformer(path)`` and
    ``AutoModel`` load the trained model bidirectional too. Encoders (BERT...) are always bidirectional.
    """
    if attention is None:
        return
    if attention not in ATTENTION_MODES:
        raise ValueError(f"--attention must be one of {ATTENTION_MODES}, got {attention!r}.")
    if not is_decoder(config):
        if attention == "causal":
            raise ValueError(f"--attention causal applies to decoder LLMs ({', '.join(DECODER_TYPES)}); "
                             f"a {getattr(config, 'model_type', '?')} encoder attends both ways.")
        return
    config.is_causal = attention == "causal"
    logger.info("Decoder attention: %s.", attention)

