"""From data arguments to what the trainer is handed: datasets (one, or a blend), the evaluator, the objective.

Two steps, so that every record is validated before the model loads: :func:`read_data` parses and
validates every file (raw ``datasets`` per dataset spec, retrieval sets); :func:`build_training_data`
tokenizes with the model's tokenizer. One training dataset gives a plain ``TripletDataset``; several
give a ``finetune.data.blend.BlendedTripletDataset`` whose batches each hold one dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.data.blend import BlendedTripletDataset, DatasetSpec, blend_weights
from finetune.training.config import ConfigError
from finetune.data.examples import TripletDataset
from finetune.data.columns import check_enough_negatives, check_teacher_scores, load_raw_dataset, tokenize_dataset
from finetune.retrieval.evaluation import ForgettingCheckEvaluator, MultiRetrievalEvaluator, RetrievalEvaluator
from finetune.retrieval.sets import load_retrieval_set, retrieval_set_from_records, with_extra_corpus
from finetune.objectives.builtin import DatasetDispatch, build_objective
from finetune.objectives.reranking import build_reranker_objective
from finetune.retrieval.reranking import RerankEvaluator
from finetune.objectives.guide import GuideEncoder, tokenizer_mismatch
from finetune.model.embedding_model import EmbeddingModel, ModelLoadError


def pair_max_length(data_args) -> int:
    """Tokens of a cross-encoder's (question, document) pair: --query_max_length + --passage_max_length."""
    return data_args.query_max_length + data_args.passage_max_length


@dataclass
class RawData:
    """Validated records per dataset spec, and the retrieval sets of evaluation (None when there is none)."""

    train: list[tuple[DatasetSpec, object]]
    validation: list[tuple[DatasetSpec, object]]
    retrieval_sets: dict[str, object] | None
    general_set: object | None = None  # --general_validation: the forgetting check's retrieval set


def read_data(data_args, training_args) -> RawData:
    """Parse and validate every training and validation file; raises DataFormatError naming bad records."""
    with training_args.main_process_first(desc="data validation"):
        train = [(spec, load_raw_dataset(list(spec.files))) for spec in data_args.train_specs]
        validation = [(spec, load_raw_dataset(list(spec.files))) for spec in data_args.validation_specs]
    if training_args.distillation != "none":  # validation data may lack scores: its loss is then the ranking part
        for spec, raw in train:
            check_teacher_scores(raw, f"--distillation {training_args.distillation}")
            if (data_args.num_hard_negatives if spec.num_hard_negatives is None else spec.num_hard_negatives) < 1:
                raise ConfigError(f"--distillation compares each query's positive with its hard negatives: dataset "
                                  f"{spec.name!r} needs --num_hard_negatives >= 1.")
    if training_args.false_negative_margin is not None and training_args.false_negative_guide == "teacher":
        for _, raw in train:
            check_teacher_scores(raw, "--false_negative_guide teacher")
    retrieval_sets = None
    if data_args.eval_retrieval_data:
        retrieval_sets = {"": load_retrieval_set(data_args.eval_retrieval_data, extra_corpus=data_args.eval_corpus_file)}
    elif validation:  # the validation records just parsed: no second pass over the files
        retrieval_sets = {spec.name: with_extra_corpus(retrieval_set_from_records(raw), data_args.eval_corpus_file)
                          for spec, raw in validation}
    general_set = load_retrieval_set(data_args.general_validation) if data_args.general_validation else None
    return RawData(train, validation, retrieval_sets, general_set)


@dataclass
class TrainingData:
    train: object  # TripletDataset or BlendedTripletDataset
    validation: object | None
    evaluator: object | None
    objective: object


def build_training_data(raw: RawData, data_args, training_args, tokenizer, *,
                        cross_encoder: bool = False) -> TrainingData:
    """Tokenized datasets (per dataset: its prompts and k), the evaluator and the objective (per dataset: its mode).

    ``cross_encoder``: documents are tokenized as (question, document) pairs of ``pair_max_length(data_args)``
    tokens, evaluation reranks each validation query's own candidates, the objective is the reranker's.
    """
    def build(spec: DatasetSpec, records) -> TripletDataset:
        k = data_args.num_hard_negatives if spec.num_hard_negatives is None else spec.num_hard_negatives
        tokenized = tokenize_dataset(records, tokenizer, query=spec.query_side(data_args.query_side),
                                     document=spec.document_side(data_args.document_side),
                                     num_proc=data_args.preprocessing_num_workers,
                                     pair_max_length=pair_max_length(data_args) if cross_encoder else None)
        check_enough_negatives(tokenized, k)
        return TripletDataset(tokenized, k, seed=training_args.data_order_seed)

    names = list(dict.fromkeys(spec.name for spec, _ in raw.train + raw.validation))  # one id per dataset name

    def combine(parts: list[tuple[DatasetSpec, object]], weighted: bool):
        datasets = [build(spec, records) for spec, records in parts]
        if len(datasets) == 1:
            return datasets[0]
        weights = blend_weights([len(d) for d in datasets], [spec.weight for spec, _ in parts],
                                data_args.dataset_temperature) if weighted else []
        return BlendedTripletDataset(datasets, [spec.name for spec, _ in parts], data_args.dataset_sampling, weights,
                                     ids=[names.index(spec.name) for spec, _ in parts])

    with training_args.main_process_first(desc="dataset preparation"):
        train = combine(raw.train, data_args.dataset_sampling == "weighted")
        validation = combine(raw.validation, False) if raw.validation else None
    evaluator = None
    if raw.retrieval_sets is not None:
        sides = {spec.name: spec for spec, _ in raw.validation}
        def query_side(name):
            return sides[name].query_side(data_args.query_side) if name in sides else data_args.query_side

        def document_side(name):
            return sides[name].document_side(data_args.document_side) if name in sides else data_args.document_side

        if cross_encoder:
            evaluators = {name: RerankEvaluator(retrieval_set, query=query_side(name), document=document_side(name),
                                                batch_size=training_args.per_device_eval_batch_size)
                          for name, retrieval_set in raw.retrieval_sets.items()}
        else:
            evaluators = {name: RetrievalEvaluator(
                retrieval_set, query=query_side(name), document=document_side(name),
                batch_size=training_args.per_device_eval_batch_size, truncate_dims=training_args.matryoshka_dims or ())
                for name, retrieval_set in raw.retrieval_sets.items()}
        evaluator = next(iter(evaluators.values())) if len(evaluators) == 1 else MultiRetrievalEvaluator(evaluators)
        if raw.general_set is not None:  # the forgetting check: the default sides, no dataset instruction
            general = (RerankEvaluator if cross_encoder else RetrievalEvaluator)(
                raw.general_set, query=data_args.query_side, document=data_args.document_side,
                batch_size=training_args.per_device_eval_batch_size)
            evaluator = ForgettingCheckEvaluator(evaluator, general)
    if cross_encoder:
        return TrainingData(train, validation, evaluator, build_reranker_objective(training_args))
    guide = load_guide(training_args, tokenizer)
    objective = build_objective(training_args, guide=guide)
    if len(raw.train) > 1 or len(raw.validation) > 1:  # per-dataset hard-negative modes; each batch's dataset logged
        modes = {names.index(spec.name): spec.hard_negatives_mode for spec, _ in raw.train + raw.validation}
        objective = DatasetDispatch(
            {i: objective if mode in (None, training_args.hard_negatives_mode)
             else build_objective(training_args, hard_negatives_mode=mode, guide=guide) for i, mode in modes.items()},
            names, default=objective,
            logged=[names.index(spec.name) for spec, _ in raw.train] if len(raw.train) > 1 else [])
    return TrainingData(train, validation, evaluator, objective)


def load_guide(training_args, tokenizer) -> GuideEncoder | None:
    """The frozen guide of ``--false_negative_guide model`` (``--guide_model``), or None without one. Refused unless
    it reads token ids as ``tokenizer`` (the trained model's) does: it embeds the batch's token ids."""
    if training_args.false_negative_margin is None or training_args.false_negative_guide != "model":
        return None
    path = training_args.guide_model
    try:
        model = EmbeddingModel.from_pretrained(path, padding_free=True)
    except ModelLoadError as error:  # its message names the main model's option
        raise ConfigError(str(error).replace("--model_name_or_path", "--guide_model", 1)) from None
    mismatch = tokenizer_mismatch(model.tokenizer, tokenizer)
    if mismatch:
        raise ConfigError(f"--guide_model {path!r} has another tokenizer than the model trained ({mismatch}); the "
                          "guide embeds the batch's token ids, so it needs the same one.")
    return GuideEncoder(model, training_args.gradcache_mini_batch_size)
