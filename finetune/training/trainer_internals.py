"""Every place this project relies on ``transformers.Trainer`` (and accelerate) internals, and why.

The Trainer subclass is short (``finetune.training.trainer``), but what it knows of the Trainer is not all public API. This
list is the one place to read before upgrading transformers or accelerate: ``tests/test_trainer_internals.py``
checks each entry against the installed versions (the method still exists with the parameters we call or
override it with, the attribute or argument still means what we use it for) and fails naming the entry, so an
upgrade that changes one breaks loudly instead of silently changing training.

Each entry: where we use it, what of the internals it uses, and why no public hook serves.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Internal:
    """One dependency on a non-public part of transformers or accelerate."""

    where: str  # our module.function / class.method
    uses: str  # the internal: "Trainer._save" ...
    parameters: tuple[str, ...]  # the parameter names we override or call it with (empty: an attribute)
    why: str


TRAINER_INTERNALS = (
    Internal("finetune.training.trainer.EmbeddingTrainer._prepare_inputs", "Trainer._prepare_inputs", ("self", "inputs"),
             "DeepSpeed casts every float input to bf16/fp16; teacher scores must stay fp32 (distillation)."),
    Internal("finetune.training.trainer.EmbeddingTrainer._get_grad_norm", "Trainer._get_grad_norm",
             ("self", "model", "grad_norm"),
             "The non-finite guard reads the gradient norm after the all-reduce; there is no callback between "
             "the norm and the optimizer step that could still skip the step."),
    Internal("finetune.training.trainer.EmbeddingTrainer._get_train_sampler", "Trainer._get_train_sampler",
             ("self", "train_dataset"),
             "Our (epoch, index) samplers draw each example's negatives from the epoch (exact resume); the Trainer "
             "has no public sampler option."),
    Internal("finetune.training.trainer.EmbeddingTrainer._get_eval_sampler", "Trainer._get_eval_sampler",
             ("self", "eval_dataset"), "Sequential evaluation that pads the last batch per process identically."),
    Internal("finetune.training.trainer.EmbeddingTrainer._save", "Trainer._save", ("self", "output_dir", "state_dict"),
             "Saves a SentenceTransformer folder (staged, atomic) instead of the HF layout; receives the gathered "
             "ZeRO-3/FSDP state dict."),
    Internal("finetune.training.trainer.EmbeddingTrainer._save_checkpoint", "Trainer._save_checkpoint",
             ("self", "model", "trial"),
             "Checkpoints are marked complete before old ones are rotated (save_checkpoint_safely)."),
    Internal("finetune.training.checkpointing.save_checkpoint_safely", "TrainingArguments.save_total_limit read by "
             "Trainer._save_checkpoint's rotation", (),
             "Set to None for the duration of the Trainer's save, so that its own rotation is held back; "
             "transformers.trainer_utils.rotate_checkpoints then rotates after the marker."),
    Internal("finetune.training.checkpointing.save_checkpoint_safely", "transformers.trainer_utils.rotate_checkpoints",
             ("output_dir", "save_total_limit", "best_model_checkpoint", "use_mtime"),
             "The Trainer's own rotation, called after the completion marker."),
    Internal("finetune.training.trainer.EmbeddingTrainer._load_from_checkpoint", "Trainer._load_from_checkpoint",
             ("self", "resume_from_checkpoint", "model"),
             "A checkpoint holds SentenceTransformer files (and a LoRA adapter), not the HF layout."),
    Internal("finetune.training.trainer.EmbeddingTrainer._load_best_model", "Trainer._load_best_model", ("self",),
             "Same reason, for --load_best_model_at_end."),
    Internal("finetune.training.trainer.EmbeddingTrainer.evaluation_loop", "Trainer.evaluation_loop",
             ("self", "dataloader", "description", "prediction_loss_only", "ignore_keys", "metric_key_prefix"),
             "Retrieval metrics join the validation loss in the same metrics dict (as sentence-transformers' "
             "evaluator=)."),
    Internal("finetune.data.samplers.epoch_sampler_of", "accelerate's BatchSamplerShard.batch_sampler, "
             "SkipBatchSampler.batch_sampler, DataLoaderShard.base_dataloader / batch_sampler", (),
             "The Trainer's set_epoch does not reach our sampler through SkipBatchSampler(BatchSamplerShard) on a "
             "resumed epoch under several processes; SamplerEpochCallback walks these attributes to find it."),
    Internal("finetune.publishing.hub.SentenceTransformerHubMixin.init_hf_repo", "Trainer.init_hf_repo", ("self", "token"),
             "The repo is created when the SentenceTransformer folder is pushed, by the main process only."),
    Internal("finetune.publishing.hub.SentenceTransformerHubMixin._push_from_checkpoint", "Trainer._push_from_checkpoint",
             ("self", "checkpoint_folder"),
             "The Trainer would upload every checkpoint in the HF layout; we push the final folder and its card."),
)
