"""Push a trained model to the Hugging Face Hub: exactly the SentenceTransformer folder and its card.

``transformers.Trainer.push_to_hub`` uploads the HF layout (and, during training, copies of
checkpoint files and ``training_args.bin``); ``SentenceTransformer(repo_id)`` needs the files
around the weights too. So we upload ourselves, with ``huggingface_hub``: ``create_repo``, then
``upload_folder`` restricted to the files that make up the model (:func:`model_files`): the HF
weights, config and tokenizer at the root, ``modules.json``, ``sentence_bert_config.json``,
``config_sentence_transformers.json``, the module folders that ``modules.json`` names
(``1_Pooling/``, ``2_Normalize/``) and the model card ``README.md``. A ``--save_adapter_only`` folder
goes up the same way with the LoRA adapter (``adapter_config.json``, ``adapter_model.safetensors``) in
place of the HF weights and config; the card says so. Checkpoints, optimizer states, trainer logs,
metrics files and the ``lora_adapter/`` kept beside merged weights for resuming stay local.

The token comes from ``huggingface_hub`` (``HF_TOKEN``, else the ``hf auth login`` file) or an
explicit argument (``--hub_token``); it is sent in the Authorization header only and never
printed or written. Every failure is a ``HubPushError`` with one readable message, and the local
folder is left as it was (at most its card is re-rendered).
"""

from __future__ import annotations

import fnmatch
import glob
import json
from contextlib import contextmanager
from pathlib import Path

from finetune.publishing.model_card import CARD_FILE, DIMENSION_PLOT, write_model_card

# Root files of a saved model: HF config and weights, tokenizer files (fast, sentencepiece, BPE,
# WordPiece, tiktoken), remote-code modules that save_pretrained copies, and the ST files.
MODEL_ROOT_PATTERNS = (
    CARD_FILE, DIMENSION_PLOT, "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
    "config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "*.model", "*.tiktoken", "chat_template.jinja",
    "configuration_*.py", "modeling_*.py", "tokenization_*.py", "adapter_config.json", "adapter_model.safetensors",
)
REQUIRED_FILES = ("modules.json", "config_sentence_transformers.json")
DEFAULT_COMMIT_MESSAGE = "Upload fine-tuned SentenceTransformer model"


class HubPushError(RuntimeError):
    """The model could not be pushed; the message says why and what to do."""


def model_files(output_dir: str) -> list[str]:
    """Paths (relative, '/'-separated) of the files that make up the model in ``output_dir``, sorted.

    Raises HubPushError when the folder is not a complete SentenceTransformer model.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        raise HubPushError(f"{output_dir!r} is not a folder.")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if (folder / "adapter_config.json").is_file():  # a LoRA adapter (--save_adapter_only) on its base model
        missing += [name for name in ("adapter_model.safetensors",) if not (folder / name).is_file()]
    else:
        missing += [name for name in ("config.json",) if not (folder / name).is_file()]
        if not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
            missing.append("model.safetensors")
    if missing:
        raise HubPushError(f"{output_dir!r} is not a complete SentenceTransformer model folder (missing "
                           f"{', '.join(missing)}). Push the --output_dir of a finished training run.")
    files = [entry.name for entry in folder.iterdir()
             if entry.is_file() and any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in MODEL_ROOT_PATTERNS)]
    modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    for module in modules:
        subfolder = module.get("path", "").strip("/")
        if not subfolder:
            continue
        if not (folder / subfolder).is_dir():
            raise HubPushError(f"{output_dir!r}: modules.json names {subfolder!r}, which is not there.")
        files += [path.relative_to(folder).as_posix() for path in (folder / subfolder).rglob("*")
                  if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)]
    return sorted(set(files))


def resolve_token(token: str | None = None) -> str:
    """The token to push with: ``token`` if given, else HF_TOKEN or the saved login."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubPushError("No Hugging Face token found. Set HF_TOKEN to a token with write access "
                           "(https://huggingface.co/settings/tokens) or run `hf auth login`.")
    return token


@contextmanager
def _explained(action: str, repo_id: str):
    """Turn huggingface_hub / network exceptions into a HubPushError with one clear message."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except HubPushError:
        raise
    except OfflineModeIsEnabled:
        raise HubPushError(f"Cannot {action}: HF_HUB_OFFLINE is set. Unset it to push to the Hub.") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        reason = {401: "the token was rejected (invalid or expired); set HF_TOKEN or run `hf auth login` again",
                  403: f"the token may not write to {repo_id!r}; use a token with write access to that namespace",
                  404: f"repository {repo_id!r} not found, or the token cannot see it"}.get(status)
        server = (getattr(error, "server_message", None) or "").strip()
        detail = reason or f"the Hub answered HTTP {status}" + (f": {server}" if server else "")
        raise HubPushError(f"Cannot {action}: {detail}.") from None
    except ValueError as error:  # e.g. README.md metadata rejected by the Hub's YAML validation
        raise HubPushError(f"Cannot {action}: {error}") from None
    except Exception as error:  # transport errors (connection refused, DNS, timeouts)
        raise HubPushError(f"Cannot {action}: could not reach {constants.ENDPOINT} "
                           f"({type(error).__name__}: {error}). Check the network connection.") from None


def create_repo(repo_id: str, *, private: bool | None = None, token: str | None = None) -> str:
    """Create the model repo if it does not exist; returns its full id (``namespace/name``)."""
    from huggingface_hub import HfApi

    token = resolve_token(token)
    with _explained(f"create the Hub repository {repo_id!r}", repo_id):
        return HfApi().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id


def upload_model(output_dir: str, repo_id: str, *, token: str | None = None,
                 commit_message: str = DEFAULT_COMMIT_MESSAGE, revision: str | None = None) -> str:
    """Upload the model files of ``output_dir`` (see :func:`model_files`) in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    files = model_files(output_dir)
    token = resolve_token(token)
    with _explained(f"upload {output_dir!r} to {repo_id!r}", repo_id):
        commit = HfApi().upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message=commit_message,
                                       token=token, revision=revision, allow_patterns=[glob.escape(f) for f in files],
                                       ignore_patterns=["checkpoint-*", ".*"])
    return commit.commit_url


def push_model(output_dir: str, repo_id: str, *, private: bool | None = None, token: str | None = None,
               commit_message: str = DEFAULT_COMMIT_MESSAGE, revision: str | None = None,
               refresh_card: bool = True, datasets: list[str] | None = None) -> str:
    """Create the repo, re-render the card for it (unless ``refresh_card`` is False), upload; returns the full repo id.

    Checks the folder and the token before any network call.
    """
    model_files(output_dir)
    token = resolve_token(token)
    full_id = create_repo(repo_id, private=private, token=token)
    if refresh_card or not Path(output_dir, CARD_FILE).is_file():
        write_model_card(output_dir, repo_id=full_id, datasets=datasets)
    upload_model(output_dir, full_id, token=token, commit_message=commit_message, revision=revision)
    return full_id


def repo_url(repo_id: str) -> str:
    from huggingface_hub import constants

    return f"{constants.ENDPOINT}/{repo_id}"


class SentenceTransformerHubMixin:
    """Trainer methods that replace the Trainer's own Hub integration with :func:`push_model`.

    Mixed in before ``transformers.Trainer`` (``class T(SentenceTransformerHubMixin, EmbeddingTrainer)``):

    - ``init_hf_repo`` (called by ``Trainer.__init__`` with ``--push_to_hub``) creates the repo up front,
      so a missing token or permission fails before any training, with a HubPushError;
    - checkpoints are not pushed (the Trainer would upload the bare HF layout and training_args.bin);
    - ``save_model`` never pushes by itself; ``push_to_hub`` uploads the SentenceTransformer folder
      and its card, once, when the caller has written everything (``finetune.publishing.sharing``).
    """

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        self.push_in_progress = None
        if not self.is_world_process_zero():
            return
        repo_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        private = private if private is not None else self.args.hub_private_repo
        self.hub_model_id = create_repo(repo_id, private=private, token=token or self.args.hub_token)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        return None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=True)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None,
                    **kwargs) -> str | None:
        """Upload ``args.output_dir`` (already saved, card written) to ``hub_model_id``; main process only."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if not self.is_world_process_zero():
            return None
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        token = token or self.args.hub_token
        upload_model(self.args.output_dir, self.hub_model_id, token=token,
                     commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                     revision=revision if revision is not None else getattr(self.args, "hub_revision", None))
        return repo_url(self.hub_model_id)
