"""WiSE-FT: the weights ``(1 - a) x base + a x tuned`` as a SentenceTransformer folder, and a sweep over ``a`` that
keeps the fine-tune's domain gain within a limit on what it costs on a general set.

    python -m finetune.interpolate --base B --tuned T --alpha 0.5 --output_dir OUT
    python -m finetune.interpolate --base B --tuned T --sweep 0,0.25,0.5,0.75,1 --data DOMAIN \\
        --general_data GENERAL --max_general_drop 0.01 --output_dir OUT

Interpolating a fine-tuned model's weights with those it started from keeps much of the fine-tune's gain and
gives back much of what it forgot (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022). The
weights are the HF model's safetensors at the folder root (``model.safetensors``, or shards and
``model.safetensors.index.json``), written in the tuned folder's layout (same files, keys, dtypes); the rest of
the model (tokenizer, modules.json, pooling, prompts, sentence_bert_config...) is copied from the tuned folder.
A full fine-tune or a LoRA fine-tune saved with merged weights works; an adapter-only folder does not (no model
weights). Each value is computed in fp32 (fp64 stays fp64) and stored in the tuned weights' dtype; ``a = 0``
gives the base's weights (in that dtype) and ``a = 1`` the tuned's, bit for bit.

The sweep writes each ``a`` into a folder beside ``--output_dir``, evaluates it on the domain set (and the general
set) with ``finetune.retrieval.evaluation.evaluate_model``, prints the table, and moves the chosen folder into
place with the report (``interpolation_sweep.json``) and the plot (``interpolation_sweep.png``) inside it. The
choice: the best domain score among the ``a`` whose general score is at most ``--max_general_drop`` below the
base's (``a = 0``, always evaluated); ties go to the smaller ``a``. One process (not under accelerate launch).
A killed run leaves only a hidden ``.OUT.saving-*`` / ``.OUT.sweep-*`` folder beside ``--output_dir``, which the next
run removes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass

import torch

logger = logging.getLogger("finetune.interpolate")

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"  # peft's: a --save_adapter_only folder, which holds no model weights
TRAINING_RUN_FILE = "training_run.json"  # query/passage lengths and eval batch size the evaluation reads
RECORD_FILE = "interpolation.json"  # base, tuned and alpha of a written folder; marks it as ours to replace
REPORT_FILE = "interpolation_sweep.json"
PLOT_FILE = "interpolation_sweep.png"
DROP_TOLERANCE = 1e-9  # a drop equal to the limit up to float noise (0.71 - 0.70 = 0.01000000000000001) is within it


@dataclass
class WeightLayout:
    """The safetensors weights of a folder: file name -> its keys, and the shard index when there is one."""

    folder: str
    files: dict[str, list[str]]
    index: dict | None

    def key_files(self) -> dict[str, str]:
        return {key: name for name, keys in self.files.items() for key in keys}


def read_layout(folder: str, option: str) -> WeightLayout:
    """The weights at the root of ``folder``; ``option`` (``--base``/``--tuned``) names it in errors."""
    from safetensors import safe_open

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{option} {folder!r}: no such folder.")
    if os.path.isfile(os.path.join(folder, WEIGHTS_FILE)):
        with safe_open(os.path.join(folder, WEIGHTS_FILE), "pt") as handle:
            return WeightLayout(folder, {WEIGHTS_FILE: list(handle.keys())}, None)
    if os.path.isfile(os.path.join(folder, WEIGHTS_INDEX)):
        with open(os.path.join(folder, WEIGHTS_INDEX), encoding="utf-8") as handle:
            index = json.load(handle)
        files: dict[str, list[str]] = {}
        for key, name in index["weight_map"].items():
            files.setdefault(name, []).append(key)
        return WeightLayout(folder, files, index)
    if os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
        raise ValueError(f"{option} {folder!r} is a LoRA adapter without model weights (adapter_config.json, no "
                         f"{WEIGHTS_FILE}): save merged weights (train without --save_adapter_only) and interpolate "
                         "those.")
    raise ValueError(f"{option} {folder!r} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX} at its root.")


def recomputed_buffers(folder: str) -> set[str]:
    """Keys of the buffers the model class computes instead of loading (non-persistent: BERT's position_ids, rotary
    inv_freq...). Checkpoints saved by older transformers still hold some (the packaged all-MiniLM-L6-v2 has
    ``embeddings.position_ids``) and loading ignores them, so they may be in one folder only."""
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):  # the module tree only: no memory, no initialisation
            model = AutoModel.from_config(config)
    except Exception as error:  # an architecture this transformers cannot build: every key must then match
        logger.info("No buffer list for %s (%s): every key must be in both folders.", folder, error)
        return set()
    return {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() for name in module._non_persistent_buffers_set}


def _tensor_info(layout: WeightLayout) -> dict[str, tuple[list[int], str]]:
    """key -> (shape, safetensors dtype), read from the file headers only."""
    from safetensors import safe_open

    info = {}
    for name, keys in layout.files.items():
        with safe_open(os.path.join(layout.folder, name), "pt") as handle:
            for key in keys:
                piece = handle.get_slice(key)
                info[key] = (list(piece.get_shape()), piece.get_dtype())
    return info


def refusal(base: str, tuned: str) -> str:
    """The start of every refusal: both folders, by their options."""
    return f"cannot interpolate --base {base!r} and --tuned {tuned!r}"


def check_compatible(base: str, tuned: str) -> tuple[WeightLayout, WeightLayout]:
    """The two layouts, once the folders are known to hold the same weights (keys and shapes) and the tuned one a
    whole SentenceTransformer model: else a one-line ValueError naming both folders (and the first differing key)."""
    try:
        base_layout, tuned_layout = read_layout(base, "--base"), read_layout(tuned, "--tuned")
        model_files(tuned)
    except ValueError as error:
        raise ValueError(f"{refusal(base, tuned)}: {error}") from None
    base_info, tuned_info = _tensor_info(base_layout), _tensor_info(tuned_layout)
    ignored = recomputed_buffers(tuned)
    only = sorted((set(base_info) ^ set(tuned_info)) - ignored)
    if only:
        side = "--base" if only[0] in base_info else "--tuned"
        raise ValueError(f"{refusal(base, tuned)}: different weights, first differing key {only[0]!r} (only in {side}; "
                         f"{len(only)} key(s) in one folder only). Both must be checkpoints of one architecture.")
    for key in sorted(set(base_info) & set(tuned_info)):
        if base_info[key][0] != tuned_info[key][0]:
            raise ValueError(f"{refusal(base, tuned)}: different shapes, first differing key {key!r}: "
                             f"{base_info[key][0]} in --base, {tuned_info[key][0]} in --tuned. Both must be "
                             "checkpoints of one architecture.")
    return base_layout, tuned_layout


def check_alpha(alpha: float, base: str, tuned: str) -> None:
    if not 0.0 <= alpha <= 1.0:  # NaN fails too
        raise ValueError(f"{refusal(base, tuned)}: alpha must be within [0, 1], got {alpha}.")


def interpolate_tensor(base: torch.Tensor, tuned: torch.Tensor, alpha: float, key: str) -> torch.Tensor:
    """``(1 - alpha) x base + alpha x tuned`` in fp32 (fp64 stays fp64), in ``tuned``'s dtype; the endpoints are
    copies, so they are exact (``0 x inf`` would be NaN, and a sum rounds)."""
    if alpha == 0.0:
        return base.to(tuned.dtype)
    if alpha == 1.0:
        return tuned
    if not tuned.is_floating_point() or not base.is_floating_point():
        if torch.equal(base, tuned.to(base.dtype)):
            return tuned
        raise ValueError(f"{key!r} holds integers that differ between the two folders: nothing to interpolate.")
    compute = torch.promote_types(tuned.dtype, torch.float32)
    return ((1.0 - alpha) * base.to(compute) + alpha * tuned.to(compute)).to(tuned.dtype)


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def model_files(tuned: str) -> list[str]:
    """What the output copies from the tuned folder: the files that make up the model (``finetune.publishing.hub``'s list:
    tokenizer, config, ST files, the module folders modules.json names), less the weights and the model card (its
    metrics are the tuned model's), plus ``training_run.json`` (its query/passage lengths and eval batch size are
    what ``finetune.evaluate`` then uses, so every alpha is encoded alike and ``a = 1`` scores as the tuned model
    does). Checkpoints, ``lora_adapter/`` and trainer logs stay behind."""
    import fnmatch

    from finetune.publishing.hub import HubPushError, model_files as hub_model_files
    from finetune.publishing.model_card import CARD_FILE, DIMENSION_PLOT

    try:
        names = hub_model_files(tuned)
    except HubPushError as error:
        raise ValueError(str(error)) from None
    weights = (WEIGHTS_FILE, WEIGHTS_INDEX, "model-*-of-*.safetensors", CARD_FILE, DIMENSION_PLOT)
    names = [name for name in names if not any(fnmatch.fnmatchcase(name, pattern) for pattern in weights)]
    if os.path.isfile(os.path.join(tuned, TRAINING_RUN_FILE)):
        names.append(TRAINING_RUN_FILE)
    return names


def write_weights(base_layout: WeightLayout, tuned_layout: WeightLayout, alpha: float, folder: str) -> None:
    """The interpolated weights into ``folder``, file by file in the tuned layout (one shard in memory at a time)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_files = base_layout.key_files()
    base_handles = {}
    try:
        for name, keys in tuned_layout.files.items():
            with safe_open(os.path.join(tuned_layout.folder, name), "pt") as tuned_handle:
                metadata = tuned_handle.metadata()
                tensors = {}
                for key in keys:
                    tuned_tensor = tuned_handle.get_tensor(key)
                    if key not in base_files:  # a recomputed buffer the base does not hold: loading ignores it
                        tensors[key] = tuned_tensor
                        continue
                    base_name = base_files[key]
                    if base_name not in base_handles:
                        base_handles[base_name] = safe_open(os.path.join(base_layout.folder, base_name), "pt")
                    try:
                        tensors[key] = interpolate_tensor(base_handles[base_name].get_tensor(key), tuned_tensor,
                                                          alpha, key).contiguous()
                    except ValueError as error:
                        raise ValueError(f"{refusal(base_layout.folder, tuned_layout.folder)}: {error}") from None
            save_file(tensors, os.path.join(folder, name), metadata=metadata)
            _fsync(os.path.join(folder, name))
            del tensors
    finally:
        base_handles.clear()
    if tuned_layout.index is not None:
        shutil.copy2(os.path.join(tuned_layout.folder, WEIGHTS_INDEX), os.path.join(folder, WEIGHTS_INDEX))


def write_model(base: str, tuned: str, alpha: float, folder: str, layouts: tuple[WeightLayout, WeightLayout]) -> None:
    """A complete SentenceTransformer folder at ``folder`` (which must be new or empty): weights, copied files,
    ``interpolation.json``."""
    os.makedirs(folder, exist_ok=True)
    write_weights(*layouts, alpha, folder)
    for name in model_files(tuned):
        target = os.path.join(folder, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(tuned, name), target)
    with open(os.path.join(folder, RECORD_FILE), "w", encoding="utf-8") as handle:
        json.dump({"base": os.path.abspath(base), "tuned": os.path.abspath(tuned), "alpha": alpha,
                   "weights": "(1 - alpha) * base + alpha * tuned"}, handle, indent=2)
        handle.write("\n")


def check_output_dir(output_dir: str, base: str, tuned: str) -> None:
    """Refuse, before any work, an output that would overwrite an input or a folder that is not ours."""
    target = os.path.realpath(output_dir)
    if target in (os.path.realpath(base), os.path.realpath(tuned)):
        raise ValueError(f"--output_dir {output_dir!r} is the --base or --tuned folder: give a new folder.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.isfile(os.path.join(output_dir,
                                                                                                RECORD_FILE)):
        raise ValueError(f"--output_dir {output_dir!r} exists and holds something other than an interpolated model: "
                         "give a new or empty folder.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir!r} is a file.")


def staging_folder(output_dir: str, tag: str) -> str:
    """A new hidden folder beside ``output_dir`` (same file system, so the final rename is atomic), with the mode
    a plain mkdir gives (``tempfile.mkdtemp``'s would be owner-only). Those that killed runs left are removed."""
    output_dir = os.path.abspath(output_dir)
    parent, prefix = os.path.dirname(output_dir), f".{os.path.basename(output_dir)}."
    os.makedirs(parent, exist_ok=True)
    for name in os.listdir(parent):
        match = re.fullmatch(re.escape(prefix) + r"(?:saving|sweep)-(\d+)-[0-9a-f]{8}(?:\.replaced)?", name)
        if match and not _running(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    folder = os.path.join(parent, f"{prefix}{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(folder)
    return folder


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def publish(folder: str, output_dir: str) -> None:
    """Rename the finished ``folder`` to ``output_dir``; an empty folder or an earlier interpolation there goes."""
    if os.path.isdir(output_dir) and not os.listdir(output_dir):
        os.rmdir(output_dir)
    if os.path.isdir(output_dir):  # an earlier output (check_output_dir): out of the way, then the rename, then gone
        old = f"{folder}.replaced"
        os.rename(output_dir, old)
        os.rename(folder, output_dir)
        shutil.rmtree(old)
    else:
        os.rename(folder, output_dir)


def interpolate(base: str, tuned: str, alpha: float, output_dir: str) -> None:
    """Write ``(1 - alpha) x base + alpha x tuned`` as a SentenceTransformer folder at ``output_dir``, atomically:
    into a temporary folder beside it, renamed when complete (a failure leaves ``output_dir`` as it was)."""
    check_alpha(alpha, base, tuned)
    layouts = check_compatible(base, tuned)
    check_output_dir(output_dir, base, tuned)
    staging = staging_folder(output_dir, "saving")
    try:
        write_model(base, tuned, alpha, staging, layouts)
        publish(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def parse_alphas(text: str, base: str, tuned: str) -> list[float]:
    """"0,0.25,0.5" -> sorted unique alphas, with 0 (the base: the reference of the general drop) always in."""
    try:
        alphas = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--sweep takes comma-separated numbers in [0, 1], got {text!r}.") from None
    for alpha in alphas:
        check_alpha(alpha, base, tuned)
    return sorted(set(alphas) | {0.0})


def format_table(rows: list[dict], metric: str, chosen: float) -> str:
    general = any(row["general"] is not None for row in rows)
    header = ["alpha", f"domain {metric}"] + ([f"general {metric}", "general drop"] if general else []) + ["chosen"]
    lines = []
    for row in rows:
        cells = [f"{row['alpha']:g}", f"{row['domain'][metric]:.4f}"]
        if general:
            cells += [f"{row['general'][metric]:.4f}", f"{row['general_drop']:+.4f}" + ("" if row["within_limit"]
                                                                                       else " (over)")]
        lines.append(cells + ["<-" if row["alpha"] == chosen else ""])
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(c) for c in lines])


def plot_sweep(report: dict, path: str) -> None:
    """Domain and general score against alpha, the general floor (base - limit) and the chosen alpha."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from finetune.training.checkpointing import atomic_write

    metric, rows = report["metric"], report["rows"]
    alphas = [row["alpha"] for row in rows]
    figure, axes = plt.subplots(figsize=(6.5, 4.5))
    axes.plot(alphas, [row["domain"][metric] for row in rows], "o-", color="tab:blue", label="domain")
    if rows[0]["general"] is not None:
        axes.plot(alphas, [row["general"][metric] for row in rows], "s-", color="tab:orange", label="general")
        if report["max_general_drop"] is not None:
            axes.axhline(rows[0]["general"][metric] - report["max_general_drop"], color="tab:orange", linestyle="--",
                         linewidth=1, label=f"general floor (base - {report['max_general_drop']:g})")
    axes.axvline(report["chosen_alpha"], color="black", linestyle=":", label=f"chosen alpha {report['chosen_alpha']:g}")
    axes.set(title="WiSE-FT: (1 - alpha) x base + alpha x tuned", xlabel="alpha", ylabel=metric)
    axes.legend()
    figure.tight_layout()
    with atomic_write(path, binary=True) as handle:
        figure.savefig(handle, format="png", dpi=100)
    plt.close(figure)


def sweep(args) -> dict:
    """Evaluate every alpha of ``--sweep``; the chosen one goes to ``--output_dir`` with the report and the plot."""
    from finetune.training.checkpointing import write_json_atomic
    from finetune.retrieval.evaluation import evaluate_model
    from finetune.retrieval.sets import load_retrieval_set

    alphas = parse_alphas(args.sweep, args.base, args.tuned)
    layouts = check_compatible(args.base, args.tuned)
    check_output_dir(args.output_dir, args.base, args.tuned)
    domain = load_retrieval_set(args.data)
    general = load_retrieval_set(args.general_data) if args.general_data else None
    limit = args.max_general_drop if general is not None else None
    work = staging_folder(args.output_dir, "sweep")
    rows, best, best_folder = [], None, None
    try:
        for alpha in alphas:
            folder = os.path.join(work, f"alpha-{alpha:g}")
            write_model(args.base, args.tuned, alpha, folder, layouts)
            row = {"alpha": alpha, "domain": evaluate_model(folder, domain, batch_size=args.batch_size),
                   "general": None, "general_drop": None, "within_limit": True}
            if general is not None:
                row["general"] = evaluate_model(folder, general, batch_size=args.batch_size)
                row["general_drop"] = rows[0]["general"][args.metric] - row["general"][args.metric] if rows else 0.0
                row["within_limit"] = row["general_drop"] <= limit + DROP_TOLERANCE
            logger.info("alpha %g: domain %s %.4f%s", alpha, args.metric, row["domain"][args.metric],
                        "" if general is None else f", general {row['general'][args.metric]:.4f}")
            rows.append(row)
            # Alphas ascend, so a strict > leaves a tie with the smaller alpha (the one closer to the base).
            if row["within_limit"] and (best is None or row["domain"][args.metric] > best["domain"][args.metric]):
                if best_folder is not None:
                    shutil.rmtree(best_folder)  # one candidate on disk at a time besides the one being evaluated
                best, best_folder = row, folder
            else:
                shutil.rmtree(folder)
        report = {"base": os.path.abspath(args.base), "tuned": os.path.abspath(args.tuned),
                  "data": args.data, "general_data": args.general_data, "metric": args.metric,
                  "max_general_drop": limit, "chosen_alpha": best["alpha"],
                  "output_dir": os.path.abspath(args.output_dir), "rows": rows}
        write_json_atomic(os.path.join(best_folder, REPORT_FILE), report, indent=2)
        plot_sweep(report, os.path.join(best_folder, PLOT_FILE))
        print(format_table(rows, args.metric, best["alpha"]))
        publish(best_folder, args.output_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("alpha %g written to %s", best["alpha"], args.output_dir)
    return report


def build_parser() -> argparse.ArgumentParser:
    from finetune.retrieval.evaluation import METRIC_NAMES

    parser = argparse.ArgumentParser(prog="python -m finetune.interpolate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="The model the fine-tune started from: a folder with its HF "
                                                      "weights (safetensors) at the root.")
    parser.add_argument("--tuned", required=True,
                        help="The fine-tuned SentenceTransformer folder (full fine-tune or merged LoRA); the output "
                             "takes its layout, tokenizer and modules.")
    parser.add_argument("--output_dir", required=True, help="Where the interpolated model goes: a new or empty folder, "
                                                            "or an earlier output of this command (replaced).")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--alpha", type=float, help="Write (1 - alpha) x base + alpha x tuned, alpha in [0, 1].")
    mode.add_argument("--sweep", help="Comma-separated alphas in [0, 1] to evaluate (0 is always added: the base is "
                                      "the reference of the general drop), e.g. 0,0.25,0.5,0.75,1.")
    parser.add_argument("--data", nargs="+",
                        help="With --sweep (required): the domain set, seed-format file(s)/glob(s) or a BEIR folder.")
    parser.add_argument("--general_data", nargs="+", help="With --sweep: a general set in the same forms; each alpha's "
                                                          "drop on it against the base limits the choice.")
    parser.add_argument("--max_general_drop", type=float, default=0.01,
                        help="With --general_data: the largest drop of the general score below the base's that the "
                             "chosen alpha may have, as an absolute difference of --metric (default 0.01).")
    parser.add_argument("--metric", default="ndcg@10", choices=METRIC_NAMES,
                        help="The score compared and chosen on (default ndcg@10).")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="Texts per forward pass in the evaluation (default: as finetune.evaluate: the tuned "
                             "training's eval batch size from training_run.json, else 64).")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.alpha is not None:
        for option in ("data", "general_data"):
            if getattr(args, option):
                raise ValueError(f"--{option} goes with --sweep; --alpha writes one folder without evaluating.")
        interpolate(args.base, args.tuned, args.alpha, args.output_dir)
        logger.info("alpha %g written to %s", args.alpha, args.output_dir)
        return {"base": args.base, "tuned": args.tuned, "alpha": args.alpha, "output_dir": args.output_dir}
    if not args.data:
        raise ValueError("--sweep needs --data (the domain set).")
    if not args.max_general_drop >= 0 or math.isinf(args.max_general_drop):
        raise ValueError(f"--max_general_drop must be a finite number >= 0, got {args.max_general_drop}.")
    return sweep(args)


def cli() -> None:
    from finetune.training.distributed import run_command

    run_command(main)


if __name__ == "__main__":
    cli()
