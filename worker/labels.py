"""Operator labels: a false alarm or a confirmed defect (with its type), kept in the frame's payload in the store.

Requests arrive on ``<prefix>/label`` (MQTT v5 request/response, like queries) from the
console or the CLI.  Labels then travel with every similarity answer, and ``export``
lists them (JSON or CSV) for re-thresholding or retraining.  A ``false_alarm`` label is
also absorbed into the model (worker/learning.py: the answer's ``absorbed``); clearing
it (``label: null`` or ``action: unlabel``) takes the absorption back (``released``).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from bundle.extension import ExtensionUnwritable
from worker.capture import Capture
from worker.decode import FrameError
from worker.evidence import EvidenceStore
from worker.learning import Learner
from worker.query import serve_request
from worker.recorder import StoreUnavailable
from worker.store import StoreError, VectorStore, point_id
from worker.store_base import Label
from worker.wire import MAX_ID_LENGTH, CapturedAtField, ErrorCode, FrameIdField, RequestError, check_same_capture, iso

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

EXPORT_FIELDS = ("frame_id", "camera", "captured_at", "score", "verdict", "label", "defect_type", "note",
                 "labelled_at", "model_version")


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a spreadsheet reads a cell starting so as a formula


def csv_cell(value: object) -> object:
    """A value as a CSV cell a spreadsheet shows rather than runs: a text starting like a formula (a camera picks its
    own frame ids; notes are typed by anyone with the console) gets a leading ``'`` (OWASP's CSV injection advice).  So
    does a text that starts with ``'`` already, so that one leading ``'`` taken off always gives the value back: ids
    ``=1+2`` and ``'=1+2`` stay two."""
    if isinstance(value, str) and value.startswith((*FORMULA_STARTS, "'")):
        return "'" + value
    return value


class SetLabel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["set"]
    frame_id: FrameIdField = Field(min_length=1, max_length=MAX_ID_LENGTH)
    camera: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    captured_at: CapturedAtField | None = None
    label: Label | None = Field(description="None clears the label.")
    defect_type: str | None = Field(None, max_length=64)
    note: str | None = Field(None, max_length=500)


class Unlabel(BaseModel):
    """The same as ``set`` with ``label: null``: the frame's label, and what it taught the model, are withdrawn."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["unlabel"]
    frame_id: FrameIdField = Field(min_length=1, max_length=MAX_ID_LENGTH)
    camera: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    captured_at: CapturedAtField | None = None


class ListExtensions(BaseModel):
    """What false alarms each served bundle has absorbed (for the console's undo list)."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["extensions"]


class ExportLabels(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["export"]
    format: Literal["json", "csv"] = "json"


def _confirmed(store: VectorStore) -> list[dict]:
    """The payloads of the frames labelled ``confirmed_defect`` (the guard of every absorption)."""
    return [p for p in store.labelled() if p.get("label") == "confirmed_defect"]


class LabelService:
    def __init__(self, use_store: Callable[[], AbstractContextManager[VectorStore]],
                 evidence: EvidenceStore | None = None, learner: Learner | None = None,
                 settle: Callable[[], object] | None = None, capture: Capture | None = None,
                 stored_image: Callable[[bytes, str], np.ndarray] | None = None) -> None:
        """``settle`` waits for the frames on their way to the store (worker/query.py ``serve_request``); a frame
        labelled a confirmed defect leaves the ``capture`` sample of normal frames and is kept among the camera's
        confirmed defects, from the sample or from its evidence (``stored_image``: decoded and cropped in full)."""
        self.use_store = use_store
        self.settle = settle
        self.evidence = evidence
        self.learner = learner
        self.capture = capture
        self.stored_image = stored_image
        self._capture_checked = capture is None  # see warm
        self._reconciled = learner is None  # see warm

    def answer_bytes(self, payload: bytes) -> dict:
        """Answer a raw request; errors come back as ``{"ok": false, "error": ...}``."""
        def pick(raw: object) -> type[SetLabel | Unlabel | ListExtensions | ExportLabels]:
            action = raw.get("action") if isinstance(raw, dict) else None
            kinds: dict[str, type[SetLabel | Unlabel | ListExtensions | ExportLabels]] = {
                "export": ExportLabels, "unlabel": Unlabel, "extensions": ListExtensions}
            # anything else, an object or a list too, is validated as a set, which refuses it as a bad request
            return kinds.get(action, SetLabel) if isinstance(action, str) else SetLabel

        def listed(request: SetLabel | Unlabel | ListExtensions | ExportLabels) -> dict | None:
            """The extensions list: the learner's, answered while the store is away too (the console's undo list)."""
            if not isinstance(request, ListExtensions):
                return None
            return {"ok": True, "extensions": self.learner.extensions() if self.learner is not None else []}

        def handle(request: SetLabel | Unlabel | ListExtensions | ExportLabels, store: VectorStore) -> dict:
            if isinstance(request, ExportLabels):
                return self.export(request, store)
            assert not isinstance(request, ListExtensions)  # answered by listed, without the store
            if isinstance(request, Unlabel):
                request = SetLabel(action="set", frame_id=request.frame_id, camera=request.camera,
                                   captured_at=request.captured_at, label=None)
            return self.set(request, store)

        return serve_request(payload, pick, self.use_store, handle, self.settle, listed)

    def set(self, request: SetLabel, store: VectorStore) -> dict:
        found = store.find(request.frame_id, request.camera)
        if found is None and request.label is None:
            # A labelled frame may be gone from the history (retention by age) while a false alarm's rows still make
            # frames like it pass, or a confirmed defect's image is still a test image of the next training set:
            # withdrawing it must still work, or a wrong label could not be undone.
            key = point_id(request.camera, request.frame_id)
            # first: the release below deletes a false alarm's captured image too, without saying so; should it fail
            # (its folder unwritable), the withdrawal asked for is only half done, and the retry finishes it
            false_alarm = self.capture is not None and self.capture.remove_false_alarm(request.camera, key)
            try:
                released = self.learner.release(key, request.camera, store.labelled) if self.learner is not None \
                    else {"patches": 0}
            except ExtensionUnwritable as exc:
                raise RequestError(ErrorCode.INTERNAL_ERROR, str(exc)) from exc
            defect = self.capture.remove_defect(request.camera, key) if self.capture is not None else None
            # a false alarm held past learning.max_rows (not served) withdrawn: its rows are deleted
            taught = bool(released["patches"] or released.get("held"))
            if taught or defect or false_alarm:
                done = (["what it taught the model is withdrawn"] * taught +
                        ["its image is no longer a test image of the next training set"] * bool(defect) +
                        ["its image is no longer a good image of the next training set"] * false_alarm)
                return {"ok": True, "frame_id": request.frame_id, "camera": request.camera, "label": None,
                        "defect_type": None, **({"released": released} if taught else {}),
                        **({"capture": "back among the captured normal frames"} if defect == "back" else {}),
                        "note": f"the frame is no longer in the history; {' and '.join(done)}"}
        if found is None:
            raise RequestError(ErrorCode.UNKNOWN_FRAME, f"frame {request.frame_id!r} from camera {request.camera} is not in the history")
        pid, vector, payload = found
        # a withdrawal (no label) said as one: "nothing was labelled" read as if it had not been asked for
        check_same_capture(payload, request.frame_id, request.camera, request.captured_at,
                           "nothing was labelled" if request.label is not None else "no label was withdrawn")
        try:  # before the extension changes: a label the store then refuses would leave the two disagreeing
            store.writable()
        except StoreError as exc:
            raise StoreError(f"{exc}; the label is unchanged and nothing was absorbed or withdrawn") from exc
        was_false_alarm = payload.get("label") == "false_alarm"
        labelled = request.label is not None
        answer: dict = {"ok": True, "frame_id": request.frame_id, "camera": request.camera, "label": request.label,
                        "defect_type": request.defect_type if labelled else None}
        if self.learner is not None:  # the model first: where its extension cannot be written, the label is unchanged
            try:
                if request.label == "false_alarm":
                    others = [p for p in _confirmed(store) if (p.get("camera"), p.get("frame_id")) !=
                              (request.camera, request.frame_id)]  # this frame's own earlier label is being replaced
                    answer["absorbed"] = self.learner.absorb(pid, request.frame_id, request.camera, payload, others)
                    if "capture" in answer["absorbed"]:  # said where a confirmed defect's capture is said
                        answer["capture"] = answer["absorbed"].pop("capture")
                else:  # an extension may hold rows of this id while the stored frame says otherwise: a camera that
                    # reused the id replaced the false alarm's record, so its label can no longer say what to release
                    def remaining() -> list[dict]:  # its own label is being withdrawn, or made a confirmed defect
                        others = [p for p in store.labelled() if (p.get("camera"), p.get("frame_id")) !=
                                  (request.camera, request.frame_id)]
                        # a false alarm made a defect guards at once: the later look-alikes re-absorbed must not
                        # make it pass
                        return others + [{**payload, "label": request.label}] * (request.label == "confirmed_defect")

                    released = self.learner.release(pid, request.camera, remaining)
                    if was_false_alarm or released["patches"]:
                        answer["released"] = released
            except ExtensionUnwritable as exc:
                raise RequestError(ErrorCode.INTERNAL_ERROR, f"{exc}; the label is unchanged") from exc
        payload.update(label=request.label, defect_type=request.defect_type if labelled else None,
                       note=request.note if labelled else None, labelled_at=iso(time.time()) if labelled else None)
        try:
            store.upsert([(pid, vector, payload)])
        except StoreError as exc:
            raise StoreError(f"{exc}; {self._undo(pid, request, was_false_alarm, answer)}") from exc
        if self.evidence is not None:  # a labelled frame's evidence moves to the labelled budget
            self._mark(pid, labelled, payload)
        if self.capture is not None:
            self._capture_label(request, pid, payload, answer)
        if self.learner is not None and request.label == "confirmed_defect":
            try:  # scored now for the guard of later false-alarm labels, which would otherwise score it then
                self.learner.confirm(pid, payload)
            except Exception:  # the label is stored either way; the guard scores the frame again when it needs it
                log.exception("confirmed defect %s/%s could not be scored for the absorption guard",
                              request.camera, request.frame_id)
        return answer

    def _mark(self, key: str, labelled: bool, payload: dict) -> None:
        """Move a labelled frame's evidence into (or out of) the labelled budget; where its marker cannot be written
        (a read-only remount, no inodes) the label stands, and the recorder's check at the next start moves it."""
        assert self.evidence is not None
        try:
            self.evidence.set_labelled(key, labelled, payload.get("verdict") == "anomalous")
        except OSError as exc:
            log.warning("frame %s/%s: its label is stored, but its evidence stays in the budget of %s frames until the "
                        "next start (%s)", payload.get("camera"), payload.get("frame_id"),
                        "unlabelled" if labelled else "labelled", exc)

    def _capture_label(self, request: SetLabel, key: str, payload: dict, answer: dict) -> None:
        """A confirmed defect leaves the captured normal frames (the next model must not learn it as good) and is kept
        for the next training set's test images, from the sample or from its stored frame; a false alarm or no label
        takes it out of them again, and back among the normal frames where it came from them (normal, by the
        operator's word)."""
        assert self.capture is not None
        if request.label != "confirmed_defect":
            if self.capture.remove_defect(request.camera, key) == "back":
                answer["capture"] = "back among the captured normal frames"
            return
        # The sample takes frames scored normal only: one of this id next to a frame scored anomalous is an earlier
        # frame of an id the camera reused, which leaves the sample without becoming this defect's image.
        scored_normal = payload.get("verdict") != "anomalous"
        if self.capture.forget(request.camera, key, same_frame=scored_normal) and scored_normal:
            answer["capture"] = "taken out of the captured normal frames"
            return
        if self.capture.keeps_defect(request.camera, key):  # labelled so before: its type corrected, or a retry
            answer["capture"] = "kept for the next training set's test images"
            return
        data = self.evidence.read((payload.get("evidence") or {}).get("frame")) if self.evidence is not None else None
        if data is None or self.stored_image is None:
            # a frame scored normal keeps a thumbnail only: nothing to train on, which the answer says
            answer["capture"] = ("not kept for the next training set: its picture is neither in the captured normal "
                                 "frames nor stored (a frame scored normal keeps only a thumbnail)")
            return
        try:
            self.capture.add_defect(request.camera, key, self.stored_image(data, request.camera))
        except (FrameError, OSError) as exc:  # the stored file damaged, or the capture disk full: the label stands
            log.warning("confirmed defect %s/%s is not kept for the next training set: %s", request.camera,
                        request.frame_id, getattr(exc, "message", exc))
            answer["capture"] = f"not kept for the next training set: {getattr(exc, 'message', exc)}"
            return
        answer["capture"] = "kept for the next training set's test images"

    def _undo(self, key: str, request: SetLabel, was_false_alarm: bool, answer: dict) -> str:
        """After the store refused the label: take back the absorption made for it, so that no rows make frames like
        it pass while the history has no false-alarm label (retention would delete the frame as an ordinary one, and
        the label export would not show it); what the error should add."""
        if (answer.get("released") or {}).get("patches"):
            return "the label is unchanged, but the rows it had absorbed are withdrawn: send the request again"
        if self.learner is None or request.label != "false_alarm" or was_false_alarm:
            return "the label is unchanged"
        try:
            self.learner.release(key, request.camera)
        except ExtensionUnwritable as exc:
            log.error("false alarm %s/%s: the store refused its label and its absorption could not be taken back "
                      "(%s): its rows stay in use with no label in the history until it is labelled again or "
                      "withdrawn", request.camera, request.frame_id, exc)
            return (f"the label is unchanged, but its absorption could not be taken back ({exc}): label it again or "
                    "withdraw it (unlabel)")
        return "the label is unchanged and nothing was absorbed"

    def warm(self) -> bool:
        """Score one confirmed defect's guard a served model lacks (worker/learning.py ``Learner.warm``); True when one
        was scored.  Called by the request thread while no request waits.  First, once, the history is made to agree
        with the extensions (:meth:`_reconcile`), then the capture with the history's labels (:meth:`_check_capture`)."""
        if not self._reconciled and self.learner is not None:
            try:
                with self.use_store() as store:
                    self._reconcile(store, self.learner)
            except (StoreUnavailable, StoreError):  # tried again at the next idle turn
                return False
            self._reconciled = True
            return True
        if not self._capture_checked and self.capture is not None:
            try:
                with self.use_store() as store:
                    self._check_capture(store, self.capture)
            except (StoreUnavailable, StoreError):  # tried again at the next idle turn
                return False
            self._capture_checked = True
            return True
        if self.learner is None:
            return False

        def confirmed() -> list[dict]:
            with self.use_store() as store:
                return _confirmed(store)

        try:
            return self.learner.warm(confirmed)
        except StoreUnavailable:  # listed again at the next change of the served models, or by the next label
            return False

    def _check_capture(self, store: VectorStore, capture: Capture) -> None:
        """The capture sample gives up the frames labelled confirmed defects while it did not take them out (labelled
        before this version, or with capture off): the next model would learn them as good.  A false alarm kept
        whose frame the history holds with no false-alarm label is deleted: a worker killed while absorbing it kept
        its image before the label was recorded, and the export would give the flagged frame to the next model as
        good.  One whose frame is gone (retention by age) stays, until it is withdrawn.  After :meth:`_reconcile`,
        which labels such a frame where its absorption had finished."""
        taken = [p for p in _confirmed(store) if isinstance(p.get("camera"), str) and isinstance(p.get("frame_id"), str)
                 and capture.forget(p["camera"], point_id(p["camera"], p["frame_id"]),
                                    same_frame=p.get("verdict") != "anomalous")]
        if taken:
            log.warning("capture: %d frame(s) labelled confirmed defects were still among the captured normal "
                        "frames (labelled before this version, or while capture was off): taken out, e.g. %s/%s",
                        len(taken), taken[0]["camera"], taken[0]["frame_id"])
        kept = capture.false_alarm_keys()
        held = store.payloads([key for keys in kept.values() for key in keys])  # one read, without the vectors
        unlabelled = [(camera, key) for camera, keys in kept.items() for key in sorted(keys)
                      if key in held and held[key].get("label") != "false_alarm"]
        for camera, key in unlabelled:
            capture.remove_false_alarm(camera, key)
        if unlabelled:
            log.warning("capture: %d false alarm(s) were kept for the next training set with no false-alarm label in "
                        "the history (the worker stopped before the label was recorded): deleted, e.g. %s/%s",
                        len(unlabelled), *unlabelled[0])

    def _reconcile(self, store: VectorStore, learner: Learner) -> None:
        """Make the history agree with the extensions after a crash: a label absorbs its frame first and records
        the label second (so that a label the extension cannot take leaves the history unchanged), and a worker
        killed in between left rows in use with no false-alarm label in the history (retention then deleted the
        frame as an ordinary one, and the label export did not show it).  An entry whose frame is still the one
        absorbed (received before the entry was written) is labelled now, as the operator asked; one whose frame is
        gone (that, or retention by age), or was replaced by a later frame of the same id, is logged and marked
        ``unrecorded`` in the ``extensions`` list, so it can be withdrawn."""
        unrecorded = []
        # the entries held past learning.max_rows too: served once room frees or the bound is raised, with no label
        # naming them otherwise
        for key, entry in {e.key: e for ext in learner.models.extensions() for e in [*ext.entries(), *ext.held()]
                           }.items():
            found = store.get(key)
            payload = found[2] if found is not None else {}
            if payload.get("label") == "false_alarm":
                continue
            said = f"{payload.get('camera', entry.camera)}/{payload.get('frame_id', entry.frame_id)}"
            if found is not None and float(payload.get("received_ts", float("inf"))) <= entry.at:
                payload.update(label="false_alarm", defect_type=None, labelled_at=iso(entry.at),
                               note="labelled at start: the worker stopped after absorbing it, before recording the label")
                store.upsert([(key, found[1], payload)])
                if self.evidence is not None:
                    self._mark(key, True, payload)
                log.warning("false alarm %s: absorbed (%d rows), but the worker stopped before its label was recorded: "
                            "labelled now", said, entry.rows)
                continue
            why = ("its frame is no longer in the history" if found is None else
                   "its frame id now names a later frame: the camera reused it")
            learner.unrecorded[key] = (f"absorbed, but no label in the history names it ({why}): withdraw it "
                                       "(unlabel) unless frames like it should pass")
            unrecorded.append(f"{said} ({why})")
        if unrecorded:
            log.warning("%d absorbed false alarm(s) make frames like them pass while no label in the history names them "
                        "(retention by age, a camera that reused the id, or a worker stopped between absorbing one and "
                        "recording its label): withdraw them (unlabel) unless frames like them should pass; %s",
                        len(unrecorded), "; ".join(unrecorded[:10]))

    def export(self, request: ExportLabels, store: VectorStore) -> dict:
        rows = sorted(({k: p.get(k) for k in EXPORT_FIELDS} for p in store.labelled()),
                      key=lambda r: (r["labelled_at"] or "", r["frame_id"]))
        if request.format == "json":
            return {"ok": True, "count": len(rows), "labels": rows}
        # the CSV alone: with the rows as JSON beside it, the answer met the broker's maximum packet size at half the labels
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS)
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)  # JSON keeps the values as they are
        return {"ok": True, "count": len(rows), "csv": out.getvalue()}
