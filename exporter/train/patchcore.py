"""PatchCore on anomalib 2.7: anomalib's network, our memory-bank fit and our export graph.

The network (timm feature extractor, 3x3 feature pooling, multi-layer embedding,
nearest-neighbour scoring, Gaussian-blurred map) is anomalib's ``PatchcoreModel``.
:class:`PatchcoreGraph` re-expresses its inference
path with batch-size-independent tensor ops (anomalib's own export fixes the batch)
and adds the embedding output, so one compiled model yields score, map and
embedding.  The parity test checks the graph against ``PatchcoreModel.forward``.

It also takes a bank extension (rows an operator declared normal after a false alarm, issue 17) as a
second input, so the torch-free worker can teach a bundle without re-exporting it, and returns each
frame's most anomalous patch features as the candidates for such an extension.
"""

from __future__ import annotations

import itertools
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

from bundle import EXTENSION_PAD, ExtensionSpec, InputSpec, TilingSpec
from bundle.extension import Views
from exporter.backbones import Backbone
from exporter.coreset import greedy_coreset
from exporter.data import read_tiles, tiling_of
from exporter.progress import Every
from exporter.resources import check_fits
from exporter.train.embedding import DefectEmbedding
from exporter.train.grey import as_fitted

log = logging.getLogger(__name__)


BLUR_SIGMA_AT_256 = 4.0
# How a frame's score is read from its patches: ``reweighted``, anomalib's (the paper's) re-weighted distance of the
# most anomalous patch, or ``map_max``, the maximum of the blurred anomaly map.  The validation split ranks map_max
# higher, but a false alarm's absorption (bundle.extension.offending compares patch distances with the image
# threshold, which map_max lowers) then takes more rows than an extension holds: docs/quality/README.md.
IMAGE_SCORES = ("reweighted", "map_max")
UNREFINED = ("bound", "scaled")
# Where the map puts a patch's distance: ``anomalib``, at the patch's cell of the grid (rows [i*S, (i+1)*S) for
# stride S), or ``centred``, at the centre of what the patch's feature sees (:func:`content_offset`), which for a
# CNN lies up and left of its cell: the map then marks the defect itself, not a place beside it.
ALIGNMENTS = ("anomalib", "centred")
# How the deeper layers' features meet the first layer's grid before they are joined into one patch feature:
# ``anomalib``, resampled bilinearly as anomalib does (a deeper layer's content then lies up and left of the first
# layer's, by a few input pixels), or ``centred``, resampled at the place whose content lies where the first layer's
# does (:func:`layer_shifts`), so each patch feature describes one place.
LAYER_ALIGNMENTS = ("anomalib", "centred")


def auto_candidates(patches: int) -> int:
    """The bank extension's candidates when not set: a 32nd of the frame's patches (128 at 512 px), 64 to 256.

    Every candidate meets every extension row on every frame, so the extension's cost per frame grows with K;
    a fixed K would be a larger share of a small frame's patches.  At a 32nd, learning on the validation split
    was a sixteenth's (docs/benchmarks.md, "the extension's candidates scaled with the frame" and "a 32nd of the
    frame's patches").
    """
    return min(patches, max(64, min(256, patches // 32)))


@dataclass
class PatchcoreSettings:
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = None
    backbone_weights_sha256: str | None = None  # the weights file must be this one (a bundle's recorded sha256)
    layers: list[str] = field(default_factory=lambda: ["blocks.2", "blocks.4"])
    # Chosen on the validation split (synthetic anomalies on held-out normals, exporter/validation.py) within a
    # latency budget of a quarter of the earlier 640 px / 0.5 % default, together with the screen below;
    # docs/quality/README.md has the tables, the rules and the commands.  The bank is capped in rows, not a share
    # of the patches, so a frame's cost does not grow with the training set and the coreset's fit time grows only
    # linearly with it.
    input_size: int = 512
    coreset_ratio: float = 0.01
    coreset_projection: int = 128
    max_bank: int | None = 1500  # cap on memory-bank rows (0 or None: no cap): bounds latency, bundle size, fit time
    num_neighbors: int = 9
    # PatchCore's local neighbourhood (the paper's p): a patch's feature is the mean of the p x p feature cells
    # around it (anomalib's 3), so each patch also describes a little of its surroundings; odd, so it stays centred.
    neighbourhood: int = 3
    batch_size: int = 8
    seed: int = 0
    map_sigma: float | None = None  # anomaly-map blur in px; None: scaled with the input (blur_sigma)
    # Patches per frame checked against the bank extension and returned as candidates for it: the extension can
    # only lower these patches' distances, so it costs a small matrix product instead of a second full one.
    # None: the same share of the frame at every input size (auto_candidates); 0: no extension input (the graph
    # as before issue 17); else that many, capped at the frame's patch count.
    extension_candidates: int | None = None
    image_score: str = "reweighted"  # one of IMAGE_SCORES
    # Which copies of each training image the memory bank is built from (bundle.extension.Views: frame, flips,
    # d4).  For a texture or part whose flipped and turned images are good parts too, the bank then covers each
    # local appearance in every orientation; a part with a handedness (a flipped nut is a defect) wants frame.
    # The bank keeps its rows; the features and the coreset cost one share per view.
    bank_views: str = Views.FRAME.value
    # A cheap first stage (0: off): every patch meets only the bank's first ``screen_rows`` rows (the greedy
    # coreset's picks are nested, so they are a coarser coreset of their own), and the ``refine`` share of the
    # frame's patches farthest from those meets the rest of the bank too, so a larger bank costs a fraction of
    # its rows per frame.
    screen_rows: int = 500
    refine: float = 0.25
    # What an unrefined patch's distance is: its distance to the screen rows times the frame's mean ratio of
    # whole-bank to screen distance over its refined patches (``scaled``, an estimate), or the screen distance as
    # it is (``bound``, never smaller than its distance to the whole bank: an upper bound, which coarsens the maps).
    unrefined: str = "scaled"
    # One of ALIGNMENTS; centred was chosen on grid's validation split (docs/quality/README.md, "The map centred on what
    # each patch sees").
    map_alignment: str = "centred"
    # One of LAYER_ALIGNMENTS; centred was tried on grid's validation split and not kept (docs/quality/README.md, "The
    # deeper layer resampled onto the first layer's content").
    layer_alignment: str = "anomalib"
    # Train on tiles (cols, rows) of each image, cut as the worker cuts a tiled camera's frames (bundle/tiling.py),
    # so a small defect in a large frame is seen at the scale the model learnt; None: whole images.
    tiling: tuple[int, int] | None = None
    tile_overlap: float | None = None  # None: bundle.TilingSpec's default

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
    """uint8 BGR HWC images -> normalised float RGB NCHW, exactly what the OpenVINO graph does in-graph first (then,
    for a model of grey images, the grey step: :mod:`exporter.train.grey`)."""
    batch = torch.from_numpy(np.stack(images)[..., ::-1].copy()).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    return (batch - mean) / std


def patch_features(model: PatchcoreModel, x: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Patch features [N, C, h, w], as anomalib builds them for the memory bank (the deeper layers resampled by the
    model's ``layer_resample`` where it has one); with ``grad`` differentiable in x (anomalib's extractor runs a
    frozen backbone under ``no_grad``, so its timm model is called directly)."""
    if grad:
        extractor = model.feature_extractor
        feats = {str(layer): f for layer, f in zip(extractor.layers, extractor.feature_extractor(x), strict=True)}
    else:
        feats = model.feature_extractor(x)
    feats = {layer: model.feature_pooler(f) for layer, f in feats.items()}
    resample = getattr(model, "layer_resample", None)
    if resample is None:
        return model.generate_embedding(feats)
    return resample([feats[str(layer)] for layer in model.layers])


def resample_matrix(out: int, cells: int, shift: float) -> torch.Tensor:
    """[out, cells] bilinear weights that resample ``cells`` grid values onto ``out`` as ``F.interpolate(...,
    mode="bilinear")`` does (half-pixel centres, clamped at the edges), each sample taken ``shift`` cells further
    down (right)."""
    u = ((torch.arange(out, dtype=torch.float64) + 0.5) * cells / out - 0.5 + shift).clamp(0, cells - 1)
    low = u.floor().long()
    high = (low + 1).clamp(max=cells - 1)
    frac = (u - low).float()
    matrix = torch.zeros(out, cells)
    matrix[torch.arange(out), low] += 1 - frac
    matrix[torch.arange(out), high] += frac
    return matrix


class LayerResample(nn.Module):
    """The deeper layers' features resampled onto the first layer's grid and joined after it, as anomalib's
    ``generate_embedding`` does, each sampled ``shifts[k]`` (rows, cols; input pixels) further down and right:
    where its content lies on the first layer's (:func:`layer_shifts`).  All shifts 0 is anomalib's embedding.
    Built for one input size (the layers' ``grids``, first layer first), as the exported graph is."""

    def __init__(self, shifts: list[tuple[float, float]], grids: list[tuple[int, int]], size: tuple[int, int]) -> None:
        super().__init__()
        self.shifts = [(float(dy), float(dx)) for dy, dx in shifts]
        (h, w), deeper = grids[0], grids[1:]
        for k, ((dy, dx), (fh, fw)) in enumerate(zip(self.shifts, deeper, strict=True)):
            self.register_buffer(f"rows{k}", resample_matrix(h, fh, dy * fh / size[0]))
            self.register_buffer(f"cols{k}", resample_matrix(w, fw, dx * fw / size[1]).T.contiguous())

    @classmethod
    def of(cls, model: PatchcoreModel, image: torch.Tensor, shifts: list[tuple[float, float]]) -> LayerResample:
        """The resampling for ``model``'s layers at ``image``'s size [1, 3, H, W]."""
        with torch.no_grad():
            feats = model.feature_extractor(image)
        grids = [(int(feats[str(layer)].shape[2]), int(feats[str(layer)].shape[3])) for layer in model.layers]
        return cls(shifts, grids, (int(image.shape[2]), int(image.shape[3])))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        parts = [feats[0]]
        for k, f in enumerate(feats[1:]):
            parts.append(getattr(self, f"rows{k}") @ f @ getattr(self, f"cols{k}"))
        return torch.cat(parts, 1)


class PatchcoreGraph(nn.Module):
    """Inference path for export: ``(x [N,3,H,W], extension [E,C])`` ->
    ``(score [N], anomaly_map [N,H,W], embedding [N,D], candidates [N,K,C], candidate_scores [N,K])``.

    ``extension`` holds rows that count as normal on top of the memory bank (a false alarm's patch
    features); unused rows are all :data:`bundle.EXTENSION_PAD`, at infinite distance from everything, so
    one pad row gives the plain PatchCore outputs.  Only the K patches farthest from the bank (the candidates)
    are compared with the extension: their distances become ``min(bank, extension)``, exactly the distance to
    the union of both.  Every other patch keeps its bank distance, an upper bound of its union distance (and
    at most the K-th largest bank distance), so scores and maps can only come out too high, never too low, and
    they are exact for an extension whose rows lie nearer to none of the other patches than the bank does.
    ``image_score`` says how the score is read (:data:`IMAGE_SCORES`): the re-weighting of the most anomalous
    patch, whose nearest row m* and support are taken over the union of bank and extension, or the blurred
    map's maximum.  With ``candidates`` 0 the graph has neither the input nor the two outputs.  With ``screen_rows``
    every patch first meets the bank's first rows only, and the ``refine`` share farthest from them the whole bank
    (:class:`PatchcoreSettings`); the extension then meets the K farthest of the resulting distances.
    """

    bank_sq: torch.Tensor
    blur_rows: torch.Tensor
    blur_cols: torch.Tensor
    weight_rows: torch.Tensor
    weight_cols: torch.Tensor

    def __init__(self, model: PatchcoreModel, input_size: int, embedder: DefectEmbedding, candidates: int | None = None,
                 image_score: str = "reweighted", screen_rows: int = 0, refine: float = 0.25,
                 unrefined: str = "scaled", offset: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__()
        if image_score not in IMAGE_SCORES:
            raise ValueError(f"image_score must be one of {', '.join(IMAGE_SCORES)}, not {image_score!r}")
        if unrefined not in UNREFINED:
            raise ValueError(f"unrefined must be one of {', '.join(UNREFINED)}, not {unrefined!r}")
        self.image_score = image_score
        self.unrefined = unrefined
        self.model = model.eval()
        self.input_size = input_size
        self.embedder = embedder
        bank = model.memory_bank
        self.register_buffer("bank_sq", (bank * bank).sum(1))
        self.k_support = min(model.num_neighbors, int(bank.shape[0]))
        self.feature_dim = int(bank.shape[1])
        h, w = self.grid()
        patches = h * w
        # Python ints, so the traced slices and TopK are constants; no screen when it would hold the whole bank
        self.screen = screen_rows if 0 < screen_rows < bank.shape[0] and refine > 0 else 0
        self.refine = min(patches, max(1, round(patches * refine)))
        # a Python int, so the traced TopK has a constant K
        self.k = auto_candidates(patches) if candidates is None else min(max(candidates, 0), patches)
        # anomalib's map: the patch grid upsampled (nearest) to the input, then its Gaussian blur as two 1-D
        # passes (its normalised 2-D kernel is the outer product of the two sums below).  Each pass is a product
        # with a banded matrix that also holds the border padding (no Pad and no convolution, whose OpenVINO CPU
        # kernels were several times slower at some input sizes than at others: docs/benchmarks.md, "the map
        # blur as matrix products"), and the upsampling, itself a product with a 0/1 matrix on each side, is
        # folded into them: ``[H, h] @ patches @ [w, W]`` gives the same map as ``[H, H] @ up(patches) @ [W, W]``
        # at a fraction of the multiply-adds.
        # ``offset`` (rows, cols) in input pixels moves each patch's distance from its cell to the centre of what
        # it sees (ALIGNMENTS); (0, 0) is anomalib's placement.
        blur = model.anomaly_map_generator.blur
        kernel = blur.kernel[0, 0]
        blur_rows, blur_cols = (blur_matrix(kernel.sum(axis), input_size, blur.border_type) for axis in (1, 0))
        self.offset = (float(offset[0]), float(offset[1]))  # a graph rebuilt from this one's model passes it on
        self.register_buffer("blur_rows", blur_rows @ placement(input_size, h, self.offset[0]))
        self.register_buffer("blur_cols", (blur_cols @ placement(input_size, w, self.offset[1])).T.contiguous())
        # The retrieval embedding weighs each patch by its own blurred distance (anomalib's placement, whatever the
        # map's), averaged back onto the grid: ``[h, H] @ [H, h]`` products, the same as pooling that map.
        self.register_buffer("weight_rows", _pool(blur_rows @ placement(input_size, h, 0.0), h))
        self.register_buffer("weight_cols", _pool(blur_cols @ placement(input_size, w, 0.0), w).T.contiguous())

    def grid(self) -> tuple[int, int]:
        """The feature grid (h, w) a frame's patches lie on, from one forward pass of the backbone."""
        with torch.no_grad():
            emb = patch_features(self.model, torch.zeros(1, 3, self.input_size, self.input_size))
        return int(emb.shape[2]), int(emb.shape[3])

    def patches(self) -> int:
        """Patches per frame (h * w of the feature grid)."""
        h, w = self.grid()
        return h * w

    def extension_spec(self) -> ExtensionSpec | None:
        """What the exported graph's extension input and candidate outputs are (the manifest's ``extension``);
        None for a graph without them."""
        return ExtensionSpec(feature_dim=self.feature_dim, candidates=self.k) if self.k else None

    def pad_extension(self) -> torch.Tensor:
        """One pad row: the empty extension."""
        return torch.full((1, self.feature_dim), EXTENSION_PAD)

    @staticmethod
    def _dist(x: torch.Tensor, rows: torch.Tensor, rows_sq: torch.Tensor) -> torch.Tensor:
        """Euclidean distance of every row of x [..., C] to every one of ``rows`` (small x only)."""
        d2 = (x * x).sum(-1, keepdim=True) - 2 * x @ rows.T + rows_sq
        return d2.clamp_min(0).sqrt()

    @staticmethod
    def _nearest(x: torch.Tensor, rows: torch.Tensor, rows_sq: torch.Tensor) -> torch.Tensor:
        """Distance of every row of x [..., C] to its nearest one of ``rows``.

        The query x bank matrix is the frame's largest tensor, so only one fused matrix product with a bias
        and one reduction touch it: ``|x|^2`` is the same for every entry and is added after the minimum, and
        the factor -2 scales the queries, not the product.  No index is taken here; the one patch whose
        nearest entry the score needs gets it from ``_dist``.
        """
        partial = (x * -2) @ rows.T + rows_sq
        return (partial.amin(-1) + (x * x).sum(-1)).clamp_min(0).sqrt()

    def _union_dist(self, x: torch.Tensor, extension: torch.Tensor | None, ext_sq: torch.Tensor) -> torch.Tensor:
        """Distances of x [N, C] to every row of concat(bank, extension) (of the bank alone without an extension)."""
        d = self._dist(x, self.model.memory_bank, self.bank_sq)
        return d if extension is None else torch.cat([d, self._dist(x, extension, ext_sq)], 1)

    def _union_rows(self, idx: torch.Tensor, extension: torch.Tensor | None) -> torch.Tensor:
        """Rows ``idx`` of concat(bank, extension), without copying the bank into a concatenation each frame."""
        bank = self.model.memory_bank
        if extension is None:
            return bank[idx]
        m = bank.shape[0]
        in_bank = (idx < m).unsqueeze(-1)
        return torch.where(in_bank, bank[idx.clamp(max=m - 1)], extension[(idx - m).clamp(min=0)])

    def forward(self, x: torch.Tensor, extension: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if not self.k:
            return self._forward(x, None)
        return self._forward(x, self.pad_extension() if extension is None else extension)

    def _forward(self, x: torch.Tensor, extension: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        bank = self.model.memory_bank
        emb = patch_features(self.model, x)
        n, c, h, w = emb.shape
        flat = emb.flatten(2).transpose(1, 2)  # N, hw, C
        if self.screen:
            s = self.screen
            patch = self._nearest(flat, bank[:s], self.bank_sq[:s])
            vals, top = patch.topk(self.refine, dim=1)
            exact = torch.minimum(vals, self._nearest(self._rows_at(flat, top), bank[s:], self.bank_sq[s:]))
            if self.unrefined == "scaled":
                patch = patch * (exact / vals.clamp_min(1e-6)).mean(1, keepdim=True)
            patch = patch.scatter(1, top, exact)
        else:
            patch = self._nearest(flat, bank, self.bank_sq)  # N, hw
        plain = patch  # the bank's distances: the embedding's weights, the same whatever the extension holds
        if extension is None:
            ext_sq = self.bank_sq[:0]
            extra: tuple[torch.Tensor, ...] = ()
        else:
            extension, ext_sq = self._masked(extension)
            # Only the K patches farthest from the bank can matter, so only they meet the extension.
            vals, top = patch.topk(self.k, dim=1)  # N, K
            candidates = self._rows_at(flat, top)  # N, K, C
            candidate_scores = torch.minimum(vals, self._nearest(candidates, extension, ext_sq))
            patch = patch.scatter(1, top, candidate_scores)
            extra = (candidates, candidate_scores)

        # anomalib's AnomalyMapGenerator (nearest upsampling, then the blur), as two products (see __init__).
        amap = self.blur_rows @ patch.view(n, 1, h, w) @ self.blur_cols
        if self.image_score == "map_max":
            score = amap.flatten(1).amax(1)
        else:  # the paper's re-weighting of the most anomalous patch (as anomalib), over bank + extension
            s_star, idx = patch.max(1)
            f_star = flat.gather(1, idx.view(n, 1, 1).expand(n, 1, c)).squeeze(1)
            m_star = self._union_rows(self._union_dist(f_star, extension, ext_sq).argmin(-1), extension)
            support = self._union_dist(m_star, extension, ext_sq).topk(self.k_support, largest=False).indices  # N, k
            d_support = (f_star.unsqueeze(1) - self._union_rows(support, extension)).norm(dim=-1)
            score = (1 - F.softmax(d_support, 1)[:, 0]) * s_star

        # Embedding: what is wrong (exporter/train/embedding.py), from the same features, weighted by the
        # blurred map brought back to the feature grid: the weighting the retrieval benchmark's ablation
        # measured and tuned (docs/retrieval.md), smoother than the raw patch distances.  The map of the bank
        # alone: a label's extension rows change the scores, not the embedding, so the frames a bundle embedded
        # before and after a label stay comparable (one space per bundle, worker/spaces.py).
        embedding = self.embedder(flat, (self.weight_rows @ plain.view(n, 1, h, w) @ self.weight_cols).flatten(1))
        return score, amap[:, 0], embedding, *extra

    @staticmethod
    def _rows_at(flat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Patch features ``flat`` [N, P, C] at the patch indices ``idx`` [N, K] -> [N, K, C].  Rows of the flattened
        batch are gathered (a Gather), not flat.gather over the feature axis (a GatherElements, which OpenVINO's
        CPU plugin runs with a reference kernel)."""
        n, p, c = flat.shape
        return flat.reshape(-1, c)[idx + torch.arange(n).unsqueeze(1) * p]

    @staticmethod
    def _masked(extension: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The extension with pad rows zeroed, and its rows' squared norms with pad rows at +inf."""
        # Pad rows are masked, not merely far: their distance is +inf, and they enter the products as zeros, so
        # no pad value can overflow f16/bf16 arithmetic (a 1e3 row's squared norm does) and turn into NaN.
        is_pad = (extension == EXTENSION_PAD).all(1)
        extension = torch.where(is_pad.unsqueeze(1), torch.zeros_like(extension), extension)
        ext_sq = torch.where(is_pad, torch.full_like(is_pad, float("inf"), dtype=extension.dtype),
                             (extension * extension).sum(1))
        return extension, ext_sq


def placement(size: int, cells: int, offset: float) -> torch.Tensor:
    """[size, cells] 0/1 matrix: the nearest-neighbour upsampling of ``cells`` grid values to ``size`` map pixels
    that anomalib's map makes, moved ``offset`` pixels up (left), where the cells' content lies; the edge cells
    fill what the move opens."""
    pixel = torch.arange(size, dtype=torch.float64)
    cell = torch.floor((pixel + offset) * cells / size).clamp(0, cells - 1).long()
    return F.one_hot(cell, cells).float()


def _pool(matrix: torch.Tensor, cells: int) -> torch.Tensor:
    """``matrix`` [size, k] averaged over its rows onto ``cells`` rows, as ``F.adaptive_avg_pool2d`` pools a map."""
    return F.adaptive_avg_pool1d(matrix.T.unsqueeze(0), cells)[0].T.contiguous()


def content_offset(model: PatchcoreModel, image: torch.Tensor, draws: int = 8) -> tuple[float, float]:
    """How far (rows, cols, input pixels) the centre of what a patch feature sees lies up and left of its grid
    cell's centre: the centroid of |d(r . feature) / d input| for the central cell of ``image`` [1, 3, H, W]
    (normalised), averaged over ``draws`` seeded random directions r.  A property of the backbone and layers, read
    from the network rather than searched on data."""
    return content_offsets(model, image, [slice(None)], draws)[0]


def content_offsets(model: PatchcoreModel, image: torch.Tensor, parts: list[slice],
                    draws: int = 8) -> list[tuple[float, float]]:
    """:func:`content_offset` of each of ``parts``, a share of the feature's channels (one layer's), from one
    forward pass."""
    x = image.detach().clone().requires_grad_(True)
    rows = torch.arange(x.shape[2], dtype=torch.float64)
    cols = torch.arange(x.shape[3], dtype=torch.float64)
    offsets = []
    with torch.enable_grad():
        emb = patch_features(model, x, grad=True)
        _, _, h, w = emb.shape
        i, j = h // 2, w // 2
        for part in parts:
            feature = emb[0, part, i, j]
            weight = torch.zeros(x.shape[2:], dtype=torch.float64)
            rng = torch.Generator().manual_seed(0)
            for _ in range(draws):
                r = torch.randn(feature.shape[0], generator=rng)
                (grad,) = torch.autograd.grad((feature * r).sum(), x, retain_graph=True)
                weight += grad[0].abs().sum(0).double()
            total = weight.sum()
            cy, cx = float((weight.sum(1) * rows).sum() / total), float((weight.sum(0) * cols).sum() / total)
            offsets.append(((i + 0.5) * x.shape[2] / h - 0.5 - cy, (j + 0.5) * x.shape[3] / w - 0.5 - cx))
    return offsets


def layer_shifts(model: PatchcoreModel, image: torch.Tensor) -> list[tuple[float, float]]:
    """For each layer after the first: how far (rows, cols, input pixels) up and left of the first layer's its
    content lies once the model has resampled it onto the first layer's grid (anomalib's way, unless the model
    carries a :class:`LayerResample`): the difference of their :func:`content_offset`, the shift to undo."""
    edges = list(itertools.accumulate(model.feature_extractor.out_dims, initial=0))  # the layers' channels, in order
    offsets = content_offsets(model, image, [slice(a, b) for a, b in itertools.pairwise(edges)])
    return [(dy - offsets[0][0], dx - offsets[0][1]) for dy, dx in offsets[1:]]


def blur_matrix(taps: torch.Tensor, size: int, border: str) -> torch.Tensor:
    """[size, size] matrix A with ``A @ x`` = x padded by ``border`` along its first axis, then correlated with
    ``taps`` (odd length), as ``F.pad`` and ``F.conv2d`` with a [k, 1] kernel would do it."""
    half = len(taps) // 2
    padded = F.pad(torch.eye(size).view(1, 1, size, size), [0, 0, half, half], mode=border)[0, 0]  # [size + 2 half, size]
    return F.conv1d(padded.T.unsqueeze(1), taps.view(1, 1, -1).to(padded.dtype))[:, 0].T.contiguous()


def extract(model: PatchcoreModel, paths: list[Path], spec: InputSpec, backbone: Backbone, batch_size: int,
            views: Views = Views.FRAME, tiling: TilingSpec | None = None) -> torch.Tensor:
    """Patch features of all images (each tile of each with ``tiling``, each in every one of ``views``, the image
    itself first), flattened to [N * tiles * views * h * w, C].

    Written into one tensor sized after the first batch, which is also when a set too large for the memory
    left is refused (the coreset later adds its projection, at most as large again).
    """
    features: torch.Tensor | None = None
    row = 0
    progress = Every()
    for start in range(0, len(paths), batch_size):
        batch = paths[start : start + batch_size]
        images = [v for p in batch for tile in read_tiles(p, spec, tiling) for v in views.of(tile)]
        for first in range(0, len(images), batch_size):
            with torch.no_grad():
                emb = patch_features(model, as_fitted(to_tensor(images[first : first + batch_size], backbone), spec))
            rows = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
            if features is None:  # every image has the input's shape: as many views and patches as the first
                per_image = len(images) // len(batch) * emb.shape[2] * emb.shape[3]
                check_fits(2 * per_image * rows.shape[1] * rows.element_size(), len(paths),
                           f"the patch features of {len(paths)} training images ({per_image * len(paths)} rows of "
                           f"{rows.shape[1]})", "train on fewer images, a smaller --input-size or fewer --bank-views")
                features = torch.empty(per_image * len(paths), rows.shape[1], dtype=rows.dtype)
            features[row : row + rows.shape[0]] = rows
            row += rows.shape[0]
            done = start + len(batch) * min(first + batch_size, len(images)) / len(images)  # a share of a batch too
            if progress.due(last=done == len(paths)):
                log.info("features %d/%d images, %s", done, len(paths), progress.eta(done / len(paths)))
    if features is None or row != features.shape[0]:
        raise ValueError(f"no patch features from {len(paths)} images" if features is None else
                         f"{row} patch features where {features.shape[0]} were expected")
    return features


def build_model(settings: PatchcoreSettings, backbone: Backbone) -> PatchcoreModel:
    """anomalib's PatchcoreModel for these settings, its memory bank still empty."""
    model = PatchcoreModel(
        layers=settings.layers,
        backbone=backbone.timm_name,
        pre_trained=backbone.pre_trained,
        num_neighbors=settings.num_neighbors,
    ).eval()
    if settings.neighbourhood < 1 or settings.neighbourhood % 2 == 0:
        raise ValueError(f"neighbourhood must be an odd number of feature cells, not {settings.neighbourhood}")
    # anomalib's own forward (the parity reference) pools with the same module
    model.feature_pooler = torch.nn.AvgPool2d(settings.neighbourhood, 1, settings.neighbourhood // 2)
    # anomalib's fixed sigma of 4 px is tuned for 256 px inputs; larger inputs get the same share of the frame
    # (docs/quality/README.md), and anomalib's own forward (the parity reference) then uses the same blur.
    model.anomaly_map_generator = AnomalyMapGenerator(sigma=settings.blur_sigma)  # type: ignore[arg-type]  # annotated int, takes any float
    return model


def fit(settings: PatchcoreSettings, backbone: Backbone, train: list[Path], spec: InputSpec) -> tuple[PatchcoreGraph, dict]:
    """Build the memory bank from normal images; returns the export graph and timings."""
    torch.manual_seed(settings.seed)
    if settings.map_alignment not in ALIGNMENTS:
        raise ValueError(f"map_alignment must be one of {', '.join(ALIGNMENTS)}, not {settings.map_alignment!r}")
    if settings.layer_alignment not in LAYER_ALIGNMENTS:
        raise ValueError(f"layer_alignment must be one of {', '.join(LAYER_ALIGNMENTS)}, not {settings.layer_alignment!r}")
    model = build_model(settings, backbone)
    started = time.monotonic()
    offset = (0.0, 0.0)
    shifts: list[tuple[float, float]] = []
    first = as_fitted(to_tensor([read_tiles(train[0], spec, tiling_of(settings))[0]], backbone), spec)
    if settings.layer_alignment == "centred" and len(settings.layers) > 1:
        shifts = layer_shifts(model, first)
        model.layer_resample = LayerResample.of(model, first, shifts)
        log.info("layers: %s resampled %s px down and right, onto %s's content", ", ".join(settings.layers[1:]),
                 ", ".join(f"{dy:.1f}/{dx:.1f}" for dy, dx in shifts), settings.layers[0])
    if settings.map_alignment == "centred":
        offset = content_offset(model, first)
        log.info("map: patch content centred %.1f, %.1f px up and left of its cell", *offset)
    features = extract(model, train, spec, backbone, settings.batch_size, Views(settings.bank_views),
                       tiling_of(settings))
    extracted = time.monotonic()
    # At least the re-weighting's support (a ratio of few patches rounds down to 1 row, whose support of one scores
    # every image 0), unless a cap says fewer; a cap of 1 is refused for that reason.
    n_select = max(int(features.shape[0] * settings.coreset_ratio), min(features.shape[0], settings.num_neighbors))
    if settings.max_bank == 1:
        raise ValueError("max_bank 1 scores every image 0 (the score weighs a patch's distance by its neighbours in "
                         "the bank): 0 for no cap, or at least 2")
    if settings.max_bank:
        n_select = min(n_select, settings.max_bank)
    log.info("coreset: %d of %d patch features (ratio %.3f)", n_select, features.shape[0], settings.coreset_ratio)
    idx = greedy_coreset(features, n_select, settings.coreset_projection, settings.seed)
    model.memory_bank = features[idx].contiguous()
    done = time.monotonic()
    graph = PatchcoreGraph(model, settings.input_size, DefectEmbedding.fit(features, seed=settings.seed),
                           settings.extension_candidates, settings.image_score, settings.screen_rows,
                           settings.refine, settings.unrefined, offset).eval()
    timings = {
        "feature_extraction_s": round(extracted - started, 2),
        "coreset_s": round(done - extracted, 2),
        "fit_s": round(done - started, 2),
        "patch_features": int(features.shape[0]),
        "memory_bank": int(n_select),
        "feature_dim": int(features.shape[1]),
        "map_offset_px": [round(v, 2) for v in offset],
        "layer_shift_px": [[round(v, 2) for v in shift] for shift in shifts],
    }
    return graph, timings
