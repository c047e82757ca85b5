"""Evaluate SentenceTransformer-loadable models on a retrieval set; compare several side by side.

    python -m finetune.evaluate --model_name_or_path M [M2 ...] --data PATH [--output_json FILE]
        [--per_query_output FILE.jsonl] [--mteb_output_folder DIR] [--reranker CROSS_ENCODER --rerank_top_k K]
    accelerate launch -m finetune.evaluate ...   # several processes (GPUs) share the encoding and the search

PATH is a seed-format file/glob (queries = question, corpus = all pos_doc and neg_doc texts of the
file, qrels = pos_doc) or a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv). Models
are loaded with sentence-transformers itself, so any Hub id or local folder works, ours included;
their saved ``query``/``document`` prompts are applied as in training, and documents are ranked by
the similarity each model declares.

The corpus embeddings go to fp32 shards on disk (--shard_dir, default OUTPUT_JSON.parts/; --shard_dtype
float16 halves them), searched exactly one shard at a time; processes share the shards to encode and the
query blocks to search, and the metrics equal one process's. A rerun after a kill redoes only what is
missing. The stack is the one training evaluates with (finetune.retrieval): on a model we trained, with
its defaults, the metrics equal the training's final evaluation.

With several models, each later one is compared with the first over the same queries: the mean difference of
each metric, a paired bootstrap interval and a sign-flip randomisation p-value (finetune.retrieval.significance),
printed and written to --output_json under "comparisons". --per_query_output keeps every query's metrics;
--mteb_output_folder writes MTEB result files (finetune.retrieval.mteb_results).

--reranker CROSS_ENCODER also reranks each model's top --rerank_top_k documents per query with a
sentence-transformers CrossEncoder (finetune.retrieval.rerank_candidates) and reports the metrics before and
after, side by side; under several processes the main process reranks alone, after the shared search.

This folder has no ``__init__.py`` on purpose: ``accelerate launch finetune/train.py`` puts
``finetune/`` first on ``sys.path``, and a module named ``evaluate`` there would shadow the
``evaluate`` package; a folder without ``__init__.py`` never does (a regular package wins over a
namespace folder), while ``python -m finetune.evaluate`` still runs this file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time

from finetune.data.text import TextSide
from finetune.training.checkpointing import write_json_atomic
from finetune.retrieval import mteb_results
from finetune.retrieval.comparison import compare_to_first, format_comparisons, write_per_query
from finetune.retrieval.evaluation import METRIC_NAMES, SEARCH_DEPTH, compute_metrics, evaluate_model
from finetune.retrieval.rerank_candidates import cross_encoder_scorer, load_cross_encoder, rerank_top_k
from finetune.retrieval.sets import load_retrieval_set
from finetune.retrieval.work_parts import fingerprint, process_state

logger = logging.getLogger("finetune.evaluate")


def format_table(results: dict[str, dict]) -> str:
    """Metrics as rows, models as columns; with two models a last column holds the difference."""
    names = list(results)
    header = ["metric"] + names + (["difference"] if len(names) == 2 else [])
    rows = []
    for metric in METRIC_NAMES:
        values = [results[name][metric] for name in names]
        row = [metric] + [f"{value:.4f}" for value in values]
        if len(names) == 2:
            row.append(f"{values[1] - values[0]:+.4f}")
        rows.append(row)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m finetune.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", nargs="+", required=True,
                        help="One or more SentenceTransformer-loadable models (Hub ids or folders).")
    parser.add_argument("--data", required=True, nargs="+",
                        help="Seed-format file(s)/glob(s), or one BEIR folder (corpus.jsonl, queries.jsonl, qrels/).")
    parser.add_argument("--split", default="test", help="BEIR qrels split, qrels/<split>.tsv (default: test).")
    parser.add_argument("--output_json", default=None, help="Also write the metrics as JSON to this file.")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="Texts per forward pass (default: the evaluation batch size of the model's training, "
                             "from its training_run.json, so the metrics equal the training's final evaluation; else "
                             "64).")
    parser.add_argument("--max_seq_length", type=int, default=None,
                        help="Truncate queries and documents to this many tokens (default: the query and passage "
                             "lengths the model was trained with, from its training_run.json; else its own "
                             "max_seq_length).")
    parser.add_argument("--truncate_dim", type=int, default=None,
                        help="Evaluate the embeddings cut to their first D dimensions (Matryoshka models; cosine "
                             "re-normalises). Default: the full embedding.")
    parser.add_argument("--shard_dir", default=None,
                        help="Folder for the corpus shards (fp16 .npy) and the query blocks' search results, one "
                             "subfolder per model; the same path for every process. Default: --output_json plus "
                             ".parts, else a folder in the system's temporary directory named after the arguments.")
    parser.add_argument("--shard_size", type=int, default=50_000,
                        help="Documents per corpus shard: the unit of encoding work shared between processes and "
                             "resumed (default 50000).")
    parser.add_argument("--query_block_size", type=int, default=1024,
                        help="Queries encoded and searched at a time: the unit of search work (default 1024).")
    parser.add_argument("--shard_dtype", default="float32", choices=["float32", "float16"],
                        help="How the corpus embeddings are stored (default float32: the metrics equal the in-memory "
                             "evaluation during training; float16 halves the disk and may reorder near-ties).")
    parser.add_argument("--keep_shards", action="store_true",
                        help="Keep --shard_dir after success (default: removed).")
    parser.add_argument("--per_query_output", default=None,
                        help="Also write every query's metrics to this JSON Lines file (.gz: compressed), one line "
                             "per model and query: model, query_id, query, the metrics. Default: not written.")
    parser.add_argument("--bootstrap_samples", type=int, default=10_000,
                        help="With several models: resamples of the queries for the paired bootstrap interval of "
                             "each difference (default 10000).")
    parser.add_argument("--permutations", type=int, default=10_000,
                        help="With several models: random sign flips for the paired randomisation test's p-value "
                             "(default 10000; the smallest p it can give is 1 / (1 + this)).")
    parser.add_argument("--confidence", type=float, default=0.95,
                        help="With several models: the bootstrap interval's confidence level (default 0.95).")
    parser.add_argument("--seed", type=int, default=0,
                        help="With several models: seed of the bootstrap and the randomisation test; equal seeds, "
                             "equal intervals and p-values (default 0).")
    parser.add_argument("--mteb_output_folder", default=None,
                        help="Also write each model's metrics as an MTEB result file, "
                             "DIR/<model, '/' as '__'>/<task_name>.json (mteb not needed); with --mteb_tasks, mteb "
                             "keeps its own result files there too. Default: not written.")
    parser.add_argument("--task_name", default=None,
                        help="Task name of the MTEB result files (default: the --data file or folder's base name "
                             "without .jsonl/.json/.gz).")
    parser.add_argument("--mteb_languages", nargs="+", default=["eng-Latn"],
                        help="Languages (ISO 639-3 + script) recorded in the MTEB result files (default eng-Latn).")
    parser.add_argument("--mteb_tasks", nargs="+", default=None,
                        help="Also run these MTEB tasks (e.g. SciFact NFCorpus) on every model with the mteb package, "
                             "which must be installed and may download their data. Default: none.")
    parser.add_argument("--reranker", default=None,
                        help="Also rerank each model's top --rerank_top_k documents per query with this cross-encoder "
                             "(a folder or Hub id that sentence_transformers.CrossEncoder loads, one score per pair) "
                             "and report the metrics before and after. Default: no reranking.")
    parser.add_argument("--rerank_top_k", type=int, default=SEARCH_DEPTH,
                        help=f"Documents per query the reranker reorders, 1 to {SEARCH_DEPTH} (the depth of the "
                             f"search); those below keep the bi-encoder's order after them (default {SEARCH_DEPTH}).")
    parser.add_argument("--reranker_batch_size", type=int, default=64,
                        help="(query, document) pairs per forward pass of the reranker (default 64).")
    parser.add_argument("--reranker_query_prefix", default="",
                        help="Put before every query given to the reranker (default: none; the bi-encoder's prompts "
                             "are not applied).")
    parser.add_argument("--reranker_passage_prefix", default="",
                        help="Put before every document given to the reranker (default: none).")
    args = parser.parse_args(argv)
    if args.truncate_dim is not None and args.truncate_dim < 1:
        raise ValueError(f"--truncate_dim must be >= 1, got {args.truncate_dim}.")
    task_name = check_report_options(args)
    check_rerank_options(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reranker = None
    if args.reranker and process_state().is_main_process:  # only the main process reranks
        # Loaded before any encoding, so that a bad --reranker stops the run at once.
        reranker = load_cross_encoder(args.reranker, device=process_state().device)

    dataset = load_retrieval_set(args.data, split=args.split)
    logger.info("%d queries, %d documents", len(dataset.queries), len(dataset.corpus))
    shard_dir = args.shard_dir or default_shard_dir(args)
    results = {}
    for index, name in enumerate(args.model_name_or_path):
        results[name] = evaluate_model(name, dataset, batch_size=args.batch_size, max_seq_length=args.max_seq_length,
                                       truncate_dim=args.truncate_dim,
                                       shard_dir=os.path.join(shard_dir, f"model-{index}"), shard_size=args.shard_size,
                                       query_block_size=args.query_block_size, keep_shards=args.keep_shards,
                                       shard_dtype=args.shard_dtype,
                                       per_query=len(args.model_name_or_path) > 1 or bool(args.per_query_output),
                                       return_run=reranker is not None)
        if reranker is not None:
            results[name]["reranked"] = rerank_metrics(reranker, dataset, results[name].pop("run"), args)
    if not all(results.values()):
        return {}  # not the main process: it printed and wrote nothing
    if os.path.isdir(shard_dir) and not os.listdir(shard_dir):
        os.rmdir(shard_dir)
    per_query = {name: metrics.pop("per_query") for name, metrics in results.items() if "per_query" in metrics}
    print(format_table(results))
    for name, metrics in results.items():
        if "reranked" in metrics:
            print(f"{name} reranked by {args.reranker} (top {args.rerank_top_k} per query)")
            print(format_table({"bi-encoder": metrics, "reranked": metrics["reranked"]}))
    output = dict(results)
    if len(results) > 1:  # a key that is no model: readers of this file skip it (finetune.publishing.model_card does)
        output["comparisons"] = compare_to_first(per_query, samples=args.bootstrap_samples,
                                                 permutations=args.permutations, confidence=args.confidence,
                                                 seed=args.seed)
        print(format_comparisons(output["comparisons"]))
    print(json.dumps(output, indent=2))
    if args.output_json:
        write_json_atomic(args.output_json, output, indent=2)
    if args.per_query_output:
        write_per_query(args.per_query_output, per_query, dataset.queries)
    if args.mteb_output_folder:
        write_mteb_results(args, task_name, dataset, results)
    if args.mteb_tasks:
        for name in results:
            for task, score in mteb_results.run_mteb_tasks(name, args.mteb_tasks, args.mteb_output_folder).items():
                print(f"MTEB {task}: main score {score:.4f} ({name})")
    return output


def check_report_options(args) -> str | None:
    """Refuse, before any encoding, options that would fail at the end; the MTEB task name, if files are asked for."""
    for option in ("bootstrap_samples", "permutations"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option} must be >= 1, got {getattr(args, option)}.")
    if not 0 < args.confidence < 1:
        raise ValueError(f"--confidence must be between 0 and 1, got {args.confidence}.")
    if args.mteb_tasks:
        mteb_results.require_mteb()
    if args.mteb_output_folder:
        return args.task_name or mteb_results.default_task_name(args.data)
    return None


def check_rerank_options(args) -> None:
    """Refuse reranking options out of range before anything is loaded."""
    if not 1 <= args.rerank_top_k <= SEARCH_DEPTH:
        raise ValueError(f"--rerank_top_k must be between 1 and {SEARCH_DEPTH} (the depth of the search), "
                         f"got {args.rerank_top_k}.")
    if args.reranker_batch_size < 1:
        raise ValueError(f"--reranker_batch_size must be >= 1, got {args.reranker_batch_size}.")


def rerank_metrics(reranker, dataset, run, args) -> dict:
    """The metrics of ``run`` with each query's top --rerank_top_k documents reranked by the cross-encoder."""
    start = time.perf_counter()
    reranked = rerank_top_k(cross_encoder_scorer(reranker, batch_size=args.reranker_batch_size), dataset, run,
                            args.rerank_top_k, query=TextSide(args.reranker_query_prefix),
                            document=TextSide(args.reranker_passage_prefix), batch_size=args.reranker_batch_size)
    seconds = time.perf_counter() - start
    pairs = sum(min(args.rerank_top_k, len(docs)) for docs in run.values())
    logger.info("Reranked %d pairs in %.1f s (%.1f pairs/s).", pairs, seconds, pairs / max(seconds, 1e-9))
    return {**compute_metrics(reranked, dataset.qrels), "top_k": args.rerank_top_k, "pairs": pairs,
            "seconds": seconds}


def write_mteb_results(args, task_name: str, dataset, results: dict[str, dict]) -> None:
    """One MTEB result file per model (see finetune.retrieval.mteb_results)."""
    revision = mteb_results.retrieval_set_digest(dataset)
    for name, metrics in results.items():
        result = mteb_results.mteb_result(metrics, task_name=task_name, split=args.split, dataset_revision=revision,
                                          languages=args.mteb_languages)
        logger.info("MTEB result file: %s", mteb_results.write_mteb_result(args.mteb_output_folder, name, result))


def default_shard_dir(args) -> str:
    """OUTPUT_JSON.parts, or a folder in the temporary directory that every process of one launch names alike."""
    if args.output_json:
        return f"{args.output_json}.parts"
    key = fingerprint([os.path.abspath(path) for path in args.data], args.model_name_or_path, args.split)
    return os.path.join(tempfile.gettempdir(), f"finetune-evaluate-{key[:16]}")


def cli() -> None:
    from finetune.training.distributed import run_command

    run_command(main)


if __name__ == "__main__":
    cli()
