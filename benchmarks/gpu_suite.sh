#!/usr/bin/env bash
# One GPU, one script, under 8 minutes (each part has its own time limit), one JSON:
#   1. throughput, ours vs sentence-transformers' trainer: a BERT-large-sized encoder (random weights), bf16,
#      512 tokens, batch 32 + 1 hard negative; MFU against the card's datasheet bf16 peak and the measured one;
#   2. single-GPU DeepSpeed ZeRO-2 and FSDP sanity runs of the same job (samples/s, peak memory, MFU);
#   3. a decoder + LoRA step: a Qwen3-0.6B-shaped decoder (random weights), LoRA r=16, bf16, padded vs
#      padding-free (benchmarks/llm_embedders.py);
#   4. the padding-free attention kernel chosen on this device (flash-attn varlen when installed) against the
#      padded forward, causal and bidirectional (benchmarks/flash_check.py).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]            # default outputs/gpu_suite; writes OUT_DIR/gpu_suite.json
#   WHEELS=wheels/ bash benchmarks/gpu_suite.sh       # first install wheels carried to a machine without internet
#   SMOKE=1 bash benchmarks/gpu_suite.sh              # the plumbing on a CPU, tiny sizes (about 3 minutes here)
#
# A part that fails or runs out of time is recorded as such in the JSON; the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu_suite}
PY=${PYTHON:-python}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  $PY -m pip install --quiet --no-index --find-links "$WHEELS" -r requirements.txt || echo "wheel install failed"
fi
START=$(date +%s)
status() { echo "$1=$2" >> "$OUT/status.txt"; }
: > "$OUT/status.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || echo cpu > "$OUT/gpu.txt"

if [ -n "${SMOKE:-}" ]; then
  timeout 300 $PY benchmarks/throughput.py --variants theirs,ours --rounds 1 --steps_per_round 3 --batch_size 8 \
    --max_length 64 --no_quality --work_dir "$OUT/throughput"; status throughput $?
  timeout 300 $PY benchmarks/gpu_scaling.py --cpu_smoke --work_dir "$OUT/scaling"; status scaling $?
  timeout 200 $PY benchmarks/llm_embedders.py --hidden 192 --layers 2 --vocab 2000 --steps 1 \
    --variants padded_lora,packed_lora --work_dir "$OUT/llm" --output "$OUT/llm.json"; status llm $?
else
  timeout 190 $PY benchmarks/throughput.py --gpu --variants theirs,ours --rounds 1 --steps_per_round 15 \
    --work_dir "$OUT/throughput"; status throughput $?
  timeout 170 $PY benchmarks/gpu_scaling.py --size large --steps 15 --configs deepspeed_zero2.yaml,fsdp.yaml \
    --work_dir "$OUT/scaling"; status scaling $?
  timeout 80 $PY benchmarks/llm_embedders.py --hidden 1024 --layers 28 --vocab 16000 --batch_size 16 \
    --max_length 512 --steps 4 --bf16 --variants padded_lora,packed_lora --work_dir "$OUT/llm" \
    --output "$OUT/llm.json"; status llm $?
fi
timeout 40 $PY benchmarks/flash_check.py --output "$OUT/flash.json"; status attention_kernel $?

$PY - "$OUT" "$START" <<'PYEOF'
import json, os, sys, time
out, start = sys.argv[1], int(sys.argv[2])
def load(path):
    try:
        with open(os.path.join(out, path)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None
status = dict(line.strip().split("=", 1) for line in open(os.path.join(out, "status.txt")) if "=" in line)
suite = {"device": open(os.path.join(out, "gpu.txt")).read().strip(), "seconds": round(time.time() - start),
         "exit_codes": {name: int(code) for name, code in status.items()},  # 124: ran out of its time limit
         "throughput": load("throughput/throughput.json"), "scaling": load("scaling/gpu_scaling.json"),
         "llm_lora": load("llm.json"), "attention_kernel": load("flash.json")}
with open(os.path.join(out, "gpu_suite.json.tmp"), "w") as handle:
    json.dump(suite, handle, indent=2)
os.replace(os.path.join(out, "gpu_suite.json.tmp"), os.path.join(out, "gpu_suite.json"))
print(json.dumps({k: suite[k] for k in ("device", "seconds", "exit_codes")}))
PYEOF
