"""The Qdrant-server engine of :class:`worker.store.VectorStore` (``store.url``), through qdrant-client.

A module of its own so that the embedded default never imports qdrant-client (seconds of start-up).
"""

from __future__ import annotations

import numpy as np
from qdrant_client import QdrantClient, models

from worker.store_base import LABELS, PAYLOAD_INDEXES, Filters, StoreMismatch, Tier, dense, first_found, mismatch
from worker.wire import CLOCK_FLOOR

_NO_RECEIVED_TS = models.IsEmptyCondition(is_empty=models.PayloadField(key="received_ts"))  # an earlier version's point


def _received(**bounds: float | None) -> models.FieldCondition:
    """``received_ts`` in a range (``lt``, ``gt``, ``gte``)."""
    return models.FieldCondition(key="received_ts", range=models.Range(**bounds))


def _client_filter(filters: Filters, exclude: str | None = None, also: tuple = ()) -> models.Filter | None:
    """``filters`` as the engine's filter (None: none), without point ``exclude``, with the conditions ``also``."""
    must: list = list(also)
    if filters.cameras:
        must.append(models.FieldCondition(key="camera", match=models.MatchAny(any=list(filters.cameras))))
    if filters.anomalous_only:
        must.append(models.FieldCondition(key="verdict", match=models.MatchValue(value="anomalous")))
    if filters.since is not None or filters.until is not None:
        must.append(models.FieldCondition(key="captured_ts", range=models.Range(gte=filters.since, lte=filters.until)))
    if filters.space is not None:
        must.append(models.FieldCondition(key="embedding_space", match=models.MatchValue(value=filters.space)))
    must_not: list = [models.HasIdCondition(has_id=[exclude])] if exclude else []
    return models.Filter(must=must, must_not=must_not) if must or must_not else None


class ServerEngine:
    """qdrant-client: a Qdrant server (``store.url``), or any client handed in (e.g. its local mode)."""

    def __init__(self, client: QdrantClient, collection: str, dim: int) -> None:
        self.client = client
        self.collection = collection
        if not client.collection_exists(collection):
            client.create_collection(collection, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE))
            for name, schema in PAYLOAD_INDEXES.items():
                client.create_payload_index(collection, name, field_schema=models.PayloadSchemaType(schema))
        else:
            vectors = client.get_collection(collection).config.params.vectors
            if not isinstance(vectors, models.VectorParams):  # named vectors (a dict), or none
                raise StoreMismatch(f"collection {collection!r} does not hold one unnamed vector per point: "
                                    "set store.collection to a new name")
            if vectors.size != dim:
                raise StoreMismatch(mismatch(f"collection {collection!r}", vectors.size, dim))
            indexed = client.get_collection(collection).payload_schema
            for name, schema in PAYLOAD_INDEXES.items():  # a collection from an earlier version may lack newer ones
                if name not in indexed:
                    client.create_payload_index(collection, name, field_schema=models.PayloadSchemaType(schema))

    def upsert(self, items: list[tuple[str, np.ndarray, dict]]) -> None:
        points = [models.PointStruct(id=pid, vector=vec.tolist(), payload=payload) for pid, vec, payload in items]
        self.client.upsert(self.collection, points=points, wait=True)

    def search(self, vector: np.ndarray, top_k: int, filters: Filters, exclude: str | None) -> list[tuple[float, dict]]:
        result = self.client.query_points(self.collection, query=vector.tolist(), limit=top_k,
                                          query_filter=_client_filter(filters, exclude), with_payload=True)
        return [(float(p.score), dict(p.payload or {})) for p in result.points]

    def retrieve(self, ids: list[str], vectors: bool = True) -> list[tuple[str, list[float], dict]]:
        recs = self.client.retrieve(self.collection, ids, with_vectors=vectors)
        return [(str(p.id), dense(p.vector) if vectors else [], dict(p.payload or {})) for p in recs]

    def by_frame(self, frame_id: str, limit: int) -> list[tuple[str, list[float], dict]]:
        """As :meth:`worker.store._Edge.by_frame`."""
        flt = models.Filter(must=[models.FieldCondition(key="frame_id", match=models.MatchValue(value=frame_id))])
        recs, _ = self.client.scroll(self.collection, scroll_filter=flt, limit=limit, with_vectors=True,
                                     order_by=models.OrderBy(key="captured_ts", direction=models.Direction.DESC))
        return [(str(p.id), dense(p.vector), dict(p.payload or {})) for p in recs]

    def labelled(self, limit: int) -> list[tuple[str, list[float], dict]]:
        flt = models.Filter(must=[models.FieldCondition(key="label", match=models.MatchAny(any=list(LABELS)))])
        recs, _ = self.client.scroll(self.collection, scroll_filter=flt, limit=limit, with_payload=True)
        return [(str(p.id), [], dict(p.payload or {})) for p in recs]

    def latest(self, limit: int, filters: Filters) -> list[dict]:
        """As :meth:`worker.store._Edge.latest`."""
        flt = _client_filter(filters)
        recs, _ = self.client.scroll(self.collection, scroll_filter=flt, limit=limit,
                                     with_payload=True, with_vectors=False,
                                     order_by=models.OrderBy(key="received_ts", direction=models.Direction.DESC))
        if len(recs) < limit:
            legacy = _client_filter(filters, also=(_NO_RECEIVED_TS,))
            more, _ = self.client.scroll(self.collection, scroll_filter=legacy, limit=limit - len(recs),
                                         with_payload=True, with_vectors=False,
                                         order_by=models.OrderBy(key="captured_ts", direction=models.Direction.DESC))
            recs = [*recs, *more]
        return [dict(p.payload or {}) for p in recs]

    def _ids(self, limit: int, flt: models.Filter, key: str | None) -> list[str]:
        recs, _ = self.client.scroll(self.collection, scroll_filter=flt, limit=limit, with_payload=False,
                                     order_by=models.OrderBy(key=key) if key else None)
        return [str(p.id) for p in recs]

    def oldest(self, n: int, tier: Tier) -> list[str]:
        """As :meth:`worker.store._Edge.oldest`."""
        must: list = [models.FieldCondition(key="verdict", match=models.MatchValue(value="normal"))] \
            if tier == "normal" else []
        must_not: list = [models.FieldCondition(key="label", match=models.MatchAny(any=list(LABELS)))] \
            if tier != "any" else []
        return first_found(n, self._ids, [
            (models.Filter(must=[*must, _NO_RECEIVED_TS], must_not=must_not), "captured_ts"),
            (models.Filter(must=[*must, _received(gte=CLOCK_FLOOR)], must_not=must_not), "received_ts"),
            (models.Filter(must=[*must, _received(lt=CLOCK_FLOOR)], must_not=must_not), "received_ts")])

    def received_in(self, n: int, lt: float | None = None, gt: float | None = None) -> list[str]:
        """As :meth:`worker.store._Edge.received_in`."""
        return self._ids(n, models.Filter(must=[_received(lt=lt, gt=gt)]), None)

    def stamp(self, ids: list[str], payload: dict) -> None:
        self.client.set_payload(self.collection, payload=payload, points=models.PointIdsList(points=ids), wait=True)

    def before(self, ts: float, n: int) -> list[str]:
        return first_found(n, self._ids, [
            (models.Filter(must=[models.FieldCondition(key="received_ts", range=models.Range(lt=ts))]), None),
            (models.Filter(must=[_NO_RECEIVED_TS, models.FieldCondition(key="captured_ts", range=models.Range(lt=ts))]),
             None)])

    def delete(self, ids: list[str]) -> None:
        self.client.delete(self.collection, points_selector=models.PointIdsList(points=ids), wait=True)

    def count(self) -> int:
        return self.client.count(self.collection, exact=True).count

    def optimize(self) -> None:
        """The server optimises in the background."""

    def close(self) -> None:
        self.client.close()
