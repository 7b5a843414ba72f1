"""The zoo's losses, registered through athooks' public hookspecs (entry point ``athooks: zoo``)."""

from __future__ import annotations

from athooks.plugin import LossSpec, hookimpl


@hookimpl
def athooks_losses() -> list[LossSpec]:
    """Every method of the zoo, grouped by what it reads: feature maps, embeddings, logits."""
    from athooks_zoo import embeddings, features, learned, logits

    return [*features.SPECS, *learned.SPECS, *embeddings.SPECS, *logits.SPECS]
