"""Retrieval benchmark: do similar past defects come back for a defect? Leave-one-out on MVTec test defects.

Each defect image of the category's test split queries all the others (cosine); a hit
is relevant when it has the same defect type.  Reported per type and overall:
precision@1, precision@5 and mean average precision, for

* (a) ``global``: the global average of the backbone's patch features (PatchCore's
  backbone and layers, read from the bundle), L2-normalised: "what the part looks like";
* (b) ``bundle``: the bundle's own ``embedding`` output, from the compiled OpenVINO model
  that also gives the score (exporter/train/embedding.py);
* with ``--ablation``, the other pooling variants from the same torch features, with
  patch scores taken from the bundle's anomaly map (area-averaged to the feature grid).

Nothing is fitted on the test defects: whitening uses normal TRAIN images only.

    python -m benchmarks.retrieval --train patchcore            # trains grid (about a minute on 2 idle cores)
    python -m benchmarks.retrieval --bundle bundles/grid-patchcore --bundle bundles/grid-efficientad --ablation
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from anomalib.models.image.patchcore.torch_model import PatchcoreModel

from benchmarks.common import TORCH, header, openvino_ran
from bundle.runtime import CompiledBundle
from exporter import backbones
from exporter.build import VAL_FRACTION
from exporter.data import Sample, load_category, read_image
from exporter.export import score_images
from exporter.families import FAMILIES
from exporter.train.embedding import DefectEmbedding
from exporter.train.patchcore import PatchcoreSettings, patch_features, to_tensor

log = logging.getLogger("benchmarks.retrieval")
ROOT = Path(__file__).resolve().parents[1]
TOP = 5


def loo_metrics(emb: np.ndarray, labels: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """Leave-one-out P@1, P@5, AP per query, averaged per label and over all ('all')."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, 1, kind="stable")[:, :-1]  # the query itself sorts last
    rel = labels[order] == labels[:, None]
    p1, p5 = rel[:, 0].astype(float), rel[:, :TOP].mean(1)
    ap = (np.cumsum(rel, 1) / np.arange(1, rel.shape[1] + 1) * rel).sum(1) / rel.sum(1).clip(1)
    groups = {str(t): labels == t for t in np.unique(labels)} | {"all": np.ones(len(labels), bool)}
    return {name: (float(p1[m].mean()), float(p5[m].mean()), float(ap[m].mean())) for name, m in groups.items()}


def chance_p5(labels: np.ndarray) -> float:
    """Expected precision of a random ranking (same-type share among the others), over all queries."""
    counts = {t: int((labels == t).sum()) for t in np.unique(labels)}
    return float(np.mean([(counts[t] - 1) / (len(labels) - 1) for t in labels]))


class Features:
    """PatchCore's backbone + layers (as in the bundle's training record), for the baseline and the ablation."""

    def __init__(self, training: dict) -> None:
        defaults = PatchcoreSettings()
        weights = training.get("backbone_weights")
        self.backbone = backbones.resolve(training.get("backbone", defaults.backbone), Path(weights) if weights else None)
        layers = training.get("layers") or defaults.layers
        self.model = PatchcoreModel(layers=layers, backbone=self.backbone.timm_name,
                                    pre_trained=self.backbone.pre_trained).eval()

    def __call__(self, images: list[np.ndarray], batch: int = 8) -> tuple[torch.Tensor, tuple[int, int]]:
        """[N, hw, C] patch features and the feature grid (h, w)."""
        out = []
        for i in range(0, len(images), batch):
            with torch.no_grad():
                emb = patch_features(self.model, to_tensor(images[i : i + batch], self.backbone))
            out.append(emb.flatten(2).transpose(1, 2))
        return torch.cat(out), (int(emb.shape[2]), int(emb.shape[3]))


def ablation(feats: torch.Tensor, grid: tuple[int, int], maps: np.ndarray, normal_feats: torch.Tensor) -> dict[str, np.ndarray]:
    """Other poolings of the same features; patch scores = the bundle's map averaged onto the feature grid."""
    scores = F.adaptive_avg_pool2d(torch.from_numpy(maps).float().unsqueeze(1), grid).flatten(1)
    n, hw, c = feats.shape
    top = max(1, int(hw * 0.01))
    top_idx = scores.topk(top).indices
    defect = feats.gather(1, top_idx.unsqueeze(-1).expand(n, top, c)).mean(1)
    whole = feats.mean(1)
    sharp = DefectEmbedding(torch.zeros(c), torch.eye(c))  # same pooling, no whitening
    whitened = DefectEmbedding.fit(normal_feats)
    return {
        "top 1% mean + global mean (first version)": torch.cat([F.normalize(defect, dim=1), F.normalize(whole, dim=1)], 1).numpy(),
        "top 1% mean": defect.numpy(),
        "score-softmax pooling, no whitening": sharp(feats, scores).numpy(),
        "whitened score-softmax pooling (torch, map scores)": whitened(feats, scores).numpy(),
    }


def contact_sheet(query: int, rankings: dict[str, np.ndarray], paths: list[Path], labels: np.ndarray, size: int = 160) -> np.ndarray:
    """One row per embedding: the query, then its top-5 (green frame = same defect type, red = other)."""
    def tile(i: int, caption: str, colour: tuple[int, int, int]) -> np.ndarray:
        img = cv2.resize(cv2.imread(str(paths[i]), cv2.IMREAD_COLOR), (size, size), interpolation=cv2.INTER_AREA)
        img = cv2.copyMakeBorder(img, 4, 24, 4, 4, cv2.BORDER_CONSTANT, value=colour)
        cv2.putText(img, caption[:22], (6, size + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 255, 255), 1, cv2.LINE_AA)
        return img

    rows = []
    for name, order in rankings.items():
        cells = [tile(query, f"query: {labels[query]}", (90, 90, 90))]
        cells += [tile(int(j), str(labels[j]), (40, 160, 40) if labels[j] == labels[query] else (40, 40, 200))
                  for j in order[:TOP]]
        row = np.concatenate(cells, 1)
        band = np.full((26, row.shape[1], 3), 255, np.uint8)
        cv2.putText(band, name, (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        rows += [band, row]
    return np.concatenate(rows, 0)


def ranking(emb: np.ndarray, query: int) -> np.ndarray:
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    sim = e @ e[query]
    sim[query] = -np.inf
    return np.argsort(-sim, kind="stable")


def table(rows: list[tuple[str, str, dict]], types: list[str]) -> str:
    head = "| bundle | embedding | D | " + " | ".join(f"{t} P@1 / P@5 / mAP" for t in [*types, "all"]) + " |"
    lines = [head, "|" + "---|" * (3 + len(types) + 1)]
    for bundle, name, (dim, m) in rows:
        cells = " | ".join(f"{m[t][0]:.2f} / {m[t][1]:.2f} / {m[t][2]:.2f}" for t in [*types, "all"])
        lines.append(f"| {bundle} | {name} | {dim} | {cells} |")
    return "\n".join(lines)


def train(name: str, data: Path, category: str, out: Path) -> Path:
    """A bundle of that family with its default settings (no test metrics: this benchmark measures retrieval)."""
    from exporter.build import package
    from exporter.thresholds import NORMALS

    family = FAMILIES[name]
    return package(family.fit(data, category, family.settings(), NORMALS), out, evaluate_test=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mvtec")
    ap.add_argument("--category", default="grid")
    ap.add_argument("--bundle", type=Path, action="append", default=[], help="an existing bundle (repeatable)")
    ap.add_argument("--train", action="append", default=[], choices=list(FAMILIES),
                    help="train this family first (repeatable)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge-inspect-retrieval"), help="where --train writes bundles")
    ap.add_argument("--ablation", action="store_true", help="also measure other poolings of the same features")
    ap.add_argument("--query", default="broken/000", help="TYPE/STEM of the query shown in the picture")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "retrieval-results.md", help="the Markdown table")
    ap.add_argument("--picture", type=Path, default=Path("/tmp/edge-inspect-retrieval/query.png"),
                    help="query + top-5 thumbnails; MVTec images are CC BY-NC-SA: keep it out of the repository")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    bundles = list(args.bundle)
    for family in args.train:
        started = time.monotonic()
        bundles.append(train(family, args.data, args.category, args.work / f"{args.category}-{family}"))
        log.info("trained %s in %.0f s", family, time.monotonic() - started)
    if not bundles:
        ap.error("give --bundle or --train")

    cat = load_category(args.data, args.category)
    defects: list[Sample] = [s for s in cat.test if s.defect != "good"]
    labels = np.array([s.defect for s in defects])
    types = sorted(set(labels.tolist()))
    paths = [s.path for s in defects]
    query = next((i for i, s in enumerate(defects) if f"{s.defect}/{s.path.stem}" == args.query), 0)

    rows: list[tuple[str, str, tuple[int, dict]]] = []
    pictures: dict[str, np.ndarray] = {}
    features: dict[tuple, tuple] = {}
    ran: set[str] = set()
    for folder in bundles:
        compiled = CompiledBundle(folder, hint="THROUGHPUT")
        ran.add(compiled.precision)
        man = compiled.manifest
        images = [read_image(p, man.input) for p in paths]
        _, maps, emb = score_images(compiled, images)
        training = dict(man.training)
        key = (training.get("backbone"), tuple(training.get("layers") or ()), man.input.height)
        if key not in features:
            extractor = Features(training)
            feats, grid = extractor(images)
            normal = None
            if args.ablation:
                train_paths, _ = cat.split_train(VAL_FRACTION, int(training.get("seed", 0)))
                normal, _ = extractor([read_image(p, man.input) for p in train_paths])
            features[key] = (extractor, feats, grid, normal)
        extractor, feats, grid, normal = features[key]
        tag = f"{man.family} ({folder.name})"
        variants = {f"(a) global mean of {extractor.backbone.architecture} features": feats.mean(1).numpy()}
        if args.ablation:
            variants |= ablation(feats, grid, maps, normal)
        variants["(b) bundle embedding (OpenVINO output)"] = emb
        for name, e in variants.items():
            rows.append((tag, name, (int(e.shape[1]), loo_metrics(e, labels))))
        pictures[f"{man.family} (a) global mean"] = ranking(variants[next(iter(variants))], query)
        pictures[f"{man.family} (b) bundle embedding"] = ranking(emb, query)

    md = f"{header(openvino_ran(ran) + ' (embeddings, maps)', TORCH + ' (backbone features)')}\n\n{table(rows, types)}"
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.picture.parent.mkdir(parents=True, exist_ok=True)
    counts = ", ".join(f"{t} {int((labels == t).sum())}" for t in types)
    args.out.write_text(
        f"# Retrieval on {args.category}: leave-one-out over {len(labels)} test defects ({counts})\n\n"
        f"Cells: precision@1 / precision@5 / mAP. Chance precision@5 = {chance_p5(labels):.2f}.\n"
        f"Command: `python -m benchmarks.retrieval {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
        f"{md}\n")
    cv2.imwrite(str(args.picture), contact_sheet(query, pictures, paths, labels))
    log.info("wrote %s and %s", args.out, args.picture)
    return 0


if __name__ == "__main__":
    sys.exit(main())
