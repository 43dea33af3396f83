"""Training data as users have it, read into one shape: normal training images and a labelled test split.

Layouts (:func:`load_category` tells them apart; README "Training data" has an example of each):

* **MVTec AD** and the public sets built like it: ``CATEGORY/train/good``, ``CATEGORY/test/<type>``, optional
  ``CATEGORY/ground_truth/<type>/`` masks (a defect type without them is labelled per image only). Read as they are
  downloaded: normal folders named ``good``, ``ok`` (BTAD) or ``normal``; a mask named ``<stem>_mask.*`` (MVTec AD,
  MPDD, MVTec AD 2) or ``<stem>.*`` (BTAD, VisA as anomalib splits it), or a folder ``<stem>/`` of masks whose union
  is the truth (MVTec LOCO, AutoVI); images in an ``rgb/`` folder with masks in ``gt/`` beside it (MVTec 3D-AD);
  the labelled test split in ``test_public/`` with its ``ground_truth/`` inside (MVTec AD 2);
* **masks beside images**: ``<stem>_GT.png`` (KolektorSDD2), ``<stem>_label.bmp`` (KolektorSDD) or ``<stem>_mask.*``
  beside ``<stem>.*``, or in a ``Label/`` folder beside the images (DAGM 2007: ``Train/Label/0002_label.PNG``); an
  image is a defect when its mask has a non-zero pixel.  In ``train/`` and ``test/`` folders (any case; the
  defects among the training images are left out), one folder per part (KolektorSDD) or a single folder;
* **good only**: a folder of normal images, no test split (train, threshold, export; ``evaluate`` scores every
  image as a good part, for the false alarms: :meth:`Category.as_good_parts`);
* **labelled folders**: ``good/`` (or ``ok/``, ``normal/``) plus one folder per defect type (or ``ng/``), a
  defect's mask where one lies beside it;
* **a list**: ``.csv`` (``path,label[,mask]``, or any columns a header names, ``image`` for ``path``, with an
  optional ``split`` (train/test, :data:`SPLITS`) and ``object`` column: VisA's ``split_csv/1cls.csv`` as it is downloaded, an
  object picked by ``--category``) or ``.json`` (``[{"path", "label", "mask"?, "split"?, "object"?}]``), paths
  relative to the list file (or the folder above it, as VisA's are).

For the last two, and for masks beside images without ``train/`` and ``test/``, a test split is made here (unless
a list has a ``split`` column): every defect image goes to test, and a seeded share (:data:`TEST_GOOD_FRACTION`) of
the good images too; training never sees a test image.

In a folder that pairs masks with its images, a file named as a mask (``<stem>_GT``, ``_label``, ``_mask``) is never
read as an image: one without its image is refused by name (:func:`_masks_beside`).

Hidden files and folders (:func:`hidden`) are never read as data.  In folders, an image is told by its name
(:data:`IMAGE_SUFFIXES`); the summary names the other files that are not read (:func:`not_read`), and refuses an
image whose content is in a format the worker refuses as a frame (:data:`bundle.FRAME_FORMATS`), whatever its name.

Images are read with OpenCV ``IMREAD_COLOR`` and resized with :func:`bundle.prepare_image`, exactly as the
worker decodes and resizes a frame, so training, evaluation and serving see identical pixels: grey images
become three equal channels, 16-bit images are scaled to 8 bits by OpenCV's fixed full-range shift (not by
each image's own range), and any size is stretched to the square input (INTER_AREA), or cut into tiles with --tiling.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PureWindowsPath
from typing import Protocol

import cv2
import numpy as np
from PIL import ExifTags, Image
from pydantic import ValidationError

from bundle import (
    ASPECT_TOLERANCE,
    FRAME_FORMATS,
    FRAME_MAX_BYTES,
    FRAME_MAX_PIXELS,
    GREY_CHROMA,
    MAX_TILES,
    MIN_TRAIN_IMAGES,
    TIFF_LAYOUT_FIX,
    InputSpec,
    JpegCutShort,
    TilingSpec,
    chroma,
    decode_jpeg,
    jpeg_cut_short,
    png_cut_short,
    png_damaged,
    prepare_image,
    quiet_png,
    tiff_layout,
    tiff_samples,
)
from bundle.tiling import canvas_size, tiles

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".bmp", ".tif", ".tiff", ".webp"}  # .jfif: Windows' JPEG name
# Files beside images that nobody means as one (notes, lists, Windows' thumbnail cache): not named as not read
NOT_IMAGE_NAMES = {"thumbs.db", "desktop.ini"}
NOT_IMAGE_SUFFIXES = {".txt", ".md", ".csv", ".json", ".xml", ".yaml", ".yml", ".ini", ".log", ".pdf", ".html"}
LIST_SUFFIXES = {".csv", ".json"}
# a list's column (CSV header or JSON key) -> what it holds; VisA's split_csv names the image column "image"
LIST_COLUMNS = {"path": "path", "image": "path", "label": "label", "mask": "mask", "split": "split", "object": "object"}
GOOD_NAMES = ("good", "ok", "normal")  # folder names / list labels of normal images (case-insensitive)
GOOD_LABELS = {*GOOD_NAMES, "0"}
# a list's split values (any case) -> the split: a value not here (val, validation, a typo) is refused, not tested
SPLITS = {"train": "train", "training": "train", "test": "test", "testing": "test"}
# labels that say neither normal nor a defect type (a JSON boolean, a spreadsheet's TRUE): which one is normal?
AMBIGUOUS_LABELS = {"true", "false"}
TEST_FOLDERS = ("test", "test_public")  # MVTec AD 2 names its labelled test split test_public
TRUTH = "ground_truth"
TEST_GOOD_FRACTION = 0.2  # share of good images held out for test when the data has no test split of its own
# A mask stored beside its image as <stem><suffix>.<ext>: KolektorSDD2 (_GT), KolektorSDD (_label), others (_mask)
BESIDE_SUFFIXES = ("_gt", "_label", "_mask")
BESIDE = "images with masks beside them"
# 16-bit images whose largest value fits in this many bits (a 12- or 10-bit camera writing into 16-bit files) read
# as almost black 8-bit images: the top 8 bits, as the worker reads a frame
LOW_BITS = 12
MASK_FOLDERS = ("label", "labels")  # a folder of such masks inside the images' own (DAGM 2007: Train/Label/)


class DatasetError(ValueError):
    """The data is in no known layout, or is missing what a step needs; the message says how to fix it."""


@dataclass(frozen=True)
class Sample:
    path: Path
    defect: str  # "good" or the defect type
    mask: Path | None  # ground-truth mask of a defect; None for good images and image-labelled defects

    @property
    def label(self) -> int:
        return int(self.defect != "good")

    @property
    def has_pixel_truth(self) -> bool:
        """Good images are defect-free everywhere; a defect needs a mask to be scored per pixel."""
        return self.defect == "good" or self.mask is not None


@dataclass(frozen=True)
class Category:
    root: Path  # the category folder, or the list file
    train: list[Path]
    test: list[Sample]
    layout: str = "mvtec"
    split: str = "the data's own test split"  # how the test split was made, for the summary and the manifest
    category: str | None = None  # the object a list's rows were filtered to (VisA's split_csv holds every object)
    empty: tuple[str, ...] = ()  # class folders without images, as "scratch/": nothing of theirs is tested, said
    drawn: bool = False  # the test split is drawn here from the good images (:func:`_held_out`), not the data's own
    # folders with images that the layout does not read, each said with why ("masks/ (3 images): ..."): a note
    left_out: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        if self.category:
            return self.category
        root = self.root.absolute()  # `--data .` or `..` has no name of its own; the folder it is has one
        return root.stem if root.suffix.lower() in LIST_SUFFIXES else Path(os.path.normpath(root)).name

    @property
    def base(self) -> Path:
        """The folder that relative paths in the manifest are relative to."""
        return self.root.parent if self.root.suffix.lower() in LIST_SUFFIXES else self.root

    def split_train(self, val_fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
        """Hold out normal training images to set thresholds without looking at test labels.  Copies of one file
        (:func:`copies`) stay on one side: a held-out copy of a fitted image scores as memorised and set the
        threshold."""
        paths = list(self.train)
        random.Random(seed).shuffle(paths)
        # At least a quarter (up to 10) of a small set, so the threshold rests on more than one or two images.
        n_val = max(round(len(paths) * val_fraction), min(10, len(paths) // 4)) if len(paths) > 1 else 0
        group = {path: found for found in copies(paths) for path in found}
        held: set[Path] = set()
        for path in paths:
            if len(held) >= n_val:
                break
            if len(held | set(together := group.get(path, [path]))) < len(paths):  # the fit keeps an image
                held.update(together)
        return sorted(p for p in paths if p not in held), sorted(held)

    def recorded(self, path: Path) -> str:
        """``path`` as the manifest records it, relative to :attr:`base` (a list's rows may lie above its folder)."""
        return os.path.relpath(path, self.base)

    def as_good_parts(self) -> Category:
        """Data with no test split (good images only) as ``evaluate`` measures it: every image a good test image,
        scored for the false alarms a bundle gives on parts like them: the one figure for a user who has no defect
        images yet."""
        return replace(self, train=[], test=[Sample(p, "good", None) for p in self.train],
                       split="none of its own: every image as a good part, for the false alarms on them")

    def as_test_folder(self) -> Category:
        """A drawn split whose good images the bundle has never seen (a test folder kept apart from the training
        folder) as ``evaluate`` measures it: every good image tested, not a seeded fifth, since the other four fifths
        were drawn to train a bundle that was trained elsewhere."""
        good = [Sample(p, "good", None) for p in self.train] + [s for s in self.test if s.defect == "good"]
        defects = [s for s in self.test if s.defect != "good"]
        return replace(self, train=[], test=sorted(good, key=lambda s: s.path) + defects, drawn=False,
                       split="every image: none of its good images is one this bundle was trained on or held out")

    def without(self, recorded: Iterable[str]) -> Category:
        """The same data without these test images (held out for validation), named as :meth:`recorded` names them:
        relative to :attr:`base`, so that a relative ``--data`` (a sample's path then starts with it) is not joined to
        itself."""
        gone = {os.path.normpath(self.base / p) for p in recorded}
        return replace(self, test=[s for s in self.test if os.path.normpath(s.path) not in gone])


def hidden(name: str) -> bool:
    """Whether a file or folder is one that nobody put there as data: a dot name (``.DS_Store``, macOS's ``._<name>``
    resource forks beside every file copied to a foreign disk, ``.ipynb_checkpoints``) or the ``__MACOSX`` folder of a
    zip made on a Mac.  Read as images they would stop the training as undecodable, or become a defect type."""
    return name.startswith(".") or name == "__MACOSX"


def entries(folder: Path) -> list[Path]:
    """A folder's entries in name order, hidden ones left out (:func:`hidden`); none when it is not a folder."""
    return sorted(p for p in folder.iterdir() if not hidden(p.name)) if folder.is_dir() else []


def files_under(folder: Path) -> Iterator[Path]:
    """Every file below ``folder``, at any depth, none inside a hidden folder or hidden itself; a linked folder is
    followed as the folder it links to (``good/ -> /nas/line1/good``: not followed, its files that are not read went
    unsaid), each real folder once (a link to a folder above would go round for ever)."""
    seen: set[str] = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        if (real := os.path.realpath(top)) in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not hidden(d)]
        yield from (Path(top, f) for f in files if not hidden(f))


def images_under(folder: Path, suffixes: set[str] | tuple[str, ...] = tuple(IMAGE_SUFFIXES)) -> list[Path]:
    """Every image file below ``folder`` (:func:`files_under`), in path order."""
    return sorted(p for p in files_under(folder) if p.suffix.lower() in suffixes)


def _images(folder: Path) -> list[Path]:
    return [p for p in entries(folder) if p.suffix.lower() in IMAGE_SUFFIXES]


def copies(paths: list[Path]) -> list[list[Path]]:
    """The groups of files among ``paths`` with the same bytes (a copy, ``img (1).png``, a link), each in path order;
    only files of one size are read, and one that cannot be read is no copy (the summary names it)."""
    def key(path: Path, read: bool) -> object:
        try:
            return hashlib.sha256(path.read_bytes()).digest() if read else path.stat().st_size
        except OSError:
            return path

    by_size: dict[object, list[Path]] = {}
    for path in paths:
        by_size.setdefault(key(path, False), []).append(path)
    by_digest: dict[object, list[Path]] = {}
    for path in (p for same in by_size.values() if len(same) > 1 for p in same):
        by_digest.setdefault(key(path, True), []).append(path)
    return sorted(sorted(g) for g in by_digest.values() if len(g) > 1)


def short_digest(path: Path) -> str:
    """A file's sha256, its first 16 hex digits: how a bundle records the images it was trained on
    (``training.trained_images``), so that a test image with their bytes is told whatever its name or folder."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def not_read(root: Path) -> list[Path]:
    """The files below ``root`` that are not read because their name is not an image's (``.gif``, ``.pgm``, no
    suffix), in path order; hidden ones and those nobody means as an image (notes, lists) are left out."""
    return sorted(p for p in files_under(root) if p.name.lower() not in NOT_IMAGE_NAMES
                  and p.suffix.lower() not in IMAGE_SUFFIXES | NOT_IMAGE_SUFFIXES)


def by_kind(paths: list[Path], base: Path, shown: int = 3) -> str:
    """``paths`` counted by suffix, a few of each named relative to ``base``: ``2 .gif (a.gif, b.gif), ...``."""
    kinds: dict[str, list[Path]] = {}
    for path in paths:
        kinds.setdefault(path.suffix.lower() or "without a suffix", []).append(path)
    return ", ".join(f"{len(of)} {kind} ({', '.join(os.path.relpath(p, base) for p in of[:shown])}"
                     f"{', ...' if len(of) > shown else ''})" for kind, of in sorted(kinds.items(), key=lambda kv: -len(kv[1])))


def _unread_said(folder: Path) -> str:
    """For a "no images" refusal: the files the folder does hold that are not read, if any."""
    files = not_read(folder)
    return f" (it holds {len(files)} files not read, their names not an image's: {by_kind(files, folder)})" if files else ""


def _is_good(folder: Path) -> bool:
    return folder.name.lower() in GOOD_NAMES


def _folder_images(folder: Path) -> list[Path]:
    """A folder's images, or those of its ``rgb/`` (MVTec 3D-AD keeps ``rgb/``, ``xyz/`` and ``gt/`` per folder)."""
    return _images(folder) or _images(folder / "rgb")


NOT_CLASSES = {*MASK_FOLDERS, TRUTH, "mask", "masks", "rgb", "xyz", "gt"}  # sub-folders of masks or 3D data


def _unread_below(folders: list[Path]) -> None:
    """DatasetError when a class folder keeps images in sub-folders: only a class folder's own images are read, so
    ``test/glue/batch1/*.png`` or ``good/line2/*.png`` were left out of the split without a word."""
    for folder in folders:
        deeper = [d.name for d in entries(folder) if d.is_dir() and d.name.lower() not in NOT_CLASSES and images_under(d)]
        if deeper:
            raise DatasetError(f"{folder} keeps images in its sub-folders {deeper[:10]}, which are not read (only a class "
                               f"folder's own images are): move them into {folder.name}/ itself, or give each defect "
                               "type its own folder beside good/")


def _train_folder(root: Path) -> Path | None:
    """``root/train/good`` (or ``ok``/``normal``; both any case) when ``root`` is laid out like MVTec AD."""
    train = _child(root, "train")
    found = [d for d in entries(train) if d.is_dir() and _is_good(d)] if train else []
    _one_good(found)
    return found[0] if found else None


def _one_good(folders: list[Path]) -> None:
    """DatasetError for two folders of normal images side by side (good/ and ok/): only the first was read."""
    if len([d for d in folders if _folder_images(d)]) > 1:
        raise DatasetError(f"{folders[0].parent} has {len(folders)} folders of normal images "
                           f"({', '.join(d.name + '/' for d in folders)}), and only one is read: put them in one")


def load_category(data: Path, category: str | None = None, seed: int = 0) -> Category:
    """Read ``data/category`` (or ``data`` itself without a category) in whichever layout it is."""
    if Path(data).suffix.lower() in LIST_SUFFIXES and Path(data).is_file():  # a list; --category picks its object
        return _from_list(Path(data), seed, category)
    root = Path(data) / category if category else Path(data)
    if root.suffix.lower() in LIST_SUFFIXES and root.is_file():
        return _from_list(root, seed)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder or list file (give --data DIR [--category NAME] or --data LIST.csv)")
    train = _child(root, "train")
    if train and _train_folder(root) is None and (pairs := _beside(train)):
        test = _child(root, "test")  # without one, the defects among the training images are the test split's
        return _beside_split(root, pairs, test) if test else _held_out(root, BESIDE, *pairs, seed)
    if train:
        return _mvtec(root)
    folders = [d for d in entries(root) if d.is_dir() and _images(d)]
    good = [d for d in folders if _is_good(d)]
    found = [] if good else [_beside(d) for d in [root, *folders]]
    if any(found):  # KolektorSDD: one folder per part, or all in one folder
        if unpaired := [d.name for d, pair in zip(folders, found[1:], strict=True) if not pair and d.name.lower()
                        not in MASK_FOLDERS]:
            raise DatasetError(f"{root}: folders {unpaired} hold images without masks beside them, while others have "
                               "masks (<stem>_GT, <stem>_label or <stem>_mask): give every folder its masks or move them")
        paired = [pair for pair in found if pair]
        goods = sorted(p for g, _ in paired for p in g)
        return _held_out(root, BESIDE, goods, [d for _, defects in paired for d in defects], seed)
    if good:
        _one_good(good)
        _unread_below(folders)
        if deeper := [d.name for d in entries(root) if d.is_dir() and d not in folders
                      and d.name.lower() not in NOT_CLASSES and images_under(d)]:
            raise DatasetError(f"{root}: the folders {deeper[:10]} keep their images in sub-folders, which are not read "
                               "(bad/broken/*.png): give each defect type its own folder beside good/")
        empty = tuple(f"{d.name}/" for d in entries(root) if d.is_dir() and d not in folders
                      and d.name.lower() not in NOT_CLASSES)  # a folder with images below them was refused above
        types = [d for d in folders if d not in good and d.name.lower() not in NOT_CLASSES]
        loose = _images(root)  # beside the class folders, none labels them (they were left out without a word)
        said = (f"the data folder holds {len(loose)} images directly (e.g. {loose[0].name}), not read: labelled "
                "folders read good/ and one folder per defect type; move each into its class's folder",) if loose else ()
        return replace(_held_out(root, "labelled folders", *_labelled(good[0], types), seed), empty=empty,
                       left_out=_mask_folders_left_out(root) + said)
    nested = next((d for d in entries(root) if d.is_dir() and _is_good(d) and not _images(d) and images_under(d)), None)
    if nested is not None:
        raise DatasetError(f"{nested} holds its images in sub-folders, which are not read (they could be defect types "
                           f"or masks): move the normal images into {nested.name}/ itself")
    if folders:
        raise DatasetError(f"{root} has image folders {[d.name for d in folders]} but none named good/, ok/ or normal/: "
                           "put the normal images in good/ (or ok/) and each defect type in its own folder")
    if _images(root):
        return Category(root, _images(root), [], "good only", "none: good images only, nothing to evaluate")
    if categories := find_categories(root):
        raise DatasetError(f"{root} holds the categories {categories[:20]}: pick one with --category NAME")
    if cameras := [d.name for d in entries(root) if d.is_dir() and (g := _child(d, "good")) is not None and _images(g)]:
        raise DatasetError(f"{root} holds one folder of good images per camera or part, {cameras[:20]} (a worker's "
                           "capture export): pick one with --category NAME (a bundle learns only the frames of the "
                           "folder it is trained on)")
    if (visa := _child(root, "data")) and (images := _child(visa, "images")) and images_under(images):
        lists = sorted(root.parent.glob("split_csv/*.csv"))  # VisA keeps split_csv/ beside its object folders
        listed = f"--data {lists[0]} --category {root.name} (its own train/test split and masks), or " if lists else ""
        raise DatasetError(f"{root} keeps its images in {os.path.relpath(images, root)}/ (VisA as downloaded): give "
                           f"{listed}--data {images} (its folders alone, Normal/ and Anomaly/ read as labelled "
                           "folders, image labels only)")
    raise DatasetError(f"{root} has no images{_unread_said(root)}; expected MVTec AD layout (train/good, test/<type>), a folder of good "
                       "images, good/ plus one folder per defect type, or a CSV/JSON list (README: Training data)")


def _mask_folders_left_out(root: Path) -> tuple[str, ...]:
    """Labelled folders' folders of masks (``masks/``, ``ground_truth/``), which are no defect type (a ``masks/``
    folder was one: its masks scored as defect images) and are not read: said, with where a defect's mask is read."""
    return tuple(f"{d.name}/ ({len(images_under(d))} images) is not read: labelled folders take a defect's mask from "
                 "beside its image (scratch/a.png, scratch/a_mask.png); a defect without one is labelled per image only"
                 for d in entries(root) if d.is_dir() and d.name.lower() in NOT_CLASSES and images_under(d))


def _mask_of(path: Path) -> str | None:
    """The stem of the image a file is named the mask of (``<stem>_GT``, ``_label`` or ``_mask``, any case), or None."""
    low = path.stem.lower()
    return next((path.stem[: -len(end)] for end in BESIDE_SUFFIXES if low.endswith(end)), None)


def _masks_beside(folder: Path) -> tuple[list[Path], dict[str, Path], list[Path]]:
    """A folder's images, by image stem the masks that lie beside them (``<stem>_GT.png`` beside ``<stem>.png``)
    or in its ``Label/`` folder (DAGM), and the files named as masks whose image is not there (deleted, renamed):
    read as images they became training or test images; found by name, nothing decoded.  Only a folder that pairs
    masks with images has such orphans: elsewhere a name like ``000_label.png`` (a view of part 000, a photo of a
    label) is an image's."""
    images = _images(folder)
    by_stem = {p.stem: p for p in images}
    labels = [p for sub in entries(folder) if sub.is_dir() and sub.name.lower() in MASK_FOLDERS for p in _images(sub)]
    masks: dict[str, Path] = {}
    for path in images + labels:
        if (stem := _mask_of(path)) in by_stem:
            if stem in masks:  # the other would be read as an image
                raise DatasetError(f"{by_stem[stem]} has two masks, {masks[stem].name} and {path.name}: keep one")
            masks[stem] = path
    orphans = [p for p in (images + labels if masks else []) if (stem := _mask_of(p)) is not None
               and stem not in by_stem and p.stem not in masks]
    return images, masks, orphans


def _pairs_masks(folder: Path) -> bool:
    """Whether masks lie beside a folder's images; one whose masks are in error counts too: that is its category's
    error when it is read, not every category's."""
    try:
        return bool(_masks_beside(folder)[1])
    except DatasetError:
        return True


def _no_orphans(orphans: list[Path]) -> None:
    """DatasetError naming the mask files whose image is not beside them."""
    if orphans:
        more = f" ({len(orphans) - 1} more like it)" if len(orphans) > 1 else ""
        raise DatasetError(f"mask {orphans[0]} has no image (no {_mask_of(orphans[0])}.* beside it){more}: restore the "
                           "image or delete the mask (a file named <stem>_GT, <stem>_label or <stem>_mask is the mask "
                           "of <stem>, never read as an image)")


def _beside(folder: Path) -> tuple[list[Path], list[Sample]] | None:
    """The good images and the defects of a folder whose masks lie beside their images, or None when it holds no
    such mask.  An image is a defect when its mask has a non-zero pixel, good when the mask is blank or it has none.
    A mask whose image is missing is refused (:func:`_masks_beside`)."""
    images, masks, orphans = _masks_beside(folder)
    _no_orphans(orphans)
    if not masks:
        return None
    good, defects = [], []
    mask_paths = set(masks.values())
    for path in images:
        if path in mask_paths:
            continue
        mask = masks.get(path.stem)
        pixels = mask_pixels(mask) if mask else None
        if mask and pixels is None:
            raise DatasetError(f"{mask}: the mask of {path.name} cannot be decoded; save it again as PNG")
        if pixels is not None and pixels.any():
            defects.append(Sample(path, "defect", mask))
        else:
            good.append(path)
    return good, defects


def _labelled(good: Path, types: list[Path]) -> tuple[list[Path], list[Sample]]:
    """Labelled folders: the good images and each type's, a defect's mask taken where one lies beside it (a mask
    file is never read as an image)."""
    unmarked, marked = _beside(good) or (_images(good), [])
    normals = sorted(unmarked + [s.path for s in marked])  # the folder says good, whatever a mask in it shows
    defects = []
    for folder in types:
        unmarked, marked = _beside(folder) or (_images(folder), [])
        defects += [Sample(p, folder.name, None) for p in unmarked] + [replace(s, defect=folder.name) for s in marked]
    return normals, defects


def _child(root: Path, name: str) -> Path | None:
    """``root``'s sub-folder called ``name`` in any case (DAGM names them ``Train`` and ``Test``; a set copied
    through Windows may have ``Test/``, ``Ground_Truth/``: read only in lower case, they were left out without a
    word); two such (``test/``, ``Test/``) are refused, as only one would be read."""
    found = [d for d in entries(root) if d.is_dir() and d.name.lower() == name.lower()]
    if len(found) > 1:
        raise DatasetError(f"{root} has {len(found)} folders named {name} ({', '.join(d.name + '/' for d in found)}), "
                           "and only one is read: put them in one")
    return found[0] if found else None


def _truth(root: Path, defect: str) -> Path | None:
    """``root/ground_truth/<defect>`` in any case, where there is one."""
    truth = _child(root, TRUTH)
    return _child(truth, defect) if truth else None


def _beside_split(root: Path, train: tuple[list[Path], list[Sample]], test_folder: Path) -> Category:
    """KolektorSDD2, DAGM: a training and a test folder of images with masks beside them; the defects among the
    training images are left out (the fit learns from good images only)."""
    good, defects = _beside(test_folder) or (_images(test_folder), [])
    test = [Sample(p, "good", None) for p in good] + defects
    left = f"; {len(train[1])} defect images of the training folder left out (the fit takes good images only)" \
        if train[1] else ""
    return Category(root, train[0], sorted(test, key=lambda s: (s.defect, s.path)), BESIDE,
                    "the data's own test split" + left)


def _masks_by_stem(folder: Path) -> dict[str, Path]:
    """The masks in one type's truth folder, keyed by the stem of the image each belongs to."""
    masks: dict[str, Path] = {}
    for entry in entries(folder):
        if entry.is_dir() and _images(entry):  # one image, several masks (MVTec LOCO, AutoVI)
            masks[entry.name] = entry
        elif entry.suffix.lower() in IMAGE_SUFFIXES:  # <stem>_mask (MVTec AD), _gt or _label, as beside images
            stem = next((entry.stem[: -len(end)] for end in BESIDE_SUFFIXES if entry.stem.lower().endswith(end)),
                        entry.stem)
            masks.setdefault(stem, entry)  # "<stem>_mask" sorts after "<stem>", so a set holding both keeps "<stem>"
    return masks


def _no_masks_beside(folder: Path) -> None:
    """DatasetError for mask files among an MVTec AD folder's images (its masks are read from ``ground_truth/``
    only): each would be read as a training or test image."""
    _, masks, orphans = _masks_beside(folder)
    _no_orphans(orphans)
    if masks:
        stem, mask = next(iter(masks.items()))
        raise DatasetError(f"{len(masks)} masks lie beside their images in {folder}, e.g. {mask} (of {stem}), where "
                           "they would be read as images: the MVTec AD layout reads masks from ground_truth/<type>/ "
                           "only; move a defect's mask there and delete a good image's")


def _mvtec(root: Path) -> Category:
    train_folder = _train_folder(root)
    train = _folder_images(train_folder) if train_folder else []
    if not train:
        said = _unread_said(train_folder) if train_folder else ""
        raise DatasetError(f"{root}/train/good has no images{said}: put the normal training images there as PNG, "
                           "JPEG, BMP, TIFF or WebP (MVTec AD layout)")
    test: list[Sample] = []
    test_root = next((named for name in TEST_FOLDERS if (named := _child(root, name))), root / TEST_FOLDERS[0])
    if loose := _images(test_root):
        raise DatasetError(f"{test_root} holds {len(loose)} images directly (e.g. {loose[0].name}), outside a folder "
                           f"that labels them, and they are not read: move the normal ones into {test_root.name}/good/ "
                           f"and each defect type's into {test_root.name}/<type>/")
    missing: list[Path] = []
    unmatched: list[Path] = []  # masks in a truth folder that name no image of their type
    types = [p for p in entries(test_root) if p.is_dir() and p.name.lower() != TRUTH]
    _unread_below([train_folder, *types] if train_folder else types)
    for folder in [train_folder, *types] if train_folder else types:
        _no_masks_beside(folder if _images(folder) else folder / "rgb")
    empty: list[str] = []
    for type_dir in types:
        images = _folder_images(type_dir)
        if not images:
            empty.append(f"{os.path.relpath(type_dir, root)}/")
        if _is_good(type_dir):
            test += [Sample(image, "good", None) for image in images]
            continue
        # The first truth folder that holds masks; none: this type is labelled per image only.
        folders = (_child(type_dir, "gt"), _truth(root, type_dir.name), _truth(test_root, type_dir.name))
        masks = next((found for found in (_masks_by_stem(f) for f in folders if f) if found), {})
        for image in images:
            mask = masks.get(image.stem) if masks else None
            if masks and mask is None:
                missing.append(image)
            test.append(Sample(image, type_dir.name, mask))
        unmatched += [mask for stem, mask in masks.items() if stem not in {image.stem for image in images}]
    if missing:
        found = f"; its folders hold masks named for no image, e.g. {', '.join(map(str, unmatched[:3]))}" if unmatched else ""
        raise DatasetError(f"{len(missing)} defect images have no ground-truth mask, e.g. {missing[0]} (looked for "
                           "<stem>_mask.png, <stem>_gt.png, <stem>_label.png, <stem>.png or a folder <stem>/ in its "
                           f"type's ground_truth folder{found}): give every image of a type a mask, or remove that "
                           "type's ground_truth folder to use image labels only")
    split = "the data's own test split" + ("" if test_root.name.lower() == TEST_FOLDERS[0] else f" ({test_root.name}/)")
    if not test:  # train/good alone: said as the data's own test split, in the summary and the bundle's record
        split = f"none: {test_root.name}/ {'holds no images' if test_root.is_dir() else 'is absent'}, nothing to evaluate"
    return Category(root, train, test, split=split, empty=tuple(empty),
                    left_out=_mvtec_left_out(root, train_folder, test_root) if train_folder else ())


def _mvtec_left_out(root: Path, good: Path, test_root: Path) -> tuple[str, ...]:
    """The MVTec AD layout's images that are not read, each said (they were left out without a word): beside the
    good training folder (``train/scratch/``), and in folders beside ``train/`` and ``test/`` (MVTec LOCO's and
    MVTec 3D-AD's ``validation/``, MVTec AD 2's ``test_private/``)."""
    train = good.parent
    read = {train, test_root, _child(root, TRUTH)}
    out = [f"{os.path.relpath(d, root)}/ ({n} images) is not read: training takes {train.name}/{good.name}/ only "
           f"(defect images belong in {test_root.name}/<type>/)"
           for d in entries(train) if d.is_dir() and d != good and (n := len(images_under(d)))]
    out += [f"{d.name}/ ({n} images) is not read: the MVTec AD layout reads {train.name}/{good.name}/ and "
            f"{test_root.name}/" for d in entries(root) if d.is_dir() and d not in read and (n := len(images_under(d)))]
    out += [f"{folder.name}/ holds {len(loose)} images directly (e.g. {loose[0].name}), not read: "
            f"training takes {train.name}/{good.name}/ only" for folder in (root, train) if (loose := _images(folder))]
    return tuple(out)


def _held_out(root: Path, layout: str, good: list[Path], defects: list[Sample], seed: int) -> Category:
    """Every defect goes to test, with a seeded share of the good images; the rest of the good ones train.  Copies
    of one file (:func:`copies`) go to one side together: a tested copy of a fitted image scores as memorised, and
    the split would not be "never trained on".  Without copies the draw is the one bundles were measured on."""
    if not defects:
        return Category(root, sorted(good), [], layout, "none: good images only, nothing to evaluate")
    shuffled = sorted(good)
    random.Random(seed).shuffle(shuffled)
    n_test = max(1, round(len(shuffled) * TEST_GOOD_FRACTION)) if len(shuffled) > 1 else 0
    group = {path: found for found in copies(shuffled) for path in found}
    tested: set[Path] = set()
    for path in shuffled:
        if len(tested) >= n_test:
            break
        if len(tested | set(together := group.get(path, [path]))) < len(shuffled):  # training keeps an image
            tested.update(together)
    test = [Sample(p, "good", None) for p in sorted(tested)] + sorted(defects, key=lambda s: (s.defect, s.path))
    split = f"all defect images and {len(tested)} of {len(shuffled)} good images (seed {seed}), never trained on"
    return Category(root, sorted(p for p in shuffled if p not in tested), test, layout, split, drawn=True)


def _delimiter(text: str) -> str:
    """The CSV's delimiter: a comma, or the semicolon or tab that Excel writes where the comma is a decimal mark,
    told by its first line."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    return max(",;\t", key=first.count) if first else ","


def _list_rows(path: Path) -> list[dict[str, str]]:
    """The list's rows as ``{path, label, mask?, split?, object?}``: JSON objects, CSV rows named by a header (any
    column order; ``image`` for ``path``, as VisA's ``split_csv`` has it), or a CSV without one by position."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # Excel's "CSV UTF-8" starts with a byte-order mark
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8 "
                           "(Excel: \"CSV UTF-8\")") from None
    if path.suffix.lower() == ".json":
        try:
            rows = [{LIST_COLUMNS[k]: str(v) for k, v in r.items() if k in LIST_COLUMNS and v not in (None, "")}
                    for r in json.loads(text)]
        except (ValueError, TypeError, AttributeError) as exc:
            raise DatasetError(f"{path}: expected a JSON list of {{\"path\", \"label\", \"mask\"?}} objects ({exc})") from exc
    else:
        lines = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text))
                 if r and any(c.strip() for c in r)]
        header = [c.strip().lower() for c in lines[0]] if lines else []
        if "label" in header and {"path", "image"} & set(header):
            names, lines = [LIST_COLUMNS.get(c) for c in header], lines[1:]  # trailing empty columns may be left out
        else:
            names = ["path", "label", "mask"]
        bad = [i for i, r in enumerate(lines, 1) if not 2 <= len(r) <= len(names)]
        if bad:
            raise DatasetError(f"{path}: rows {bad[:5]} do not have 2 to {len(names)} columns "
                               "(path,label[,mask], or the columns its header names)")
        rows = [{n: c.strip() for n, c in zip(names, r, strict=False) if n and c.strip()} for r in lines]
    incomplete = [i for i, r in enumerate(rows, 1) if not {"path", "label"} <= set(r)]
    if incomplete:
        raise DatasetError(f"{path}: rows {incomplete[:5]} lack a path or a label")
    return rows


def _listed(base: Path, name: str) -> Path:
    """A listed file: ``name`` under ``base``, its backslashes read as folder separators where the name as written
    is no file (a list made on Windows)."""
    path = base / name
    return path if "\\" not in name or path.exists() else base / PureWindowsPath(name).as_posix()


def _from_list(path: Path, seed: int, category: str | None = None) -> Category:
    rows = _list_rows(path)
    objects = sorted({r.get("object", "") for r in rows})
    if category is None and len(objects) > 1:
        raise DatasetError(f"{path} lists {len(objects)} objects ({', '.join(objects[:20])}): one model is trained "
                           "per object, pick one with --category")
    if category is not None:
        rows = [r for r in rows if r.get("object") == category]
        if not rows:
            raise DatasetError(f"{path}: no rows whose object is {category!r} (objects: {objects[:20]})")
    # Paths are relative to the list's folder, or to the folder above it, where VisA keeps its split_csv/.
    base = next((b for b in (path.parent, path.parent.parent) if rows and _listed(b, rows[0]["path"]).is_file()),
                path.parent)
    _known_values(path, rows)
    _listed_once(path, base, rows)
    train: list[Path] = []
    good: list[Path] = []
    defects: list[Sample] = []
    missing: list[str] = []
    for row in rows:
        image = _listed(base, row["path"])
        mask_path = _listed(base, row["mask"]) if "mask" in row else None
        missing += [str(p) for p in (image, mask_path) if p is not None and not p.is_file()]
        label = row["label"].lower()
        if SPLITS.get(row.get("split", "").lower()) == "train":
            if label not in GOOD_LABELS:
                raise DatasetError(f"{path}: {row['path']} is labelled {row['label']!r} in the train split; "
                                   "training takes normal images only")
            train.append(image)
        elif label in GOOD_LABELS:
            good.append(image)
        else:
            defects.append(Sample(image, "defect" if label == "1" else row["label"], mask_path))
    if missing:
        raise DatasetError(f"{path}: {len(missing)} listed files do not exist, e.g. {missing[:3]} "
                           f"(paths are relative to {base})")
    if any("split" in r for r in rows):
        test = [Sample(p, "good", None) for p in good] + sorted(defects, key=lambda s: (s.defect, s.path))
        return Category(path, sorted(train), test, "list", "the list's own split column", category)
    return replace(_held_out(path, "list", good, defects, seed), category=category)


def _listed_once(path: Path, base: Path, rows: list[dict[str, str]]) -> None:
    """DatasetError for an image listed more than once (a row added to relabel it, the old one left): under two labels
    it was tested as good and as a defect at once, or trained on as normal and tested as a defect; twice alike, it
    counted twice in the figures."""
    labels: dict[str, list[str]] = {}
    for row in rows:
        labels.setdefault(os.path.normpath(_listed(base, row["path"])), []).append(row["label"])
    if again := [(image, said) for image, said in labels.items() if len(said) > 1]:
        image, said = again[0]
        more = f" ({len(again) - 1} more listed twice or more)" if len(again) > 1 else ""
        raise DatasetError(f"{path}: {os.path.relpath(image, base)} is listed {len(said)} times, labelled "
                           f"{', '.join(repr(label) for label in said)}{more}: list each image once, with its one label")


def _known_values(path: Path, rows: list[dict[str, str]]) -> None:
    """DatasetError for a split value that is neither train nor test (``val`` rows were tested, ``training`` ones
    too, and then "0 good training images"), and for a label ``true``/``false`` (a JSON boolean became the defect
    type "False", so normal images were tested as defects)."""
    if any("split" in r for r in rows) and (
            bad := sorted({r.get("split", "") for r in rows if r.get("split", "").lower() not in SPLITS})):
        raise DatasetError(f"{path}: split values {bad} are neither train nor test ('' is a row without one); "
                           f"accepted, any case: {', '.join(SPLITS)}: give each such row train or test, or leave "
                           "it out of the list (a validation split is not read)")
    if bad := sorted({r["label"] for r in rows if r["label"].lower() in AMBIGUOUS_LABELS}):
        raise DatasetError(f"{path}: labels {bad} do not say which images are normal: label normal images "
                           f"{', '.join(sorted(GOOD_LABELS))} and defects 1 or their defect type's name")


def find_categories(data: Path) -> list[str]:
    """Every sub-folder of ``data`` that looks like an MVTec AD category, or holds a training folder of images with
    masks beside them (DAGM's ``Class1`` ... ``Class10``).  Nothing is decoded: a category's damaged mask is that
    category's error when it is read, not every category's."""
    return sorted(p.name for p in entries(Path(data)) if p.is_dir() and (
        _train_folder(p) is not None or ((train := _child(p, "train")) is not None and _pairs_masks(train))))


def hold_out_defects(category: Category, fraction: float, seed: int) -> tuple[Category, list[Sample]]:
    """A seeded share of each defect type for choosing a threshold; the rest stays in test, so they never overlap.
    Copies of one file (:func:`copies`) are held out together, as long as every type keeps an image in test: a
    tested copy of a defect the threshold was chosen on would flatter the test recall.  Without copies the draw is
    the one bundles were measured on."""
    rng = random.Random(seed)
    defects = [s for s in category.test if s.defect != "good"]
    group = {path: found for found in copies([s.path for s in defects]) for path in found}
    types = {defect: {s.path for s in defects if s.defect == defect} for defect in sorted({s.defect for s in defects})}
    held: set[Path] = set()
    for paths in types.values():
        of_type = sorted(paths)
        rng.shuffle(of_type)
        wanted = int(len(of_type) * fraction)
        for path in of_type:
            if len(held & paths) >= wanted:
                break
            together = held | set(group.get(path, [path]))
            if all(of - together for of in types.values()):  # every type keeps a tested image
                held = together
    kept = [s for s in defects if s.path in held]
    return category.without({category.recorded(s.path) for s in kept}), sorted(kept, key=lambda s: (s.defect, s.path))


def _why_unreadable(path: Path) -> str:
    """What is wrong with a file :func:`decoded` cannot read, for the user to delete it or copy it again."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    if not data:
        return "empty"
    if jpeg_cut_short(data):
        return "a JPEG cut short"
    if data.startswith(b"\xff\xd8"):
        try:
            decode_jpeg(data)
        except JpegCutShort:
            return "a JPEG cut short"
    if png_cut_short(data):
        return "a PNG cut short"
    if (chunk := png_damaged(data)) is not None:
        return f"a PNG damaged: its {chunk} chunk does not match its CRC"
    if _over_opencv_limit(data):
        return "more pixels than OpenCV decodes, 2^30: save it smaller, or cut it in pieces"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(data)).verify()
    except Exception:  # Pillow raises many types; a known format cut short says so in its message
        return "not an image, or cut short"
    return "cut short or damaged"


def decoded(path: Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray | None:
    """An image file decoded with OpenCV's ``flags``, or None where it cannot be decoded or is a JPEG or PNG cut short
    (:func:`bundle.jpeg_cut_short`, :func:`bundle.decode_jpeg`: OpenCV would fill its missing part with grey;
    :func:`bundle.png_cut_short`: libpng would say so on stderr, naming no file; the worker refuses both as frames).
    A JPEG is decoded as the worker decodes a frame (:func:`bundle.decode_jpeg`, the pixels OpenCV's ``flags`` give)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return _decode(data, flags)


def _decode(data: bytes, flags: int) -> np.ndarray | None:
    if not data or jpeg_cut_short(data) or png_cut_short(data) or png_damaged(data):  # OpenCV asserts on no bytes
        return None
    if data.startswith(b"\xff\xd8"):
        try:
            image = decode_jpeg(data)
        except JpegCutShort:
            return None
        if image is not None and flags == cv2.IMREAD_COLOR:
            return image
    try:  # as the worker decodes a frame (bundle.quiet_png): libpng's warnings name no file
        return cv2.imdecode(np.frombuffer(quiet_png(data), np.uint8), flags)
    except cv2.error:  # over OpenCV's pixel limit it raises where a damaged file is None: the summary names it
        return None


def _over_opencv_limit(data: bytes) -> bool:
    """Whether OpenCV refuses to decode ``data`` for its size alone (more pixels than its ``CV_IO_MAX_IMAGE_PIXELS``,
    2^30 unless ``OPENCV_IO_MAX_IMAGE_PIXELS`` says otherwise), which it checks from the header before reading any
    pixel."""
    try:
        cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        return "CV_IO_MAX_IMAGE_PIXELS" in str(exc)
    return False


def mask_pixels(path: Path) -> np.ndarray | None:
    """A mask file as 0/1 uint8 at its own size: 1 wherever a colour channel is non-zero, at the file's own bit
    depth (None: it cannot be decoded).  Read as grey, a 16-bit label image with defect value 1 became 0, and so
    did a colour mark of value 1 in one channel; an alpha channel is not read, as grey reading ignored it.  Turned by
    its EXIF orientation, as its image is (``IMREAD_UNCHANGED`` is the one flag that does not turn it: a mask saved
    with its photo's orientation was refused as another shape, or, square, marked other pixels)."""
    pixels = decoded(path, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if pixels is None:
        return None
    if pixels.ndim == 3:
        pixels = pixels[:, :, :3].max(axis=2) if pixels.shape[2] >= 3 else pixels[:, :, 0]
    return (pixels > 0).astype(np.uint8)


GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}  # Pillow's modes of one-channel files (LA: + alpha)


def image_chroma(path: Path) -> float | None:
    """:func:`bundle.chroma` of an image file as training reads it (0 for a one-channel file, which is not decoded;
    a colour one is decoded at a quarter of its size); None where it cannot be decoded (the data's summary refuses
    such a file before any fit)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                if image.mode in GREY_MODES:
                    return 0.0
    except Exception:  # a format Pillow does not read: OpenCV says below
        pass
    pixels = decoded(path, cv2.IMREAD_REDUCED_COLOR_4)
    return None if pixels is None else chroma(pixels)


def chroma_range(paths: Sequence[Path]) -> tuple[float, float] | None:
    """The least and the most :func:`image_chroma` of these images (None: none could be read).  All below
    :data:`bundle.GREY_CHROMA`: a model of grey images, whose graph turns every frame grey
    (:data:`exporter.train.grey.GREY_STEP`)."""
    values = [c for c in map(image_chroma, paths) if c is not None]
    return (min(values), max(values)) if values else None


def read_decoded(path: Path) -> np.ndarray:
    """An image file as 8-bit BGR at its own size (``IMREAD_COLOR``, as the worker decodes a frame)."""
    image = decoded(path)
    if image is None:
        raise DatasetError(f"{path}: cannot be decoded as an image, or is cut short")
    return image


def read_image(path: Path, spec: InputSpec) -> np.ndarray:
    """Read an image file as the worker would see it: 8-bit BGR, resized for the graph."""
    return prepare_image(read_decoded(path), spec)


class Tiled(Protocol):
    """Settings that say whether the model is trained on tiles (``train --tiling``; both families have them)."""

    tiling: tuple[int, int] | None
    tile_overlap: float | None


def tiling_of(settings: Tiled) -> TilingSpec | None:
    """The tiling ``settings`` ask for, checked (None: whole frames)."""
    if settings.tiling is None:
        if settings.tile_overlap is not None:
            raise ValueError("--tile-overlap is for --tiling (the tiles' grid)")
        return None
    overlap = {} if settings.tile_overlap is None else {"overlap": settings.tile_overlap}
    try:
        return TilingSpec(grid=settings.tiling, **overlap)
    except ValidationError as exc:
        given = f"--tiling {settings.tiling[0]}x{settings.tiling[1]}" + (
            f" --tile-overlap {settings.tile_overlap:g}" if settings.tile_overlap is not None else "")
        raise ValueError(f"{given}: {'; '.join(e['msg'] for e in exc.errors())}") from None


def read_frame(path: Path, spec: InputSpec, tiling: TilingSpec | None) -> np.ndarray:
    """An image as the worker scores a frame with this tiling: prepared for the graph (untiled), or resized once to
    the canvas its tiles are cut from (:mod:`bundle.tiling`), which is all of the frame a tiled model sees."""
    if tiling is None:
        return read_image(path, spec)
    size = canvas_size(tiling, spec.width, spec.height)
    return np.ascontiguousarray(cv2.resize(read_decoded(path), size, interpolation=cv2.INTER_AREA))


def read_tiles(path: Path, spec: InputSpec, tiling: TilingSpec | None) -> list[np.ndarray]:
    """What a model is trained on from one image: its tiles, or the image itself untiled, each prepared."""
    return tiles(read_decoded(path), spec, tiling)


def mask_files(path: Path) -> list[Path]:
    """The files of one image's truth: a mask, or a folder of masks (one per defect region or type)."""
    return _images(path) if path.is_dir() else [path]


def read_mask(path: Path | None, spec: InputSpec, tiling: TilingSpec | None = None) -> np.ndarray:
    """Ground-truth mask at the resolution of the map scored (nearest neighbour): the graph's, or the tiles' canvas
    (``tiling``); as 0/1 uint8: any non-zero pixel is defect (:func:`mask_pixels`).

    Non-zero rather than bright, as anomalib reads masks: some public sets store a defect as 1 (VisA as downloaded)
    or as a per-defect value. A folder of masks is their union.
    """
    width, height = canvas_size(tiling, spec.width, spec.height) if tiling else (spec.width, spec.height)
    out = np.zeros((height, width), np.uint8)
    for file in mask_files(path) if path is not None else []:
        mask = mask_pixels(file)
        if mask is None:
            raise DatasetError(f"{file}: cannot be decoded as a mask")
        out |= prepare_mask(mask, (width, height))
    return out


def prepare_mask(mask: np.ndarray, size: InputSpec | tuple[int, int]) -> np.ndarray:
    """A mask at the graph's resolution, or ``size`` (width, height), (nearest neighbour) as 0/1 uint8, as
    :func:`read_mask` reads a file."""
    width, height = (size.width, size.height) if isinstance(size, InputSpec) else size
    return (cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST) > 0).astype(np.uint8)


@dataclass(frozen=True)
class Summary:
    """What ``exporter train`` found, read from every file once (so an undecodable one is named before training)."""

    category: Category
    sizes: Counter
    channels: Counter
    depths: Counter
    unreadable: list[Path]
    in_both: list[tuple[Path, Path]] = field(default_factory=list)  # (test image, the training image it copies)
    wide_samples: list[Path] = field(default_factory=list)  # 32-bit or floating-point samples: not read as 8-bit BGR
    # (image, width, height, bytes) of images larger than a worker takes as a frame by default
    beyond_frames: list[tuple[Path, int, int, int]] = field(default_factory=list)
    # (mask, its size, its image's size as decoded for training) where the two differ: rescaled, or another shape
    misfit_masks: list[tuple[Path, tuple[int, int], tuple[int, int]]] = field(default_factory=list)
    not_read: list[Path] = field(default_factory=list)  # files in the data's folders not read: not an image's name
    # (image, the format its content is in) where a worker refuses that format as a frame (unsupported_format)
    refused_formats: list[tuple[Path, str]] = field(default_factory=list)
    low_bits: list[tuple[Path, int]] = field(default_factory=list)  # (16-bit image, its largest value) below LOW_BITS
    train_copies: list[tuple[Path, Path]] = field(default_factory=list)  # (training image, the earlier one it copies)
    trained: bool = True  # the training images were decoded and checked too: False for ``evaluate``, which fits none
    lossy_masks: list[Path] = field(default_factory=list)  # masks stored as JPEG: its noise marks pixels as defect
    blank_masks: list[Path] = field(default_factory=list)  # defect images whose masks mark no pixel
    chroma: list[tuple[Path, float]] = field(default_factory=list)  # (training image, :func:`image_chroma`)
    # (TIFF, what its samples are) where neither training nor the worker reads them (bundle.tiff_samples: 12-bit)
    tiff_depths: list[tuple[Path, str]] = field(default_factory=list)
    # (TIFF, its layout) where the worker refuses it as a frame, reading no header of it (bundle.tiff_layout)
    tiff_layouts: list[tuple[Path, str]] = field(default_factory=list)
    several_pictures: list[tuple[Path, int]] = field(default_factory=list)  # (image, pictures in it) where more than one

    @property
    def misshapen_masks(self) -> list[tuple[Path, tuple[int, int], tuple[int, int]]]:
        """Masks whose proportions are not their image's: stretched onto it, they mark other pixels."""
        return [m for m in self.misfit_masks if abs(m[1][0] * m[2][1] - m[1][1] * m[2][0]) > 0.02 * m[1][0] * m[2][1]]

    def problems(self) -> list[str]:
        """Why the data cannot be trained on (or, not :attr:`trained`, evaluated), each with how to fix it; empty
        when it can."""
        cat, out = self.category, []
        if self.trained and (distinct := len(cat.train) - len(self.train_copies)) < MIN_TRAIN_IMAGES:
            copied = f" ({len(self.train_copies)} more are copies of these)" if self.train_copies else ""
            out.append(f"only {distinct} good training images{copied}; at least {MIN_TRAIN_IMAGES} are needed (a few "
                       "dozen or more is better): add photos of normal parts")
        if self.unreadable:
            shown = ", ".join(f"{p} ({_why_unreadable(p)})" for p in self.unreadable[:10])
            more = f" and {len(self.unreadable) - 10} more" if len(self.unreadable) > 10 else ""
            files = "file cannot" if len(self.unreadable) == 1 else "files cannot"
            out.append(f"{len(self.unreadable)} {files} be decoded: {shown}{more}; remove them (not images), or copy "
                       "or save them again (empty, cut short)")
        if self.wide_samples:
            shown = ", ".join(str(p) for p in self.wide_samples[:10])
            more = f" and {len(self.wide_samples) - 10} more" if len(self.wide_samples) > 10 else ""
            out.append(f"{len(self.wide_samples)} images have 32-bit or floating-point samples, which neither training "
                       f"nor the worker reads (it refuses them: unsupported_format): {shown}{more}; save them with 8- or "
                       "16-bit samples")
        if self.tiff_depths:
            shown = ", ".join(f"{p} ({said} samples)" for p, said in self.tiff_depths[:10])
            more = f" and {len(self.tiff_depths) - 10} more" if len(self.tiff_depths) > 10 else ""
            out.append(f"{len(self.tiff_depths)} TIFFs have samples that neither training nor the worker reads as "
                       f"8-bit colour (it refuses them: unsupported_format): {shown}{more}; save them with 8- or 16-bit "
                       "unsigned samples (a 10- or 12-bit camera's scaled to the full 16-bit range)")
        if self.tiff_layouts:
            shown = ", ".join(f"{p} ({layout})" for p, layout in self.tiff_layouts[:10])
            more = f" and {len(self.tiff_layouts) - 10} more" if len(self.tiff_layouts) > 10 else ""
            out.append(f"{len(self.tiff_layouts)} TIFFs are of a layout whose header the worker does not read, so it "
                       f"refuses them as frames (unsupported_format): {shown}{more}; {TIFF_LAYOUT_FIX}")
        if self.refused_formats:
            shown = ", ".join(f"{p} ({fmt})" for p, fmt in self.refused_formats[:10])
            more = f" and {len(self.refused_formats) - 10} more" if len(self.refused_formats) > 10 else ""
            out.append(f"{len(self.refused_formats)} images are in a format the worker refuses as a frame "
                       f"(unsupported_format; it takes JPEG, PNG, BMP, TIFF and WebP, told by content, not name): "
                       f"{shown}{more}; save them as PNG, or leave them out")
        if bad := self.misshapen_masks:
            mask, (mw, mh), (w, h) = bad[0]
            out.append(f"{len(bad)} masks are not the shape of their image (e.g. {mask} is {mw}x{mh}, its image {w}x{h} as "
                       "decoded, a JPEG's EXIF rotation applied): stretched onto it, they would mark other pixels; save "
                       "each mask at its image's size and orientation")
        return out

    def notes(self) -> list[str]:
        """The summary's notes and warnings that neither stop ``train`` nor ``evaluate``, both of which print them."""
        out: list[str] = []
        if empty := self.category.empty:
            out.append(f"  note: {', '.join(empty)} {'holds' if len(empty) == 1 else 'hold'} no images: not in the test split")
        out += [f"  note: {said}" for said in self.category.left_out]
        if self.beyond_frames:
            path, width, height, size = self.beyond_frames[0]
            out.append(f"  note: {len(self.beyond_frames)} images are larger than a worker takes as a frame unless told "
                       f"(e.g. {path}: {width}x{height}, {size / 1e6:.1f} MB; limits.max_pixels "
                       f"{FRAME_MAX_PIXELS / 1e6:g} MP, limits.max_frame_bytes {FRAME_MAX_BYTES / 1e6:g} MB): raise "
                       "them in the worker's config.yaml for cameras that send such frames")
        if self.several_pictures:
            path, pictures = self.several_pictures[0]
            out.append(f"  warning: {len(self.several_pictures)} images hold more than one picture (e.g. {path}: "
                       f"{pictures}; a TIFF's pages, an animated PNG's or WebP's frames): only the first is read, as "
                       "the worker reads a frame's first; save each picture as a file of its own to use the others")
        if self.not_read:
            out.append(f"  note: {len(self.not_read)} files are not read, their names not a PNG, JPEG, BMP, TIFF or "
                       f"WebP image's: {by_kind(self.not_read, self.category.base)}; save them as PNG to train on them")
        if rescaled := len(self.misfit_masks) - len(self.misshapen_masks):
            out.append(f"  note: {rescaled} masks are at another scale than their images (same proportions): "
                       "resized to them")
        if self.low_bits:
            path, top = max(self.low_bits, key=lambda m: m[1])
            bits = max(top.bit_length(), 1)
            out.append(f"  warning: {len(self.low_bits)} 16-bit images use only their low {bits} bits (e.g. {path}: "
                       f"largest value {top} of 65535, a {bits}-bit camera's data): read as 8-bit like the worker reads "
                       f"a frame (the top 8 bits), they are almost black (0..{top >> 8}); scale them to the full 16-bit "
                       f"range (x{1 << (16 - bits)}) before training, and the camera's frames the same way (or have it "
                       "send 8-bit frames)")
        if self.lossy_masks:
            out.append(f"  warning: {len(self.lossy_masks)} masks are JPEG (e.g. {self.lossy_masks[0]}): every pixel "
                       "above 0 marks a defect, and JPEG's compression noise around a mark's edges does too, so the "
                       "pixel metrics count more (and more scattered) defect regions than were drawn; save masks as PNG")
        if self.blank_masks:
            out.append(f"  warning: {len(self.blank_masks)} defect images have masks that mark no pixel (e.g. "
                       f"{self.blank_masks[0]}): their pixels count as defect-free in the pixel metrics, which then "
                       "understate the model; draw the defect in them")
        if mixed := self.colour_mix():
            out.append(f"  warning: {mixed}")
        if self.in_both:
            test, train = self.in_both[0]
            out.append(f"  warning: {len(self.in_both)} test images are byte for byte training images (e.g. {test} is "
                       f"{train}): the test figures will overstate the model; remove the copies from one side")
        return out

    def _grey_pictures(self) -> str:
        """Said beside the channels when colour files all hold a grey picture: "colour" alone, followed by the fit's
        line that the training images are all grey, read as a contradiction to a user who saved grey photos as JPEG."""
        if "colour" not in self.channels or not self.chroma or any(c >= GREY_CHROMA for _, c in self.chroma):
            return ""
        return ", every training image a grey picture (its channels less than a level apart): read as grey"

    def colour_mix(self) -> str | None:
        """Why training images both grey and in colour deserve a look, naming the fewer kind, or None.  The bundle
        turns frames grey only where every training image is grey, and a worker says a grey frame is unlike a model
        of colour images only where none was grey: one odd file (a camera changed, a file of another line) silently
        turned either off."""
        grey = [p for p, c in self.chroma if c < GREY_CHROMA]
        colour = [p for p, c in self.chroma if c >= 2 * GREY_CHROMA]  # between the two: a faint tint, neither
        if not grey or not colour:
            return None
        odd, kind, others = (colour, "in colour", "grey") if len(colour) <= len(grey) else (grey, "grey", "in colour")
        shown = ", ".join(str(p) for p in odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
        lost = ("the bundle does not turn frames grey, as it does where every training image is grey, so a colour "
                "camera's tint moves its scores" if kind == "in colour" else
                "a worker cannot say when a camera sends grey frames to this model of colour images")
        return (f"{len(odd)} of the {len(self.chroma)} training images are {kind}, the others {others}: {shown}; a "
                f"camera changed, or a file is not this line's; with them {lost}: remove them, or train on one "
                "camera's images")

    def evaluation_text(self) -> str:
        """``evaluate``'s summary: the test split it measures and the notes that concern it."""
        cat = self.category
        types = Counter(s.defect for s in cat.test)
        masked = sorted({s.defect for s in cat.test if s.mask is not None})
        return "\n".join([
            f"data: {cat.root} ({cat.layout})",
            f"  test split: {cat.split}" + (": " + ", ".join(f"{t} {n}" for t, n in sorted(types.items())) if types else ""),
            f"  masks: {', '.join(masked) if masked else 'none'}",
            *self.notes(),
        ])

    def text(self, n_fit: int, n_threshold: int, tiling: TilingSpec | None = None,
             held_defects: Sequence[Sample] = ()) -> str:
        """``train``'s summary; ``held_defects``: the defects a recall threshold is chosen on, said apart from the
        test split they leave (it said them in it, more images than were evaluated)."""
        cat = self.category
        held = {s.path for s in held_defects}
        test = [s for s in cat.test if s.path not in held]
        types, held_types = Counter(s.defect for s in test), Counter(s.defect for s in held_defects)
        masked = sorted({s.defect for s in test if s.mask is not None})
        unmasked = sorted({s.defect for s in test if not s.has_pixel_truth})
        lines = [
            f"data: {cat.root} ({cat.layout})",
            f"  good training images: {len(cat.train)} -> {n_fit} to fit, {n_threshold} held out for the threshold",
            f"  test split: {cat.split}" + (": " + ", ".join(f"{t} {n}" for t, n in sorted(types.items())) if types else ""),
            *([f"  held out of the test split for the threshold: {', '.join(f'{t} {n}' for t, n in sorted(held_types.items()))}"]
              if held_types else []),
            f"  image sizes (w x h): {_counts({f'{w}x{h}': n for (w, h), n in self.sizes.items()}, SIZES_SHOWN)}",
            f"  channels: {_counts(self.channels)}{self._grey_pictures()}; bit depth: {_counts(self.depths)} "
            "(read as 8-bit BGR like the worker: grey -> 3 channels, 16-bit -> top 8 bits; stretched to the input size)",
            f"  masks: {', '.join(masked) if masked else 'none'}" + (f"; image labels only: {', '.join(unmasked)}" if unmasked else ""),
        ]
        if tiling is not None:
            lines.append(f"  tiles: every image cut into {tiling.grid[0]}x{tiling.grid[1]} tiles (overlap {tiling.overlap:g}), "
                         "each at the input size; a frame scores as its highest tile")
        elif self.sizes and (common := self.sizes.most_common(1)[0])[1] * 2 > self.sizes.total() \
                and (note := _stretch_note(*common[0])):  # a size most images have: of mixed sizes, none is "most"
            lines.append(note)
        if self.train_copies:
            copy, original = self.train_copies[0]
            lines.append(f"  note: {len(self.train_copies)} training images are byte for byte copies of others (e.g. "
                         f"{original} and {copy}): each kept with the one it copies in the fit or among the "
                         "held-out images, so that no held-out image has been fitted")
        lines += self.notes()
        if not test:
            lines.append("  evaluation: none (no labelled test images); the bundle is exported unevaluated")
        elif not any(s.label for s in test):
            lines.append("  evaluation: false-alarm rate only (no defect images)")
        elif all(s.label for s in test):
            pixel = "pixel AUROC and AUPRO on the images with masks" if masked else "no pixel metrics (no masks)"
            lines.append(f"  evaluation: detection rate and F1 only, no image AUROC (no good test images); {pixel}")
        else:
            pixel = "pixel AUROC and AUPRO on the images with masks" if masked else "no pixel metrics (no masks)"
            lines.append(f"  evaluation: image AUROC and F1 on the test split; {pixel}")
        return "\n".join(lines)


STRETCH_NOTED = 1.5  # aspect ratio (long side / short side) from which the summary suggests tiles


def _stretch_note(width: int, height: int) -> str | None:
    """A note for elongated images: the square input squeezes their long side; tiles along it keep the proportions."""
    ratio = max(width, height) / min(width, height)
    if ratio < STRETCH_NOTED:
        return None
    n = min(round(ratio), MAX_TILES)  # the most tiles --tiling takes along one side
    grid = f"{n}x1" if width > height else f"1x{n}"
    return (f"  note: most images are {width}x{height}, {ratio:.1f} times longer than wide: stretched to the square input, "
            f"which squeezes them along their long side; --tiling {grid} cuts them into tiles of about the input's "
            "shape instead")


SIZES_SHOWN = 8  # photos of many sizes listed one by one made a line of hundreds of sizes


def _counts(counter: dict, most: int | None = None) -> str:
    """``key (count)``, the most counted first (ties by key); past ``most`` keys, how many more and how many they count."""
    ranked = sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))
    rest = ranked[most:] if most is not None else []
    shown = ", ".join(f"{k} ({v})" for k, v in ranked[:most]) or "-"
    return shown + (f" and {len(rest)} more ({sum(v for _, v in rest)})" if rest else "")


def _turned(image: Image.Image) -> bool:
    """Whether decoding for training turns the image a quarter where the summary's ``IMREAD_UNCHANGED`` does not
    (EXIF orientation 5 to 8 of a JPEG, PNG or WebP, which OpenCV's ``IMREAD_COLOR`` applies): its width and height
    swap.  OpenCV's TIFF decoder applies a TIFF's orientation with either flag, so its decoded size is turned already
    (swapped again, its correct mask was refused and the worker called its camera's frames unlike training)."""
    return image.format != "TIFF" and image.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)


def _decoded_size(image: Image.Image) -> tuple[int, int]:
    """An image's (width, height) as decoded for training, from its header: a TIFF's stored size turned by its
    orientation (Pillow reports a TIFF's size turned or not, by version), another's turned where :func:`_turned`."""
    exif = image.getexif()
    if image.format == "TIFF" and isinstance(width := exif.get(256), int) and isinstance(height := exif.get(257), int):
        return (height, width) if exif.get(ExifTags.Base.Orientation) in (5, 6, 7, 8) else (width, height)
    return image.size[::-1] if _turned(image) else image.size


def _pictures(image: Image.Image) -> int:
    """How many full pictures ``image`` holds: a TIFF's pages but those marked reduced-resolution versions of
    another (NewSubfileType bit 0: a scanner's or camera's thumbnail or preview, not a picture of its own); an
    animated PNG's or WebP's frames; 1 for an MPO, whose second picture is no photo."""
    if image.format == "MPO":
        return 1
    pages = int(getattr(image, "n_frames", 1))
    if image.format != "TIFF" or pages == 1:
        return pages
    full = 0
    for page in range(pages):
        image.seek(page)
        subfile = image.tag_v2.get(254, 0)  # type: ignore[attr-defined]
        full += not (isinstance(subfile, int) and subfile & 1)
    return max(full, 1)


def _header(data: bytes) -> tuple[str | None, bool, int]:
    """The format of an image's content as the worker's decoder tells a frame's (Pillow's name; ``unknown``: none
    Pillow reads; None: too large for Pillow to say), whether decoding for training turns it a quarter (EXIF
    orientation 5 to 8 but a TIFF's: :func:`_turned`), and how many pictures it holds (:func:`_pictures`): only the
    first is read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(quiet_png(data))) as image:  # as the worker's probe reads a frame (_opened)
                turned = _turned(image)
                return image.format, turned, _pictures(image)
    except Image.DecompressionBombError:  # beyond any frame a worker takes, which the summary says
        return None, False, 1
    except Exception:  # OpenCV's own size stands
        return "unknown", False, 1


def frame_sizes(paths: Iterable[Path], most: int = 8) -> dict[str, int]:
    """The sizes of these images as decoded for training (EXIF turn applied), ``"WxH": count``, from their headers:
    the bundle records them (``training.frame_sizes``) so that a worker can say when a camera's frames have another
    shape (stretched alike to the input, they are another picture) or are smaller than any training image
    (:meth:`bundle.Manifest.unlike_training`).  The ``most`` commonest, then the commonest size of every other
    proportion (more than :data:`bundle.ASPECT_TOLERANCE` from each kept one) and the narrowest and the lowest: of
    mixed sizes (hand-cut crops) the commonest alone left out proportions and small sizes the training images had,
    and the worker called them unseen.  Bounded by the proportions there are, not by the number of images."""
    sizes: Counter = Counter()
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as image:
                    size = _decoded_size(image)
        except Exception:  # a format Pillow does not read (OpenCV may): its size is not recorded
            continue
        sizes[size] += 1
    ranked = [size for size, _ in sizes.most_common()]
    kept = ranked[:most]
    for width, height in ranked[most:]:
        if all(max(r := (width / height) / (w / h), 1 / r) > ASPECT_TOLERANCE for w, h in kept):
            kept.append((width, height))
    for side in (0, 1) if ranked else ():  # the narrowest, the lowest
        if (extreme := min(ranked, key=lambda size: size[side])) not in kept:
            kept.append(extreme)
    return {f"{w}x{h}": sizes[(w, h)] for w, h in kept}


def summarise(category: Category, trained: bool = True) -> Summary:
    """Decode every image and mask as stored (IMREAD_UNCHANGED) to report sizes, channels and depth, and find bad files.
    Not ``trained`` (``evaluate``): the training images are only read for their bytes, to find their copies in test."""
    sizes: Counter = Counter()
    channels: Counter = Counter()
    depths: Counter = Counter()
    unreadable: list[Path] = []
    wide: list[Path] = []
    beyond: list[tuple[Path, int, int, int]] = []
    trained_size: dict[Path, tuple[int, int]] = {}  # (width, height) as decoded for training, EXIF turn applied
    seen: dict[bytes, Path] = {}  # a training image's bytes -> the first training image with them
    in_both: list[tuple[Path, Path]] = []
    refused: list[tuple[Path, str]] = []
    low_bits: list[tuple[Path, int]] = []
    train_copies: list[tuple[Path, Path]] = []
    chromas: list[tuple[Path, float]] = []
    tiff_depths: list[tuple[Path, str]] = []
    tiff_layouts: list[tuple[Path, str]] = []
    several: list[tuple[Path, int]] = []
    for i, path in enumerate([*category.train, *(s.path for s in category.test)]):  # the training images first
        try:
            data = path.read_bytes()
        except OSError:
            data = b""
        digest = hashlib.sha256(data).digest()
        if i < len(category.train):
            if digest in seen and data:
                train_copies.append((path, seen[digest]))
            seen.setdefault(digest, path)
        elif digest in seen and data:
            in_both.append((path, seen[digest]))
        if i < len(category.train) and not trained:
            continue
        image = _decode(data, cv2.IMREAD_UNCHANGED)
        depth = tiff_samples(data)  # OpenCV reads a 12-bit TIFF as stored, not as training does (a wide one: below)
        if depth is not None and (image is None or image.dtype in (np.uint8, np.uint16)):
            tiff_depths.append((path, depth))
            continue
        if (layout := tiff_layout(data)) is not None:  # OpenCV reads it (as 8-bit grey), the worker does not
            tiff_layouts.append((path, layout))
            continue
        if image is None:
            unreadable.append(path)
            continue
        height, width = image.shape[:2]
        fmt, turned, pictures = _header(data)
        if pictures > 1:
            several.append((path, pictures))
        if fmt is not None and fmt not in FRAME_FORMATS:
            refused.append((path, fmt))
        trained_size[path] = (height, width) if turned else (width, height)
        sizes[trained_size[path]] += 1
        if width * height > FRAME_MAX_PIXELS or len(data) > FRAME_MAX_BYTES:
            beyond.append((path, width, height, len(data)))
        channels[{1: "grey", 3: "colour", 4: "colour+alpha"}.get(1 if image.ndim == 2 else image.shape[2], "other")] += 1
        depths[f"{image.dtype.itemsize * 8}-bit"] += 1
        if image.dtype == np.uint16 and (top := int(image[..., :3].max() if image.ndim == 3 else image.max())) < 1 << LOW_BITS:
            low_bits.append((path, top))
        if image.dtype not in (np.uint8, np.uint16):  # read_image (IMREAD_COLOR) gets nothing from these
            wide.append(path)
        elif i < len(category.train) and (value := image_chroma(path)) is not None:  # as the fit decides grey
            chromas.append((path, value))
    misfit: list[tuple[Path, tuple[int, int], tuple[int, int]]] = []
    lossy: list[Path] = []
    blank: list[Path] = []
    for sample in category.test:
        size = trained_size.get(sample.path)  # None where the image is unreadable
        marked = None
        for file in mask_files(sample.mask) if sample.mask is not None else []:
            if (mask := mask_pixels(file)) is None:
                unreadable.append(file)
                continue
            if size is not None and (mask.shape[1], mask.shape[0]) != size:
                misfit.append((file, (mask.shape[1], mask.shape[0]), size))
            if _is_jpeg(file):
                lossy.append(file)
            marked = bool(marked) or bool(mask.any())
        if marked is False and sample.mask is not None and sample.defect != "good":
            blank.append(sample.mask)
    unread = not_read(category.root) if category.root.is_dir() else []  # a list names its files itself
    # by name: fields added by changes made side by side cannot then fill each other's places unnoticed
    return Summary(category, sizes, channels, depths, unreadable, in_both=in_both, wide_samples=wide,
                   beyond_frames=beyond, misfit_masks=misfit, not_read=unread, refused_formats=refused,
                   low_bits=low_bits, train_copies=train_copies, trained=trained, lossy_masks=lossy, blank_masks=blank,
                   chroma=chromas, tiff_depths=tiff_depths, tiff_layouts=tiff_layouts,
                   several_pictures=several)


def _is_jpeg(path: Path) -> bool:
    """Whether a file's content is JPEG (its first bytes; a mask's name may say otherwise)."""
    try:
        with path.open("rb") as fh:
            return fh.read(3) == b"\xff\xd8\xff"
    except OSError:
        return False
