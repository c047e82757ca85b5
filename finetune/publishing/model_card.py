"""The model card (``README.md``) of a trained model, rendered from ``templates/model_card.md.j2``.

Everything the card says is read from files in the output directory, so the card can be written
at the end of training and re-rendered later (``python -m finetune.push_to_hub`` does, to pick up
metrics added after training):

- ``training_run.json``: what only the training process knows (base model, data files and record
  counts, loss settings, non-default options); written by :func:`save_training_run`.
- the SentenceTransformer files (prompts, pooling, normalisation, max length, versions) and
  ``config.json`` (architecture);
- ``adapter_config.json`` (``--save_adapter_only``: a LoRA adapter on a base model, no full weights)
  or ``lora_adapter/adapter_config.json`` (LoRA merged into the saved weights);
- metrics, when present: ``trainer_state.json`` (training curve; an evaluation at step 0 is the
  base model), ``all_results.json`` / ``eval_results.json`` (final evaluation) and
  ``retrieval_metrics.json`` (``python -m finetune.evaluate ... --output_json``; several models).

This module only reads JSON and renders text; it imports neither torch nor transformers.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jinja2
import yaml

from finetune.training.checkpointing import atomic_write, write_text_atomic

CARD_FILE = "README.md"
TRAINING_RUN_FILE = "training_run.json"
RETRIEVAL_METRICS_FILE = "retrieval_metrics.json"
TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"
TEMPLATE_NAME = "model_card.md.j2"
RERANKER_TEMPLATE_NAME = "reranker_card.md.j2"

# Options that say where things ran or went, not how the model was trained; tokens never appear.
_NOT_TRAINING_OPTIONS = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_dir", "run_name",
                         "report_to", "wandb_project", "wandb_group", "project", "push_to_hub", "hub_model_id",
                         "hub_private_repo", "hub_strategy", "hub_revision", "hub_always_push", "use_cpu")
# Evaluation entries that are bookkeeping, not quality.
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "seconds")
_METRIC_LABELS = {"loss": "validation loss", "ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "map@100": "MAP@100",
                  "recall@1": "Recall@1", "recall@10": "Recall@10", "recall@100": "Recall@100",
                  "ingroup_accuracy": "in-group accuracy", "ingroup_mrr": "in-group MRR"}
# Display order of metrics; others follow in the order they were logged.
_METRIC_ORDER = ("ndcg@10", "mrr@10", "map@100", "recall@1", "recall@10", "recall@100", "ingroup_accuracy",
                 "ingroup_mrr", "loss")
_HUB_CACHE_DIR = re.compile(r"(?:^|/)(models|datasets)--([^/]+?)--([^/]+)(?:/|$)")
_CURVE_ROWS = 20


def _read_json(path: str | Path) -> dict | list | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def hub_repo_id(name_or_path: str | None, kind: str = "models") -> str | None:
    """The Hub id behind a model/dataset reference, or None for a purely local one.

    ``org/name`` is taken as a Hub id when no such local path exists; a folder of the Hub cache
    (``.../models--org--name/snapshots/<sha>``) maps back to ``org/name``.
    """
    if not name_or_path:
        return None
    match = _HUB_CACHE_DIR.search(str(name_or_path).replace(os.sep, "/"))
    if match and match.group(1) == kind:
        return f"{match.group(2)}/{match.group(3)}"
    if not os.path.exists(name_or_path) and re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path):
        return name_or_path
    return None


def save_training_run(output_dir: str, model_args, data_args, training_args, *, num_train_records: int,
                      num_validation_records: int, world_size: int, base_model_id: str | None = None,
                      tracking_url: str | None = None, datasets_seen: list[dict] | None = None,
                      forgetting: dict | None = None) -> str:
    """Record what the card needs and only the training process knows, as ``training_run.json``.

    ``forgetting``: the forgetting check (``--general_validation``) before and after training, if any.

    ``base_model_id``: the Hub id of a local base model (e.g. the packaged MiniLM), if known.
    Non-default training options are those that differ from ``EmbeddingTrainingArguments``' own
    defaults; Hub, logging and output options are left out, and tokens never appear.
    """
    defaults = type(training_args)(output_dir=training_args.output_dir, use_cpu=training_args.use_cpu).to_dict()
    options = {name: value for name, value in training_args.to_dict().items()
               if defaults.get(name) != value and name not in _NOT_TRAINING_OPTIONS and "token" not in name}
    train_files = [path for spec in data_args.train_specs for path in spec.files]
    validation_files = [path for spec in data_args.validation_specs for path in spec.files]
    seen = {entry["name"]: entry for entry in datasets_seen or []}
    run = {
        "base_model": model_args.model_name_or_path,
        "base_model_id": base_model_id or hub_repo_id(model_args.model_name_or_path),
        "train_files": [os.path.basename(path) for path in train_files],
        "validation_files": [os.path.basename(path) for path in validation_files],
        "datasets": sorted({repo for path in [*train_files, *validation_files]
                            if (repo := hub_repo_id(path, "datasets")) is not None}),
        # Blended training: each dataset with its instruction and what it gave (finetune.data.blend).
        "train_datasets": [{"name": spec.name, "files": [os.path.basename(path) for path in spec.files],
                            "query_prefix": data_args.query_prefix if spec.query_prefix is None else spec.query_prefix,
                            "passage_prefix": (data_args.passage_prefix if spec.passage_prefix is None
                                               else spec.passage_prefix),
                            "batches": seen.get(spec.name, {}).get("batches"),
                            "records": seen.get(spec.name, {}).get("records")}
                           for spec in data_args.train_specs] if datasets_seen else [],
        "dataset_sampling": data_args.dataset_sampling if datasets_seen else None,
        "num_train_records": num_train_records,
        "num_validation_records": num_validation_records,
        "query_prefix": data_args.query_prefix,
        "passage_prefix": data_args.passage_prefix,
        "query_max_length": data_args.query_max_length,
        "passage_max_length": data_args.passage_max_length,
        "num_hard_negatives": data_args.num_hard_negatives,
        "temperature": training_args.temperature,
        "hard_negatives_mode": training_args.hard_negatives_mode,
        "model_type": model_args.model_type,  # a cross-encoder gets the reranker card
        "reranker_loss": training_args.reranker_loss if model_args.model_type == "cross-encoder" else None,
        "distillation": training_args.distillation,
        "per_device_train_batch_size": training_args.per_device_train_batch_size,
        "per_device_eval_batch_size": training_args.per_device_eval_batch_size,  # finetune.evaluate's default
        "gradient_accumulation_steps": training_args.gradient_accumulation_steps,
        "world_size": world_size,
        # Documents of all processes are candidates (finetune.objectives.losses) unless switched off.
        "global_in_batch_negatives": bool(getattr(training_args, "global_in_batch_negatives", False)),
        "non_default_options": options,
        "tracking_url": tracking_url,
        "forgetting_check": ({"files": [os.path.basename(str(path).rstrip("/")) for path in data_args.general_validation],
                              **forgetting} if forgetting else None),
    }
    path = Path(output_dir, TRAINING_RUN_FILE)
    write_text_atomic(path, json.dumps(run, indent=2) + "\n")
    return str(path)


def _weights(output_dir: Path) -> dict:
    """How the weights are stored: ``full`` (a full fine-tune), ``merged`` (LoRA folded into plain weights) or
    ``adapter`` (a LoRA adapter at the root, on the base model its config names)."""
    adapter = _read_json(output_dir / "adapter_config.json")
    config = adapter or _read_json(output_dir / "lora_adapter" / "adapter_config.json")
    if not isinstance(config, dict):
        return {"kind": "full"}
    base = config.get("base_model_name_or_path")
    return {"kind": "adapter" if adapter else "merged", "r": config.get("r"), "alpha": config.get("lora_alpha"),
            "base": base, "base_id": hub_repo_id(base),
            "base_class": (config.get("auto_mapping") or {}).get("base_model_class")}


def _model_details(output_dir: Path, weights: dict) -> dict:
    """Architecture, pooling, prompts and versions, from the saved SentenceTransformer files (and, for an
    adapter, from its base model's config when that is a local folder)."""
    config = _read_json(output_dir / "config.json") or {}
    if not config and weights["kind"] == "adapter":
        base = weights.get("base")
        config = (_read_json(Path(base, "config.json")) if base and os.path.isdir(base) else None) or \
            {"architectures": [weights["base_class"]] if weights.get("base_class") else None}
    st_config = _read_json(output_dir / "config_sentence_transformers.json") or {}
    modules = _read_json(output_dir / "modules.json") or []
    pooling, normalize, pooling_dimension = None, False, None
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Pooling":
            pooling_config = _read_json(output_dir / module["path"] / "config.json") or {}
            pooling_dimension = pooling_config.get("word_embedding_dimension")
            pooling = next((key.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
                            for key, value in pooling_config.items() if key.startswith("pooling_mode_") and value is True),
                           pooling_config.get("pooling_mode"))
        elif kind == "Normalize":
            normalize = True
    prompts = st_config.get("prompts") or {}
    return {
        "architecture": ", ".join(config.get("architectures") or [config.get("model_type", "unknown")]),
        "num_layers": config.get("num_hidden_layers"),
        "dimension": config.get("hidden_size") or pooling_dimension,
        "max_seq_length": (_read_json(output_dir / "sentence_bert_config.json") or {}).get("max_seq_length"),
        "pooling": pooling,
        "normalize": normalize,
        "similarity": st_config.get("similarity_fn_name") or "cosine",
        "query_prompt": prompts.get("query", ""),
        "document_prompt": prompts.get("document", ""),
        "versions": st_config.get("__version__") or {},
    }


def _ordered(names) -> list[str]:
    names = list(dict.fromkeys(names))
    return sorted(names, key=lambda name: (_METRIC_ORDER.index(name) if name in _METRIC_ORDER else len(_METRIC_ORDER),
                                           names.index(name)))


def _split_metrics(entry: dict, prefix: str = "eval_") -> dict[str, float]:
    """Quality metrics of one evaluation record, without the prefix and the timing entries."""
    return {name.removeprefix(prefix): value for name, value in entry.items()
            if name.startswith(prefix) and isinstance(value, (int, float))
            and not name.removeprefix(prefix).endswith(_NOT_METRICS)}


def _evaluations(output_dir: Path, log_history: list[dict], base_model: str) -> dict:
    """Before/after rows from the Trainer's files, and the standalone retrieval comparison, if any.

    Metrics at truncated sizes (``ndcg@10_dim128``, Matryoshka) go into their own rows (``dimension_rows``).
    """
    final = _split_metrics(_read_json(output_dir / "all_results.json") or _read_json(output_dir / "eval_results.json") or {})
    if not final:  # no evaluation after training: the last one logged during it
        logged = [entry for entry in log_history if _split_metrics(entry)]
        final = _split_metrics(logged[-1]) if logged else {}
    start = next((_split_metrics(entry) for entry in log_history if entry.get("step") == 0 and _split_metrics(entry)), {})
    dimension_rows = _dimension_rows(start, final)
    start, final = _without_dimensions(start), _without_dimensions(final)
    general = "general_"  # the forgetting check's metrics (finetune.retrieval.evaluation.ForgettingCheckEvaluator)
    forgetting_rows = [{"metric": _METRIC_LABELS.get(name, name), "before": start.get(general + name),
                        "after": final.get(general + name)}
                       for name in _ordered({key.removeprefix(general) for key in [*start, *final]
                                             if key.startswith(general)})]
    start = {name: value for name, value in start.items() if not name.startswith(general)}
    final = {name: value for name, value in final.items() if not name.startswith(general)}
    names = _ordered([*start, *final])
    before_after = [{"metric": _METRIC_LABELS.get(name, name), "name": name, "before": start.get(name),
                     "after": final.get(name)} for name in names]

    comparison = _read_json(output_dir / RETRIEVAL_METRICS_FILE)
    models, rows, this_model = [], [], None
    if isinstance(comparison, dict) and comparison:
        models = [name for name in comparison if name != "comparisons"]  # finetune.evaluate's paired statistics
        this_model = next((name for name in models if os.path.isdir(name) and os.path.samefile(name, output_dir)),
                          models[-1])
        metric_names = _ordered(name for name, value in comparison[models[0]].items()
                                if not name.endswith(_NOT_METRICS) and _is_number(value))  # "reranked": a dict
        # finetune.evaluate's paired statistics of this model against the first one, when it wrote them
        paired = ((comparison.get("comparisons") or {}).get(this_model) or {}).get("metrics", {})
        rows = [{"metric": _METRIC_LABELS.get(name, name), "values": [comparison[model].get(name) for model in models],
                 "paired": paired.get(name)} for name in metric_names]
    final_retrieval = {name: value for name, value in
                       ((comparison[this_model] if this_model else None) or final).items()
                       if name != "loss" and not name.endswith(_NOT_METRICS) and _is_number(value)}
    labels = {model: ("this model" if model == this_model else
                      "base model" if model == base_model else os.path.basename(model.rstrip("/")) or model)
              for model in models}
    return {"before_after": before_after, "has_before": bool(start), "comparison_models": [labels[m] for m in models],
            "comparison_rows": rows, "final_retrieval": final_retrieval, "final_from_comparison": this_model is not None,
            "dimension_rows": dimension_rows, "forgetting_rows": forgetting_rows}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_DIMENSION_METRIC = re.compile(r"(.+)_dim(\d+)$")


def _without_dimensions(metrics: dict[str, float]) -> dict[str, float]:
    return {name: value for name, value in metrics.items() if not _DIMENSION_METRIC.match(name)}


def _dimension_rows(start: dict[str, float], final: dict[str, float]) -> list[dict]:
    """Quality versus embedding size, largest first: nDCG@10 / MRR@10 before and after training at each size."""
    dims = sorted({int(match.group(2)) for name in final if (match := _DIMENSION_METRIC.match(name))}, reverse=True)
    return [{"dim": dim, "ndcg_before": start.get(f"ndcg@10_dim{dim}"), "ndcg_after": final.get(f"ndcg@10_dim{dim}"),
             "mrr_after": final.get(f"mrr@10_dim{dim}")} for dim in dims]


DIMENSION_PLOT = "matryoshka_quality.png"


def plot_dimension_rows(rows: list[dict], path: Path) -> None:
    """nDCG@10 versus embedding size (before and after training) as a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = [row["dim"] for row in rows]
    figure, axis = plt.subplots(figsize=(5, 3.2), dpi=100)
    axis.plot(dims, [row["ndcg_after"] for row in rows], marker="o", label="after training")
    if all(row["ndcg_before"] is not None for row in rows):
        axis.plot(dims, [row["ndcg_before"] for row in rows], marker="o", linestyle="--", label="before training")
    axis.set_xscale("log", base=2)
    axis.set_xticks(dims, [str(dim) for dim in dims])
    axis.set_xlabel("embedding dimensions")
    axis.set_ylabel("nDCG@10")
    axis.set_title("Quality versus embedding size")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with atomic_write(path, binary=True) as handle:
        figure.savefig(handle, format="png")
    plt.close(figure)


def _training_curve(log_history: list[dict]) -> list[dict]:
    """Training loss, the objective's components (``loss_<name>``), and validation loss / nDCG@10 where evaluated,
    per logged step, at most ~20 rows."""
    by_step: dict[int, dict] = {}
    for entry in log_history:
        row = by_step.setdefault(entry.get("step", 0), {"step": entry.get("step", 0), "epoch": float(entry.get("epoch", 0)),
                                                        "components": {}})
        if "loss" in entry:
            row["loss"] = entry["loss"]
            row["components"].update({key: value for key, value in entry.items() if key.startswith("loss_")})
        if "eval_loss" in entry:
            row["eval_loss"] = entry["eval_loss"]
        if "eval_ndcg@10" in entry:
            row["eval_ndcg"] = entry["eval_ndcg@10"]
    rows = [row for _, row in sorted(by_step.items()) if len(row) > 3]
    if len(rows) > _CURVE_ROWS:
        keep = sorted({round(i * (len(rows) - 1) / (_CURVE_ROWS - 1)) for i in range(_CURVE_ROWS)})
        rows = [rows[i] for i in keep]
    return rows


def _curve_components(curve: list[dict]) -> list[str]:
    """The component names logged in the curve (``loss_ranking``...), in first-seen order.

    Shown even when the one component equals the loss: the column names what the loss is made of."""
    return list(dict.fromkeys(name for row in curve for name in row["components"]))


def _model_index(name: str, final_retrieval: dict[str, float], dataset_name: str) -> list[dict] | None:
    if not final_retrieval:
        return None
    metrics = [{"type": metric.replace("@", "_at_"), "value": round(float(final_retrieval[metric]), 4),
                "name": _METRIC_LABELS.get(metric, metric)} for metric in _ordered(final_retrieval)]
    return [{"name": name, "results": [{
        "task": {"type": "information-retrieval", "name": "Information Retrieval"},
        "dataset": {"name": dataset_name, "type": dataset_name},
        "metrics": metrics}]}]


def build_card_context(output_dir: str, *, repo_id: str | None = None, datasets: list[str] | None = None) -> dict:
    """Everything the template shows, from the files in ``output_dir``.

    ``repo_id``: the Hub repo the card is for (the usage example loads it); default: the folder
    itself. ``datasets``: Hub dataset ids the model was trained on, added to those found in
    ``training_run.json``.
    """
    folder = Path(output_dir)
    run = _read_json(folder / TRAINING_RUN_FILE) or {}
    state = _read_json(folder / "trainer_state.json") or {}
    log_history = state.get("log_history") or []
    weights = _weights(folder)
    model = _model_details(folder, weights)
    base_model = run.get("base_model")
    base_model_id = run.get("base_model_id")
    evaluations = _evaluations(folder, log_history, base_model)
    curve = _training_curve(log_history)
    name = (repo_id or folder.resolve().name).rsplit("/", 1)[-1]
    dataset_ids = sorted({*(run.get("datasets") or []), *(datasets or [])})
    eval_set = ", ".join(run.get("validation_files") or []) or "held-out set"

    batch = run.get("per_device_train_batch_size")
    k = run.get("num_hard_negatives")
    candidates = scored_batch = None
    if batch and k is not None:
        world_size = run.get("world_size", 1)
        scored_batch = batch * world_size if run.get("global_in_batch_negatives") and world_size > 1 else batch
        exclusive = run.get("hard_negatives_mode") == "exclusive" and k > 0
        candidates = scored_batch + k if exclusive else scored_batch * (1 + k)

    if run.get("model_type") == "cross-encoder":
        return _reranker_context(folder, run, name, repo_id, base_model, base_model_id, evaluations, curve, eval_set,
                                 batch)
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "generated_from_trainer",
            "loss:MultipleNegativesRankingLoss"]
    tags += {"full": [], "merged": ["lora"], "adapter": ["peft", "lora"]}[weights["kind"]]
    if run.get("num_train_records"):
        tags.append(f"dataset_size:{run['num_train_records']}")
    metadata: dict = {"tags": tags}
    if base_model_id:
        metadata["base_model"] = base_model_id
        if weights["kind"] == "adapter":
            metadata["base_model_relation"] = "adapter"
    if dataset_ids:
        metadata["datasets"] = dataset_ids
    metadata["pipeline_tag"] = "sentence-similarity"
    metadata["library_name"] = "sentence-transformers"
    model_index = _model_index(name, evaluations["final_retrieval"],
                               "held-out set" if evaluations["final_from_comparison"] else eval_set)
    if model_index:
        metadata["model-index"] = model_index

    return {
        "metadata": metadata,
        "name": name,
        "model_id": repo_id or str(output_dir),
        "base_model": base_model,
        "base_model_id": base_model_id,
        "model": model,
        "weights": weights,
        "run": run,
        "dataset_ids": dataset_ids,
        "eval_set": eval_set,
        "effective_batch": (batch * run.get("gradient_accumulation_steps", 1) * run.get("world_size", 1)) if batch else None,
        "candidates": candidates,
        "scored_batch": scored_batch,
        "scale": round(1.0 / run["temperature"], 4) if run.get("temperature") else None,
        "options": run.get("non_default_options") or {},
        "curve": curve,
        "curve_components": _curve_components(curve),
        **evaluations,
    }


def _reranker_context(folder: Path, run: dict, name: str, repo_id, base_model, base_model_id, evaluations: dict,
                      curve: list[dict], eval_set: str, batch) -> dict:
    """The context of ``reranker_card.md.j2``: a cross-encoder folder (``finetune.model.cross_encoder``)."""
    config = _read_json(folder / "config.json") or {}
    tokenizer = _read_json(folder / "tokenizer_config.json") or {}
    activation = ((config.get("sentence_transformers") or {}).get("activation_fn") or "").rsplit(".", 1)[-1]
    loss = run.get("reranker_loss", "listwise")
    metadata: dict = {"tags": ["sentence-transformers", "cross-encoder", "reranker", "text-ranking",
                               "generated_from_trainer", f"loss:{loss}"]
                      + ([f"dataset_size:{run['num_train_records']}"] if run.get("num_train_records") else [])}
    if base_model_id:
        metadata["base_model"] = base_model_id
    metadata["pipeline_tag"] = "text-ranking"
    metadata["library_name"] = "sentence-transformers"
    losses = {"listwise": "listwise softmax cross-entropy over each query's positive and hard negatives",
              "pointwise": "binary cross-entropy per (query, document) pair"}
    return {"template": RERANKER_TEMPLATE_NAME, "metadata": metadata, "name": name, "model_id": repo_id or str(folder),
            "base_model": base_model, "base_model_id": base_model_id, "run": run, "eval_set": eval_set,
            "reranker": {"architecture": ", ".join(config.get("architectures") or ["unknown"]),
                         "max_length": tokenizer.get("model_max_length"), "activation": activation or "default",
                         "loss": losses.get(loss, loss) + (f", plus {run['distillation']} distillation from teacher "
                                                           "scores" if run.get("distillation", "none") != "none" else "")},
            "effective_batch": (batch * run.get("gradient_accumulation_steps", 1) * run.get("world_size", 1))
            if batch else None,
            "options": run.get("non_default_options") or {}, "curve": curve, **evaluations}


def _to_yaml(value) -> str:
    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _signed(value) -> str:
    return "-" if value is None else f"{value:+.4f}"


def render_model_card(context: dict) -> str:
    """The card's Markdown (YAML front matter first) for a context from :func:`build_card_context`."""
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), undefined=jinja2.StrictUndefined,
                                     keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)
    environment.filters.update(to_yaml=_to_yaml, number=_number, signed=_signed,
                               basename=lambda path: os.path.basename(str(path).rstrip("/\\")) or str(path),
                               pystr=lambda text: json.dumps(text, ensure_ascii=False))
    return environment.get_template(context.get("template", TEMPLATE_NAME)).render(**context)


def write_model_card(output_dir: str, *, repo_id: str | None = None, datasets: list[str] | None = None) -> str:
    """Render the card from ``output_dir``'s files into ``output_dir/README.md`` (atomically); returns its path."""
    context = build_card_context(output_dir, repo_id=repo_id, datasets=datasets)
    if context.get("dimension_rows"):
        plot_dimension_rows(context["dimension_rows"], Path(output_dir, DIMENSION_PLOT))
    text = render_model_card(context)
    path = Path(output_dir, CARD_FILE)
    write_text_atomic(path, text)
    return str(path)
