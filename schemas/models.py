"""Model families and sizes as a torch-free description, so the API validates without loading torch.

Operators add families through the `trainer.model_families` entry point group: each entry point names
a `ModelFamily`, whose `builder` ("module:function") the worker imports to build the model. A request
only ever names a family and size from this registry, never code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "trainer.model_families"
# Parameter counts are quoted at this vocabulary and context; embeddings scale with both.
REFERENCE_VOCAB = 8192
REFERENCE_CONTEXT = 128


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_embd: int
    n_head: int
    intermediate: int = 0  # the feed-forward width where the family does not fix it at 4 x n_embd


CountParams = Callable[[ModelShape, int, int], int]


@dataclass(frozen=True)
class ModelFamily:
    name: str
    sizes: dict[str, ModelShape]
    builder: str  # "module:function" taking (shape, vocab_size, max_seq_len), run in the worker only
    count_params: CountParams


def gpt2_params(shape: ModelShape, vocab_size: int, max_seq_len: int) -> int:
    """GPT-2 with biases, learned positions and tied embeddings, as `transformers` builds it."""
    per_layer = 12 * shape.n_embd * shape.n_embd + 13 * shape.n_embd
    embeddings = vocab_size * shape.n_embd + max_seq_len * shape.n_embd
    return shape.n_layer * per_layer + embeddings + 2 * shape.n_embd


def llama_params(shape: ModelShape, vocab_size: int, max_seq_len: int) -> int:
    """Llama: no biases, rotary positions (no table), SwiGLU feed-forward, RMSNorm, tied embeddings."""
    attention = 4 * shape.n_embd * shape.n_embd
    feed_forward = 3 * shape.n_embd * shape.intermediate
    per_layer = attention + feed_forward + 2 * shape.n_embd
    return shape.n_layer * per_layer + vocab_size * shape.n_embd + shape.n_embd


# Sizes are scaled for CPUs: about 1.5M, 10M and 40M parameters at the reference vocabulary.
GPT2 = ModelFamily(
    name="gpt2",
    sizes={
        "tiny": ModelShape(n_layer=2, n_embd=128, n_head=2),
        "small": ModelShape(n_layer=6, n_embd=320, n_head=5),
        "medium": ModelShape(n_layer=9, n_embd=576, n_head=9),
    },
    builder="trainer_tasks.model:build_gpt2",
    count_params=gpt2_params,
)
LLAMA = ModelFamily(
    name="llama",
    sizes={
        "tiny": ModelShape(n_layer=2, n_embd=128, n_head=4, intermediate=384),
        "small": ModelShape(n_layer=6, n_embd=320, n_head=5, intermediate=864),
        "medium": ModelShape(n_layer=9, n_embd=576, n_head=9, intermediate=1536),
    },
    builder="trainer_tasks.model:build_llama",
    count_params=llama_params,
)
BUILTIN_FAMILIES = (GPT2, LLAMA)
DEFAULT_FAMILY = "gpt2"
DEFAULT_SIZE = "small"


def load_families() -> dict[str, ModelFamily]:
    """The built-in families, then those of installed packages; a broken entry point is logged, skipped."""
    families = {family.name: family for family in BUILTIN_FAMILIES}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            family: object = entry.load()
        except Exception:
            log.exception("model family entry point %r failed to load; skipped", entry.name)
            continue
        if not isinstance(family, ModelFamily):
            log.error("model family entry point %r is not a ModelFamily; skipped", entry.name)
            continue
        families[family.name] = family
    return families


FAMILIES = load_families()
MODEL_FAMILIES: dict[str, dict[str, ModelShape]] = {name: family.sizes for name, family in FAMILIES.items()}


def model_shape(family: str, size: str) -> ModelShape | None:
    return MODEL_FAMILIES.get(family, {}).get(size)


def reference_params(family: str, size: str) -> int:
    return FAMILIES[family].count_params(FAMILIES[family].sizes[size], REFERENCE_VOCAB, REFERENCE_CONTEXT)
