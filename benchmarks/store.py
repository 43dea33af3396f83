"""Store benchmark: embedded vector-store candidates side by side, in one run, on the same vectors and queries.

For each candidate: ingest rate (batches of ``store.batch_size`` = 64 points, as the
recorder writes them, and single-point upserts), then top-5 query latency p50/p99 with
no filter and with the operator's filters, and recall@5 against exact numpy search; and the
latest 50 defects by arrival (what a console that starts asks for), p50/p99 and whether they
are exactly the 50 last received.

Vectors: seeded from REAL bundle embeddings (``--bundle``: the bundle's embedding of the
category's train and test images), each stored vector = a real one plus Gaussian noise
at the real vectors' own nearest-neighbour spread, re-normalised; without ``--bundle``,
random unit vectors.  Payload like the worker's: 8 cameras, 30 days, 5 % anomalous.

    python -m benchmarks.store --bundle /tmp/edge-inspect-retrieval/grid-patchcore --points 100000
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import header, openvino_ran

log = logging.getLogger("benchmarks.store")
ROOT = Path(__file__).resolve().parents[1]
TOP = 5
CAMERAS = 8
DAYS = 30
ANOMALOUS = 0.05
LATEST = 50  # the latest defects a console asks for when it starts (query.max_top_k's default)


def seeds_from_bundle(bundle: Path, data: Path, category: str) -> tuple[np.ndarray, str]:
    """The bundle's embeddings of the category's images, and the precision OpenVINO ran them at (read back)."""
    from bundle.runtime import CompiledBundle
    from exporter.data import load_category, read_image
    from exporter.export import score_images

    compiled = CompiledBundle(bundle)
    cat = load_category(data, category)
    paths = list(cat.train) + [s.path for s in cat.test]
    return score_images(compiled, [read_image(p, compiled.manifest.input) for p in paths])[2], compiled.precision


def make_vectors(seeds: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    sim = seeds @ seeds.T
    np.fill_diagonal(sim, -1)
    spread = float(np.sqrt(np.median(2 - 2 * sim.max(1))))  # nearest-neighbour chord distance
    base = seeds[rng.integers(0, len(seeds), n)]
    vec = base + rng.normal(0, spread / np.sqrt(seeds.shape[1]), base.shape)
    return (vec / np.linalg.norm(vec, axis=1, keepdims=True)).astype(np.float32)


def make_payloads(n: int, rng: np.random.Generator, now: float) -> list[dict]:
    cams = rng.integers(0, CAMERAS, n)
    ts = now - rng.uniform(0, DAYS * 86400, n)  # random order: any prefix is a fair sample
    anomalous = rng.random(n) < ANOMALOUS
    return [{"frame_id": f"f{i}", "camera": f"cam{c}", "captured_ts": float(t), "received_ts": float(t),
             "anomalous": bool(a), "score": float(a), "verdict": "anomalous" if a else "normal"}
            for i, (c, t, a) in enumerate(zip(cams, ts, anomalous, strict=True))]


def filter_cases(now: float) -> dict[str, dict]:
    return {
        "none": {},
        "camera": {"cameras": ("cam3",)},
        "last 24 h": {"since": now - 86400},
        "anomalous": {"anomalous_only": True},
        "camera + 24 h + anomalous": {"cameras": ("cam3",), "since": now - 86400, "anomalous_only": True},
    }


def exact(vectors: np.ndarray, meta: dict[str, np.ndarray], query: np.ndarray, f: dict) -> set[int]:
    mask = np.ones(len(vectors), bool)
    if f.get("cameras"):
        mask &= np.isin(meta["camera"], f["cameras"])
    if f.get("since") is not None:
        mask &= meta["ts"] >= f["since"]
    if f.get("anomalous_only"):
        mask &= meta["anomalous"]
    idx = np.flatnonzero(mask)
    sims = vectors[idx] @ query
    return set(idx[np.argsort(-sims)[:TOP]].tolist())


def run_candidate(name: str, open_store: Callable, vectors: np.ndarray, payloads: list[dict], queries: np.ndarray,
                  truth: dict[str, list[set[int]]], cases: dict[str, dict], batch: int, singles: int,
                  index_to_id: list[str]) -> dict:
    from worker.store import Filters

    folder = Path(tempfile.mkdtemp(prefix="store-bench-"))
    try:
        store, after_ingest = open_store(folder, vectors.shape[1])
        started = time.perf_counter()
        for i in range(0, len(vectors), batch):
            store.upsert([(index_to_id[j], vectors[j], payloads[j]) for j in range(i, min(i + batch, len(vectors)))])
        ingest_s = time.perf_counter() - started
        single = []
        for j in range(singles):  # re-writes of existing points: same count before and after
            t = time.perf_counter()
            store.upsert([(index_to_id[j], vectors[j], payloads[j])])
            single.append(time.perf_counter() - t)
        build_s = after_ingest(store)
        id_to_index = {pid: k for k, pid in enumerate(index_to_id)}
        out = {"name": name, "points": store.count(), "ingest_pts_s": len(vectors) / ingest_s,
               "single_upsert_ms": 1000 * float(np.median(single)), "build_s": build_s, "cases": {}}
        for case, f in cases.items():
            flt = Filters(**f)
            lat, rec = [], []
            for q, t in zip(queries, truth[case], strict=True):
                t0 = time.perf_counter()
                hits = store.search(q, TOP, flt)
                lat.append(time.perf_counter() - t0)
                got = {id_to_index[str(uuid.UUID(str(h.payload["_id"])))] for h in hits} if hits else set()
                rec.append(len(got & t) / len(t) if t else float(not got))
            out["cases"][case] = (1000 * np.percentile(lat, 50), 1000 * np.percentile(lat, 99), float(np.mean(rec)))
        want = [p["frame_id"] for p in sorted((p for p in payloads if p["anomalous"]), key=lambda p: -p["received_ts"])]
        lat, exact_lists = [], []
        for _ in queries:
            t0 = time.perf_counter()
            got = store.latest(LATEST, Filters(anomalous_only=True))
            lat.append(time.perf_counter() - t0)
            exact_lists.append([p["frame_id"] for p in got] == want[:LATEST])
        out["latest"] = (1000 * np.percentile(lat, 50), 1000 * np.percentile(lat, 99), all(exact_lists))
        store.close()
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from worker.config import StoreConfig
    from worker.store import VectorStore

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="seed vectors from this bundle's embeddings of real images")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mvtec")
    ap.add_argument("--category", default="grid")
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--client-points", type=int, default=2_000,
                    help="points for qdrant-client local mode (its Python brute force is slow at 100k)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--singles", type=int, default=100)
    ap.add_argument("--hnsw", action="store_true", help="also build and measure an HNSW index (minutes at 100k)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "store-results.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    rng = np.random.default_rng(0)
    seeds, ran = seeds_from_bundle(args.bundle, args.data, args.category) if args.bundle else \
        (rng.normal(size=(512, 152)).astype(np.float32), "")
    seeds /= np.linalg.norm(seeds, axis=1, keepdims=True)
    now = time.time()
    vectors = make_vectors(seeds, args.points, rng)
    payloads = make_payloads(args.points, rng, now)
    ids = [str(uuid.uuid5(uuid.NAMESPACE_OID, str(i))) for i in range(args.points)]
    for pid, p in zip(ids, payloads, strict=True):
        p["_id"] = pid  # lets the benchmark map hits back without relying on a store's id type
    queries = make_vectors(seeds, args.queries, rng)
    cases = filter_cases(now)

    def truth_for(n: int) -> dict[str, list[set[int]]]:
        meta = {"camera": np.array([p["camera"] for p in payloads[:n]]),
                "ts": np.array([p["captured_ts"] for p in payloads[:n]]),
                "anomalous": np.array([p["anomalous"] for p in payloads[:n]])}
        return {c: [exact(vectors[:n], meta, q, f) for q in queries] for c, f in cases.items()}

    def edge(hnsw: bool) -> Callable:
        def open_store(folder: Path, dim: int):
            store = VectorStore(StoreConfig(path=folder, hnsw=hnsw), dim)
            def after(s: VectorStore) -> float:
                """HNSW: build the index (the worker does it at each retention pass); exact: search what was written."""
                if not hnsw:
                    return 0.0
                t = time.perf_counter()
                s.optimize()
                return time.perf_counter() - t
            return store, after
        return open_store

    def client(folder: Path, dim: int):
        from qdrant_client import QdrantClient

        return VectorStore(StoreConfig(path=folder), dim, client=QdrantClient(path=str(folder))), lambda s: 0.0

    truth_full = truth_for(args.points)
    results = []
    candidates = [("qdrant-edge-py, exact (default)", edge(False), args.points)]
    if args.hnsw:
        candidates.append(("qdrant-edge-py, HNSW m=16", edge(True), args.points))
    candidates.append(("qdrant-client local (on disk)", client, args.client_points))
    for name, opener, n in candidates:
        log.info("measuring %s on %d points", name, n)
        truth = truth_full if n == args.points else truth_for(n)
        results.append(run_candidate(name, opener, vectors[:n], payloads[:n], queries, truth, cases, 64,
                                     args.singles, ids[:n]))
        log.info("%s", results[-1])

    head = "| engine | points | ingest pts/s (batches of 64) | single upsert ms | index build s | " + \
        " | ".join(f"{c}: p50 / p99 ms, recall@5" for c in cases) + f" | latest {LATEST} defects: p50 / p99 ms, exact |"
    lines = [head, "|" + "---|" * (6 + len(cases))]
    for r in results:
        cells = " | ".join(f"{p50:.1f} / {p99:.1f}, {rec:.3f}" for p50, p99, rec in r["cases"].values())
        p50, p99, exact_latest = r["latest"]
        lines.append(f"| {r['name']} | {r['points']} | {r['ingest_pts_s']:.0f} | {r['single_upsert_ms']:.1f} | "
                     f"{r['build_s']:.1f} | {cells} | {p50:.1f} / {p99:.1f}, {'yes' if exact_latest else 'no'} |")
    md = header(f"embeddings: {openvino_ran([ran])}" if ran else "random vectors, no inference") + "\n\n" + \
        "\n".join(lines)
    print(md)
    source = f"real embeddings of {args.bundle.name}" if args.bundle else "random unit vectors"
    args.out.write_text(f"# Store benchmark ({args.points} points, {vectors.shape[1]}-d, {source})\n\n"
                        f"Command: `python -m benchmarks.store {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
                        f"{md}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
