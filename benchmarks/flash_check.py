"""Padding-free attention kernel check: packed forward == padded forward on this device, with the kernel chosen
automatically (on CUDA in bf16: flash-attn's varlen kernel when installed, else PyTorch's varlen flash attention,
else FlexAttention; on CPU grouped SDPA), and each fused kernel named in turn.

A tiny random Qwen3-layout decoder (grouped-query attention), causal and bidirectional, a left-padded batch;
prints and writes the kernel used and the max difference of the real tokens' states (bf16 on CUDA, fp32 on CPU).

    python benchmarks/flash_check.py [--output check.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="Also write the rows as JSON here.")
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModel

    from conftest import build_tiny_decoder
    from finetune.model import packing

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    folder = build_tiny_decoder(tempfile.mkdtemp(), "qwen3", hidden_size=256, intermediate_size=512, head_dim=64,
                                num_attention_heads=4, num_key_value_heads=2)  # 64-dim heads: every kernel takes them
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 33, (16,), generator=generator)
    mask = (torch.arange(32)[None] >= 32 - lengths[:, None]).long()
    input_ids = torch.randint(5, 200, (16, 32), generator=generator) * mask
    input_ids, mask = input_ids.to(device), mask.to(device)
    from finetune.model import attention_kernels

    kernels = ["auto"] + ([name for name in attention_kernels.FUSED_KERNELS
                           if attention_kernels.unavailable_reason(name, device, dtype, 64) is None]
                          if device.type == "cuda" else [])
    rows = []
    for kernel in kernels:
        attention_kernels.set_preference(kernel)
        for attention in ("causal", "bidirectional"):
            padded = AutoModel.from_pretrained(folder).to(device, dtype).eval()
            padded.config.is_causal = attention == "causal"
            packed = copy.deepcopy(padded)
            rule = packing.enable_padding_free(packed)
            row = {"requested": kernel, "attention": attention, "device": str(device), "dtype": str(dtype),
                   "padding_free": rule is not None}
            if rule is None:  # refused by the load-time check (logged): the padded forward is what runs
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            with torch.no_grad():
                reference = padded(input_ids=input_ids, attention_mask=mask).last_hidden_state * mask[..., None]
                result = packing.encode_packed(packed, input_ids, mask, rule)
            row.update(kernel=attention_kernels.chosen_kernel(device, dtype, padded.config.head_dim),
                       max_difference=(result.float() - reference.float()).abs().max().item(),
                       scale=reference.float().abs().max().item(), dropped=dict(attention_kernels._failed))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.output:  # after each row: a kernel that compiles too long leaves the others' rows
                Path(args.output).write_text(json.dumps(rows, indent=2))
    attention_kernels.set_preference("auto")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
