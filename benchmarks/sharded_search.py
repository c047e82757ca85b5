"""Benchmark: memory and time of the sharded corpus (``finetune.retrieval.search``), and encoding over 1 vs 2 processes.

    python benchmarks/sharded_search.py                                  # both parts, the sizes below
    python benchmarks/sharded_search.py --search_only --sizes 100000 400000 1600000
    python benchmarks/sharded_search.py --encode_only --max_seq_length 128

1. Search against corpus size: random unit 384-d vectors written as fp16 shards of --shard_size rows (as
   ``data_prep.mine`` writes them, by one process), then --queries random queries searched for their top 50
   over them in a fresh process (``topk_over_chunks`` over ``EmbeddingShards.chunks``, what each question
   block of ``search_queries`` does). Reported: seconds, peak RSS (ru_maxrss), and sampled peaks of its two
   parts, anonymous memory (RssAnon: ours) and file-backed pages (RssFile: the memory map's pages in use),
   next to the fp16 corpus size (what holding the corpus in memory would take).
2. A real encode: ``data_prep.mine`` with the packaged all-MiniLM-L6-v2 on the example train records (the
   validation set's documents as --extra_corpus: 2,373 documents), as 1 process (1 and 2 threads) and as 2 processes (``accelerate launch``, 1 thread each,
   gloo on CPU); seconds end to end, peak RSS of the largest process, and the outputs and shards compared byte
   for byte with the 1-process, 1-thread run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakSampler:
    """Peaks of RssAnon and RssFile, sampled every 5 ms in a thread (torch releases the GIL while it computes)."""

    def __enter__(self):
        self.peaks, self.running = {"RssAnon": 0, "RssFile": 0}, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            for field in self.peaks:
                self.peaks[field] = max(self.peaks[field], status_kb(field))
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


# ------------------------------------------------------------------------------------------ children


def child_write(args) -> dict:
    """Random unit fp16 vectors as the shards of ``args.size`` documents in ``args.folder``."""
    import numpy as np

    from finetune.training.checkpointing import atomic_write
    from finetune.retrieval.embeddings import EmbeddingShards
    from finetune.retrieval.work_parts import PartsFolder, process_state

    parts = PartsFolder(args.folder, "benchmark", process_state(), name="shard", ext=".npy")
    rng = np.random.default_rng(0)
    for index in range(EmbeddingShards(parts, args.size, args.shard_size).count):
        rows = rng.standard_normal((min(args.shard_size, args.size - index * args.shard_size), args.dim), np.float32)
        with atomic_write(parts.part(index), binary=True) as handle:
            np.save(handle, (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16))
    return {}


def child_search(args) -> dict:
    import torch

    from finetune.retrieval.embeddings import EmbeddingShards
    from finetune.retrieval.topk import topk_over_chunks
    from finetune.retrieval.work_parts import PartsFolder, process_state

    torch.set_num_threads(os.cpu_count())
    shards = EmbeddingShards(PartsFolder(args.folder, "benchmark", process_state(), name="shard", ext=".npy"),
                             args.size, args.shard_size)
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=torch.Generator().manual_seed(1)),
                                            dim=1)
    before = {field: status_kb(field) for field in ("RssAnon", "RssFile")}
    start = time.perf_counter()
    with PeakSampler() as sampler:
        scores, indices = topk_over_chunks(queries, shards.chunks(16384), 50)
    return {"seconds": time.perf_counter() - start, "anon_before_mb": before["RssAnon"] / 1024,
            "file_before_mb": before["RssFile"] / 1024, "peak_anon_mb": sampler.peaks["RssAnon"] / 1024,
            "peak_file_mb": sampler.peaks["RssFile"] / 1024, "shape": list(indices.shape)}


def run_child(kind: str, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    command = [sys.executable, os.path.abspath(__file__), "--child", kind, "--result", result_path, *extra]
    finished = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if finished.returncode:
        sys.exit(f"{kind} failed:\n{finished.stderr[-3000:]}")
    result = json.loads(Path(result_path).read_text())
    os.remove(result_path)
    return result


def search_scaling(args) -> None:
    print(f"search over fp16 shards of {args.shard_size:,} x {args.dim} rows, {args.queries:,} queries, top 50, "
          f"{os.cpu_count()} CPU thread(s):")
    print("| documents | corpus fp16 | seconds | peak RSS | peak RssAnon (before the search) | "
          "peak RssFile (before: libraries) |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory(dir=args.work_dir) as folder:
            flags = ["--folder", folder, "--size", str(size), "--shard_size", str(args.shard_size), "--dim", str(args.dim),
                     "--queries", str(args.queries)]
            run_child("write", flags)
            result = run_child("search", flags)
        corpus_mb = size * args.dim * 2 / 2 ** 20
        print(f"| {size:,} | {corpus_mb:,.0f} MB | {result['seconds']:.1f} | {result['peak_rss_mb']:,.0f} MB | "
              f"{result['peak_anon_mb']:,.0f} MB ({result['anon_before_mb']:,.0f} MB) | "
              f"{result['peak_file_mb']:,.0f} MB ({result['file_before_mb']:,.0f} MB) |",
              flush=True)


# ------------------------------------------------------------------------------------------ 1 vs 2 processes


def measured(command: list[str], env: dict) -> tuple[float, float]:
    """Seconds and the peak RSS (MB) of the largest process of ``command`` and its descendants (a fresh wrapper)."""
    wrapper = ("import resource, subprocess, sys, time; start = time.perf_counter(); "
               "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
               "print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
               "sys.exit(code)")
    finished = subprocess.run([sys.executable, "-c", wrapper, *command], cwd=ROOT, env=env, capture_output=True, text=True)
    if finished.returncode:
        sys.exit(f"{command} failed:\n{finished.stderr[-3000:]}")
    seconds, peak = finished.stdout.split()[-2:]
    return float(seconds), float(peak)


def encode_scaling(args) -> None:
    from finetune.training.arguments import EXAMPLE_TRAIN_FILE, EXAMPLE_VALIDATION_FILE, default_model_path
    from finetune.data.schema import read_records

    records = list(read_records(EXAMPLE_TRAIN_FILE))[:args.records or None]
    corpus = {text for record in records for text in record["pos_doc"] + record["neg_doc"]}
    extra = list(dict.fromkeys(text for record in read_records(EXAMPLE_VALIDATION_FILE)
                               for text in record["pos_doc"] + record["neg_doc"] if text not in corpus))
    documents = len(corpus) + len(extra)
    work = Path(tempfile.mkdtemp(dir=args.work_dir))
    data, extra_file = work / "data.jsonl", work / "extra.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("question", "pos_doc", "neg_doc")}) + "\n" for r in records))
    extra_file.write_text("".join(json.dumps({"text": text}) + "\n" for text in extra))
    common = ["--model_name_or_path", default_model_path(), "--input", str(data), "--extra_corpus", str(extra_file),
              "--num_negatives", "5",
              "--passage_max_length", str(args.max_seq_length), "--query_max_length", "64", "--batch_size", "32",
              "--shard_size", str(args.encode_shard_size), "--query_block_size", "128", "--keep_shards"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                  str(ROOT / "accelerate_configs" / "cpu_multi_process.yaml")]
    runs = [("1 process, 1 thread", "one_1t", 1, [sys.executable, "-m", "data_prep.mine"]),
            ("1 process, 2 threads", "one_2t", 2, [sys.executable, "-m", "data_prep.mine"]),
            ("2 processes, 1 thread each", "two_1t", 1, [*accelerate, "-m", "data_prep.mine"])]
    print(f"\ndata_prep.mine, all-MiniLM-L6-v2, {len(records):,} records, {documents:,} documents (the example train "
          f"set's, and the validation set's as --extra_corpus), passages cut at "
          f"{args.max_seq_length} tokens, shards of {args.encode_shard_size}, batch 32, {os.cpu_count()} CPU cores:")
    print("| run | seconds (end to end) | peak RSS (largest process) | output and shards equal to 1 process, 1 thread |")
    print("|---|---|---|---|")
    for label, name, threads, launcher in runs:
        output = work / f"{name}.jsonl"
        seconds, peak = measured([*launcher, *common, "--output", str(output)], {**env, "OMP_NUM_THREADS": str(threads)})
        reference = work / "one_1t.jsonl"
        shards = sorted((Path(f"{reference}.parts") / "corpus").glob("shard-*.npy"))
        same = output.read_bytes() == reference.read_bytes() and all(
            (Path(f"{output}.parts") / "corpus" / shard.name).read_bytes() == shard.read_bytes() for shard in shards)
        print(f"| {label} | {seconds:.1f} | {peak:,.0f} MB | {'yes' if same else 'NO'} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 400_000, 1_600_000],
                        help="Corpus sizes of the search part (default 100000 400000 1600000).")
    parser.add_argument("--shard_size", type=int, default=50_000, help="Rows per shard, search part (default 50000).")
    parser.add_argument("--dim", type=int, default=384, help="Embedding dimension, search part (default 384).")
    parser.add_argument("--queries", type=int, default=1024, help="Queries searched, search part (default 1024).")
    parser.add_argument("--records", type=int, default=0,
                        help="Example train records mined in the encoding part (default 0: all 2,025; with the "
                             "validation set's documents as extra corpus, 2,373 documents).")
    parser.add_argument("--max_seq_length", type=int, default=128, help="Passage tokens, encoding part (default 128).")
    parser.add_argument("--encode_shard_size", type=int, default=256,
                        help="Rows per shard, encoding part (default 256).")
    parser.add_argument("--work_dir", default=None, help="Where the shards go (default: the system's temporary folder).")
    parser.add_argument("--search_only", action="store_true", help="Only the search part.")
    parser.add_argument("--encode_only", action="store_true", help="Only the encoding part.")
    for hidden in ("--child", "--result", "--folder"):
        parser.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = {"write": child_write, "search": child_search}[args.child](args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        Path(args.result).write_text(json.dumps(result))
        return
    if not args.encode_only:
        search_scaling(args)
    if not args.search_only:
        encode_scaling(args)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
