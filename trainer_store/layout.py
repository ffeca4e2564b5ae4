"""Where each file lives: the three roots, and the keys under them, built only from validated ids."""

from __future__ import annotations

import os
from dataclasses import dataclass

from trainer_store.corpora import UPLOADS_FOLDER
from trainer_store.settings import Settings
from trainer_store.storage import InvalidKey, Storage, safe_key

# A model folder is whole once this file is in it: the worker writes it last, readers wait for it.
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
LAST_CHECKPOINT = "last.ckpt"


@dataclass(frozen=True)
class FileStores:
    """The corpus root (uploads and operators' corpora), the artifacts root (models and tokenizers) and
    the runs root (each run's checkpoints and data splits, removed when the run's record expires)."""

    corpora: Storage
    artifacts: Storage
    runs: Storage

    @classmethod
    def from_settings(cls, settings: Settings) -> FileStores:
        def root(url: str) -> Storage:
            return Storage(url, timeout_s=settings.store_timeout_s)

        return cls(root(settings.corpus_root), root(settings.artifacts_root), root(settings.runs_root))


def upload_key(corpus_id: str) -> str:
    return safe_key(UPLOADS_FOLDER, f"{corpus_id}.txt")


def model_folder(run_id: str) -> str:
    """Under the artifacts root: the trained model, its tokenizer and the run's record of itself."""
    return safe_key("models", run_id)


def tokenizer_folder(tokenizer_id: str) -> str:
    return safe_key("tokenizers", tokenizer_id)


def run_folder(run_id: str) -> str:
    """Under the runs root: everything a run works with, and nothing anyone downloads."""
    return safe_key(run_id)


def checkpoints_folder(run_id: str) -> str:
    return safe_key(run_id, "checkpoints")


def split_key(run_id: str, split: str) -> str:
    return safe_key(run_id, "splits", f"{split}.pt")


def corpus_key(corpora: Storage, value: str) -> str | None:
    """The key of the corpus file a request names, or None for anything outside the root or not a file.

    A key relative to the root; on a local root also an absolute path inside it (what clients and
    records from before roots could be object stores hold); on an object store also its own URL.
    """
    if corpora.is_local:
        return _local_corpus_key(corpora.url(), value)
    prefix = corpora.url() + "/"
    key = value.removeprefix(prefix)
    try:
        safe_key(key)
    except InvalidKey:
        return None
    return key if corpora.is_file(key) else None


def _local_corpus_key(root: str, value: str) -> str | None:
    # os.path, not pathlib: this runs on every train request, and is half the time this way.
    base = os.path.realpath(root)
    inside = base.rstrip(os.sep) + os.sep
    try:
        # realpath follows symlinks, so a link that points outside the root is caught here too; an
        # absolute value stays itself.
        resolved = os.path.realpath(os.path.join(base, value))
        if not (resolved.startswith(inside) and os.path.isfile(resolved)):
            return None
        return safe_key(resolved.removeprefix(inside))
    except (OSError, ValueError):  # a NUL byte, a name too long, a hidden file (InvalidKey)
        return None
