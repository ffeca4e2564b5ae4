"""The language models: GPT-2 and Llama from `transformers`, trained from scratch in a LightningModule."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from schemas.models import FAMILIES, ModelShape


def build_gpt2(shape: ModelShape, vocab_size: int, max_seq_len: int) -> PreTrainedModel:
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=max_seq_len,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def build_llama(shape: ModelShape, vocab_size: int, max_seq_len: int) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.n_embd,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.n_layer,
        num_attention_heads=shape.n_head,
        num_key_value_heads=shape.n_head,
        max_position_embeddings=max_seq_len,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config)


def build_model(family_name: str, size: str, vocab_size: int, max_seq_len: int) -> PreTrainedModel:
    """Build through the family's registered builder; the registry, not the request, names the code."""
    family = FAMILIES.get(family_name)
    shape = family.sizes.get(size) if family else None
    if family is None or shape is None:
        raise ValueError(f"unknown model {family_name}/{size}")
    module_name, _, function_name = family.builder.partition(":")
    builder: object = getattr(importlib.import_module(module_name), function_name)
    model = builder(shape, vocab_size, max_seq_len) if callable(builder) else None
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"builder {family.builder} did not return a transformers PreTrainedModel")
    return model


def count_parameters(model: torch.nn.Module) -> int:
    # Tied input and output embeddings are one tensor; parameters() yields it once.
    return sum(parameter.numel() for parameter in model.parameters())


def warmup_cosine(
    total_steps: int, warmup_fraction: float = 0.05, floor: float = 0.1
) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup, then a cosine decay to `floor` of the peak."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class LanguageModel(L.LightningModule):
    """Next-token prediction; the batch is a tensor of token ids and serves as its own labels."""

    def __init__(self, model: PreTrainedModel, learning_rate: float) -> None:
        super().__init__()
        self.model = model
        self.learning_rate = learning_rate

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        if not isinstance(loss, torch.Tensor):
            raise TypeError("the model returned no loss")
        return loss

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # No self.log here: the event callback reads the step's loss from what this returns.
        return self._loss(batch)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, on_epoch=True, prog_bar=False)
        return loss

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.learning_rate, weight_decay=0.01)
        schedule = warmup_cosine(max(1, int(self.trainer.estimated_stepping_batches)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
