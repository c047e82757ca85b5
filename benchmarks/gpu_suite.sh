#!/usr/bin/env bash
# One GPU, one script, at most 9 minutes in all (each part has its own time limit inside a global deadline), one JSON:
#   0. the GPU test lane (python -m pytest -m gpu tests/test_gpu.py): padded == padding-free in bf16 per kernel,
#      the kernel chosen, one training step each of the default job, GradCache, a LoRA decoder, ZeRO-2 and FSDP;
#   1. throughput, ours vs sentence-transformers' trainer: a BERT-large-sized encoder (random weights), bf16, 512
#      tokens, batch 32 + 1 hard negative, 'long' length profile (documents of ~6 example documents joined);
#   2. the same on the 'realistic' profile (the example data's own lengths: most of a padded batch is padding);
#   3. single-GPU DeepSpeed ZeRO-2 and FSDP runs of job 1 (samples/s, peak memory, MFU; each its own time limit);
#   4. a Qwen3-0.6B-shaped decoder (random weights), bf16, batch 16 x (1 + 1), 512 tokens, gradient checkpointing:
#      LoRA r=16 padded vs padding-free, and a padding-free full-weights row (benchmarks/llm_embedders.py);
#   5. the padding-free attention kernels against the padded forward, causal and bidirectional (flash_check.py).
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        # default outputs/gpu_suite; writes OUT_DIR/gpu_suite.json
#   TOKENIZER=dir bash benchmarks/gpu_suite.sh    # the random encoder's tokenizer (default: packaged MiniLM's, else
#                                                 # one trained on the example data): nothing is downloaded
#   SMOKE=1 bash benchmarks/gpu_suite.sh          # the plumbing on a CPU, tiny sizes (about 4 minutes here)
# On the project's GPU machine (no internet): `source .gpu/setup.sh` first (../shared/gpu/prepare.sh).
#
# A part that fails or runs out of time is recorded as such in the JSON (exit code, 124 = time limit, and the tail
# of its log); the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu_suite}
PY=${PYTHON:-python}
TOK=${TOKENIZER:+--tokenizer $TOKENIZER}
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$(( START + ${SUITE_SECONDS:-540} ))
: > "$OUT/status.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || echo cpu > "$OUT/gpu.txt"
# part NAME LIMIT command...: run with min(LIMIT, time left) seconds, log to OUT/NAME.log, record exit code and time
part() {
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - $(date +%s) )); (( left < limit )) && limit=$left
  if (( limit < 15 )); then echo "$name=skipped 0" >> "$OUT/status.txt"; return; fi
  local begin=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  echo "$name=$code $(( $(date +%s) - begin ))" >> "$OUT/status.txt"
  echo "== $name: exit $code in $(( $(date +%s) - begin )) s"
}

if [ -n "${SMOKE:-}" ]; then
  part lane 120 $PY -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider
  part throughput_long 200 $PY benchmarks/throughput.py --variants theirs,ours --rounds 1 --steps_per_round 3 \
    --batch_size 8 --max_length 64 --profile long --no_quality --work_dir "$OUT/throughput_long"
  part throughput_realistic 200 $PY benchmarks/throughput.py --variants theirs,ours --rounds 1 --steps_per_round 3 \
    --batch_size 8 --max_length 64 --profile realistic --no_quality --work_dir "$OUT/throughput_realistic"
  part scaling 200 $PY benchmarks/gpu_scaling.py --cpu_smoke --work_dir "$OUT/scaling"
  part llm 200 $PY benchmarks/llm_embedders.py --hidden 192 --layers 2 --vocab 2000 --steps 1 --gradient_checkpointing \
    --variants padded_lora,packed_lora,packed --work_dir "$OUT/llm_work" --output "$OUT/llm.json"
else
  part lane 170 $PY -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider
  part throughput_long 150 $PY benchmarks/throughput.py --gpu --profile long --variants theirs,ours,ours_padded \
    --rounds 1 --steps_per_round 10 $TOK --work_dir "$OUT/throughput_long"
  MODEL="$OUT/throughput_long/bert-large-random"
  [ -f "$MODEL/modules.json" ] || MODEL=""
  part throughput_realistic 90 $PY benchmarks/throughput.py --gpu --profile realistic \
    --variants theirs,ours,ours_padded --rounds 1 --steps_per_round 10 $TOK ${MODEL:+--model $MODEL} \
    --work_dir "$OUT/throughput_realistic"
  part llm 120 $PY benchmarks/llm_embedders.py --hidden 1024 --layers 28 --vocab 16000 \
    --batch_size 16 --max_length 512 --warmup 1 --steps 3 --bf16 --gradient_checkpointing \
    --variants padded_lora,packed_lora,packed --work_dir "$OUT/llm_work" --output "$OUT/llm.json"
  part scaling 120 $PY benchmarks/gpu_scaling.py --size large --steps 10 --configs deepspeed_zero2.yaml,fsdp.yaml \
    --timeout 55 $TOK ${MODEL:+--model $MODEL} --work_dir "$OUT/scaling"
fi
part attention_kernel 40 $PY benchmarks/flash_check.py --output "$OUT/flash.json"

$PY - "$OUT" "$START" <<'PYEOF'
import json, os, re, sys, time
out, start = sys.argv[1], int(sys.argv[2])
def load(path):
    try:
        with open(os.path.join(out, path)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None
def tail(name, size=3000):
    try:
        with open(os.path.join(out, f"{name}.log"), errors="replace") as handle:
            return handle.read()[-size:]
    except OSError:
        return None
status = {}
for line in open(os.path.join(out, "status.txt")):
    if "=" in line:
        name, rest = line.strip().split("=", 1)
        code, seconds = rest.split()
        status[name] = {"exit_code": None if code == "skipped" else int(code), "seconds": int(seconds)}
lane_tail = tail("lane", 6000) or ""
suite = {"device": open(os.path.join(out, "gpu.txt")).read().strip(), "seconds": round(time.time() - start),
         "parts": status,  # exit_code 124: ran out of its time limit; None: no time was left to start it
         "lane_summary": [line for line in lane_tail.splitlines()
                          if re.search(r"\d+ (passed|failed|skipped|error)|PASSED|FAILED|ERROR|SKIPPED", line)],
         "throughput_long": load("throughput_long/throughput.json"),
         "throughput_realistic": load("throughput_realistic/throughput.json"),
         "scaling": load("scaling/gpu_scaling.json"), "llm_lora": load("llm.json"), "attention_kernel": load("flash.json"),
         "failed_logs": {name: tail(name) for name, part in status.items() if part["exit_code"] not in (0,)}}
with open(os.path.join(out, "gpu_suite.json.tmp"), "w") as handle:
    json.dump(suite, handle, indent=2)
os.replace(os.path.join(out, "gpu_suite.json.tmp"), os.path.join(out, "gpu_suite.json"))
print(json.dumps({k: suite[k] for k in ("device", "seconds", "parts", "lane_summary")}, indent=1))
PYEOF
