"""The embedding model: a Hugging Face encoder followed by pooling and optional L2 normalisation.

``EmbeddingModel(input_ids (B, T), attention_mask (B, T)) -> (B, D)``. It loads any HF encoder
or SentenceTransformer folder/repo and saves a complete SentenceTransformer folder.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from finetune.model.decoders import is_decoder, prepare_decoder_tokenizer, set_attention
from finetune.model.lora import ADAPTER_FOLDER, LoraSettings, add_lora, load_adapter, merge_lora_weights, save_adapter
from finetune.model import attention_kernels
from finetune.model.packing import enable_padding_free, encode_length_grouped, encode_packed
from finetune.model.pooling import pool
from finetune.model.st_layout import read_sentence_transformer_config, write_sentence_transformer_files
from finetune.data.text import TextSide

logger = logging.getLogger("finetune.model.embedding_model")


def _load_encoder(model_name_or_path: str, subfolder: str, trust_remote_code: bool) -> nn.Module:
    """AutoModel with any pooler head frozen.

    The pooler (BERT's dense layer on [CLS]) is not used by the embedding, so its weights would get
    no gradient and break DDP's unused-parameter check. Freezing it (rather than dropping it) keeps
    its weights in the saved model, so every loader sees a complete checkpoint.
    """
    kwargs = {"trust_remote_code": trust_remote_code}
    if subfolder:
        kwargs["subfolder"] = subfolder
    encoder = AutoModel.from_pretrained(model_name_or_path, **kwargs)
    # transformers' ZeRO-3 loader keeps every legacy weight rename (used or not) and saving reverses
    # them, which would write LayerNorm.gamma/beta; keep only the renames this checkpoint needed.
    if getattr(encoder, "_weight_conversions", None):
        encoder._weight_conversions = [c for c in encoder._weight_conversions if c.was_used()]
    pooler = getattr(encoder, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)
    return encoder


class ModelLoadError(ValueError):
    """A model path or id that does not give an encoder and its tokenizer."""

    def __init__(self, model_name_or_path: str, what: str, cause: Exception):
        where = ("the local folder" if os.path.isdir(model_name_or_path) else
                 "a Hub id or path that does not exist" + (" (HF_HUB_OFFLINE=1: the Hub is not asked)"
                                                           if os.environ.get("HF_HUB_OFFLINE") == "1" else ""))
        first_line = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"--model_name_or_path {model_name_or_path!r} ({where}) has {what}: {first_line}. "
                         "Give a folder with config.json, the weights and the tokenizer files, or a Hub model id.")


class EmbeddingModel(nn.Module):
    """Encoder + pooling (+ normalisation), with the metadata needed to save a SentenceTransformer.

    ``query_prefix``/``document_prefix`` and ``max_seq_length`` are only written on save (as the
    ``query``/``document`` prompts); the data pipeline applies prompts and truncation
    (``finetune.data.text``) before tokens reach ``forward``. Similarity is cosine, as in training.
    ``padding_free``: run the encoder on real tokens only (``finetune.model.packing``) when the model
    supports it; the embeddings are the same as with padded batches; ``attention_kernel`` picks its attention
    kernel ('auto' or a name of ``finetune.model.attention_kernels.KERNELS``). ``lora``: train LoRA adapters
    only (``finetune.model.lora``); saves fold them into plain weights.
    """

    def __init__(self, encoder: nn.Module, tokenizer: PreTrainedTokenizerBase, *, pooling: str, normalize: bool,
                 query_prefix: str = "", document_prefix: str = "", max_seq_length: int = 512,
                 padding_free: bool = False, lora: LoraSettings | None = None, attention_kernel: str = "auto"):
        super().__init__()
        attention_kernels.set_preference(attention_kernel)
        self.position_rule = enable_padding_free(encoder, max_seq_length) if padding_free else None
        self.lora = lora
        self.encoder = add_lora(encoder, lora) if lora is not None else encoder
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.query_prefix = query_prefix
        self.document_prefix = document_prefix
        self.max_seq_length = max_seq_length

    @classmethod
    def from_pretrained(cls, model_name_or_path: str, *, pooling: str | None = None, normalize: bool | None = None,
                        trust_remote_code: bool = False, padding_free: bool = False, lora: LoraSettings | None = None,
                        attention: str | None = None, attention_kernel: str = "auto",
                        **metadata) -> "EmbeddingModel":
        """Load an HF encoder or a SentenceTransformer; ``None`` options come from its ST config.

        Defaults for a plain HF encoder: mean pooling with normalisation; for a decoder LLM
        (``finetune.model.decoders``): last-token pooling, EOS appended, left padding, normalisation, and
        the checkpoint's own attention unless ``attention`` ("causal"/"bidirectional") says otherwise.
        """
        st = read_sentence_transformer_config(model_name_or_path)
        try:
            encoder = _load_encoder(model_name_or_path, st.transformer_subfolder, trust_remote_code)
        except (OSError, ValueError) as error:
            raise ModelLoadError(model_name_or_path, "no loadable model", error) from None
        tokenizer_kwargs = {"subfolder": st.transformer_subfolder} if st.transformer_subfolder else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code,
                                                      **tokenizer_kwargs)
        except (OSError, ValueError, TypeError) as error:
            raise ModelLoadError(model_name_or_path, "no tokenizer", error) from None
        vocab_size = getattr(encoder.config, "vocab_size", None)
        if vocab_size and len(tokenizer) < vocab_size // 2:
            # transformers builds an empty tokenizer (special tokens only) when the files are missing.
            raise ModelLoadError(model_name_or_path, "no tokenizer", ValueError(
                f"the tokenizer found knows {len(tokenizer)} tokens for a model with {vocab_size} embeddings "
                "(tokenizer.json / vocab files missing?)"))
        decoder = is_decoder(encoder.config)
        set_attention(encoder.config, attention)  # before the padding-free check: it compares with this attention
        if decoder:
            try:
                prepare_decoder_tokenizer(tokenizer)  # EOS appended, pad token, left padding (finetune.model.decoders)
            except ValueError as error:
                raise ModelLoadError(model_name_or_path, "a tokenizer unfit for a decoder embedder", error) from None
        pooling = pooling or st.pooling or ("lasttoken" if decoder else "mean")
        normalize = normalize if normalize is not None else (st.normalize if st.normalize is not None else True)
        return cls(encoder, tokenizer, pooling=pooling, normalize=normalize, padding_free=padding_free, lora=lora,
                   attention_kernel=attention_kernel, **metadata)

    @property
    def config(self):
        """The encoder's HF config (the Trainer's DeepSpeed integration sizes its buckets from hidden_size)."""
        return self.encoder.config

    @property
    def _no_split_modules(self) -> list[str]:
        """The encoder's own block classes (``BertLayer``, ``Qwen3DecoderLayer``...): accelerate's FSDP
        ``TRANSFORMER_BASED_WRAP`` wraps one per unit when the config names none."""
        return sorted(getattr(self.encoder, "_no_split_modules", None) or [])

    @property
    def similarity(self) -> str:
        """The similarity the saved model declares (``similarity_fn_name``): cosine, as the ranking loss scores."""
        return "cosine"

    @property
    def embedding_dimension(self) -> int:
        return self.encoder.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Shapes: input_ids, attention_mask (B, T) -> embeddings (B, D).

        Padding-free models pack the batch where a fused attention kernel runs (any CPU; on CUDA in fp16/bf16);
        on CUDA without one they encode padded sub-batches of similar length instead (``encode_length_grouped``).
        """
        if self.position_rule is not None and self._packs_on(input_ids.device):
            token_emb = encode_packed(self.encoder, input_ids, attention_mask, self.position_rule)  # (B, T, D)
        elif self.position_rule is not None:
            token_emb = encode_length_grouped(self.encoder, input_ids, attention_mask, self.position_rule)
        else:
            token_emb = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(token_emb, attention_mask, self.pooling, self.normalize)

    def _packs_on(self, device: torch.device) -> bool:
        """Whether a packed forward runs a fused kernel here (always on CPU): the compute dtype is autocast's when
        it is on, else the weights' (DeepSpeed's bf16 weights)."""
        if device.type != "cuda":
            return True
        dtype = (torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda")
                 else next(self.encoder.parameters()).dtype)
        config = self.encoder.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        fused = attention_kernels.fused_kernel_available(device, dtype, head_dim)
        if not fused and not getattr(self, "_logged_padded_fallback", False):
            self._logged_padded_fallback = True
            logger.warning("No fused variable-length attention kernel for %s on %s (%s): padded sub-batches grouped "
                           "by length instead of packing (train with --bf16 true, or install flash-attn).",
                           dtype, torch.cuda.get_device_name(device), ", ".join(
                               f"{name}: {attention_kernels.unavailable_reason(name, device, dtype, head_dim)}"
                               for name in attention_kernels.FUSED_KERNELS))
        return fused

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **options) -> None:
        """Called by the Trainer for ``--gradient_checkpointing`` (transformers 5: ``every_n_layers``, ``offload``)."""
        if self.lora is not None:  # frozen embeddings: the checkpointed blocks still need an input with grad
            self.encoder.enable_input_require_grads()
        self.encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs,
                                                     **options)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **options) -> None:
        """The older name (transformers < 5 and callers that still use it)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **options)

    def encoder_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The encoder's weights with HF key names, from this model or from a full (gathered) state dict."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        return {key.removeprefix("encoder."): value for key, value in state_dict.items() if key.startswith("encoder.")}

    def save_pretrained(self, output_dir: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write a complete SentenceTransformer folder: HF weights + tokenizer at the root, ST files around them.

        ``state_dict`` (keys as in ``self.state_dict()``) overrides the live weights, e.g. the
        full weights gathered under ZeRO-3/FSDP. With LoRA, both forms are made from it (``finetune.model.lora``):
        merged plain weights + ``lora_adapter/``, or with ``save_adapter_only`` the adapter alone at the
        root (no config.json: transformers would take the folder for the base model).
        """
        import sentence_transformers
        import transformers

        encoder_state = self.encoder_state_dict(state_dict)
        if self.lora is None:
            self.encoder.save_pretrained(output_dir, state_dict=encoder_state)
        elif self.lora.save_adapter_only:
            save_adapter(self.encoder, output_dir, encoder_state)
        else:  # plain weights with the adapters folded in, and the adapter itself for resuming
            merged = merge_lora_weights(encoder_state, self.lora.scaling)
            self.encoder.get_base_model().save_pretrained(output_dir, state_dict=merged)
            save_adapter(self.encoder, os.path.join(output_dir, ADAPTER_FOLDER), encoder_state)
        self.tokenizer.save_pretrained(output_dir)
        write_sentence_transformer_files(
            output_dir,
            embedding_dimension=self.embedding_dimension,
            pooling=self.pooling,
            normalize=self.normalize,
            max_seq_length=self.max_seq_length,
            query_prefix=self.query_prefix,
            document_prefix=self.document_prefix,
            versions={"sentence_transformers": sentence_transformers.__version__,
                      "transformers": transformers.__version__, "pytorch": torch.__version__},
        )

    def load_encoder_weights(self, folder: str) -> None:
        """Load encoder weights saved by ``save_pretrained`` (single or sharded safetensors), strictly.

        With LoRA only the adapter is loaded: the base weights are the unchanged ones of the base model.
        """
        if self.lora is not None:
            return load_adapter(self.encoder, folder)
        from transformers.trainer_utils import load_sharded_checkpoint
        import safetensors.torch

        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(single):
            self.encoder.load_state_dict(safetensors.torch.load_file(single), strict=True)
        else:
            load_sharded_checkpoint(self.encoder, folder, strict=True)

    @torch.no_grad()
    def encode(self, texts: list[str], side: TextSide | None = None, *, prefix: str = "", max_length: int | None = None,
               batch_size: int = 64) -> torch.Tensor:
        """Embed raw texts exactly as training does (prompt, truncation, pooling): (N, D) fp32 on CPU.

        ``side`` says how texts are tokenized (``finetune.data.text``); without it, ``prefix`` and
        ``max_length`` (default: the model's ``max_seq_length``) describe it.
        """
        side = side or TextSide(prefix, max_length or self.max_seq_length)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = side.tokenize(self.tokenizer, texts[start:start + batch_size], padding=True, return_tensors="pt")
            chunks.append(self(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu())
        self.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0, self.embedding_dimension)
