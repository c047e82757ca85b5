"""Mine hard negatives for seed-format data with an embedding model, filtering likely false negatives.

    python -m data_prep.mine --input train.jsonl --output train.mined.jsonl --num_hard_negatives 5 \\
        [--model_name_or_path MODEL] [--max_score_ratio 0.95] [--extra_corpus more_docs.jsonl]
    accelerate launch -m data_prep.mine ...     # several processes (GPUs) share the encoding and the search

The corpus is every document of the data (pos_doc and neg_doc texts, deduplicated) plus --extra_corpus.
Each question is searched exactly over the whole corpus (chunked torch search, or a faiss exact
inner-product index with --use_faiss); candidates at ranks [range_min, range_max) that are a positive of
the question (any record with that question; case and spacing ignored) or score above
positive - |positive| x (1 - max_score_ratio) (NV-Retriever's TopK-PercPos), or above positive - margin,
are dropped.

The corpus embeddings go to disk, fp16 shards of --shard_size documents in --shard_dir (default
OUTPUT.parts/), memory-mapped one at a time by the search: memory for embeddings and scores does not
grow with the corpus nor with corpus x queries (the texts themselves are held in memory). Processes
share the shards to encode and the question blocks to search (finetune.retrieval.search); the output
equals one process's byte for byte. A rerun after a kill redoes only the missing shards and blocks;
the folder is removed after success (--keep_shards keeps it).

Writes the seed format (atomically), a JSON report (counts, fraction dropped, score statistics, counts per
reason, the most suspicious dropped candidates to read) and a PNG plot of the score distributions.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import logging
import re
import time
from dataclasses import asdict

import numpy as np
from tqdm.auto import tqdm

from data_prep.mining import FILTER_REASONS, REASONS, SAMPLING, MiningSettings, select_for_queries
from data_prep.records import (add_deprecated_alias, json_line, normalized_key, optional_float, run_cli,
                               setup_logging, unique)
from finetune.retrieval.sets import read_corpus_file
from finetune.training.checkpointing import atomic_write
from finetune.data.schema import NEG_DOC, POS_DOC, QUESTION, SCORED_LISTS, normalize_record, read_records
from finetune.retrieval.search import ShardOptions, encode_corpus, read_blocks, remove_parts, search_queries
from finetune.data.text import TextSide
from finetune.retrieval.work_parts import path_identity, process_state

logger = logging.getLogger("data_prep.mine")


def build_parser() -> argparse.ArgumentParser:
    from finetune.training.arguments import default_model_path

    parser = argparse.ArgumentParser(prog="python -m data_prep.mine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model_name_or_path", default=default_model_path(),
        help="Embedding model that ranks the candidates: Hub id or folder of an HF encoder or SentenceTransformer "
             "(default: the packaged all-MiniLM-L6-v2). Usually the model you are about to fine-tune.")
    add("--input", required=True, nargs="+", help="Seed-format files or globs (validated first).")
    add("--output", required=True, help="Seed-format JSON Lines file to write (.gz to compress).")
    add("--num_hard_negatives", type=int, default=5,
        help="Negatives to mine per record (default 5); the training option of the same name samples from them.")
    add_deprecated_alias(parser, "--num_negatives", "--num_hard_negatives", type=int)
    add("--range_min", type=int, default=0,
        help="Skip candidates ranked better than this (0 = best; positives count as ranks). Default 0.")
    add("--range_max", type=int, default=50, help="Consider candidates ranked below this only. Default 50.")
    add("--max_score_ratio", type=optional_float, default=0.95,
        help="Drop candidates scoring above positive - |positive| x (1 - ratio), i.e. above ratio x positive score "
             "(NV-Retriever's TopK-PercPos). 'none' disables. Default 0.95.")
    add("--margin", type=optional_float, default=None,
        help="Drop candidates scoring above positive score - margin. Default: none (off).")
    add("--sampling", choices=SAMPLING, default="top",
        help="Take the best-ranked candidates that pass ('top') or a random choice among them ('random'). Default top.")
    add("--seed", type=int, default=0, help="Seed of --sampling random (default 0).")
    add("--extra_corpus", nargs="*", default=[],
        help="More candidate documents: files with one text per line, or JSON Lines with 'text' (and optional "
             "'title'), read as the evaluation's --eval_corpus_file. Default: none.")
    add("--keep_existing_negatives", action="store_true",
        help="Keep each record's neg_doc (minus any equal to a positive) and append the mined negatives. "
             "Default: off, neg_doc is replaced by the mined negatives.")
    add("--min_negatives", type=int, default=1,
        help="Leave out records that end with fewer negatives than this (counted in the report); 0 keeps all. "
             "Default 1: training with --num_hard_negatives > 0 needs one per record.")
    add("--query_prefix", default="", help="Prefix put before each question, e.g. 'query: ' for e5. Default: none.")
    add("--passage_prefix", default="", help="Prefix put before each document, e.g. 'passage: ' for e5. Default: none.")
    add("--query_max_length", type=int, default=64, help="Max tokens of a question, as in training. Default 64.")
    add("--passage_max_length", type=int, default=256, help="Max tokens of a document, as in training. Default 256.")
    add("--batch_size", type=int, default=64, help="Encoding batch size. Default 64.")
    add("--use_faiss", action="store_true",
        help="Search with a faiss exact inner-product index (IndexFlatIP) per corpus chunk, on the GPU with faiss-gpu, "
             "instead of chunked torch matrix products. Same results. Default: off.")
    add("--query_block_size", type=int, default=1024,
        help="Questions encoded and searched at a time: the unit of search work shared between processes and resumed. "
             "Each block reads every corpus shard once. Default 1024.")
    add("--corpus_chunk_size", type=int, default=16384,
        help="Documents scored at a time; scores held at once: 1024 questions x this. Default 16384.")
    add("--shard_size", type=int, default=50000,
        help="Documents per corpus shard (fp16 .npy file): the unit of encoding work shared between processes and "
             "resumed. Default 50000.")
    add("--shard_dir", default=None,
        help="Folder for the corpus shards and the search results of the question blocks (the same path for every "
             "process). Default: the output path plus .parts.")
    add("--keep_shards", action="store_true",
        help="Keep --shard_dir after success (the corpus embeddings, fp16 .npy). Default: off, it is removed.")
    add("--report", default=None,
        help="JSON report path. Default: the output path without .jsonl/.gz, plus .report.json.")
    add("--plot", default=None, help="PNG plot path. Default: the output path without .jsonl/.gz, plus .report.png.")
    add("--num_suspicious", type=int, default=20,
        help="Dropped candidates to show in the report, those scoring highest relative to their positive. Default 20.")
    return parser


class ScoreSample:
    """Exact count, mean, std, min and max of a stream of scores, plus a uniform sample of at most ``capacity``
    of them (bottom-k of random keys) for quantiles and histograms in bounded memory."""

    def __init__(self, capacity: int = 200_000, seed: int = 0):
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.count, self.total, self.total_sq = 0, 0.0, 0.0
        self.low, self.high = float("inf"), float("-inf")
        self.values = np.empty(0, dtype=np.float32)
        self.keys = np.empty(0)

    def add(self, values) -> None:
        values = np.asarray(values, dtype=np.float64)
        if not len(values):
            return
        self.count += len(values)
        self.total += float(values.sum())
        self.total_sq += float((values ** 2).sum())
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))
        self.values = np.concatenate([self.values, values.astype(np.float32)])
        self.keys = np.concatenate([self.keys, self.rng.random(len(values))])
        if len(self.values) > 2 * self.capacity:
            keep = np.argpartition(self.keys, self.capacity)[:self.capacity]
            self.values, self.keys = self.values[keep], self.keys[keep]

    def summary(self) -> dict:
        if not self.count:
            return {"count": 0}
        mean = self.total / self.count
        p25, p50, p75 = np.percentile(self.values, [25, 50, 75]).tolist()
        return {"count": self.count, "mean": mean, "std": max(self.total_sq / self.count - mean ** 2, 0.0) ** 0.5,
                "min": self.low, "p25": p25, "p50": p50, "p75": p75, "max": self.high,
                "sampled": len(self.values) < self.count}


class MiningReport:
    """Everything the report needs, accumulated record by record in memory bounded by the sample sizes."""

    def __init__(self, num_suspicious: int):
        self.counts = {name: 0 for name in (
            "records_in", "records_out", "records_left_out_too_few_negatives", "records_with_fewer_than_num_negatives",
            "candidates_considered", "candidates_passed", "negatives_mined", "negatives_written",
            "existing_negatives_kept", "existing_negatives_removed_as_positive")}
        self.reasons = {reason: 0 for reason in REASONS}
        self.scores = {name: ScoreSample(seed=seed) for seed, name in enumerate(("positive", "kept", "dropped"))}
        self.ratios = {name: ScoreSample(seed=seed + 3) for seed, name in enumerate(("kept", "dropped"))}
        self.negatives_per_record: dict[int, int] = {}
        self.num_suspicious = num_suspicious
        self.suspicious: list[tuple[float, int, dict]] = []  # min-heap on (candidate - positive score, arrival)
        self.arrival = itertools.count()

    def add(self, record: dict, result, corpus_texts: list[str]) -> None:
        self.counts["candidates_considered"] += len(result.dropped) + result.passed
        self.counts["candidates_passed"] += result.passed
        self.counts["negatives_mined"] += len(result.kept)
        positive = result.positive_score
        self.scores["positive"].add([positive])
        self.scores["kept"].add([score for _, score in result.kept])
        filtered = [(index, score, reason) for index, score, reason in result.dropped if reason in FILTER_REASONS]
        self.scores["dropped"].add([score for _, score, _ in filtered])
        if positive > 0:
            self.ratios["kept"].add([score / positive for _, score in result.kept])
            self.ratios["dropped"].add([score / positive for _, score, _ in filtered])
        for index, score, reason in result.dropped:
            self.reasons[reason] += 1
        for index, score, reason in filtered:
            item = (score - positive, next(self.arrival), {
                "question": record[QUESTION], "positive": corpus_texts[result.positive_index],
                "positive_score": positive, "candidate": corpus_texts[index], "candidate_score": score,
                "score_ratio": score / positive if positive else None, "reason": reason})
            if len(self.suspicious) < self.num_suspicious:
                heapq.heappush(self.suspicious, item)
            elif self.num_suspicious and item[0] > self.suspicious[0][0]:
                heapq.heapreplace(self.suspicious, item)

    def add_written(self, negatives: int) -> None:
        self.negatives_per_record[negatives] = self.negatives_per_record.get(negatives, 0) + 1

    def to_dict(self) -> dict:
        filter_dropped = sum(self.reasons[reason] for reason in FILTER_REASONS)
        judged = filter_dropped + self.counts["candidates_passed"]
        return {
            "counts": self.counts,
            "fraction_dropped": filter_dropped / judged if judged else 0.0,
            "dropped_by_reason": self.reasons,
            "negatives_per_record": dict(sorted(self.negatives_per_record.items())),
            "scores": {name: sample.summary() for name, sample in self.scores.items()},
            "score_ratio_to_positive": {name: sample.summary() for name, sample in self.ratios.items()},
            "most_suspicious_dropped": [item for _, _, item in sorted(self.suspicious, key=lambda x: -x[0])],
        }


def default_report_path(output: str, suffix: str) -> str:
    return re.sub(r"(\.jsonl|\.json)?(\.gz)?$", "", output) + suffix


def plot_scores(report: MiningReport, settings: MiningSettings, path: str) -> None:
    """Histograms of positive, kept and dropped scores, and of candidate/positive ratios with the cut-off."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    samples = {name: sample.values for name, sample in report.scores.items() if len(sample.values)}
    if samples:
        low = min(float(v.min()) for v in samples.values())
        high = max(float(v.max()) for v in samples.values())
        bins = np.linspace(low, high if high > low else low + 1e-3, 60)
        colors = {"positive": "tab:green", "kept": "tab:blue", "dropped": "tab:red"}
        for name, values in samples.items():
            left.hist(values, bins=bins, density=True, histtype="stepfilled", alpha=0.35, color=colors[name],
                      label=f"{name} ({report.scores[name].count:,})")
        left.legend()
    left.set(title="Scores (cosine with the question)", xlabel="score", ylabel="density")
    for name, color in (("kept", "tab:blue"), ("dropped", "tab:red")):
        if len(report.ratios[name].values):
            right.hist(report.ratios[name].values, bins=60, density=True, histtype="stepfilled", alpha=0.35,
                       color=color, label=f"{name} ({report.ratios[name].count:,})")
    if settings.max_score_ratio is not None:
        right.axvline(settings.max_score_ratio, color="black", linestyle="--", label=f"max_score_ratio {settings.max_score_ratio}")
    right.legend()
    right.set(title="Candidate score / positive score", xlabel="ratio", ylabel="density")
    figure.tight_layout()
    with atomic_write(path, binary=True) as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)


def build_corpus(records: list[dict], extra_files: list[str]) -> tuple[dict[str, int], int]:
    """Every document text -> corpus index, data first (pos_doc and neg_doc, first seen), then extra documents."""
    corpus: dict[str, int] = {}
    for record in records:
        for text in (*record[POS_DOC], *record[NEG_DOC]):
            corpus.setdefault(text, len(corpus))
    from_data = len(corpus)
    for path in extra_files:
        for text in read_corpus_file(path):
            corpus.setdefault(text, len(corpus))
    return corpus, from_data


def search_candidates(args, corpus_texts: list[str], questions: list[str], positive_indices: list[list[int]], k: int,
                      state) -> tuple[ShardOptions, list[str], float]:
    """Encode the corpus into shards, then search every question over them, sharing both over the processes.

    Returns the options, the paths of the question blocks' results (top ``k`` and the scores of each question's
    positives) and the time the corpus encoding ended.
    """
    from finetune.model.embedding_model import EmbeddingModel

    model = EmbeddingModel.from_pretrained(args.model_name_or_path, padding_free=True)  # same vectors, no padding work
    model.to(state.device)
    query_side = TextSide(args.query_prefix, args.query_max_length)
    document_side = TextSide(args.passage_prefix, args.passage_max_length)
    options = ShardOptions(folder=args.shard_dir or f"{args.output}.parts", shard_size=args.shard_size,
                           query_block_size=args.query_block_size, batch_size=args.batch_size,
                           corpus_chunk=args.corpus_chunk_size, use_faiss=args.use_faiss)
    model_identity = path_identity(args.model_name_or_path)

    def encoder(side: TextSide):
        return lambda texts: model.encode(texts, side, batch_size=len(texts))  # one batch of encode_in_batches

    shards = encode_corpus(encoder(document_side), corpus_texts, options, [model_identity, asdict(document_side)],
                           state)
    encoded = time.perf_counter()
    blocks = search_queries(encoder(query_side), questions, shards, k, options, [model_identity, asdict(query_side)],
                            score_rows=positive_indices, device=state.device)
    return options, blocks, encoded


def main(argv: list[str] | None = None) -> dict:
    """Returns the report that is also written to --report (on the main process; ``{}`` on the others)."""
    args = build_parser().parse_args(argv)
    setup_logging()
    settings = MiningSettings(num_negatives=args.num_hard_negatives, range_min=args.range_min, range_max=args.range_max,
                              max_score_ratio=args.max_score_ratio, margin=args.margin, sampling=args.sampling,
                              seed=args.seed)
    for name in ("query_block_size", "corpus_chunk_size", "batch_size", "shard_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    report_path = args.report or default_report_path(args.output, ".report.json")
    plot_path = args.plot or default_report_path(args.output, ".report.png")
    started = time.perf_counter()
    state = process_state()

    records = [normalize_record(record) for record in tqdm(read_records(args.input), desc="Reading", unit=" records",
                                                           disable=not state.is_main_process)]
    corpus, from_data = build_corpus(records, args.extra_corpus)
    corpus_texts = list(corpus)
    corpus_keys = [normalized_key(text) for text in corpus_texts]
    question_positives: dict[str, list[int]] = {}  # a question's positives across all its records
    for record in records:
        positives = question_positives.setdefault(record[QUESTION], [])
        positives.extend(i for i in unique(corpus[t] for t in record[POS_DOC]) if i not in positives)
    logger.info("%d records, %d distinct questions, corpus of %d documents (%d from the data, %d extra)",
                len(records), len(question_positives), len(corpus_texts), from_data, len(corpus_texts) - from_data)

    positive_indices = [question_positives[record[QUESTION]] for record in records]
    options, blocks, encoded = search_candidates(args, corpus_texts, [record[QUESTION] for record in records],
                                                 positive_indices, settings.range_max, state)
    searched = time.perf_counter()
    if not state.is_main_process:
        return {}  # the main process selects and writes

    report = MiningReport(args.num_suspicious)
    report.counts["records_in"] = len(records)
    with atomic_write(args.output) as handle, tqdm(total=len(records), desc="Mining", unit=" queries") as progress:
        for searched_block in read_blocks(blocks, options.query_block_size):
            start = searched_block.start
            block = records[start:start + len(searched_block.scores)]
            existing = [[corpus[text] for text in record[NEG_DOC]] for record in block]
            results = select_for_queries(searched_block.scores, searched_block.indices, searched_block.row_scores,
                                         positive_indices[start:start + len(block)], corpus_keys, settings,
                                         existing_indices=existing if args.keep_existing_negatives else None,
                                         query_offset=start)
            for record, result in zip(block, results):
                report.add(record, result, corpus_texts)
                negatives = [corpus_texts[index] for index, _ in result.kept]
                if args.keep_existing_negatives:
                    positive_keys = {corpus_keys[i] for i in question_positives[record[QUESTION]]}
                    kept = [text for text in unique(record[NEG_DOC]) if normalized_key(text) not in positive_keys]
                    report.counts["existing_negatives_kept"] += len(kept)
                    report.counts["existing_negatives_removed_as_positive"] += len(unique(record[NEG_DOC])) - len(kept)
                    negatives = kept + negatives
                if len(result.kept) < settings.num_negatives:
                    report.counts["records_with_fewer_than_num_negatives"] += 1
                if len(negatives) < args.min_negatives:
                    report.counts["records_left_out_too_few_negatives"] += 1
                    continue
                # Teacher scores no longer match the new negatives (and come in pairs): score the output anew.
                out = {key: value for key, value in record.items() if key not in SCORED_LISTS}
                handle.write(json_line({**out, NEG_DOC: negatives}))
                report.counts["records_out"] += 1
                report.counts["negatives_written"] += len(negatives)
                report.add_written(len(negatives))
            progress.update(len(block))
    finished = time.perf_counter()

    result = {
        "input": args.input, "output": args.output, "plot": plot_path, "model": args.model_name_or_path,
        "settings": {key: value for key, value in vars(args).items() if key not in ("input", "output", "report", "plot")},
        "corpus": {"documents": len(corpus_texts), "from_data": from_data, "extra": len(corpus_texts) - from_data,
                   "distinct_questions": len(question_positives)},
        **report.to_dict(),
        "seconds": {"total": finished - started, "encode_corpus": encoded - started, "mine": finished - encoded,
                    "search": searched - encoded},
    }
    with atomic_write(report_path) as handle:
        json.dump(result, handle, indent=2, ensure_ascii=False)
    plot_scores(report, settings, plot_path)
    if not args.keep_shards:
        remove_parts(options)
    counts = result["counts"]
    print(f"Mined {counts['negatives_mined']:,} negatives for {counts['records_in']:,} records over {len(corpus_texts):,} "
          f"documents; dropped {result['fraction_dropped']:.1%} of the judged candidates as likely false negatives "
          f"({', '.join(f'{k}: {v:,}' for k, v in result['dropped_by_reason'].items() if v)}).")
    print(f"Wrote {counts['records_out']:,} records to {args.output} ({counts['records_left_out_too_few_negatives']:,} left "
          f"out with fewer than {args.min_negatives} negative(s)); report {report_path}, plot {plot_path}.")
    return result


if __name__ == "__main__":
    run_cli(main)
