"""EmbeddingTrainer: a thin ``transformers.Trainer`` subclass for the ranking loss.

It encodes queries and documents, calls ``finetune.losses.ranking_loss`` and saves every
checkpoint and the final model as a complete SentenceTransformer folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch
from transformers import Trainer

from finetune.data import EpochShuffleSampler, LengthGroupedEpochSampler, example_lengths
from finetune.distributed import encode_sharded, gather_rows, world
from finetune.evaluation import RetrievalSet, evaluate_retrieval
from finetune.gradcache import backward_through_chunks, embed_without_graph
from finetune.losses import ranking_loss


logger = logging.getLogger("finetune.trainer")

CHECKPOINT_COMPLETE = "checkpoint_complete.json"  # written last: a checkpoint without it was cut short


class NonFiniteError(RuntimeError):
    """The loss or the gradients became inf/NaN."""


def write_json_atomic(path: str, content: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(content, handle)
    os.replace(tmp, path)


def move_into_place(staging: str, output_dir: str, last: str) -> None:
    """Move every entry of ``staging`` into ``output_dir`` (replacing), ``last`` at the very end; remove ``staging``."""
    if os.path.exists(os.path.join(output_dir, last)):
        os.remove(os.path.join(output_dir, last))  # the folder stops looking complete until the move ends
    names = sorted(os.listdir(staging), key=lambda name: name == last)
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)


class EmbeddingTrainer(Trainer):
    """Trainer whose model is a ``finetune.modeling.EmbeddingModel`` and whose batches come from TripletCollator.

    ``retrieval_set``: when given, every evaluation also ranks its corpus and reports retrieval
    metrics (``eval_ndcg@10``...) next to the validation loss.
    """

    def __init__(self, *args, retrieval_set: RetrievalSet | None = None, query_max_length: int | None = None,
                 passage_max_length: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.gradcache_mini_batch_size and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise ValueError("--gradcache_mini_batch_size is not supported with DeepSpeed or FSDP yet "
                             "(it back-propagates several times per step); use DDP, or grow the batch without it.")
        self.retrieval_set = retrieval_set
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        query_emb = model(inputs["query_input_ids"], inputs["query_attention_mask"])  # (B, D)
        doc_emb = model(inputs["doc_input_ids"], inputs["doc_attention_mask"])  # (B*(1+k), D)
        loss = self.loss_from_embeddings(query_emb, doc_emb, inputs["doc_keys"], gather=model.training)
        if model.training:
            loss = self._guard_non_finite(loss, "loss", fallback=lambda: (query_emb.sum() + doc_emb.sum()) * 0.0)
        return (loss, {"query_emb": query_emb, "doc_emb": doc_emb}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.args.gradcache_mini_batch_size:
            return super().training_step(model, inputs, num_items_in_batch)
        return self._cached_training_step(model, inputs)

    def _cached_training_step(self, model, inputs) -> torch.Tensor:
        """GradCache (``finetune.gradcache``): the full (global) batch's loss, mini-batch memory."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        size = self.args.gradcache_mini_batch_size
        with self.compute_loss_context_manager():
            query_emb, query_chunks = embed_without_graph(model, inputs["query_input_ids"],
                                                          inputs["query_attention_mask"], size)
            doc_emb, doc_chunks = embed_without_graph(model, inputs["doc_input_ids"], inputs["doc_attention_mask"], size)
        query_emb, doc_emb = query_emb.requires_grad_(), doc_emb.requires_grad_()
        loss = self.loss_from_embeddings(query_emb, doc_emb, inputs["doc_keys"], gather=True)
        loss = self._guard_non_finite(loss, "loss", fallback=lambda: None)
        if loss is None:  # skipped batch: no gradient at all
            return torch.zeros((), device=self.args.device)
        loss = loss / self.current_gradient_accumulation_steps
        query_grad, doc_grad = torch.autograd.grad(loss, [query_emb, doc_emb])
        backward_through_chunks(model, query_chunks + doc_chunks, torch.cat([query_grad, doc_grad]),
                                backward=self.accelerator.backward,
                                no_sync=lambda: self.accelerator.no_sync(model),
                                autocast=self.compute_loss_context_manager)
        return loss.detach()

    def loss_from_embeddings(self, query_emb: torch.Tensor, doc_emb: torch.Tensor, doc_keys: torch.Tensor,
                             gather: bool) -> torch.Tensor:
        """The ranking loss of the local queries; with ``gather`` and several processes, against the global batch.

        Shapes: query_emb (B, D), doc_emb (B*(1+k), D), doc_keys (B*(1+k),). Evaluation does not gather
        (its last batches may differ in size between processes).
        """
        rank, size = world() if gather and self.args.global_in_batch_negatives else (0, 1)
        if size > 1:
            doc_emb = gather_rows(doc_emb, self.args.global_backprop)  # (S*B*(1+k), D)
            doc_keys = gather_rows(doc_keys, "local")  # int keys carry no gradient
        return ranking_loss(query_emb, doc_emb, doc_keys, num_negatives=doc_emb.shape[0] // size // query_emb.shape[0] - 1,
                            scale=self.args.scale, mode=self.args.hard_negatives_mode, shard_index=rank, num_shards=size)

    def _guard_non_finite(self, value: torch.Tensor, what: str, fallback):
        """Stop (default) or skip when ``value`` is inf/NaN, naming the step and the likely causes."""
        if torch.isfinite(value).all():
            return value
        step = self.state.global_step + 1
        causes = (f"temperature {self.args.temperature} (scale {self.args.scale:g}) too low, "
                  f"{'fp16 overflow (try --bf16), ' if self.args.fp16 else ''}"
                  f"learning rate {self.args.learning_rate:g} too high, or inf/NaN weights in the model")
        if self.args.on_non_finite == "skip":
            logger.warning("Non-finite %s at step %d: skipping this batch (likely causes: %s).", what, step, causes)
            return fallback()
        raise NonFiniteError(f"Non-finite {what} ({value.float().max().item()}) at step {step}. Likely causes: {causes}. "
                             "Pass --on_non_finite skip to skip such batches instead.")

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        # Under fp16 the loss scaler skips steps with inf gradients by design; elsewhere they are a fault.
        if grad_norm is not None and not self.args.fp16 and not self.is_deepspeed_enabled:
            norm = torch.as_tensor(grad_norm)

            def zero_gradients():
                model.zero_grad()
                return torch.zeros(())

            grad_norm = self._guard_non_finite(norm, "gradient norm", fallback=zero_gradients)
        return grad_norm

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Validation loss only (NeMo's validation metric); there are no labels or logits to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.retrieval_set is not None:
            metrics = self.retrieval_metrics()
            output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in metrics.items()})
        return output

    def retrieval_metrics(self) -> dict[str, float]:
        """Encode the retrieval set (sharded over processes, prefixes and lengths as in training) and score it."""
        model = self.accelerator.unwrap_model(self.model)
        batch_size = self.args.per_device_eval_batch_size

        def encoder(prefix: str, max_length: int | None):
            def encode(texts: list[str]) -> torch.Tensor:
                with self.compute_loss_context_manager():
                    return model.encode(texts, prefix=prefix, max_length=max_length, batch_size=batch_size)
            return lambda texts: encode_sharded(encode, texts, self.args.device)

        return evaluate_retrieval(encoder(model.query_prefix, self.query_max_length),
                                  encoder(model.passage_prefix, self.passage_max_length), self.retrieval_set)

    def _get_train_sampler(self, train_dataset=None):
        """``--train_sampling_strategy`` (validated by the arguments): random, group_by_length or sequential.

        Every sampler yields ``(epoch, index)`` keys for TripletDataset.
        """
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if self.args.train_sampling_strategy == "group_by_length":
            return LengthGroupedEpochSampler(example_lengths(dataset.tokenized), self.args.per_device_train_batch_size,
                                             seed=seed)
        return EpochShuffleSampler(len(dataset), seed=seed, shuffle=self.args.train_sampling_strategy != "sequential")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write a SentenceTransformer folder (``state_dict``: full weights gathered by ZeRO-3/FSDP, if any).

        Files are written to a staging folder first and moved into place with ``modules.json`` last,
        so a kill during the save never leaves a folder that sentence-transformers would take for a
        complete model.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        staging = os.path.join(output_dir, ".saving")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        self.accelerator.unwrap_model(self.model).save_pretrained(staging, state_dict=state_dict)
        with open(os.path.join(staging, "training_args.json"), "w", encoding="utf-8") as handle:
            handle.write(self.args.to_json_string())
        move_into_place(staging, output_dir, last="modules.json")

    def _save_checkpoint(self, model, trial) -> None:
        """Save as the Trainer does, then mark the checkpoint complete once every process has written its part."""
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            if os.path.isdir(folder):
                write_json_atomic(os.path.join(folder, CHECKPOINT_COMPLETE), {"global_step": self.state.global_step})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model if model is not None else self.model
        self.accelerator.unwrap_model(model).load_encoder_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        self.accelerator.unwrap_model(self.model).load_encoder_weights(self.state.best_model_checkpoint)
