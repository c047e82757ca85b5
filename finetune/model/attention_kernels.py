"""Attention over a pack of sequences: the kernels padding-free encoding can use, and the choice among them.

Every kernel takes the packed queries/keys/values ``(N, H, d)`` / ``(N, H_kv, d)`` of ``B`` sequences laid end
to end (``packing.PackedLayout``: cumulative lengths, the longest length, length groups) and returns ``(N, H, d)``:
each token attends to the tokens of its own sequence only (and, when causal, to the earlier ones).

  flash_attn    flash-attn's ``flash_attn_varlen_func`` (when the package is installed): CUDA, fp16/bf16.
  torch_varlen  PyTorch's fused flash kernel over cumulative lengths: ``torch.nn.attention.varlen.varlen_attn``
                without attention dropout, the same ATen kernel through ``FlashVarlenFunction`` with it (torch's
                function draws no dropout mask). CUDA, fp16/bf16, head size <= 256.
  flex          FlexAttention with a document mask (compiled): CUDA; a fallback where neither of the above runs.
  grouped_sdpa  sequences re-padded into a few groups of similar length, one SDPA call per group: any device and
                dtype; the CPU kernel (on a GPU the per-group calls leave it mostly idle).

``attend`` tries the ``candidates`` in order, skipping those ``unavailable_reason`` rules out for the device, the
dtype, the head size and what is installed (``--attention_kernel`` may name one). The first call of a fused kernel
for a (kernel, dtype, causal, GQA) combination is checked against grouped SDPA on the same inputs with a tolerance
that fits the dtype; a kernel that fails or disagrees is dropped for the rest of the process (logged), and once
none is left ``fused_kernel_available`` tells the model to encode padded sub-batches on the GPU instead.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from typing import Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger("finetune.model.packing")

KERNELS = ("auto", "flash_attn", "torch_varlen", "flex", "grouped_sdpa")
FUSED_KERNELS = ("flash_attn", "torch_varlen", "flex")
# Relative tolerance (difference / largest |value|) of a fused kernel against grouped SDPA on the same inputs, and of
# the packed forward against the padded one (``packing.enable_padding_free``): bf16 keeps 8 bits of mantissa.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.float16: 1e-2, torch.bfloat16: 4e-2}

_preference = "auto"
_failed: dict[str, str] = {}  # kernel -> why it was dropped in this process
_verified: set[tuple] = set()
_logged: set[tuple[str, str]] = set()


def tolerance_for(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, 1e-3)


def set_preference(kernel: str) -> None:
    """``--attention_kernel``: 'auto' or one kernel name for every packed forward of this process."""
    global _preference
    if kernel not in KERNELS:
        raise ValueError(f"--attention_kernel must be one of {KERNELS}, got {kernel!r}.")
    if kernel == "flash_attn" and _flash_attn_function() is None:
        raise ValueError("--attention_kernel flash_attn needs the flash-attn package (pip install flash-attn).")
    _preference = kernel


def reset() -> None:
    """Forget dropped, verified and logged kernels (tests)."""
    _failed.clear()
    _verified.clear()
    _logged.clear()
    _aten_dropout_works.clear()


# ------------------------------------------------------------------------------------------ availability
@functools.lru_cache(maxsize=1)  # a failed import is retried on every call otherwise
def _flash_attn_function():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=1)
def _torch_varlen_function():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=1)
def _flex_function():
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    return flex_attention


def unavailable_reason(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why ``kernel`` cannot run on this device/dtype/head size, or None when it can."""
    if kernel in _failed:
        return f"it failed earlier in this process ({_failed[kernel]})"
    if kernel == "grouped_sdpa":
        return None
    if device.type != "cuda":
        return f"it runs on CUDA only (tensors are on {device.type})"
    half = dtype in (torch.float16, torch.bfloat16)
    if not half and (kernel in ("flash_attn", "torch_varlen") or _preference == "auto"):  # flex runs fp32 when named
        return f"it needs fp16/bf16 (got {dtype}; train with --bf16 true or --fp16 true)"
    if kernel in ("flash_attn", "torch_varlen") and (head_dim > 256 or head_dim % 8):
        return f"head size {head_dim} is not a multiple of 8 up to 256"
    function = {"flash_attn": _flash_attn_function, "torch_varlen": _torch_varlen_function, "flex": _flex_function}
    if function[kernel]() is None:
        return {"flash_attn": "flash-attn is not installed", "torch_varlen": "this torch has no varlen_attn (>= 2.9)",
                "flex": "this torch has no FlexAttention"}[kernel]
    return None


def candidates(device: torch.device) -> tuple[str, ...]:
    """The kernels tried in order on CUDA: the one ``--attention_kernel`` names, or (auto) the fused ones. Off CUDA
    grouped SDPA always (the load-time check runs there before the model moves to its GPU)."""
    if device.type != "cuda":
        return ("grouped_sdpa",)
    return (_preference,) if _preference != "auto" else FUSED_KERNELS


def fused_kernel_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a packed forward here would run a fused kernel (or the user asked for a kernel by name).

    On CUDA without one the model uses padded batches instead of the grouped-SDPA loop (``EmbeddingModel.forward``).
    """
    if device.type != "cuda" or _preference != "auto":
        return True
    return any(unavailable_reason(kernel, device, dtype, head_dim) is None for kernel in FUSED_KERNELS)


# --------------------------------------------------------------------------------------------- kernels
def grouped_sdpa(q, k, v, layout, *, dropout: float, scale: float | None, causal: bool) -> torch.Tensor:
    """(N, H, d) attention by SDPA per length group (``layout.groups``): pads each group to its longest member.

    Causal groups are right-padded, so SDPA's causal mask alone keeps real queries off later tokens and pads.
    """
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    outputs = []
    for group in layout.groups:
        def regroup(tokens: torch.Tensor) -> torch.Tensor:  # (N, h, d) -> (G, h, L, d)
            return tokens.index_select(0, group.gather).view(group.num_sequences, group.length, tokens.shape[1],
                                                             head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(regroup(q), regroup(k), regroup(v),
                                             attn_mask=None if causal else group.key_mask, is_causal=causal,
                                             dropout_p=dropout, scale=scale, enable_gqa=kv_heads != heads)
        out = out.transpose(1, 2).reshape(group.num_sequences * group.length, heads, head_dim)  # from (G, H, L, d)
        outputs.append(out.index_select(0, group.real_slots))
    return torch.cat(outputs).index_select(0, layout.restore)  # (N, H, d) in packed order


def flash_attn_varlen(q, k, v, layout, *, dropout: float, scale: float | None, causal: bool) -> torch.Tensor:
    """flash-attn's varlen kernel (GQA and dropout native)."""
    cu = layout.cu_seqlens
    return _flash_attn_function()(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=layout.max_length,
                                  max_seqlen_k=layout.max_length, dropout_p=dropout, softmax_scale=scale, causal=causal)


class FlashVarlenFunction(torch.autograd.Function):
    """PyTorch's own flash-attention ATen kernels over cumulative lengths, with attention dropout.

    ``varlen_attn`` fixes dropout at 0; SDPA's flash backend calls these same two ops with a dropout probability
    (the backward replays the mask from the returned RNG state), so a padded model's attention dropout is kept.
    """

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_length: int, dropout: float, scale: float | None, causal: bool):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, dropout, causal, False, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused)
        ctx.settings = (max_length, dropout, scale, causal)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, rng_state, unused = ctx.saved_tensors
        max_length, dropout, scale, causal = ctx.settings
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, max_length, max_length, dropout, causal,
            rng_state, unused, scale=scale)
        return dq, dk, dv, None, None, None, None, None


@functools.lru_cache(maxsize=4)
def _parameters_of(function) -> frozenset[str]:
    """The parameter names of ``function`` (read once: every layer of every forward asks)."""
    return frozenset(inspect.signature(function).parameters)


def _varlen_call(q: torch.Tensor, scale: float | None, causal: bool, gqa: bool) -> tuple[torch.Tensor, dict]:
    """The query and keywords for this torch's ``varlen_attn``: causality as ``is_causal`` (2.9) or ``window_size``
    (later), ``enable_gqa`` where it exists (older versions pass fewer key/value heads through unchecked), and a
    scale folded into the query where there is no ``scale`` keyword."""
    parameters = _parameters_of(_torch_varlen_function())
    keywords = {}
    if "is_causal" in parameters:
        keywords["is_causal"] = causal
    elif causal:
        keywords["window_size"] = (-1, 0)
    if gqa and "enable_gqa" in parameters:
        keywords["enable_gqa"] = True
    if "scale" in parameters:
        keywords["scale"] = scale
    elif scale is not None:
        q = q * (scale * q.shape[-1] ** 0.5)  # the kernel's own scale is 1/sqrt(d)
    return q, keywords


_aten_dropout_works: dict[tuple, bool] = {}


def _aten_dropout_probe(q: torch.Tensor, k: torch.Tensor, dropout: float, causal: bool) -> bool:
    """Whether ``FlashVarlenFunction`` runs here: on two small sequences, without dropout it equals ``varlen_attn``,
    with it the backward runs and gives finite gradients. Checked once per (dtype, heads, causal); a failure is
    logged and attention dropout is then left out (``varlen_attn`` has none)."""
    key = (q.dtype, q.shape[1], k.shape[1], q.shape[2], causal)
    if key not in _aten_dropout_works:
        try:
            generator = torch.Generator(device=q.device).manual_seed(0)
            lengths = torch.tensor([5, 11], device=q.device)
            layout = types.SimpleNamespace(cu_seqlens=F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32), max_length=11)
            shapes = [(16, q.shape[1], q.shape[2]), (16, k.shape[1], q.shape[2]), (16, k.shape[1], q.shape[2])]
            probe_q, probe_k, probe_v = (torch.randn(shape, device=q.device, generator=generator).to(q.dtype)
                                         .requires_grad_() for shape in shapes)
            with torch.no_grad():
                exact = torch_varlen(probe_q, probe_k, probe_v, layout, dropout=0.0, scale=None, causal=causal)
                same = FlashVarlenFunction.apply(probe_q, probe_k, probe_v, layout.cu_seqlens, 11, 0.0, None, causal)
            dropped = FlashVarlenFunction.apply(probe_q, probe_k, probe_v, layout.cu_seqlens, 11, dropout, None, causal)
            dropped.float().square().sum().backward()
            works = (torch.allclose(same.float(), exact.float(), atol=1e-2, rtol=1e-2)
                     and all(torch.isfinite(t.grad).all() for t in (probe_q, probe_k, probe_v)))
            why = "it disagrees with varlen_attn or gives non-finite gradients"
        except Exception as error:  # noqa: BLE001 (private ATen ops of another torch version: any error counts)
            works, why = False, f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
        _aten_dropout_works[key] = works
        if not works:
            logger.warning("PyTorch's flash kernels with attention dropout do not run here (%s): the fused kernel "
                           "runs without attention-probability dropout (hidden dropout is unchanged).", why)
    return _aten_dropout_works[key]


def torch_varlen(q, k, v, layout, *, dropout: float, scale: float | None, causal: bool) -> torch.Tensor:
    """PyTorch's fused varlen flash kernel: ``varlen_attn`` (no dropout), ``FlashVarlenFunction`` with dropout."""
    cu = layout.cu_seqlens
    if dropout > 0 and _aten_dropout_probe(q, k, dropout, causal):
        return FlashVarlenFunction.apply(q, k, v, cu, layout.max_length, dropout, scale, causal)
    q, keywords = _varlen_call(q, scale, causal, k.shape[1] != q.shape[1])
    return _torch_varlen_function()(q, k, v, cu, cu, layout.max_length, layout.max_length, **keywords)


_compiled_flex = None


def flex(q, k, v, layout, *, dropout: float, scale: float | None, causal: bool) -> torch.Tensor:
    """FlexAttention with a document mask (no attention dropout), compiled once on CUDA."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask

    documents = layout.document_ids()  # (N,)

    def same_document(batch, head, query_index, key_index):
        keep = documents[query_index] == documents[key_index]
        return keep & (query_index >= key_index) if causal else keep

    tokens = q.shape[0]
    mask = create_block_mask(same_document, None, None, tokens, tokens, device=q.device)
    function = _flex_function()
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(function, dynamic=True)
        function = _compiled_flex
    out = function(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=mask,
                   scale=scale, enable_gqa=k.shape[1] != q.shape[1])  # (1, H, N, d)
    return out[0].transpose(0, 1)


KERNEL_FUNCTIONS: dict[str, Callable] = {"flash_attn": flash_attn_varlen, "torch_varlen": torch_varlen, "flex": flex,
                                         "grouped_sdpa": grouped_sdpa}


# ---------------------------------------------------------------------------------------------- choice
def _agrees(name: str, q, k, v, layout, scale, causal) -> tuple[bool, str]:
    """The kernel's output == grouped SDPA's on these inputs (no dropout, no grad), within the dtype's tolerance."""
    with torch.no_grad():
        reference = grouped_sdpa(q, k, v, layout, dropout=0.0, scale=scale, causal=causal).float()
        result = KERNEL_FUNCTIONS[name](q, k, v, layout, dropout=0.0, scale=scale, causal=causal).float()
    difference = (result - reference).abs().max().item() / max(1e-6, reference.abs().max().item())
    return difference <= tolerance_for(q.dtype), f"disagrees with grouped SDPA (relative difference {difference:.2e})"


def _drop(name: str, why: str) -> None:
    _failed[name] = why
    logger.warning("Padding-free attention kernel %s dropped: %s.", name, why)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, *, dropout: float, scale: float | None,
           causal: bool) -> torch.Tensor:
    """Packed attention (N, H, d) with the first kernel of ``candidates`` that runs here and agrees with grouped SDPA.

    A kernel named by ``--attention_kernel`` that cannot run here raises; 'auto' falls back to grouped SDPA.
    """
    if torch.is_autocast_enabled(q.device.type):  # as SDPA under autocast: Qwen3's fp32 RMSNorm makes q/k fp32
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    elif not q.dtype == k.dtype == v.dtype:
        q, k, v = q.to(v.dtype), k.to(v.dtype), v
    head_dim = q.shape[-1]
    for name in candidates(q.device):
        reason = unavailable_reason(name, q.device, q.dtype, head_dim)
        if reason is not None:
            if _preference != "auto":
                raise RuntimeError(f"--attention_kernel {name} cannot run here: {reason}.")
            continue
        key = (name, q.dtype, causal, k.shape[1] != q.shape[1], q.device.type)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if name != "grouped_sdpa" and key not in _verified:
            try:
                agrees, detail = _agrees(name, q, k, v, layout, scale, causal)
            except Exception as error:  # noqa: BLE001 (a kernel that does not run here: any error drops it)
                agrees, detail = False, f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
            if not agrees:
                _drop(name, detail)
                continue
            _verified.add(key)
        if (name, q.device.type) not in _logged:
            _logged.add((name, q.device.type))
            logger.info("Padding-free attention kernel: %s (%s, %s).", name, q.device, q.dtype)
        return KERNEL_FUNCTIONS[name](q, k, v, layout, dropout=dropout, scale=scale, causal=causal)
    if _preference != "auto":
        raise RuntimeError(f"--attention_kernel {_preference} was dropped: {_failed.get(_preference)}.")
    if ("grouped_sdpa", q.device.type) not in _logged:
        _logged.add(("grouped_sdpa", q.device.type))
        (logger.warning if q.is_cuda else logger.info)(
            "Padding-free attention kernel: grouped_sdpa (%s, %s)%s.", q.device, q.dtype,
            ": no fused kernel runs here, one SDPA call per length group" if q.is_cuda else "")
    return grouped_sdpa(q, k, v, layout, dropout=dropout, scale=scale, causal=causal)


def chosen_kernel(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """The kernel ``attend`` would try first here (for logs and reports; verification may still drop it)."""
    for name in candidates(device):
        if unavailable_reason(name, device, dtype, head_dim) is None:
            return name
    return "grouped_sdpa" if _preference == "auto" else f"{_preference} (unavailable)"
