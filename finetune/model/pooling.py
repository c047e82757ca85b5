"""Pooling of token embeddings into one vector per text (pure torch functions).

Shapes: token_emb (B, T, D), attention_mask (B, T) with 1 for real tokens -> (B, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POOLING_MODES = ("mean", "cls", "lasttoken")


def mean_pool(token_emb: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the real (unmasked) tokens; padding contributes nothing."""
    mask = attention_mask.unsqueeze(-1).to(token_emb.dtype)  # (B, T, 1)
    summed = (token_emb * mask).sum(dim=1)  # (B, D)
    counts = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    return summed / counts


def cls_pool(token_emb: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The first token's vector ([CLS] for BERT; assumes right padding like BERT tokenizers)."""
    return token_emb[:, 0]


def last_token_pool(token_emb: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The vector of each row's last real token, for left- and right-padded batches alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    last = (attention_mask.to(torch.long) * positions).argmax(dim=1)  # (B,) index of last real token
    return token_emb[torch.arange(token_emb.shape[0], device=token_emb.device), last]


_POOLERS = {"mean": mean_pool, "cls": cls_pool, "lasttoken": last_token_pool}


def pool(token_emb: torch.Tensor, attention_mask: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """Pool with ``mode`` (one of POOLING_MODES), then L2-normalise when ``normalize``."""
    if mode not in _POOLERS:
        raise ValueError(f"Unknown pooling mode {mode!r}; expected one of {POOLING_MODES}.")
    emb = _POOLERS[mode](token_emb, attention_mask)
    return F.normalize(emb, p=2, dim=-1) if normalize else emb
