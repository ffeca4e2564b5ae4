"""Model families and sizes as a torch-free description, so the API validates without loading torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_embd: int
    n_head: int

    def approx_params(self, vocab_size: int, max_seq_len: int) -> int:
        """Parameters of a GPT-2 of this shape with tied embeddings (what `transformers` builds)."""
        per_layer = 12 * self.n_embd * self.n_embd + 13 * self.n_embd
        embeddings = vocab_size * self.n_embd + max_seq_len * self.n_embd
        return self.n_layer * per_layer + embeddings + 2 * self.n_embd


# Parameter counts are quoted at this vocabulary and context; embeddings scale with both.
REFERENCE_VOCAB = 8192
REFERENCE_CONTEXT = 128

# Sizes are scaled for CPUs.
MODEL_FAMILIES: dict[str, dict[str, ModelShape]] = {
    "gpt2": {
        "tiny": ModelShape(n_layer=2, n_embd=128, n_head=2),
        "small": ModelShape(n_layer=6, n_embd=320, n_head=5),
    },
}
DEFAULT_FAMILY = "gpt2"
DEFAULT_SIZE = "small"


def model_shape(family: str, size: str) -> ModelShape | None:
    return MODEL_FAMILIES.get(family, {}).get(size)
