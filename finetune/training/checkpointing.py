"""Nothing half-written is ever taken for complete: atomic file writes, staged folder saves, checkpoint markers.

- :func:`atomic_write`: the one way this project writes a file (model card, training_run.json,
  metrics, mined/converted data, reports): a temporary file in the same folder, renamed over the
  target only when the writer finished without an error.
- :func:`save_staged`: a whole folder (a SentenceTransformer model) is written into ``.saving/``
  and moved into place with its key file (``modules.json``) last.
- :data:`CHECKPOINT_COMPLETE`: written into ``checkpoint-N`` after every process saved its part;
  :func:`last_complete_checkpoint` resumes only from checkpoints that have it.
- :func:`checkpoint_write_guard`: a checkpoint whose writing fails (a full disk...) is removed and the
  error names it and the complete checkpoint the same command resumes from.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator

logger = logging.getLogger("finetune.training.checkpointing")

CHECKPOINT_COMPLETE = "checkpoint_complete.json"  # written last: a checkpoint without it was cut short
STAGING_FOLDER = ".saving"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def open_text(binary) -> io.TextIOWrapper:
    """A UTF-8 text handle with "\\n" line ends over a binary handle."""
    return io.TextIOWrapper(binary, encoding="utf-8", newline="\n")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, binary: bool = False) -> Iterator:
    """A handle (text, or binary with ``binary=True``) whose content replaces ``path`` only when the block
    ends without an error.

    Written to a temporary file in the same folder (same file system), then ``os.replace``d, so a
    reader never sees half a file and a crash (or a full disk) leaves the old file intact. Text
    written to ``.gz`` paths is gzip-compressed with mtime 0 (byte-identical output for identical input).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    descriptor, tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with contextlib.suppress(OSError):  # mkstemp makes owner-only files; give the mode a plain open() would
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        with os.fdopen(descriptor, "wb") as raw:
            if binary:
                yield raw
            elif path.endswith(".gz"):
                with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as compressed, open_text(compressed) as handle:
                    yield handle
            else:
                handle = open_text(raw)
                yield handle
                handle.flush()
                handle.detach()  # raw stays open for the fsync below
            raw.flush()
            os.fsync(raw.fileno())  # on disk before the rename: a power loss never leaves an empty file under the name
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


def write_json_atomic(path: str | os.PathLike, content, *, indent: int | None = None) -> None:
    write_text_atomic(path, json.dumps(content, indent=indent) + ("\n" if indent is not None else ""))


def move_into_place(staging: str, output_dir: str, last: str) -> None:
    """Move every entry of ``staging`` into ``output_dir`` (replacing), ``last`` at the very end; remove ``staging``."""
    if os.path.exists(os.path.join(output_dir, last)):
        os.remove(os.path.join(output_dir, last))  # the folder stops looking complete until the move ends
    names = sorted(os.listdir(staging), key=lambda name: name == last)
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)


def save_staged(output_dir: str, write: Callable[[str], None], *, last: str = "modules.json",
                extra_files: dict[str, str] | None = None) -> None:
    """Call ``write(folder)`` on an empty staging folder inside ``output_dir`` (and write ``extra_files``, name ->
    text, beside), then move its files into place.

    A kill during ``write`` leaves ``output_dir`` as it was; ``last`` (the file that makes loaders
    take the folder for a model) arrives after everything else.
    """
    staging = os.path.join(output_dir, STAGING_FOLDER)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    write(staging)
    for name, text in (extra_files or {}).items():
        with open(os.path.join(staging, name), "w", encoding="utf-8") as handle:
            handle.write(text)
    move_into_place(staging, output_dir, last=last)


def mark_checkpoint_complete(folder: str, global_step: int) -> None:
    write_json_atomic(os.path.join(folder, CHECKPOINT_COMPLETE), {"global_step": global_step})


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` holding the completion marker; cut-short ones are skipped with a warning."""
    checkpoints = sorted((int(match.group(1)), name) for name in os.listdir(output_dir)
                         if (match := re.fullmatch(r"checkpoint-(\d+)", name)) and os.path.isdir(os.path.join(output_dir, name)))
    for _step, name in reversed(checkpoints):
        folder = os.path.join(output_dir, name)
        if os.path.isfile(os.path.join(folder, CHECKPOINT_COMPLETE)):
            return folder
        logger.warning("Skipping %s: it was not completely written (the run was stopped while saving).", folder)
    return None


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed; the previous complete checkpoint is kept."""


@contextlib.contextmanager
def checkpoint_write_guard(folder: str, remove: bool = True) -> Iterator[None]:
    """Run the writing of checkpoint ``folder``; if it fails, remove the partial folder (``remove``: the main
    process; it frees its space) and raise :class:`CheckpointWriteError` naming the checkpoint to resume from.
    Without its marker the folder is never taken for complete either way.

    torch.save reports a full disk as a RuntimeError ("file write failed"), not an OSError, so every error is
    caught; the free space left is said too.
    """
    try:
        yield
    except Exception as error:  # noqa: BLE001 - re-raised, with what to do
        if remove:
            shutil.rmtree(folder, ignore_errors=True)
        output_dir = os.path.dirname(os.path.abspath(folder))
        last = last_complete_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        free_mb = shutil.disk_usage(output_dir).free / 2**20 if os.path.isdir(output_dir) else float("nan")
        raise CheckpointWriteError(
            f"Writing {folder} failed{' (no space left on device)' if full else ''}: {error}. It was removed; "
            + (f"{last} is complete and the same command resumes from it" if last else "no complete checkpoint exists "
               "yet, so the same command starts over")
            + f" ({free_mb:.0f} MB free in {output_dir}).") from error


def save_checkpoint_safely(trainer, save: Callable[[], None], run_dir: str) -> None:
    """The Trainer's checkpoint save (``save``, on every process), made crash-safe.

    The Trainer would rotate old checkpoints out inside ``save``, before the new one is complete (other processes
    may still be writing their parts, or fail): with ``save_total_limit=1`` a crash then left nothing to resume
    from. Here its rotation is held back; a failed write raises :class:`CheckpointWriteError`; the marker is
    written once every process has written its part; only then does the main process rotate.
    """
    from transformers.trainer_utils import rotate_checkpoints

    args = trainer.args
    folder = os.path.join(run_dir, f"checkpoint-{trainer.state.global_step}")
    limit, args.save_total_limit = args.save_total_limit, None
    try:
        with checkpoint_write_guard(folder, remove=args.should_save):
            save()
    finally:
        args.save_total_limit = limit
    trainer.accelerator.wait_for_everyone()
    if args.should_save and os.path.isdir(folder):
        mark_checkpoint_complete(folder, trainer.state.global_step)
        rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                           best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)
