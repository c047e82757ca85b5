"""Peak memory of one training step against the batch size, plain loss vs GradCache.

Each (batch size, variant) runs in a fresh process, so its peak RSS (CPU) or max_memory_allocated
(GPU) is its own. The plain loss keeps every activation of the batch alive; GradCache keeps one
mini-batch's, so its peak should stay nearly flat.

    python benchmarks/gradcache_memory.py [--batch_sizes 32 128 512 2048] [--mini_batch_size 32]
        [--model_name_or_path M] [--max_length 32] [--num_hard_negatives 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def one_step(model_path: str, batch_size: int, mini_batch_size: int | None, max_length: int, k: int) -> dict:
    """Run one forward/backward of the ranking loss in this process; return time and peak memory."""
    import torch

    from finetune.data.examples import pad_sequences
    from finetune.training.gradcache import backward_through_chunks, embed_without_graph
    from finetune.objectives.losses import ranking_loss
    from finetune.model.embedding_model import EmbeddingModel
    from finetune.data.schema import read_records
    from finetune.training.arguments import EXAMPLE_TRAIN_FILE

    model = EmbeddingModel.from_pretrained(model_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    records = []
    for record in read_records(EXAMPLE_TRAIN_FILE):
        if record["neg_doc"]:
            records.append(record)
    records = [records[i % len(records)] for i in range(batch_size)]
    tokenize = lambda texts: pad_sequences([model.tokenizer(t, truncation=True, max_length=max_length)["input_ids"]  # noqa: E731
                                            for t in texts], model.tokenizer.pad_token_id)
    q_ids, q_mask = (t.to(device) for t in tokenize([r["question"] for r in records]))
    docs = [r["pos_doc"][0] for r in records] + [r["neg_doc"][j % len(r["neg_doc"])] for r in records for j in range(k)]
    d_ids, d_mask = (t.to(device) for t in tokenize(docs))
    start = time.perf_counter()
    if mini_batch_size is None:
        loss = ranking_loss(model(q_ids, q_mask), model(d_ids, d_mask), num_negatives=k)
        loss.backward()
    else:
        q_emb, q_chunks = embed_without_graph(model, q_ids, q_mask, mini_batch_size)
        d_emb, d_chunks = embed_without_graph(model, d_ids, d_mask, mini_batch_size)
        q_emb.requires_grad_(), d_emb.requires_grad_()
        loss = ranking_loss(q_emb, d_emb, num_negatives=k)
        grads = torch.autograd.grad(loss, [q_emb, d_emb])
        backward_through_chunks(model, q_chunks + d_chunks, torch.cat(grads), backward=lambda t: t.backward(),
                                no_sync=__import__("contextlib").nullcontext)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"batch_size": batch_size, "gradcache": mini_batch_size, "seconds": seconds, "peak_mb": peak_mb,
            "loss": loss.item(), "device": device.type}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Encoder (default: the packaged all-MiniLM-L6-v2).")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 128, 512, 2048], help="Queries per step.")
    parser.add_argument("--mini_batch_size", type=int, default=32, help="GradCache mini-batch (texts).")
    parser.add_argument("--max_length", type=int, default=32, help="Tokens per text (default 32, to keep CPU runs short).")
    parser.add_argument("--num_hard_negatives", type=int, default=1, help="Hard negatives per query.")
    parser.add_argument("--skip_plain_above", type=int, default=4096, help="Do not run the plain loss above this batch.")
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._child:
        batch, mini = json.loads(args._child)
        print(json.dumps(one_step(args.model_name_or_path, batch, mini, args.max_length, args.num_hard_negatives)))
        return
    if args.model_name_or_path is None:
        from finetune.training.arguments import default_model_path
        args.model_name_or_path = default_model_path()
    rows = []
    for batch in args.batch_sizes:
        for mini in (None, args.mini_batch_size):
            if mini is None and batch > args.skip_plain_above:
                continue
            command = [sys.executable, __file__, "--_child", json.dumps([batch, mini]), "--model_name_or_path",
                       args.model_name_or_path, "--max_length", str(args.max_length),
                       "--num_hard_negatives", str(args.num_hard_negatives)]
            output = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if output.returncode != 0:
                rows.append({"batch_size": batch, "gradcache": mini, "error": output.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(output.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    base = {row["gradcache"]: row["peak_mb"] for row in rows if row["batch_size"] == args.batch_sizes[0] and "peak_mb" in row}
    print(f"\n| batch | plain peak MB | GradCache({args.mini_batch_size}) peak MB | plain s | GradCache s |")
    print("|---|---|---|---|---|")
    for batch in args.batch_sizes:
        plain = next((r for r in rows if r["batch_size"] == batch and r["gradcache"] is None), {})
        cached = next((r for r in rows if r["batch_size"] == batch and r["gradcache"] is not None), {})
        fmt = lambda r, key: f"{r[key]:.0f}" if key in r else r.get("error", "-")  # noqa: E731
        print(f"| {batch} | {fmt(plain, 'peak_mb')} | {fmt(cached, 'peak_mb')} | {fmt(plain, 'seconds')} | "
              f"{fmt(cached, 'seconds')} |")
    largest = next((r for r in rows if r["batch_size"] == args.batch_sizes[-1] and r["gradcache"] and "peak_mb" in r), None)
    if largest and args.mini_batch_size in base:
        print(f"\nGradCache peak at batch {args.batch_sizes[-1]} / at batch {args.batch_sizes[0]}: "
              f"{largest['peak_mb'] / base[args.mini_batch_size]:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
