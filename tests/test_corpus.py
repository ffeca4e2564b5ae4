"""scripts/corpus.py: a deterministic English-like corpus and its command line."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from scripts import corpus


def test_the_same_seed_gives_the_same_text() -> None:
    assert corpus.generate(50, seed=3) == corpus.generate(50, seed=3)


def test_another_seed_gives_another_text() -> None:
    assert corpus.generate(50, seed=3) != corpus.generate(50, seed=4)


@pytest.mark.parametrize(("sentences", "lines"), [(1, 1), (4, 1), (5, 2), (10, 3), (200, 50)])
def test_the_sentence_count_and_lines(sentences: int, lines: int) -> None:
    text = corpus.generate(sentences, seed=0)
    assert text.endswith("\n")
    # Every sentence ends with its one full stop, four to a line.
    assert text.count(".") == sentences
    assert len(text.splitlines()) == lines
    for line in text.splitlines():
        assert line[0].isupper()
        assert line.endswith(".")


def test_sentences_come_from_the_word_lists() -> None:
    rng = random.Random(1)
    sentence = corpus.sentence(rng)
    assert sentence.split(" a ", 1)[0].split(" ")[0] in {"the", "a", "my"}
    assert sentence.endswith(".")
    assert sentence == corpus.sentence(random.Random(1))


def test_write_creates_the_folders_and_answers_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "deeper" / "corpus.txt"
    assert corpus.write(path, 12, seed=5) == path
    assert path.read_text(encoding="utf-8") == corpus.generate(12, seed=5)


def test_main_writes_the_file_and_prints_its_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "out" / "c.txt"
    corpus.main([str(path), "--sentences", "10", "--seed", "2"])
    assert capsys.readouterr().out == f"{path}\n"
    assert path.read_text(encoding="utf-8") == corpus.generate(10, seed=2)


def test_main_defaults_to_5000_sentences_and_seed_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "default.txt"
    corpus.main([str(path)])
    assert capsys.readouterr().out.strip() == str(path)
    text = path.read_text(encoding="utf-8")
    assert text == corpus.generate(5000, seed=0)
    assert text.count(".") == 5000
