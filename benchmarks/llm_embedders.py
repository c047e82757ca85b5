"""Decoder embedders on CPU: samples/s and peak memory, padded vs padding-free, full fine-tune vs LoRA.

A Qwen3-layout decoder is built from its config (random weights; default about 100M parameters: hidden 768,
12 layers, 12 query / 4 key-value heads, MLP 2048; ``--hidden 1024 --layers 28 --model_vocab 151936`` is
Qwen3-0.6B's shape) with a byte-level BPE tokenizer trained on the example
data, and prepared as training prepares any decoder (EOS appended, left padding, last-token pooling).
Each variant runs in a fresh process (so peak RSS is its own): AdamW over the trainable weights, the
ranking loss of ``--batch_size`` questions from the example training data against their positive and first
hard negative, ``--warmup`` untimed steps then ``--steps`` timed ones. Variants:

  padded       full fine-tune, ``--padding_free false``
  packed       full fine-tune, padding-free (``finetune.model.packing``, the default)
  padded_lora  LoRA r=16 on the attention and MLP projections, padded batches
  packed_lora  LoRA r=16, padding-free

    python benchmarks/llm_embedders.py                      # ~100M decoder, batch 8, 256-token documents
    python benchmarks/llm_embedders.py --layers 2 --steps 2  # a quick look
    python benchmarks/llm_embedders.py --hidden 1024 --layers 28 --model_vocab 151936 --batch_size 16 \
        --max_length 512 --bf16 --gradient_checkpointing     # Qwen3-0.6B's shape, on a GPU

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
    from finetune.training.arguments import EXAMPLE_TRAIN_FILE
    from finetune.data.schema import read_records

    return [record for record in read_records(EXAMPLE_TRAIN_FILE) if record["neg_doc"]]


def decoder_config(hidden: int, layers: int, vocab_size: int, tokenizer_vocab: int, eos_token_id: int):
    """A Qwen3 config of this hidden size. From 1024 up, Qwen3's own proportions: hidden / 64 query heads of 128, two
    per key/value head, MLP 3x (hidden 1024 x 28 layers with a 151,936-token vocabulary is Qwen3-0.6B: 16 query / 8
    key-value heads, MLP 3072). Below, the CPU benchmark's: heads of 64, hidden // 192 key/value heads, MLP 8/3 x.

    Earlier every size took hidden // 192 key/value heads, which for 1024 gave 16 query heads over 5 key/value
    heads: no valid grouping, and transformers' padded attention crashed on it (16 vs 15 heads); refused now."""
    from transformers import Qwen3Config

    if hidden >= 1024:
        head_dim, heads, mlp = 128, hidden // 64, hidden * 3  # Qwen3 projects to more than hidden: 16 x 128 for 1024
        kv_heads = heads // 2
    else:
        head_dim, heads, kv_heads, mlp = 64, hidden // 64, hidden // 192, hidden * 8 // 3
    if hidden % 64 or not kv_heads or heads % kv_heads:
        raise ValueError(f"--hidden {hidden} gives {heads} query heads over {kv_heads} key/value heads of {head_dim}: "
                         "query heads must be a multiple of key/value heads.")
    return Qwen3Config(vocab_size=max(vocab_size, tokenizer_vocab), hidden_size=hidden, intermediate_size=mlp,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       head_dim=head_dim, max_position_embeddings=512, eos_token_id=eos_token_id)


def build_decoder(folder: str, hidden: int, layers: int, vocab: int, model_vocab: int = 0) -> int:
    """Save a random Qwen3-layout decoder and a tokenizer trained on the example texts; returns its parameter count.

    ``model_vocab``: embedding rows of the model (e.g. Qwen3's 151,936), at least the tokenizer's ``vocab``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Model

    texts = [text for record in example_records() for text in [record["question"], *record["pos_doc"],
                                                               *record["neg_doc"]]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", model_max_length=512)
    config = decoder_config(hidden, layers, model_vocab, tokenizer.get_vocab_size(), fast.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3Model(config)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run_variant(args) -> dict:
    """Train ``args.warmup + args.steps`` steps of one variant in this process; return its measurements."""
    import torch
    import torch.nn.functional as F

    from finetune.model.lora import LoraSettings
    from finetune.model.embedding_model import EmbeddingModel
    from finetune.data.text import TextSide

    torch.manual_seed(0)
    padding_free, lora = VARIANTS[args.variant]
    model = EmbeddingModel.from_pretrained(args.model, padding_free=padding_free,
                                           lora=LoraSettings(16, 32.0, 0.0) if lora else None,
                                           max_seq_length=args.max_length)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
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
    from finetune.model import attention_kernels

    kernel = (attention_kernels.chosen_kernel(device, torch.bfloat16 if args.bf16 else torch.float32,
                                              model.encoder.config.head_dim) if model.position_rule else "padded")
    return {"variant": args.variant, "padding_free": model.position_rule is not None, "lora": lora, "kernel": kernel,
            "gradient_checkpointing": args.gradient_checkpointing,
            "trainable_parameters": sum(p.numel() for p in trainable),
            "samples_per_second": args.batch_size * args.steps / seconds,
            "seconds_per_step": seconds / args.steps, "real_tokens_per_step": real_tokens / args.steps,
            "padded_tokens_per_step": padded_tokens / args.steps,
            "peak_mb": (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "final_loss": float(loss)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768, help="Hidden size: a multiple of 192 below 1024, of 256 from 1024 (see decoder_config).")
    parser.add_argument("--layers", type=int, default=12, help="Decoder layers.")
    parser.add_argument("--vocab", type=int, default=16000, help="Tokenizer vocabulary trained on the example data.")
    parser.add_argument("--batch_size", type=int, default=8, help="Questions per step (each with 2 documents).")
    parser.add_argument("--max_length", type=int, default=256, help="Document max tokens.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first.")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per variant.")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU).")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="Recompute each layer's activations in the backward pass (as --gradient_checkpointing).")
    parser.add_argument("--model_vocab", type=int, default=0,
                        help="Embedding rows of the model (151936 for Qwen3's), at least the tokenizer's --vocab.")
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
    parameters = build_decoder(folder, args.hidden, args.layers, args.vocab, args.model_vocab)
    print(f"Qwen3-layout decoder, {parameters / 1e6:.1f}M parameters ({folder}); batch {args.batch_size} questions "
          f"x (1 + 1) documents of <= {args.max_length} tokens; {args.steps} timed steps per variant.", flush=True)
    rows = []
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--variant", variant, "--model", folder,
                   *[f"--{name}={getattr(args, name)}" for name in ("batch_size", "max_length", "warmup", "steps")],
                   *(["--bf16"] if args.bf16 else []),
                   *(["--gradient_checkpointing"] if args.gradient_checkpointing else [])]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if result.returncode != 0:
            rows.append({"variant": variant, "error": result.stderr[-3000:]})
            print(f"{variant} failed:\n{result.stderr[-3000:]}", flush=True)
        else:
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
        if args.output:  # written after each variant: a later one that runs out of time leaves these
            Path(args.output).write_text(json.dumps(rows, indent=2))
    if any("error" in row for row in rows):
        raise SystemExit(1)
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
