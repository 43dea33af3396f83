"""What both engines of the frame history share (:mod:`worker.store`, embedded; :mod:`worker.store_server`, a
Qdrant server): the payload fields they index, the labels, retention's tiers, the query filters, and the errors a
store raises.  Below both, so that neither engine imports the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

# "verdict", not the bool "anomalous", carries the anomalous-only filter: qdrant-edge-py 0.9 never matches
# MatchValue(True) on a bool field (measured), and one field keeps both engines identical.
PAYLOAD_INDEXES = {"camera": "keyword", "frame_id": "keyword", "verdict": "keyword", "captured_ts": "float",
                   "embedding_space": "keyword", "received_ts": "float"}
# Retention goes by when the worker received a frame (``received_ts``), not by the camera's clock: a camera set to
# 2000 would lose each frame at once to ``max_age_h``, one set a year ahead would keep its frames past every other
# camera's.  Points written before ``received_ts`` was recorded age by ``captured_ts``, and go first.  A point
# received while this box's own clock was not set (before wire.CLOCK_FLOOR: a box without a battery-backed clock boots
# at 1970) or ahead of it is never aged by that stamp: the first pass on a set clock stamps it anew (wire.Restamp),
# and until then ``max_points`` takes it after every point with a real stamp (it arrived after them).
Tier = Literal["normal", "unlabelled", "any"]  # which frames retention takes, in this order
Pass = tuple[Any, str | None]  # an engine's filter, and the payload key to order by (None: any order)
Label = Literal["false_alarm", "confirmed_defect"]  # operator labels (worker/labels.py)
LABELS: tuple[str, ...] = get_args(Label)


def first_found(n: int, fetch: Callable[[int, Any, str | None], list[str]], passes: list[Pass]) -> list[str]:
    """Up to ``n`` point ids, pass by pass, each asked only for what the earlier ones left (``fetch(limit, filter,
    order key)``, an engine's scroll): retention takes an earlier version's points, without ``received_ts``, first."""
    found: list[str] = []
    for flt, key in passes:
        if len(found) >= n:
            break
        found += fetch(n - len(found), flt, key)
    return found


class StoreError(Exception):
    """The store cannot be opened or reached, or does not fit this model (e.g. another embedding size)."""


class StoreMismatch(StoreError):
    """The collection holds vectors of another size than the served model makes: unlike an outage no retry opens
    it for this model; a new ``store.collection`` or a bundle of the collection's size does."""


def mismatch(where: str, held: int | None, dim: int) -> str:
    """What a :class:`StoreMismatch` says: the collection, both sizes and the two ways out."""
    sizes = f"another size ({held}-d)" if held is not None else "another size"
    bundle = f"a bundle of {held}-d embeddings" if held is not None else "a bundle of the collection's embedding size"
    return (f"{where} holds vectors of {sizes} than the served model's {dim}-d embeddings: set store.collection to "
            f"a new name (a new history) or serve {bundle}")


def dense(vector: object) -> list[float]:
    """A point's vector as this store keeps it: one unnamed dense vector (the engines' types also allow named,
    multi and sparse vectors, and none)."""
    if not isinstance(vector, list):
        raise StoreError(f"a point holds a {type(vector).__name__} vector, not one dense vector: "
                         "set store.collection to a new name")
    return vector


@dataclass(frozen=True)
class Filters:
    cameras: tuple[str, ...] = ()
    anomalous_only: bool = False
    since: float | None = None  # epoch seconds, on captured_at
    until: float | None = None
    space: str | None = None  # embedding space (worker/spaces.py); None = any (points from before spaces)
