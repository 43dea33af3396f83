"""EfficientAD on anomalib 2.7 without downloads: anomalib's network, our teacher, our training loop.

anomalib's lightning ``EfficientAd`` fetches its pretrained PDN teacher and Imagenette
in ``on_train_start``.  Here the teacher comes from :mod:`exporter.teacher` (distilled
locally, or a file the user names) and the penalty images are the local natural photos;
the loop reproduces anomalib's ``training_step`` (batch 1, Adam, LR /10 at 95 % of the
steps, hard-feature student loss + penalty, autoencoder and student-autoencoder losses)
on ``EfficientAdModel`` itself, and the map-normalisation quantiles come from held-out
normal images, as anomalib takes them from good validation images.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel, EfficientAdModelSize, reduce_tensor_elems
from torch import nn

from bundle import InputSpec, sha256_file
from exporter.data import DatasetError, read_tiles, tiling_of
from exporter.progress import Progress
from exporter.teacher import (
    DEFAULT_NATURAL,
    TeacherSettings,
    autocast,
    check_train_precision,
    load_rgb,
    load_teacher,
    natural_images,
    shipped_teacher,
    teacher_channels,
    teacher_file,
)
from exporter.train.embedding import DefectEmbedding
from exporter.train.grey import as_fitted
from exporter.train.patchcore import to_tensor

log = logging.getLogger(__name__)

# EfficientAD takes RGB in 0..1 and applies ImageNet normalisation inside its networks.
MEAN = (0.0, 0.0, 0.0)
STD = (1.0, 1.0, 1.0)
MIN_SIZE = 256
PASSES = 10  # default student budget: passes over the training images at batch 1


@dataclass
class EfficientAdSettings:
    model_size: str = "small"
    teacher: str | None = None  # a teacher file; None: the shipped one, else distil one (cached)
    teacher_sha256: str | None = None  # the teacher file must be this one (a bundle's recorded teacher_sha256)
    teacher_steps: int | None = None  # distil with this many steps (cached) even when a teacher ships
    natural: str = str(DEFAULT_NATURAL)  # penalty images, and the teacher's distillation set
    input_size: int = 256
    steps: int | None = None  # None: PASSES passes over the training images
    lr: float = 1e-4
    weight_decay: float = 1e-5
    seed: int = 0
    train_precision: str = "f32"  # or "bf16" (exporter.teacher.autocast); the export is f32 either way
    tiling: tuple[int, int] | None = None  # train on tiles (cols, rows) of each image, as PatchcoreSettings.tiling
    tile_overlap: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


class EfficientAdGraph(nn.Module):
    """Inference path for export: ``(score [N], anomaly_map [N,H,W], embedding [N,D])``.

    Score and map are exactly ``EfficientAdModel.forward`` in eval mode (the parity test
    checks it); the teacher features and student-teacher distances feed the defect embedding.
    """

    def __init__(self, model: EfficientAdModel, embedder: DefectEmbedding) -> None:
        super().__init__()
        self.model = model.eval()
        self.embedder = embedder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        teacher = m._normalize_teacher(m.teacher(x))
        student = m.student(x)
        distance_st = (teacher - student[:, : m.teacher_out_channels]) ** 2
        map_st, map_stae = m.compute_maps(x, student, distance_st, normalize=True)
        amap = 0.5 * map_st + 0.5 * map_stae
        score = amap.amax((-2, -1))[:, 0]
        flat = teacher.flatten(2).transpose(1, 2)  # N, hw, C
        return score, amap[:, 0], self.embedder(flat, distance_st.mean(1).flatten(1))


def _penalty_image(images: list[np.ndarray], size: int, rng: random.Random) -> torch.Tensor:
    """anomalib's Imagenette transform: resize to 2x, random grey (p=0.3), centre crop; RGB 0..1 [1,3,H,W]."""
    image = cv2.resize(images[rng.randrange(len(images))], (2 * size, 2 * size), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.3:
        image = np.repeat(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[..., None], 3, 2)
    lo = size // 2
    crop = np.ascontiguousarray(image[lo : lo + size, lo : lo + size])
    return torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0).float() / 255.0


def check(settings: EfficientAdSettings) -> None:
    """Refuse what the fit would fail on, or silently not do, before any data is read: an input too small, a
    teacher file given with --teacher-steps (a distillation that would not run, yet be recorded), a bf16 this CPU
    would emulate, a teacher file that is not a PDN's."""
    if settings.input_size < MIN_SIZE:
        raise ValueError(f"EfficientAD needs input_size >= {MIN_SIZE} (its autoencoder ends in an 8x8 convolution "
                         f"after five stride-2 ones), not {settings.input_size}")
    if settings.teacher and settings.teacher_steps:
        raise ValueError("--teacher-steps distils a teacher, --teacher uses the one in a file: give one of them")
    if settings.teacher_sha256 and not settings.teacher:
        raise ValueError("--teacher-sha256 checks the file --teacher names: give --teacher with it")
    check_train_precision(settings.train_precision)
    if settings.teacher:
        load_teacher(given_teacher(settings))
    natural_images(Path(settings.natural))


def given_teacher(settings: EfficientAdSettings) -> Path:
    """``--teacher``'s file, which with ``--teacher-sha256`` must be that very file: a command printed after a capture
    export names the serving bundle's teacher by the path it had on the box that trained it, where on this box
    another file (another checkout's shipped teacher) may lie, which trained another model without a word.  A file
    missing there is this exporter's shipped teacher where that one has the sha256 asked for."""
    path = Path(settings.teacher or "")
    wanted = (settings.teacher_sha256 or "").lower()
    if not wanted:
        return path
    if path.is_file():
        if (actual := sha256_file(path)) != wanted:
            raise ValueError(f"teacher file {path} has sha256 {actual}, not {wanted} as --teacher-sha256 asks: it is "
                             "another teacher than the one the bundle was trained with, and the student learns its "
                             "teacher's features; give that teacher's file with --teacher")
        return path
    if (shipped := shipped_teacher(settings.model_size)) is not None and sha256_file(shipped) == wanted:
        log.info("teacher file %s not found; this exporter's shipped %s has the sha256 asked for: training with it",
                 path, shipped)
        return shipped
    raise FileNotFoundError(f"teacher file {path} not found: --teacher-sha256 asks for the teacher of sha256 {wanted} "
                            "(the one the bundle was trained with, at that path on the box that trained it; not this "
                            "exporter's shipped teacher): copy that file to this box and give its path with --teacher")


def build_model(settings: EfficientAdSettings) -> tuple[EfficientAdModel, dict]:
    """anomalib's model with our teacher loaded (and frozen); returns it with the teacher's metadata."""
    shipped = None if settings.teacher or settings.teacher_steps else shipped_teacher(settings.model_size)
    if settings.teacher:
        path = given_teacher(settings)
    elif shipped:
        path = shipped
    else:
        path = teacher_file(TeacherSettings(size=settings.model_size, steps=settings.teacher_steps or TeacherSettings.steps,
                                            seed=settings.seed, train_precision=settings.train_precision),
                            Path(settings.natural))
    state, meta = load_teacher(path)
    size, channels = teacher_channels(state)
    if size != settings.model_size:
        raise ValueError(f"teacher {path} is a {size} PDN, settings ask for {settings.model_size}")
    model = EfficientAdModel(teacher_out_channels=channels, model_size=EfficientAdModelSize(size), padding=False)
    model.teacher.load_state_dict(state)
    model.teacher.requires_grad_(False)
    return model, {"teacher_file": str(path), "teacher_sha256": sha256_file(path), "teacher": meta}


def step_budget(settings: EfficientAdSettings, n_train: int) -> int:
    """``settings.steps``, else PASSES passes over the training images: the budget scales with the data."""
    return settings.steps or PASSES * n_train


@torch.no_grad()
def _channel_mean_std(model: EfficientAdModel, images: torch.Tensor) -> torch.Tensor:
    """anomalib's teacher_channel_mean_std over the training images; returns their standardised features."""
    feats = torch.cat([model.teacher(images[i : i + 8]) for i in range(0, len(images), 8)])
    mean = feats.mean((0, 2, 3))[None, :, None, None]
    std = (feats.pow(2).mean((0, 2, 3))[None, :, None, None] - mean**2).sqrt()
    model.mean_std.update({"mean": mean, "std": std})
    return ((feats - mean) / std).permute(0, 2, 3, 1).reshape(-1, feats.shape[1])


@torch.no_grad()
def _map_quantiles(model: EfficientAdModel, images: torch.Tensor) -> None:
    """anomalib's map_norm_quantiles (90 % and 99.5 %) on held-out normal images."""
    model.eval()
    maps = [model.get_maps(images[i : i + 1], normalize=False) for i in range(len(images))]
    st = reduce_tensor_elems(torch.cat([m[0] for m in maps]))
    ae = reduce_tensor_elems(torch.cat([m[1] for m in maps]))
    quantiles = {"qa_st": torch.quantile(st, 0.9), "qb_st": torch.quantile(st, 0.995),
                 "qa_ae": torch.quantile(ae, 0.9), "qb_ae": torch.quantile(ae, 0.995)}
    for name, map_name in (("st", "student-teacher"), ("ae", "autoencoder")):
        # The map is normalised by (map - qa) / (qb - qa): with no spread every value becomes 0/0, a NaN bundle.
        if not quantiles[f"qb_{name}"] > quantiles[f"qa_{name}"]:
            raise DatasetError(f"the held-out normal images' {map_name} anomaly maps have no spread (their 90th and "
                               "99.5th percentiles are equal), so EfficientAD's map normalisation would divide by "
                               "zero: the normal images are featureless (flat?); train on images with texture, or use "
                               "PatchCore")
    model.quantiles.update(quantiles)


def _refuse_flat(images: torch.Tensor) -> None:
    """Refuse normal images that are each one flat colour: EfficientAD learns their texture and normalises its maps
    by their spread on the held-out ones, and such images have neither (the fit would end in a NaN bundle).  A
    DatasetError: ``benchmark`` names the category and goes on to the next (a ValueError ended the whole run)."""
    if bool((images.flatten(1).std(1) == 0).all()):
        raise DatasetError(f"every one of the {len(images)} normal images (or tiles) is a single flat colour: "
                           "EfficientAD has no texture to learn and its anomaly maps no spread to normalise by; train "
                           "on images with texture, or use PatchCore")


def fit(settings: EfficientAdSettings, train: list[Path], normals: list[Path], spec: InputSpec) -> tuple[EfficientAdGraph, dict]:
    """Train student and autoencoder on ``train``; map quantiles from ``normals``; returns graph and timings.

    The step budget (``steps`` in the returned record, which the manifest keeps) is ``settings.steps``
    or PASSES passes over ``train`` at batch 1.
    """
    check(settings)
    tiling = tiling_of(settings)
    images = as_fitted(to_tensor([tile for p in train for tile in read_tiles(p, spec, tiling)], spec), spec)
    held = as_fitted(to_tensor([tile for p in normals for tile in read_tiles(p, spec, tiling)], spec), spec)
    _refuse_flat(torch.cat([images, held]))
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    started = time.monotonic()
    model, teacher_info = build_model(settings)
    teacher_s = time.monotonic() - started
    penalty = load_rgb(natural_images(Path(settings.natural)))
    embedder = DefectEmbedding.fit(_channel_mean_std(model, images), seed=settings.seed)
    params = list(model.student.parameters()) + list(model.ae.parameters())
    optimiser = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    steps = step_budget(settings, len(images))
    schedule = torch.optim.lr_scheduler.StepLR(optimiser, step_size=max(1, int(0.95 * steps)), gamma=0.1)
    model.train()
    log.info("efficientad: %d steps at batch 1 (%s)", steps,
             "--steps" if settings.steps else f"{PASSES} passes over {len(images)} training {'tiles' if tiling else 'images'}")
    progress = Progress("efficientad", steps)
    train_started = time.monotonic()
    recent: list[float] = []
    for step in range(steps):
        batch = images[rng.randrange(len(images))].unsqueeze(0)
        with autocast(settings.train_precision):
            loss_st, loss_ae, loss_stae = model(batch, _penalty_image(penalty, settings.input_size, rng))
            loss = (loss_st + loss_ae + loss_stae).float()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        recent.append(loss.item())
        progress.update(step + 1, recent[-1])
    trained = time.monotonic()
    _map_quantiles(model, held)
    graph = EfficientAdGraph(model, embedder).eval()
    timings = {
        **teacher_info,
        "steps": steps,
        "teacher_s": round(teacher_s, 2),
        "train_steps_s": round(trained - train_started, 2),
        "step_s": round((trained - train_started) / max(1, steps), 3),
        "final_loss": round(float(np.mean(recent[-100:])), 5) if recent else None,
        "fit_s": round(time.monotonic() - started, 2),
    }
    return graph, timings
