"""The benchmark report: Markdown + JSON + plots (ROC curves; test images with heatmaps and ground-truth outlines)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from urllib.parse import quote

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve

from exporter.export import library_versions, timestamp

TARGETS = {"image_auroc": 0.995, "pixel_auroc": 0.985}
THUMB = 128  # px per tile in the heatmap grids: keeps the committed images small


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def roc_plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4, 4))
    for r in rows:
        name = f"{r['model']} / {r['category']}"
        if len(np.unique(r["_labels"])) < 2:  # no curve: sklearn's UndefinedMetricWarning reached stderr instead
            ax.plot([], [], " ", label=f"{name} (AUROC undefined: one class in its test split)")
            continue
        fpr, tpr, _ = roc_curve(r["_labels"], r["_scores"])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {r['image_auroc']:.4f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Image-level ROC (OpenVINO bundle)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _tile(image: np.ndarray, amap: np.ndarray, mask: np.ndarray, pixel: tuple[float, float]) -> np.ndarray:
    """RGB thumbnail: the map scaled so the bundle's pixel threshold is full red, over the image; mask in green."""
    low, thr = pixel
    heat = np.clip((amap - low) / max(thr - low, 1e-12), 0, 1)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blend = cv2.addWeighted(image, 0.55, colour, 0.45, 0)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(blend, contours, -1, (0, 255, 0), 2)
    return cv2.cvtColor(cv2.resize(blend, (THUMB, THUMB), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def heatmap_grid(rows: list[dict], path: Path) -> None:
    """One row per model, one column per defect type (its first test image) of a category."""
    defects = list(rows[0]["_firsts"])
    fig, axes = plt.subplots(len(rows), len(defects), figsize=(1.3 * len(defects), 1.45 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        for j, defect in enumerate(defects):
            ax = axes[i, j]
            first = r["_firsts"][defect]
            ax.imshow(_tile(first.image, first.anomaly_map, first.mask, r["_pixel"]))
            verdict = "NG" if first.score >= r["threshold"] else "OK"
            ax.set_title(f"{defects[j]}\n{verdict}", fontsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(r["model"], fontsize=7)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mark(value: float | None, target: float) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f} {'✓' if value >= target else '✗'}"


def _recorded(rows: list[dict], key: str) -> str:
    """The rows' own ``key`` (their test metrics record the CPU and precision that measured them), never a default."""
    return ", ".join(sorted({str(r.get(key, f"an unrecorded {key}")) for r in rows}))


def markdown(rows: list[dict], absent: list[str], plots: list[str], failed: list[dict], command: str) -> str:
    lines = [
        "# Detection quality benchmark",
        "",
        f"Generated {timestamp()} by `{command}` on {platform.machine()} with "
        f"{os.cpu_count()} CPU cores, no GPU. Every metric is measured by running the exported OpenVINO bundle "
        f"({_recorded(rows, 'precision')} inference precision, on {_recorded(rows, 'device')}) on the test split; "
        "the image threshold comes "
        "from held-out normal training images only.",
        f"Targets: image AUROC >= {TARGETS['image_auroc']}, pixel AUROC >= {TARGETS['pixel_auroc']} (✓ met, ✗ missed).",
        "",
        "| Model | Category | Image AUROC | Pixel AUROC | AUPRO (FPR <= 0.3) | Image F1 @ bundle threshold "
        "| Seed tutorial image AUROC | Train + export + eval (s) | Bundle (MB) "
        "| OV vs torch: max rel. score diff, same verdicts |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["parity"]
        seed = f"{r['seed_image_auroc']:.3f}" if r["seed_image_auroc"] is not None else "n/a"
        aupro = f"{r['aupro']:.4f}" if r.get("aupro") is not None else "n/a"
        f1 = f"{r['image_f1']:.4f}" if r.get("image_f1") is not None else "n/a"
        lines.append(
            f"| {r['model']} | {r['category']} | {_mark(r.get('image_auroc'), TARGETS['image_auroc'])} "
            f"| {_mark(r.get('pixel_auroc'), TARGETS['pixel_auroc'])} "
            f"| {aupro} | {f1} | {seed} "
            f"| {r['train_s']:.0f} | {r['bundle_bytes'] / 1e6:.1f} "
            f"| {p['max_relative_score_difference']:.1e} (tol {p['score_rtol']:g}), {'yes' if p['same_verdicts'] else 'NO'} |"
        )
    types = list(dict.fromkeys(t for r in rows for t in r["detection_rate"]))
    lines += ["", "Detection rate per defect type at the bundle's threshold (for `good`: false-alarm rate):", "",
              "| Model | Category | " + " | ".join(types) + " |", "|---|---|" + "---|" * len(types)]
    for r in rows:
        rates = [f"{r['detection_rate'][t]:.3f}" if t in r["detection_rate"] else "" for t in types]
        lines.append(f"| {r['model']} | {r['category']} | " + " | ".join(rates) + " |")
    others = [(r, p, m) for r in rows for p, m in r.get("other_precisions", {}).items() if m]
    if others:
        lines += ["", "Other inference precisions this CPU runs natively, each with thresholds measured at it "
                      "(worker: `model.precision`):", "",
                  "| Model | Category | Precision | Image AUROC | Pixel AUROC | AUPRO | Image F1 | good flagged |",
                  "|---|---|---|---|---|---|---|---|"]
        for r, p, m in others:
            figures = [m.get("image_auroc"), m.get("pixel_auroc"), m.get("aupro"), m.get("image_f1"),
                       m["detection_rate"].get("good")]
            lines.append(f"| {r['model']} | {r['category']} | {p} | "
                         + " | ".join("n/a" if f is None else str(f) for f in figures) + " |")
    copied = [r for r in rows if r.get("trained_test_images")]
    if copied:
        lines += ["", "Warning, test images that are byte for byte training images (fitted or held out), so the figures "
                      "above overstate the model: " + ", ".join(f"{r['model']} / {r['category']} {r['trained_test_images']} "
                                                               f"of {r['images']}" for r in copied) + "."]
    lines += ["", "Training settings (from each bundle's manifest):", ""]
    for r in rows:
        t = r["training"]
        keys = ["backbone", "layers", "input_size", "coreset_ratio", "memory_bank", "blur_sigma", "model_size", "steps", "step_s",
                "teacher_steps", "teacher_file", "fit_s", "total_s"]
        lines.append(f"- {r['model']} / {r['category']}: " + ", ".join(f"{k}={t[k]}" for k in keys if k in t))
    lines += [
        "",
        f"Categories absent under the data root (not benchmarked): {', '.join(absent) if absent else 'none'}.",
        *([""] if failed else []),
        *[f"Not benchmarked, its data unusable: {f['model']} / {f['category']}: {f['error']}" for f in failed],
        "",
        *[f"![{p}]({quote(p)})" for p in plots],  # a category's name may hold a space: a bare one broke the link
        "",
        "Heatmap tiles: anomaly map scaled so the bundle's pixel threshold is full red, ground-truth defect outline "
        "in green, verdict at the bundle's image threshold above each tile.",
        "",
        f"Library versions: {json.dumps(library_versions())}",
        "",
    ]
    return "\n".join(lines)


def check_report_folder(out: Path) -> None:
    """Refuse ``out`` before any fit where the report would be written over files of the user's: a report.json,
    report.md, roc.png or heatmaps-*.png there that no earlier benchmark wrote.  An earlier benchmark's report (its
    report.json holds rows) is replaced, as a run again is expected to; other files are left alone."""
    try:
        if isinstance(json.loads((out / "report.json").read_text()).get("rows"), list):
            return
    except (OSError, ValueError, AttributeError):  # none there, a folder, not JSON, not an object
        pass
    ours = [out / "report.json", out / "report.md", out / "roc.png", *sorted(out.glob("heatmaps-*.png"))]
    if clash := [p.name for p in ours if p.exists()]:
        raise ValueError(f"--out {out} holds {', '.join(clash)}, not an earlier benchmark's report: the report would "
                         "be written over them; choose another folder")


def heatmap_plot(category: str) -> str:
    """``heatmaps-CATEGORY.png``; a category named by its path below the data (``--categories line1/parts``) has its
    separators made ``-`` and a hash of its name added: the slash made the name a folder the report's lacked, and the
    run ended at its report with every fit done and nothing written.  The hash keeps ``line1-parts`` its own name."""
    if "/" not in category and os.sep not in category:
        return f"heatmaps-{category}.png"
    flat = category.replace(os.sep, "-").replace("/", "-")
    return f"heatmaps-{flat}-{hashlib.sha1(category.encode()).hexdigest()[:8]}.png"


def write_report(rows: list[dict], out: Path, data: Path, absent: list[str], failed: list[dict], command: str) -> Path:
    """report.md, report.json, roc.png and heatmaps-CATEGORY.png in ``out``; returns report.md.  ``failed``: the
    model/category pairs whose data could not be used, each with its ``error``; ``command``: the command line that
    ran, every option it was given (settings change every figure)."""
    out.mkdir(parents=True, exist_ok=True)
    plots = ["roc.png"]
    roc_plot(rows, out / "roc.png")
    for category in dict.fromkeys(r["category"] for r in rows):
        name = heatmap_plot(category)
        heatmap_grid([r for r in rows if r["category"] == category], out / name)
        plots.append(name)
    (out / "report.json").write_text(json.dumps({
        "data": str(data), "command": command, "absent_categories": absent, "failed": failed, "targets": TARGETS,
        "rows": [_public(r) for r in rows],
    }, indent=2, default=str) + "\n")
    path = out / "report.md"
    path.write_text(markdown(rows, absent, plots, failed, command))
    return path
