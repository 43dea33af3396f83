"""Learning on the line: a frame an operator labels ``false_alarm`` is absorbed into its bundle's bank extension.

The label request (worker/labels.py, on the request thread) hands the frame here.  The
frame's original image is in the evidence store (the worker keeps it for every flagged
frame); it is scored again by the model now serving its camera, with the camera's crop
and tiling, in every view ``learning.views`` names (flipped and rotated copies), and the
candidate patches at or above ``learning.margin`` x the image threshold are added to the
extension (bundle/extension.py), except those that could take one of the operator's confirmed defects below its
threshold (``learning.guard_defects``; their guards are kept on disk, worker/guards.py).  Every compiled copy of the
bundle uses the new rows from its next frame on, and the retained model topic announces
the new revision.  Clearing the label (or ``unlabel``) takes the rows back; the false alarms labelled after it,
whose rows were chosen with its rows in use, are scored again and absorb what they now miss.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from bundle import tiling
from bundle.extension import Absorbed, Entry, Extension, ExtensionFull, ExtensionUnwritable, absorb, decisive_patches, reabsorb
from worker.capture import Capture, unwritable
from worker.config import Config
from worker.decode import FrameError
from worker.evidence import EvidenceStore
from worker.guards import Guard, Guards
from worker.models import Model, Models
from worker.store import point_id
from worker.wire import iso

if TYPE_CHECKING:
    from bundle.runtime import ExtensionState

log = logging.getLogger(__name__)


def _patches(n: int) -> str:
    return f"{n} patch" if n == 1 else f"{n} patches"


def _when(stamp: object) -> float:
    """A payload's ISO time (``labelled_at``) as a timestamp; 0 where it has none."""
    try:
        return datetime.fromisoformat(str(stamp)).timestamp()
    except ValueError:
        return 0.0


def _others(reabsorbed: list[dict], lost: list[dict]) -> str:
    """What a withdrawal did to the false alarms that leaned on its rows, for its message."""
    said = ""
    if reabsorbed:
        said += (f"; {len(reabsorbed)} later false alarm(s) leaned on its rows and absorbed what they missed: "
                 + ", ".join(f"{d['camera']}/{d['frame_id']} ({_patches(d['patches'])})" for d in reabsorbed))
    if lost:
        said += (f"; {len(lost)} false alarm(s) may no longer pass: "
                 + ", ".join(f"{d['camera']}/{d['frame_id']} ({d['reason']})" for d in lost))
    return said


def _folded_in(model: Model, held: dict[str, Entry]) -> dict | None:
    """The fold record (``training.folds``, exporter fold-extension) by which ``model``'s bank holds one of the
    ``held`` entries (a label's, by extension folder name): an extension folded before the entry was added holds no
    rows of it."""
    for record in reversed(model.bundle.manifest.training.get("folds") or []):
        weights = str(record.get("source_model_bin_sha256") or "")[:16]  # the folder is keyed by the source's weights
        entry = held.get(str(record.get("extension_folder"))) or next(
            (e for name, e in held.items() if weights and name.endswith(f"-{weights}")), None)
        try:
            folded_at = datetime.fromisoformat(str(record.get("folded_at"))).timestamp()
        except ValueError:
            folded_at = float("inf")  # a record without its time: the rows may be in it
        if entry is not None and entry.at <= folded_at + 1:  # folded_at is in whole seconds
            return dict(record)
    return None


def _still_folded(model: Model, fold: dict) -> tuple[dict, str]:
    """What a withdrawal answers where ``model``'s bank holds the label's rows by ``fold`` (:func:`_folded_in`): the
    serving bundle and its source, and why frames like it still pass."""
    m = model.bundle.manifest
    source = f"{m.name} {fold.get('source_version')}"
    return ({"bundle": f"{m.name} {m.version}", "from": source},
            f"the serving bundle {m.name} {m.version} has this label's rows folded into its bank (exporter "
            f"fold-extension from {source}): frames like it still pass; to withdraw it, roll back to {source} or fold "
            "that bundle's extension again without it")


def untaught(before: Model, after: Model) -> dict | None:
    """What a change of model (reload, rollback) leaves behind: the false alarms ``before``'s extension absorbed that
    ``after`` neither holds in its own extension nor has folded into its bank, so frames like them are flagged again;
    None when there are none.  Each bundle has an extension of its own: an operator rolling back, or out, is told."""
    if before.extension is None or before.extension is after.extension:
        return None
    have = {e.key for e in after.extension.entries()} if after.extension is not None else set()
    name = before.extension.folder.name
    left = [e for e in before.extension.entries() if e.key not in have and _folded_in(after, {name: e}) is None]
    if not left:
        return None
    frames = [f"{e.camera}/{e.frame_id}" for e in sorted(left, key=lambda e: e.at)]
    was, now = before.bundle.manifest, after.bundle.manifest
    return {"false_alarms": len(left), "frames": frames[:20],
            "message": f"{len(left)} false alarm(s) absorbed by {was.name} {was.version} are not learned by "
                       f"{now.name} {now.version}, which now serves: frames like them are flagged again until they "
                       f"are labelled false_alarm again (e.g. {frames[0]})"}


class Learner:
    def __init__(self, cfg: Config, models: Models, evidence: EvidenceStore,
                 frame_image: Callable[[bytes, str, Model | None], np.ndarray], on_change: Callable[[], None],
                 capture: Capture | None = None) -> None:
        """``frame_image(data, camera, model)``: a stored frame decoded and cropped as the pipeline did for ``model``
        (so a label scores the frame the operator saw flagged), or in full for None (false alarms are captured at
        full resolution); ``on_change`` runs after every change of an extension (the worker
        republishes its retained model topic); ``capture`` keeps false alarms for the next training set, whether or
        not the bundle can absorb them."""
        self.cfg = cfg
        self.capture = capture
        self.models = models
        self.evidence = evidence
        self.frame_image = frame_image
        self.on_change = on_change
        self.guards = Guards()
        self._warmed: frozenset[Model] = frozenset()  # the served models whose missing guards were listed last
        self._pending: list[tuple[Model, str, dict]] = []  # guards still to score for them, newest defect last
        self._lost: dict[str, str] = {}  # entry key -> why its frame may no longer pass (a withdrawal it leaned on)
        self.unrecorded: dict[str, str] = {}  # entry key -> why no label in the history names it (worker/labels.py)

    def absorb(self, key: str, frame_id: str, camera: str, payload: dict, confirmed: list[dict] | None = None) -> dict:
        """Add the offending patches of the labelled frame ``key``, less those that would lower one of the
        ``confirmed`` defects (the payloads of frames labelled ``confirmed_defect``); the answer says what happened
        and why."""
        model = self.models.for_camera(camera)
        ext = model.extension
        if ext is not None and (earlier := next((e for e in ext.entries() if e.key == key), None)) is not None:
            return self._answer(ext, earlier, "already absorbed")
        if payload.get("verdict") != "anomalous":
            return {"patches": 0, "reason": "the frame was not flagged: there is nothing to absorb"}
        relative = (payload.get("evidence") or {}).get("frame")
        data = self.evidence.read(relative)
        if data is None:
            return {"patches": 0, "reason": "the frame's image is no longer kept (evidence.anomalous budget)"}
        try:
            full = self.frame_image(data, camera, None) if self.capture is not None else None
            scored = self.frame_image(data, camera, model) if ext is not None else None
        except FrameError as exc:  # the stored file was damaged on disk (a power cut, a failing card)
            log.warning("false alarm %s/%s: its stored image cannot be read: %s", camera, frame_id, exc.message)
            return {"patches": 0, "reason": f"the frame's stored image cannot be read ({exc.message}): nothing to absorb"}
        lost: dict[str, str] = {}  # why the frame is not kept for the next training set, for the label's answer
        if full is not None and self.capture is not None:  # normal by the operator's word: part of the next training set
            try:
                self.capture.add_false_alarm(camera, key, full)
            except OSError as exc:  # a full disk: the label and its absorption go ahead, the next training set lacks it
                lost["capture"] = f"not kept for the next training set: {unwritable(exc, 'the capture folder')}"
                log.warning("false alarm %s/%s is %s", camera, frame_id, lost["capture"])
        if ext is None or scored is None:
            kept = ("the label is stored and the frame is kept for the next training set (capture export, then "
                    "retrain)" if self.capture is not None and not lost else "the label is stored")
            if not self.cfg.learning.enabled:
                why = "learning is off (learning.enabled)"
            elif model.info["family"] != "patchcore":  # re-exporting it would not give it an extension
                why = (f"the {model.info['family']} bundle {model.info['name']} cannot absorb false alarms: only "
                       f"PatchCore bundles learn from labels on the line; {kept}, or serve a PatchCore bundle on this "
                       "camera to teach it away now")
            else:
                why = (f"the PatchCore bundle {model.info['name']} has no bank extension (exported before issue 17 or "
                       f"with --extension-candidates 0): re-export it with this version's exporter; {kept}")
            return {"patches": 0, "reason": why, **lost}
        tiles = self._tiles(model, camera, scored)
        threshold = self.models.image_norm(model, camera).threshold
        try:
            done = absorb(model.bundle, model.bundle.create_request(), ext, key, tiles, self.cfg.learning.views,
                          threshold, self.cfg.learning.margin, self._protected(model, confirmed or []),
                          lambda e: self._put(e, camera, frame_id), frame_id, camera)
        except ExtensionUnwritable:  # not labelled after all: not a false alarm of the next training set either
            if full is not None and self.capture is not None:
                self.capture.remove_false_alarm(camera, key)
            raise
        figures = {"left_out": done.left_out, "raw_score": round(done.raw_score, 5)}  # the raw score as when flagged
        if done.entry is None or done.after is None:
            why = done.full or (f"each of its {_patches(done.left_out)} lies near a confirmed defect's decisive patches: "
                                "absorbing it could hide that defect" if done.left_out else
                                "no patch of this frame is above the threshold any more")
            if (stays := next((e for e in ext.held() if e.key == key), None)) is not None:  # labelled again while held
                why += (f"; the {_patches(stays.rows)} it absorbed before are kept, held past learning.max_rows "
                        f"{ext.max_rows} and not served: served once withdrawals free room for them, or the bound is "
                        "raised")
            return {"patches": 0, **figures, "reason": why, **({"full": True} if done.full else {}), **lost}
        self._lost.pop(key, None)  # absorbed anew: scored as it is now
        self.unrecorded.pop(key, None)
        refused = f" of the frame itself (its flipped and turned views did not fit: {done.full})" if done.full else ""
        guarded = f"; {_patches(done.left_out)} left out, near confirmed defects" if done.left_out else ""
        passes = done.after < threshold
        outcome = "frames that look like this one now pass" if passes else self._still_flagged(model, done, threshold)
        answer = self._answer(ext, done.entry, f"absorbed: {_patches(done.entry.rows)}{refused}{guarded}; {outcome}")
        return {**answer, **figures, "score_after": round(done.after, 5), "passes": passes, **lost}

    @staticmethod
    def _still_flagged(model: Model, done: Absorbed, threshold: float) -> str:
        """Why a frame whose rows were absorbed still scores at or above ``threshold``, in the operator's terms."""
        said = f"the frame itself still scores {done.after:.4g} against the threshold {threshold:.4g}"
        if done.still and done.left_out:
            return f"{said}: the patches left out near confirmed defects keep it flagged"
        if done.still:
            return f"{said}: {_patches(done.still)} of it still stand out: capture frames and retrain"
        spec = model.bundle.extension_spec
        k = spec.candidates if spec is not None else 0
        return (f"{said}: more of its patches stand out than the {k} per frame that the bundle compares with its "
                "extension (a change over much of the frame, such as the light or the material): capture frames and "
                "retrain, or export the bundle with more --extension-candidates")

    def confirm(self, key: str, payload: dict) -> None:
        """Score a frame just labelled ``confirmed_defect`` for its model's guard now (one inference per tile), so that
        the next false-alarm label does not wait for it."""
        camera = str(payload.get("camera"))
        model = self.models.for_camera(camera)
        if self.cfg.learning.guard_defects and model.extension is not None \
                and self.guards.get(model, key, self._how(model, camera)) is None:
            self._guard(model, key, payload)

    def _protected(self, model: Model, confirmed: list[dict]) -> list[Guard]:
        """The decisive patches and their reach of the newest ``learning.guard_defects`` confirmed defects seen by
        cameras this model serves; each is scored once per model and kept (:meth:`confirm`, or here; worker/guards.py),
        so a confirmed defect whose image is no longer kept guards only if it was scored while it was."""
        keys = self._wanted(model, confirmed)
        self.guards.keep(set(self.models.scopes().values()), model, set(keys),
                         {point_id(str(p["camera"]), str(p["frame_id"])) for p in confirmed})
        found, hows = [], {camera: self._how(model, camera) for camera in {str(p["camera"]) for p in keys.values()}}
        for key, p in keys.items():
            guard = self.guards.get(model, key, hows[str(p["camera"])]) or self._guard(model, key, p)
            if guard is not None:
                found.append(guard)
        return found

    def _wanted(self, model: Model, confirmed: list[dict]) -> dict[str, dict]:
        """The newest ``learning.guard_defects`` of ``confirmed`` seen by cameras whose model uses ``model``'s rows: the
        cameras it serves, and those served by another compiled copy of its bundle (a camera's own precision, a
        canary of it), which share its extension and so take every row it absorbs.  By point id."""

        def shares(p: dict) -> bool:
            seen_by = self.models.for_camera(str(p.get("camera")))
            return seen_by is model or (model.extension is not None and seen_by.extension is model.extension)

        wanted = sorted(filter(shares, confirmed), key=lambda p: str(p.get("labelled_at") or ""),
                        reverse=True)[: self.cfg.learning.guard_defects]
        return {point_id(str(p["camera"]), str(p["frame_id"])): p for p in wanted}

    def warm(self, confirmed: Callable[[], list[dict]]) -> bool:
        """Score one guard that a served model still lacks (the request thread calls this while it is idle), so that
        after a restart without them on disk or a new bundle the first false-alarm label need not score them all;
        ``confirmed`` reads the confirmed defects' payloads, once per change of the served models.  True when one
        was scored (call again at once)."""
        if not self.cfg.learning.guard_defects:
            return False
        live = set(self.models.scopes().values())
        served = frozenset(m for m in live if m.extension is not None)
        if served != self._warmed:
            self.guards.served(live)
            payloads = confirmed()
            self._warmed = served
            self._pending = [(m, k, p) for m in served for k, p in reversed(self._wanted(m, payloads).items())]
        while self._pending:
            model, key, payload = self._pending.pop()
            if model in served and self.guards.get(model, key, self._how(model, str(payload["camera"]))) is None:
                self._guard(model, key, payload)
                return True
        return False

    def _how(self, model: Model, camera: str) -> str:
        """What a guard's patches depend on besides the bundle's weights: the precision, the camera's threshold, crop
        and tiling, the frame's decode and how many patches it protects; a guard scored otherwise is scored again."""
        override = self.cfg.cameras.get(camera)
        return json.dumps({"precision": model.bundle.precision, "threshold": repr(self.models.image_norm(model, camera).threshold),
                           "reduced_decode": self.cfg.limits.reduced_decode,
                           "guard_patches": self.cfg.learning.guard_patches,
                           "roi": override.roi if override else None,
                           "tiling": tiling.record(model.tiling(override))},
                          sort_keys=True)

    def _guard(self, model: Model, key: str, payload: dict) -> Guard | None:
        """Score the decisive patches (bundle.extension.decisive_patches) of confirmed defect ``key`` by ``model``'s bank
        alone, in every tile of its frame, and keep them; None when its image is no longer kept."""
        spec = model.bundle.extension_spec
        data = self.evidence.read((payload.get("evidence") or {}).get("frame"))
        if spec is None or data is None:  # its image is gone (evidence budget): nothing to score it by
            return None
        camera = str(payload["camera"])
        try:
            image = self.frame_image(data, camera, model)
        except FrameError as exc:
            log.warning("confirmed defect %s/%s cannot guard absorptions: %s", camera, payload["frame_id"], exc.message)
            return None
        bank_alone = model.bundle.extension_state_of(np.zeros((0, spec.feature_dim), np.float32))
        threshold = self.models.image_norm(model, camera).threshold
        request = model.bundle.create_request()
        preds = (model.bundle.infer(tile[np.newaxis], request, bank_alone) for tile in self._tiles(model, camera, image))
        found = [decisive_patches(pred.candidates[0], pred.candidate_scores[0], float(pred.score[0]),  # type: ignore[index]
                                  threshold, self.cfg.learning.guard_patches) for pred in preds]
        guard = (np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found]))
        self.guards.put(model, key, self._how(model, camera), guard)
        return guard

    def _put(self, ext: Extension, camera: str, frame_id: str, what: str = "absorbed") -> None:
        """Put the extension's rows to use: every compiled copy, the model topic."""
        self.models.apply(ext)
        log.info("false alarm %s/%s %s: extension revision %d, %d rows", camera, frame_id, what, ext.revision,
                 len(ext.rows))
        self.on_change()

    def release(self, key: str, camera: str, labelled: Callable[[], list[dict]] | None = None) -> dict:
        """Take back what frame ``key`` added, from every extension that holds it (labelled again after a reload to
        another bundle, it is in both); the answer's revision and rows are the camera's model's where it held some.

        ``labelled`` reads the payloads of the labelled frames (the store's); the false alarms among them absorbed after
        this one may lean on its rows, so each whose frame passed with them and is flagged without them gets what it
        now misses (``reabsorbed``), or is named (``no_longer_pass``) where that cannot be done."""
        held = {ext.folder.name: entry for ext in self.models.extensions(every=True)
                for entry in ext.entries() if entry.key == key}
        unserved = {ext.folder.name: entry for ext in self.models.extensions(every=True)
                    for entry in ext.held() if entry.key == key}
        before = {model: model.bundle.extension_state for model in self.models.scopes().values()}
        released: list[tuple[Extension, int]] = []
        try:  # raises ExtensionUnwritable where one cannot be written: that one keeps the rows, and a retry takes them
            for ext in self.models.extensions(every=True):
                if removed := ext.remove(key):
                    released.append((ext, removed))
        finally:
            for ext, removed in released:
                self.models.apply(ext)
                log.info("false alarm label withdrawn: %d patches removed from %s, extension revision %d", removed,
                         ext.folder.name, ext.revision)
            if released or unserved:  # a held label withdrawn: the model topic's count of them moved
                self.on_change()
        self._lost.pop(key, None)
        self.unrecorded.pop(key, None)
        if self.capture is not None:
            self.capture.remove_false_alarm(camera, key)
        if not released:
            if not unserved:
                return {"patches": 0, "reason": "this frame had added nothing to an extension"}
            # a fold reads every entry, held ones too: the serving bank may hold the rows this deletes
            deleted = "its rows were held past learning.max_rows, not served: they are deleted"
            model = self.models.for_camera(camera)
            # a message, as for a served label: the console said "nothing to release: ... they are deleted"
            if (fold := _folded_in(model, unserved)) is None:
                return {"patches": 0, "held": True, "reason": deleted,
                        "message": f"withdrawn: {deleted}; frames like it are scored as before"}
            folded, said = _still_folded(model, fold)
            reason = f"{deleted} from the extension of {folded['from']}, but {said}"
            return {"patches": 0, "held": True, "folded": folded, "reason": reason, "message": f"withdrawn: {reason}"}
        reabsorbed: list[dict] = []
        lost: list[dict] = []
        unchecked = ""
        try:  # the withdrawal is done and must be answered as such whatever happens here
            payloads = labelled() if labelled is not None else None
            for ext, _ in released:
                if payloads is not None:
                    done, failed = self._lean(ext, held[ext.folder.name].at, payloads, before)
                    reabsorbed += done
                    lost += failed
        except Exception:
            log.exception("false alarm label withdrawn: the later false alarms that may lean on its rows could not "
                          "all be scored again")
            unchecked = ("; the later false alarms that may lean on its rows could not all be scored again (see the "
                         "worker's log): frames like them may be flagged again")
        model = self.models.for_camera(camera)
        ext = next((e for e, _ in released if e is model.extension), released[-1][0])
        patches = sum(removed for _, removed in released)
        answer = {"patches": patches, "revision": ext.revision, "extension_rows": len(ext.rows),
                  "extensions": len(released), "reabsorbed": reabsorbed, "no_longer_pass": lost}
        others = _others(reabsorbed, lost) + unchecked
        fold = _folded_in(model, held)
        if fold is None:
            return {**answer, "message": f"released: {_patches(patches)}; frames like it are scored as before{others}"}
        folded, said = _still_folded(model, fold)
        return {**answer, "folded": folded, "message": f"withdrawn from the extension of {folded['from']}, but "
                                                       f"{said}{others}"}

    def _lean(self, ext: Extension, since: float, labelled: list[dict], before: dict[Model, ExtensionState | None]
              ) -> tuple[list[dict], list[dict]]:
        """The false alarms absorbed into ``ext`` after ``since`` (when the withdrawn label's rows came), oldest first,
        scored again by the model serving their camera (one inference per tile; the dependent ones a few more): those
        that passed ``before`` the withdrawal and are flagged now are re-absorbed (:func:`bundle.extension.reabsorb`).
        Returns (re-absorbed, no longer passing), each a list of ``{frame_id, camera, ...}``; the entries of the
        latter are marked in :meth:`extensions`."""
        if not any(m.extension is ext for m in self.models.scopes().values()):
            return [], []  # kept for rollback only: no model scores with it now
        entries = {e.key: e for e in ext.entries()}
        frames = {point_id(p["camera"], p["frame_id"]): p for p in labelled if p.get("label") == "false_alarm"
                  and isinstance(p.get("camera"), str) and isinstance(p.get("frame_id"), str)}
        confirmed = [p for p in labelled if p.get("label") == "confirmed_defect"]
        due = []
        for key, p in frames.items():
            model = self.models.for_camera(p["camera"])
            entry = entries.get(key)
            when = max(_when(p.get("labelled_at")), entry.at if entry is not None else 0.0)
            if model.extension is ext and p.get("verdict") == "anomalous" and when > since:
                due.append((when, key, p, model))
        reabsorbed: list[dict] = []
        lost: dict[str, dict] = {key: {"frame_id": e.frame_id, "camera": e.camera, "reason": (
            "its frame is no longer in the history, so it could not be scored again: frames like it may be flagged "
            "again")} for key, e in entries.items() if key not in frames and e.at > since}
        for _, key, p, model in sorted(due, key=lambda d: d[0]):
            camera, frame_id = p["camera"], p["frame_id"]
            said = {"frame_id": frame_id, "camera": camera}
            data = self.evidence.read((p.get("evidence") or {}).get("frame"))
            if data is None:
                lost[key] = {**said, "reason": "its image is no longer kept, so it could not be scored again: frames "
                             "like it may be flagged again"}
                continue
            threshold = self.models.image_norm(model, camera).threshold
            had = len(ext.rows_of(key))
            try:
                tiles = self._tiles(model, camera, self.frame_image(data, camera, model))
                done = reabsorb(model.bundle, model.bundle.create_request(), ext, key, tiles, self.cfg.learning.views,
                                threshold, self.cfg.learning.margin, self._protected(model, confirmed),
                                partial(self._put, camera=camera, frame_id=frame_id, what="re-absorbed"), frame_id,
                                camera, before.get(model))
            except FrameError as exc:
                lost[key] = {**said, "reason": f"its stored image cannot be read ({exc.message}), so it could not be "
                             "scored again: frames like it may be flagged again"}
                continue
            except (ExtensionFull, ExtensionUnwritable) as exc:
                lost[key] = {**said, "reason": f"it leaned on the withdrawn rows and what it misses now was not "
                             f"absorbed: {exc}"}
                continue
            if done is None:  # it passes, or it was flagged with the withdrawn rows too
                continue
            added = (done.entry.rows if done.entry is not None else had) - had
            passes = done.after is not None and done.after < threshold
            if added:
                reabsorbed.append({**said, "patches": added, "passes": passes})
            if passes:
                self._lost.pop(key, None)  # an earlier withdrawal's mark: it passes again
            else:
                guarded = f"; {_patches(done.left_out)} of it lie near confirmed defects" if done.left_out else ""
                lost[key] = {**said, "reason": f"it leaned on the withdrawn rows and is flagged again{guarded}"}
        held = {e.key for e in ext.entries()}
        self._lost.update({key: said["reason"] for key, said in lost.items() if key in held})
        return reabsorbed, list(lost.values())

    def extensions(self) -> list[dict]:
        """Every extension the served bundles use: its figures and one entry per absorbed false alarm, with
        ``no_longer_pass`` where a withdrawal it leaned on flagged its frame again and that could not be mended, and
        ``unrecorded`` where no label in the history names it (worker/labels.py ``LabelService.warm``), and ``held`` for
        one kept past ``learning.max_rows`` and not served (its false alarm is flagged again), with the bound that
        serves every entry (``held_rows``, ``max_rows_to_serve_all``)."""
        out: list[dict] = []
        scopes = self.models.scopes()
        for model in scopes.values():
            ext = model.extension
            if ext is None or any(o["folder"] == ext.folder.name for o in out):
                continue
            out.append({"folder": ext.folder.name, "bundle": model.info["name"], "scopes": sorted(
                s for s, m in scopes.items() if m.extension is ext), **ext.info(),
                "entries": [{"frame_id": e.frame_id, "camera": e.camera, "rows": e.rows, "at": iso(e.at),
                             **({"no_longer_pass": self._lost[e.key]} if e.key in self._lost else {}),
                             **({"unrecorded": self.unrecorded[e.key]} if e.key in self.unrecorded else {})}
                            for e in ext.entries()]})
            if held := ext.held():
                info = out[-1]
                info["held_rows"] = sum(e.rows for e in held)
                info["max_rows_to_serve_all"] = need = info["rows"] + info["held_rows"]
                info["entries"] += [{"frame_id": e.frame_id, "camera": e.camera, "rows": e.rows, "at": iso(e.at),
                                     "held": f"not served: past learning.max_rows {ext.max_rows} (raise it to {need}, "
                                             "or withdraw other false alarms)",
                                     **({"unrecorded": self.unrecorded[e.key]} if e.key in self.unrecorded else {})}
                                    for e in held]
        return out

    def _tiles(self, model: Model, camera: str, image: np.ndarray) -> list[np.ndarray]:
        """The frame as the model sees it: every tile the camera's frames are cut into, prepared for the graph."""
        return tiling.tiles(image, model.bundle.manifest.input, model.tiling(self.cfg.cameras.get(camera)))

    @staticmethod
    def _answer(ext: Extension, entry: Entry, message: str) -> dict:
        return {"patches": entry.rows, "revision": ext.revision, "extension_rows": len(ext.rows), "message": message}
