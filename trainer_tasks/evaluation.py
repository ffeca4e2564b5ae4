"""Evaluates a finished run's saved model on one of its held-out splits, both read from the store."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from trainer_store.cache import FileCache
from trainer_store.layout import FileStores, model_folder, split_key
from trainer_tasks.errors import UserError

EVAL_BATCH_SIZE = 16
# What AutoModelForCausalLM.from_pretrained reads of a model folder (generation_config.json if there).
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")


def evaluate(files: FileStores, cache: FileCache, run_id: str, split: str) -> dict[str, object]:
    """Mean next-token loss of the run's model over the blocks of its split, and its perplexity."""
    with cache.workspace(f"eval-{run_id}") as workspace:
        try:
            split_file = cache.fetch(files.runs, split_key(run_id, split), workspace / f"{split}.pt")
        except FileNotFoundError as exc:
            raise UserError(f"the run has no {split} split to evaluate") from exc
        folder = model_folder(run_id)
        stored = {found.name for found in files.artifacts.files(folder)}
        names = [name for name in MODEL_FILES if name in stored]
        return evaluate_files(
            cache.fetch_folder(files.artifacts, folder, names, workspace / "model"), split_file, split
        )


def evaluate_files(model_dir: Path, split_file: Path, split: str) -> dict[str, object]:
    blocks: object = torch.load(split_file)
    if not isinstance(blocks, torch.Tensor):
        raise TypeError(f"{split_file} holds no token blocks")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.train(False)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(blocks), EVAL_BATCH_SIZE):
            batch = blocks[start : start + EVAL_BATCH_SIZE]
            loss: object = model(input_ids=batch, labels=batch).loss
            if not isinstance(loss, torch.Tensor):
                raise TypeError("the model returned no loss")
            total += float(loss.item()) * len(batch)
            count += len(batch)
    mean = total / count
    return {
        "split": split,
        "loss": mean,
        "perplexity": math.exp(mean),
        "batches": math.ceil(count / EVAL_BATCH_SIZE),
    }
