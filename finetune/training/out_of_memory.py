"""Out of GPU memory during training: one message that says what was asked, what would fit and how to lower it.

``explain_out_of_memory`` turns torch's ``OutOfMemoryError`` into ``TrainingOutOfMemoryError`` (``train.cli``
prints it on one line and exits 2). The Trainer writes checkpoints only at save steps, so the last complete
one stays as it was and the same command resumes from it once the settings fit.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

import torch

from finetune.training.checkpointing import last_complete_checkpoint

_TRIED = re.compile(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB)")
_UNITS = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10}


class TrainingOutOfMemoryError(RuntimeError):
    """A training step did not fit in the device's memory."""


def fitting_batch(batch_size: int, peak_bytes: int, tried_bytes: int, static_bytes: int, total_bytes: int) -> int:
    """Queries per device that would fit, assuming activations grow linearly with the batch (an estimate).

    ``peak_bytes + tried_bytes``: what the failing step needed at least; ``static_bytes``: what does not depend on
    the batch (weights, gradients, optimizer state); 10% of the device is kept free for fragmentation.
    """
    activations = max(1, peak_bytes + tried_bytes - static_bytes)
    available = max(0, 0.9 * total_bytes - static_bytes)
    return max(0, int(batch_size * available / activations))


def static_training_bytes(model: torch.nn.Module) -> int:
    """Weights, gradients and AdamW's two moments of the trainable weights, plus the frozen weights."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return trainable * 4 + frozen  # weight + gradient + two fp32 moments (element size 4 under autocast)


def out_of_memory_message(error: Exception, *, batch_size: int, num_documents: int, query_max_length: int,
                          passage_max_length: int, gradcache: int | None, gradient_checkpointing: bool,
                          lora: bool, fitting: int | None, device: str, checkpoint: str | None) -> str:
    match = _TRIED.search(str(error))
    tried = f" (tried to allocate {match.group(1)} {match.group(2)})" if match else ""
    lines = [f"Out of memory on {device}{tried}: {batch_size} queries per device, each with 1 positive and "
             f"{num_documents - 1} hard negative(s), up to {query_max_length} query and {passage_max_length} "
             "document tokens."]
    if fitting is not None:
        lines.append(f"About {fitting} queries per device would fit as the run is set (an estimate).")
    options = []
    if not gradcache:
        chunk = max(1, (fitting or batch_size // 2) * num_documents // 2)
        options.append(f"--gradcache_mini_batch_size {chunk} (same batch and negatives, encoded in chunks)")
    else:
        options.append(f"a smaller --gradcache_mini_batch_size (now {gradcache})")
    if not gradient_checkpointing:
        options.append("--gradient_checkpointing true (recompute activations in the backward pass)")
    if not lora:
        options.append("--lora_r 16 (train adapters only: no gradients or optimizer state for the base weights)")
    options.append("a smaller --per_device_train_batch_size with --gradient_accumulation_steps (fewer negatives)")
    options.append("shorter --passage_max_length")
    lines.append("Lower memory with: " + "; ".join(options) + ".")
    lines.append(f"The last complete checkpoint, {checkpoint}, is unchanged: the same command resumes from it."
                 if checkpoint else "No checkpoint was written yet: the run starts over.")
    return " ".join(lines)


@contextmanager
def explain_out_of_memory(model: torch.nn.Module, model_args, data_args, training_args):
    """Re-raise torch's ``OutOfMemoryError`` as ``TrainingOutOfMemoryError`` with the message above."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        fitting, device = None, "the device"
        if torch.cuda.is_available():
            match = _TRIED.search(str(error))
            tried = int(float(match.group(1)) * _UNITS[match.group(2)]) if match else 0
            static = static_training_bytes(model)
            fitting = fitting_batch(training_args.per_device_train_batch_size, torch.cuda.max_memory_allocated(), tried,
                                    static, torch.cuda.get_device_properties(0).total_memory)
            device = torch.cuda.get_device_name()
        message = out_of_memory_message(
            error, batch_size=training_args.per_device_train_batch_size,
            num_documents=1 + data_args.num_hard_negatives, query_max_length=data_args.query_max_length,
            passage_max_length=data_args.passage_max_length, gradcache=training_args.gradcache_mini_batch_size,
            gradient_checkpointing=training_args.gradient_checkpointing, lora=model_args.lora_r is not None,
            fitting=fitting, device=device, checkpoint=last_complete_checkpoint(training_args.output_dir)
            if os.path.isdir(training_args.output_dir) else None)
        raise TrainingOutOfMemoryError(message) from None
