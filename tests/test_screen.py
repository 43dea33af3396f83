"""The screened bank (issue 15): every patch meets the bank's first rows, the farthest share meets them all.

A tiny fitted graph (128 px: 16 x 16 patches, every one an extension candidate, so ``candidate_scores`` holds all
of a frame's patch distances) checked against distances computed plainly with ``torch.cdist``.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import pytest
import torch

from exporter import backbones
from exporter.data import load_category, read_image
from exporter.export import convert, input_spec, save_ir
from exporter.train.patchcore import PatchcoreGraph, PatchcoreSettings, fit, patch_features, to_tensor


@pytest.fixture(scope="module")
def fitted(dataset):
    settings = PatchcoreSettings(input_size=128, coreset_ratio=0.05, extension_candidates=256)
    cat = load_category(dataset, "weave")
    bb = backbones.resolve(settings.backbone)
    spec = input_spec(settings.input_size, bb.mean, bb.std)
    graph, _ = fit(settings, bb, cat.train, spec)
    frames = np.stack([read_image(s.path, spec) for s in cat.test[:6]])
    assert graph.model.memory_bank.shape[0] > 40
    return graph, spec, to_tensor(list(frames), bb), frames


def _screened(graph: PatchcoreGraph, spec, screen: int, refine: float, unrefined: str = "bound") -> PatchcoreGraph:
    return PatchcoreGraph(graph.model, spec.height, graph.embedder, graph.k, screen_rows=screen, refine=refine,
                          unrefined=unrefined, offset=graph.offset).eval()


def test_the_farthest_patches_meet_the_whole_bank_and_the_others_the_screen(fitted):
    graph, spec, x, _ = fitted
    bank = graph.model.memory_bank
    screened = _screened(graph, spec, 20, 0.25)
    assert screened.screen == 20 and screened.refine == 64
    with torch.no_grad():
        got = screened(x)[4]  # the distances of all 256 patches, farthest first
        flat = patch_features(graph.model, x).flatten(2).transpose(1, 2)
        to_screen = torch.cdist(flat, bank[:20]).amin(-1)
        to_bank = torch.cdist(flat, bank).amin(-1)
    top = to_screen.topk(64, dim=1).indices
    want = to_screen.scatter(1, top, to_bank.gather(1, top))
    torch.testing.assert_close(got, want.sort(1, descending=True).values, rtol=1e-4, atol=1e-3)
    assert (to_bank.gather(1, top) < to_screen.gather(1, top) - 1e-3).any()  # the refinement lowered some


def test_scaled_unrefined_patches_take_the_frames_refined_ratio(fitted):
    """``unrefined="scaled"``: each unrefined patch's screen distance times the frame's mean ratio of whole-bank to
    screen distance over its refined patches; the refined ones as before."""
    graph, spec, x, _ = fitted
    bank = graph.model.memory_bank
    with torch.no_grad():
        got = _screened(graph, spec, 20, 0.25, unrefined="scaled")(x)[4]
        flat = patch_features(graph.model, x).flatten(2).transpose(1, 2)
        to_screen = torch.cdist(flat, bank[:20]).amin(-1)
        to_bank = torch.cdist(flat, bank).amin(-1)
    top = to_screen.topk(64, dim=1).indices
    ratio = (to_bank.gather(1, top) / to_screen.gather(1, top)).mean(1, keepdim=True)
    assert (ratio < 0.999).all()
    want = (to_screen * ratio).scatter(1, top, to_bank.gather(1, top))
    torch.testing.assert_close(got, want.sort(1, descending=True).values, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="unrefined"):
        _screened(graph, spec, 20, 0.25, unrefined="guess")


def test_a_screen_that_refines_every_patch_is_the_plain_graph(fitted):
    graph, spec, x, _ = fitted
    with torch.no_grad():
        want = graph(x)
        got = _screened(graph, spec, 20, 1.0)(x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_no_screen_where_it_would_hold_the_whole_bank(fitted):
    graph, spec, _, _ = fitted
    rows = graph.model.memory_bank.shape[0]
    assert _screened(graph, spec, rows, 0.25).screen == 0 and _screened(graph, spec, 20, 0.0).screen == 0
    assert PatchcoreGraph(graph.model, spec.height, graph.embedder, graph.k).screen == 0


@pytest.mark.parametrize("unrefined", ["bound", "scaled"])
def test_the_screened_graph_runs_in_openvino_as_in_torch(fitted, tmp_path, unrefined):
    """Exported and run at f32: the slices of the bank become constants of their own, the same numbers."""
    graph, spec, x, frames = fitted
    screened = _screened(graph, spec, 20, 0.25, unrefined)
    save_ir(convert(screened, spec), tmp_path)
    compiled = ov.Core().compile_model(str(tmp_path / "model.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    with torch.no_grad():
        want = screened(x)
    pad = screened.pad_extension().numpy()
    for i, frame in enumerate(frames):
        out = compiled({0: frame[np.newaxis], 1: pad})
        np.testing.assert_allclose(out[0], want[0][i : i + 1].numpy(), rtol=1e-4)
        np.testing.assert_allclose(out[1], want[1][i : i + 1].numpy(), atol=1e-3 * float(want[1].max()))
        np.testing.assert_allclose(out[4], want[4][i : i + 1].numpy(), rtol=1e-3, atol=1e-3)
