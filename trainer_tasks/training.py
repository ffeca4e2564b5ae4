"""One training run on real parts: tokenizer, data, model, a Lightning Trainer wired to events, the store."""

from __future__ import annotations

import logging
import math
import multiprocessing
import platform
import shutil
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import lightning as L
import tokenizers
import torch
import transformers
from lightning.pytorch.callbacks import ModelCheckpoint
from tokenizers import Tokenizer
from torch.utils.data import DataLoader
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import logging as hf_logging

from schemas.events import TrainCompleted, TrainStarted
from trainer_store.layout import MANIFEST, TOKENIZER_FILE, model_folder, split_key, tokenizer_folder
from trainer_store.storage import safe_key
from trainer_tasks import distributed, resources
from trainer_tasks.artifacts import (
    MetricsLog,
    captured_logs,
    plot_loss_curve,
    write_manifest,
    write_metrics_csv,
)
from trainer_tasks.callbacks import EventCallback, ResumableCheckpoint, RunGuard
from trainer_tasks.checkpoints import CheckpointSync
from trainer_tasks.data import BlockDataset, Splits, encode, split_blocks
from trainer_tasks.errors import UserError
from trainer_tasks.model import LanguageModel, build_model, count_parameters
from trainer_tasks.runner import RunContext
from trainer_tasks.tokenization import (
    fetch_corpus,
    load_tokenizer,
    read_corpus,
    save_tokenizer,
    train_tokenizer,
)

# Celery's prefork children are daemonic and may not fork DataLoader workers.
DATALOADER_WORKERS = 0
SAMPLE_TOKENS = 40
LOG_FILE = "logs.jsonl"

log = logging.getLogger(__name__)

# Banners ("GPU available", tips), save progress bars and warnings about choices made here on purpose
# (no DataLoader workers) are noise in a worker log.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
warnings.filterwarnings("ignore", message=".*there is no last checkpoint available.*")
# A run resumed on another machine restores its checkpoint into a folder of another name; that is expected.
warnings.filterwarnings("ignore", message=".*The dirpath has changed from.*")
# Each DDP rank logs its own validation loss; rank zero's is the one reported.
warnings.filterwarnings("ignore", message=".*sync_dist=True.*")


@dataclass(frozen=True)
class Hardware:
    """How Lightning runs this request on this worker."""

    accelerator: str
    devices: int
    strategy: str  # "ddp" on several devices: each rank is a process trainer_tasks.distributed started
    precision: Literal["32-true", "bf16-mixed", "16-mixed"]


def hardware(context: RunContext) -> Hardware:
    """The request's accelerator and devices on what this worker has; a request it cannot meet is the
    user's error, with what to change."""
    request = context.request
    on_gpu = request.accelerator != "cpu" and torch.cuda.is_available()
    if request.accelerator == "gpu" and not on_gpu:
        raise UserError(
            f"this run asks for a GPU, but worker {context.worker} (queue {context.queue!r}) has none; "
            'send it to a queue with a GPU worker (GET /queues), or ask for accelerator "cpu" or "auto"'
        )
    if request.devices > 1 and multiprocessing.current_process().daemon:
        raise UserError(
            f"devices={request.devices} needs a worker whose pool may start processes (the gpu_worker "
            f"line runs --pool threads); worker {context.worker} on queue {context.queue!r} cannot: "
            "ask for devices 1"
        )
    strategy = "ddp" if request.devices > 1 else "auto"
    if not on_gpu:
        return Hardware("cpu", request.devices, strategy, "32-true")
    if request.devices > torch.cuda.device_count():  # pragma: no cover - CUDA only
        raise UserError(f"this run asks for {request.devices} GPUs; worker {context.worker} has fewer")
    # bf16 where the GPU has it (Ampere and later), else fp16 with loss scaling.
    if torch.cuda.is_bf16_supported():  # pragma: no cover - CUDA only
        return Hardware("gpu", request.devices, strategy, "bf16-mixed")
    return Hardware("gpu", request.devices, strategy, "16-mixed")  # pragma: no cover - CUDA only


class Stopwatch:
    """Seconds spent in each step since the last, in order: the run log says where setup time goes."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, step: str) -> None:
        now = time.monotonic()
        self.laps[step] = now - self._last
        self._last = now

    def summary(self) -> str:
        return ", ".join(f"{step} {seconds:.3f} s" for step, seconds in self.laps.items())


def train(context: RunContext) -> None:
    """Train the run's model in a scratch folder of its own; the files that outlive it go to the store."""
    if context.request.devices > 1 and not distributed.in_rank():
        hardware(context)  # a request this worker cannot meet fails before any process starts
        distributed.launch(context, train)
        return
    with (
        context.cache.workspace(f"run-{context.run_id}") as workspace,
        captured_logs(workspace / LOG_FILE, context.log_lines),
    ):
        _train(context, workspace, time.time())


def _train(context: RunContext, workspace: Path, started_at: float) -> None:
    request = context.request
    setup = Stopwatch()
    torch.manual_seed(request.seed)
    torch.set_num_threads(context.torch_threads)
    chosen = hardware(context)
    text = read_corpus(fetch_corpus(context.files.corpora, context.cache, request.corpus_path, workspace))
    setup.lap("corpus")
    tokenizer = (
        train_tokenizer(text)
        if request.tokenizer_id == "auto"
        else load_tokenizer(fetch_tokenizer(context, workspace))
    )
    setup.lap("tokenizer")
    splits = split_blocks(
        encode(tokenizer, text),
        request.max_seq_len,
        request.batch_size,
        request.holdout_fraction,
        request.test_fraction,
    )
    setup.lap("encoding")
    save_splits(splits, context, workspace / "splits")
    setup.lap("splits")
    model = build_model(
        request.model_family, request.model_size, tokenizer.get_vocab_size(), request.max_seq_len
    )
    setup.lap("model")
    metrics = MetricsLog()
    guard = RunGuard(
        context.run_id,
        learning_rate=request.learning_rate,
        cancel_requested=context.cancel_requested,
        lease_lost=context.lease_lost,
        over_time_limit=context.over_time_limit,
        max_run_s=context.max_run_s,
    )
    events = EventCallback(
        context.reporter,
        started=started_event(context),
        metrics=metrics,
        interval_s=context.progress_interval_s,
        samples_per_step=request.batch_size,
        tokens_per_sample=request.max_seq_len,
        resources=resources.sample,
    )
    module = LanguageModel(model, request.learning_rate)
    with CheckpointSync(context.files.runs, context.run_id, workspace) as checkpoints:
        trainer = L.Trainer(
            max_epochs=request.num_epochs,
            accelerator=chosen.accelerator,
            devices=chosen.devices,
            strategy=chosen.strategy,
            precision=chosen.precision,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            gradient_clip_val=1.0,
            default_root_dir=workspace,
            plugins=checkpoints.plugin,
            callbacks=[
                guard,  # first: a step it refuses is recorded by no other callback
                events,
                ModelCheckpoint(
                    dirpath=checkpoints.folder,
                    filename="best",
                    monitor="val_loss",
                    mode="min",
                    save_last=True,
                    # Fixed names: a resume on another machine (another folder) overwrites what it brought
                    # down instead of writing last-v1.ckpt beside it.
                    enable_version_counter=False,
                ),
                # `last.ckpt` within an epoch too: a worker that dies loses at most this much training.
                ModelCheckpoint(
                    dirpath=checkpoints.folder,
                    save_top_k=0,
                    save_last=True,
                    train_time_interval=timedelta(seconds=context.checkpoint_interval_s),
                    enable_version_counter=False,
                ),
                ResumableCheckpoint(dirpath=checkpoints.folder, filename="last"),
            ],
        )
        train_loader, validation_loader = loaders(splits, request.batch_size, request.seed)
        setup.lap("trainer")
        # What happens between here and the started event is Lightning's own setup inside fit().
        log.info("run %s: set up for training in %s", context.run_id, setup.summary())
        fit_started = time.monotonic()
        # A redelivered run (its worker died or shut down) resumes from its last checkpoint, if it has one.
        trainer.fit(
            module, train_dataloaders=train_loader, val_dataloaders=validation_loader, ckpt_path="last"
        )
        if trainer.current_epoch >= request.num_epochs and "val_loss" not in trainer.callback_metrics:
            # Resumed from a checkpoint taken after the last epoch (the attempt before ended as it
            # finished): nothing was left to fit, so the loss it ended with is measured again.
            trainer.validate(module, dataloaders=validation_loader, verbose=False)
        val_loss = guard.final_loss(trainer)
        if not trainer.is_global_zero:
            return  # one model and one completed event per run: rank zero's
        # Saved and uploaded after fit() has returned, so no hook of Lightning's waits on the store.
        details = save_artifacts(context, module, tokenizer, metrics, splits, started_at, workspace)
        # Sent once the artifacts are in the store, so whoever reacts to it finds them there.
        context.reporter.completed(
            TrainCompleted(
                request_id=context.run_id,
                run_id=context.run_id,
                user_id=request.user_id,
                loss=val_loss,
                perplexity=math.exp(val_loss),
                artifact_path=details.artifact_path,
                sample=details.sample,
                params=details.params,
                duration_s=round(time.monotonic() - fit_started, 3),
            )
        )


def fetch_tokenizer(context: RunContext, workspace: Path) -> Path:
    """The trained tokenizer's tokenizer.json (the API accepted only a completed one)."""
    key = safe_key(tokenizer_folder(context.request.tokenizer_id), TOKENIZER_FILE)
    return context.cache.fetch(context.files.artifacts, key, workspace / TOKENIZER_FILE)


def started_event(context: RunContext) -> TrainStarted:
    request = context.request
    return TrainStarted(
        request_id=context.run_id,
        run_id=context.run_id,
        user_id=request.user_id,
        model_family=request.model_family,
        model_size=request.model_size,
        total_epochs=request.num_epochs,
        queue=context.queue,
        cpu_cores=resources.available_cpus(),
        memory_mb=resources.memory_mb(),
        optimal_threads=torch.get_num_threads(),
        optimal_workers=DATALOADER_WORKERS,
        batch_size=request.batch_size,
        learning_rate=request.learning_rate,
        worker=context.worker,
        accelerator=context.request.accelerator,
        devices=context.request.devices,
        torch_threads=context.torch_threads,
    )


def loaders(
    splits: Splits, batch_size: int, seed: int
) -> tuple[DataLoader[torch.Tensor], DataLoader[torch.Tensor]]:
    shuffle_order = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(
        BlockDataset(splits.train),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=shuffle_order,
        num_workers=DATALOADER_WORKERS,
    )
    validation_loader = DataLoader(
        BlockDataset(splits.validation), batch_size=batch_size, num_workers=DATALOADER_WORKERS
    )
    return train_loader, validation_loader


def save_splits(splits: Splits, context: RunContext, folder: Path) -> None:
    """The held-out token blocks, in the runs root for evaluation tasks later (on any machine)."""
    folder.mkdir(parents=True, exist_ok=True)
    held_out = {"validation": splits.validation, "test": splits.test}
    for split, blocks in held_out.items():
        if blocks is not None:
            torch.save(blocks, folder / f"{split}.pt")
            context.files.runs.upload(folder / f"{split}.pt", split_key(context.run_id, split))


def generate_sample(
    model: PreTrainedModel, tokenizer: Tokenizer, validation: torch.Tensor, max_seq_len: int, seed: int
) -> str:
    """A short continuation of a held-out prompt, sampled with a fixed seed, within the model's context."""
    prompt = validation[0][: min(8, max_seq_len // 2)]
    new_tokens = min(SAMPLE_TOKENS, max_seq_len - len(prompt))
    if not isinstance(model, GenerationMixin):
        raise TypeError(f"{type(model).__name__} cannot generate text")
    model.train(False)
    torch.manual_seed(seed)
    with torch.no_grad():
        generated: object = model.generate(
            input_ids=prompt.unsqueeze(0),
            attention_mask=torch.ones_like(prompt).unsqueeze(0),
            max_new_tokens=new_tokens,
            do_sample=True,
            top_k=40,
            temperature=0.8,
            pad_token_id=0,
        )
    if not isinstance(generated, torch.Tensor):
        raise TypeError("generate() returned no token ids")
    return tokenizer.decode(generated[0].tolist())


@dataclass(frozen=True)
class CompletedDetails:
    artifact_path: str  # the model folder's location in the store
    params: int
    sample: str | None


def save_artifacts(
    context: RunContext,
    module: L.LightningModule,
    tokenizer: Tokenizer,
    metrics: MetricsLog,
    splits: Splits,
    started_at: float,
    workspace: Path,
) -> CompletedDetails:
    """Model and tokenizer in Hugging Face format plus the run's record of itself, in one flat folder:
    written locally, then uploaded with manifest.json last, so readers never see half of it."""
    if not isinstance(module, LanguageModel):
        raise TypeError("expected the run's LanguageModel")
    folder = workspace / "model"
    folder.mkdir(parents=True, exist_ok=True)
    model = module.model
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder, context.request.max_seq_len)
    write_metrics_csv(metrics, folder / "metrics.csv")
    title = f"{context.request.model_family}/{context.request.model_size} run {context.run_id[:8]}"
    plot_loss_curve(metrics, folder / "loss_curve.png", title)
    sample = generate_sample(
        model, tokenizer, splits.validation, context.request.max_seq_len, context.request.seed
    )
    params = count_parameters(model)
    final = [row for row in metrics.rows if row.val_loss is not None]
    write_manifest(
        folder / MANIFEST,
        {
            "run_id": context.run_id,
            "request": context.request.to_mapping(),
            "config": model.config.to_dict(),
            "params": params,
            "vocab_size": tokenizer.get_vocab_size(),
            "seed": context.request.seed,
            "threads": torch.get_num_threads(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "lightning": L.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
            },
            "started_at": started_at,
            "ended_at": time.time(),
            "metrics": {
                "val_loss": final[-1].val_loss if final else None,
                "steps": max((r.step for r in metrics.rows), default=0),
            },
            "sample": sample,
        },
    )
    # Everything this attempt logged, from the worker's own copy: Redis may have dropped lines.
    shutil.copyfile(workspace / LOG_FILE, folder / LOG_FILE)
    artifacts = context.files.artifacts
    artifacts.upload_folder(folder, model_folder(context.run_id), last=MANIFEST)
    return CompletedDetails(
        artifact_path=artifacts.url(model_folder(context.run_id)), params=params, sample=sample
    )
