"""EmbeddingTrainer: a thin ``transformers.Trainer`` subclass.

It encodes queries and documents, gathers the batch (``finetune.objectives.base.gather_batch``) and
calls the objective; the rest is delegated: the GradCache step to ``finetune.training.gradcache``, saving
and checkpoint markers to ``finetune.training.checkpointing``, retrieval metrics to the evaluator it is
handed (``finetune.retrieval.evaluation.RetrievalEvaluator``), the sampler to ``finetune.data.samplers``, the
non-finite checks and component logs to ``finetune.training.monitoring``.
"""

from __future__ import annotations


import torch
from transformers import Trainer

from finetune.training.checkpointing import save_checkpoint_safely, save_staged
from finetune.data.samplers import SamplerEpochCallback, build_eval_sampler, build_train_sampler
from finetune.training.distributed import check_sharding_support
from finetune.training.gradcache import accelerator_chunk_hooks, cached_training_step
from finetune.training.monitoring import ComponentMeter, NonFiniteError, NonFiniteGuard  # noqa: F401 (NonFiniteError: API
from finetune.objectives.base import Objective, batch_for_objective
from finetune.objectives.builtin import build_objective


class EmbeddingTrainer(Trainer):
    """Trainer whose model is a ``finetune.model.embedding_model.EmbeddingModel`` and whose batches come from TripletCollator.

    ``objective``: the loss (default: built from the arguments, ``finetune.objectives.builtin.build_objective``).
    ``evaluator``: when given, every evaluation also calls it on the model and reports its metrics
    (``eval_ndcg@10``...) next to the validation loss, as sentence-transformers' ``evaluator=``.
    """

    def __init__(self, *args, objective: Objective | None = None, evaluator=None, **kwargs):
        super().__init__(*args, **kwargs)
        check_sharding_support(gradcache=bool(self.args.gradcache_mini_batch_size),
                               lora=getattr(self.model, "lora", None) is not None, fsdp=self.is_fsdp_enabled)
        self.objective = objective if objective is not None else build_objective(self.args)
        self.evaluator = evaluator
        self.guard = NonFiniteGuard(self.args)
        self.components = ComponentMeter()
        self.add_callback(SamplerEpochCallback())  # the resumed epoch's order under several processes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        query_emb = model(inputs["query_input_ids"], inputs["query_attention_mask"])  # (B, D)
        doc_emb = model(inputs["doc_input_ids"], inputs["doc_attention_mask"])  # (B*(1+k), D)
        loss = self.objective_loss(query_emb, doc_emb, inputs, training=model.training)
        if loss is None:  # skipped: a zero loss that still reaches every parameter (DDP's reducer expects them)
            loss = (query_emb.sum() + doc_emb.sum()) * 0.0
        return (loss, {"query_emb": query_emb, "doc_emb": doc_emb}) if return_outputs else loss

    def objective_loss(self, query_emb: torch.Tensor, doc_emb: torch.Tensor, inputs: dict,
                       training: bool) -> torch.Tensor | None:
        """The objective's loss of the local queries (against the global batch when training with several processes).

        None when a non-finite training loss is skipped (``--on_non_finite skip``, decided by all
        processes together). Evaluation does not gather: its last batches may differ in size between processes.
        """
        gather = training and self.args.global_in_batch_negatives
        batch = batch_for_objective(self.objective, query_emb, doc_emb, inputs, gather=gather,
                                    backprop=self.args.global_backprop)
        output = self.objective(batch)
        if not training:
            return output.loss
        if not self.guard.check(output.loss, "loss", self.state.global_step + 1):
            return None
        self.components.add(output.components)
        return output.loss

    def _prepare_inputs(self, inputs):
        prepared = super()._prepare_inputs(inputs)  # a new mapping: ``inputs`` keeps the fp32 teacher scores
        if "doc_scores" in inputs:  # DeepSpeed casts float inputs to bf16/fp16; teacher scores stay fp32
            prepared["doc_scores"] = inputs["doc_scores"].to(self.args.device)
        return prepared

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self.args.gradcache_mini_batch_size:
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)

        def scaled_loss(query_emb, doc_emb):
            loss = self.objective_loss(query_emb, doc_emb, inputs, training=True)
            return None if loss is None else loss / self.current_gradient_accumulation_steps

        loss = cached_training_step(model, inputs, self.args.gradcache_mini_batch_size, scaled_loss,
                                    **accelerator_chunk_hooks(self.accelerator, model),
                                    autocast=self.compute_loss_context_manager)
        return torch.zeros((), device=self.args.device) if loss is None else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the objective's components, averaged since the last one
            logs.update(self.components.pop_means())
        super().log(logs, start_time)

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm)
        # Under fp16 the loss scaler skips steps with inf gradients by design; elsewhere they are a fault.
        # The norm is computed after the all-reduce, so every process decides alike without a collective.
        if grad_norm is not None and not self.args.fp16 and not self.is_deepspeed_enabled:
            if not self.guard.check(torch.as_tensor(grad_norm), "gradient norm", self.state.global_step + 1,
                                    collective=False):
                model.zero_grad()
                return torch.zeros(())
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
        if self.evaluator is not None:
            metrics = self.evaluator(self.accelerator.unwrap_model(self.model), device=self.args.device,
                                     autocast=self.compute_loss_context_manager)
            output.metrics.update({f"{metric_key_prefix}_{name}": value for name, value in metrics.items()})
        return output

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return build_train_sampler(dataset, self.args.train_sampling_strategy, self.args.per_device_train_batch_size,
                                   seed=self.args.data_order_seed, world_size=self.args.world_size)

    def _get_eval_sampler(self, eval_dataset):
        sampler = build_eval_sampler(eval_dataset, self.args.per_device_eval_batch_size, self.args.world_size)
        return sampler if sampler is not None else super()._get_eval_sampler(eval_dataset)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write a SentenceTransformer folder, staged (``finetune.training.checkpointing.save_staged``).

        ``state_dict``: the full weights gathered by ZeRO-3/FSDP, if any.
        """
        if self.args.should_save:
            model = self.accelerator.unwrap_model(self.model)
            save_staged(output_dir if output_dir is not None else self.args.output_dir,
                        lambda folder: model.save_pretrained(folder, state_dict=state_dict),
                        extra_files={"training_args.json": self.args.to_json_string()})

    def _save_checkpoint(self, model, trial) -> None:
        """Save as the Trainer does, crash-safe: marked complete, then rotated (``checkpointing.save_checkpoint_safely``)."""
        save_checkpoint_safely(self, lambda: super(EmbeddingTrainer, self)._save_checkpoint(model, trial),
                               self._get_output_dir(trial=trial))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model if model is not None else self.model
        self.accelerator.unwrap_model(model).load_encoder_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        self.accelerator.unwrap_model(self.model).load_encoder_weights(self.state.best_model_checkpoint)
