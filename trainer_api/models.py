"""Model families and sizes the service trains, read from the torch-free description."""

from __future__ import annotations

from flask_smorest import Blueprint

from schemas.api import ModelCatalogSchema
from schemas.models import DEFAULT_FAMILY, DEFAULT_SIZE, MODEL_FAMILIES, reference_params

blp = Blueprint("models", __name__, url_prefix="/models", description="Model families and sizes")


@blp.route("")
@blp.response(200, ModelCatalogSchema)
def list_models() -> dict[str, object]:
    """Families with their sizes; parameter counts at the reference vocabulary and context."""
    return {
        "default_family": DEFAULT_FAMILY,
        "default_size": DEFAULT_SIZE,
        "families": [
            {
                "family": family,
                "sizes": [
                    {
                        "size": size,
                        "n_layer": shape.n_layer,
                        "n_embd": shape.n_embd,
                        "n_head": shape.n_head,
                        "params": reference_params(family, size),
                    }
                    for size, shape in sizes.items()
                ],
            }
            for family, sizes in MODEL_FAMILIES.items()
        ],
    }
