"""Padding-free attention kernel check: packed forward == padded forward on this device, with the kernel chosen
automatically (flash-attn's varlen kernel on CUDA in bf16 when installed, else grouped SDPA).

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
    from finetune import packing

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    folder = build_tiny_decoder(tempfile.mkdtemp(), "qwen3")
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 33, (16,), generator=generator)
    mask = (torch.arange(32)[None] >= 32 - lengths[:, None]).long()
    input_ids = torch.randint(5, 200, (16, 32), generator=generator) * mask
    input_ids, mask = input_ids.to(device), mask.to(device)
    rows = []
    for attention in ("causal", "bidirectional"):
        padded = AutoModel.from_pretrained(folder).to(device, dtype).eval()
        padded.config.is_causal = attention == "causal"
        packed = copy.deepcopy(padded)
        rule = packing.enable_padding_free(packed)
        with torch.no_grad():
            reference = padded(input_ids=input_ids, attention_mask=mask).last_hidden_state * mask[..., None]
            result = packing.encode_packed(packed, input_ids, mask, rule)
        kernel = "flash-attn varlen" if packing.flash_varlen_kernel(result) is not None else "grouped SDPA"
        difference = (result.float() - reference.float()).abs().max().item()
        rows.append({"attention": attention, "device": str(device), "dtype": str(dtype), "kernel": kernel,
                     "max_difference": difference, "scale": reference.float().abs().max().item()})
        print(json.dumps(rows[-1]), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
