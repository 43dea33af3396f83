"""Embedding spaces: which vectors may be compared with which.

Two bundles can make embeddings of the same size that mean different things (another family,
backbone, layers or pooling); a similarity between them is noise.  Every stored point carries the
space of the bundle that made it, and a query compares only within one space and says which.
"""

from __future__ import annotations

from bundle import Manifest

PAYLOAD_KEY = "embedding_space"


def embedding_space_of(manifest: Manifest) -> str:
    """The manifest's declared ``embedding_space``; schema 1 bundles (no such field): family/backbone."""
    return manifest.embedding_space or f"{manifest.family}/{manifest.training.get('backbone', '?')}"
