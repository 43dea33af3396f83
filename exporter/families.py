"""Model families as plugins: each declares its settings, CLI options and weight precisions and fits an export graph.

The network and its training live in ``exporter/train/<family>.py`` (as anomalib splits ``torch_model`` from
``lightning_model``); a :class:`Family` is the small adapter the commands use, registered in :data:`FAMILIES` by
the name ``bundle.json`` records, so no command branches on a family's name.  This module stays light (no torch,
anomalib or OpenVINO at import): the parser is built from it before any command needs those.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from bundle.extension import Views

if TYPE_CHECKING:
    from exporter.build import Trained
    from exporter.thresholds import ThresholdChoice
    from exporter.train.efficientad import EfficientAdSettings
    from exporter.train.patchcore import PatchcoreSettings

S = TypeVar("S")


def _names(value: str) -> list[str]:
    """A comma-separated list option, e.g. ``--layers blocks.2,blocks.4``."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one name")
    return names


@dataclass(frozen=True)
class Option:
    """One CLI option that sets the settings field of the same name; no default here: the settings hold it."""

    flag: str
    help: str
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


def _bank_cap(value: str) -> int:
    """--max-bank: 0 (no cap) or at least 2 rows."""
    number = int_in(0)(value)
    if number == 1:
        raise argparse.ArgumentTypeError("1 row scores every image 0 (the score weighs a patch's distance by its "
                                         "neighbours in the bank): 0 for no cap, or at least 2")
    return number


def _sha256(value: str) -> str:
    """--teacher-sha256: 64 hex digits, refused by the parser (a digest cut short when pasted matched no file)."""
    if len(value) != 64 or any(c not in "0123456789abcdefABCDEF" for c in value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a sha256 (64 hex digits)")
    return value.lower()


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer option within bounds, refused by the parser before any data is read (an input side of 0 or 100000
    failed only once the images were being resized, the second as a 30 GB allocation)."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if number < low or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"{number} is outside {low}..{high}" if high is not None
                                             else f"{number} is below {low}")
        return number
    return parse


def _share(value: str) -> float:
    """A share in (0, 1]: 0 or 2 were taken, NaN failed only after the features were extracted."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not a share in (0, 1]")
    return number


MAX_INPUT = 2048  # larger frames: --tiling, which keeps each tile at a size the backbone was made for


def _grid(value: str) -> tuple[int, int]:
    """``--tiling 4x3``: tiles across and down."""
    cols, sep, rows = value.lower().partition("x")
    if not sep or not cols.strip().isdigit() or not rows.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{value!r}: give tiles across and down as COLSxROWS, e.g. 4x3")
    return int(cols), int(rows)


# Training on tiles is the same for every family: the data is cut as the worker cuts a tiled camera's frames.
TILING = (
    Option("--tiling", "train on COLSxROWS tiles of each image (e.g. 4x3), each at the input size, cut as the "
                       "worker's camera tiling cuts frames; the bundle records it and the worker tiles every camera "
                       "that sets no tiling of its own (README, Tiling)", _grid),
    Option("--tile-overlap", "with --tiling: fraction of a tile shared with its neighbour (default 0.1)", float),
)


class Family(ABC, Generic[S]):
    """A model family: its name in ``bundle.json``, its options and what it can export."""

    name: ClassVar[str]
    title: ClassVar[str]
    options: ClassVar[tuple[Option, ...]]
    weight_precisions: ClassVar[tuple[str, ...]] = ("fp32",)  # what `train --precision` may ask of this family

    @abstractmethod
    def settings_class(self) -> type[S]:
        """The settings dataclass, imported on use (it lives beside the network, with torch and anomalib)."""

    def settings(self, args: argparse.Namespace | None = None) -> S:
        """Settings from the options the user set; every other field keeps the dataclass's default."""
        given = {o.dest: getattr(args, o.dest) for o in self.options if getattr(args, o.dest, None) is not None}
        return self.settings_class()(**given)

    @abstractmethod
    def fit(self, data: Path, category: str | None, settings: S, threshold: ThresholdChoice) -> Trained:
        """Split the data, fit, and return the export graph with its training record, ready for ``build.package``."""

    def check(self, settings: S) -> None:
        """Refuse settings the fit would fail on only late, before the data is read; none by default."""


class PatchCore(Family["PatchcoreSettings"]):
    """anomalib's PatchcoreModel with our memory-bank fit; its exported graph is the one NNCF int8 is wired for."""

    name = "patchcore"
    title = "PatchCore"
    options = (
        Option("--backbone", "timm name; offline weights exist for efficientnet_lite0/1/2"),
        Option("--backbone-weights", "local weights file for --backbone (.pth or .safetensors)"),
        Option("--backbone-weights-sha256", "refuse a --backbone-weights file of another sha256 (a bundle's "
                                            "training.backbone_weights_sha256: the command printed after a capture "
                                            "export gives it)", _sha256),
        Option("--layers", "comma-separated layers of --backbone (efficientnet_lite0/1/2: blocks.0, blocks.1, blocks.2, "
                          "blocks.4, blocks.6); a name the backbone lacks is refused", _names),
        Option("--input-size", f"square input side in pixels (32..{MAX_INPUT})", int_in(32, MAX_INPUT)),
        Option("--coreset-ratio", "memory-bank share of all patch features, in (0, 1]", _share),
        Option("--neighbourhood", "feature cells (odd, p x p) averaged into each patch's feature (PatchCore's local "
                                  "neighbourhood; default 3, anomalib's)", int_in(1, 15)),
        Option("--max-bank", "cap on memory-bank rows, which bounds latency, bundle size and fit time "
                             "(0: no cap, the bank is --coreset-ratio of all patch features; else at least 2: the "
                             "score re-weights by a patch's neighbours in the bank, and one row scores every image 0)",
               _bank_cap),
        Option("--extension-candidates", "patches per frame compared with the bank extension and returned as "
                                         "candidates for it (issue 17; default a 32nd of the frame's patches, "
                                         "64 to 256; 0: a graph without the extension input)", int_in(0)),
        Option("--image-score", "how a frame's score is read: reweighted, anomalib's re-weighted distance of the most "
                                "anomalous patch (default), or map_max, the blurred anomaly map's maximum (a false "
                                "alarm's absorption then takes many more extension rows)", choices=("reweighted", "map_max")),
        Option("--bank-views", "copies of each training image the memory bank is built from: frame (the image "
                               "alone, default), flips (and its three flips) or d4 (and its quarter turns too): for "
                               "textures and parts whose flipped or turned image is a good part too, never for a part "
                               "with a handedness; fit time and memory grow with the views", choices=tuple(v.value for v in Views)),
        Option("--screen-rows", "a cheap first stage: every patch meets only the bank's first N rows (a coarser "
                                "coreset of their own), and the --refine share of patches farthest from them meets "
                                "the whole bank (0: every patch meets the whole bank)", int_in(0)),
        Option("--refine", "with --screen-rows: the share of a frame's patches that meets the whole bank", _share),
        Option("--unrefined", "with --screen-rows: an unrefined patch's distance is its distance to the screen rows "
                              "scaled by the frame's refined patches' mean ratio of whole-bank to screen distance "
                              "(scaled, default: an estimate) or that distance as it is (bound: never smaller than "
                              "to the whole bank)",
               choices=("bound", "scaled")),
        Option("--map-alignment", "where the anomaly map puts a patch's distance: centred (default: at the centre "
                                  "of what the patch's feature sees, which the fit reads from the backbone) or anomalib "
                                  "(at the patch's grid cell, anomalib's placement, beside the defect)",
               choices=("centred", "anomalib")),
        Option("--layer-alignment", "how the deeper layers' features meet the first layer's grid: anomalib "
                                    "(default: resampled as anomalib does, their content a few pixels up and left of "
                                    "the first layer's) or centred (sampled where their content lies on the first "
                                    "layer's, a shift the fit reads from the backbone)",
               choices=("anomalib", "centred")),
        *TILING,
    )
    weight_precisions = ("fp32", "int8")

    def settings_class(self) -> type[PatchcoreSettings]:
        from exporter.train.patchcore import PatchcoreSettings

        return PatchcoreSettings

    def check(self, settings: PatchcoreSettings) -> None:
        from exporter.backbones import check_layers, check_weights

        check_weights(settings.backbone_weights, settings.backbone_weights_sha256)
        check_layers(settings.backbone, settings.layers)

    def fit(self, data: Path, category: str | None, settings: PatchcoreSettings, threshold: ThresholdChoice) -> Trained:
        from exporter.build import fit_patchcore

        return fit_patchcore(data, category, settings, threshold)


class EfficientAd(Family["EfficientAdSettings"]):
    """anomalib's EfficientAdModel trained by our own loop with a local teacher (nothing downloaded)."""

    name = "efficientad"
    title = "EfficientAD"
    options = (
        Option("--input-size", f"square input side in pixels (256..{MAX_INPUT})", int_in(256, MAX_INPUT)),
        Option("--model-size", "PDN size", choices=("small", "medium")),
        Option("--steps", "student/autoencoder training steps at batch 1 (default: 10 passes over the training images)",
               int_in(1)),
        Option("--teacher", "PDN teacher file to use (.safetensors or weights-only .pt); default: "
                            "exporter/teachers/pdn-SIZE.safetensors if it ships (sha256 checked; EDGE_INSPECT_TEACHERS "
                            "overrides the folder), else distil one, cached"),
        Option("--teacher-sha256", "refuse a --teacher file of another sha256 (a bundle's training.teacher_sha256: "
                                   "the command printed after a capture export gives it); a file not found is this "
                                   "exporter's shipped teacher where that one has it", _sha256),
        Option("--teacher-steps", "distil a teacher with this many steps (cached) instead of using a shipped one",
               int_in(1)),
        Option("--natural", "natural photos: penalty set and distillation set"),
        Option("--train-precision", "f32 (default) or bf16: the training loops under torch's CPU autocast, several "
                                    "times faster where the CPU has AMX, refused where it has no bf16 units; the "
                                    "bundle is exported at f32 either way", choices=("f32", "bf16")),
        *TILING,
    )

    def settings_class(self) -> type[EfficientAdSettings]:
        from exporter.train.efficientad import EfficientAdSettings

        return EfficientAdSettings

    def check(self, settings: EfficientAdSettings) -> None:
        from exporter.train.efficientad import check

        check(settings)

    def fit(self, data: Path, category: str | None, settings: EfficientAdSettings, threshold: ThresholdChoice) -> Trained:
        from exporter.build import fit_efficientad

        return fit_efficientad(data, category, settings, threshold)


FAMILIES: dict[str, Family[Any]] = {f.name: f for f in (PatchCore(), EfficientAd())}
WEIGHT_PRECISIONS = tuple(dict.fromkeys(p for f in FAMILIES.values() for p in f.weight_precisions))


def select(names: Iterable[str]) -> list[Family[Any]]:
    """The families named, in order; an unknown name is refused with the known ones."""
    names = list(names)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {list(FAMILIES)}")
    return [FAMILIES[n] for n in names]


def _owners() -> list[tuple[Option, list[Family[Any]]]]:
    """Each option (as its first family declares it) with the families that use it, in registry order."""
    owners: dict[str, tuple[Option, list[Family[Any]]]] = {}
    for family in FAMILIES.values():
        for option in family.options:
            owners.setdefault(option.flag, (option, []))[1].append(family)
    return list(owners.values())


def add_options(parser: argparse.ArgumentParser) -> None:
    """Every family's options, one group each; an option several families share goes in a common group."""
    shared = parser.add_argument_group("options of several model families (defaults: each family's settings)")
    groups = {f.name: parser.add_argument_group(f"{f.title} (defaults: the settings in exporter/train/{f.name}.py)")
              for f in FAMILIES.values()}
    for option, families in _owners():
        if len(families) == 1:
            groups[families[0].name].add_argument(option.flag, type=option.type, choices=option.choices, help=option.help)
        else:
            shared.add_argument(option.flag, type=option.type, choices=option.choices,
                                help=f"{option.help} [{', '.join(f.name for f in families)}]")


def refuse_unused(args: argparse.Namespace, families: list[Family[Any]]) -> None:
    """Refuse a family option that none of the chosen families uses, rather than ignore it silently."""
    for option, owners in _owners():
        if getattr(args, option.dest, None) is not None and not any(f in families for f in owners):
            raise ValueError(f"{option.flag} is not an option of {' or '.join(f.name for f in families)} "
                             f"(it is {' and '.join(f.name for f in owners)}'s)")
