"""LoRA adapters (peft) on the encoder: only the adapters train; the saved model has them folded in.

Every save writes plain weights, W + (alpha / r) B A for each adapted layer (``merged_state_dict``), so the
output loads with ``SentenceTransformer(path)`` without peft, and keeps the adapter itself in
``lora_adapter/`` beside them. The base weights never change, so resuming is exact: the base model is
loaded from ``--model_name_or_path`` again and the checkpoint's adapter weights on top (``load_adapter``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

ADAPTER_FOLDER = "lora_adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
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


def merged_state_dict(peft_encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights with the adapters folded in, under the base model's own key names."""
    from peft.tuners.lora import LoraLayer

    base = peft_encoder.get_base_model()
    state = {name.replace(".base_layer.", "."): tensor.detach() for name, tensor in base.state_dict().items()
             if ".lora_" not in name}  # references: only the adapted weights get new tensors below
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                key = f"{name}.weight"
                state[key] = state[key] + module.get_delta_weight(adapter).to(state[key].dtype)
    return state


def save_adapter(peft_encoder: nn.Module, output_dir: str) -> None:
    peft_encoder.save_pretrained(os.path.join(output_dir, ADAPTER_FOLDER))


def load_adapter(peft_encoder: nn.Module, folder: str) -> None:
    """Load the adapter weights a checkpoint saved (``lora_adapter/``), strictly."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = os.path.join(folder, ADAPTER_FOLDER, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no LoRA adapter ({ADAPTER_FOLDER}/{ADAPTER_WEIGHTS}); it was not "
                                "saved by a LoRA run with the same settings.")
    result = set_peft_model_state_dict(peft_encoder, load_file(path))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [key for key in getattr(result, "missing_keys", []) or [] if ".lora_" in key]
    if unexpected or missing:
        raise ValueError(f"The LoRA adapter in {folder} does not fit this model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}).")
