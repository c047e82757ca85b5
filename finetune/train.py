"""Fine-tune an embedding model with a multiple-negatives ranking loss on NeMo SBERT-format data, or a reranker
(``--model_type cross-encoder``) on the same data.

Launch (the default job fine-tunes the packaged all-MiniLM-L6-v2 on the bundled example data):

    accelerate launch finetune/train.py                                  # defaults, 1 process
    python finetune/train.py --train_file data/*.jsonl --output_dir out  # plain python, 1 process
    python finetune/train.py finetune/recipes/minilm_cpu.yaml --max_steps 50  # recipe + overrides

The output directory is a SentenceTransformer folder: ``SentenceTransformer(output_dir)``.
"""

from __future__ import annotations

import logging
import os
import sys

import transformers

from finetune.training.arguments import DataArguments, EmbeddingTrainingArguments, ModelArguments
from finetune.training.checkpointing import CheckpointWriteError, last_complete_checkpoint
from finetune.training.config import ConfigError, launch_defaults, parse_arguments
from finetune.data.blend import BlendedTripletDataset, blocks_consumed, blocks_per_dataset
from finetune.data.examples import TripletCollator
from finetune.training.distributed import (PeerProcessError, UnsupportedShardingError, check_sharding_support,
                                           end_process_group, fsdp_requested, peer_failure_message)
from finetune.publishing.hub import HubPushError, SentenceTransformerHubMixin
from finetune.model.cross_encoder import CrossEncoderModel
from finetune.model.embedding_model import EmbeddingModel, ModelLoadError
from finetune.training.monitoring import NonFiniteError
from finetune.training.out_of_memory import TrainingOutOfMemoryError, explain_out_of_memory
from finetune.data.schema import DataFormatError
from finetune.publishing.sharing import configure_tracking, share
from finetune.training.trainer import EmbeddingTrainer
from finetune.training.reranker_trainer import RerankerTrainer
from finetune.training.inputs import build_training_data, pair_max_length, read_data

logger = logging.getLogger("finetune.train")


class HubEmbeddingTrainer(SentenceTransformerHubMixin, EmbeddingTrainer):
    """EmbeddingTrainer whose --push_to_hub uploads the SentenceTransformer folder and its card (finetune.publishing.hub)."""


class HubRerankerTrainer(SentenceTransformerHubMixin, RerankerTrainer):
    """RerankerTrainer whose --push_to_hub uploads the CrossEncoder folder and its card."""


class OutputDirError(ValueError):
    """The output directory cannot be used as asked."""


def check_writable(output_dir: str) -> None:
    """Fail now, not after hours of training, when the output folder cannot be created or written.

    Probes the folder, or its nearest existing parent when it does not exist yet (creating nothing).
    """
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    probe = os.path.join(existing, f".write-test-{os.getpid()}")
    try:
        if not os.path.isdir(existing):
            raise NotADirectoryError(20, f"{existing} is a file")
        with open(probe, "w", encoding="utf-8") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as error:
        raise OutputDirError(f"Output directory {output_dir!r} cannot be written ({error.strerror or error}); "
                             "choose another --output_dir.") from None


def find_resume_checkpoint(training_args: EmbeddingTrainingArguments) -> str | None:
    """The checkpoint to resume from (NeMo's resume_if_exists), or None to start fresh.

    ``--resume_from_checkpoint PATH`` wins; else the last complete ``checkpoint-*`` in output_dir. A non-empty
    output_dir without checkpoints is refused unless ``--overwrite_output_dir``.
    """
    output_dir = training_args.output_dir
    check_writable(output_dir)
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    if not os.path.isdir(output_dir):
        return None
    last = last_complete_checkpoint(output_dir)
    if last is not None:
        return last
    if os.listdir(output_dir) and not training_args.overwrite_output_dir:
        raise OutputDirError(
            f"Output directory {output_dir!r} is not empty and holds no checkpoint to resume from. "
            "Choose another --output_dir, or pass --overwrite_output_dir true to train over it.")
    return None


def use_all_cores_for_single_cpu_process() -> None:
    """Undo accelerate's one-thread default for a lone CPU process.

    ``accelerate launch`` without ``--num_cpu_threads_per_process`` exports OMP_NUM_THREADS=1, which
    makes a single CPU process use one core (about 2x slower here). With one process and no GPU
    there is nothing to oversubscribe, so use every core we are allowed to run on.
    """
    import torch

    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    single_process = int(os.environ.get("WORLD_SIZE", "1")) == 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if (launched_by_accelerate and single_process and not torch.cuda.is_available()
            and os.environ.get("OMP_NUM_THREADS") == "1" and cores > 1):
        torch.set_num_threads(cores)
        logger.info("Single CPU process: using %d threads instead of accelerate's default of 1.", cores)


def setup_logging(training_args: EmbeddingTrainingArguments) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    # Our own messages at INFO on the main process; transformers keeps its --log_level (default: warnings).
    logging.getLogger("finetune").setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())


def build_datasets(data_args: DataArguments, training_args: EmbeddingTrainingArguments, tokenizer):
    """Validated, tokenized train (and validation) datasets; validation is None when not given."""
    data = build_training_data(read_data(data_args, training_args), data_args, training_args, tokenizer)
    return data.train, data.validation


def run(model_args: ModelArguments, data_args: DataArguments, training_args: EmbeddingTrainingArguments) -> dict:
    """Train, save and evaluate; returns the final metrics (train and, if any, validation)."""
    setup_logging(training_args)
    use_all_cores_for_single_cpu_process()
    defaults = launch_defaults()
    if defaults:
        logger.info("%d processes without CUDA: %s by default (see config.launch_defaults); backend %s.",
                    training_args.world_size, " ".join(defaults), training_args.ddp_backend or "default")
    resume_from = find_resume_checkpoint(training_args)
    check_sharding_support(gradcache=bool(training_args.gradcache_mini_batch_size), lora=model_args.lora is not None,
                           fsdp=fsdp_requested(training_args))  # before the data is read or a model loaded
    # Validate all data before the model is loaded: a bad record should cost seconds, not GPU time.
    raw = read_data(data_args, training_args)
    for name, retrieval_set in (raw.retrieval_sets or {}).items():
        logger.info("Retrieval evaluation%s: %d queries over %d documents.", f" ({name})" if name else "",
                    len(retrieval_set.queries), len(retrieval_set.corpus))
    if raw.general_set is not None:
        logger.info("Forgetting check (--general_validation): %d queries over %d documents, before and after training.",
                    len(raw.general_set.queries), len(raw.general_set.corpus))
    transformers.set_seed(training_args.seed)  # new weights (LoRA adapters, a reranker's head) start alike everywhere
    cross_encoder = model_args.model_type == "cross-encoder"
    model = load_model(model_args, data_args, training_args)
    data = build_training_data(raw, data_args, training_args, model.tokenizer, cross_encoder=cross_encoder)
    train_dataset, eval_dataset = data.train, data.validation
    if training_args.torch_compile and getattr(model, "position_rule", None) is not None:
        logger.info("--torch_compile with padding-free encoding: the encoder's layers compile once for a dynamic "
                    "packed length; packing and per-sequence attention run eagerly (docs/performance.md).")

    logger.info("Model %s (%s); %d training and %d validation queries; %d hard negatives each.",
                model_args.model_name_or_path, describe(model), len(train_dataset),
                len(eval_dataset) if eval_dataset else 0, data_args.num_hard_negatives)
    logger.info("World size %d x %d queries per device x %d accumulation = %d queries per optimizer step.",
                training_args.world_size, training_args.per_device_train_batch_size,
                training_args.gradient_accumulation_steps,
                training_args.world_size * training_args.per_device_train_batch_size
                * training_args.gradient_accumulation_steps)
    if resume_from:
        logger.info("Resuming from %s", resume_from)

    pad_multiple = 8 if (training_args.fp16 or training_args.bf16) else None
    configure_tracking(training_args)
    trainer_class = HubRerankerTrainer if cross_encoder else HubEmbeddingTrainer
    trainer = trainer_class(model=model, args=training_args, train_dataset=train_dataset,
                                  eval_dataset=eval_dataset, data_collator=TripletCollator(model.tokenizer, pad_multiple),
                                  processing_class=model.tokenizer, evaluator=data.evaluator, objective=data.objective)
    with peer_failure_message(training_args.output_dir, training_args.world_size), \
            explain_out_of_memory(model, model_args, data_args, training_args):
        train_result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model()
    metrics = dict(train_result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    trainer.save_state()
    forgetting = forgetting_check(trainer.state.log_history, metrics) if data_args.general_validation else None
    share(trainer, model_args, data_args, training_args, num_train_records=len(train_dataset),
          num_validation_records=len(eval_dataset) if eval_dataset is not None else 0,
          datasets_seen=datasets_seen(trainer, train_dataset), forgetting=forgetting)
    if training_args.should_save:
        folder = os.path.abspath(training_args.output_dir)
        print(f"\nModel saved to {folder}\nLoad it with:\n" + (
            f"  from sentence_transformers import CrossEncoder\n  model = CrossEncoder({folder!r})\n"
            f"  model.predict([(query, document), ...]); model.rank(query, documents)\n" if cross_encoder else
            f"  from sentence_transformers import SentenceTransformer\n  model = SentenceTransformer({folder!r})\n"
            f"  model.encode_query([...]); model.encode_document([...])\n"))
    return metrics


def load_model(model_args: ModelArguments, data_args: DataArguments, training_args: EmbeddingTrainingArguments):
    """The model of --model_type: an EmbeddingModel (bi-encoder) or a CrossEncoderModel (reranker)."""
    if model_args.model_type == "cross-encoder":
        return CrossEncoderModel.from_pretrained(
            model_args.model_name_or_path, max_length=pair_max_length(data_args),
            activation="sigmoid" if training_args.reranker_loss == "pointwise" else "identity",
            trust_remote_code=model_args.trust_remote_code)
    model = EmbeddingModel.from_pretrained(
        model_args.model_name_or_path, pooling=model_args.pooling, normalize=model_args.normalize,
        trust_remote_code=model_args.trust_remote_code, padding_free=model_args.padding_free, lora=model_args.lora,
        attention=model_args.attention, attention_kernel=model_args.attention_kernel,
        query_prefix=data_args.query_prefix, document_prefix=data_args.passage_prefix,
        max_seq_length=max(data_args.query_max_length, data_args.passage_max_length))
    too_large = [dim for dim in training_args.matryoshka_dims or [] if dim > model.embedding_dimension]
    if too_large:
        raise ConfigError(f"--matryoshka_dims {too_large} exceed the model's embedding size {model.embedding_dimension}.")
    return model


def describe(model) -> str:
    """One phrase for the log: a bi-encoder's pooling and normalisation, a cross-encoder's pair length."""
    if isinstance(model, CrossEncoderModel):
        return f"cross-encoder, pairs of up to {model.max_length} tokens, {model.activation} activation"
    return f"pooling={model.pooling}, normalize={model.normalize}"


def forgetting_check(log_history: list[dict], final: dict) -> dict | None:
    """The general-domain metrics (``eval_general_*``) before training (step 0) and after it, logged in one line."""
    prefix = "eval_general_"
    before = next(({name.removeprefix(prefix): value for name, value in entry.items() if name.startswith(prefix)}
                   for entry in log_history if entry.get("step") == 0 and f"{prefix}ndcg@10" in entry), {})
    after = {name.removeprefix(prefix): value for name, value in final.items() if name.startswith(prefix)}
    if not after:
        return None
    if "ndcg@10" in before:
        logger.info("Forgetting check: general-domain nDCG@10 %.4f before training, %.4f after (%+.4f).",
                    before["ndcg@10"], after["ndcg@10"], after["ndcg@10"] - before["ndcg@10"])
    return {"before": before, "after": after}


def datasets_seen(trainer, train_dataset) -> list[dict] | None:
    """Blended training: batches and records each dataset gave, from the (deterministic) schedule; None otherwise."""
    if not isinstance(train_dataset, BlendedTripletDataset):
        return None
    sampler = trainer._get_train_sampler(train_dataset)
    counts = blocks_per_dataset(sampler, blocks_consumed(sampler, trainer.state.global_step,
                                                         trainer.args.gradient_accumulation_steps))
    return [{"name": name, "batches": count, "records": count * sampler.block} for name, count in
            zip(train_dataset.names, counts)]


def main(argv: list[str] | None = None) -> dict:
    """Parse ``[recipe.yaml] [--flags]`` and run; raises on bad input (see ``cli`` for the CLI behaviour)."""
    return run(*parse_arguments(argv))


def cli() -> None:
    """Entry point: bad input ends with one clear message and exit code 2, not a traceback. A run that succeeded
    ends its process group before the process exits (``finetune.training.distributed.end_process_group``)."""
    try:
        main()
    except (DataFormatError, OutputDirError, ConfigError, ModelLoadError, NonFiniteError, FileNotFoundError, HubPushError,
            PeerProcessError, CheckpointWriteError, TrainingOutOfMemoryError, UnsupportedShardingError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    end_process_group()


if __name__ == "__main__":
    cli()
