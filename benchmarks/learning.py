"""Learns on the line: a benign appearance the bundle has never seen stops being flagged once an operator marks
a few frames of it as false alarms (the goal: 3), and real defects stay caught.

    python -m benchmarks.learning BUNDLE --data ../shared/data/mvtec --category grid --split validation \\
        --margins 1.0 --views frame,flips,d4 --labels 3 --trials 5
    python -m benchmarks.learning BUNDLE --data ../shared/data/mvtec --category grid --split test --margins 1.0 --views d4
    python -m benchmarks.learning BUNDLE --data ../shared/data/mvtec --category grid --split test --confirmed 3
    python -m benchmarks.learning BUNDLE --data ../shared/data/mvtec --category grid --worker-timing 5

BUNDLE is a PatchCore bundle with a bank extension (``exporter train`` since issue 17).  The benign
appearances are drawn on the category's held-out normal images (the ones ``exporter train`` keeps out of
the bank to set thresholds, so the bank has never seen them):

* ``mark``: a small dark ink dot with a soft edge (an allowed marking);
* ``glare``: a soft, strong local brightening (a new reflection).

For each appearance, margin, set of views (``learning.views``) and number of labels n in ``--labels``,
``--trials`` times: the images are shuffled, the operator goes through them and labels each one the bundle
still flags until n are labelled, exactly as the worker absorbs a label (``bundle.extension.offending`` on
the graph's candidates for each view of the frame, added to an :class:`~bundle.extension.Extension`, one
label after the other; a label the full extension cuts short is counted), and the other marked images are scored
again.  Guard: image AUROC, the detection rate at the bundle's threshold and the mean share by which
the scores fell, of every defect type, before and after, and how many defects each order no longer catches,
on ``--split``: ``validation`` (synthetic anomalies of each of
``--guard-kinds`` on the same held-out normals, exporter/validation.py; by default all five, the subtle
``deform`` and ``stain`` included) to choose the margin, ``test`` (the category's test split) to report it
once.  ``--confirmed K`` draws K images of each defect type out of the guard as the operator's confirmed defects
(``learning.guard_defects``) and runs each setting twice on the rest, without and with them guarding the
absorptions; ``--guard-patches 0,16`` runs the guarded setting once per number of decisive patches each confirmed
defect protects (``learning.guard_patches``, the farthest first; 0 all).  Everything runs at f32, set explicitly.

``--worker-timing N`` instead runs the worker behind a real mosquitto: a marked frame is streamed at
``--stream-rate`` frames/s (20; keep it under what the worker serves, or its backlog never drains), labelled
over MQTT, and the time from the label request to the first result scored with the
new extension revision (the frame's own patches) and to the label's answer (every view absorbed) is measured
N times (N different frames).  With ``--restart-confirmed M``, M frames of the category's real defects (its test
split, sent again under new frame ids past its size) are labelled ``confirmed_defect`` first and the worker is
restarted before the labels are timed: the first label then needs the guards of all M (``learning.guard_defects``).
``--without-guards`` deletes the guards kept on disk before that restart (as a new bundle finds none) and waits
until the idle worker has scored all M again, timing that.
A label whose every patch lies near a confirmed defect absorbs nothing; its answer time is reported apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks.common import DATA, fmt, md_table, summary
from bundle import prepare_image, read_manifest
from bundle.extension import Extension, Views, absorb, decisive_patches
from bundle.runtime import CompiledBundle

log = logging.getLogger("benchmarks.learning")
APPEARANCES = ("mark", "glare")
# The validation guard: the blatant kinds and the subtle ones in the texture's own material (exporter/validation.py);
# a benign mark looks more like a stain or a deformed wire than like a pasted photo.
GUARD_KINDS = ("perlin", "cutpaste", "scratch", "deform", "stain")


def benign(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """``image`` with one benign appearance of ``kind`` at a random place (the same look every time)."""
    h, w = image.shape[:2]
    side = min(h, w)
    y, x = (rng.uniform(0.15, 0.85, 2) * (h, w)).astype(int)
    out = image.astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    if kind == "mark":
        radius = 0.025 * side
        weight = np.clip(radius + 1.5 - np.hypot(yy - y, xx - x), 0, 1.5) / 1.5  # a dot with a soft rim
        ink = np.array([90, 40, 30], np.float32)  # dark blue, BGR
        out = out * (1 - weight[..., None]) + ink * weight[..., None]
    elif kind == "glare":
        sigma = 0.06 * side
        out = out + 120 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))[..., None]
    else:
        raise ValueError(f"unknown appearance {kind!r}; choose from {APPEARANCES}")
    return np.clip(out, 0, 255).astype(np.uint8)


def held_out_normals(data: Path, category: str, bundle: Path) -> list[np.ndarray]:
    """The normals ``bundle`` was not fitted on: the split ``exporter train`` made, with the seed its manifest records
    (as benchmarks.thresholds reads it)."""
    from exporter.build import VAL_FRACTION
    from exporter.data import load_category

    seed = int(read_manifest(bundle, verify=False).training.get("seed", 0))
    _, val = load_category(data, category).split_train(VAL_FRACTION, seed)
    return [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in val]


def guard_set(data: Path, category: str, split: str, normals: list[np.ndarray],
              kinds: tuple[str, ...] = GUARD_KINDS) -> tuple[list[np.ndarray], list[str]]:
    """(images, types: 'good' or a defect type) the absorption must not blind the bundle on; on the validation
    split, one synthetic anomaly of each of ``kinds`` per held-out normal."""
    if split == "test":
        from exporter.data import load_category

        samples = load_category(data, category).test
        return [cv2.imread(str(s.path), cv2.IMREAD_COLOR) for s in samples], [s.defect for s in samples]
    from exporter.validation import natural_photos, synthesise

    bad = synthesise(normals, seed=1, photos=natural_photos(data.parent / "natural" / "imagenet-sample"), kinds=kinds)
    return [*normals, *(a.image for a in bad)], ["good"] * len(normals) + [a.kind for a in bad]


class Scorer:
    """The bundle at f32 with room for the extension, scoring images as the worker does."""

    def __init__(self, bundle: Path, rows: int) -> None:
        self.compiled = CompiledBundle(bundle, batch=1, precision="f32", hint="LATENCY", extension_rows=rows)
        if self.compiled.extension_spec is None:
            raise SystemExit(f"{bundle}: no bank extension input; re-export it with this version's exporter")
        self.spec = self.compiled.manifest.input
        self.threshold = self.compiled.thresholds.image.threshold
        self.request = self.compiled.create_request()

    def predict(self, image: np.ndarray):
        return self.compiled.infer(prepare_image(image, self.spec)[np.newaxis], self.request)

    def absorb(self, ext: Extension, key: str, image: np.ndarray, margin: float, views: Views,
               protected: list[tuple[np.ndarray, np.ndarray]]) -> bool:
        """Absorb a label of ``image`` as the worker does (one tile; bundle.extension.absorb); False where the full
        extension cut it short (its views' rows dropped, or nothing absorbed)."""
        done = absorb(self.compiled, self.request, ext, key, [prepare_image(image, self.spec)], views, self.threshold,
                      margin, protected, lambda e: self.compiled.set_extension(e.rows), key, "bench")
        return not done.full

    def scores(self, images: list[np.ndarray]) -> np.ndarray:
        return np.array([float(self.predict(i).score[0]) for i in images])


def guard_figures(scores: np.ndarray, types: list[str], threshold: float) -> dict:
    labels = np.array([t != "good" for t in types])
    out = {"image_auroc": float(roc_auc_score(labels, scores)),
           "good_flagged": int((scores[~labels] >= threshold).sum())}
    for kind in sorted(set(types) - {"good"}):
        picked = np.array([t == kind for t in types])
        out[f"caught {kind}"] = float((scores[picked] >= threshold).mean())
    return out


def score_drops(before: np.ndarray, after: np.ndarray, types: list[str]) -> dict[str, float]:
    """Per defect type, the mean share by which its images' scores fell: the guard's harm below the threshold too
    (a defect far above it can lose much of its score and still be caught, on the test split it may not)."""
    kinds = np.array(types)
    return {kind: float(np.mean(1 - after[kinds == kind] / before[kinds == kind])) for kind in sorted(set(types) - {"good"})}


def scenario(scorer: Scorer, marked: list[np.ndarray], guard: tuple[list[np.ndarray], list[str]], margin: float,
             views: Views, labels: list[int], trials: int, guard_scores: np.ndarray, folder: Path,
             protected: list[tuple[np.ndarray, np.ndarray]]) -> dict[int, dict]:
    """Per number of labels in ``labels``: the other marked images' pass rate, rows and the guard's change
    (``guard_scores``: the guard's scores before any label; ``protected``: the confirmed defects' anomalous patches,
    which no label may bring a row nearer to).

    The operator goes through the marked images in a random order (one per trial) and labels each one the
    bundle, with what it has absorbed so far, still flags, until it has labelled n of them; each label adds the
    offending patches of the ``views`` of its frame, as the worker does."""

    spec = scorer.compiled.extension_spec
    assert spec is not None
    guard_before = guard_figures(guard_scores, guard[1], scorer.threshold)
    found: dict[int, dict[str, list]] = {n: {"passes": [], "rows": [], "deltas": [], "worst": [], "drops": [], "cut": [],
                                             "lost": []} for n in labels}
    defects = np.array([t != "good" for t in guard[1]])
    caught_before = defects & (guard_scores >= scorer.threshold)
    cut = [0] * trials  # labels the full extension cut short (views dropped, or nothing absorbed), per trial
    for trial in range(trials):
        order = list(range(len(marked)))
        random.Random(trial).shuffle(order)
        ext = Extension(folder / f"m{margin}-t{trial}-{uuid.uuid4().hex[:6]}", spec.feature_dim, scorer.compiled.extension_capacity)
        scorer.compiled.set_extension(ext.rows)
        chosen: list[int] = []
        walk = iter(order)
        for n in sorted(labels):
            while len(chosen) < n and (i := next(walk, None)) is not None:
                pred = scorer.predict(marked[i])
                if float(pred.score[0]) < scorer.threshold:
                    continue  # passes already: nothing to label
                if not scorer.absorb(ext, str(uuid.uuid4()), marked[i], margin, views, protected):
                    cut[trial] += 1
                chosen.append(i)
            rest = [marked[i] for i in range(len(marked)) if i not in chosen]
            now = scorer.scores(guard[0])
            after = guard_figures(now, guard[1], scorer.threshold)
            row = found[n]
            row["drops"].append(score_drops(guard_scores, now, guard[1]))
            row["passes"].append(float((scorer.scores(rest) < scorer.threshold).mean()))
            row["rows"].append(len(ext.rows))
            row["cut"].append(cut[trial])
            row["deltas"].append(after["image_auroc"] - guard_before["image_auroc"])
            row["lost"].append(int((caught_before & (now < scorer.threshold)).sum()))
            row["worst"].append({k: v - guard_before[k] for k, v in after.items() if k.startswith("caught") or k == "good_flagged"})
        scorer.compiled.set_extension(np.zeros((0, spec.feature_dim), np.float32))
    out = {}
    for n, row in found.items():
        worst = {k: min(w[k] for w in row["worst"]) if k.startswith("caught") else max(w[k] for w in row["worst"])
                 for k in row["worst"][0]}
        drops = {k: (statistics.median(d[k] for d in row["drops"]), max(d[k] for d in row["drops"])) for k in row["drops"][0]}
        out[n] = {"pass_after": summary(row["passes"]), "rows": summary(row["rows"]),
                  "auroc_delta": summary(row["deltas"]), "worst": worst, "drops": drops, "cut": sum(row["cut"]),
                  "lost": row["lost"]}
    return out


def confirm(scorer: Scorer, guard: tuple[list[np.ndarray], list[str]], per_type: int, protects: list[int]
            ) -> tuple[tuple[list[np.ndarray], list[str]], dict[int, list[tuple[np.ndarray, np.ndarray]]]]:
    """The operator's confirmed defects: ``per_type`` images of each defect type drawn from the guard (seeded),
    taken out of it (they are not measured) and turned into the anomalous patches an absorption must not come
    nearer to, scored once by the bank alone as the worker scores them (learning.guard_defects), for each number of
    decisive patches in ``protects`` (learning.guard_patches, 0 all)."""
    images, types = guard
    rng = random.Random(11)
    chosen = {i for kind in sorted(set(types) - {"good"})
              for i in rng.sample([j for j, t in enumerate(types) if t == kind], per_type)}
    preds = [scorer.predict(images[i]) for i in sorted(chosen)]
    protected = {n: [decisive_patches(p.candidates[0], p.candidate_scores[0], float(p.score[0]), scorer.threshold, n)
                     for p in preds] for n in protects}
    keep = [i for i in range(len(images)) if i not in chosen]
    return ([images[i] for i in keep], [types[i] for i in keep]), protected


def quality(args: argparse.Namespace) -> None:
    normals = held_out_normals(args.data, args.category, args.bundle)
    guard = guard_set(args.data, args.category, args.split, normals, args.guard_kinds)
    scorer = Scorer(args.bundle, args.rows)
    guard, guards = confirm(scorer, guard, args.confirmed, args.guard_patches)
    confirmed = len(guards[args.guard_patches[0]])
    guard_scores = scorer.scores(guard[0])
    guard_before = guard_figures(guard_scores, guard[1], scorer.threshold)
    what = f"guard split {args.split}" + (f" ({', '.join(args.guard_kinds)})" if args.split == "validation" else "")
    print(f"# Learns on the line: {args.bundle} on {args.category}, {what}\n")
    print(f"CPU: {scorer.compiled.device_name}; precision {scorer.compiled.precision} (read back); extension capacity "
          f"{args.rows} rows; {len(normals)} held-out normals; {args.trials} trials (orders); {confirmed} confirmed "
          f"defects ({args.confirmed} of each type, out of the guard set), each setting run without and with them "
          "guarding the absorptions (the guard column).\n")
    print("Guard before absorption: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in guard_before.items()) + "\n")
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in APPEARANCES:
            rng = np.random.default_rng(7)
            marked = [benign(image, kind, rng) for image in normals]
            flagged = float((scorer.scores(marked) >= scorer.threshold).mean())
            for margin in args.margins:
                guardings = [("none", [])] + [("confirmed" + (f", top {n}" if n else ""), guards[n])
                                              for n in args.guard_patches if confirmed]
                for views, (guarding, guarded) in ((v, g) for v in args.views for g in guardings):
                    for n, r in scenario(scorer, marked, guard, margin, views, args.labels, args.trials, guard_scores,
                                         Path(tmp), guarded).items():
                        worst = ", ".join(f"{k} {v:+.3f}" if isinstance(v, float) else f"{k} {v:+d}"
                                          for k, v in r["worst"].items())
                        drops = ", ".join(f"{k} {100 * m:.1f} ({100 * w:.1f})" for k, (m, w) in r["drops"].items())
                        rows_out.append([kind, f"{margin:g}", views.value, guarding,
                                         f"{flagged:.2f}", str(n), fmt(r["pass_after"], 2),
                                         fmt(r["rows"], 0), str(r["cut"]), fmt(r["auroc_delta"], 4), worst, drops,
                                         ", ".join(map(str, r["lost"]))])
                        log.info("%s", " | ".join(rows_out[-1]))
    print(md_table(["appearance", "margin", "views", "guard", "flagged before", "labels", "other marked pass after, median [range]",
                    "extension rows", "labels cut short by a full extension (all trials)",
                    "guard image AUROC change", "guard worst change per type (over trials)",
                    "guard score drop per type, %: median (worst) over trials",
                    "defects no longer caught, per order"], rows_out))


def worker_timing(args: argparse.Namespace) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from benchmarks.throughput import WorkerRig

    normals = held_out_normals(args.data, args.category, args.bundle)
    rng = np.random.default_rng(7)
    marked = [cv2.imencode(".jpg", benign(image, "mark", rng), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
              for image in normals]
    folder = Path(tempfile.mkdtemp(prefix="learning-"))
    rig = WorkerRig(args.bundle, folder)
    results: dict[str, dict] = {}
    answers: dict[bytes, dict] = {}
    cond = threading.Condition()
    original = rig.client.on_message

    def on_message(client, userdata, msg) -> None:
        original(client, userdata, msg)
        with cond:
            if msg.topic.endswith("/result"):
                body = json.loads(msg.payload)
                results[body["frame_id"]] = {**body, "arrived": time.perf_counter()}
            elif msg.topic.startswith("bench-answers/"):
                answers[msg.properties.CorrelationData] = {**json.loads(msg.payload), "arrived": time.perf_counter()}
            cond.notify_all()

    rig.client.on_message = on_message
    rig.client.subscribe("bench-answers/#", qos=1)

    def wait(predicate, timeout: float = 60):
        deadline = time.monotonic() + timeout
        with cond:
            while (found := predicate()) is None:
                if not cond.wait(max(0.0, deadline - time.monotonic())):
                    raise RuntimeError("timed out waiting for the worker")
            return found

    def ask(topic: str, body: dict) -> tuple[float, bytes]:
        token = uuid.uuid4().hex.encode()
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = "bench-answers/x", token
        sent = time.perf_counter()
        rig.client.publish(topic, json.dumps(body), qos=1, properties=props)
        return sent, token

    def stored(frame_id: str) -> None:
        """Until the recorder has written the frame (the operator labels what the history shows)."""
        for _ in range(100):
            _, token = ask("inspect/query", {"frame_id": frame_id, "camera": "bench", "top_k": 1})
            if wait(lambda token=token: answers.get(token))["ok"]:
                return
            with cond:
                cond.wait(0.1)
        raise RuntimeError(f"{frame_id} never reached the store")

    from benchmarks.common import publish_frame

    def confirm_defects(m: int) -> None:
        """Label ``m`` flagged frames of real defects ``confirmed_defect`` (their answers waited for)."""
        from exporter.data import load_category

        defects = [cv2.imencode(".jpg", cv2.imread(str(s.path), cv2.IMREAD_COLOR), [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
                   .tobytes() for s in load_category(args.data, args.category).test if s.defect != "good"]
        done, sent = 0, 0
        while done < m:
            if sent >= 3 * m + len(defects):
                raise RuntimeError(f"only {done} of {m} defect frames were flagged")
            fid = f"defect-{sent}"
            publish_frame(rig.client, "inspect/bench/frame", defects[sent % len(defects)], fid)
            sent += 1
            if wait(lambda fid=fid: results.get(fid))["verdict"] != "anomalous":
                continue
            stored(fid)
            _, token = ask("inspect/label", {"action": "set", "frame_id": fid, "camera": "bench", "label": "confirmed_defect"})
            if not wait(lambda token=token: answers.get(token))["ok"]:
                raise RuntimeError(f"labelling {fid} failed: {answers[token]}")
            done += 1
        log.info("%d defect frames confirmed (%d sent); restarting the worker", done, sent)

    delays, answered, revisions, verdicts, nothing = [], [], [], [], []
    try:
        if args.restart_confirmed:
            confirm_defects(args.restart_confirmed)
            kept = rig.folder / "extensions"

            def drop_guards() -> None:
                for path in kept.glob("*/guards/*"):
                    path.unlink()

            rig.restart(drop_guards if args.without_guards else None)
            if args.without_guards:
                while (n_kept := len(list(kept.glob("*/guards/*.npz")))) < args.restart_confirmed:
                    if time.perf_counter() - rig.spawned > 600:
                        raise RuntimeError(f"the idle worker scored only {n_kept} of {args.restart_confirmed} guards in 600 s")
                    time.sleep(0.2)  # a benchmark's poll of the worker's files, not a test's synchronisation
                warmed = time.perf_counter() - rig.spawned - rig.online_s
                log.info("the idle worker scored %d guards in %.1f s after coming online", n_kept, warmed)
        used = 0
        n = 0  # labels sent; a label whose every patch lies near a confirmed defect absorbs nothing and is not timed
        while len(delays) < args.worker_timing:
            # find a flagged marked frame the extension has not absorbed yet
            probe = None
            while used < 3 * len(marked):
                fid = f"probe-{used}"
                publish_frame(rig.client, "inspect/bench/frame", marked[used % len(marked)], fid)
                found = wait(lambda fid=fid: results.get(fid))
                used += 1
                if found["verdict"] == "anomalous":
                    probe = found
                    break
            if probe is None:
                if not delays:
                    raise RuntimeError("no marked frame is flagged any more: nothing left to label")
                log.warning("no marked frame is flagged any more: %d labels timed of %d", len(delays), args.worker_timing)
                break
            data = marked[(used - 1) % len(marked)]
            stop = threading.Event()

            def stream(data: bytes = data, n: int = n, stop: threading.Event = stop) -> None:
                i = 0
                while not stop.wait(1 / args.stream_rate):
                    publish_frame(rig.client, "inspect/bench/frame", data, f"s{n}-{i}")
                    i += 1

            streamer = threading.Thread(target=stream, daemon=True)
            streamer.start()
            revision = probe["model"].get("extension", {}).get("revision", 0)
            stored(probe["frame_id"])
            sent, token = ask("inspect/label", {"action": "set", "frame_id": probe["frame_id"], "camera": "bench",
                                                "label": "false_alarm"})

            def outcome(n: int = n, revision: int = revision, sent: float = sent, token: bytes = token) -> dict | None:
                """The first result scored with the label's rows, or the answer of a label that absorbed nothing."""
                answer = answers.get(token)
                if answer is not None and not (answer.get("absorbed") or {}).get("patches"):
                    return answer
                return next((r for f, r in sorted(results.items(), key=lambda kv: kv[1]["arrived"])
                             if f.startswith(f"s{n}-") and r["arrived"] > sent
                             and r["model"].get("extension", {}).get("revision", 0) > revision), None)

            first = wait(outcome, 600)
            n += 1
            stop.set()
            streamer.join()
            answer = wait(lambda token=token: answers.get(token), 600)
            if "verdict" not in first:
                nothing.append(answer["arrived"] - sent)
                log.info("label %d absorbed nothing after %.3f s: %s", n - 1, nothing[-1], answer.get("absorbed"))
                continue
            delays.append(first["arrived"] - sent)
            answered.append(answer["arrived"] - sent)
            revisions.append(first["model"]["extension"]["revision"])
            verdicts.append(first["verdict"])
            log.info("label %d: %s; first frame with the extension after %.3f s: %s", n - 1, answer.get("absorbed"),
                     delays[-1], first["verdict"])
    finally:
        rig.close()
        shutil.rmtree(folder, ignore_errors=True)
    after = f", after {args.restart_confirmed} confirmed defects and a restart" if args.restart_confirmed else ""
    print(f"Label request -> first result scored with the new extension ({len(delays)} labels{after}, "
          f"{args.stream_rate:g} frames/s streamed, "
          f"worker at f32 behind mosquitto): first label {delays[0]:.3f} s; median {statistics.median(delays):.3f} s, range "
          f"[{min(delays):.3f}-{max(delays):.3f}] s; verdicts of those frames: {verdicts}.\n"
          f"Label request -> its answer (every view of the frame absorbed, learning.views): median "
          f"{statistics.median(answered):.3f} s, range [{min(answered):.3f}-{max(answered):.3f}] s; first label {answered[0]:.3f} s.\n"
          f"Labels that absorbed nothing (every patch near a confirmed defect): {len(nothing)}, answered after "
          f"{', '.join(f'{t:.3f}' for t in nothing) or '-'} s.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--category", default="grid")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--guard-kinds", type=lambda s: tuple(s.split(",")), default=GUARD_KINDS,
                        help="synthetic anomaly kinds of the validation guard (runs before 2026-12-01: perlin,cutpaste,scratch)")
    parser.add_argument("--margins", type=lambda s: [float(v) for v in s.split(",")], default=[1.0])
    parser.add_argument("--views", type=lambda s: [Views(v) for v in s.split(",")], default=[Views.D4],
                        help="views of a labelled frame to absorb (learning.views), comma-separated: frame, flips, d4")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--labels", type=lambda s: [int(v) for v in s.split(",")], default=[3],
                        help="numbers of labelled frames to report (the goal is stated for 3)")
    parser.add_argument("--rows", type=int, default=1024, help="extension capacity (the worker's learning.max_rows)")
    parser.add_argument("--confirmed", type=int, default=0,
                        help="defects of each type the operator has confirmed (learning.guard_defects): drawn from the "
                             "guard, they guard every absorption and are not measured")
    parser.add_argument("--guard-patches", type=lambda s: [int(v) for v in s.split(",")], default=[0],
                        help="with --confirmed: how many decisive patches of each confirmed defect guard (the farthest "
                             "first; 0 all), comma-separated: each is run")
    parser.add_argument("--worker-timing", type=int, default=0, help="measure label -> first frame through the worker")
    parser.add_argument("--without-guards", action="store_true",
                        help="with --restart-confirmed: delete the guards on disk before the restart, time their scoring")
    parser.add_argument("--stream-rate", type=float, default=20.0, help="with --worker-timing: frames/s streamed")
    parser.add_argument("--restart-confirmed", type=int, default=0,
                        help="with --worker-timing: confirm this many real defect frames and restart the worker first")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.worker_timing:
        worker_timing(args)
    else:
        quality(args)


if __name__ == "__main__":
    main()
