"""A deterministic English-like corpus, generated so that nothing is downloaded at run time."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

_SUBJECTS = [
    "the old fisherman",
    "a young baker",
    "the quiet librarian",
    "my neighbour",
    "the tired doctor",
    "a curious child",
    "the village teacher",
    "the captain",
    "a travelling merchant",
    "the gardener",
]
_VERBS = [
    "carried",
    "painted",
    "found",
    "repaired",
    "sold",
    "borrowed",
    "watched",
    "cleaned",
    "lost",
    "opened",
]
_ADJECTIVES = ["small", "heavy", "blue", "broken", "wooden", "shiny", "ancient", "warm", "strange", "empty"]
_OBJECTS = ["lantern", "basket", "letter", "boat", "clock", "map", "window", "chair", "book", "kettle"]
_PLACES = [
    "near the harbour",
    "in the morning",
    "behind the mill",
    "before the storm",
    "at the market",
    "under the bridge",
    "after supper",
    "by the river",
    "in the attic",
    "on the hill",
]
_ENDINGS = [
    "and then went home.",
    "because it was needed.",
    "while the rain fell.",
    "and smiled.",
    "without a word.",
    "as the bells rang.",
    "for the winter.",
    "and told everyone.",
]


def sentence(rng: random.Random) -> str:
    return (
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} a {rng.choice(_ADJECTIVES)} {rng.choice(_OBJECTS)} "
        f"{rng.choice(_PLACES)} {rng.choice(_ENDINGS)}"
    )


def generate(sentences: int, seed: int = 0, per_line: int = 4) -> str:
    """`sentences` sentences, `per_line` to a line; the same seed gives the same text."""
    rng = random.Random(seed)
    lines = []
    for start in range(0, sentences, per_line):
        count = min(per_line, sentences - start)
        lines.append(" ".join(sentence(rng).capitalize() for _ in range(count)))
    return "\n".join(lines) + "\n"


def write(path: Path, sentences: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(generate(sentences, seed), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", type=Path)
    parser.add_argument("--sentences", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write(args.path, args.sentences, args.seed))


if __name__ == "__main__":  # pragma: no cover - command-line entry
    main()
