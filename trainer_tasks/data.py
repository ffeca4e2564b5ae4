"""From text to batches: token ids cut into blocks, split into training, validation and test."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from trainer_tasks.errors import UserError


def encode(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    ids = [
        token for encoding in tokenizer.encode_batch(text.splitlines(keepends=True)) for token in encoding.ids
    ]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Splits:
    train: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor | None


def split_blocks(
    ids: torch.Tensor, block_len: int, batch_size: int, holdout_fraction: float, test_fraction: float = 0.0
) -> Splits:
    """Cut the token stream into blocks: training, then `holdout_fraction` validation, then test."""
    holdout = max(block_len, int(len(ids) * holdout_fraction))
    held_test = max(block_len, int(len(ids) * test_fraction)) if test_fraction > 0 else 0
    train_end = max(0, len(ids) - holdout - held_test)
    train = _blocks(ids[:train_end], block_len)
    validation = _blocks(ids[train_end : train_end + holdout], block_len)
    test = _blocks(ids[train_end + holdout :], block_len) if held_test else None
    if len(train) < batch_size or len(validation) < 1 or (test is not None and len(test) < 1):
        raise UserError(
            f"the corpus is too small: its {len(ids)} tokens make {len(train)} training sequences of "
            f"{block_len} tokens, fewer than one batch of {batch_size} (plus one each for the held-out "
            "splits). "
            "Use a larger corpus, or a smaller batch_size or max_seq_len."
        )
    return Splits(train=train, validation=validation, test=test)


def _blocks(ids: torch.Tensor, block_len: int) -> torch.Tensor:
    count = len(ids) // block_len
    return ids[: count * block_len].view(count, block_len)


class BlockDataset(Dataset[torch.Tensor]):
    def __init__(self, blocks: torch.Tensor) -> None:
        self._blocks = blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self._blocks[index]
