"""trainer_tasks.tokenization: training, measuring and saving a byte-level BPE tokenizer; the task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from scripts import corpus
from trainer_store.cache import FileCache
from trainer_store.jobs import JobStore, tokenizer_key
from trainer_store.layout import FileStores
from trainer_store.storage import Storage
from trainer_tasks import tasks
from trainer_tasks.errors import UserError
from trainer_tasks.tokenization import (
    END_OF_TEXT,
    load_tokenizer,
    measure,
    read_corpus,
    save_tokenizer,
    train_from_request,
    train_tokenizer,
)

WORDS = "hello world " * 200 + "\n"


def test_read_corpus_answers_the_text_or_a_users_error(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("naïve text\n", encoding="utf-8")
    assert read_corpus(good) == "naïve text\n"
    with pytest.raises(UserError, match="no longer exists"):
        read_corpus(tmp_path / "missing.txt")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"not UTF-8 text \(byte 3\)"):
        read_corpus(latin1)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n")
    with pytest.raises(UserError, match="empty"):
        read_corpus(blank)


def test_a_repeated_word_is_merged_so_held_out_text_is_covered_by_multibyte_tokens() -> None:
    tokenizer = train_tokenizer(WORDS, vocab_size=300)
    holdout = "hello world hello world "
    stats = measure(tokenizer, holdout)
    assert stats.vocab_size == tokenizer.get_vocab_size()
    tokens = tokenizer.encode(holdout).tokens
    assert stats.tokens_per_char == len(tokens) / len(holdout)
    # "hello", " world" and the like are single tokens: about one token per word, not per byte.
    assert stats.tokens_per_char < 0.4
    assert stats.multibyte_coverage > 0.9


def test_text_of_unseen_characters_is_one_token_per_byte() -> None:
    tokenizer = train_tokenizer(WORDS, vocab_size=300)
    # Cyrillic letters take two bytes each in UTF-8; the tokenizer never saw them, so no merges apply.
    unseen = "ЖЖЖЖ"
    stats = measure(tokenizer, unseen)
    assert stats.tokens_per_char == 2.0
    assert stats.multibyte_coverage == 0.0
    # Half seen, half unseen lies in between.
    mixed = measure(tokenizer, "hello world ЖЖЖЖЖЖЖЖ")
    assert 0.0 < mixed.multibyte_coverage < measure(tokenizer, "hello world hello world ").multibyte_coverage


def test_an_empty_holdout_measures_zero() -> None:
    stats = measure(train_tokenizer(WORDS, vocab_size=300), "")
    assert (stats.tokens_per_char, stats.multibyte_coverage) == (0.0, 0.0)


def test_the_vocabulary_is_bounded_and_starts_with_end_of_text() -> None:
    tokenizer = train_tokenizer(corpus.generate(60, seed=2), vocab_size=400)
    assert 256 < tokenizer.get_vocab_size() <= 400
    assert tokenizer.token_to_id(END_OF_TEXT) == 0
    # A high minimum frequency leaves only the byte alphabet (and the special token).
    assert train_tokenizer("abcdef\n", vocab_size=400, min_frequency=50).get_vocab_size() == 257


def test_a_saved_tokenizer_loads_back_and_in_transformers_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = train_tokenizer(WORDS, vocab_size=300)
    save_tokenizer(tokenizer, tmp_path / "tok", max_len=32)
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 32
    loaded = load_tokenizer(tmp_path / "tok" / "tokenizer.json")
    assert loaded.encode("hello world").ids == tokenizer.encode("hello world").ids
    save_tokenizer(tokenizer, tmp_path / "plain")
    assert "model_max_length" not in json.loads((tmp_path / "plain" / "tokenizer_config.json").read_text())


def test_train_from_request_trains_on_the_head_and_measures_the_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = corpus.generate(80, seed=4)
    path = corpus_file(tmp_path, text)
    folder = tmp_path / "artifacts" / "tokenizers" / "tok-1"
    request: dict[str, object] = {
        "corpus_path": path.name,
        "vocab_size": 350,
        "min_frequency": 2,
        "holdout_fraction": 0.25,
    }
    result = train_from_request(request, *local(tmp_path), "tok-1")
    assert sorted(path.name for path in folder.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert result["artifact_path"] == str(folder)
    # The same tokenizer, measured on the same held-out tail, gives the same figures.
    cut = int(len(text) * 0.75)
    expected = measure(train_tokenizer(text[:cut], 350, 2), text[cut:])
    assert result["vocab_size"] == expected.vocab_size
    assert result["tokens_per_char"] == expected.tokens_per_char
    assert result["multibyte_coverage"] == expected.multibyte_coverage
    assert 0.0 < expected.tokens_per_char < 1.0
    # What it wrote is a fast tokenizer transformers loads without the network.
    loaded = AutoTokenizer.from_pretrained(folder)
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert (loaded.eos_token, loaded.bos_token, loaded.unk_token) == (END_OF_TEXT,) * 3
    assert len(loaded) == result["vocab_size"]
    sentence = text.splitlines()[0]
    assert loaded.decode(loaded(sentence)["input_ids"]) == sentence


def test_train_from_request_uses_the_defaults(tmp_path: Path) -> None:
    path = corpus_file(tmp_path, corpus.generate(30, seed=5))
    result = train_from_request({"corpus_path": str(path)}, *local(tmp_path), "tok")
    vocab_size = result["vocab_size"]
    assert isinstance(vocab_size, int)
    assert 256 < vocab_size <= 8192
    assert (tmp_path / "artifacts" / "tokenizers" / "tok" / "tokenizer.json").is_file()


def test_a_tokenizer_trained_from_an_object_store_lands_there(tmp_path: Path, s3_bucket: str) -> None:
    files = FileStores(Storage(f"{s3_bucket}/c"), Storage(f"{s3_bucket}/a"), Storage(f"{s3_bucket}/r"))
    files.corpora.write_bytes("uploads/c1.txt", corpus.generate(30, seed=5).encode())
    result = train_from_request(
        {"corpus_path": "uploads/c1.txt", "vocab_size": 300}, files, FileCache(tmp_path, 10**9), "tok-9"
    )
    assert result["artifact_path"] == f"{s3_bucket}/a/tokenizers/tok-9"
    names = [found.name for found in files.artifacts.files("tokenizers/tok-9")]
    assert names == ["tokenizer.json", "tokenizer_config.json"]
    assert list((tmp_path / "work").iterdir()) == []
    with pytest.raises(UserError, match="no longer exists"):
        train_from_request({"corpus_path": "uploads/gone.txt"}, files, FileCache(tmp_path, 10**9), "tok-10")


def local(root: Path) -> tuple[FileStores, FileCache]:
    """Local roots: the corpus root is `root` itself."""
    files = FileStores(Storage(str(root)), Storage(str(root / "artifacts")), Storage(str(root / "runs")))
    return files, FileCache(root / "cache", 10**9)


def corpus_file(root: Path, text: str) -> Path:
    path = root / "corpus.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "request_fields",
    [
        {},
        {"corpus_path": 3},
        {"corpus_path": "/c.txt", "vocab_size": "300"},
        {"corpus_path": "/c.txt", "min_frequency": 2.5},
        {"corpus_path": "/c.txt", "holdout_fraction": "0.1"},
    ],
)
def test_a_malformed_request_is_a_type_error(request_fields: dict[str, object], tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="malformed tokenizer request"):
        train_from_request(request_fields, *local(tmp_path), "tok")
    assert not (tmp_path / "artifacts").exists()


def test_train_from_request_of_a_missing_corpus_is_the_users(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no longer exists"):
        train_from_request({"corpus_path": str(tmp_path / "gone.txt")}, *local(tmp_path), "tok")


# The Celery task, called directly with the worker services of a monkeypatched environment.


def test_the_tokenizer_task_trains_into_the_artifacts_root(
    worker_env: Path, redis_client: redis.Redis
) -> None:
    path = corpus_file(worker_env, corpus.generate(40, seed=6))
    jobs = JobStore(redis_client)
    jobs.create(tokenizer_key("tok-7"), {"corpus_path": str(path), "vocab_size": 300}, now=1.0)
    assert tasks.train_tokenizer.run("tok-7") == "completed"
    record = jobs.get(tokenizer_key("tok-7"))
    assert record is not None
    assert record.status == "completed"
    folder = worker_env / "env-artifacts" / "tokenizers" / "tok-7"
    assert record.result is not None
    assert record.result["artifact_path"] == str(folder)
    assert (folder / "tokenizer.json").is_file()
    # A second delivery does nothing.
    assert tasks.train_tokenizer.run("tok-7") == "completed"
    assert tasks.train_tokenizer.run("tok-unknown") == "missing"


def test_the_tokenizer_task_fails_a_missing_corpus_with_the_users_message(
    worker_env: Path, redis_client: redis.Redis
) -> None:
    jobs = JobStore(redis_client)
    jobs.create(tokenizer_key("tok-8"), {"corpus_path": str(worker_env / "gone.txt")}, now=1.0)
    assert tasks.train_tokenizer.run("tok-8") == "failed"
    record = jobs.get(tokenizer_key("tok-8"))
    assert record is not None
    assert (record.status, record.message) == ("failed", "the corpus file no longer exists: upload it again")
    assert not (worker_env / "env-artifacts" / "tokenizers" / "tok-8").exists()
