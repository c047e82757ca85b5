"""Each transformers/accelerate internal listed in finetune.training.trainer_internals still exists and means what we use it
for in the installed versions: an upgrade that changes one fails here, naming it."""

import importlib
import inspect

import pytest
import torch
from transformers import Trainer

from finetune.training.trainer_internals import TRAINER_INTERNALS

METHODS = [entry for entry in TRAINER_INTERNALS if entry.uses.startswith("Trainer.")]


def our_callable(path: str):
    """``package.module.Class.method`` -> the object: the longest importable prefix, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            target = getattr(target, attribute)
        return target
    raise ImportError(path)


@pytest.mark.parametrize("entry", METHODS, ids=[entry.where for entry in METHODS])
def test_each_trainer_method_we_override_still_exists_with_our_parameters(entry):
    name = entry.uses.split(".", 1)[1]
    theirs = getattr(Trainer, name, None)
    assert theirs is not None, f"transformers.Trainer.{name} is gone: {entry.where} overrides it ({entry.why})"
    their_parameters = list(inspect.signature(theirs).parameters)
    assert their_parameters[:len(entry.parameters)] == list(entry.parameters), (
        f"Trainer.{name}{tuple(their_parameters)} changed; {entry.where} overrides it with {entry.parameters}")
    ours = our_callable(entry.where)
    assert list(inspect.signature(ours).parameters)[:len(entry.parameters)] == list(entry.parameters), entry.where


def test_every_private_trainer_override_is_listed():
    """A new private override in the trainer or the Hub mixin must join the list (with its reason)."""
    from finetune.publishing.hub import SentenceTransformerHubMixin
    from finetune.training.trainer import EmbeddingTrainer

    listed = {entry.where.rsplit(".", 1)[1] for entry in METHODS}
    for cls in (EmbeddingTrainer, SentenceTransformerHubMixin):
        private = {name for name in vars(cls) if name.startswith("_") and not name.startswith("__")
                   and callable(getattr(Trainer, name, None))}
        assert private <= listed, f"{cls.__name__} overrides unlisted Trainer internals: {sorted(private - listed)}"


def test_the_checkpoint_rotation_we_hold_back_is_the_one_save_total_limit_drives():
    from transformers.trainer_utils import rotate_checkpoints

    entry = next(entry for entry in TRAINER_INTERNALS if entry.uses == "transformers.trainer_utils.rotate_checkpoints")
    assert list(inspect.signature(rotate_checkpoints).parameters)[:len(entry.parameters)] == list(entry.parameters)
    assert "save_total_limit" in inspect.getsource(Trainer._save_checkpoint), \
        "Trainer._save_checkpoint no longer reads save_total_limit: save_checkpoint_safely's hold-back does nothing"


def test_our_sampler_is_found_under_accelerates_wrappers_of_a_resumed_epoch():
    """accelerate's shard and skip wrappers still expose the sampler they wrap (finetune.data.samplers.epoch_sampler_of)."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader

    from finetune.data.samplers import EpochShuffleSampler, epoch_sampler_of

    sampler = EpochShuffleSampler(16, seed=1)
    loader = DataLoader(list(range(16)), batch_size=2, sampler=sampler, collate_fn=lambda batch: batch)
    sharded = prepare_data_loader(loader, device=torch.device("cpu"), num_processes=2, process_index=0,
                                  put_on_device=False)
    for wrapped in (sharded, skip_first_batches(sharded, 1)):
        assert epoch_sampler_of(wrapped) is sampler
