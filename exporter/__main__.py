"""``python -m exporter``: train, evaluate and export anomaly detectors as model bundles."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

# Nothing heavier than the standard library at import (bundle pulls in OpenCV and numpy, slow to import): a
# Ctrl-C in the first moments of a run came before the handlers (exporter/stopping.py) and printed a traceback.
from exporter import stopping

if TYPE_CHECKING:
    from bundle import TilingSpec
    from exporter.build import Trained
    from exporter.data import Category
    from exporter.thresholds import ThresholdChoice


def _train(args: argparse.Namespace) -> int:
    from exporter.families import FAMILIES, refuse_unused

    family = FAMILIES[args.model]
    refuse_unused(args, [family])
    if args.precision not in family.weight_precisions:
        raise ValueError(f"--precision {args.precision} is not a weight precision of {family.name} "
                         f"(it has {', '.join(family.weight_precisions)})")
    family.check(family.settings(args))
    from exporter.build import check_out, default_name, package, precisions_to_measure
    from exporter.thresholds import ThresholdChoice

    check_out(Path(args.out))
    precisions_to_measure(args.precision, _list(args.precisions))

    for flag, mode, target in (("--target-far", "far", args.target_far), ("--target-recall", "recall", args.target_recall)):
        if target is not None and args.threshold_mode != mode:  # else the bundle had another mode's threshold, unsaid
            raise ValueError(f"{flag} is for --threshold-mode {mode}, and this run's mode is {args.threshold_mode}: "
                             f"give --threshold-mode {mode} with it, or leave it out")
    threshold = ThresholdChoice(args.threshold_mode, {"far": args.target_far, "recall": args.target_recall}.get(
        args.threshold_mode))
    if args.validation_photos and not args.choose:
        raise ValueError("--validation-photos is for --choose (the photos its synthetic anomalies are filled with)")
    if args.validation_photos:  # else each candidate was scored on noise-filled anomalies, unsaid and unrecorded
        from exporter.validation import natural_photos

        if not natural_photos(Path(args.validation_photos)):
            raise ValueError(f"--validation-photos {args.validation_photos}: no such folder, or it holds no .jpg or "
                             ".png photos")
    from exporter.data import tiling_of

    tiling = tiling_of(family.settings(args))
    category = _check_data(Path(args.data), args.category, threshold, tiling, family.settings(args).seed)
    if args.name is None:
        default_name(category.name, family.name)
    trained = (_choose(args, threshold) if args.choose
               else family.fit(Path(args.data), args.category, family.settings(args), threshold))
    print(package(trained, Path(args.out), name=args.name, evaluate_test=not args.no_eval, precision=args.precision,
                  precisions=_list(args.precisions), then=None))
    return 0


def _choose(args: argparse.Namespace, threshold: ThresholdChoice) -> Trained:
    """``train --choose``: the PatchCore candidate that wins on this data's validation split (exporter/choose.py)."""
    if args.model != "patchcore":
        raise ValueError(f"--choose picks among PatchCore settings; --model {args.model} has no candidates")
    from exporter.choose import candidate_names, choose
    from exporter.families import FAMILIES
    from exporter.teacher import DEFAULT_NATURAL

    family = FAMILIES["patchcore"]
    given = [o.dest for o in family.options if getattr(args, o.dest, None) is not None]
    photos = Path(args.validation_photos) if args.validation_photos else DEFAULT_NATURAL
    return choose(Path(args.data), args.category, family.settings(args), given, candidate_names(args.choose),
                  threshold, photos)


def _check_data(data: Path, category: str | None, threshold: ThresholdChoice, tiling: TilingSpec | None,
                seed: int) -> Category:
    """Print what was found and what it will be used for, split as the fit will split it (``seed``): the test split
    said is the one evaluated, without the defects a recall threshold is chosen on.  Refuse data that cannot be
    trained on, saying why; the data as read."""
    from exporter.build import VAL_FRACTION
    from exporter.data import DatasetError, hold_out_defects, load_category, summarise
    from exporter.thresholds import VAL_DEFECT_FRACTION

    summary = summarise(load_category(data, category, seed))  # every file checked, the held-out defects too
    held_defects = hold_out_defects(summary.category, VAL_DEFECT_FRACTION, seed)[1] if threshold.needs_defects else []
    fit, held = summary.category.split_train(VAL_FRACTION, seed)
    warning = threshold.warning(len(held))
    print(summary.text(len(fit), len(held), tiling, held_defects) + f"\n  image threshold: {threshold.describe()}"
          + (f"\n{warning}" if warning else ""), flush=True)
    problems = summary.problems()
    if problems:
        raise DatasetError("unusable data:\n  - " + "\n  - ".join(problems))
    return summary.category


def _bundle_name(value: str) -> str:
    from bundle import bundle_name

    try:
        return bundle_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _given(args: argparse.Namespace, *names: str) -> dict:
    """The options the user set; the rest keep the settings' own defaults (one place for each default)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _distill(args: argparse.Namespace) -> int:
    from exporter.backbones import check_layers
    from exporter.teacher import DEFAULT_NATURAL, TeacherSettings, cache_path, distill, finished

    settings = TeacherSettings(**_given(args, "size", "backbone", "steps", "batch_size", "crop", "held_out",
                                        "train_precision", "backbone_scale"),
                               **({"layers": args.layers.split(",")} if args.layers else {}))
    check_layers(settings.backbone, settings.layers)
    natural = Path(args.natural or DEFAULT_NATURAL)
    if args.write_now and not args.out:
        # The cache holds finished teachers only: train takes what it finds there as the run its key names.
        raise ValueError("--write-now writes a teacher on the way, which the cache does not hold (train would take it "
                         "for the finished one): give --out for it")
    out = Path(args.out) if args.out else cache_path(settings, natural)
    if not args.out and finished(out, settings.steps):
        print(out)  # the cache already holds this teacher
        return 0
    # The cache is keyed by every setting, so its checkpoint is always this run's: resume it without asking.
    print(distill(settings, natural, out, resume=args.resume or not args.out, stop_after=args.stop_after,
                  write_now=args.write_now, **_given(args, "checkpoint_every", "eval_every")))
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from exporter.families import refuse_unused, select

    families = select(args.models.split(","))
    refuse_unused(args, families)
    for family in families:
        family.check(family.settings(args))
    if args.tiling is not None or args.tile_overlap is not None:
        raise ValueError("--tiling is for train: benchmark scores whole images")
    from exporter.benchmark import run
    from exporter.build import precisions_to_measure

    precisions_to_measure("fp32", _list(args.precisions))

    report = run(Path(args.data), [f.name for f in families], Path(args.out), "python -m exporter " + shlex.join(args.argv),
                 args.categories.split(",") if args.categories else None, {f.name: f.settings(args) for f in families},
                 precisions=_list(args.precisions))
    print(report)
    return 0


def _add_precisions_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precisions", help="inference precisions to measure thresholds and test metrics at, "
                                             "comma-separated (default: every one this CPU runs natively; the "
                                             "reference f32, or int8 for an INT8 bundle, always)")


def _evaluate(args: argparse.Namespace) -> int:
    from bundle import MANIFEST, read_manifest
    from exporter.data import DatasetError, load_category, short_digest, summarise
    from exporter.evaluate import evaluate_folder

    if args.json and not os.access(Path(args.json).resolve().parent, os.W_OK):  # said before, not after the run
        raise ValueError(f"--json {args.json}: its folder does not exist or cannot be written")
    if args.json and Path(args.json).is_dir():  # else refused by the write, after every image was scored
        raise ValueError(f"--json {args.json} is a folder: give the file to write in it, e.g. {Path(args.json) / 'metrics.json'}")
    if args.json:  # what a run killed while writing it left (an earlier run of this command)
        from exporter.staging import remove_stale_temporaries

        remove_stale_temporaries(Path(args.json).resolve())
    # The same test split the bundle was measured on at export: same seed, its threshold's defects left out.
    manifest = read_manifest(Path(args.bundle), verify=False)
    training = manifest.training
    category = load_category(Path(args.data), args.category, int(training.get("seed", 0)))
    if args.json:
        _refuse_overwriting(Path(args.json), Path(args.bundle), [MANIFEST, *manifest.files], category)
    category = category.without(training.get("validation_defects", []))
    trained = set(training.get("trained_images") or [])
    if good_parts := not category.test and bool(category.train):  # no defect images yet: the false alarms alone
        category = category.as_good_parts()
    elif category.drawn and trained and not any(
            short_digest(p) in trained for p in [*category.train, *(s.path for s in category.test if not s.label)]):
        category = category.as_test_folder()  # a test folder apart from the training one: all its good images count
    # A split drawn again from files added or removed since the export holds some of the bundle's training images;
    # good parts given as they are may be (a copy of the training folder, or the folder itself).
    again = [s.path for s in category.test if s.defect == "good" and short_digest(s.path) in trained] \
        if category.drawn or good_parts else []
    if good_parts and len(again) == len(category.test):
        raise DatasetError(f"{category.root}: all {len(again)} images are images this bundle was trained on (or held "
                           "out to set its threshold): their scores say nothing of the false alarms on parts it has "
                           "not seen; give good images it was not trained on")
    category = category.without([category.recorded(path) for path in again])
    # train's checks of the test files: refused on the same problems, its notes said (on stderr: stdout is the JSON)
    summary = summarise(category, trained=False)
    print(summary.evaluation_text(), file=sys.stderr, flush=True)
    if problems := summary.problems():
        raise DatasetError("unusable data:\n  - " + "\n  - ".join(problems))
    if again and good_parts:
        print(f"  note: {len(again)} of the images are images this bundle was trained on or held out to set its "
              f"threshold (e.g. {again[0]}): left out, so the false alarms counted are on images it never saw",
              file=sys.stderr, flush=True)
    elif again:
        print(f"  note: {len(again)} good images drawn into the test split are images this bundle was trained on "
              f"(e.g. {again[0]}): left out, so the figures are of images it never saw; the good images are not "
              "those it was trained on (added or removed since), so the split is not the one measured at export",
              file=sys.stderr, flush=True)
    elif (category.drawn or good_parts) and not trained:
        print("  note: this bundle does not record its training images (exported before training.trained_images): "
              + ("any of these it was trained on scores low, and understates its false alarms" if good_parts else
                 "if good images were added or removed since, some of its training images may be in this split"),
              file=sys.stderr, flush=True)
    metrics = evaluate_folder(Path(args.bundle), category, args.device, args.precision)
    if again:
        metrics["trained_left_out"] = len(again)
    if flagged := metrics.get("good_flagged"):
        shown = ", ".join(f"{f['path']} ({f['score']:g})" for f in flagged["files"][:10])
        more = f" and {len(flagged['files']) - 10} more" if len(flagged["files"]) > 10 else ""
        print(f"  good images flagged at the threshold {metrics['threshold']:g} ({metrics['precision']}): "
              f"{flagged['count']} of {flagged['of']} ({flagged['fraction']:.1%})" + (f": {shown}{more}" if shown else "")
              + (f"; {metrics['image_metrics']}" if metrics.get("image_metrics") else ""), file=sys.stderr, flush=True)
    text = json.dumps(metrics, indent=2)
    print(text, flush=True)  # first: a file that cannot be written after all does not lose the evaluation
    if args.json:
        _write_metrics(Path(args.json), text + "\n")
    return 0


def _write_metrics(path: Path, text: str) -> None:
    """Write ``evaluate --json`` whole or not at all: written in place, a full disk left an empty file and the run
    said only "[Errno 28] No space left on device", naming no file."""
    from exporter.staging import temporary

    target = path.resolve()  # a link to the file: the file it names is the one replaced
    tmp = temporary(target)
    try:
        tmp.write_text(text)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OSError(f"--json {path}: the metrics could not be written ({exc.strerror or exc}); they are on stdout "
                      "above, and the file is as it was") from exc


def _refuse_overwriting(target: Path, bundle: Path, bundle_files: list[str], category: Category) -> None:
    """Refuse ``evaluate --json`` onto a file of the bundle or of the data: the metrics were written over it (a
    bundle's model.xml, then refused by its sha256; a test image, lost)."""
    from exporter.data import mask_files

    data = [category.root, *category.train, *(s.path for s in category.test),
            *(f for s in category.test if s.mask is not None for f in mask_files(s.mask))]
    ours = {(bundle / name).resolve() for name in bundle_files} | {p.resolve() for p in data if p.is_file()}
    if target.resolve() in ours:
        raise ValueError(f"--json {target} is a file of the bundle or of the data: the metrics would be written over "
                         "it; give another file")


def _fold(args: argparse.Namespace) -> int:
    from exporter.fold import fold

    manifest = fold(Path(args.bundle), Path(args.extension), Path(args.out))
    record = manifest.training["folds"][-1]
    print(f"{args.out}: {manifest.name}@{manifest.version}, bank {record['bank_before']} + "
          f"{record['extension_rows']} rows = {record['bank_after']} (extension revision {record['extension_revision']})")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from exporter.synthetic import generate

    root = Path(args.out) / args.category
    if root.is_dir() and any(root.iterdir()):  # its file names are a real set's (000.png ...): it would write over them
        raise ValueError(f"{root} exists and is not empty: synth would write its images over the ones there; choose "
                         "another --out or --category")
    print(generate(Path(args.out), args.category, args.size, args.train, args.test, args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from bundle import PRECISIONS
    from exporter.families import FAMILIES, WEIGHT_PRECISIONS, add_options, int_in

    parser = argparse.ArgumentParser(prog="python -m exporter", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at DEBUG, with the libraries' notices that are otherwise left out")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model on normal images and export a bundle")
    train.add_argument("--data", required=True, help="folder holding CATEGORY/, or the data folder or CSV/JSON list "
                       "itself (layouts: README, Training data)")
    train.add_argument("--category", help="sub-folder of --data to use (default: --data itself)")
    train.add_argument("--model", choices=list(FAMILIES), default="patchcore")
    train.add_argument("--out", required=True, help="bundle folder to write: new, empty, or a bundle holding only its "
                                                    "own files (replaced)")
    train.add_argument("--name", type=_bundle_name, help="bundle name (default CATEGORY-MODEL)")
    train.add_argument("--no-eval", action="store_true", help="skip test-split metrics at export")
    train.add_argument("--precision", choices=WEIGHT_PRECISIONS, default="fp32",
                       help="weights: int8 = NNCF post-training quantisation calibrated on the normal training images")
    _add_precisions_option(train)
    train.add_argument("--threshold-mode", choices=["normals", "far", "recall"], default="normals",
                       help="image threshold: normals = max(mean + 3 std, max) of held-out normals (default); "
                            "far = for --target-far on held-out normals; recall = for --target-recall on labelled "
                            "defects held out of the test split")
    train.add_argument("--target-far", type=float, help="false-alarm rate for --threshold-mode far, e.g. 0.01")
    train.add_argument("--target-recall", type=float, help="defect recall for --threshold-mode recall, e.g. 0.95")
    train.add_argument("--choose", metavar="CANDIDATES",
                       help="PatchCore: fit each named setting (fast, default, fine; comma-separated, e.g. fast,default), "
                            "score each on this data's validation split (synthetic anomalies and benign variants of "
                            "the held-out normals) and export the one the rule picks (README: Choosing a setting)")
    train.add_argument("--validation-photos", help="with --choose: natural photos the Perlin anomalies are filled with "
                                                   "(default ../shared/data/natural where present, else noise)")
    add_options(train)
    train.set_defaults(func=_train)

    distill = sub.add_parser("distill-teacher", help="distil EfficientAD's PDN teacher from an offline backbone")
    distill.add_argument("--size", choices=["small", "medium"])
    distill.add_argument("--backbone", help="offline backbone the PDN regresses (default efficientnet_lite0)")
    distill.add_argument("--layers", help="comma-separated backbone layers (default blocks.2,blocks.4; "
                         "efficientnet_lite0/1/2 have blocks.0, blocks.1, blocks.2, blocks.4, blocks.6)")
    distill.add_argument("--steps", type=int_in(1))
    distill.add_argument("--batch-size", type=int_in(1))
    distill.add_argument("--crop", type=int_in(32, 1024), help="side of the random crops")
    distill.add_argument("--backbone-scale", type=int_in(1, 4),
                         help="the backbone sees each crop upscaled by this factor (default 2, the paper's recipe: one "
                              "stride-8 feature on each of the PDN's stride-4 cells; 1: the first shipped teacher's recipe)")
    distill.add_argument("--natural", help="folder of natural photos (default ../shared/data/natural)")
    distill.add_argument("--held-out", type=int_in(0), help="natural photos held out of training for the variance "
                                                       "figure (default 50, at most a fifth)")
    distill.add_argument("--train-precision", choices=["f32", "bf16"],
                         help="f32 (default) or bf16 under torch's CPU autocast: several times faster where the CPU "
                              "has AMX; refused where it has no bf16 units (AVX512_BF16 or AMX)")
    distill.add_argument("--out", help="write the teacher (and NAME.json manifest) here (default: the cache, reused "
                                       "when present, resumed when cut short)")
    distill.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    distill.add_argument("--checkpoint-every", type=int_in(1), help="steps between checkpoints (default 100)")
    distill.add_argument("--eval-every", type=int_in(1), help="steps between held-out variance figures (default 100)")
    distill.add_argument("--stop-after", type=int_in(0), help="stop at this step with a checkpoint, to --resume later "
                                                        "(e.g. across sessions); 0 with --write-now writes the untrained "
                                                        "teacher")
    distill.add_argument("--write-now", action="store_true",
                         help="write the teacher and its manifest where the run stops (--stop-after, else the resumed "
                              "checkpoint's step) and keep the checkpoint, so a later --resume still goes on (needs --out: the cache "
                              "holds finished teachers only)")
    distill.set_defaults(func=_distill)

    bench = sub.add_parser("benchmark", help="train, export and evaluate models on every category; write a report")
    bench.add_argument("--data", required=True, help="folder holding categories: MVTec AD layout, or a training "
                       "folder with masks beside its images (DAGM 2007 Class1 ...)")
    bench.add_argument("--models", default=",".join(FAMILIES), help=f"comma-separated, of {', '.join(FAMILIES)}")
    bench.add_argument("--categories", help="comma-separated subset (default: every category found); a category "
                       "named here is read in any layout train reads")
    bench.add_argument("--out", required=True, help="report folder (an earlier benchmark's report there is replaced; "
                                                    "one holding a report.md, report.json or plots of its own is refused)")
    add_options(bench)
    _add_precisions_option(bench)
    bench.set_defaults(func=_benchmark)

    ev = sub.add_parser("evaluate", help="run a bundle with OpenVINO on a test split")
    ev.add_argument("--bundle", required=True)
    ev.add_argument("--data", required=True, help="as for train")
    ev.add_argument("--category", help="as for train")
    ev.add_argument("--device", default="CPU")
    ev.add_argument("--precision", choices=["auto", *PRECISIONS], default="f32",
                    help="inference precision (default f32: the same numbers on every CPU; auto = the device's "
                         "default, bf16 on CPUs with AMX or AVX512_BF16); the bundle's thresholds for it are used")
    ev.add_argument("--json", help="also write the metrics to this file")
    ev.set_defaults(func=_evaluate)

    fold = sub.add_parser("fold-extension", help="write a new PatchCore bundle whose memory bank holds a worker's "
                                                 "bank-extension rows (the absorbed false alarms, made permanent)")
    fold.add_argument("bundle", help="the PatchCore bundle the extension was absorbed for")
    fold.add_argument("extension", help="its extension folder under the worker's learning.path "
                                        "(NAME-<sha256 of model.bin, 16 hex>, with index.json)")
    fold.add_argument("--out", required=True, help="new bundle folder to write (must not exist or be empty)")
    fold.set_defaults(func=_fold)

    synth = sub.add_parser("synth", help="generate a small texture dataset in MVTec AD layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--category", default="weave")
    synth.add_argument("--size", type=int_in(16, 2048), default=128)
    synth.add_argument("--train", type=int_in(1), default=24)
    synth.add_argument("--test", type=int_in(0), default=4)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_synth)
    return parser


class _HeadKeys(logging.Filter):
    """timm's warning that a backbone checkpoint holds keys its feature extractor does not use: the classifier head,
    always present in an ImageNet checkpoint and never wanted here (the keys themselves are checked when the weights
    are prepared, exporter/backbones.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unexpected keys")


def _quiet_libraries() -> None:
    """Leave out what the libraries say that a user can do nothing about (shown with --verbose): their deprecation
    notices about each other, timm's checkpoint file names and head keys, torch's note that a CPU box has no CUDA,
    and OpenCV's (libtiff's) lines about a damaged image, which name no file: the summary names each such file and
    says why, as the worker, which keeps only OpenCV's fatal messages, answers a frame."""
    import cv2

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_FATAL)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(timm|anomalib|torch)(\.|$)")
    logging.getLogger("timm").setLevel(logging.WARNING)
    logging.getLogger("timm.models._builder").addFilter(_HeadKeys())
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _escaped_output() -> None:
    """Characters the console cannot encode are written escaped, not an error: a file name that is not UTF-8 (a
    Latin-1 byte, read as ``\\udce4``) stopped the run at its summary under ``PYTHONIOENCODING=utf-8`` (strict).  A
    stream that already passes such names through (``surrogateescape``, Python's default on a POSIX console) keeps
    its own handler."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    with stopping.handled():  # the imports too: the parser's options come from the model families and the bundle
        from bundle import BundleError

        args = build_parser().parse_args(argv)
        args.argv = sys.argv[1:] if argv is None else argv  # as given: the benchmark report names the command that ran
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        if not args.verbose:
            _quiet_libraries()
        try:
            return args.func(args)
        except (BundleError, OSError, ValueError, RuntimeError) as exc:  # OSError: e.g. a full disk, said plainly
            print(f"error: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    stopping.install()  # first, before any heavy import; main puts these back as it returns: a signal then still hears of its bundle
    _escaped_output()
    code = main()
    stopping.finished()
    sys.exit(code)
