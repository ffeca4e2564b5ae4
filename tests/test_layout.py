"""trainer_store.layout: the keys every process agrees on, and which corpus a request may name."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer_store.layout import (
    FileStores,
    checkpoints_folder,
    corpus_key,
    model_folder,
    run_folder,
    split_key,
    tokenizer_folder,
    upload_key,
)
from trainer_store.settings import Settings
from trainer_store.storage import InvalidKey, Storage


def test_the_keys_of_each_root() -> None:
    assert upload_key("c1") == "uploads/c1.txt"
    assert model_folder("r1") == "models/r1"
    assert tokenizer_folder("t1") == "tokenizers/t1"
    assert run_folder("r1") == "r1"
    assert checkpoints_folder("r1") == "r1/checkpoints"
    assert split_key("r1", "test") == "r1/splits/test.pt"
    # Ids are validated before they reach here; one that could lead out is refused all the same.
    for make in (model_folder, run_folder, upload_key, tokenizer_folder):
        with pytest.raises(InvalidKey):
            make("../r2")


def test_the_stores_come_from_the_settings(tmp_path: Path) -> None:
    settings = Settings(
        corpus_root=str(tmp_path / "c"), artifacts_root="s3://bucket/artifacts", runs_root=str(tmp_path / "r")
    )
    files = FileStores.from_settings(settings)
    assert (files.corpora.url(), files.runs.url()) == (str(tmp_path / "c"), str(tmp_path / "r"))
    assert files.artifacts.url("models/r1") == "s3://bucket/artifacts/models/r1"
    assert (files.corpora.is_local, files.artifacts.is_local) == (True, False)


@pytest.fixture
def local_root(tmp_path: Path) -> Storage:
    root = tmp_path / "corpora"
    (root / "books").mkdir(parents=True)
    (root / "books" / "moby.txt").write_text("call me ishmael\n")
    (root / "alias.txt").symlink_to(root / "books" / "moby.txt")
    (tmp_path / "secret.txt").write_text("not yours\n")
    (root / "escape.txt").symlink_to(tmp_path / "secret.txt")
    (root / ".hidden.txt").write_text("hidden\n")
    return Storage(str(root))


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("books/moby.txt", "books/moby.txt"),
        ("./books/../books/moby.txt", "books/moby.txt"),
        ("alias.txt", "books/moby.txt"),  # a link inside the root names its target
        ("{root}/books/moby.txt", "books/moby.txt"),  # an absolute path inside a local root
        ("escape.txt", None),
        ("../secret.txt", None),
        ("{tmp}/secret.txt", None),
        ("books", None),
        ("books/missing.txt", None),
        (".hidden.txt", None),
        ("books/moby.txt\x00", None),
        ("x" * 5000, None),
    ],
)
def test_a_local_corpus_is_a_file_inside_the_root(
    local_root: Storage, tmp_path: Path, value: str, key: str | None
) -> None:
    named = value.format(root=local_root.url(), tmp=tmp_path)
    assert corpus_key(local_root, named) == key


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("books/moby.txt", "books/moby.txt"),
        ("{root}/books/moby.txt", "books/moby.txt"),  # the root's own URL
        ("s3://elsewhere/books/moby.txt", None),
        ("/books/moby.txt", None),
        ("../prefix/books/moby.txt", None),
        ("books", None),
        ("books/missing.txt", None),
    ],
)
def test_an_object_store_corpus_is_a_key_under_the_root(s3_bucket: str, value: str, key: str | None) -> None:
    root = Storage(f"{s3_bucket}/prefix")
    root.write_bytes("books/moby.txt", b"call me ishmael\n")
    assert corpus_key(root, value.format(root=root.url())) == key
