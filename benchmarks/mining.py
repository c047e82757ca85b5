"""Benchmark: our ``data_prep.mine`` against ``sentence_transformers.util.mine_hard_negatives``.

    python benchmarks/mining.py [--limit 200] [--data FILE] [--model_name_or_path M] [--use_faiss]
    python benchmarks/mining.py --scaling_only        # just the memory-scaling part

Same model, data, corpus and settings for both (top-k sampling, num_negatives, range_max, TopK-PercPos 0.95 =
sentence-transformers' relative_margin 0.05, one max_seq_length). Each run is a fresh process, so peak RSS
(ru_maxrss) is its own; times are end to end (model load, encoding, search, filtering, writing). Prints
throughput and peak-memory ratios and the overlap of the chosen negatives.

Then the memory scaling of our search + filter alone (random unit vectors, no model, the corpus in memory as
``mining.mine_negatives`` keeps it): peak RSS at two corpus sizes and two query counts, next to the size of the
(queries x corpus) score matrix that is never built. The on-disk shards of ``data_prep.mine``:
benchmarks/sharded_search.py.
Differences from sentence-transformers by design: our ranks count positives (theirs skip them), and we also drop
case/spacing variants of positives; both rarely matter for top-k negatives.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


# ------------------------------------------------------------------------------------------ children


def child_ours(args) -> dict:
    from data_prep import mine

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, "mined.jsonl")
        argv = ["--model_name_or_path", args.model_name_or_path, "--input", args.subset, "--output", output,
                "--num_negatives", str(args.num_negatives), "--range_max", str(args.range_max),
                "--max_score_ratio", str(args.max_score_ratio), "--batch_size", str(args.batch_size),
                "--query_max_length", str(args.max_seq_length), "--passage_max_length", str(args.max_seq_length),
                "--min_negatives", "0"] + (["--use_faiss"] if args.use_faiss else [])
        report = mine.main(argv)
        with open(output, encoding="utf-8") as handle:
            negatives = {}
            for line in handle:
                record = json.loads(line)
                negatives.setdefault(record["question"], record["neg_doc"])
    return {"seconds": time.perf_counter() - start, "negatives": negatives,
            "seconds_inside": report["seconds"], "dropped_fraction": report["fraction_dropped"]}


def child_sentence_transformers(args) -> dict:
    import datasets
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from finetune.data.schema import read_records

    start = time.perf_counter()
    records = list(read_records(args.subset))
    anchors, positives, corpus = [], [], []
    for record in records:
        for positive in record["pos_doc"]:
            anchors.append(record["question"])
            positives.append(positive)
        corpus.extend(record["pos_doc"] + record["neg_doc"])
    model = SentenceTransformer(args.model_name_or_path, device="cuda" if torch.cuda.is_available() else "cpu")
    model.max_seq_length = args.max_seq_length
    mined = mine_hard_negatives(
        datasets.Dataset.from_dict({"anchor": anchors, "positive": positives}), model, corpus=corpus,
        range_max=args.range_max, relative_margin=1 - args.max_score_ratio, num_negatives=args.num_negatives,
        sampling_strategy="top", batch_size=args.batch_size, output_format="labeled-list", use_faiss=args.use_faiss,
        verbose=False)
    negatives = {}
    for row in mined:
        negatives.setdefault(row["anchor"], [doc for doc, label in zip(row["positive"], row["labels"]) if label == 0])
    return {"seconds": time.perf_counter() - start, "negatives": negatives}


def child_scaling(args) -> dict:
    """Our search + filter on random unit vectors, corpus in memory (fp16), queries fp32: ``mine_negatives``.
    (``data_prep.mine`` keeps the corpus in fp16 shards on disk: benchmarks/sharded_search.py.)"""
    import torch

    from data_prep.mining import MiningSettings, mine_negatives

    torch.manual_seed(0)
    corpus, queries, dim = args.corpus_size, args.queries, 384
    corpus_emb = torch.empty((corpus, dim), dtype=torch.float16)
    for start in range(0, corpus, 16384):  # fill in chunks, as encode_texts does
        chunk = torch.randn(min(16384, corpus - start), dim)
        corpus_emb[start:start + len(chunk)] = torch.nn.functional.normalize(chunk, dim=1).half()
    keys = list(range(corpus))
    baseline = current_rss_mb()
    start_time = time.perf_counter()
    settings = MiningSettings(num_negatives=5, range_max=50, max_score_ratio=0.95)
    for block in range(0, queries, 1024):  # query blocks, as data_prep.mine does
        query_emb = torch.nn.functional.normalize(torch.randn(min(1024, queries - block), dim), dim=1)
        mine_negatives(query_emb, corpus_emb, [[block + q] for q in range(len(query_emb))], None, settings,
                       corpus_keys=keys, query_offset=block)
    return {"seconds": time.perf_counter() - start_time, "rss_before_mining_mb": baseline,
            "corpus_fp16_mb": corpus_emb.numel() * 2 / 2 ** 20}


# ------------------------------------------------------------------------------------------ parent


def run_child(kind: str, args, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    command = [sys.executable, os.path.abspath(__file__), "--child", kind, "--result", result_path, *extra]
    finished = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if finished.returncode:
        sys.exit(f"{kind} run failed:\n{finished.stderr[-3000:]}")
    with open(result_path) as handle:
        result = json.load(handle)
    os.remove(result_path)
    return result


def shared_flags(args) -> list[str]:
    return ["--model_name_or_path", args.model_name_or_path, "--num_negatives", str(args.num_negatives),
            "--range_max", str(args.range_max), "--max_score_ratio", str(args.max_score_ratio),
            "--batch_size", str(args.batch_size), "--max_seq_length", str(args.max_seq_length)] + \
        (["--use_faiss"] if args.use_faiss else [])


def compare(args) -> None:
    from finetune.data.schema import read_records

    records = list(read_records(args.data))[:args.limit or None]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False, encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps({k: record[k] for k in ("question", "pos_doc", "neg_doc")}, ensure_ascii=False) + "\n")
        subset = handle.name
    documents = len({t for r in records for t in r["pos_doc"] + r["neg_doc"]})
    print(f"data: {args.data}, {len(records)} records, corpus {documents} documents; model {args.model_name_or_path}; "
          f"num_negatives {args.num_negatives}, range_max {args.range_max}, max_score_ratio {args.max_score_ratio}, "
          f"batch {args.batch_size}, max_seq_length {args.max_seq_length}, faiss {args.use_faiss}, "
          f"{os.cpu_count()} CPU(s)")
    try:
        ours = run_child("ours", args, shared_flags(args) + ["--subset", subset])
        theirs = run_child("st", args, shared_flags(args) + ["--subset", subset])
    finally:
        os.remove(subset)
    overlaps, identical = [], 0
    for question, negatives in ours["negatives"].items():
        other = theirs["negatives"].get(question, [])
        if negatives or other:
            overlaps.append(len(set(negatives) & set(other)) / max(len(negatives), len(other)))
            identical += set(negatives) == set(other)
    rows = [("ours (data_prep.mine)", ours), ("sentence-transformers", theirs)]
    print(f"{'':24}{'seconds':>10}{'queries/s':>12}{'peak RSS MB':>14}")
    for name, result in rows:
        print(f"{name:24}{result['seconds']:>10.1f}{len(records) / result['seconds']:>12.2f}{result['peak_rss_mb']:>14.0f}")
    print(f"throughput ours/theirs: {theirs['seconds'] / ours['seconds']:.2f}x; "
          f"peak RSS ours/theirs: {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}")
    print(f"negatives: mean overlap {sum(overlaps) / len(overlaps):.3f} per question, identical sets for "
          f"{identical}/{len(overlaps)} questions; ours dropped {ours['dropped_fraction']:.1%} of judged candidates")


def scaling(args) -> None:
    print("memory scaling of our search + filter (random 384-d unit vectors, corpus fp16, 1024-query blocks):")
    print(f"{'corpus':>9}{'queries':>9}{'seconds':>9}{'corpus fp16 MB':>16}{'peak RSS MB':>13}"
          f"{'peak - before mining':>22}{'Q x N fp32 matrix MB':>22}")
    for corpus, queries in ((50_000, 2_000), (100_000, 2_000), (50_000, 4_000)):
        result = run_child("scaling", args, ["--corpus_size", str(corpus), "--queries", str(queries)])
        print(f"{corpus:>9,}{queries:>9,}{result['seconds']:>9.1f}{result['corpus_fp16_mb']:>16.0f}"
              f"{result['peak_rss_mb']:>13.0f}{result['peak_rss_mb'] - result['rss_before_mining_mb']:>22.0f}"
              f"{corpus * queries * 4 / 2 ** 20:>22.0f}")


def main(argv: list[str] | None = None) -> None:
    from finetune.training.arguments import EXAMPLE_TRAIN_FILE, default_model_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=default_model_path(),
                        help="Model for both (default: the packaged all-MiniLM-L6-v2).")
    parser.add_argument("--data", default=EXAMPLE_TRAIN_FILE, help="Seed-format data (default: the example train set).")
    parser.add_argument("--limit", type=int, default=200, help="Use the first N records (default 200; 0 = all).")
    parser.add_argument("--num_negatives", type=int, default=5, help="Negatives per question (default 5).")
    parser.add_argument("--range_max", type=int, default=50, help="Candidates considered per question (default 50).")
    parser.add_argument("--max_score_ratio", type=float, default=0.95, help="TopK-PercPos ratio (default 0.95).")
    parser.add_argument("--batch_size", type=int, default=64, help="Encoding batch size (default 64).")
    parser.add_argument("--max_seq_length", type=int, default=256, help="Token limit for queries and documents (default 256).")
    parser.add_argument("--use_faiss", action="store_true", help="Search with faiss in both (default: torch).")
    parser.add_argument("--scaling_only", action="store_true", help="Only run the memory-scaling part.")
    parser.add_argument("--skip_scaling", action="store_true", help="Skip the memory-scaling part.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--subset", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--corpus_size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--queries", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = {"ours": child_ours, "st": child_sentence_transformers, "scaling": child_scaling}[args.child](args)
        result["peak_rss_mb"] = peak_rss_mb()
        with open(args.result, "w") as handle:
            json.dump(result, handle)
        return
    if not args.scaling_only:
        compare(args)
    if not args.skip_scaling:
        scaling(args)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
