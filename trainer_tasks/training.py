"""One training run on real parts: tokenizer, data, model and a Lightning Trainer wired to events."""

from __future__ import annotations

import logging
import platform
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import tokenizers
import torch
import transformers
from lightning.pytorch.callbacks import ModelCheckpoint
from tokenizers import Tokenizer
from torch.utils.data import DataLoader
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import logging as hf_logging

from schemas.events import TrainStarted
from trainer_tasks import resources
from trainer_tasks.artifacts import (
    MetricsLog,
    captured_logs,
    plot_loss_curve,
    write_manifest,
    write_metrics_csv,
)
from trainer_tasks.callbacks import CompletedDetails, EventCallback, ResumableCheckpoint
from trainer_tasks.data import BlockDataset, Splits, encode, split_blocks
from trainer_tasks.model import LanguageModel, build_model, count_parameters
from trainer_tasks.runner import RunContext
from trainer_tasks.tokenization import load_tokenizer, read_corpus, save_tokenizer, train_tokenizer

# Celery's prefork children are daemonic and may not fork DataLoader workers.
DATALOADER_WORKERS = 0
SAMPLE_TOKENS = 40

# Banners ("GPU available", tips), save progress bars and warnings about choices made here on purpose
# (no DataLoader workers) are noise in a worker log.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")
warnings.filterwarnings("ignore", message=".*there is no last checkpoint available.*")


def train(context: RunContext) -> None:
    """Train the run's model; the callback reports started, progress and how it ended."""
    context.run_dir.mkdir(parents=True, exist_ok=True)
    with captured_logs(context.log_path):
        _train(context, time.time())


def _train(context: RunContext, started_at: float) -> None:
    request = context.request
    torch.manual_seed(request.seed)
    torch.set_num_threads(resources.available_cpus())
    text = read_corpus(Path(request.corpus_path))
    tokenizer = load_tokenizer(context.tokenizer_path) if context.tokenizer_path else train_tokenizer(text)
    splits = split_blocks(
        encode(tokenizer, text),
        request.max_seq_len,
        request.batch_size,
        request.holdout_fraction,
        request.test_fraction,
    )
    save_splits(splits, context.run_dir / "splits")
    model = build_model(
        request.model_family, request.model_size, tokenizer.get_vocab_size(), request.max_seq_len
    )
    metrics = MetricsLog()
    checkpoints = context.run_dir / "checkpoints"
    callback = EventCallback(
        context.reporter,
        started=started_event(context),
        finish=lambda module: save_artifacts(context, module, tokenizer, metrics, splits, started_at),
        metrics=metrics,
        interval_s=context.progress_interval_s,
        samples_per_step=request.batch_size,
        tokens_per_sample=request.max_seq_len,
        learning_rate=request.learning_rate,
        cancel_requested=context.cancel_requested,
        lease_lost=context.lease_lost,
        resources=resources.sample,
    )
    trainer = L.Trainer(
        max_epochs=request.num_epochs,
        accelerator="auto",
        devices=1,
        precision="bf16-mixed" if torch.cuda.is_available() else "32-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        default_root_dir=context.run_dir,
        callbacks=[
            callback,
            ModelCheckpoint(
                dirpath=checkpoints, filename="best", monitor="val_loss", mode="min", save_last=True
            ),
            ResumableCheckpoint(dirpath=checkpoints, filename="last"),
        ],
    )
    train_loader, validation_loader = loaders(splits, request.batch_size, request.seed)
    # A redelivered run (its worker died or shut down) resumes from its last checkpoint, if it has one.
    trainer.fit(
        LanguageModel(model, request.learning_rate),
        train_dataloaders=train_loader,
        val_dataloaders=validation_loader,
        ckpt_path="last",
    )


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


def save_splits(splits: Splits, folder: Path) -> None:
    """The held-out token blocks, for evaluation tasks later."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(splits.validation, folder / "validation.pt")
    if splits.test is not None:
        torch.save(splits.test, folder / "test.pt")


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


def save_artifacts(
    context: RunContext,
    module: L.LightningModule,
    tokenizer: Tokenizer,
    metrics: MetricsLog,
    splits: Splits,
    started_at: float,
) -> CompletedDetails:
    """Model and tokenizer in Hugging Face format plus the run's record of itself, in one flat folder."""
    if not isinstance(module, LanguageModel):
        raise TypeError("expected the run's LanguageModel")
    folder = context.artifact_dir
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
        folder / "manifest.json",
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
    shutil.copyfile(context.log_path, folder / "logs.jsonl")
    return CompletedDetails(artifact_path=str(folder.resolve()), params=params, sample=sample)
