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


def test_a_short_answer_counts_every_frame_of_other_spaces_up_to_top_k(tmp_path):
    """The note of an answer short of hits counted the other spaces' frames among the top_k of a search over every
    space, where the query's own frames took places: 3 of its own and 16 elsewhere, top 5, said "4 frame(s)"."""
    store = VectorStore(StoreConfig(path=tmp_path / "store"), DIM)
    same = np.ones(DIM, np.float32) / np.sqrt(DIM)
    store.upsert([(point_id("c", f"{space[0]}{i}"), same, {"frame_id": f"{space[0]}{i}", "camera": "c",
                                                            "captured_ts": 1.8e9 + i, "embedding_space": space})
                  for space, n in (("old/space", 16), ("new/space", 3)) for i in range(n)])
    service = QueryService(lambda: nullcontext(store), EvidenceStore(tmp_path / "ev", 10),
                           lambda data, camera: (same, "new/space"), 50)

    def ask(top_k: int) -> dict:
        answer = service.answer_bytes(json.dumps({"image_b64": base64.b64encode(b"x").decode(),
                                                  "top_k": top_k}).encode())
        assert answer["ok"] and len(answer["hits"]) == 3, answer
        return answer

    assert ask(5)["note"].startswith("at least 5 frame(s) matching the filters were scored by other models")
    assert ask(50)["note"].startswith("16 frame(s) matching the filters were scored by other models")
    store.close()


def test_a_camera_named_twice_is_that_camera_and_an_empty_name_is_refused(tmp_path):
    """``filters.cameras: ["b", "b"]`` embedded an uploaded image with the default model, not camera b's (a query
    about one camera uses its model); an empty camera or frame id was looked up as a frame no camera can have and
    answered unknown_frame, and ``cameras: [""]`` answered no hits: each is a bad request now."""
    store = VectorStore(StoreConfig(path=tmp_path / "store"), DIM)
    same = np.ones(DIM, np.float32) / np.sqrt(DIM)
    store.upsert([(point_id("b", "f1"), same, {"frame_id": "f1", "camera": "b", "captured_ts": 1.8e9,
                                               "embedding_space": "b/space"})])
    embedded_for: list[str | None] = []

    def embed(data: bytes, camera: str | None) -> tuple[np.ndarray, str]:
        embedded_for.append(camera)
        return same, "b/space" if camera == "b" else "default/space"

    service = QueryService(lambda: nullcontext(store), EvidenceStore(tmp_path / "ev", 10), embed, 10)
    image = base64.b64encode(b"x").decode()
    twice = service.answer_bytes(json.dumps({"image_b64": image, "filters": {"cameras": ["b", "b"]}}).encode())
    assert embedded_for == ["b"] and [h["frame_id"] for h in twice["hits"]] == ["f1"], twice
    for request in ({"frame_id": "f1", "camera": ""}, {"frame_id": ""}, {"image_b64": image, "camera": ""},
                    {"image_b64": image, "filters": {"cameras": [""]}}):
        answer = service.answer_bytes(json.dumps(request).encode())
        assert answer["ok"] is False and answer["error"]["code"] == "bad_request", (request, answer)
    store.close()
