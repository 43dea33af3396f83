"""``python -m worker --config FILE`` runs the worker; ``query`` asks it for similar frames, ``label`` labels a
frame, ``labels`` exports the operators' labels, ``capture`` exports the captured frames for retraining,
``reload``, ``rollback`` and ``status`` roll a model out, back, or say what serves, ``console`` serves the operator
web page."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from bundle import MIN_TRAIN_IMAGES, BundleError
from worker.config import Config, ConfigError, load_config
from worker.wire import MAX_REQUEST_BYTES

if TYPE_CHECKING:  # the MQTT client is imported when a command needs it
    from worker.api_client import ApiClient

log = logging.getLogger("worker")


def _run(args: argparse.Namespace) -> int:
    from worker.supervise import StopSignals

    # Before the imports and the compile, which take seconds: a stop signal meanwhile (the default ends the process at
    # once, or raises KeyboardInterrupt into an import or past a compile thread) stops the start once it is done.
    # SIGHUP too (a terminal or ssh session that closes): by default it ends the process at once, and the frames in
    # its queue, already acknowledged to the broker, would be lost with it
    signals = StopSignals().install()
    cfg = load_config(args.config)
    logging.getLogger().setLevel(cfg.worker.log_level)
    log.info("starting worker %r: loading and compiling %s", cfg.worker.id, cfg.model.bundle)
    from worker.service import Worker  # imports OpenVINO/Qdrant only once the config is valid

    # The store is not opened here: one that is down is an outage (spooled), one of another embedding size is said
    # and answered while inspection goes on (worker/recorder.py); results are the worker's main job.
    worker = Worker(cfg)
    if signals.received is not None:  # nothing was taken from the broker yet: nothing to finish
        log.info("stopped by %s during the start, before serving (nothing was taken from the broker)",
                 signal.Signals(signals.received).name)
        return 0
    worker.run(threading.Event(), signals)
    return 0


def _ask(cfg: Config, name: str, send: Callable[[ApiClient], dict], unanswered: str | None = None) -> dict | None:
    """One request to the running worker over MQTT; None, after saying why, when none answered (``unanswered``: a
    note for a request that was sent and not answered, not for one the broker refused or that never went out)."""
    from worker.api_client import ApiClient, ApiError, Unanswered
    from worker.mqtt import PacketTooLarge

    try:
        with ApiClient(cfg, name) as client:
            return send(client)
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if unanswered is not None and isinstance(exc, Unanswered):
            print(unanswered, file=sys.stderr)
        return None
    except PacketTooLarge as exc:
        print(f"error: {exc} (its max_packet_size): send less (a query image re-encoded as JPEG, or smaller), or "
              "raise the broker's max_packet_size", file=sys.stderr)
        return None


def _query(args: argparse.Namespace) -> int:
    if empty := [flag for flag, value in (("--frame-id", args.frame_id), ("--camera", args.camera),
                                          ("--image", args.image)) if value == ""]:
        print(f"error: {empty[0]} is empty: name one, or leave it out", file=sys.stderr)
        return 2
    if args.camera and not (args.image or args.frame_id):
        print(f"error: --camera names the camera of --frame-id or --image; the latest frames of a camera: --cameras "
              f"{args.camera}", file=sys.stderr)
        return 2
    cfg = load_config(args.config)
    cameras = args.cameras or []
    if commas := [c for c in cameras if "," in c]:
        print(f"note: --cameras takes names separated by spaces; {commas[0]!r} is read as one camera's name",
              file=sys.stderr)
    request: dict = {"top_k": args.top_k, "filters": {"cameras": cameras,
                                                      "anomalous_only": args.anomalous_only,
                                                      "since": args.since, "until": args.until}}
    if args.image:
        try:
            request["image_b64"] = base64.b64encode(Path(args.image).read_bytes()).decode()
        except OSError as exc:
            print(f"error: --image {args.image}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        size = len(json.dumps(request))
        if size > MAX_REQUEST_BYTES:  # the worker would refuse it unread; say so before it is sent
            print(f"error: --image {args.image}: the request would be {size} bytes (base64 adds a third to the "
                  f"image's {Path(args.image).stat().st_size}); the worker takes requests up to {MAX_REQUEST_BYTES} "
                  "bytes: re-encode the image as JPEG (or make it smaller), or query by --frame-id", file=sys.stderr)
            return 2
    elif args.frame_id:
        request["frame_id"] = args.frame_id
    if args.camera:
        request["camera"] = args.camera
    answer = _ask(cfg, "query", lambda client: client.query(request))
    if answer is None:
        return 2
    if args.json:
        print(json.dumps(answer, indent=2))
    elif answer.get("ok"):
        compared = bool(args.image or args.frame_id)  # neither: the latest frames, with when each was received
        print("\n".join(_hits_table(answer["hits"], compared)))
        if answer.get("note"):  # why fewer frames than asked for came back (frames of other models' spaces)
            print(f"note: {answer['note']}", file=sys.stderr)
    else:
        print(f"error: {answer['error']['code']}: {answer['error']['message']}", file=sys.stderr)
    return 0 if answer.get("ok") else 1


WIDEST_COLUMN = 64  # a longer id or name overflows its column rather than pad every other row that far


def _hits_table(hits: list[dict], compared: bool) -> list[str]:
    """A query's hits as lines of aligned columns, each as wide as its longest cell (up to :data:`WIDEST_COLUMN`):
    fixed widths left a camera publisher's 44-character frame ids pushing every later column out of line."""
    rows = [[f"{hit['similarity']:.4f}" if compared else hit["received_at"] or "-", hit["camera"], hit["frame_id"],
             hit["captured_at"] or "-", f"{hit['score']:.3f}", hit["verdict"], _label_cell(hit)] for hit in hits]
    header = ["similarity" if compared else "received_at", "camera", "frame_id", "captured_at", "score", "verdict",
              "label"]
    widths = [min(max(len(cell) for cell in column), WIDEST_COLUMN) for column in zip(header, *rows, strict=True)]
    right = {0, 4} if compared else {4}  # the numbers

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(width) if i in right else cell.ljust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return [line(header), *map(line, rows)]


def _label_cell(hit: dict) -> str:
    """A hit's operator label for the table: a frame flagged and labelled a false alarm would otherwise read as one
    more past defect like the one asked about."""
    label = hit.get("label")
    if label == "confirmed_defect" and hit.get("defect_type"):
        return f"confirmed_defect: {hit['defect_type']}"
    return label or "-"


def _labels(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    answer = _ask(cfg, "labels", lambda client: client.label({"action": "export", "format": args.format}))
    if answer is None:
        return 2
    if not answer.get("ok"):
        print(f"error: {answer['error']['code']}: {answer['error']['message']}", file=sys.stderr)
        return 1
    text = answer["csv"] if args.format == "csv" else json.dumps(answer["labels"], indent=2) + "\n"
    if args.out:
        try:
            Path(args.out).write_text(text)
        except OSError as exc:  # a folder, a path below a file, a place not ours to write
            print(f"error: --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"{answer['count']} labels written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _label(args: argparse.Namespace) -> int:
    """One label over MQTT; a false alarm's answer says what the model absorbed."""
    cfg = load_config(args.config)
    if args.clear:
        body = {"action": "unlabel", "frame_id": args.frame_id, "camera": args.camera, "captured_at": args.captured_at}
    else:
        body = {"action": "set", "frame_id": args.frame_id, "camera": args.camera, "note": args.note,
                "label": "false_alarm" if args.false_alarm else "confirmed_defect", "defect_type": args.defect,
                "captured_at": args.captured_at}
    answer = _ask(cfg, "label", lambda client: client.label(body))
    if answer is None:
        return 2
    if not answer.get("ok"):
        print(f"error: {answer['error']['code']}: {answer['error']['message']}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    if (answer.get("absorbed") or {}).get("full"):  # stored, but the false alarm keeps being flagged
        print(f"error: the label is stored but nothing was absorbed: {answer['absorbed']['reason']}", file=sys.stderr)
        return 3
    return 0


CONTROL_TIMEOUT_S = 120  # a reload verifies and compiles the bundle before it answers


def _seconds(text: str) -> float:
    """A wait in seconds: above 0 and at most a day (the request's MQTT message expiry is a 32-bit count of seconds,
    and a longer wait than a day is a typo)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value <= 86400):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0 and at most a day (86400)")
    return value


def _control(args: argparse.Namespace) -> int:
    """A control command to the running worker (``worker.id``'s control topic); its answer as JSON."""
    cfg = load_config(args.config)
    body = {"command": args.command, **({"bundle": args.bundle} if getattr(args, "bundle", None) else {}),
            **({"camera": args.camera} if getattr(args, "camera", None) else {})}
    # the request expires with the wait, but one the worker took is carried out
    note = None if args.command == "status" else (f"note: if the worker took the {args.command} before the wait ran "
                                                  "out, it is carried out: python -m worker status says what serves")
    answer = _ask(cfg, args.command, lambda client: client.control(body, args.timeout), note)
    if answer is None:
        return 2
    if not answer.get("ok"):
        print(f"error: {answer['error']['code']}: {answer['error']['message']}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2))
    return 0


def _capture(args: argparse.Namespace) -> int:
    """Export the captured frames from the local capture folder (the worker need not run)."""
    from bundle import BundleError, read_manifest
    from worker.capture import Capture, NoRoom, train_command
    from worker.config import camera_tiling
    from worker.models import serving_bundles

    cfg = load_config(args.config)
    try:  # a folder this login may not list read as empty ("nothing captured"), or failed as --out's
        os.listdir(cfg.capture.path)
    except FileNotFoundError:
        pass  # nothing captured yet: said below
    except OSError as exc:  # the worker's folder, mode 0750 or 0700 under a service's umask
        print(f"error: the captured frames in {cfg.capture.path} cannot be read ({exc.strerror or exc}): run this as "
              "the worker's user (sudo -u edge-inspect ...) or one of its group", file=sys.stderr)
        return 2
    try:
        written = Capture(cfg.capture.path, cfg.capture.max_frames, cfg.capture.min_distance, read_only=True).export(
            Path(args.out), [args.camera] if args.camera else None, cfg.store.min_free_mb * 2**20)
    except OSError as exc:  # --out below a file, on a full disk, not ours to write
        print(f"error: the training folder cannot be written under {args.out} "
              f"({exc.strerror if isinstance(exc, NoRoom) else exc})", file=sys.stderr)
        return 2
    if not written:
        print(f"error: nothing captured under {cfg.capture.path}" + (f" for camera {args.camera}" if args.camera else ""),
              file=sys.stderr)
        return 1
    for camera, w in written.items():
        override = cfg.cameras.get(camera)
        manifest = None  # the bundles are gone or unreadable: the command then says nothing of their kind or tiles
        # the worker need not run: the kind and tiles of the bundle its next start serves the camera (a roll-out or
        # canary that rollout.json records), else of the one config.yaml gives it, which serves where that cannot
        for path in serving_bundles(cfg, camera):
            with contextlib.suppress(BundleError):
                manifest = read_manifest(path, verify=False)
                break
        command = train_command(Path(args.out), Path(w['folder']).name,
                                camera_tiling(override, manifest.tiling if manifest else None), manifest)
        defects = f" and {w['confirmed_defects']} confirmed defects (the test split)" if w["confirmed_defects"] else ""
        print(f"{camera}: {w['normal']} normal frames, {w['false_alarms']} false alarms{defects} in {w['folder']}; "
              f"train with\n  {command}")
        if (good := w["normal"] + w["false_alarms"]) < MIN_TRAIN_IMAGES:
            print(f"note: {camera} has {good} good images; train needs at least {MIN_TRAIN_IMAGES}: capture more "
                  "first", file=sys.stderr)
    return 0


def _console(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    logging.getLogger().setLevel(cfg.worker.log_level)
    try:
        from worker.console.app import serve
    except ImportError as exc:
        print(f"error: the console needs the 'console' extra (pip install 'edge-inspect[console]'): {exc}",
              file=sys.stderr)
        return 2
    serve(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--config", default="config.yaml", help="config file (default ./config.yaml)")
    sub = parser.add_subparsers(dest="command")
    query = sub.add_parser("query", help="ask the running worker for the most similar past frames (neither --image "
                           "nor --frame-id: the latest frames matching the filters)")
    query.add_argument("--config", default=argparse.SUPPRESS)
    source = query.add_mutually_exclusive_group()
    source.add_argument("--image", help="an image file to compare with the history")
    source.add_argument("--frame-id", help="a past frame's id")
    query.add_argument("--camera", help="camera of --frame-id, when ids repeat across cameras; with --image, the "
                       "camera whose model embeds the image (else the one --cameras names, else the default model)")
    query.add_argument("--top-k", type=int, default=5)
    query.add_argument("--cameras", nargs="+", action="extend", metavar="CAMERA",
                       help="only frames from these cameras (names separated by spaces, as a camera name may hold a comma)")
    query.add_argument("--anomalous-only", action="store_true")
    query.add_argument("--since", help="only frames captured at or after (ISO-8601 or epoch seconds)")
    query.add_argument("--until", help="only frames captured at or before (a date alone: through that day, UTC)")
    query.add_argument("--json", action="store_true", help="print the whole answer as JSON (with thumbnails)")
    query.set_defaults(func=_query)
    labels = sub.add_parser("labels", help="export the operators' labels (false alarm / confirmed defect) from the store")
    labels.add_argument("--config", default=argparse.SUPPRESS)
    labels.add_argument("--format", choices=("csv", "json"), default="csv")
    labels.add_argument("--out", help="write to this file instead of stdout")
    labels.set_defaults(func=_labels)
    label = sub.add_parser("label", help="label a past frame (a false alarm is absorbed into the model at once)")
    label.add_argument("--config", default=argparse.SUPPRESS)
    label.add_argument("--frame-id", required=True)
    label.add_argument("--camera", required=True)
    kind = label.add_mutually_exclusive_group(required=True)
    kind.add_argument("--false-alarm", action="store_true", help="the frame is normal: the model learns it")
    kind.add_argument("--defect", metavar="TYPE", help="a confirmed defect of this type")
    kind.add_argument("--clear", action="store_true", help="withdraw the frame's label (and what it taught the model)")
    label.add_argument("--note")
    label.add_argument("--captured-at", help="the frame's captured_at as its result says: refused (unknown_frame) where "
                                             "the history holds another frame of this id, a camera that reused it")
    label.set_defaults(func=_label)
    capture = sub.add_parser("capture", help="export the captured normal frames and false alarms as a training folder")
    capture.add_argument("--config", default=argparse.SUPPRESS)
    capture.add_argument("--out", required=True, help="folder to write <camera>/good/ into")
    capture.add_argument("--camera", help="only this camera")
    capture.set_defaults(func=_capture)
    for name, what in (("reload", "serve a bundle: on one camera (a canary) or on every camera without its own"),
                       ("rollback", "go back to the model a camera (or the default) served before its last reload"),
                       ("status", "say which model each camera's scope serves")):
        command = sub.add_parser(name, help=what)
        command.add_argument("--config", default=argparse.SUPPRESS)
        if name == "reload":
            command.add_argument("--bundle", help="bundle folder on the worker's box (relative: to the worker's "
                                 "working folder); without it, the scope's own bundle read again")
        if name != "status":
            command.add_argument("--camera", help="only this camera's scope (a canary); without it, the default")
        command.add_argument("--timeout", type=_seconds, default=CONTROL_TIMEOUT_S if name != "status" else None,
                             help="seconds to wait for the answer (default: "
                                  + (f"{CONTROL_TIMEOUT_S}, as a reload compiles the bundle)" if name != "status"
                                     else "query.timeout_s)"))
        command.set_defaults(func=_control)
    console = sub.add_parser("console", help="serve the operator web console (console.host:console.port)")
    console.add_argument("--config", default=argparse.SUPPRESS)
    console.set_defaults(func=_console)
    parser.set_defaults(func=_run)
    return parser


SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def to_journal() -> bool:
    """Whether stderr is systemd's journal stream: JOURNAL_STREAM names its device and inode (sd-daemon), and a
    child whose stderr was redirected inherits the variable but not the stream."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError):
        return False


def prioritised(text: str, level: int) -> str:
    """``text`` with the sd-daemon ``<N>`` prefix of ``level`` on each line (a traceback's too), so journald files
    it at that priority (``journalctl -p warning`` finds it)."""
    return "\n".join(f"<{SYSLOG_PRIORITY.get(level, 6)}>{line}" for line in text.split("\n"))


class JournalFormatter(logging.Formatter):
    """No timestamp (journald adds its own) and the syslog priority of each line."""

    def format(self, record: logging.LogRecord) -> str:
        return prioritised(super().format(record), record.levelno)


def _say_error(text: str, journal: bool) -> None:
    print(prioritised(text, logging.ERROR) if journal else text, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    journal = to_journal()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s") if journal else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    # httpx, qdrant-client's transport to a store.url server, logs each HTTP request at INFO: a line per store write,
    # query and retention pass, and two per try while the server is down; its warnings and errors still come through
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (ConfigError, BundleError) as exc:
        _say_error(f"error: {exc}", journal)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while a command waits (the broker, an answer): a line, not a traceback
        # a request that changes something may be on its way
        sent = {"label": ": the label may still be applied", "reload": ": the reload may still be carried out",
                "rollback": ": the rollback may still be carried out"}.get(args.command, "")
        _say_error(f"error: interrupted (Ctrl-C){sent}", journal)
        return 130


if __name__ == "__main__":
    sys.exit(main())
