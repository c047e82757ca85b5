"""Padding-free encoding: run the encoder on the real tokens only, attention per sequence.

A padded batch ``(B, T)`` whose rows hold ``n_i <= T`` real tokens costs ``B * T`` tokens in
every dense layer, although only ``N = sum(n_i)`` of them matter. Here the real tokens are packed
into one row ``(1, N)``; the encoder's own modules run unchanged on it (so DDP, DeepSpeed ZeRO,
FSDP unit wrapping and gradient checkpointing see the usual module calls), and only the attention
is swapped for ``packed_attention``, which hands the packed queries/keys/values and the sequence
boundaries to a kernel (``finetune.model.attention_kernels``): on CUDA a fused variable-length kernel over
the whole pack (flash-attn's or PyTorch's varlen flash attention, FlexAttention with a document mask),
on CPU SDPA per group of similar lengths. Results equal the padded forward up to float rounding;
gradients too. Dropout draws different (equally distributed) masks.

Decoder LLMs take the same path: rotary positions restart at 0 for each packed sequence (rule
"sequence"), attention is causal or bidirectional as the model's config says, and grouped-query
attention keys/values (fewer heads than the queries) go to the kernel as they are.
transformers' own packed-sequence support (position ids that restart) builds one (N, N) mask over
the whole pack for SDPA/eager attention, quadratic in the packed length, so it is not used here.
The layout of a pack (cumulative lengths on the device, lengths on the host) is built once per
forward: one host read of the B lengths, none per layer.

Only models whose attention goes through transformers' attention interface and whose position
ids we can reproduce are supported (``PADDING_FREE_MODEL_TYPES``); ``enable_padding_free`` checks
the packed forward against the padded one on a small batch before it is used.
"""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from finetune.model.attention_kernels import attend, tolerance_for

logger = logging.getLogger("finetune.model.packing")

PACKED_ATTENTION = "finetune_packed_sdpa"
# model_type -> how the positions of real tokens are numbered: "row" = index in the padded row
# (BERT's absolute positions), "count" = padding_idx + 1 + index among real tokens (RoBERTa family),
# "sequence" = index among real tokens from 0 (rotary decoders: only relative positions matter, so
# this equals the padded forward, which numbers left-padded tokens from the row's first slot).
PADDING_FREE_MODEL_TYPES = {"bert": "row", "roberta": "count", "xlm-roberta": "count", "camembert": "count",
                            **{family: "sequence" for family in ("qwen2", "qwen3", "llama", "mistral", "gemma", "phi3")}}
# The layout of the packed forward that is running (None otherwise): unpacking reads it, and the (N, N) mask
# transformers would build for the pack is skipped while it is set. Attention gets the sequence lengths as a
# tensor keyword instead (``packed_lengths``): a compiled model then sees only tensors (no guard on each batch's
# layout), and gradient checkpointing replays the keyword when it recomputes a layer in the backward pass.
_PACKED_LAYOUT: contextvars.ContextVar["PackedLayout | None"] = contextvars.ContextVar("finetune_packed_layout",
                                                                                      default=None)
MAX_ATTENTION_GROUPS = 16  # more groups: less attention padding, more (small) SDPA calls; 16 measured best on CPU
MIN_GROUP_SIZE = 4


@dataclass
class AttentionGroup:
    """Sequences of similar length re-padded together for grouped-SDPA attention (``attention_kernels``).

    ``gather``: (G * L,) indices into the packed tokens (padding slots point at token 0 and are masked);
    ``key_mask``: (G, 1, 1, L) bool, True for real keys, or None when all G sequences have length L;
    ``real_slots``: (n,) positions of the real tokens in the flattened (G * L) group.
    """

    gather: torch.Tensor
    key_mask: torch.Tensor | None
    real_slots: torch.Tensor
    num_sequences: int
    length: int


@dataclass
class PackedLayout:
    """Where each packed token came from and where each sequence of the pack starts.

    ``token_index``: (N,) flat indices into the padded ``B * T`` batch, row-major (None, and ``seq_len`` 0, in
    a layout rebuilt from the lengths for attention only); ``lengths``: (B,) real tokens per sequence (device),
    ``host_lengths`` the same on the host (read once per forward); ``cu_seqlens``: (B + 1,) int32 start of each
    sequence in the pack, then N (the fused kernels' input). The length groups and ``restore`` order of grouped
    SDPA are built on first use only, so a fused kernel never pays for them.
    """

    token_index: torch.Tensor | None
    batch_size: int
    seq_len: int
    cu_seqlens: torch.Tensor
    max_length: int
    lengths: torch.Tensor
    host_lengths: list[int]
    _groups: tuple | None = None

    @property
    def groups(self) -> list[AttentionGroup]:
        if self._groups is None:
            self._groups = _attention_groups(self.lengths, self.host_lengths, self.cu_seqlens[:-1].long())
        return self._groups[0]

    @property
    def restore(self) -> torch.Tensor:
        """(N,) order that turns the concatenated group outputs back into packed order."""
        self.groups  # noqa: B018 (built together)
        return self._groups[1]

    def document_ids(self) -> torch.Tensor:
        """(N,) index of the sequence each packed token belongs to (FlexAttention's document mask)."""
        return torch.repeat_interleave(torch.arange(self.batch_size, device=self.lengths.device), self.lengths,
                                       output_size=sum(self.host_lengths))


def nonzero_indices(flags: torch.Tensor, count: int) -> torch.Tensor:
    """(count,) indices of the True entries of the 1-D ``flags``, whose number the caller knows: no host read where
    ``nonzero_static`` runs on the device (``nonzero`` reads the count back)."""
    try:
        return torch.nonzero_static(flags, size=count).squeeze(1)
    except (RuntimeError, NotImplementedError):
        return flags.nonzero().squeeze(1)


def _attention_groups(lengths: torch.Tensor, host_lengths: list[int],
                      starts: torch.Tensor) -> tuple[list[AttentionGroup], torch.Tensor]:
    """Split sequences (sorted by length) into at most MAX_ATTENTION_GROUPS groups of similar length.

    Index tensors are built with tensor ops (no per-token Python) from the lengths already on the host.
    """
    device = lengths.device
    order_list = sorted(range(len(host_lengths)), key=host_lengths.__getitem__)  # stable, as argsort(stable=True)
    order = torch.tensor(order_list, device=device)
    sorted_lengths = [host_lengths[i] for i in order_list]
    num_groups = max(1, min(MAX_ATTENTION_GROUPS, len(sorted_lengths) // MIN_GROUP_SIZE))
    bounds = [round(i * len(sorted_lengths) / num_groups) for i in range(num_groups + 1)]
    groups, packed_positions = [], []
    for first, last in zip(bounds[:-1], bounds[1:]):
        members = order[first:last]
        length = sorted_lengths[last - 1]  # the group's longest
        offsets = torch.arange(length, device=device)
        positions = starts[members][:, None] + offsets[None]  # (G, L) packed index of each slot
        valid = offsets[None] < lengths[members][:, None]  # (G, L)
        uniform = sorted_lengths[first] == length
        real = sum(sorted_lengths[first:last])
        groups.append(AttentionGroup(torch.where(valid, positions, 0).reshape(-1),
                                     None if uniform else valid[:, None, None, :],
                                     nonzero_indices(valid.reshape(-1), real), last - first, length))
        packed_positions.append(positions.reshape(-1)[groups[-1].real_slots])
    packed_positions = torch.cat(packed_positions)
    restore = torch.empty_like(packed_positions)
    restore[packed_positions] = torch.arange(len(packed_positions), device=device)
    return groups, restore


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_rule: str,
         padding_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor, PackedLayout]:
    """Padded ``(B, T)`` ids and mask -> packed ids ``(1, N)``, position ids ``(1, N)`` and the layout.

    Real tokens may sit anywhere in a row (left or right padding); their order is kept. The B lengths are the
    only values read back to the host (one synchronisation per forward on a GPU).
    """
    if position_rule not in ("row", "count", "sequence"):
        raise ValueError(f"Unknown position rule {position_rule!r}: padding-free encoding is not enabled for this "
                         "model (enable_padding_free returned None); use the padded forward.")
    batch_size, seq_len = input_ids.shape
    real = attention_mask.bool()
    lengths = real.sum(dim=1)
    host_lengths = lengths.tolist()
    token_index = nonzero_indices(real.reshape(-1), sum(host_lengths))  # (N,), no second host read
    if position_rule == "row":
        positions = torch.arange(seq_len, device=input_ids.device).expand(batch_size, seq_len)
    elif position_rule == "count":
        positions = torch.cumsum(real.long(), dim=1) + padding_idx
    else:
        positions = torch.cumsum(real.long(), dim=1) - 1
    packed_ids = input_ids.reshape(-1)[token_index].unsqueeze(0)
    position_ids = positions.reshape(-1)[token_index].unsqueeze(0)
    layout = attention_layout(lengths, host_lengths)
    layout.token_index, layout.seq_len = token_index, seq_len
    return packed_ids, position_ids, layout


def attention_layout(lengths: torch.Tensor, host_lengths: list[int] | None = None) -> PackedLayout:
    """The attention part of a layout from the lengths (B,) alone (reads them to the host unless given)."""
    host_lengths = lengths.tolist() if host_lengths is None else host_lengths
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0), (1, 0)).to(torch.int32)
    return PackedLayout(None, len(host_lengths), 0, cu_seqlens, max(host_lengths, default=0), lengths, host_lengths)


_RECENT_LAYOUTS: tuple = ()  # ((lengths tensor, its layout), ...): the last few packs, newest first
_RECENT_LIMIT = 8


def remember_layout(layout: PackedLayout) -> None:
    """Make ``layout`` the one its lengths tensor finds (``layout_for``). The cache is one tuple, read and replaced
    whole, so threads (nn.DataParallel replicas) never pair one pack's lengths with another's layout."""
    global _RECENT_LAYOUTS
    _RECENT_LAYOUTS = ((layout.lengths, layout),) + tuple(
        entry for entry in _RECENT_LAYOUTS if entry[0] is not layout.lengths)[:_RECENT_LIMIT - 1]


def layout_for(lengths: torch.Tensor) -> PackedLayout:
    """The layout of these lengths: one of the last few packs' (queries, documents, GradCache chunks: a layer
    recomputed by gradient checkpointing in the backward pass finds its forward's), else rebuilt."""
    for key, layout in _RECENT_LAYOUTS:
        if key is lengths:
            return layout
    layout = attention_layout(lengths)
    remember_layout(layout)
    return layout


def unpack(packed: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """Packed token states ``(N, D)`` -> padded ``(B, T, D)`` with zeros at padding."""
    padded = packed.new_zeros(layout.batch_size * layout.seq_len, packed.shape[-1])
    return padded.index_copy(0, layout.token_index, packed).view(layout.batch_size, layout.seq_len, -1)


@torch.compiler.disable
def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function; shapes: query (1, H, N, d), key/value (1, H_kv, N, d) -> (1, N, H, d).

    Causal when the model says so (``is_causal`` keyword, else the module's ``is_causal``). The kernel is chosen by
    ``attention_kernels.attend`` (fused varlen on CUDA, grouped SDPA on CPU). Without a packed forward running (an
    ordinary padded call) it is plain SDPA, so a model switched to it still works for any caller.
    """
    lengths = kwargs.pop("packed_lengths", None)
    if lengths is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    layout = layout_for(lengths)
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", False) if causal is None else causal
    window = kwargs.pop("sliding_window", None)
    if kwargs.get("softcap") is not None or (window is not None and layout.max_length > window):
        raise NotImplementedError("packed attention has no logit soft-capping or sliding window shorter than a text")
    q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))  # (N, H or H_kv, d)
    out = attend(q, k, v, layout, dropout=dropout, scale=scaling, causal=bool(causal))  # (N, H, d) in packed order
    return out.unsqueeze(0), None


def packed_or_sdpa_mask(*args, **kwargs):
    """The mask function of ``PACKED_ATTENTION``: none during a packed forward (groups are masked per group),
    SDPA's otherwise."""
    from transformers.masking_utils import sdpa_mask

    return None if _PACKED_LAYOUT.get() is not None else sdpa_mask(*args, **kwargs)


def register_packed_attention() -> None:
    """Make ``PACKED_ATTENTION`` a valid ``attn_implementation`` (padded calls get SDPA's masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, packed_or_sdpa_mask)


def sliding_window_of(config) -> int | None:
    """The attention window of a model that has sliding-window layers (Mistral, some Qwen configs), else None."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return window


def position_rule_for(encoder: nn.Module, max_length: int | None = None) -> str | None:
    """The position rule for this model, or None when padding-free encoding is not supported.

    ``max_length``: the longest text it will see; a sliding window shorter than that is not supported.
    """
    config = getattr(encoder, "config", None)
    if config is None or getattr(config, "is_decoder", False):  # BERT used as a decoder (cross-attention)
        return None
    if getattr(config, "position_embedding_type", "absolute") not in ("absolute", None):
        return None
    window = sliding_window_of(config)
    if window is not None and (max_length or getattr(config, "max_position_embeddings", 0)) > window:
        return None
    return PADDING_FREE_MODEL_TYPES.get(getattr(config, "model_type", None))


@torch.compiler.disable
def _enter_packed(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_rule: str, padding_idx: int):
    """Pack and make the layout current (outside ``torch.compile``: lengths go to the host)."""
    packed_ids, position_ids, layout = pack(input_ids, attention_mask, position_rule, padding_idx)
    remember_layout(layout)
    return packed_ids, position_ids, layout.lengths, _PACKED_LAYOUT.set(layout)


@torch.compiler.disable
def _exit_packed(hidden: torch.Tensor, token) -> torch.Tensor:
    """Unpack ``hidden`` (N, D) with the current layout, then restore the previous one."""
    try:
        return unpack(hidden, _PACKED_LAYOUT.get())
    finally:
        _PACKED_LAYOUT.reset(token)


def encode_packed(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_rule: str) -> torch.Tensor:
    """Token states ``(B, T, D)`` (zeros at padding) computed on the real tokens only.

    Under ``torch.compile`` only the encoder's own layers are compiled, on ``(1, N)`` packed tensors (N varies,
    so it becomes a dynamic dimension); packing, unpacking and the per-sequence attention run eagerly.
    """
    padding_idx = getattr(encoder.config, "pad_token_id", 0) or 0
    packed_ids, position_ids, lengths, token = _enter_packed(input_ids, attention_mask, position_rule, padding_idx)
    try:
        hidden = encoder(input_ids=packed_ids, position_ids=position_ids, packed_lengths=lengths).last_hidden_state
    except BaseException:
        _PACKED_LAYOUT.reset(token)
        raise
    return _exit_packed(hidden[0], token)


LENGTH_GROUPS = 4  # padded sub-batches per batch where no fused kernel runs on the GPU


def encode_length_grouped(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          position_rule: str, groups: int = LENGTH_GROUPS) -> torch.Tensor:
    """Token states ``(B, T, D)`` (zeros at padding) from padded sub-batches of similar length.

    The GPU fallback where no fused variable-length kernel applies: the rows are sorted by length and split into
    ``groups`` sub-batches, each cut to the columns its real tokens span, so little padding is computed, with
    the encoder's own padded forward (and the same batch composition: only the forward is split). BERT numbers
    positions by column ("row" rule), so its sub-batches keep column 0 and drop trailing columns only.
    """
    lengths = attention_mask.sum(dim=1).tolist()
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    bounds = [round(i * len(order) / groups) for i in range(groups + 1)]
    token_emb = None
    for first, last in zip(bounds[:-1], bounds[1:]):
        if first == last:
            continue
        rows = torch.tensor(order[first:last], device=input_ids.device)
        mask = attention_mask.index_select(0, rows)
        columns = mask.any(dim=0).nonzero().squeeze(1).tolist()
        start = 0 if position_rule == "row" else columns[0]
        end = columns[-1] + 1
        hidden = encoder(input_ids=input_ids.index_select(0, rows)[:, start:end],
                         attention_mask=mask[:, start:end]).last_hidden_state
        if token_emb is None:
            token_emb = hidden.new_zeros(*input_ids.shape, hidden.shape[-1])
        token_emb[rows, start:end] = hidden * mask[:, start:end, None].to(hidden.dtype)
    return token_emb


def enable_padding_free(encoder: nn.Module, max_length: int | None = None) -> str | None:
    """Switch the model to packed attention when supported and verified; returns its position rule or None.

    The check runs a small batch of unequal lengths, padded on the right and on the left, both ways
    (eval mode, no grad) and keeps the padded path, with a warning, if they disagree beyond the tolerance of the
    weights' dtype (``attention_kernels.TOLERANCE``) or the packed forward fails. Skipped under ZeRO-3, whose
    weights are not materialised at load time.
    """
    rule = position_rule_for(encoder, max_length)
    if rule is None:
        logger.info("Padding-free encoding is not available for model type %r: using padded batches.",
                    getattr(encoder.config, "model_type", None))
        return None
    original = encoder.config._attn_implementation
    register_packed_attention()
    try:
        encoder.set_attn_implementation(PACKED_ATTENTION)
    except (ValueError, NotImplementedError, AttributeError) as error:
        logger.info("Padding-free encoding cannot be enabled for this model (%s): using padded batches.", error)
        return None
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return rule
    was_training = encoder.training
    encoder.eval()
    generator = torch.Generator().manual_seed(0)
    vocab = min(encoder.config.vocab_size, 1000)
    input_ids = torch.randint(5, vocab, (3, 9), generator=generator)
    attention_mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [0] * 2 + [1] * 7])
    device = next(encoder.parameters()).device
    pad_id = getattr(encoder.config, "pad_token_id", None) or 0
    input_ids = torch.where(attention_mask.bool(), input_ids, pad_id).to(device)  # RoBERTa counts non-pad ids
    attention_mask = attention_mask.to(device)
    try:
        with torch.no_grad():
            padded = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
            packed = encode_packed(encoder, input_ids, attention_mask, rule).float()
        difference = ((padded - packed) * attention_mask[..., None]).abs().max().item()
        dtype = next(encoder.parameters()).dtype  # bf16 weights differ by rounding alone far more than fp32 ones
        agrees = difference < tolerance_for(dtype) * max(1.0, padded.abs().max().item())
    except (NotImplementedError, RuntimeError, TypeError, ValueError) as error:  # a kernel/argument it lacks
        difference, agrees = float("nan"), False
        logger.info("The packed forward failed for this model: %s", error)
    finally:
        encoder.train(was_training)
    if not agrees:
        encoder.set_attn_implementation(original)
        logger.warning("Padding-free encoding disagrees with the padded forward for this model (max difference "
                       "%.2e): using padded batches.", difference)
        return None
    return rule
