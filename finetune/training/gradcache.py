"""GradCache: the contrastive loss of a large batch in the memory of a mini-batch.

1. ``embed_without_graph``: embed the batch in mini-batches without autograd, remembering each
   mini-batch's RNG state.  2. The caller computes the loss on the full (possibly globally
   gathered) embeddings and its gradient w.r.t. the embeddings.  3. ``backward_through_chunks``:
   re-embed each mini-batch with autograd, replaying its RNG state so dropout masks match step 1,
   and back-propagate the cached embedding gradient. Activations of only one mini-batch are alive
   at a time; the result equals back-propagating the full-batch loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Chunk:
    """One mini-batch and the RNG state its first (no-graph) forward started from."""

    input_ids: torch.Tensor  # (m, T)
    attention_mask: torch.Tensor  # (m, T)
    cpu_rng_state: torch.Tensor
    cuda_rng_state: torch.Tensor | None


@contextlib.contextmanager
def replayed_rng(chunk: Chunk):
    """Run the block with the chunk's RNG state; the global RNG streams are restored afterwards."""
    devices = [torch.cuda.current_device()] if chunk.cuda_rng_state is not None else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(chunk.cpu_rng_state)
        if chunk.cuda_rng_state is not None:
            torch.cuda.set_rng_state(chunk.cuda_rng_state)
        yield


def embed_without_graph(model: Callable, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        mini_batch_size: int) -> tuple[torch.Tensor, list[Chunk]]:
    """Embeddings (N, D), detached, and the chunks to replay. Shapes: input_ids, attention_mask (N, T)."""
    embeddings, chunks = [], []
    for start in range(0, input_ids.shape[0], mini_batch_size):
        chunk = Chunk(input_ids[start:start + mini_batch_size], attention_mask[start:start + mini_batch_size],
                      torch.get_rng_state(), torch.cuda.get_rng_state() if input_ids.is_cuda else None)
        with torch.no_grad():
            embeddings.append(model(chunk.input_ids, chunk.attention_mask))
        chunks.append(chunk)
    return torch.cat(embeddings), chunks


def backward_through_chunks(model: Callable, chunks: list[Chunk], embedding_grads: torch.Tensor,
                            backward: Callable[[torch.Tensor], None],
                            no_sync: Callable[[], contextlib.AbstractContextManager],
                            autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
    """Re-embed each chunk with autograd and back-propagate its slice of ``embedding_grads`` (N, D).

    ``backward`` is e.g. ``accelerator.backward``; ``no_sync`` suppresses the data-parallel gradient
    all-reduce, which then happens once, with the last chunk.
    """
    grads = embedding_grads.split([chunk.input_ids.shape[0] for chunk in chunks])
    for index, (chunk, grad) in enumerate(zip(chunks, grads)):
        sync = index == len(chunks) - 1
        with (contextlib.nullcontext() if sync else no_sync()), replayed_rng(chunk):
            with autocast():
                embedding = model(chunk.input_ids, chunk.attention_mask)
            backward((embedding.float() * grad).sum())  # d(sum emb * g)/d(emb) = g


def accelerator_chunk_hooks(accelerator, model) -> dict[str, Callable]:
    """``backward`` and ``no_sync`` for ``backward_through_chunks`` under an accelerate ``Accelerator``.

    DDP and one process: ``accelerator.backward``, and ``accelerator.no_sync`` around every chunk but the
    last, so gradients are all-reduced once. DeepSpeed ZeRO reduces (and, stage 2/3, partitions) gradients
    itself, and ``accelerator.backward`` also steps the engine: inside ``no_sync`` a chunk goes to the
    engine's own backward off the accumulation boundary (gradients accumulate in its partitions), and the
    last chunk goes through ``accelerator.backward``, which sets the boundary and steps. The loss is already
    divided by the accumulation steps, so DeepSpeed does not divide again (``scale_wrt_gas=False``, as the
    Trainer's own step does).
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return {"backward": accelerator.backward, "no_sync": lambda: accelerator.no_sync(model)}
    engine = accelerator.deepspeed_engine_wrapped.engine
    off_boundary = []

    @contextlib.contextmanager
    def no_sync():
        off_boundary.append(True)
        try:
            yield
        finally:
            off_boundary.pop()

    def backward(loss: torch.Tensor) -> None:
        if off_boundary:
            engine.set_gradient_accumulation_boundary(False)
            engine.backward(loss, scale_wrt_gas=False)
        else:
            accelerator.backward(loss, scale_wrt_gas=False)

    return {"backward": backward, "no_sync": no_sync}


def cached_training_step(model: Callable, inputs: dict[str, torch.Tensor], mini_batch_size: int,
                         loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None], *,
                         backward: Callable[[torch.Tensor], None],
                         no_sync: Callable[[], contextlib.AbstractContextManager],
                         autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                         ) -> torch.Tensor | None:
    """One GradCache step over a TripletCollator batch: the full batch's loss, mini-batch memory.

    ``loss_fn(query_emb (B, D), doc_emb (B*(1+k), D))`` is the objective on the detached
    embeddings (it may gather them across processes); it returns None to skip the batch, whose
    backward then carries zero gradients. Returns the detached loss, or None when skipped.
    """
    with autocast():
        query_emb, query_chunks = embed_without_graph(model, inputs["query_input_ids"], inputs["query_attention_mask"],
                                                      mini_batch_size)
        doc_emb, doc_chunks = embed_without_graph(model, inputs["doc_input_ids"], inputs["doc_attention_mask"],
                                                  mini_batch_size)
    query_emb, doc_emb = query_emb.requires_grad_(), doc_emb.requires_grad_()
    loss = loss_fn(query_emb, doc_emb)
    if loss is None:  # skipped: a zero gradient still goes back, as the plain step's zero loss does, so that
        # data-parallel processes all-reduce together and DeepSpeed's engine still steps (and its schedule with it)
        query_grad, doc_grad = torch.zeros_like(query_emb), torch.zeros_like(doc_emb)
    else:
        query_grad, doc_grad = torch.autograd.grad(loss, [query_emb, doc_emb])
    backward_through_chunks(model, query_chunks + doc_chunks, torch.cat([query_grad, doc_grad]),
                            backward=backward, no_sync=no_sync, autocast=autocast)
    return None if loss is None else loss.detach()
