"""Work cut into numbered blocks, shared over processes and resumable: every finished block is one file.

A :class:`PartsFolder` holds the finished blocks of one job (``<name>-NNNNNNN<ext>``, each written
atomically by the process that did it, so a file that exists is complete) and a ``settings.json``
fingerprint of what the blocks depend on: when it differs from the last run, the folder is emptied
first (old parts do not apply). :meth:`PartsFolder.assign` gives each process its share of the
blocks still missing, so a rerun after a kill redoes only those, spread evenly again.

Plain ``python`` is one process; under ``accelerate launch`` every process must create the folder and
call ``assign`` together (several machines need a file system they all see at the folder's path).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable

from finetune.training.checkpointing import write_json_atomic

logger = logging.getLogger("finetune.retrieval.work_parts")

SETTINGS_FILE = "settings.json"


def process_state():
    """accelerate's ``PartialState``: one process without a launcher; on CPU one gloo group, not one process each."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def fingerprint(*values) -> str:
    """sha256 of the JSON of ``values``: equal settings, equal fingerprint."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def texts_digest(texts: Iterable[str]) -> str:
    """sha256 of a sequence of texts (order matters)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def path_identity(path: str) -> list:
    """A file's or folder's (top-level files') path, size and mtime; a Hub id as it is. Changes when it is rewritten."""
    if os.path.isfile(path):
        return [os.path.abspath(path), os.path.getsize(path), os.stat(path).st_mtime_ns]
    if os.path.isdir(path):
        names = sorted(name for name in os.listdir(path) if os.path.isfile(os.path.join(path, name)))
        return [os.path.abspath(path), [[name, *path_identity(os.path.join(path, name))[1:]] for name in names]]
    return [path]


class PartsFolder:
    """Finished blocks of one job in ``path``; created (or emptied, when ``fingerprint`` changed) by the main process."""

    def __init__(self, path: str, fingerprint: str, state, *, name: str = "block", ext: str = ""):
        self.path, self.fingerprint, self.state, self.name, self.ext = path, fingerprint, state, name, ext
        if state.is_main_process:
            settings_file = os.path.join(path, SETTINGS_FILE)
            try:
                with open(settings_file, encoding="utf-8") as handle:
                    previous = json.load(handle)
            except (OSError, ValueError):
                previous = None
            if previous != {"fingerprint": fingerprint}:
                if previous is not None:
                    logger.info("%s holds parts of other settings or inputs; starting it afresh.", path)
                shutil.rmtree(path, ignore_errors=True)
                os.makedirs(path)
                write_json_atomic(settings_file, {"fingerprint": fingerprint})
            for leftover in glob.glob(os.path.join(path, ".*.tmp")):  # a killed writer's temporary file
                os.remove(leftover)
        state.wait_for_everyone()

    def part(self, index: int) -> str:
        return os.path.join(self.path, f"{self.name}-{index:07d}{self.ext}")

    def assign(self, count: int) -> tuple[list[int], int]:
        """(this process's blocks to do, number of blocks already done) of blocks 0..count-1.

        Every process lists the finished blocks before any writes a new one (a barrier follows), so
        all agree on what is missing; the missing blocks go round-robin to the processes.
        """
        missing = [index for index in range(count) if not os.path.isfile(self.part(index))]
        self.state.wait_for_everyone()
        return missing[self.state.process_index::self.state.num_processes], count - len(missing)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
