"""Evaluates a finished run's saved model on one of its held-out splits."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from trainer_tasks.errors import UserError

EVAL_BATCH_SIZE = 16


def evaluate(model_dir: Path, splits_dir: Path, split: str) -> dict[str, object]:
    """Mean next-token loss over the split's blocks, and its perplexity."""
    split_file = splits_dir / f"{split}.pt"
    if not split_file.is_file():
        raise UserError(f"the run has no {split} split to evaluate")
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
