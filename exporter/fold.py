"""Fold a worker's bank extension into a new PatchCore bundle (issue 17): ``python -m exporter fold-extension``.

The worker's extension makes a false alarm normal without retraining, but it lives beside one worker and is
paid for on every frame (its rows are compiled in, used or not).  Folding writes a new, versioned bundle whose
memory bank is bank + extension rows, so the absorbed false alarms are permanent and portable, and the worker's
extension of the new bundle (keyed by its new weights) starts empty.

The bundle holds only the OpenVINO IR, not the torch graph, so the IR is edited: the memory-bank constant
[B, C] and every constant derived from B (the rows' squared norms and, where the image score is the re-weighted
one, the index bounds B, B - 1 and -B that split bank and extension rows and the support count
min(num_neighbors, B)) are replaced by those of concat(bank, rows); in a screened graph (``screen_rows``) the rows
past the screen, a constant of their own with their norms, gain the rows too.  A constant that depends on B but is
none of these is an error, never left stale.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import openvino as ov

from bundle import BundleError, Manifest, Thresholds, read_manifest, write_manifest
from bundle.extension import read_folder, weights_key
from exporter.export import library_versions, save_ir, timestamp
from exporter.staging import staged

_SQ_RTOL = 1e-4  # a bank-norm constant is recognised by its values: the IR stores them in f32


class FoldError(ValueError):
    """The bundle or extension cannot be folded; the message says why."""


def _constants(model: ov.Model) -> list[ov.Node]:
    return [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"]


def _users(node: ov.Node) -> list[tuple[str, int]]:
    return [(t.get_node().get_type_name(), t.get_index()) for t in node.output(0).get_target_inputs()]


def _replace(node: ov.Node, value: np.ndarray) -> None:
    """Put a constant holding ``value`` (same element type) where ``node`` was, under the same name."""
    new = ov.op.Constant(np.ascontiguousarray(value.astype(node.get_data().dtype)))
    new.set_friendly_name(node.get_friendly_name())
    node.output(0).replace(new.output(0))


def _has_norms(model: ov.Model, node: ov.Node) -> bool:
    """Whether some other constant holds the squared row norms of ``node`` (the bank's are compiled in beside it)."""
    sq = (node.get_data().astype(np.float64) ** 2).sum(1)
    return any(other.get_output_element_type(0) == ov.Type.f32 and other.get_data().size == sq.size
               and np.allclose(other.get_data().reshape(-1), sq, rtol=_SQ_RTOL)
               for other in _constants(model) if other is not node and other.get_data().size == sq.size)


def _find_bank(model: ov.Model, shape: list[int], uses: set[str]) -> ov.Node:
    """The memory bank: the one f32 [B, C] constant used by ``uses`` (multiplied for distances; with the re-weighted
    score also gathered from), and where the embedder's [C, C] matrix has that shape too, the one whose rows'
    squared norms are in the graph."""
    found = [node for node in _constants(model)
             if list(node.get_output_shape(0)) == shape and node.get_element_type() == ov.Type.f32
             and uses <= {kind for kind, _ in _users(node)}]
    if len(found) > 1:
        found = [node for node in found if _has_norms(model, node)]
    if len(found) != 1:
        raise FoldError(f"expected one memory-bank constant {shape} used by {' and '.join(sorted(uses))} in "
                        f"the IR, found {len(found)}: this graph is not the PatchCore export graph this tool knows")
    return found[0]


def fold_ir(model: ov.Model, bank_rows: int, rows: np.ndarray, num_neighbors: int | None,
            screen_rows: int = 0) -> tuple[int, int]:
    """Replace the bank of ``model`` (``bank_rows`` rows, in place) by concat(bank, rows); returns (B before, B after).

    ``num_neighbors``: the re-weighted image score's, or None for a graph whose score is the map's maximum (no
    row is gathered from the bank, no support is counted).  ``screen_rows``: the graph's screen (its training's
    ``screen_rows``, 0 for none), whose rows stay as they are while the folded rows join the rows past it.
    Raises :class:`FoldError` naming any constant that depends on the bank size but cannot be rebuilt.
    """
    feature_dim = int(rows.shape[1])
    reweighted = num_neighbors is not None
    bank_node = _find_bank(model, [bank_rows, feature_dim], {"MatMul", "Gather"} if reweighted else {"MatMul"})
    bank = bank_node.get_data().astype(np.float32)
    old, new = int(bank.shape[0]), int(bank.shape[0] + rows.shape[0])
    merged = np.concatenate([bank, rows.astype(np.float32)])
    old_sq = (bank.astype(np.float64) ** 2).sum(1)
    new_sq = (merged.astype(np.float64) ** 2).sum(1).astype(np.float32)
    # Index bounds of _union_rows: idx < B picks bank rows, min(idx, B - 1) and idx - B index the two parts.
    bounds = {"Less": (old, new), "Minimum": (old - 1, new - 1), "Add": (-old, -new)}
    replaced = {"bank norms": 0, **(dict.fromkeys(bounds, 0) if reweighted else {})}
    for node in _constants(model):
        if node.get_friendly_name() == bank_node.get_friendly_name():
            continue
        name, shape, data = node.get_friendly_name(), list(node.get_output_shape(0)), node.get_data()
        users = _users(node)
        # One float per bank row, added (as the norms are to the products with the bank): the norms, or a constant
        # this tool cannot rebuild.  Other constants may share a dimension with the bank (a blur matrix at
        # --max-bank 512 and 512 px, a kernel) and are not the bank's.
        if data.dtype.kind == "f" and old in shape and data.size == old and any(k == "Add" for k, _ in users):
            if not np.allclose(data.reshape(-1), old_sq, rtol=_SQ_RTOL):
                raise FoldError(f"IR constant {name!r} {shape} has the bank's {old} rows but is neither the bank nor "
                                "its rows' squared norms: cannot rebuild it for the folded bank")
            _replace(node, new_sq.reshape([new if d == old else d for d in shape]))
            replaced["bank norms"] += 1
        elif reweighted and data.dtype.kind in "iu" and data.size == 1 and len(users) == 1:
            kind, port = users[0]
            want = bounds.get(kind)
            if want is not None and port == 1 and int(data.reshape(-1)[0]) == want[0]:
                _replace(node, np.full(data.shape, want[1]))
                replaced[kind] += 1
    missing = [k for k, n in replaced.items() if n == 0]
    if missing or len({replaced.get(kind, 0) for kind in bounds}) != 1:
        raise FoldError(f"IR constants derived from the bank not found as expected ({replaced}; none of "
                        f"{', '.join(missing) or 'no kind'}): refusing to write a bundle that mixes old and new bank")
    if 0 < screen_rows < old:
        _fold_screened(model, bank[screen_rows:], rows.astype(np.float32))
    _replace(bank_node, merged)
    if num_neighbors is not None:
        _fold_support(model, min(num_neighbors, old), min(num_neighbors, new))
    model.validate_nodes_and_infer_types()
    return old, new


def _fold_screened(model: ov.Model, rest: np.ndarray, rows: np.ndarray) -> None:
    """A screened graph multiplies the rows past its screen as a constant of their own, beside their squared norms:
    both gain the folded rows, so the refined patches meet them (the screen itself stays the bank's first rows)."""
    rest_sq = (rest.astype(np.float64) ** 2).sum(1)
    consts = _constants(model)
    found = [n for n in consts if list(n.get_output_shape(0)) == list(rest.shape) and np.array_equal(n.get_data(), rest)]
    norms = [n for n in consts if n.get_data().dtype.kind == "f" and n.get_data().size == rest_sq.size
             and n.get_data().ndim > 1 and np.allclose(n.get_data().reshape(-1), rest_sq, rtol=_SQ_RTOL)]
    if len(found) != 1 or len(norms) != 1:
        raise FoldError(f"expected the bank's rows past the screen {list(rest.shape)} and their norms once each in the "
                        f"IR, found {len(found)} and {len(norms)}: refusing to write a bundle that mixes old and new bank")
    merged = np.concatenate([rest, rows])
    _replace(found[0], merged)
    shape = list(norms[0].get_output_shape(0))
    _replace(norms[0], (merged.astype(np.float64) ** 2).sum(1).astype(np.float32).reshape([*shape[:-1], len(merged)]))


def _fold_support(model: ov.Model, old_k: int, new_k: int) -> None:
    """The image score re-weights over the nearest ``min(num_neighbors, B)`` rows: a constant-k ascending TopK."""
    support = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "TopK" or op.get_attributes().get("mode") != "min":
            continue
        k = op.input_value(1).get_node()
        if k.get_type_name() == "Constant" and int(k.get_data().reshape(-1)[0]) == old_k:
            support.append(k)
    # argmin (k = 1) is a TopK too; with num_neighbors or B at 1 the two cannot be told apart, and need no change.
    if old_k == new_k:
        if not support:
            raise FoldError(f"no nearest-neighbour TopK with k = min(num_neighbors, B) = {old_k} in the IR: "
                            "cannot check the re-weighting's support count")
        return
    if old_k == 1:
        raise FoldError("a memory bank of one row: its support TopK (k = 1) cannot be told from the argmin's")
    if len(support) != 1:
        raise FoldError(f"expected one support TopK with k = {old_k} in the IR, found {len(support)}")
    _replace(support[0], np.full(support[0].get_data().shape, new_k))


def _check_folder_owner(folder: Path, source: Manifest) -> None:
    """The worker names a bundle's extension ``<name>-<weights key>`` (bundle.extension.folder_name): refuse another
    bundle's."""
    match = re.fullmatch(r".*-([0-9a-f]{16})", folder.name)
    if match and match.group(1) != weights_key(source):
        raise FoldError(f"{folder} is the extension of weights {match.group(1)}..., not of this bundle's "
                        f"({weights_key(source)}...)")


def _thresholds(t: Thresholds, note: str) -> Thresholds:
    return t.model_copy(update={"method": f"{note} Source method: {t.method}"})


def fold(bundle: Path, extension: Path, out: Path) -> Manifest:
    """Write ``out``: ``bundle`` with its memory bank extended by the rows of the worker's ``extension`` folder."""
    bundle, extension, out = Path(bundle), Path(extension), Path(out)
    source = read_manifest(bundle)
    if source.family != "patchcore":
        raise FoldError(f"{bundle} is a {source.family} bundle: only PatchCore has a memory bank to fold rows into")
    if source.extension is None:
        raise FoldError(f"{bundle} has no bank extension (exported before issue 17 or with --extension-candidates 0): "
                        "no worker can have absorbed rows for it")
    if source.precision != "FP32":
        raise FoldError(f"{bundle} has {source.precision} weights: folding keeps FP32 weights and is done on FP32 "
                        "bundles only (re-export, then quantise)")
    if out.exists() and any(out.iterdir()):
        raise FoldError(f"{out} exists and is not empty: choose a new folder for the folded bundle")
    # Bundles exported before the image score was a setting have the re-weighted one.
    num_neighbors = None
    if source.training.get("image_score", "reweighted") == "reweighted":
        num_neighbors = source.training.get("num_neighbors")
        if not isinstance(num_neighbors, int):
            raise FoldError(f"{bundle}: its manifest's training has no num_neighbors: cannot keep the support count")
    _check_folder_owner(extension, source)
    try:
        revision, entries, rows = read_folder(extension, source.extension.feature_dim)
    except ValueError as exc:
        raise FoldError(str(exc)) from exc
    if not len(rows):
        raise FoldError(f"{extension} holds no rows (revision {revision}): nothing to fold")

    model = ov.Core().read_model(bundle / "model.xml")
    old, new = fold_ir(model, int(source.training["memory_bank"]), rows, num_neighbors,
                       int(source.training.get("screen_rows", 0)) if source.training.get("refine", 0) else 0)

    version = timestamp().replace(":", "").replace("-", "")
    record = {
        "folded_at": timestamp(),
        "source_version": source.version,
        "source_model_bin_sha256": source.files["model.bin"],  # verified by read_manifest
        "extension_folder": extension.name,
        "extension_revision": revision,
        "extension_rows": len(rows),
        "extension_labels": len(entries),
        "bank_before": old,
        "bank_after": new,
        "openvino": library_versions().get("openvino", ""),
        "source_metrics": "not carried over: the folded graph was not re-evaluated (see the source bundle)",
    }
    note = (f"Copied from {source.name}@{source.version}, whose memory bank this bundle extends by {len(rows)} "
            f"extension rows (fold of revision {revision}): a larger bank can only lower distances, so these "
            "thresholds are conservative (no more false alarms than the source with that extension, up to the "
            "re-weighted score's fraction of a percent; re-export to re-measure).")
    fields = source.model_dump(exclude={"files"})
    fields.update(
        version=version,
        created_at=timestamp(),
        thresholds=_thresholds(source.thresholds, note),
        precisions={p: r.model_copy(update={"thresholds": _thresholds(r.thresholds, note), "metrics": {}})
                    for p, r in source.precisions.items()},
        metrics={},
        training={**source.training, "memory_bank": new, "folds": [*source.training.get("folds", []), record]},
    )
    # Built beside ``out`` and renamed into place whole (exporter/staging.py): a full disk or a Ctrl-C left a
    # truncated model.bin there, which the next fold and train then refused as a folder not empty.
    with staged(out.resolve(), then=None) as staging:
        save_ir(model, staging)
        try:
            return write_manifest(staging, fields)
        except BundleError as exc:
            raise FoldError(str(exc)) from exc
