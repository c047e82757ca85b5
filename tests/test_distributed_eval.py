"""Two real CPU processes (gloo) give the same retrieval metrics as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_records, write_jsonl
from finetune.evaluation import evaluate_retrieval, load_retrieval_set
from finetune.modeling import EmbeddingModel

HERE = Path(__file__).resolve().parent


def test_two_process_metrics_equal_one_process(tiny_bert, tmp_path):
    data = write_jsonl(tmp_path / "val.jsonl", make_records(13, seed=7))  # odd sizes: uneven shards
    output = tmp_path / "metrics.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    accelerate = str(Path(sys.executable).parent / "accelerate")
    result = subprocess.run([accelerate, "launch", "--config_file",
                             str(Path(__file__).resolve().parent.parent / "accelerate_configs" / "cpu_multi_process.yaml"),
                             str(HERE / "distributed_eval_script.py"), tiny_bert, data, str(output)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(output.read_text())
    assert two["world_size"] == 2
    assert two["per_rank"][0] == two["per_rank"][1]  # every rank sees the full result

    model = EmbeddingModel.from_pretrained(tiny_bert)
    one = evaluate_retrieval(lambda t: model.encode(t, batch_size=4), lambda t: model.encode(t, batch_size=4),
                             load_retrieval_set([data]))
    for name, value in one.items():
        assert two["per_rank"][0][name] == pytest.approx(value, abs=1e-6), name
