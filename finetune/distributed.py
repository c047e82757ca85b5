"""Helpers for data-parallel processes; each is a no-op (or a plain call) in a single process. Also what composes
with a sharding engine (DeepSpeed, FSDP): :func:`check_sharding_support`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def encode_sharded(encode: Callable[[list[str]], torch.Tensor], texts: list[str], device: torch.device) -> torch.Tensor:
    """Encode ``texts`` with every process doing one contiguous shard; returns all (N, D) rows, in order, on CPU.

    Shards are padded to equal size (repeating a text) so that every rank runs the same number of
    forward passes, which ZeRO-3 needs; the padding rows are dropped after the gather.
    """
    rank, size = world()
    if size == 1:
        return encode(texts)
    per_rank = math.ceil(len(texts) / size)
    shard = texts[rank * per_rank:(rank + 1) * per_rank]
    shard = shard + [texts[0]] * (per_rank - len(shard))
    local = encode(shard).to(device)  # (per_rank, D)
    gathered = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(gathered, local)
    return torch.cat(gathered)[:len(texts)].cpu()


GATHER_MODES = ("global", "local")


def gather_rows(tensor: torch.Tensor, backprop: str = "global") -> torch.Tensor:
    """Concatenate every process's (n, D) rows in rank order -> (world*n, D); identity in one process.

    ``global``: gradients flow through every gathered slice back to the process that made it (the
    backward of torch.distributed.nn's all_gather sums what each process computed for a slice), so
    the data-parallel average of the local losses has exactly the gradient of one big batch.
    ``local``: the other processes' slices are constants; only the local slot carries gradient
    (NeMo 2.0's default). Every process must pass the same n.
    """
    if backprop not in GATHER_MODES:
        raise ValueError(f"Unknown gather backprop {backprop!r}; expected one of {GATHER_MODES}.")
    rank, size = world()
    if size == 1:
        return tensor
    if backprop == "global":
        import torch.distributed.nn.functional as dist_nn

        return torch.cat(dist_nn.all_gather(tensor.contiguous()))
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[rank] = tensor
    return torch.cat(parts)


def check_sharding_support(*, gradcache: bool, lora: bool, deepspeed: bool, fsdp: bool) -> None:
    """Refuse, before training, the combinations with a sharding engine that do not work (yet)."""
    if gradcache and fsdp:
        raise ValueError("--gradcache_mini_batch_size is not supported with FSDP (its step runs several backward "
                         "passes of its own); use DDP (accelerate_configs/multi_gpu.yaml) or DeepSpeed ZeRO-2/3.")
    if lora and fsdp:
        raise ValueError("--lora_r is not supported with FSDP yet; use DDP (accelerate_configs/multi_gpu.yaml) or "
                         "DeepSpeed ZeRO-2/3 (accelerate_configs/deepspeed_zero2.yaml, deepspeed_zero3.yaml).")
