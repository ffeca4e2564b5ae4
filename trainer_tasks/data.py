"""From a text file to batches: a byte-level BPE tokenizer, token blocks, train/validation split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import Dataset

from trainer_tasks.errors import UserError

END_OF_TEXT = "<|endoftext|>"
AUTO_VOCAB_SIZE = 8192


def read_corpus(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"the corpus is not UTF-8 text (byte {exc.start}): upload it as UTF-8") from exc
    except FileNotFoundError as exc:
        raise UserError("the corpus file no longer exists: upload it again") from exc
    if not text.strip():
        raise UserError("the corpus is empty: give it some text to learn from")
    return text


def train_tokenizer(text: str, vocab_size: int = AUTO_VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE as GPT-2 uses it: every byte has a token, so no text is ever unknown."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(iter(text.splitlines(keepends=True)), trainer=trainer)
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    ids = [
        token for encoding in tokenizer.encode_batch(text.splitlines(keepends=True)) for token in encoding.ids
    ]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Splits:
    train: torch.Tensor
    validation: torch.Tensor


def split_blocks(ids: torch.Tensor, block_len: int, batch_size: int, holdout_fraction: float) -> Splits:
    """Cut the token stream into blocks; the last `holdout_fraction` of tokens is validation."""
    holdout = max(block_len, int(len(ids) * holdout_fraction))
    train_ids, validation_ids = ids[:-holdout], ids[-holdout:]
    train, validation = _blocks(train_ids, block_len), _blocks(validation_ids, block_len)
    if len(train) < batch_size or len(validation) < 1:
        raise UserError(
            f"the corpus is too small: its {len(ids)} tokens make {len(train)} training sequences of "
            f"{block_len} tokens, fewer than one batch of {batch_size} (plus one for validation). "
            "Use a larger corpus, or a smaller batch_size or max_seq_len."
        )
    return Splits(train=train, validation=validation)


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
