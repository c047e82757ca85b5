"""Helpers for data-parallel processes; each is a no-op (or a plain call) in a single process. Also what composes
with a sharding engine (DeepSpeed, FSDP): :func:`check_sharding_support`; what a process says when another one
of its run died: :func:`peer_failure_message`; and how a command ends: :func:`end_process_group`."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist

logger = logging.getLogger("finetune.training.distributed")
# What gloo/NCCL say when the other end of a collective is gone (killed, out of memory, its machine lost).
PEER_FAILURE_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
                      "ProcessGroupNCCL", "Timed out", "timed out")


class PeerProcessError(RuntimeError):
    """Another process of this run stopped, so this one cannot go on."""


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def end_process_group(exit_code: int = 0) -> None:
    """End a multi-process run cleanly: wait until every process is done; then the main process destroys the
    process groups and returns, and every other process leaves at once with ``exit_code``. A no-op (it returns) in
    a single process; call it last.

    Call it once, when the process finished its work and is about to exit; not after an error (a process that died
    would leave the others waiting in the barrier). Without it the interpreter's own shutdown tears the groups down:
    a gloo worker thread may still hold the last reference to a finished collective's tensors then, and releasing
    them once the interpreter is shutting down aborts the process (SIGABRT, "terminate called without an active
    exception"; about 3 launches in 10 of a 2-process all_gather on CPU, none with the barrier and destroy). Under
    DeepSpeed ZeRO-3 on CPU a non-main process still aborted so once in a few CI runs after both, at the end of its
    teardown; so the other processes, which have nothing left to write or log (wandb and the files are the main
    process's), skip the teardown: output flushed, ``os._exit``. On a GPU, a finished single-GPU DeepSpeed run
    without the destroy stayed alive after saving, NCCL's heartbeat thread failing every second on the launcher's
    closed TCP store, until the benchmark's time limit.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    main = dist.get_rank() == 0
    dist.barrier()
    if not main:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    dist.destroy_process_group()


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


class UnsupportedShardingError(ValueError):
    """An option that does not compose with the sharding engine of the launch (``train.cli``: one line, exit 2)."""


def fsdp_requested(training_args) -> bool:
    """Whether this run will be sharded by FSDP: ``accelerate launch`` with an FSDP config says so in the environment
    (``ACCELERATE_USE_FSDP``), the Python API through ``--fsdp``. Readable before the Trainer exists."""
    return bool(getattr(training_args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_sharding_support(*, gradcache: bool, lora: bool, fsdp: bool) -> None:
    """Refuse, before training, the combinations with a sharding engine that do not work (yet): both compose with
    DeepSpeed ZeRO-2/3, neither with FSDP. Raises ``UnsupportedShardingError``."""
    if gradcache and fsdp:
        raise UnsupportedShardingError("--gradcache_mini_batch_size is not supported with FSDP (its step runs several backward "
                         "passes of its own); use DDP (accelerate_configs/multi_gpu.yaml) or DeepSpeed ZeRO-2/3.")
    if lora and fsdp:
        raise UnsupportedShardingError("--lora_r is not supported with FSDP yet; use DDP (accelerate_configs/multi_gpu.yaml) or "
                         "DeepSpeed ZeRO-2/3 (accelerate_configs/deepspeed_zero2.yaml, deepspeed_zero3.yaml).")


@contextlib.contextmanager
def peer_failure_message(output_dir: str, world_size: int) -> Iterator[None]:
    """Turn a collective that fails because another process of the run died into :class:`PeerProcessError`,
    which says so and that the same command resumes from the last complete checkpoint (logged as well: the
    launcher may stop this process right after)."""
    try:
        yield
    except RuntimeError as error:
        if world_size < 2 or not any(sign in str(error) for sign in PEER_FAILURE_SIGNS):
            raise
        from finetune.training.checkpointing import last_complete_checkpoint

        last = last_complete_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        message = (f"Another process of this run stopped or stopped answering ({str(error).strip().splitlines()[0][:200]}); "
                   "this one stops "
                   "too. Check the first failing process's log, then rerun the same command: it resumes from "
                   + (f"{last}." if last else "the start (no complete checkpoint yet)."))
        logger.error(message)
        raise PeerProcessError(message) from error


def run_command(main) -> None:
    """A command's entry point (``finetune.evaluate``, ``finetune.interpolate``, ``finetune.seeds``): bad input (a
    ValueError of any kind, a missing file) ends with one line ``error: ...`` and exit code 2, not a traceback; a
    finished run ends its process group (:func:`end_process_group`; a no-op in one process)."""
    try:
        main()
    except (FileNotFoundError, NotADirectoryError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    end_process_group()
