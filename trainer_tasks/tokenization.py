"""Byte-level BPE tokenizers: read a corpus, train one, measure it on held-out text, save it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from trainer_store.cache import FileCache
from trainer_store.layout import TOKENIZER_FILE, FileStores, corpus_key, tokenizer_folder
from trainer_store.storage import Storage
from trainer_tasks.errors import UserError

END_OF_TEXT = "<|endoftext|>"
AUTO_VOCAB_SIZE = 8192


CORPUS_GONE = "the corpus file no longer exists: upload it again"


def fetch_corpus(corpora: Storage, cache: FileCache, corpus_path: str, workspace: Path) -> Path:
    """A local copy of the corpus a request names (a key under the corpus root, or a path from before)."""
    key = corpus_key(corpora, corpus_path)
    try:
        if key is None:
            raise FileNotFoundError(corpus_path)
        return cache.fetch(corpora, key, workspace / "corpus.txt")
    except FileNotFoundError as exc:  # not there, or removed between the two looks
        raise UserError(CORPUS_GONE) from exc


def read_corpus(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"the corpus is not UTF-8 text (byte {exc.start}): upload it as UTF-8") from exc
    except FileNotFoundError as exc:
        raise UserError(CORPUS_GONE) from exc
    if not text.strip():
        raise UserError("the corpus is empty: give it some text to learn from")
    return text


def train_tokenizer(text: str, vocab_size: int = AUTO_VOCAB_SIZE, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE as GPT-2 uses it: every byte has a token, so no text is ever unknown."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(iter(text.splitlines(keepends=True)), trainer=trainer)
    return tokenizer


@dataclass(frozen=True)
class TokenizerStats:
    vocab_size: int
    tokens_per_char: float
    multibyte_coverage: float  # share of held-out bytes inside tokens longer than one byte


def measure(tokenizer: Tokenizer, holdout: str) -> TokenizerStats:
    # In the byte-level alphabet each character of a token's string stands for exactly one byte.
    tokens = [
        token
        for encoding in tokenizer.encode_batch(holdout.splitlines(keepends=True))
        for token in encoding.tokens
    ]
    total_bytes = sum(len(token) for token in tokens)
    multibyte = sum(len(token) for token in tokens if len(token) > 1)
    return TokenizerStats(
        vocab_size=tokenizer.get_vocab_size(),
        tokens_per_char=len(tokens) / max(1, len(holdout)),
        multibyte_coverage=multibyte / max(1, total_bytes),
    )


def save_tokenizer(tokenizer: Tokenizer, folder: Path, max_len: int | None = None) -> None:
    """The files `AutoTokenizer.from_pretrained(folder)` reads for a fast tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / TOKENIZER_FILE))
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": END_OF_TEXT,
        "eos_token": END_OF_TEXT,
        "unk_token": END_OF_TEXT,
    }
    if max_len is not None:
        config["model_max_length"] = max_len
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def train_from_request(
    request: dict[str, object], files: FileStores, cache: FileCache, tokenizer_id: str
) -> dict[str, object]:
    """The tokenizer task's work: train on the corpus minus its held-out tail, measure on that tail,
    and put the tokenizer in the artifacts root (tokenizer.json last: it is what a run reads)."""
    corpus_path, vocab_size = request.get("corpus_path"), request.get("vocab_size", AUTO_VOCAB_SIZE)
    min_frequency, holdout_fraction = request.get("min_frequency", 2), request.get("holdout_fraction", 0.1)
    if not (
        isinstance(corpus_path, str)
        and isinstance(vocab_size, int)
        and isinstance(min_frequency, int)
        and isinstance(holdout_fraction, (int, float))
    ):
        raise TypeError("malformed tokenizer request")
    with cache.workspace(f"tokenizer-{tokenizer_id}") as workspace:
        text = read_corpus(fetch_corpus(files.corpora, cache, corpus_path, workspace))
        cut = int(len(text) * (1 - holdout_fraction))
        tokenizer = train_tokenizer(text[:cut], vocab_size, min_frequency)
        stats = measure(tokenizer, text[cut:])
        save_tokenizer(tokenizer, workspace / "tokenizer")
        folder = tokenizer_folder(tokenizer_id)
        files.artifacts.upload_folder(workspace / "tokenizer", folder, last=TOKENIZER_FILE)
    return {
        "vocab_size": stats.vocab_size,
        "tokens_per_char": stats.tokens_per_char,
        "multibyte_coverage": stats.multibyte_coverage,
        "artifact_path": files.artifacts.url(folder),
    }
