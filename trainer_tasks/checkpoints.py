"""A run's checkpoints: written to a local folder, uploaded to the runs root in the background."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from types import TracebackType

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.plugins.io import CheckpointIO

from trainer_store.layout import LAST_CHECKPOINT, checkpoints_folder
from trainer_store.storage import Storage, StoreUnavailable, safe_key
from trainer_tasks.errors import LeaseLost

log = logging.getLogger(__name__)

# How long a run that ends or hands back waits for its checkpoints to reach the store.
FLUSH_TIMEOUT_S = 300.0


class CheckpointUploader:
    """Uploads the newest version of each saved checkpoint from a thread of its own: a training step
    never waits on the store. Checkpoints are replaced whole on disk, so an upload reads one version."""

    def __init__(self, storage: Storage, prefix: str) -> None:
        self._storage = storage
        self._prefix = prefix
        self._pending: dict[str, Path] = {}
        self._closed = False
        self._changed = threading.Condition()
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name=f"upload-{prefix}", daemon=True)
        self._thread.start()

    def submit(self, path: Path) -> None:
        with self._changed:
            self._pending[path.name] = path  # a newer save of the same file replaces one not yet sent
            self._changed.notify_all()

    def close(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Send what is pending, then stop; False when that took longer than `timeout_s`."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def abandon(self) -> None:
        """Send nothing more: another executor has taken the run over and writes its checkpoints now."""
        with self._changed:
            self._pending.clear()
        self.close()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._pending and not self._closed:
                    self._changed.wait()
                if not self._pending:
                    return
                name, path = self._pending.popitem()
            try:
                self._storage.upload(path, safe_key(self._prefix, name))
            except (StoreUnavailable, OSError) as exc:
                # The next save tries again; a resume starts from the newest checkpoint that made it.
                self.failures += 1
                log.warning("checkpoint %s not uploaded: %s", name, exc)


class UploadingCheckpointIO(TorchCheckpointIO):
    """Lightning's own local save, then the file goes to the uploader."""

    def __init__(self, uploader: CheckpointUploader) -> None:
        super().__init__()
        self._uploader = uploader

    def save_checkpoint(
        self, checkpoint: dict[str, object], path: str | Path, storage_options: object | None = None
    ) -> None:
        super().save_checkpoint(checkpoint, path, storage_options)
        self._uploader.submit(Path(path))


class CheckpointSync:
    """Where a run writes its checkpoints, and how they reach the store.

    On a local runs root, the root's own folder. On an object store, a folder of the run's workspace:
    entering brings the run's newest `last.ckpt` down (so a run resumes where it stopped, on any
    machine), every save is uploaded in the background, and leaving waits for the uploads, unless the
    lease was lost: then the new executor's checkpoints must not be overwritten.
    """

    def __init__(
        self, runs: Storage, run_id: str, workspace: Path, flush_timeout_s: float = FLUSH_TIMEOUT_S
    ) -> None:
        self._runs = runs
        self._flush_timeout_s = flush_timeout_s
        self._prefix = checkpoints_folder(run_id)
        local = runs.local_path(self._prefix)
        self.folder = local or workspace / "checkpoints"
        self._remote = local is None
        self._uploader: CheckpointUploader | None = None

    @property
    def plugin(self) -> CheckpointIO | None:
        """The checkpoint IO the Trainer uses: None for Lightning's own, on a local root."""
        return UploadingCheckpointIO(self._uploader) if self._uploader else None

    def __enter__(self) -> CheckpointSync:
        if self._remote:
            try:
                self._runs.download(safe_key(self._prefix, LAST_CHECKPOINT), self.folder / LAST_CHECKPOINT)
                log.info("resuming from the run's last checkpoint in the store")
            except FileNotFoundError:
                pass
            self._uploader = CheckpointUploader(self._runs, self._prefix)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._uploader is None:
            return
        if isinstance(exc, LeaseLost):
            self._uploader.abandon()
        elif not self._uploader.close(self._flush_timeout_s):
            log.warning(
                "checkpoints still uploading after %.0f s; going on without them", self._flush_timeout_s
            )
