"""PatchCore on anomalib 2.7: anomalib's network, our memory-bank fit and our export graph.

The network (timm feature extractor, 3x3 feature pooling, multi-layer embedding,
nearest-neighbour scoring with the paper's re-weighting, Gaussian-blurred map) is
anomalib's ``PatchcoreModel``.  :class:`PatchcoreGraph` re-expresses its inference
path with batch-size-independent tensor ops (anomalib's own export fixes the batch)
and adds the embedding output, so one compiled model yields score, map and
embedding.  The parity test checks the graph against ``PatchcoreModel.forward``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from anomalib.models.image.patchcore.anomaly_map import AnomalyMapGenerator
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from torch import nn

from bundle import InputSpec
from exporter.backbones import Backbone
from exporter.coreset import greedy_coreset
from exporter.data import read_image
from exporter.train.embedding import DefectEmbedding

log = logging.getLogger(__name__)


BLUR_SIGMA_AT_256 = 4.0


@dataclass
class PatchcoreSettings:
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = None
    layers: list[str] = field(default_factory=lambda: ["blocks.2", "blocks.4"])
    # Chosen on the validation split (synthetic anomalies on held-out normals, exporter/validation.py) within a
    # latency budget of a quarter of the earlier 640 px / 0.5 % default; docs/quality/README.md has the table,
    # the rule and the commands.  The bank is capped in rows, not a share of the patches, so a frame's cost does
    # not grow with the training set and the coreset's fit time grows only linearly with it.
    input_size: int = 512
    coreset_ratio: float = 0.01
    coreset_projection: int = 128
    max_bank: int | None = 750  # cap on memory-bank rows (0 or None: no cap): bounds latency, bundle size, fit time
    num_neighbors: int = 9
    batch_size: int = 8
    seed: int = 0
    map_sigma: float | None = None  # anomaly-map blur in px; None: scaled with the input (blur_sigma)

    @property
    def blur_sigma(self) -> float:
        """The blur used: ``map_sigma``, else anomalib's (sigma 4 px at its 256 px) kept the same share of the frame."""
        return self.map_sigma if self.map_sigma is not None else BLUR_SIGMA_AT_256 * self.input_size / 256

    def as_dict(self) -> dict:
        return {**asdict(self), "blur_sigma": self.blur_sigma}


class Normalised(Protocol):
    """Anything that names the RGB mean/std a graph normalises with (a backbone, a bundle's input spec)."""

    @property
    def mean(self) -> tuple[float, float, float]: ...

    @property
    def std(self) -> tuple[float, float, float]: ...


def to_tensor(images: list[np.ndarray], backbone: Normalised) -> torch.Tensor:
    """uint8 BGR HWC images -> normalised float RGB NCHW, exactly what the OpenVINO graph does in-graph."""
    batch = torch.from_numpy(np.stack(images)[..., ::-1].copy()).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    return (batch - mean) / std


def patch_features(model: PatchcoreModel, x: torch.Tensor) -> torch.Tensor:
    """Patch features [N, C, h, w], as anomalib builds them for the memory bank."""
    feats = model.feature_extractor(x)
    feats = {layer: model.feature_pooler(f) for layer, f in feats.items()}
    return model.generate_embedding(feats)


class PatchcoreGraph(nn.Module):
    """Inference path for export: ``(score [N], anomaly_map [N,H,W], embedding [N,D])``."""

    bank_sq: torch.Tensor
    blur_rows: torch.Tensor
    blur_cols: torch.Tensor

    def __init__(self, model: PatchcoreModel, input_size: int, embedder: DefectEmbedding) -> None:
        super().__init__()
        self.model = model.eval()
        self.input_size = input_size
        self.embedder = embedder
        bank = model.memory_bank
        self.register_buffer("bank_sq", (bank * bank).sum(1))
        self.k_support = min(model.num_neighbors, int(bank.shape[0]))
        # anomalib's Gaussian blur as two 1-D passes: its normalised 2-D kernel is the outer product of
        # these, so the map is the same, at 2k instead of k^2 multiply-adds per pixel (k = 33 at sigma 4,
        # where the 2-D convolution took about half of the whole graph's time on a CPU).
        blur = model.anomaly_map_generator.blur
        kernel = blur.kernel[0, 0]
        self.register_buffer("blur_rows", kernel.sum(1).view(1, 1, -1, 1))
        self.register_buffer("blur_cols", kernel.sum(0).view(1, 1, 1, -1))
        self.blur_padding = list(blur.padding_shape)
        self.blur_border = blur.border_type

    def _dist(self, x: torch.Tensor) -> torch.Tensor:
        """Euclidean distance of every row of x [..., C] to every memory-bank entry (small x only)."""
        bank = self.model.memory_bank
        d2 = (x * x).sum(-1, keepdim=True) - 2 * x @ bank.T + self.bank_sq
        return d2.clamp_min(0).sqrt()

    def _nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Distance of every row of x [..., C] to its nearest memory-bank entry.

        The query x bank matrix is the frame's largest tensor, so only one fused matrix product with a bias
        and one reduction touch it: ``|x|^2`` is the same for every entry and is added after the minimum, and
        the factor -2 scales the queries, not the product.  No index is taken here; the one patch whose
        nearest entry the score needs gets it from ``_dist``.
        """
        partial = (x * -2) @ self.model.memory_bank.T + self.bank_sq
        return (partial.amin(-1) + (x * x).sum(-1)).clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        emb = patch_features(self.model, x)
        n, c, h, w = emb.shape
        flat = emb.flatten(2).transpose(1, 2)  # N, hw, C
        patch = self._nearest(flat)  # N, hw

        # Image score: the paper's re-weighting of the most anomalous patch (as anomalib).
        s_star, idx = patch.max(1)
        f_star = flat.gather(1, idx.view(n, 1, 1).expand(n, 1, c)).squeeze(1)
        m_star = self.model.memory_bank[self._dist(f_star).argmin(-1)]
        support = self._dist(m_star).topk(self.k_support, largest=False).indices  # N, k
        d_support = (f_star.unsqueeze(1) - self.model.memory_bank[support]).norm(dim=-1)
        score = (1 - F.softmax(d_support, 1)[:, 0]) * s_star

        # anomalib's AnomalyMapGenerator (nearest upsampling, then the blur), with the blur separated.
        amap = F.interpolate(patch.view(n, 1, h, w), size=(self.input_size, self.input_size))
        amap = F.pad(amap, self.blur_padding, mode=self.blur_border)
        amap = F.conv2d(F.conv2d(amap, self.blur_rows), self.blur_cols)

        # Embedding: what is wrong (exporter/train/embedding.py), from the same features, weighted by the
        # blurred map brought back to the feature grid: the weighting the retrieval benchmark's ablation
        # measured and tuned (docs/retrieval.md), smoother than the raw patch distances.
        return score, amap[:, 0], self.embedder(flat, F.adaptive_avg_pool2d(amap, (h, w)).flatten(1))


def extract(model: PatchcoreModel, paths: list[Path], spec: InputSpec, backbone: Backbone, batch_size: int) -> torch.Tensor:
    """Patch features of all images, flattened to [N * h * w, C]."""
    out = []
    for start in range(0, len(paths), batch_size):
        images = [read_image(p, spec) for p in paths[start : start + batch_size]]
        with torch.no_grad():
            emb = patch_features(model, to_tensor(images, backbone))
        out.append(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))
        done = min(start + batch_size, len(paths))
        if done == len(paths) or (done // batch_size) % 8 == 0:
            log.info("features %d/%d images", done, len(paths))
    return torch.cat(out)


def fit(settings: PatchcoreSettings, backbone: Backbone, train: list[Path], spec: InputSpec) -> tuple[PatchcoreGraph, dict]:
    """Build the memory bank from normal images; returns the export graph and timings."""
    torch.manual_seed(settings.seed)
    model = PatchcoreModel(
        layers=settings.layers,
        backbone=backbone.timm_name,
        pre_trained=backbone.pre_trained,
        num_neighbors=settings.num_neighbors,
    ).eval()
    # anomalib's fixed sigma of 4 px is tuned for 256 px inputs; larger inputs get the same share of the frame
    # (docs/quality/README.md), and anomalib's own forward (the parity reference) then uses the same blur.
    model.anomaly_map_generator = AnomalyMapGenerator(sigma=settings.blur_sigma)  # type: ignore[arg-type]  # annotated int, takes any float
    started = time.monotonic()
    features = extract(model, train, spec, backbone, settings.batch_size)
    extracted = time.monotonic()
    n_select = max(1, int(features.shape[0] * settings.coreset_ratio))
    if settings.max_bank:
        n_select = min(n_select, settings.max_bank)
    log.info("coreset: %d of %d patch features (ratio %.3f)", n_select, features.shape[0], settings.coreset_ratio)
    idx = greedy_coreset(features, n_select, settings.coreset_projection, settings.seed)
    model.memory_bank = features[idx].contiguous()
    done = time.monotonic()
    graph = PatchcoreGraph(model, settings.input_size, DefectEmbedding.fit(features, seed=settings.seed)).eval()
    timings = {
        "feature_extraction_s": round(extracted - started, 2),
        "coreset_s": round(done - extracted, 2),
        "fit_s": round(done - started, 2),
        "patch_features": int(features.shape[0]),
        "memory_bank": int(n_select),
        "feature_dim": int(features.shape[1]),
    }
    return graph, timings
