"""Experiment tracking and sharing around a training run: called by ``finetune.train.run``.

- :func:`configure_tracking`, before the Trainer is built: ``--wandb_project`` / ``--wandb_group``
  become WANDB_PROJECT / WANDB_RUN_GROUP, which the Trainer's WandbCallback reads when it starts
  the run (config, loss, learning rate and throughput are logged by that callback).
- :func:`share`, once the model, metrics and trainer state are saved: closes the wandb run,
  writes ``training_run.json`` and the model card (main process only) and, with ``--push_to_hub``,
  uploads the SentenceTransformer folder (``finetune.publishing.hub``).
"""

from __future__ import annotations

import logging
import os

from finetune.publishing.hub import HubPushError
from finetune.publishing.model_card import save_training_run, write_model_card

logger = logging.getLogger("finetune.publishing.sharing")


def configure_tracking(training_args) -> None:
    """Export the wandb project and group named on the command line (the environment's otherwise)."""
    if training_args.wandb_project:
        os.environ["WANDB_PROJECT"] = training_args.wandb_project
    if training_args.wandb_group:
        os.environ["WANDB_RUN_GROUP"] = training_args.wandb_group


def finish_tracking(training_args) -> str | None:
    """Close the wandb run the Trainer opened (flushing it to disk when offline); returns its URL when online."""
    if "wandb" not in (training_args.report_to or []):
        return None
    import wandb

    if wandb.run is None:  # not the main process, or the run was closed elsewhere
        return None
    url = wandb.run.url if not wandb.run.offline else None
    wandb.finish()
    return url


def _base_model_id(model_name_or_path: str) -> str | None:
    """The Hub id of a base model known locally only by path: the packaged all-MiniLM-L6-v2."""
    from finetune.training.arguments import HUB_MINILM, default_model_path

    packaged = default_model_path()
    if os.path.isdir(model_name_or_path) and os.path.isdir(packaged) and os.path.samefile(model_name_or_path, packaged):
        return HUB_MINILM
    return None


def share(trainer, model_args, data_args, training_args, *, num_train_records: int,
          num_validation_records: int, datasets_seen: list[dict] | None = None,
          forgetting: dict | None = None) -> str | None:
    """Close tracking, write the model card, push when asked; returns the Hub URL when pushed.

    A failed push raises HubPushError after the model and its card are saved; the message says
    how to push the folder later.
    """
    tracking_url = finish_tracking(training_args)
    if trainer.is_world_process_zero():
        save_training_run(training_args.output_dir, model_args, data_args, training_args,
                          num_train_records=num_train_records, num_validation_records=num_validation_records,
                          world_size=training_args.world_size, base_model_id=_base_model_id(model_args.model_name_or_path),
                          tracking_url=tracking_url, datasets_seen=datasets_seen, forgetting=forgetting)
        card = write_model_card(training_args.output_dir, repo_id=trainer.hub_model_id)
        logger.info("Model card written to %s", card)
    if not training_args.push_to_hub:
        return None
    try:
        url = trainer.push_to_hub(commit_message="End of training")
    except HubPushError as error:
        raise HubPushError(f"{error} The model is saved in {training_args.output_dir!r}; push it later with "
                           f"`python -m finetune.push_to_hub {training_args.output_dir} --hub_model_id "
                           f"{trainer.hub_model_id}`.") from None
    if url:
        logger.info("Model pushed to %s", url)
    return url
