"""LoRA adapters (peft) on the encoder: only the adapters train; the saved model has them folded in.

Every save writes plain weights, W + (alpha / r) B A for each adapted layer (``merge_lora_weights``), so the
output loads with ``SentenceTransformer(path)`` without peft, and keeps the adapter itself in
``lora_adapter/`` beside them. With ``save_adapter_only`` the folder holds the adapter at its root instead
(peft's ``adapter_config.json`` + ``adapter_model.safetensors``, no full weights): sentence-transformers loads
the base model that ``base_model_name_or_path`` names and puts the adapter on it. Both are computed from a
state dict (the live one, or the full weights that ZeRO-3 gathers for saving), never from the live layers.
The base weights never change, so resuming is exact: the base model is loaded from ``--model_name_or_path``
again and the checkpoint's adapter weights on top (``load_adapter``).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

ADAPTER_FOLDER = "lora_adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's prefix of the wrapped model's own key names
# The attention and MLP projections of each family (peft's names); other families: every linear layer.
DEFAULT_TARGETS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    **{family: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for family in ("qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text")},
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None  # None: DEFAULT_TARGETS of the model's family
    save_adapter_only: bool = False  # saves hold the adapter (peft format) instead of merged weights

    @property
    def scaling(self) -> float:
        """The factor of the update B A, as peft computes it (without rsLoRA)."""
        return self.alpha / self.r


def add_lora(encoder: nn.Module, settings: LoraSettings) -> nn.Module:
    """The encoder wrapped by peft with LoRA adapters; every other weight frozen."""
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules or DEFAULT_TARGETS.get(encoder.config.model_type, "all-linear")
    if isinstance(targets, tuple):
        targets = list(targets)
    if targets == ["all-linear"]:
        targets = "all-linear"
    # BERT's pooler head is not part of the embedding: an adapter there would get no gradient (and break DDP).
    exclude = ["pooler.dense"] if getattr(encoder, "pooler", None) is not None else None
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
                        exclude_modules=exclude)
    return get_peft_model(encoder, config)


_LORA_KEY = re.compile(r"(?P<layer>.+)\.lora_(?P<part>[AB])\.(?P<adapter>[^.]+)\.weight")


def merge_lora_weights(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Plain weights from the state dict of a LoRA-wrapped model: W + scaling * B A for every adapted layer.

    ``state``: keys as in the peft model's ``state_dict()`` (``base_model.model.<layer>.base_layer.weight``,
    ``<layer>.lora_A.<adapter>.weight`` (r, in), ``<layer>.lora_B.<adapter>.weight`` (out, r)), e.g. the
    full weights gathered under ZeRO-3. Returns the base model's own key names (``<layer>.weight``). The
    update is computed in fp32 and added in the weight's dtype, as peft's merge does. Weights without an
    adapter are the same tensors (no copy).
    """
    merged, adapters = {}, {}
    for key, tensor in state.items():
        if ".lora_" not in key:
            merged[key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")] = tensor
        elif match := _LORA_KEY.fullmatch(key):
            adapters.setdefault((match["layer"], match["adapter"]), {})[match["part"]] = tensor
        else:  # e.g. DoRA magnitudes or embedding adapters: folding them needs more than B A
            raise ValueError(f"Cannot merge the LoRA weight {key!r}: only lora_A / lora_B of linear layers are "
                             "supported.")
    for (layer, adapter), parts in adapters.items():
        target = f"{layer.removeprefix(PEFT_PREFIX)}.weight"
        if set(parts) != {"A", "B"} or target not in merged:
            raise ValueError(f"Incomplete LoRA layer {layer!r} (adapter {adapter!r}) in the state dict: it needs "
                             f"lora_A, lora_B and {layer}.base_layer.weight.")
        weight = merged[target]
        delta = (parts["B"].float() @ parts["A"].float()) * scaling  # (out, r) @ (r, in) -> (out, in)
        merged[target] = weight + delta.to(weight.dtype)
    return merged


def save_adapter(peft_encoder: nn.Module, folder: str, encoder_state: dict[str, torch.Tensor]) -> None:
    """Write the adapter of ``encoder_state`` (keys as in ``peft_encoder.state_dict()``) into ``folder`` in peft's
    format: ``adapter_model.safetensors`` (adapter name removed from the keys) and ``adapter_config.json``
    (``base_model_name_or_path``: the model the encoder was loaded from). What ``PeftModel.save_pretrained``
    writes, without its README.md (the folder may be the model's own root)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    weights = get_peft_model_state_dict(peft_encoder, state_dict=encoder_state)
    save_file({key: tensor.detach().contiguous() for key, tensor in weights.items()},
              os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(peft_encoder.peft_config["default"])
    config.inference_mode = True
    base = type(peft_encoder.get_base_model())
    config.save_pretrained(folder, auto_mapping_dict={"base_model_class": base.__name__,
                                                      "parent_library": base.__module__})


def load_adapter(peft_encoder: nn.Module, folder: str) -> None:
    """Load the adapter weights a checkpoint saved (at its root with ``save_adapter_only``, else in
    ``lora_adapter/``), strictly."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    candidates = (os.path.join(folder, ADAPTER_WEIGHTS), os.path.join(folder, ADAPTER_FOLDER, ADAPTER_WEIGHTS))
    path = next((path for path in candidates if os.path.isfile(path)), None)
    if path is None:
        raise FileNotFoundError(f"{folder} has no LoRA adapter ({ADAPTER_WEIGHTS} or "
                                f"{ADAPTER_FOLDER}/{ADAPTER_WEIGHTS}); it was not saved by a LoRA run with the same "
                                "settings.")
    result = set_peft_model_state_dict(peft_encoder, load_file(path))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [key for key in getattr(result, "missing_keys", []) or [] if ".lora_" in key]
    if unexpected or missing:
        raise ValueError(f"The LoRA adapter in {folder} does not fit this model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}).")
