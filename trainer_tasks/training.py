"""One training run on real parts: tokenizer, data, model and a Lightning Trainer wired to events."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader
from transformers.utils import logging as hf_logging

from schemas.events import TrainStarted
from trainer_tasks.callbacks import EventCallback
from trainer_tasks.data import (
    END_OF_TEXT,
    BlockDataset,
    Splits,
    encode,
    read_corpus,
    split_blocks,
    train_tokenizer,
)
from trainer_tasks.model import LanguageModel, build_model, count_parameters
from trainer_tasks.runner import RunContext

HOLDOUT_FRACTION = 0.1
# Celery's prefork children are daemonic and may not fork DataLoader workers.
DATALOADER_WORKERS = 0

# Banners ("GPU available", tips), save progress bars and warnings about choices made here on purpose
# (no DataLoader workers) are noise in a worker log.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated.*")


def available_cpus() -> int:
    return len(os.sched_getaffinity(0))


def train(context: RunContext) -> None:
    request = context.request
    torch.manual_seed(request.seed)
    torch.set_num_threads(available_cpus())
    text = read_corpus(Path(request.corpus_path))
    tokenizer = train_tokenizer(text)
    splits = split_blocks(encode(tokenizer, text), request.max_seq_len, request.batch_size, HOLDOUT_FRACTION)
    model = build_model(
        request.model_family, request.model_size, tokenizer.get_vocab_size(), request.max_seq_len
    )
    module = LanguageModel(model, request.learning_rate)
    callback = EventCallback(
        context.reporter,
        started=_started_event(context),
        save_artifacts=lambda trained: save_artifacts(context, trained, tokenizer),
        interval_s=context.progress_interval_s,
        samples_per_step=request.batch_size,
        tokens_per_sample=request.max_seq_len,
        learning_rate=request.learning_rate,
        cancel_requested=context.cancel_requested,
    )
    trainer = L.Trainer(
        max_epochs=request.num_epochs,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        default_root_dir=context.run_dir,
        callbacks=[callback],
    )
    context.run_dir.mkdir(parents=True, exist_ok=True)
    train_loader, validation_loader = _loaders(splits, request.batch_size, request.seed)
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=validation_loader)


def _started_event(context: RunContext) -> TrainStarted:
    request = context.request
    return TrainStarted(
        request_id=context.run_id,
        run_id=context.run_id,
        user_id=request.user_id,
        model_family=request.model_family,
        model_size=request.model_size,
        total_epochs=request.num_epochs,
        queue=context.queue,
        cpu_cores=available_cpus(),
        optimal_threads=torch.get_num_threads(),
        optimal_workers=DATALOADER_WORKERS,
        batch_size=request.batch_size,
        learning_rate=request.learning_rate,
    )


def _loaders(
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


def save_tokenizer(tokenizer: Tokenizer, folder: Path, max_len: int) -> None:
    """The files `AutoTokenizer.from_pretrained(folder)` reads for a fast tokenizer."""
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "unk_token": END_OF_TEXT,
        "model_max_length": max_len,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def save_artifacts(context: RunContext, module: L.LightningModule, tokenizer: Tokenizer) -> str:
    """Model and tokenizer in Hugging Face format, plus a manifest; answers the folder's path."""
    if not isinstance(module, LanguageModel):
        raise TypeError("expected the run's LanguageModel")
    folder = context.artifact_dir
    folder.mkdir(parents=True, exist_ok=True)
    module.model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder, context.request.max_seq_len)
    manifest = {
        "run_id": context.run_id,
        "request": context.request.to_mapping(),
        "params": count_parameters(module.model),
        "vocab_size": tokenizer.get_vocab_size(),
        "versions": {"torch": torch.__version__, "lightning": L.__version__},
        "saved_at": time.time(),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return str(folder.resolve())
