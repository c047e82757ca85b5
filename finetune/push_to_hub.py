"""Push a trained model folder to the Hugging Face Hub, as a SentenceTransformer model with its card.

    python -m finetune.push_to_hub OUTPUT_DIR --hub_model_id org/name [--private] [--commit_message MSG]

Uploads exactly the model (HF weights and config, or a --save_adapter_only LoRA adapter; tokenizer,
modules.json, 1_Pooling/, 2_Normalize/, sentence_bert_config.json, config_sentence_transformers.json) and
README.md, re-rendered first so that it names the repo and shows metrics saved after training (e.g.
``python -m finetune.evaluate ... --output_json OUTPUT_DIR/retrieval_metrics.json``). Checkpoints, optimizer states and trainer
logs stay local. The token comes from HF_TOKEN or `hf auth login`; it is never printed.
Errors end with one message and exit code 2; the folder is left as it was.
"""

from __future__ import annotations

import argparse
import sys

from finetune.publishing.hub import DEFAULT_COMMIT_MESSAGE, HubPushError, push_model, repo_url


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m finetune.push_to_hub", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="A model folder written by finetune/train.py (its --output_dir).")
    parser.add_argument("--hub_model_id", required=True,
                        help="Repository to push to, 'namespace/name' (or 'name' for your own namespace).")
    parser.add_argument("--private", action="store_true",
                        help="Create the repository as private (no effect when it already exists).")
    parser.add_argument("--commit_message", default=DEFAULT_COMMIT_MESSAGE, help="Commit message on the Hub.")
    parser.add_argument("--revision", default=None, help="Branch to push to (default: main).")
    parser.add_argument("--dataset", action="append", default=None, metavar="DATASET_ID",
                        help="Hub id of a dataset the model was trained on, for the card's metadata (repeatable).")
    parser.add_argument("--keep_model_card", action="store_true",
                        help="Upload README.md as it is instead of re-rendering it (e.g. after editing it by hand).")
    args = parser.parse_args(argv)
    repo_id = push_model(args.output_dir, args.hub_model_id, private=True if args.private else None,
                         commit_message=args.commit_message, revision=args.revision,
                         refresh_card=not args.keep_model_card, datasets=args.dataset)
    print(f"Pushed {args.output_dir} to {repo_url(repo_id)}\nLoad it with: SentenceTransformer({repo_id!r})")
    return repo_id


if __name__ == "__main__":
    try:
        main()
    except HubPushError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
