"""Decoder embedders on CPU: samples/s and peak memory, padded vs padding-free, full fine-tune vs LoRA.

A Qwen3-layout decoder is built from its config (random weights; default about 100M parameters: hidden 768,
12 layers, 12 query / 4 key-value heads, MLP 2048) with a byte-level BPE tokenizer trained on the example
data, and prepared as training prepares any decoder (EOS appended, left padding, last-token pooling).
Each variant runs in a fresh process (so peak RSS is its own): AdamW over the trainable weights, the
ranking loss of ``--batch_size`` questions from the example training data against their positive and first
hard negative, ``--warmup`` untimed steps then ``--steps`` timed ones. Variants:

  padded       full fine-tune, ``--padding_free false``
  packed       full fine-tune, padding-free (``finetune.packing``, the default)
  padded_lora  LoRA r=16 on the attention and MLP projections, padded batches
  packed_lora  LoRA r=16, padding-free

    python benchmarks/llm_embedders.py                      # ~100M decoder, batch 8, 256-token documents
    python benchmarks/llm_embedders.py --layers 2 --steps 2  # a quick look
    python benchmarks/llm_embedders.py --hidden 1024 --layers 28 --batch_size 32 --max_length 512 --bf16  # on a GPU

On a GPU (used when there is one) peak memory is ``torch.cuda.max_memory_allocated``; ``--bf16`` autocasts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {"padded": (False, False), "packed": (True, False), "padded_lora": (False, True),
            "packed_lora": (True, True)}


def example_records() -> list[dict]:
    from finetune.arguments import EXAMPLE_TRAIN_FILE
    from finetune.schema import read_records

    return [record for record in read_records(EXAMPLE_TRAIN_FILE) if record["neg_doc"]]


def build_decoder(folder: str, hidden: int, layers: int, vocab: int) -> int:
    """Save a random Qwen3-layout decoder and a tokenizer trained on the example texts; returns its parameter count."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    texts = [text for record in example_records() for text in [record["question"], *record["pos_doc"],
                                                               *record["neg_doc"]]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", model_max_length=512)
    config = Qwen3Config(vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 192,
                         head_dim=64, max_position_embeddings=512, eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3Model(config)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run_variant(args) -> dict:
    """Train ``args.warmup + args.steps`` steps of one variant in this process; return its measurements."""
    import torch
    import torch.nn.functional as F

    from finetune.lora import LoraSettings
    from finetune.modeling import EmbeddingModel
    from finetune.text import TextSide

    torch.manual_seed(0)
    padding_free, lora = VARIANTS[args.variant]
    model = EmbeddingModel.from_pretrained(args.model, padding_free=padding_free,
                                           lora=LoraSettings(16, 32.0, 0.0) if lora else None,
                                           max_seq_length=args.max_length)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    records = example_records()
    queries, documents = TextSide("", 64), TextSide("", args.max_length)
    times, real_tokens, padded_tokens = [], 0, 0
    for step in range(args.warmup + args.steps):
        batch = [records[(step * args.batch_size + i) % len(records)] for i in range(args.batch_size)]
        q = queries.tokenize(model.tokenizer, [r["question"] for r in batch], padding=True, return_tensors="pt")
        d = documents.tokenize(model.tokenizer, [t for r in batch for t in (r["pos_doc"][0], r["neg_doc"][0])],
                               padding=True, return_tensors="pt")
        q, d = ({key: value.to(device) for key, value in batch.items()} for batch in (q, d))
        start = time.perf_counter()
        with autocast:
            query_emb = model(q["input_ids"], q["attention_mask"])  # (B, D)
            doc_emb = model(d["input_ids"], d["attention_mask"])  # (2B, D)
        scores = query_emb.float() @ doc_emb.float().T / 0.05  # (B, 2B): positive of query i at column 2i
        loss = F.cross_entropy(scores, torch.arange(0, 2 * args.batch_size, 2, device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            real_tokens += int(q["attention_mask"].sum() + d["attention_mask"].sum())
            padded_tokens += q["attention_mask"].numel() + d["attention_mask"].numel()
    seconds = sum(times)
    return {"variant": args.variant, "padding_free": model.position_rule is not None, "lora": lora,
            "trainable_parameters": sum(p.numel() for p in trainable),
            "samples_per_second": args.batch_size * args.steps / seconds,
            "seconds_per_step": seconds / args.steps, "real_tokens_per_step": real_tokens / args.steps,
            "padded_tokens_per_step": padded_tokens / args.steps,
            "peak_mb": (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "final_loss": float(loss)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768, help="Hidden size (multiple of 192).")
    parser.add_argument("--layers", type=int, default=12, help="Decoder layers.")
    parser.add_argument("--vocab", type=int, default=16000, help="Tokenizer vocabulary trained on the example data.")
    parser.add_argument("--batch_size", type=int, default=8, help="Questions per step (each with 2 documents).")
    parser.add_argument("--max_length", type=int, default=256, help="Document max tokens.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per variant.")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU).")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated subset of the variants.")
    parser.add_argument("--work_dir", default="outputs/benchmark_llm_embedders", help="Where the decoder is saved.")
    parser.add_argument("--output", default=None, help="Also write the rows as JSON here.")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant here
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return []
    folder = os.path.join(args.work_dir, f"qwen3_{args.hidden}x{args.layers}")
    parameters = build_decoder(folder, args.hidden, args.layers, args.vocab)
    print(f"Qwen3-layout decoder, {parameters / 1e6:.1f}M parameters ({folder}); batch {args.batch_size} questions "
          f"x (1 + 1) documents of <= {args.max_length} tokens; {args.steps} timed steps per variant.", flush=True)
    rows = []
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--variant", variant, "--model", folder,
                   *[f"--{name}={getattr(args, name)}" for name in ("batch_size", "max_length", "warmup", "steps")],
                   *(["--bf16"] if args.bf16 else [])]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if result.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["samples_per_second"]
    print(f"\n| variant | trainable params | samples/s | vs {rows[0]['variant']} | real / padded tokens per step | "
          f"peak MB ({rows[0]['device']}) |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['trainable_parameters'] / 1e6:.2f}M | {row['samples_per_second']:.2f} | "
              f"{row['samples_per_second'] / base:.2f}x | {row['real_tokens_per_step']:.0f} / "
              f"{row['padded_tokens_per_step']:.0f} | {row['peak_mb']:.0f} |")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
