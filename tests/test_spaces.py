"""Embedding spaces kept apart: a query compares only within one space and says which (real qdrant-edge)."""

from __future__ import annotations

import base64
import json
from contextlib import nullcontext

import numpy as np

from bundle import read_manifest
from worker.config import StoreConfig
from worker.evidence import EvidenceStore
from worker.query import QueryService
from worker.spaces import embedding_space_of
from worker.store import VectorStore, point_id

DIM = 8


def test_points_carry_their_space_and_queries_stay_inside_one(tmp_path):
    store = VectorStore(StoreConfig(path=tmp_path / "store"), DIM)
    same = np.ones(DIM, np.float32) / np.sqrt(DIM)  # identical vectors: only the space tells them apart
    points = [(point_id("c", f"{space[0]}{i}"), same, {"frame_id": f"{space[0]}{i}", "camera": "c",
                                                         "captured_ts": 1.8e9 + i, "embedding_space": space})
              for space in ("patchcore/lite0", "efficientad/pdn") for i in range(4)]
    store.upsert(points)
    service = QueryService(lambda: nullcontext(store), EvidenceStore(tmp_path / "ev", 10),
                           lambda data, camera: (same, "efficientad/pdn"), 10)
    by_frame = service.answer_bytes(json.dumps({"frame_id": "p0", "camera": "c", "top_k": 10}).encode())
    assert by_frame["ok"] and by_frame["space"] == "patchcore/lite0"
    assert sorted(h["frame_id"] for h in by_frame["hits"]) == ["p1", "p2", "p3"]
    by_image = service.answer_bytes(json.dumps({"image_b64": base64.b64encode(b"x").decode(), "top_k": 10}).encode())
    assert by_image["ok"] and by_image["space"] == "efficientad/pdn"
    assert sorted(h["frame_id"] for h in by_image["hits"]) == ["e0", "e1", "e2", "e3"]
    store.close()


def test_a_bundle_names_its_space_or_gets_one_from_family_and_backbone(bundle_dir):
    new = read_manifest(bundle_dir)
    assert embedding_space_of(new) == new.embedding_space
    assert new.embedding_space.startswith("patchcore/efficientnet_lite0/") and new.version in new.embedding_space
    old = new.model_copy(update={"schema_version": 1, "embedding_space": ""})  # a bundle from before the field
    assert embedding_space_of(old) == "patchcore/efficientnet_lite0"
