"""MTEB interop: our metrics as MTEB result files, and named MTEB tasks run with the ``mteb`` package if installed.

A result file has the layout of mteb's ``TaskResult`` (``mteb/results/task_result.py``), so MTEB tooling can read
it: ``FOLDER/<model name, "/" -> "__">/<task name>.json`` holding

    {"dataset_revision": "<sha256 of the retrieval set>", "task_name": ..., "mteb_version": <installed one, or null>,
     "evaluation_time": seconds, "kg_co2_emissions": null,
     "scores": {split: [{"ndcg_at_10": ..., "mrr_at_10": ..., "recall_at_1": ..., "recall_at_10": ...,
                         "recall_at_100": ..., "map_at_100": ..., "main_score": <ndcg_at_10>,
                         "hf_subset": "default", "languages": ["eng-Latn"]}]}}

``TaskResult`` types ``dataset_revision`` as a string and requires the ``mteb_version`` key (null allowed), so a
local set gets a digest of its content as revision and the version key is always written. mteb itself is never
needed to write these files; it is imported only to run ``--mteb_tasks`` (which may download its data).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os

from finetune.training.checkpointing import write_json_atomic
from finetune.retrieval.sets import RetrievalSet

MTEB_SCORE_NAMES = {"ndcg@10": "ndcg_at_10", "mrr@10": "mrr_at_10", "recall@1": "recall_at_1",
                    "recall@10": "recall_at_10", "recall@100": "recall_at_100", "map@100": "map_at_100"}
MAIN_SCORE = "ndcg_at_10"  # MTEB's main score of its retrieval tasks
DATA_SUFFIXES = (".gz", ".jsonl", ".json")


def mteb_result(metrics: dict[str, float], *, task_name: str, split: str, dataset_revision: str,
                languages: list[str]) -> dict:
    """One MTEB result (one split, subset "default") from ``evaluate_model``'s metrics (METRIC_NAMES, "seconds")."""
    scores = {MTEB_SCORE_NAMES[name]: metrics[name] for name in MTEB_SCORE_NAMES}
    scores.update(main_score=scores[MAIN_SCORE], hf_subset="default", languages=list(languages))
    return {"dataset_revision": dataset_revision, "task_name": task_name, "mteb_version": installed_mteb_version(),
            "evaluation_time": metrics.get("seconds"), "kg_co2_emissions": None, "scores": {split: [scores]}}


def write_mteb_result(folder: str, model_name_or_path: str, result: dict) -> str:
    """Write ``result`` to FOLDER/<model folder name>/<task name>.json (atomically); returns the path."""
    path = os.path.join(folder, model_folder_name(model_name_or_path), f"{result['task_name']}.json")
    write_json_atomic(path, result, indent=2)
    return path


def model_folder_name(model_name_or_path: str) -> str:
    """mteb's ``model_name_as_path``: "/" -> "__", " " -> "_" (outer slashes dropped: "/a/b/" -> "a__b")."""
    return model_name_or_path.strip("/").replace("/", "__").replace(" ", "_")


def default_task_name(paths: list[str]) -> str:
    """The data's base name without .gz/.jsonl/.json: "data/val.jsonl.gz" -> "val", "beir/scifact/" -> "scifact".
    Several paths or a glob have no single name: the caller must give one."""
    if len(paths) != 1 or any(char in paths[0] for char in "*?["):
        raise ValueError("Several data files (or a glob) have no single task name: give --task_name.")
    name = os.path.basename(os.path.normpath(paths[0]))
    while name.endswith(DATA_SUFFIXES):
        name = name[:name.rindex(".")]
    return name


def retrieval_set_digest(dataset: RetrievalSet) -> str:
    """sha256 of the queries, corpus and qrels (ids and texts in their order): equal data, equal digest."""
    digest = hashlib.sha256()
    for part in (dataset.queries, dataset.corpus):
        for key, text in part.items():
            digest.update(f"{key}\0{text}\0".encode("utf-8"))
        digest.update(b"\1")
    for qid, relevant in dataset.qrels.items():
        digest.update("".join(f"{qid}\0{doc}\0{rel}\0" for doc, rel in relevant.items()).encode("utf-8"))
    return digest.hexdigest()


def installed_mteb_version() -> str | None:
    try:
        return importlib.metadata.version("mteb")
    except importlib.metadata.PackageNotFoundError:
        return None


def require_mteb() -> None:
    """Fail early, in one line, when ``--mteb_tasks`` is asked for without the package."""
    if importlib.util.find_spec("mteb") is None:
        raise ValueError("--mteb_tasks needs the `mteb` package, which is not installed (pip install mteb).")


def run_mteb_tasks(model_name_or_path: str, task_names: list[str],
                   output_folder: str | None = None) -> dict[str, float]:
    """Run the named MTEB tasks on the model (loaded with sentence-transformers, its prompts included) -> task name:
    main score. mteb >= 2 (``mteb.evaluate``) keeps its files under OUTPUT_FOLDER/results/; mteb 1
    (``MTEB.run``) under OUTPUT_FOLDER/<model>/<revision>/; without a folder nothing is saved."""
    import mteb
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_name_or_path)
    tasks = mteb.get_tasks(tasks=list(task_names))
    if hasattr(mteb, "evaluate"):
        cache = mteb.ResultCache(output_folder) if output_folder else None
        task_results = mteb.evaluate(model, tasks, cache=cache).task_results
    else:
        task_results = mteb.MTEB(tasks=tasks).run(model, output_folder=output_folder)
    return {result.task_name: result.get_score() for result in task_results}
