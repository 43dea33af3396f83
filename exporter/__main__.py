"""``python -m exporter``: train, evaluate and export anomaly detectors as model bundles."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bundle import BundleError


def _train(args: argparse.Namespace) -> int:
    from exporter.build import train_patchcore
    from exporter.train.patchcore import PatchcoreSettings

    settings = PatchcoreSettings(
        backbone=args.backbone,
        backbone_weights=args.backbone_weights,
        input_size=args.input_size,
        coreset_ratio=args.coreset_ratio,
        **({"layers": args.layers.split(",")} if args.layers else {}),
    )
    out = train_patchcore(Path(args.data), args.category, Path(args.out), settings, name=args.name,
                          evaluate_test=not args.no_eval)
    print(out)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from exporter.data import load_category
    from exporter.evaluate import evaluate_folder

    metrics = evaluate_folder(Path(args.bundle), load_category(Path(args.data), args.category), args.device)
    text = json.dumps(metrics, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def _synth(args: argparse.Namespace) -> int:
    from exporter.synthetic import generate

    print(generate(Path(args.out), args.category, args.size, args.train, args.test, args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m exporter", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model on normal images and export a bundle")
    train.add_argument("--data", required=True, help="folder holding CATEGORY/ in MVTec AD layout")
    train.add_argument("--category", required=True)
    train.add_argument("--model", choices=["patchcore"], default="patchcore")
    train.add_argument("--out", required=True, help="bundle folder to write")
    train.add_argument("--name", help="bundle name (default CATEGORY-MODEL)")
    train.add_argument("--backbone", default="efficientnet_lite0")
    train.add_argument("--backbone-weights", help="local weights file for --backbone (.pth or .safetensors)")
    train.add_argument("--layers", help="comma-separated backbone layers (default blocks.2,blocks.4)")
    train.add_argument("--input-size", type=int, default=256)
    train.add_argument("--coreset-ratio", type=float, default=0.01)
    train.add_argument("--no-eval", action="store_true", help="skip test-split metrics at export")
    train.set_defaults(func=_train)

    ev = sub.add_parser("evaluate", help="run a bundle with OpenVINO on a test split")
    ev.add_argument("--bundle", required=True)
    ev.add_argument("--data", required=True)
    ev.add_argument("--category", required=True)
    ev.add_argument("--device", default="CPU")
    ev.add_argument("--json", help="also write the metrics to this file")
    ev.set_defaults(func=_evaluate)

    synth = sub.add_parser("synth", help="generate a small texture dataset in MVTec AD layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--category", default="weave")
    synth.add_argument("--size", type=int, default=128)
    synth.add_argument("--train", type=int, default=24)
    synth.add_argument("--test", type=int, default=4)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (BundleError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
