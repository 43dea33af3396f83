"""The frame history in Qdrant: one point per logged frame (embedding + payload).

Embedded on disk by default (qdrant-client local mode, ``store.path``) or a Qdrant
server (``store.url``), through the same calls.  Writes arrive in batches from the
worker's store thread, never from the inference path.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import numpy as np
from qdrant_client import QdrantClient, models

from worker.config import StoreConfig

log = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("5b0e4f8e-3f4c-4b8e-9a55-6a1c2f0d7e11")


def point_id(camera: str, frame_id: str) -> str:
    """Stable id of a frame: the same camera + frame id always maps to the same point."""
    return str(uuid.uuid5(_NAMESPACE, f"{camera}/{frame_id}"))


class StoreError(Exception):
    """The store cannot be opened or does not fit this model (e.g. another embedding size)."""


@dataclass(frozen=True)
class Filters:
    cameras: tuple[str, ...] = ()
    anomalous_only: bool = False
    since: float | None = None  # epoch seconds, on captured_at
    until: float | None = None

    def to_qdrant(self, exclude: str | None = None) -> models.Filter | None:
        must: list = []
        if self.cameras:
            must.append(models.FieldCondition(key="camera", match=models.MatchAny(any=list(self.cameras))))
        if self.anomalous_only:
            must.append(models.FieldCondition(key="anomalous", match=models.MatchValue(value=True)))
        if self.since is not None or self.until is not None:
            must.append(models.FieldCondition(key="captured_ts", range=models.Range(gte=self.since, lte=self.until)))
        must_not = [models.HasIdCondition(has_id=[exclude])] if exclude else []
        return models.Filter(must=must, must_not=must_not) if must or must_not else None


@dataclass(frozen=True)
class Hit:
    similarity: float
    payload: dict


class VectorStore:
    def __init__(self, cfg: StoreConfig, dim: int) -> None:
        self.collection = cfg.collection
        try:
            if cfg.url:
                api_key = cfg.api_key.get_secret_value() if cfg.api_key else None
                self.client = QdrantClient(url=cfg.url, api_key=api_key, timeout=10)
                where = cfg.url
            else:
                cfg.path.mkdir(parents=True, exist_ok=True)
                self.client = QdrantClient(path=str(cfg.path))
                where = str(cfg.path)
            if not self.client.collection_exists(self.collection):
                self.client.create_collection(
                    self.collection, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE)
                )
                for field, schema in (("camera", "keyword"), ("frame_id", "keyword"), ("anomalous", "bool"),
                                      ("captured_ts", "float")):
                    self.client.create_payload_index(self.collection, field, field_schema=schema)
            else:
                size = self.client.get_collection(self.collection).config.params.vectors.size
                if size != dim:
                    raise StoreError(f"collection {self.collection!r} holds {size}-d vectors, this model makes {dim}-d: "
                                     "set store.collection to a new name")
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"cannot open the vector store: {exc}") from exc
        log.info("vector store: %s, collection %s", where, self.collection)

    def upsert(self, items: list[tuple[str, np.ndarray, dict]]) -> None:
        points = [models.PointStruct(id=pid, vector=vec.tolist(), payload=payload) for pid, vec, payload in items]
        self.client.upsert(self.collection, points=points, wait=True)

    def search(self, vector: np.ndarray, top_k: int, filters: Filters, exclude: str | None = None) -> list[Hit]:
        result = self.client.query_points(
            self.collection, query=vector.tolist(), limit=top_k, query_filter=filters.to_qdrant(exclude),
            with_payload=True,
        )
        return [Hit(float(p.score), dict(p.payload or {})) for p in result.points]

    def find(self, frame_id: str, camera: str | None = None) -> tuple[str, np.ndarray, dict] | None:
        """A logged frame by id (newest if several cameras used the same id and none is named)."""
        if camera is not None:
            points = self.client.retrieve(self.collection, [point_id(camera, frame_id)], with_vectors=True)
        else:
            flt = models.Filter(must=[models.FieldCondition(key="frame_id", match=models.MatchValue(value=frame_id))])
            points, _ = self.client.scroll(self.collection, scroll_filter=flt, limit=16, with_vectors=True)
            points = sorted(points, key=lambda p: (p.payload or {}).get("captured_ts", 0), reverse=True)
        if not points:
            return None
        p = points[0]
        return str(p.id), np.asarray(p.vector, np.float32), dict(p.payload or {})

    def count(self) -> int:
        return self.client.count(self.collection, exact=True).count

    def close(self) -> None:
        self.client.close()
