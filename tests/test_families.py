"""Model families as plugins: the registry covers the bundle contract and the CLI, and no option is ignored."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import typing

import pytest

from bundle import Manifest
from conftest import ROOT
from exporter.__main__ import build_parser
from exporter.families import FAMILIES, WEIGHT_PRECISIONS, refuse_unused


def _choices(command: str, dest: str) -> list[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return list(next(a for a in sub._actions if a.dest == dest).choices)


def test_every_bundle_family_is_registered_and_offered_by_the_cli():
    assert set(typing.get_args(Manifest.model_fields["family"].annotation)) == set(FAMILIES)
    assert all(name == family.name for name, family in FAMILIES.items())
    assert _choices("train", "model") == list(FAMILIES)
    assert _choices("train", "precision") == list(WEIGHT_PRECISIONS)
    assert all("fp32" in f.weight_precisions for f in FAMILIES.values())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_options_set_settings_fields_and_defaults_stay_in_the_settings(name):
    family = FAMILIES[name]
    cls = family.settings_class()
    assert cls.__module__ == f"exporter.train.{name}"  # the help text points there for the defaults
    fields = {f.name for f in dataclasses.fields(cls)}
    assert {o.dest for o in family.options} <= fields
    assert family.settings() == family.settings(build_parser().parse_args(["train", "--data", "d", "--out", "o"])) == cls()
    assert family.settings(argparse.Namespace(input_size=320)).input_size == 320


def test_a_shared_option_of_one_chosen_family_is_accepted():
    args = build_parser().parse_args(["benchmark", "--data", "d", "--out", "o", "--coreset-ratio", "0.1", "--steps", "3"])
    refuse_unused(args, list(FAMILIES.values()))
    with pytest.raises(ValueError, match="--steps is not an option of patchcore"):
        refuse_unused(args, [FAMILIES["patchcore"]])


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--model", "efficientad", "--coreset-ratio", "0.1"], "--coreset-ratio is not an option of efficientad"),
    (["train", "--model", "efficientad", "--layers", "blocks.2"], "--layers is not an option of efficientad"),
    (["train", "--steps", "5"], "--steps is not an option of patchcore"),
    (["train", "--model", "patchcore", "--teacher", "t.safetensors"], "--teacher is not an option of patchcore"),
    (["train", "--model", "efficientad", "--precision", "int8"], "--precision int8 is not a weight precision of efficientad"),
    (["benchmark", "--models", "efficientad", "--max-bank", "100"], "--max-bank is not an option of efficientad"),
])
def test_an_option_the_chosen_family_does_not_use_is_refused(argv, message, tmp_path):
    """Refused before the data is even read (the folder does not exist), with the flag and the family named."""
    proc = subprocess.run([sys.executable, "-m", "exporter", *argv, "--data", str(tmp_path / "none"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and f"error: {message}" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


LITE0_LAYERS = "(its layers: blocks.0, blocks.1, blocks.2, blocks.4, blocks.6)"


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--layers", "layer2"], f"--layers layer2: not a layer of backbone efficientnet_lite0 {LITE0_LAYERS}"),
    (["train", "--layers", "blocks.2,blocks.3"], f"--layers blocks.3: not a layer of backbone efficientnet_lite0 "
                                                 f"{LITE0_LAYERS}"),
    (["train", "--backbone", "resnet18", "--layers", "blocks.2"],  # nothing downloaded: refused before any weights
     "--layers blocks.2: not a layer of backbone resnet18 (its layers: act1, layer1, layer2, layer3, layer4)"),
    (["benchmark", "--models", "patchcore", "--layers", "layer2,layer3"], "--layers layer2,layer3: not a layer"),
    (["distill-teacher", "--natural", "none", "--layers", "layer2"], f"--layers layer2: not a layer of backbone "
                                                                     f"efficientnet_lite0 {LITE0_LAYERS}"),
])
def test_a_layer_the_backbone_lacks_is_refused_before_the_data_is_read(argv, message, tmp_path):
    """Was a warning, then a KeyError traceback from anomalib on the first image (exit 1) once the data was read."""
    data = [] if argv[0] == "distill-teacher" else ["--data", str(tmp_path / "none")]
    proc = subprocess.run([sys.executable, "-m", "exporter", *argv, *data, "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and f"error: {message}" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("argv", "layers"), [
    ([], ["blocks.2", "blocks.4"]),  # the default
    (["--layers", "blocks.1, blocks.6"], ["blocks.1", "blocks.6"]),  # spaces after the commas are dropped
    (["--backbone", "efficientnet_lite2", "--layers", "blocks.0"], ["blocks.0"]),
    (["--backbone", "resnet18", "--layers", "layer2,layer3"], ["layer2", "layer3"]),
])
def test_the_backbones_own_layers_are_taken(argv, layers):
    family = FAMILIES["patchcore"]
    settings = family.settings(build_parser().parse_args(["train", "--data", "d", "--out", "o", *argv]))
    assert settings.layers == layers
    family.check(settings)


@pytest.mark.parametrize(("argv", "message"), [
    (["--input-size", "0"], "argument --input-size: 0 is outside 32..2048"),
    (["--input-size", "100000"], "argument --input-size: 100000 is outside 32..2048"),  # was a 30 GB resize
    (["--coreset-ratio", "0"], "argument --coreset-ratio: 0 is not a share in (0, 1]"),  # was taken
    (["--coreset-ratio", "nan"], "argument --coreset-ratio: nan is not a share in (0, 1]"),  # failed after the features
    (["--refine", "1.5"], "argument --refine: 1.5 is not a share in (0, 1]"),
    (["--max-bank", "-1"], "argument --max-bank: -1 is below 0"),
    (["--model", "efficientad", "--steps", "0"], "argument --steps: 0 is below 1"),  # was the default's 10 passes
    (["--name", "../x"], "argument --name: '../x' cannot name a bundle"),  # a path: the worker's folders are named after it
])
def test_numbers_out_of_range_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["train", "--data", "d", "--out", "o", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--batch-size", "0"], "argument --batch-size: 0 is below 1"),  # wrote a teacher trained on nothing
    (["--checkpoint-every", "0"], "argument --checkpoint-every: 0 is below 1"),  # a ZeroDivisionError traceback
    (["--steps", "0"], "argument --steps: 0 is below 1"),  # a ZeroDivisionError traceback
    (["--crop", "0"], "argument --crop: 0 is outside 32..1024"),  # a convolution's error about padded input sizes
])
def test_distillation_numbers_out_of_range_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["distill-teacher", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--input-size", "32"], ["--input-size", "2048"], ["--coreset-ratio", "1"],
                                  ["--max-bank", "0"], ["--model", "efficientad", "--steps", "1"]])
def test_numbers_at_the_bounds_are_taken(argv):
    build_parser().parse_args(["train", "--data", "d", "--out", "o", *argv])
