"""The language model: a GPT-2 from `transformers`, trained from scratch, inside a LightningModule."""

from __future__ import annotations

import lightning as L
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from schemas.models import model_shape


def build_model(family: str, size: str, vocab_size: int, max_seq_len: int) -> GPT2LMHeadModel:
    shape = model_shape(family, size)
    if shape is None:
        raise ValueError(f"unknown model {family}/{size}")
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


def count_parameters(model: torch.nn.Module) -> int:
    # Tied input and output embeddings are one tensor; parameters() yields it once.
    return sum(parameter.numel() for parameter in model.parameters())


class LanguageModel(L.LightningModule):
    """Next-token prediction; the batch is a tensor of token ids and serves as its own labels."""

    def __init__(self, model: GPT2LMHeadModel, learning_rate: float) -> None:
        super().__init__()
        self.model = model
        self.learning_rate = learning_rate

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        if not isinstance(loss, torch.Tensor):
            raise TypeError("the model returned no loss")
        return loss

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, on_epoch=True, prog_bar=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.learning_rate, weight_decay=0.01)
